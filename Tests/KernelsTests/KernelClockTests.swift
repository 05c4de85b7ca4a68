// The benchmark's clock (`ember-bench train --clock`): what it counts, and that it counts nothing
// while off.
import Kernels
import XCTest

final class KernelClockTests: XCTestCase {
    override func tearDown() {
        KernelClock.enabled = false
        KernelClock.reset()
    }

    private func work() -> [Float] {
        let (m, n, k) = (5, 40, 33)
        let a = (0..<(m * k)).map { Float($0 % 7) - 3 }, b = (0..<(k * n)).map { Float($0 % 5) - 2 }
        var c = [Float](repeating: 0, count: m * n), d = c
        a.withUnsafeBufferPointer { a in
            b.withUnsafeBufferPointer { b in
                let (pa, pb) = (a.baseAddress!, b.baseAddress!)
                gemm(m: m, n: n, k: k, .rows(pa, ld: k), .rows(pb, ld: n), &c, ldc: n)
                // gemmAddScaled runs one gemm inside: counted once.
                gemmAddScaled(m: m, n: n, k: k, alpha: 0.5, .rows(pa, ld: k), .rows(pb, ld: n), &c, ldc: n)
                sgemm(transA: false, transB: false, m: m, n: n, k: k, a: pa, lda: k, b: pb, ldb: n, c: &d, ldc: n)
            }
        }
        // Attention over one sequence of 3 rows, one head.
        let HS = 4, Q = 3 * HS
        let qkv = (0..<(3 * Q)).map { Float($0 % 11) / 11 }
        var out = [Float](repeating: 0, count: 3 * HS)
        qkv.withUnsafeBufferPointer { p in
            let base = p.baseAddress!
            attentionForward(&out, nil, q: base, qStride: Q, rows: 3,
                             shape: AttentionShape(heads: 1, kvHeads: 1, headSize: HS, scale: 0.5), maxKeys: 3) { t in
                KeyValueSpan(keys: base + HS, values: base + 2 * HS, rowStride: Q, count: t + 1)
            }
        }
        return c + d + out
    }

    func testCountsEachProductOnceWithItsFlops() {
        KernelClock.reset()
        KernelClock.enabled = true
        let clocked = work()
        KernelClock.enabled = false
        let r = KernelClock.read()
        let products = r[.matrixProducts]!, attention = r[.attention]!
        XCTAssertEqual(products.calls, 3)
        XCTAssertEqual(products.flops, 3 * 2 * 5 * 40 * 33)
        XCTAssertGreaterThan(products.seconds, 0)
        XCTAssertEqual(attention.calls, 1)
        XCTAssertEqual(attention.flops, 0)
        XCTAssertGreaterThan(attention.seconds, 0)
        // Off: nothing more is counted, and the results are the same bits.
        let unclocked = work()
        XCTAssertEqual(KernelClock.read()[.matrixProducts]!.calls, 3)
        XCTAssertEqual(clocked.map(\.bitPattern), unclocked.map(\.bitPattern))
        KernelClock.reset()
        XCTAssertEqual(KernelClock.read()[.matrixProducts]!.calls, 0)
        XCTAssertEqual(KernelClock.read()[.attention]!.seconds, 0)
    }
}
