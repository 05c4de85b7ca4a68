// Weight publishing (a trainer's `GET /v1/weights`) and following (a replica's swap): the
// dispatcher side, on the compute thread. The server's WeightPublisher hashes and serves what
// `publishWeights` builds; its WeightFollower downloads and checks, and `applyFollowed` swaps.
import Engine
import Foundation
import Kernels
import Models
import Weights

/// One adapter as published: its PEFT config and adapter_model.safetensors image.
public struct PublishedAdapter: @unchecked Sendable {
    public let name: String
    public let weightsVersion: Int
    /// What the adapter's weights are (version and modification count): equal keys, equal bytes.
    public let key: String
    public let config: [String: Any]
    public let image: SafetensorsImage
}

/// The weights as they were at one step boundary. Immutable: later steps build a new one.
/// Sendable by hand: images are immutable and the config is plain JSON.
public struct PublishedWeights: @unchecked Sendable {
    public let key: String
    public let baseKey: String
    public let weightsVersion: Int
    /// config.json, parsed.
    public let config: Any
    public let image: SafetensorsImage
    public let adapters: [PublishedAdapter]
}

/// A follower's staged update: changed base tensors and the adapters it should hold afterwards.
public struct FollowedWeights: @unchecked Sendable {
    public struct Tensor {
        public let name: String, dtype: DType, shape: [Int]
        /// The tensor is `range` of `bytes` (a downloaded run of tensors, shared, not copied).
        public let bytes: ByteBlock
        public let range: Range<Int>
        public init(name: String, dtype: DType, shape: [Int], bytes: ByteBlock, range: Range<Int>) {
            self.name = name; self.dtype = dtype; self.shape = shape; self.bytes = bytes; self.range = range
        }
    }
    public struct Adapter {
        public let name: String
        public let weightsVersion: Int
        /// The adapter's PEFT files as downloaded, adapter_config.json's content and
        /// adapter_model.safetensors' bytes (nil: keep the adapter held under this name).
        public let files: (config: [String: Any], weights: ByteBlock)?
        public init(name: String, weightsVersion: Int, files: (config: [String: Any], weights: ByteBlock)?) {
            self.name = name; self.weightsVersion = weightsVersion; self.files = files
        }
    }
    public var weightsVersion: Int
    public var tensors: [Tensor]
    /// Every adapter the replica holds afterwards, in the trainer's order.
    public var adapters: [Adapter]
    public init(weightsVersion: Int, tensors: [Tensor], adapters: [Adapter]) {
        self.weightsVersion = weightsVersion; self.tensors = tensors; self.adapters = adapters
    }
}

extension Dispatcher {
    /// Names what the published weights are: changes with every step, load or adapter change.
    public var publicationKey: String {
        var key = baseKey
        for name in adapterOrder {
            let t = adapterTrainers[name]!
            key += "|\(name):\(t.weightsVersion).\(t.adapter!.parameters.version)"
        }
        return key
    }

    var baseKey: String { "\(trainer.weightsVersion).\(model.parameters.version)" }

    /// The weights now, as safetensors images: the base in the storage's dtype (BF16 holds a bf16
    /// server's values exactly), adapters in F32. Images of `previous` whose keys still match
    /// are reused rather than rebuilt.
    public func publishWeights(reusing previous: PublishedWeights?) throws -> PublishedWeights {
        let bk = baseKey
        let image: SafetensorsImage
        if let previous, previous.baseKey == bk {
            image = previous.image
        } else {
            let dtype: DType = model.parameters.storage == .bf16 ? .bf16 : .f32
            image = try model.weightsImage(dtype: dtype, metadata: ["weights_version": "\(trainer.weightsVersion)"])
        }
        var adapters: [PublishedAdapter] = []
        for name in adapterOrder {
            let t = adapterTrainers[name]!, a = t.adapter!
            let key = "\(t.weightsVersion).\(a.parameters.version)"
            if let old = previous?.adapters.first(where: { $0.name == name && $0.key == key }) {
                adapters.append(old)
                continue
            }
            adapters.append(PublishedAdapter(name: name, weightsVersion: t.weightsVersion, key: key,
                                             config: a.peftConfig(model: model, baseModelPath: configuration.modelDirectory),
                                             image: try a.weightsImage()))
        }
        let config = (try? JSONSerialization.jsonObject(with: model.configJSON)) ?? [String: Any]()
        return PublishedWeights(key: publicationKey, baseKey: bk, weightsVersion: trainer.weightsVersion, config: config,
                                image: image, adapters: adapters)
    }

    /// The SHA-256 (by `hash`) of every checkpoint tensor as it would be published in `dtype`,
    /// without building an image: F32 tensors stored as published are hashed in place.
    public func tensorDigests(dtype: DType, hash: @Sendable (UnsafeRawPointer, Int) -> String) -> [String: String] {
        let values = UnsafePointer(model.parameters.values)
        let bindings = model.bindings
        let digests = StringSlots(bindings.count)
        let model = self.model
        parallelRanges(bindings.count) { _, lo, hi in for i in lo..<hi {
            let b = bindings[i], n = b.shape.reduce(1, *)
            if dtype == .f32 && !b.transposed, let slot = model.parameters.layout.slot(b.slot) {
                digests.set(i, hash(values + slot.offset + b.elementOffset, n * 4))
                continue
            }
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(1, n))
            defer { scratch.deallocate() }
            model.copyCheckpointTensor(b, from: values, into: scratch)
            if dtype == .f32 { digests.set(i, hash(scratch, n * 4)); continue }
            let half = UnsafeMutablePointer<UInt16>.allocate(capacity: max(1, n))
            defer { half.deallocate() }
            for k in 0..<n { half[k] = floatToBF16(scratch[k]).littleEndian }
            digests.set(i, hash(half, n * 2))
        } }
        return Dictionary(uniqueKeysWithValues: zip(bindings.map(\.checkpointName), digests.values))
    }

    /// Whether `config` (a trainer's config.json) describes the model this server holds.
    public func sameModel(_ config: Any) -> Bool {
        // Compared as canonical JSON (sorted keys), both sides parsed by the same parser.
        func canonical(_ v: Any) -> Data? {
            guard JSONSerialization.isValidJSONObject(v) else { return nil }
            return try? JSONSerialization.data(withJSONObject: v, options: [.sortedKeys])
        }
        guard let ours = try? JSONSerialization.jsonObject(with: model.configJSON), let a = canonical(config), let b = canonical(ours) else {
            return false
        }
        return a == b
    }

    /// A replica's swap, at a step boundary: every staged tensor and adapter checked first, then
    /// applied, so a failure leaves the weights as they were.
    public func applyFollowed(_ update: FollowedWeights) throws -> Any {
        var loaded: [String: LoRAAdapter] = [:]
        for a in update.adapters {
            if let (config, weights) = a.files {
                var spare = spareAdapters.removeValue(forKey: a.name)
                let reusable = spare != nil && isKnownUniquelyReferenced(&spare!)
                let adapter = try LoRAAdapter.load(config: config, weights: weights, name: "the trainer's adapter '\(a.name)'", model: model,
                                                   reusing: reusable ? spare : nil)
                adapter.name = a.name
                loaded[a.name] = adapter
            } else if adapterTrainers[a.name] == nil {
                throw RPCError(.syncFailed, hint: "the trainer's adapter '\(a.name)' was not downloaded and this replica does not hold it")
            }
        }
        for t in update.tensors {
            guard let b = model.bindings.first(where: { $0.checkpointName == t.name }) else {
                throw RPCError(.syncFailed, hint: "the trainer sent tensor '\(t.name)', which this model does not have")
            }
            guard b.shape == t.shape, t.range.count == t.shape.reduce(1, *) * t.dtype.byteSize, t.range.upperBound <= t.bytes.count else {
                throw RPCError(.syncFailed, hint: "tensor '\(t.name)' arrived with shape \(t.shape) (\(t.range.count) bytes); this model's is \(b.shape)")
            }
        }
        // Commit.
        // On the compute threads: the tensors dealt out largest first to the least loaded thread.
        let dealt = dealLargestFirst(update.tensors.map(\.range.count), into: min(Compute.threads, update.tensors.count))
        let failures = StringSlots(dealt.count), model = self.model, tensors = update.tensors
        parallelFor(dealt.count) { g in
            for i in dealt[g] {
                let t = tensors[i]
                do {
                    try model.assign(tensor: t.name, dtype: t.dtype, shape: t.shape, bytes: UnsafeRawPointer(t.bytes.pointer) + t.range.lowerBound)
                } catch { failures.set(g, "\(error)") }
            }
        }
        // Checked above (names, shapes, byte counts), so assign does not refuse here.
        if let f = failures.values.first(where: { !$0.isEmpty }) { throw RPCError(.syncFailed, hint: "applying the trainer's weights failed: \(f)") }
        if !update.tensors.isEmpty { model.finishAssigning() }
        var trainers: [String: Trainer] = [:]
        for a in update.adapters {
            let t = loaded[a.name].map { Trainer(model: model, adapter: $0) } ?? adapterTrainers[a.name]!
            t.adopt(weightsVersion: a.weightsVersion)
            trainers[a.name] = t
        }
        spareAdapters = [:]
        for (name, old) in adapterTrainers where loaded[name] != nil { if let o = old.adapter { spareAdapters[name] = o } }
        adapterTrainers = trainers
        adapterOrder = update.adapters.map(\.name)
        trainer.adopt(weightsVersion: update.weightsVersion)
        return ["weights_version": trainer.weightsVersion]
    }
}

/// One string per item, each written by one thread of a parallel loop (the publisher's hashes,
/// a replica's own, a swap's failures).
/// Sendable by hand: each slot has one writer, and `values` is read after the loop.
public final class StringSlots: @unchecked Sendable {
    private let slots: UnsafeMutablePointer<String>
    private let n: Int
    public init(_ n: Int) { self.n = n; slots = .allocate(capacity: max(1, n)); slots.initialize(repeating: "", count: max(1, n)) }
    deinit { slots.deinitialize(count: max(1, n)); slots.deallocate() }
    public func set(_ i: Int, _ v: String) { slots[i] = v }
    public var values: [String] { Array(UnsafeBufferPointer(start: slots, count: n)) }
}
