// Key/value cache for incremental decoding: per layer and slot, `capacity` rows of
// NKV·HS keys and the same of values, contiguous so a query reads them with one stride.
import Kernels

public final class KVCache {
    public let layers: Int
    public let slots: Int
    public let capacity: Int
    public let rowWidth: Int
    private let storage: UnsafeMutablePointer<Float>

    /// Allocates `slots` sequences of up to `capacity` tokens for `architecture`.
    public init(architecture a: Architecture, slots: Int, capacity: Int) {
        layers = a.layers
        self.slots = slots
        self.capacity = capacity
        rowWidth = a.kvWidth
        let n = layers * 2 * slots * capacity * rowWidth
        storage = .allocate(capacity: max(1, n))
        storage.initialize(repeating: 0, count: max(1, n))
    }

    deinit { storage.deallocate() }

    /// Bytes held by the cache.
    public var byteCount: Int { layers * 2 * slots * capacity * rowWidth * 4 }

    @inline(__always)
    public func keys(layer: Int, slot: Int) -> UnsafeMutablePointer<Float> {
        storage + ((layer * 2) * slots + slot) * capacity * rowWidth
    }

    @inline(__always)
    public func values(layer: Int, slot: Int) -> UnsafeMutablePointer<Float> {
        storage + ((layer * 2 + 1) * slots + slot) * capacity * rowWidth
    }

    /// Copies the first `count` positions of slot `from` into slot `to` (all layers): an
    /// `n`-sample request prefills its prompt once and copies the cache to its other samples.
    public func copyPrefix(from: Int, to: Int, count: Int) {
        for l in 0..<layers {
            keys(layer: l, slot: to).update(from: keys(layer: l, slot: from), count: count * rowWidth)
            values(layer: l, slot: to).update(from: values(layer: l, slot: from), count: count * rowWidth)
        }
    }
}
