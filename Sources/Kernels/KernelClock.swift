import Dispatch
import Synchronization

/// Wall time spent in the kernels that bound a train step, for the benchmark's account of where a
/// step's time goes (`ember-bench train --clock`). Off unless `enabled` is set, when each call
/// costs one atomic load. Calls are timed on the thread that makes them (the one coordinating the
/// parallel region), so the figures are wall time, not thread time; the benchmark makes them
/// from one thread at a time.
public enum KernelClock {
    public enum Part: Int, CaseIterable, Sendable {
        /// `gemm` and `sgemm`: every projection and its gradients, the LM head included.
        case matrixProducts
        /// Attention's forward and backward kernels (scores, softmax and weighted sums).
        case attention
    }

    public struct Reading: Sendable {
        public var seconds: Double = 0
        /// Multiply-adds counted twice (matrix products only).
        public var flops: Double = 0
        public var calls = 0
    }

    private static let on = Atomic<Bool>(false)
    private static let readings = Mutex<[Reading]>(Array(repeating: Reading(), count: Part.allCases.count))

    public static var enabled: Bool {
        get { on.load(ordering: .relaxed) }
        set { on.store(newValue, ordering: .relaxed) }
    }

    /// The readings since the last `reset`, by part.
    public static func read() -> [Part: Reading] {
        readings.withLock { r in Dictionary(uniqueKeysWithValues: Part.allCases.map { ($0, r[$0.rawValue]) }) }
    }

    public static func reset() {
        readings.withLock { r in r = Array(repeating: Reading(), count: Part.allCases.count) }
    }

    /// Runs `body`, adding its wall time (and `flops`) to `part` when the clock is on.
    @inline(__always)
    static func time<T>(_ part: Part, flops: Double = 0, _ body: () throws -> T) rethrows -> T {
        guard enabled else { return try body() }
        let t0 = DispatchTime.now().uptimeNanoseconds
        defer {
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            readings.withLock { r in
                r[part.rawValue].seconds += seconds
                r[part.rawValue].flops += flops
                r[part.rawValue].calls += 1
            }
        }
        return try body()
    }
}
