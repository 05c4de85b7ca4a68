import Dispatch
import Foundation
import Synchronization
import COpenBLAS
import CKernels

/// Process-wide compute settings: how many threads kernels and BLAS may use.
public enum Compute {
    nonisolated(unsafe) private static var threadCount: Int = {
        openblas_set_num_threads(1)
        return 1
    }()

    /// Threads used by elementwise/attention kernels and by OpenBLAS.
    public static var threads: Int { threadCount }

    /// Sets the thread count for Ember's kernels and for OpenBLAS (at least 1).
    public static func setThreads(_ n: Int) {
        threadCount = max(1, n)
        openblas_set_num_threads(Int32(threadCount))
    }

    /// EMBER_BACKWARD_GEMM=openblas runs the backward's weight- and input-gradient GEMMs in
    /// OpenBLAS instead of Ember's own kernels (for the benchmark that compares the two).
    public static let backwardBLAS = ProcessInfo.processInfo.environment["EMBER_BACKWARD_GEMM"] == "openblas"

    /// Keeps large freed blocks in the heap instead of returning them to the kernel. A train step
    /// allocates and frees activations and scratch of many megabytes; served by fresh mmaps, each
    /// costs page faults and the kernel's zeroing of every page (8-9% of a tiny-shape train step
    /// in `perf`). Called once by the executables at start-up.
    public static func keepFreedMemory() {
        ember_keep_freed_memory()
    }

    /// EMBER_DECODE_SPIN=0 turns the spinning scope off (every region through libdispatch).
    static let spinEnabled = ProcessInfo.processInfo.environment["EMBER_DECODE_SPIN"] != "0"
    nonisolated(unsafe) private static var pools: [Int: SpinPool] = [:]
    private static let poolLock = NSLock()

    static func pool() -> SpinPool? {
        let n = threadCount
        guard n > 1 else { return nil }
        poolLock.lock(); defer { poolLock.unlock() }
        if let p = pools[n] { return p }
        let p = SpinPool(extra: n - 1)
        pools[n] = p
        return p
    }

    /// Scopes open in any pool: outside decode steps a parallel region pays one atomic load here,
    /// not the lock below.
    private static let openScopes = Atomic<Int>(0)

    /// The pool whose scope is open, if any.
    static var spinningPool: SpinPool? {
        guard threadCount > 1, openScopes.load(ordering: .relaxed) > 0 else { return nil }
        poolLock.lock(); defer { poolLock.unlock() }
        if let p = pools[threadCount], p.isSpinning { return p }
        return nil
    }

    /// Runs `body` with worker threads that spin between parallel regions (for decode steps:
    /// many short regions). Outside such a scope regions go through libdispatch.
    public static func spinning<T>(_ body: () throws -> T) rethrows -> T {
        guard spinEnabled, let p = pool() else { return try body() }
        openScopes.add(1, ordering: .relaxed)
        p.enter()
        p.wake()
        defer { p.leave(); openScopes.subtract(1, ordering: .relaxed) }
        return try body()
    }
}

/// Runs `workers` copies of `body` through the spinning pool when its scope is open, else
/// through libdispatch.
@inline(__always)
func fanOut(_ workers: Int, _ body: @escaping @Sendable (Int) -> Void) {
    if let p = Compute.spinningPool, p.run(workers: workers, body) { return }
    DispatchQueue.concurrentPerform(iterations: workers, execute: body)
}

/// Runs `body(i)` for i in 0..<count, spread over `Compute.threads` workers in contiguous
/// blocks. Each index is processed exactly once; results must not depend on the split.
@inline(__always)
public func parallelFor(_ count: Int, minPerThread: Int = 1, _ body: (Int) -> Void) {
    let workers = min(Compute.threads, max(1, count / max(1, minPerThread)))
    if workers <= 1 || count <= 1 {
        for i in 0..<count { body(i) }
        return
    }
    withoutActuallyEscaping(body) { body in
        let box = UncheckedBox(body)
        fanOut(workers) { w in
            let lo = count * w / workers, hi = count * (w + 1) / workers
            for i in lo..<hi { box.value(i) }
        }
    }
}

/// Runs `body(worker, lo, hi)` over contiguous ranges, one per worker; `worker` indexes
/// per-thread scratch space.
public func parallelRanges(_ count: Int, minPerThread: Int = 1, _ body: (Int, Int, Int) -> Void) {
    let workers = min(Compute.threads, max(1, count / max(1, minPerThread)))
    if workers <= 1 {
        body(0, 0, count)
        return
    }
    withoutActuallyEscaping(body) { body in
        let box = UncheckedBox(body)
        fanOut(workers) { w in
            box.value(w, count * w / workers, count * (w + 1) / workers)
        }
    }
}

/// A shared counter for dynamic work claiming.
final class ItemCounter: @unchecked Sendable {
    let value = Atomic<Int>(0)
}

/// Runs `body(i)` for i in 0..<count on `Compute.threads` workers that claim items one at a
/// time: a worker that starts late or is descheduled takes fewer items. Only for items whose
/// results do not depend on which worker runs them.
public func parallelClaim(_ count: Int, _ body: (Int) -> Void) {
    let workers = min(Compute.threads, count)
    if workers <= 1 {
        for i in 0..<count { body(i) }
        return
    }
    let counter = ItemCounter()
    withoutActuallyEscaping(body) { body in
        let box = UncheckedBox(body)
        fanOut(workers) { _ in
            while true {
                let i = counter.value.wrappingAdd(1, ordering: .relaxed).oldValue
                if i >= count { break }
                box.value(i)
            }
        }
    }
}

/// Carries a non-Sendable value into concurrent workers; callers guarantee disjoint writes.
public struct UncheckedBox<Value>: @unchecked Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
}

/// Deals items of `sizes` to `bins` bins, the largest first, each to the least loaded bin (so
/// the bins' totals stay close): each bin's item indices, in dealing order.
public func dealLargestFirst(_ sizes: [Int], into bins: Int) -> [[Int]] {
    var out = [[Int]](repeating: [], count: max(1, bins)), load = [Int](repeating: 0, count: max(1, bins))
    for i in sizes.indices.sorted(by: { sizes[$0] > sizes[$1] }) {
        let b = load.indices.min { load[$0] < load[$1] }!
        out[b].append(i); load[b] += sizes[i]
    }
    return out
}
