// Owned fp32 buffers for activations and scratch space, recycled through a bounded pool: a
// training step allocates the same large buffers every time, and fresh pages from the kernel
// cost a page fault and a clear each (13% of a tiny-model step before the pool).
import Foundation

public final class FloatBuffer {
    public let pointer: UnsafeMutablePointer<Float>
    public let count: Int
    private let capacity: Int

    /// Uninitialized storage for `count` floats.
    public init(_ count: Int) {
        self.count = count
        (pointer, capacity) = BufferPool.shared.take(max(1, count))
    }

    /// Zero-filled storage for `count` floats.
    public convenience init(zeros count: Int) {
        self.init(count)
        pointer.initialize(repeating: 0, count: max(1, count))
    }

    deinit { BufferPool.shared.give(pointer, capacity: capacity) }

    public var array: [Float] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}

/// Free buffers by size class, up to `limitBytes` in all (oldest released first beyond it).
/// Sendable by hand: every thread takes and gives buffers; the lists live under `lock`.
public final class BufferPool: @unchecked Sendable {
    public static let shared = BufferPool()

    private let lock = NSLock()
    private var free: [Int: [UnsafeMutablePointer<Float>]] = [:]
    private var order: [(Int, UnsafeMutablePointer<Float>)] = []
    private var pooled = 0
    /// Bytes the pool may keep while unused.
    public let limitBytes = 6 << 30

    /// Sizes are rounded up to a class at most 12.5% larger, so similar shapes share buffers.
    static func sizeClass(_ n: Int) -> Int {
        if n <= 4096 { return 4096 }
        let shift = max(0, (Int.bitWidth - n.leadingZeroBitCount) - 4)
        return ((n + (1 << shift) - 1) >> shift) << shift
    }

    func take(_ n: Int) -> (UnsafeMutablePointer<Float>, Int) {
        let c = Self.sizeClass(n)
        lock.lock()
        if var list = free[c], let p = list.popLast() {
            free[c] = list
            pooled -= c * 4
            if let i = order.firstIndex(where: { $0.1 == p }) { order.remove(at: i) }
            lock.unlock()
            return (p, c)
        }
        lock.unlock()
        return (.allocate(capacity: c), c)
    }

    func give(_ p: UnsafeMutablePointer<Float>, capacity c: Int) {
        lock.lock()
        free[c, default: []].append(p)
        order.append((c, p))
        pooled += c * 4
        var release: [UnsafeMutablePointer<Float>] = []
        while pooled > limitBytes, !order.isEmpty {
            let (oc, op) = order.removeFirst()
            if var list = free[oc], let i = list.firstIndex(of: op) {
                list.remove(at: i); free[oc] = list
                pooled -= oc * 4
                release.append(op)
            }
        }
        lock.unlock()
        for r in release { r.deallocate() }
    }
}
