// LoRA adapters (Hu et al. 2021) in PEFT's layout: a projection y = x·Wᵀ (+ b) becomes
// y + s·(x·Aᵀ)·Bᵀ with A [r, in], B [out, r] and s = alpha / r (alpha / √r with rsLoRA). The base
// weights stay frozen and shared; each adapter owns a small ParameterStore (values, gradients,
// AdamW moments) whose slots are named as PEFT names the tensors in `adapter_model.safetensors`.
// Every adapter product keeps `project`'s per-element FMA chains (`projectSerial`), so a token's
// output depends only on its own row: sampling, scoring and training agree bit for bit per adapter, whichever
// other adapters share the batch.
import Foundation
import Kernels
import Weights

/// The four fused projections of a layer an adapter can attach to.
public enum LoRAProjection: Int, Sendable, CaseIterable {
    case qkv, o, mlpIn, mlpOut
    var slotName: String { ["qkv.weight", "o.weight", "mlp_in.weight", "mlp_out.weight"][rawValue] }
}

/// Hyper-parameters of an adapter (PEFT `LoraConfig` names in the comments).
public struct LoRAOptions: Sendable, Equatable {
    /// `r`
    public var rank: Int
    /// `lora_alpha`
    public var alpha: Float
    /// `target_modules`: module names matched as PEFT does (the whole name, or its last
    /// dot-separated parts), or the single entry "all-linear".
    public var targetModules: [String]
    /// `use_rslora`: scaling alpha / √r instead of alpha / r.
    public var useRSLoRA: Bool

    public init(rank: Int, alpha: Float, targetModules: [String], useRSLoRA: Bool = false) {
        self.rank = rank; self.alpha = alpha; self.targetModules = targetModules; self.useRSLoRA = useRSLoRA
    }

    public var scaling: Float { useRSLoRA ? alpha / Float(rank).squareRoot() : alpha / Float(rank) }
}

public enum LoRAError: Error, CustomStringConvertible, Equatable {
    /// `path` names the offending field or file; `reason` says what is wrong.
    case invalid(path: String, reason: String)
    public var description: String {
        switch self { case let .invalid(p, r): "\(p): \(r)" }
    }
}

/// One adapted projection: rows `rowStart..<rowStart+outFeatures` of a layer's fused projection.
public struct LoRASite: Sendable {
    public let layer: Int
    public let projection: LoRAProjection
    /// Hugging Face module name, e.g. `model.layers.0.self_attn.q_proj`.
    public let module: String
    public let rowStart: Int
    public let outFeatures: Int
    public let inFeatures: Int
    /// Offsets of A [r, in] and B [out, r] in the adapter's parameter buffer.
    public let aOffset: Int
    public let bOffset: Int
    /// PEFT's tensor names.
    public var aName: String { "base_model.model.\(module).lora_A.weight" }
    public var bName: String { "base_model.model.\(module).lora_B.weight" }
}

extension TransformerModel {
    /// Every projection an adapter can target, in layer order: (module, layer, projection,
    /// first row, rows, input features), from the family's tensor table.
    public var adaptableModules: [(module: String, layer: Int, projection: LoRAProjection, rowStart: Int, rows: Int, inFeatures: Int)] {
        let a = architecture
        let inputs: [LoRAProjection: Int] = [.qkv: a.hiddenSize, .o: a.attentionWidth, .mlpIn: a.hiddenSize,
                                             .mlpOut: a.intermediateSize]
        var out: [(String, Int, LoRAProjection, Int, Int, Int)] = []
        for l in 0..<a.layers {
            for p in LoRAProjection.allCases {
                let slot = Slot.layer(l, p.slotName), k = inputs[p]!
                for b in bindings where b.slot == slot && b.checkpointName.hasSuffix(".weight") {
                    let module = String(b.checkpointName.dropLast(".weight".count))
                    let rows = b.transposed ? b.shape[1] : b.shape[0]
                    out.append((module, l, p, b.transposed ? 0 : b.elementOffset / k, rows, k))
                }
            }
        }
        return out
    }
}

/// PEFT's rule: an entry matches a module named exactly so or ending in "." + entry.
func moduleMatches(_ module: String, _ entry: String) -> Bool {
    module == entry || module.hasSuffix("." + entry)
}

public final class LoRAAdapter {
    /// The name it is served under (set by whoever registers it).
    public var name = ""
    public let options: LoRAOptions
    public let scaling: Float
    public let sites: [LoRASite]
    /// sites by layer and projection (indices into `sites`).
    let index: [[[Int]]]
    public let parameters: ParameterStore
    /// The base model's shape, to refuse an adapter of another model.
    public let baseShape: String
    /// Packed A and B of each site (see `Kernels.project`), valid for `packedVersion`.
    var packedSites: [(a: PackedMatrix, b: PackedMatrix)?] = []
    var packedVersion = -1

    /// A new adapter for `model`: A Kaiming-uniform (PEFT's default: U(±1/√in)) from `seed`, B
    /// zero, so the adapted model starts exactly as the base.
    public convenience init(model: TransformerModel, options: LoRAOptions, seed: UInt64) throws {
        try self.init(model: model, options: options)
        var rng = SplitMix64(seed: seed)
        for s in sites {
            let bound = 1 / Float(s.inFeatures).squareRoot()
            let a = parameters.values + s.aOffset
            for i in 0..<(options.rank * s.inFeatures) { a[i] = (rng.nextUnit() * 2 - 1) * bound }
        }
        parameters.markModified()
    }

    /// An all-zero adapter of `options` for `model` (checked: rank and target modules).
    public init(model: TransformerModel, options: LoRAOptions) throws {
        guard options.rank >= 1 else { throw LoRAError.invalid(path: "rank", reason: "must be at least 1, got \(options.rank)") }
        guard options.alpha.isFinite, options.alpha > 0 else {
            throw LoRAError.invalid(path: "alpha", reason: "must be a finite number > 0, got \(options.alpha)")
        }
        guard !options.targetModules.isEmpty else {
            throw LoRAError.invalid(path: "target_modules", reason: "name at least one module (or \"all-linear\")")
        }
        let all = model.adaptableModules
        let names = Set(all.map { $0.module.split(separator: ".").last.map(String.init)! }).sorted()
        var chosen = Set<String>()
        for (i, entry) in options.targetModules.enumerated() {
            if entry == "all-linear" { all.forEach { chosen.insert($0.module) }; continue }
            let hits = all.filter { moduleMatches($0.module, entry) }
            guard !hits.isEmpty else {
                throw LoRAError.invalid(path: "target_modules[\(i)]",
                                        reason: "'\(entry)' names no projection of this \(model.architecture.modelType) model; it has \(names.joined(separator: ", ")) (or \"all-linear\")")
            }
            hits.forEach { chosen.insert($0.module) }
        }
        var layout = ParameterLayout()
        var sites: [LoRASite] = []
        var index = Array(repeating: Array(repeating: [Int](), count: LoRAProjection.allCases.count), count: model.architecture.layers)
        for m in all where chosen.contains(m.module) {
            guard options.rank <= min(m.rows, m.inFeatures) else {
                throw LoRAError.invalid(path: "rank", reason: "\(options.rank) exceeds the smaller side of \(m.module) (\(m.rows) x \(m.inFeatures))")
            }
            let aName = "base_model.model.\(m.module).lora_A.weight", bName = "base_model.model.\(m.module).lora_B.weight"
            let aOff = layout.add(aName, [options.rank, m.inFeatures])
            let bOff = layout.add(bName, [m.rows, options.rank])
            index[m.layer][m.projection.rawValue].append(sites.count)
            sites.append(LoRASite(layer: m.layer, projection: m.projection, module: m.module, rowStart: m.rowStart,
                                  outFeatures: m.rows, inFeatures: m.inFeatures, aOffset: aOff, bOffset: bOff))
        }
        self.options = options
        scaling = options.scaling
        self.sites = sites
        self.index = index
        parameters = ParameterStore(layout: layout)
        baseShape = model.shapeSignature
    }

    /// A copy with the same weights (a frozen reference policy).
    public func copy(model: TransformerModel) throws -> LoRAAdapter {
        let c = try LoRAAdapter(model: model, options: options)
        c.parameters.values.update(from: parameters.values, count: parameters.count)
        c.parameters.markModified()
        return c
    }

    /// Number of trainable parameters.
    public var parameterCount: Int { parameters.layout.parameterCount }

    func sites(layer: Int, _ p: LoRAProjection) -> [Int] { index[layer][p.rawValue] }

    /// Builds the packed copies of the sites at (layer, projection) for the current weights
    /// (called outside parallel regions).
    func preparePacked(layer: Int, _ p: LoRAProjection) {
        if packedVersion != parameters.version {
            packedSites = Array(repeating: nil, count: sites.count)
            packedVersion = parameters.version
        }
        for si in sites(layer: layer, p) where packedSites[si] == nil {
            let s = sites[si], w = parameters.values
            packedSites[si] = (PackedMatrix(w + s.aOffset, rows: options.rank, columns: s.inFeatures),
                               PackedMatrix(w + s.bOffset, rows: s.outFeatures, columns: options.rank))
        }
    }
}

extension TransformerModel {
    /// Layer count, widths and vocabulary: what an adapter's shapes depend on.
    public var shapeSignature: String {
        let a = architecture
        return "\(a.modelType) layers=\(a.layers) hidden=\(a.hiddenSize) heads=\(a.heads)/\(a.kvHeads)x\(a.headDim) intermediate=\(a.intermediateSize)"
    }
}

/// SplitMix64 (Steele et al.): the adapter initialiser's stream (and the benchmark's).
public struct SplitMix64 {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 24 random bits.
    public mutating func nextUnit() -> Float { Float(next() >> 40) / Float(1 << 24) }
}

// MARK: - Which adapter each token uses

/// The adapters of a batch and the rows (tokens) of each; rows of no adapter use the base.
public struct AdapterRows {
    public let adapters: [LoRAAdapter]
    /// rows[k]: the tokens that use adapters[k], ascending.
    public let rows: [[Int]]
    public let tokenCount: Int

    /// Every one of `tokens` rows uses `adapter`.
    public init(_ adapter: LoRAAdapter, tokens: Int) {
        adapters = [adapter]; rows = [Array(0..<tokens)]; tokenCount = tokens
    }

    /// Per token its adapter or nil (base); nil when no token uses one.
    public init?(perToken: [LoRAAdapter?]) {
        var adapters: [LoRAAdapter] = [], rows: [[Int]] = []
        for (t, a) in perToken.enumerated() {
            guard let a else { continue }
            if let k = adapters.firstIndex(where: { $0 === a }) { rows[k].append(t) } else { adapters.append(a); rows.append([t]) }
        }
        if adapters.isEmpty { return nil }
        self.adapters = adapters; self.rows = rows; tokenCount = perToken.count
    }

    /// The single adapter every row uses, if that is so.
    public var only: LoRAAdapter? { adapters.count == 1 && rows[0].count == tokenCount ? adapters[0] : nil }
}

// MARK: - Forward and backward at one projection

extension AdapterRows {
    /// y[t, rowStart + j] += s · ((x[t]·Aᵀ)·Bᵀ)[j] for every row t of an adapter with a site at
    /// (layer, projection). x is [T, in] (contiguous), y is [T, yStride]. One parallel region:
    /// work items are runs of consecutive rows of one adapter (at most 48 rows, so an adapter's
    /// packed A and B stay in cache across its rows); a row's result is the same chains whatever
    /// item, thread or batch it falls in.
    func applyForward(layer: Int, _ p: LoRAProjection, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>, yStride: Int) {
        var items: [(adapter: Int, runs: [Range<Int>])] = []
        for (k, adapter) in adapters.enumerated() where !adapter.sites(layer: layer, p).isEmpty {
            adapter.preparePacked(layer: layer, p)
            var runs: [Range<Int>] = [], count = 0
            var i = 0
            let list = rows[k]
            while i < list.count {
                var j = i + 1
                while j < list.count && list[j] == list[j - 1] + 1 && j - i < 48 { j += 1 }
                runs.append(list[i]..<(list[j - 1] + 1))
                count += j - i
                if count >= 48 { items.append((k, runs)); runs = []; count = 0 }
                i = j
            }
            if !runs.isEmpty { items.append((k, runs)) }
        }
        if items.isEmpty { return }
        parallelFor(items.count, minPerThread: 1) { it in
            let adapter = adapters[items[it].adapter]
            let list = adapter.sites(layer: layer, p), r = adapter.options.rank, scale = adapter.scaling
            let K = adapter.sites[list[0]].inFeatures
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 48 * r) { ub in
                let u = ub.baseAddress!
                for run in items[it].runs {
                    let n = run.count, xs = x + run.lowerBound * K
                    for si in list {
                        let s = adapter.sites[si], packed = adapter.packedSites[si]!
                        projectSerial(u, ldy: r, xs, rows: n, packed: packed.a)
                        projectSerial(y + run.lowerBound * yStride + s.rowStart, ldy: yStride, u, rows: n, packed: packed.b,
                                      addScaled: scale)
                    }
                }
            }
        }
    }
}

extension LoRAAdapter {
    /// Backward at (layer, projection) for a batch where every row uses this adapter: given dY
    /// [T, dyStride] (the projection's output gradient) and its input x [T, in], accumulates
    /// dA and dB into the adapter's gradients and adds the adapter's share into dX [T, in].
    func backward(layer: Int, _ p: LoRAProjection, x: UnsafePointer<Float>, dY: UnsafePointer<Float>, dyStride: Int,
                  dX: UnsafeMutablePointer<Float>, rows T: Int) {
        let list = sites(layer: layer, p)
        if list.isEmpty || T == 0 { return }
        let r = options.rank, w = parameters.values, g = parameters.gradients
        let u = FloatBuffer(T * r), gu = FloatBuffer(T * r)
        for si in list {
            let s = sites[si], K = s.inFeatures, O = s.outFeatures
            let dy = dY + s.rowStart
            // u = x·Aᵀ (recomputed); dB += s·dyᵀ·u; gu = s·dy·B; dA += guᵀ·x; dX += gu·A.
            project(u.pointer, x, rows: T, w + s.aOffset, outFeatures: r, inFeatures: K)
            gemmAddScaled(m: O, n: r, k: T, alpha: scaling, .transposed(dy, ld: dyStride), .rows(u.pointer, ld: r),
                          g + s.bOffset, ldc: r)
            gemm(m: T, n: r, k: O, alpha: scaling, .rows(dy, ld: dyStride), .rows(w + s.bOffset, ld: r), gu.pointer, ldc: r)
            gemm(m: r, n: K, k: T, .transposed(gu.pointer, ld: r), .rows(x, ld: K), g + s.aOffset, ldc: K, accumulate: true)
            gemm(m: T, n: K, k: r, .rows(gu.pointer, ld: r), .rows(w + s.aOffset, ld: K), dX, ldc: K, accumulate: true)
        }
    }
}
