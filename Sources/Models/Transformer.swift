// Long on purpose (~580 lines): the shared forward and backward sit in one file so each op's pair reads side by side, as llm.c keeps them.
// The decoder-only transformer shared by every family: parameter layout, loading and saving
// through the family's tensor table, forward over a packed batch or against a KV cache, and the
// backward of every op. Families differ only through `Architecture` flags.
import Foundation
import Kernels
import Weights

/// How a forward pass finds each token's keys and values.
public enum AttentionContext {
    /// Training and scoring: tokens are concatenated sequences, `sequenceStarts` has B+1
    /// entries (first 0, last T); each token attends to the earlier tokens of its sequence.
    case packed(sequenceStarts: [Int])
    /// Decoding: token t belongs to cache slot `slots[t]` at its position; its k/v are written
    /// there and it attends to positions 0...position of that slot.
    case cache(KVCache, slots: [Int32])
}

/// Errors in forward inputs (checked before any kernel runs).
public enum InputError: Error, CustomStringConvertible, Equatable {
    case tokenOutOfRange(index: Int, token: Int32, vocabSize: Int)
    case positionOutOfRange(index: Int, position: Int32, limit: Int)
    case badSequenceStarts(String)
    case badCacheSlot(index: Int, slot: Int32, slots: Int)
    case lengthMismatch(String)

    public var description: String {
        switch self {
        case let .tokenOutOfRange(i, t, v): "token \(t) at index \(i) is outside the vocabulary (0..<\(v))"
        case let .positionOutOfRange(i, p, l): "position \(p) at index \(i) is outside 0..<\(l)"
        case let .badSequenceStarts(r): "sequence boundaries: \(r)"
        case let .badCacheSlot(i, s, n): "cache slot \(s) at index \(i) is outside 0..<\(n)"
        case let .lengthMismatch(r): r
        }
    }
}

/// Offsets of one layer's slots in the flat parameter buffer; nil where the family has none.
struct LayerOffsets {
    let attnNormW: Int, attnNormB: Int?
    let qkvW: Int, qkvB: Int?
    /// Per-head q and k RMSNorm weights (Qwen3).
    let qNormW: Int?, kNormW: Int?
    let oW: Int, oB: Int?
    let mlpNormW: Int, mlpNormB: Int?
    let mlpInW: Int, mlpInB: Int?
    let mlpOutW: Int, mlpOutB: Int?
}

/// What the backward pass needs from one layer's forward.
final class LayerActivations {
    let xIn, norm1Mean, norm1Rstd, qkvRaw, headRstd, qkv, attn, lse, xMid, norm2Mean, norm2Rstd, mlpIn: FloatBuffer
    init(T: Int, a: Architecture) {
        let C = a.hiddenSize
        xIn = FloatBuffer(T * C)
        norm1Mean = FloatBuffer(a.norm == .layer ? T : 0)
        norm1Rstd = FloatBuffer(T)
        qkvRaw = FloatBuffer(a.qkNorm ? T * a.qkvWidth : 0)
        headRstd = FloatBuffer(a.qkNorm ? T * (a.heads + a.kvHeads) : 0)
        qkv = FloatBuffer(T * a.qkvWidth)
        attn = FloatBuffer(T * a.attentionWidth)
        lse = FloatBuffer(T * a.heads)
        xMid = FloatBuffer(T * C)
        norm2Mean = FloatBuffer(a.norm == .layer ? T : 0)
        norm2Rstd = FloatBuffer(T)
        mlpIn = FloatBuffer(T * a.mlpInWidth)
    }
}

/// Saved forward state of a packed batch, consumed by `backward`.
public final class Activations {
    let tokens: [Int32]
    let positions: [Int32]
    let sequenceStarts: [Int]
    let layers: [LayerActivations]
    let xFinal, finalMean, finalRstd, cos, sin: FloatBuffer
    /// Final normalized hidden states [T, C], the input of the output head.
    public let hidden: FloatBuffer
    /// The adapters the forward applied, by row (nil: the base model only).
    public let adapters: AdapterRows?
    public var tokenCount: Int { tokens.count }

    init(tokens: [Int32], positions: [Int32], sequenceStarts: [Int], layers: [LayerActivations],
         xFinal: FloatBuffer, finalMean: FloatBuffer, finalRstd: FloatBuffer, cos: FloatBuffer,
         sin: FloatBuffer, hidden: FloatBuffer, adapters: AdapterRows?) {
        self.tokens = tokens; self.positions = positions; self.sequenceStarts = sequenceStarts
        self.layers = layers; self.xFinal = xFinal; self.finalMean = finalMean; self.finalRstd = finalRstd
        self.cos = cos; self.sin = sin; self.hidden = hidden; self.adapters = adapters
    }

    /// Bytes held by the saved activations.
    public var byteCount: Int {
        var n = xFinal.count + finalMean.count + finalRstd.count + cos.count + sin.count + hidden.count
        for l in layers {
            n += l.xIn.count + l.norm1Mean.count + l.norm1Rstd.count + l.qkvRaw.count + l.headRstd.count
            n += l.qkv.count + l.attn.count + l.lse.count + l.xMid.count + l.norm2Mean.count
            n += l.norm2Rstd.count + l.mlpIn.count
        }
        return n * 4
    }
}

public final class TransformerModel {
    public let architecture: Architecture
    public let family: any ModelFamily.Type
    public let parameters: ParameterStore
    public let bindings: [TensorBinding]
    /// config.json as loaded; written back unchanged by `save`.
    public let configJSON: Data

    let layerOffsets: [LayerOffsets]
    let embedOffset: Int
    /// Learned position embeddings (GPT-2); nil with RoPE.
    let positionEmbedOffset: Int?
    let finalNormW: Int
    /// LayerNorm's bias; nil with RMSNorm.
    let finalNormB: Int?
    /// Offset of the unembedding matrix [V, C]: the embedding itself when tied.
    let headOffset: Int

    /// Packed copies of weight matrices (see `Kernels.project`), valid for `packedVersion`.
    private var packedCache: [Int: PackedMatrix] = [:]
    private var packedVersion = -1
    private let packedLock = NSLock()
    /// When true every projection keeps a packed copy of its weights (decoding: small batches
    /// would otherwise repack whole matrices per step); the output head always does.
    public var cachesPackedWeights = false

    /// The packed copy of the [rows, columns] matrix at `offset`, built on demand.
    func packed(_ offset: Int, rows: Int, columns: Int, always: Bool = false) -> PackedMatrix? {
        guard always || cachesPackedWeights else { return nil }
        packedLock.lock(); defer { packedLock.unlock() }
        if packedVersion != parameters.version {
            packedCache = [:]
            packedVersion = parameters.version
        }
        if let p = packedCache[offset] { return p }
        let p = PackedMatrix(parameters.values + offset, rows: rows, columns: columns, bf16: parameters.storage == .bf16)
        packedCache[offset] = p
        return p
    }

    // MARK: - Construction

    /// A model with all-zero weights for `config` (config.json data).
    public init(config: Data) throws {
        let (family, arch) = try ModelRegistry.architecture(config: config)
        self.family = family
        architecture = arch
        configJSON = config
        bindings = family.bindings(arch)

        let C = arch.hiddenSize
        var layout = ParameterLayout()
        embedOffset = layout.add(Slot.embed, [arch.vocabSize, C])
        positionEmbedOffset = arch.position == .learned ? layout.add(Slot.positionEmbed, [arch.maxPositions, C]) : nil
        var offsets: [LayerOffsets] = []
        for i in 0..<arch.layers {
            // Slots in layout order (the order of the flat buffer).
            func add(_ name: String, _ shape: [Int], if present: Bool = true) -> Int? {
                present ? layout.add(Slot.layer(i, name), shape) : nil
            }
            let layerNorm = arch.norm == .layer
            let attnNormW = add("attn_norm.weight", [C])!, attnNormB = add("attn_norm.bias", [C], if: layerNorm)
            let qkvW = add("qkv.weight", [arch.qkvWidth, C])!, qkvB = add("qkv.bias", [arch.qkvWidth], if: arch.qkvBias)
            let qNormW = add("q_norm.weight", [arch.headDim], if: arch.qkNorm), kNormW = add("k_norm.weight", [arch.headDim], if: arch.qkNorm)
            let oW = add("o.weight", [C, arch.attentionWidth])!, oB = add("o.bias", [C], if: arch.outputBias)
            let mlpNormW = add("mlp_norm.weight", [C])!, mlpNormB = add("mlp_norm.bias", [C], if: layerNorm)
            let mlpInW = add("mlp_in.weight", [arch.mlpInWidth, C])!, mlpInB = add("mlp_in.bias", [arch.mlpInWidth], if: arch.mlpBias)
            let mlpOutW = add("mlp_out.weight", [C, arch.intermediateSize])!, mlpOutB = add("mlp_out.bias", [C], if: arch.mlpBias)
            offsets.append(LayerOffsets(attnNormW: attnNormW, attnNormB: attnNormB, qkvW: qkvW, qkvB: qkvB, qNormW: qNormW,
                                        kNormW: kNormW, oW: oW, oB: oB, mlpNormW: mlpNormW, mlpNormB: mlpNormB,
                                        mlpInW: mlpInW, mlpInB: mlpInB, mlpOutW: mlpOutW, mlpOutB: mlpOutB))
        }
        finalNormW = layout.add(Slot.finalNormWeight, [C])
        finalNormB = arch.norm == .layer ? layout.add(Slot.finalNormBias, [C]) : nil
        headOffset = arch.tiedEmbeddings ? embedOffset : layout.add(Slot.lmHead, [arch.vocabSize, C])
        layerOffsets = offsets
        parameters = ParameterStore(layout: layout)
    }

    /// Loads a Hugging Face model folder (config.json + safetensors, single or sharded).
    public static func load(directory: String) throws -> TransformerModel {
        let configPath = directory + "/config.json"
        guard let config = FileManager.default.contents(atPath: configPath) else {
            throw ModelError.missingFile(path: configPath)
        }
        let model = try TransformerModel(config: config)
        try model.loadWeights(from: CheckpointReader(directory: directory))
        return model
    }

    /// Number of parameters.
    public var parameterCount: Int { parameters.layout.parameterCount }

    /// Fills weights from a checkpoint through the family's tensor table. Every expected tensor
    /// must be present with its exact shape; tensors the engine would silently ignore are refused.
    public func loadWeights(from reader: CheckpointReader) throws {
        var used = Set<String>()
        let prefix = family.optionalPrefix
        for b in bindings {
            var name = b.checkpointName
            if !reader.contains(name), name.hasPrefix(prefix), reader.contains(String(name.dropFirst(prefix.count))) {
                name = String(name.dropFirst(prefix.count))
            }
            guard let slot = parameters.layout.slot(b.slot) else { continue }
            let dest = parameters.values + slot.offset + b.elementOffset
            if b.transposed {
                let tmp = FloatBuffer(b.shape.reduce(1, *))
                try reader.read(name, shape: b.shape, into: tmp.pointer)
                let rows = b.shape[0], cols = b.shape[1]
                for r in 0..<rows { for c in 0..<cols { dest[c * rows + r] = tmp.pointer[r * cols + c] } }
            } else {
                try reader.read(name, shape: b.shape, into: dest)
            }
            used.insert(name)
        }
        let ignorable = [".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"]
        let unexpected = reader.tensorNames.filter { n in
            !used.contains(n) && !ignorable.contains(where: { n.hasSuffix($0) })
                && !(architecture.tiedEmbeddings && n == "lm_head.weight")
        }
        parameters.markModified()
        // bf16 storage: the loaded float32 values become the master (when kept) and are rounded.
        if parameters.storage == .bf16 { parameters.useBF16(keepMaster: parameters.master != nil) }
        if !unexpected.isEmpty {
            throw ModelError.unsupported(feature: "tensors \(unexpected.prefix(5).joined(separator: ", "))\(unexpected.count > 5 ? " (+\(unexpected.count - 5) more)" : "")",
                reason: "the checkpoint has weights that config.json does not describe for model_type '\(architecture.modelType)'")
        }
    }

    /// The tensor of `binding` in checkpoint layout (transposed back for GPT-2 Conv1D), read from
    /// `source`: the parameter buffer, or the gradient or moment buffer of the same layout.
    public func checkpointTensor(_ binding: TensorBinding, from source: UnsafePointer<Float>) -> [Float] {
        [Float](unsafeUninitializedCapacity: binding.shape.reduce(1, *)) { buf, n in
            copyCheckpointTensor(binding, from: source, into: buf.baseAddress!)
            n = buf.count
        }
    }

    /// As `checkpointTensor`, into `out` (room for the tensor's element count).
    public func copyCheckpointTensor(_ binding: TensorBinding, from source: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>) {
        guard let slot = parameters.layout.slot(binding.slot) else { return }
        let src = source + slot.offset + binding.elementOffset
        let n = binding.shape.reduce(1, *)
        guard binding.transposed else { out.update(from: src, count: n); return }
        let rows = binding.shape[0], cols = binding.shape[1]
        for r in 0..<rows { for c in 0..<cols { out[r * cols + c] = src[c * rows + r] } }
    }

    /// The weights the model samples with (`values`, bf16-rounded in bf16 storage) under their
    /// Hugging Face names, as one safetensors image of `dtype`: what a trainer publishes.
    public func weightsImage(dtype: DType, metadata: [String: String] = [:]) throws -> SafetensorsImage {
        let values = UnsafePointer(parameters.values)
        return try SafetensorsImage(tensors: bindings.map { ($0.checkpointName, $0.shape) }, dtype: dtype, metadata: metadata) { i, out in
            copyCheckpointTensor(bindings[i], from: values, into: out)
        }
    }

    /// Sets checkpoint tensor `name` from raw little-endian `bytes` of `dtype` and `shape`, into
    /// the most precise copy of the weights. Call `finishAssigning()` after the last one.
    public func assign(tensor name: String, dtype: DType, shape: [Int], bytes: UnsafeRawPointer) throws {
        guard let b = bindings.first(where: { $0.checkpointName == name }), let slot = parameters.layout.slot(b.slot) else {
            throw WeightsError.missingTensor(tensor: name, searched: "the \(architecture.modelType) model's tensor table")
        }
        guard shape == b.shape else { throw WeightsError.shapeMismatch(tensor: name, expected: b.shape, found: shape) }
        let dest = parameters.precise + slot.offset + b.elementOffset
        let n = b.shape.reduce(1, *)
        guard b.transposed else { convertToFloat(bytes, dtype: dtype, count: n, into: dest); return }
        let tmp = FloatBuffer(n)
        convertToFloat(bytes, dtype: dtype, count: n, into: tmp.pointer)
        let rows = b.shape[0], cols = b.shape[1]
        for r in 0..<rows { for c in 0..<cols { dest[c * rows + r] = tmp.pointer[r * cols + c] } }
    }

    /// After `assign`: re-rounds bf16 storage and tells the caches the weights changed.
    public func finishAssigning() {
        if parameters.storage == .bf16 { parameters.roundValues() } else { parameters.markModified() }
    }

    /// Writes config.json and the weights (F32 or BF16) under their Hugging Face names into an
    /// existing directory; shards above `maxShardBytes`.
    public func save(to directory: String, dtype: DType = .f32, maxShardBytes: Int = 4 << 30) throws {
        let arrays = bindings.map { checkpointTensor($0, from: parameters.precise) }
        var tensors: [TensorToWrite] = []
        for (b, a) in zip(bindings, arrays) {
            a.withUnsafeBufferPointer { tensors.append(TensorToWrite(name: b.checkpointName, shape: b.shape, data: $0)) }
        }
        try withExtendedLifetime(arrays) {
            try CheckpointWriter.write(tensors, dtype: dtype, to: directory, maxShardBytes: maxShardBytes)
        }
        guard FileManager.default.createFile(atPath: directory + "/config.json", contents: configJSON) else {
            throw WeightsError.writeFailed(path: directory + "/config.json", reason: "create failed")
        }
    }

    /// Next-token logits [rows.count, V] for the given token rows (a convenience over `forward`
    /// and `withLogitChunks` for scoring and tests).
    public func logits(tokens: [Int32], positions: [Int32], context: AttentionContext, rows: [Int]) throws -> [Float] {
        let acts = try forward(tokens: tokens, positions: positions, context: context)
        let V = architecture.vocabSize
        var out = [Float](repeating: 0, count: rows.count * V)
        out.withUnsafeMutableBufferPointer { o in
            withLogitChunks(hidden: acts.hidden.pointer, rows: rows, chunkRows: defaultChunkRows()) { range, logits in
                (o.baseAddress! + range.lowerBound * V).update(from: logits, count: range.count * V)
            }
        }
        return out
    }

    // MARK: - Input checks

    /// Validates ids, positions and attention layout before any kernel runs.
    public func validate(tokens: [Int32], positions: [Int32], context: AttentionContext) throws {
        let a = architecture
        guard tokens.count == positions.count else {
            throw InputError.lengthMismatch("\(tokens.count) tokens but \(positions.count) positions")
        }
        for (i, t) in tokens.enumerated() where t < 0 || Int(t) >= a.vocabSize {
            throw InputError.tokenOutOfRange(index: i, token: t, vocabSize: a.vocabSize)
        }
        let limit = a.position == .learned ? a.maxPositions : Int(Int32.max)
        for (i, p) in positions.enumerated() where p < 0 || Int(p) >= limit {
            throw InputError.positionOutOfRange(index: i, position: p, limit: limit)
        }
        switch context {
        case let .packed(starts):
            guard starts.first == 0, starts.last == tokens.count, zip(starts, starts.dropFirst()).allSatisfy({ $0 < $1 }) else {
                throw InputError.badSequenceStarts("must rise strictly from 0 to \(tokens.count), got \(starts.prefix(8))")
            }
        case let .cache(cache, slots):
            guard slots.count == tokens.count else {
                throw InputError.lengthMismatch("\(tokens.count) tokens but \(slots.count) cache slots")
            }
            for (i, s) in slots.enumerated() where s < 0 || Int(s) >= cache.slots {
                throw InputError.badCacheSlot(index: i, slot: s, slots: cache.slots)
            }
            for (i, p) in positions.enumerated() where Int(p) >= cache.capacity {
                throw InputError.positionOutOfRange(index: i, position: p, limit: cache.capacity)
            }
        }
    }

    // MARK: - Forward

    /// Runs the transformer body and final norm. Returns the normalized hidden states [T, C]
    /// and, when `saving`, everything `backward` needs (packed context only). `adapters` adds
    /// each row's LoRA adapter, if any, to the projections it targets.
    public func forward(tokens: [Int32], positions: [Int32], context: AttentionContext,
                        saving: Bool = false, adapters: AdapterRows? = nil) throws -> Activations {
        try validate(tokens: tokens, positions: positions, context: context)
        if let adapters {
            guard adapters.tokenCount == tokens.count else {
                throw InputError.lengthMismatch("\(tokens.count) tokens but adapter rows for \(adapters.tokenCount)")
            }
            for ad in adapters.adapters where ad.baseShape != shapeSignature {
                throw InputError.lengthMismatch("an adapter made for \(ad.baseShape) cannot run on \(shapeSignature)")
            }
        }
        let a = architecture
        let T = tokens.count, C = a.hiddenSize, Q = a.qkvWidth, A = a.attentionWidth
        let M = a.mlpInWidth, I = a.intermediateSize, NH = a.heads, NKV = a.kvHeads, HS = a.headDim
        let kvW = a.kvWidth
        let w = parameters.values
        let shape = AttentionShape(heads: NH, kvHeads: NKV, headSize: HS, scale: 1 / Float(HS).squareRoot())
        let opt = { (o: Int?) -> UnsafeMutablePointer<Float>? in o.map { w + $0 } }

        let x = FloatBuffer(T * C)
        let xn = FloatBuffer(T * C), proj = FloatBuffer(T * C), h = FloatBuffer(T * I)
        let scratchQKV = saving ? nil : FloatBuffer(T * Q)
        let scratchAttn = saving ? nil : FloatBuffer(T * A)
        let scratchMLP = saving ? nil : FloatBuffer(T * M)
        let scratchRstd = FloatBuffer(T), scratchMean = FloatBuffer(T)

        tokens.withUnsafeBufferPointer { ids in
            positions.withUnsafeBufferPointer { pos in
                embeddingForward(x.pointer, ids: ids.baseAddress!, table: w + embedOffset,
                                 positions: a.position == .learned ? pos.baseAddress! : nil,
                                 positionTable: opt(positionEmbedOffset), rows: T, channels: C)
            }
        }
        var cos = FloatBuffer(0), sin = FloatBuffer(0)
        if case let .rope(freqs) = a.position {
            cos = FloatBuffer(T * HS / 2); sin = FloatBuffer(T * HS / 2)
            positions.withUnsafeBufferPointer { freqs.tables(positions: $0.baseAddress!, count: T, cos: cos.pointer, sin: sin.pointer) }
        }

        var sequenceStarts: [Int] = []
        var maxKeys = 0
        switch context {
        case let .packed(starts):
            sequenceStarts = starts
            for b in 0..<(starts.count - 1) { maxKeys = max(maxKeys, starts[b + 1] - starts[b]) }
        case .cache:
            maxKeys = Int(positions.max() ?? 0) + 1
        }
        // Sequence start of each token (packed context).
        var tokenStart = [Int](repeating: 0, count: T)
        if !sequenceStarts.isEmpty {
            for b in 0..<(sequenceStarts.count - 1) {
                for t in sequenceStarts[b]..<sequenceStarts[b + 1] { tokenStart[t] = sequenceStarts[b] }
            }
        }

        var saved: [LayerActivations] = []
        for l in 0..<a.layers {
            let o = layerOffsets[l]
            let act = saving ? LayerActivations(T: T, a: a) : nil
            if let act { act.xIn.pointer.update(from: x.pointer, count: T * C) }
            norm(xn.pointer, mean: act?.norm1Mean.pointer ?? scratchMean.pointer,
                 rstd: act?.norm1Rstd.pointer ?? scratchRstd.pointer, x.pointer, o.attnNormW, o.attnNormB, rows: T)

            // q | k | v, optional per-head norm, RoPE on the q and k heads (adjacent in the row).
            let qkv = act?.qkv.pointer ?? scratchQKV!.pointer
            linearForward(qkv, xn.pointer, w + o.qkvW, opt(o.qkvB), rows: T, inFeatures: C, outFeatures: Q,
                          packed: packed(o.qkvW, rows: Q, columns: C))
            adapters?.applyForward(layer: l, .qkv, x: xn.pointer, y: qkv, yStride: Q)
            if let qNormW = o.qNormW, let kNormW = o.kNormW {
                if let act { act.qkvRaw.pointer.update(from: qkv, count: T * Q) }
                let rstd = act?.headRstd.pointer
                headRMSNormForward(qkv, rstd, qkv, w + qNormW, rows: T, rowStride: Q, heads: NH,
                                   headSize: HS, eps: a.normEps)
                headRMSNormForward(qkv + A, rstd.map { $0 + T * NH }, qkv + A, w + kNormW, rows: T,
                                   rowStride: Q, heads: NKV, headSize: HS, eps: a.normEps)
            }
            if case .rope = a.position {
                ropeForward(qkv, rows: T, rowStride: Q, heads: NH + NKV, headSize: HS, cos: cos.pointer, sin: sin.pointer)
            }

            let attn = act?.attn.pointer ?? scratchAttn!.pointer
            let window = a.layerWindows[l]
            switch context {
            case .packed:
                tokenStart.withUnsafeBufferPointer { starts in
                    attentionForward(attn, act?.lse.pointer, q: qkv, qStride: Q, rows: T, shape: shape,
                                     maxKeys: maxKeys) { t in
                        let s0 = window > 0 ? max(starts[t], t - window + 1) : starts[t]
                        return KeyValueSpan(keys: qkv + s0 * Q + A, values: qkv + s0 * Q + A + kvW,
                                            rowStride: Q, count: t - s0 + 1)
                    }
                }
            case let .cache(cache, slots):
                for t in 0..<T {
                    let s = Int(slots[t]), p = Int(positions[t])
                    (cache.keys(layer: l, slot: s) + p * kvW).update(from: qkv + t * Q + A, count: kvW)
                    (cache.values(layer: l, slot: s) + p * kvW).update(from: qkv + t * Q + A + kvW, count: kvW)
                }
                positions.withUnsafeBufferPointer { pos in
                    attentionForward(attn, nil, q: qkv, qStride: Q, rows: T, shape: shape, maxKeys: maxKeys) { t in
                        let s = Int(slots[t]), p = Int(pos[t])
                        let s0 = window > 0 ? max(0, p - window + 1) : 0
                        return KeyValueSpan(keys: cache.keys(layer: l, slot: s) + s0 * kvW,
                                            values: cache.values(layer: l, slot: s) + s0 * kvW,
                                            rowStride: kvW, count: p - s0 + 1)
                    }
                }
            }
            linearForward(proj.pointer, attn, w + o.oW, opt(o.oB), rows: T, inFeatures: A, outFeatures: C,
                          packed: packed(o.oW, rows: C, columns: A))
            adapters?.applyForward(layer: l, .o, x: attn, y: proj.pointer, yStride: C)
            addInPlace(x.pointer, proj.pointer, count: T * C)
            if let act { act.xMid.pointer.update(from: x.pointer, count: T * C) }

            // MLP
            norm(xn.pointer, mean: act?.norm2Mean.pointer ?? scratchMean.pointer,
                 rstd: act?.norm2Rstd.pointer ?? scratchRstd.pointer, x.pointer, o.mlpNormW, o.mlpNormB, rows: T)
            let mlpIn = act?.mlpIn.pointer ?? scratchMLP!.pointer
            linearForward(mlpIn, xn.pointer, w + o.mlpInW, opt(o.mlpInB), rows: T, inFeatures: C, outFeatures: M,
                          packed: packed(o.mlpInW, rows: M, columns: C))
            adapters?.applyForward(layer: l, .mlpIn, x: xn.pointer, y: mlpIn, yStride: M)
            activation(h.pointer, mlpIn, rows: T)
            linearForward(proj.pointer, h.pointer, w + o.mlpOutW, opt(o.mlpOutB), rows: T, inFeatures: I, outFeatures: C,
                          packed: packed(o.mlpOutW, rows: C, columns: I))
            adapters?.applyForward(layer: l, .mlpOut, x: h.pointer, y: proj.pointer, yStride: C)
            addInPlace(x.pointer, proj.pointer, count: T * C)
            if let act { saved.append(act) }
        }

        let finalMean = FloatBuffer(a.norm == .layer ? T : 0), finalRstd = FloatBuffer(T)
        let hidden = FloatBuffer(T * C)
        norm(hidden.pointer, mean: finalMean.pointer, rstd: finalRstd.pointer, x.pointer, finalNormW, finalNormB, rows: T)
        return Activations(tokens: tokens, positions: positions, sequenceStarts: sequenceStarts, layers: saved,
                           xFinal: saving ? x : FloatBuffer(0), finalMean: finalMean, finalRstd: finalRstd,
                           cos: cos, sin: sin, hidden: hidden, adapters: adapters)
    }

    @inline(__always)
    private func norm(_ out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>,
                      rstd: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ wOff: Int, _ bOff: Int?, rows: Int) {
        let w = parameters.values, a = architecture
        switch a.norm {
        case .rms:
            rmsNormForward(out, rstd, x, w + wOff, rows: rows, channels: a.hiddenSize, eps: a.normEps)
        case .layer:
            // A LayerNorm layout always has the bias slot.
            layerNormForward(out, mean, rstd, x, w + wOff, w + bOff!, rows: rows, channels: a.hiddenSize, eps: a.normEps)
        }
    }

    @inline(__always)
    private func activation(_ h: UnsafeMutablePointer<Float>, _ mlpIn: UnsafePointer<Float>, rows: Int) {
        switch architecture.mlp {
        case .swiglu: swigluForward(h, mlpIn, rows: rows, intermediate: architecture.intermediateSize)
        case .geluTanh: geluForward(h, mlpIn, count: rows * architecture.intermediateSize)
        }
    }

    // MARK: - Output head

    /// Logits for selected rows of `hidden` ([T, C]), in chunks of at most `chunkRows`, so a
    /// full [rows × V] matrix never exists. `body(range, logits)` sees rows `rows[range]` as
    /// logits[n, V]. With `dHidden`, body must leave d(loss)/d(logits) in the buffer; the head
    /// then accumulates the unembedding gradient (unless `frozenHead`) and adds
    /// d(loss)/d(hidden) into `dHidden`.
    public func withLogitChunks(hidden: UnsafePointer<Float>, rows: [Int], chunkRows: Int,
                                dHidden: UnsafeMutablePointer<Float>? = nil, frozenHead: Bool = false,
                                _ body: (Range<Int>, UnsafeMutablePointer<Float>) throws -> Void) rethrows {
        let C = architecture.hiddenSize, V = architecture.vocabSize
        let chunk = max(1, min(chunkRows, rows.count))
        let hc = FloatBuffer(chunk * C), logits = FloatBuffer(chunk * V)
        let dhc = dHidden == nil ? nil : FloatBuffer(chunk * C)
        let head = parameters.values + headOffset
        let packedHead = packed(headOffset, rows: V, columns: C, always: true)
        var start = 0
        while start < rows.count {
            let end = min(rows.count, start + chunk), n = end - start
            for i in 0..<n { (hc.pointer + i * C).update(from: hidden + rows[start + i] * C, count: C) }
            linearForward(logits.pointer, hc.pointer, head, nil, rows: n, inFeatures: C, outFeatures: V, packed: packedHead)
            try body(start..<end, logits.pointer)
            if let dHidden, let dhc {
                linearBackward(dhc.pointer, frozenHead ? nil : parameters.gradients + headOffset, nil, logits.pointer, hc.pointer, head,
                               rows: n, inFeatures: C, outFeatures: V)
                for i in 0..<n {
                    let d = dHidden + rows[start + i] * C, s = dhc.pointer + i * C
                    for c in 0..<C { d[c] += s[c] }
                }
            }
            start = end
        }
    }

    /// Logits one chunk of the output head holds: 64M floats (256 MB). Every chunk streams the
    /// whole head once, so on a 152k vocabulary 64 MB chunks (110 rows) left scoring 1.33x slower
    /// (0.5B shape, 2,048 tokens: 146 -> 193 tok/s; training unchanged).
    nonisolated(unsafe) public static var logitChunkFloats = 1 << 26

    /// Rows per logits chunk so that one chunk holds about `budgetFloats` logits.
    public func defaultChunkRows(budgetFloats: Int = TransformerModel.logitChunkFloats) -> Int {
        max(1, budgetFloats / architecture.vocabSize)
    }

    // MARK: - Backward

    /// Accumulates d(loss)/d(parameters) into `parameters.gradients`, given d(loss)/d(hidden)
    /// [T, C] for the final normalized hidden states of a packed forward saved in `acts`.
    /// With `adapter` (which every row of the forward used) the base weights are frozen: only
    /// the adapter's gradients accumulate, and the base gradient buffer is never touched.
    public func backward(_ acts: Activations, dHidden: UnsafePointer<Float>, adapter: LoRAAdapter? = nil) {
        let a = architecture
        let T = acts.tokenCount, C = a.hiddenSize, Q = a.qkvWidth, A = a.attentionWidth
        let M = a.mlpInWidth, I = a.intermediateSize, NH = a.heads, NKV = a.kvHeads, HS = a.headDim
        precondition(adapter == nil || acts.adapters?.only === adapter, "backward through an adapter every row used")
        let w = parameters.values
        let frozen = adapter != nil
        let gBase: UnsafeMutablePointer<Float>? = frozen ? nil : parameters.gradients
        let shape = AttentionShape(heads: NH, kvHeads: NKV, headSize: HS, scale: 1 / Float(HS).squareRoot())
        let opt = { (o: Int?) -> UnsafeMutablePointer<Float>? in o.flatMap { off in gBase.map { $0 + off } } }
        let gw = { (o: Int) -> UnsafeMutablePointer<Float>? in gBase.map { $0 + o } }

        let dx = FloatBuffer(T * C)          // d(loss)/d(residual stream)
        let xn = FloatBuffer(T * C), dxn = FloatBuffer(T * C)
        let h = FloatBuffer(T * I), dh = FloatBuffer(T * I), dMLP = FloatBuffer(T * M)
        let dAttn = FloatBuffer(T * A), dqkv = FloatBuffer(T * Q)

        normBackward(dx.pointer, accumulate: false, dHidden, acts.xFinal.pointer, finalNormW, finalNormB,
                     mean: acts.finalMean.pointer, rstd: acts.finalRstd.pointer, rows: T, frozen: frozen)

        for l in stride(from: a.layers - 1, through: 0, by: -1) {
            let o = layerOffsets[l], act = acts.layers[l]
            // MLP block: x = xMid + mlpOut(act(mlpIn(norm2(xMid))))
            norm(xn.pointer, mean: act.norm2Mean.pointer, rstd: act.norm2Rstd.pointer, act.xMid.pointer,
                 o.mlpNormW, o.mlpNormB, rows: T)
            activation(h.pointer, act.mlpIn.pointer, rows: T)
            linearBackward(dh.pointer, gw(o.mlpOutW), opt(o.mlpOutB), dx.pointer, h.pointer, w + o.mlpOutW,
                           rows: T, inFeatures: I, outFeatures: C)
            adapter?.backward(layer: l, .mlpOut, x: h.pointer, dY: dx.pointer, dyStride: C, dX: dh.pointer, rows: T)
            switch a.mlp {
            case .swiglu: swigluBackward(dMLP.pointer, dh.pointer, act.mlpIn.pointer, rows: T, intermediate: I)
            case .geluTanh: geluBackward(dMLP.pointer, dh.pointer, act.mlpIn.pointer, count: T * I)
            }
            linearBackward(dxn.pointer, gw(o.mlpInW), opt(o.mlpInB), dMLP.pointer, xn.pointer, w + o.mlpInW,
                           rows: T, inFeatures: C, outFeatures: M)
            adapter?.backward(layer: l, .mlpIn, x: xn.pointer, dY: dMLP.pointer, dyStride: M, dX: dxn.pointer, rows: T)
            normBackward(dx.pointer, accumulate: true, dxn.pointer, act.xMid.pointer, o.mlpNormW, o.mlpNormB,
                         mean: act.norm2Mean.pointer, rstd: act.norm2Rstd.pointer, rows: T, frozen: frozen)

            // Attention block: xMid = xIn + o(attention(rope(norm_qk(qkv(norm1(xIn))))))
            norm(xn.pointer, mean: act.norm1Mean.pointer, rstd: act.norm1Rstd.pointer, act.xIn.pointer,
                 o.attnNormW, o.attnNormB, rows: T)
            linearBackward(dAttn.pointer, gw(o.oW), opt(o.oB), dx.pointer, act.attn.pointer, w + o.oW,
                           rows: T, inFeatures: A, outFeatures: C)
            adapter?.backward(layer: l, .o, x: act.attn.pointer, dY: dx.pointer, dyStride: C, dX: dAttn.pointer, rows: T)
            attentionBackwardPacked(dqkv.pointer, dAttn.pointer, qkv: act.qkv.pointer, out: act.attn.pointer,
                                    lse: act.lse.pointer, rows: T, shape: shape,
                                    sequenceStarts: acts.sequenceStarts, window: a.layerWindows[l])
            if case .rope = a.position {
                ropeBackward(dqkv.pointer, rows: T, rowStride: Q, heads: NH + NKV, headSize: HS,
                             cos: acts.cos.pointer, sin: acts.sin.pointer)
            }
            if let qNormW = o.qNormW, let kNormW = o.kNormW {
                headRMSNormBackward(dqkv.pointer, gw(qNormW), dqkv.pointer, act.qkvRaw.pointer, w + qNormW,
                                    act.headRstd.pointer, rows: T, rowStride: Q, heads: NH, headSize: HS)
                headRMSNormBackward(dqkv.pointer + A, gw(kNormW), dqkv.pointer + A, act.qkvRaw.pointer + A,
                                    w + kNormW, act.headRstd.pointer + T * NH, rows: T, rowStride: Q,
                                    heads: NKV, headSize: HS)
            }
            linearBackward(dxn.pointer, gw(o.qkvW), opt(o.qkvB), dqkv.pointer, xn.pointer, w + o.qkvW,
                           rows: T, inFeatures: C, outFeatures: Q)
            adapter?.backward(layer: l, .qkv, x: xn.pointer, dY: dqkv.pointer, dyStride: Q, dX: dxn.pointer, rows: T)
            normBackward(dx.pointer, accumulate: true, dxn.pointer, act.xIn.pointer, o.attnNormW, o.attnNormB,
                         mean: act.norm1Mean.pointer, rstd: act.norm1Rstd.pointer, rows: T, frozen: frozen)
        }

        guard let g = gBase else { return }
        acts.tokens.withUnsafeBufferPointer { ids in
            embeddingBackward(g + embedOffset, dx.pointer, ids: ids.baseAddress!, rows: T, channels: C)
        }
        if let positionEmbed = positionEmbedOffset {
            acts.positions.withUnsafeBufferPointer { pos in
                embeddingBackward(g + positionEmbed, dx.pointer, ids: pos.baseAddress!, rows: T, channels: C)
            }
        }
    }

    @inline(__always)
    private func normBackward(_ dx: UnsafeMutablePointer<Float>, accumulate: Bool, _ dOut: UnsafePointer<Float>,
                              _ x: UnsafePointer<Float>, _ wOff: Int, _ bOff: Int?,
                              mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, rows: Int, frozen: Bool) {
        let w = parameters.values, g = frozen ? nil : parameters.gradients, C = architecture.hiddenSize
        switch architecture.norm {
        case .rms:
            rmsNormBackward(dx, g.map { $0 + wOff }, dOut, x, w + wOff, rstd, rows: rows, channels: C, accumulateInput: accumulate)
        case .layer:
            layerNormBackward(dx, g.map { $0 + wOff }, g.map { $0 + bOff! }, dOut, x, w + wOff, mean, rstd, rows: rows, channels: C,
                              accumulateInput: accumulate)
        }
    }
}
