// All trainable parameters of a model in one contiguous fp32 buffer, with gradients and AdamW
// moments in buffers of the identical layout, so zeroing, clipping and the optimizer are
// single flat loops (llm.c `train_gpt2.c`).
import Kernels

/// One named slot in the flat buffer.
public struct ParameterSlot: Sendable, Equatable {
    public let name: String
    public let shape: [Int]
    public let offset: Int
    public var count: Int { shape.reduce(1, *) }
}

/// Slot names and shapes in order, and their offsets.
public struct ParameterLayout: Sendable {
    public private(set) var slots: [ParameterSlot] = []
    public private(set) var count = 0
    private var index: [String: Int] = [:]

    public init() {}

    /// Appends a slot; returns its offset. Offsets are aligned to 16 floats (64 bytes).
    @discardableResult
    public mutating func add(_ name: String, _ shape: [Int]) -> Int {
        precondition(index[name] == nil, "duplicate parameter slot \(name)")
        let offset = (count + 15) & ~15
        slots.append(ParameterSlot(name: name, shape: shape, offset: offset))
        index[name] = slots.count - 1
        count = offset + shape.reduce(1, *)
        return offset
    }

    public func slot(_ name: String) -> ParameterSlot? { index[name].map { slots[$0] } }

    /// Number of parameters (excluding alignment padding).
    public var parameterCount: Int { slots.reduce(0) { $0 + $1.count } }
}

/// Owns the flat buffers. Gradients and moments are allocated on first use.
public final class ParameterStore {
    public let layout: ParameterLayout
    public let values: UnsafeMutablePointer<Float>
    public private(set) var gradientsIfAllocated: UnsafeMutablePointer<Float>?
    public private(set) var firstMomentIfAllocated: UnsafeMutablePointer<Float>?
    public private(set) var secondMomentIfAllocated: UnsafeMutablePointer<Float>?

    /// The weights' storage: with `.bf16` every value is a bfloat16 value (held in a float), and
    /// training keeps the float32 master in `master` (see `useBF16`).
    public private(set) var storage: DType = .f32
    /// Float32 master weights (bf16 storage while training): the optimizer updates these and
    /// writes their rounding into `values`.
    public private(set) var master: UnsafeMutablePointer<Float>?

    /// Switches to bf16 storage: keeps the current values as the float32 master when
    /// `keepMaster` (a training server; a read-only one needs none), then rounds every value to
    /// bfloat16. Calling it again re-rounds from new values (after a load).
    public func useBF16(keepMaster: Bool) {
        storage = .bf16
        if keepMaster {
            if master == nil { master = .allocate(capacity: max(1, count)) }
            master!.update(from: values, count: count)
        } else {
            master?.deallocate(); master = nil
        }
        roundValues()
    }

    /// values = bf16(master) (or bf16(values) without a master), in bf16 storage.
    public func roundValues() {
        guard storage == .bf16 else { return }
        let src = UnsafePointer(master ?? values), dst = values
        parallelRanges(count, minPerThread: 1 << 16) { _, lo, hi in
            for i in lo..<hi { dst[i] = roundedToBF16(src[i]) }
        }
        markModified()
    }

    /// The most precise copy of the weights: the master when there is one, else `values`.
    public var precise: UnsafeMutablePointer<Float> { master ?? values }

    /// Sets the weights from `source` (float32): the master and the rounded values in bf16
    /// storage, `values` otherwise.
    public func assign(from source: UnsafePointer<Float>) {
        if let master { master.update(from: source, count: count) } else { values.update(from: source, count: count) }
        if storage == .bf16 { roundValues() } else { markModified() }
    }

    public init(layout: ParameterLayout) {
        self.layout = layout
        values = .allocate(capacity: max(1, layout.count))
        values.initialize(repeating: 0, count: max(1, layout.count))
    }

    deinit {
        values.deallocate()
        master?.deallocate()
        gradientsIfAllocated?.deallocate()
        firstMomentIfAllocated?.deallocate()
        secondMomentIfAllocated?.deallocate()
    }

    public var count: Int { layout.count }

    /// Bumped by every change to `values` (loading, optimizer steps); caches derived from the
    /// weights (packed matrices) compare it to know when to rebuild.
    public private(set) var version = 0

    /// Records that `values` changed.
    public func markModified() { version &+= 1 }

    private func zeroed() -> UnsafeMutablePointer<Float> {
        let p = UnsafeMutablePointer<Float>.allocate(capacity: max(1, count))
        p.initialize(repeating: 0, count: max(1, count))
        return p
    }

    /// Gradient buffer (allocated and zeroed on first access).
    public var gradients: UnsafeMutablePointer<Float> {
        if let g = gradientsIfAllocated { return g }
        let g = zeroed(); gradientsIfAllocated = g; return g
    }
    public var firstMoment: UnsafeMutablePointer<Float> {
        if let m = firstMomentIfAllocated { return m }
        let m = zeroed(); firstMomentIfAllocated = m; return m
    }
    public var secondMoment: UnsafeMutablePointer<Float> {
        if let v = secondMomentIfAllocated { return v }
        let v = zeroed(); secondMomentIfAllocated = v; return v
    }

    public func zeroGradients() { gradients.update(repeating: 0, count: count) }

    public func pointer(_ name: String) -> UnsafeMutablePointer<Float>? {
        layout.slot(name).map { values + $0.offset }
    }

    /// FNV-1a over the parameter bits: a cheap fingerprint to prove weights did not change.
    public func checksum() -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<count {
            h = (h ^ UInt64(values[i].bitPattern)) &* 0x100_0000_01b3
        }
        return h
    }
}
