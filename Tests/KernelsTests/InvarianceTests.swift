// The kernels that sampling, scoring and training share must give a row the same bits whatever
// the batch around it, the thread count, the work split or the weight packing; and those bits
// must be right (checked against float64 references).
import Kernels
import TestSupport
import XCTest

final class InvarianceTests: XCTestCase {
    var rng = SeededRandom(seed: 5)

    override func tearDown() { Compute.setThreads(2) }

    /// y = x·Wᵀ for many (M, N, K), 1 and 2 threads, packed and not: every row equals that row
    /// projected alone on one thread, bit for bit, and the float64 product within rounding.
    func testProjectionRowsAreInvariant() {
        for (n, k) in [(16, 64), (100, 72), (256, 256), (300, 64), (1024, 128)] {
            let w = rng.normals(n * k)
            let packed = w.withUnsafeBufferPointer { PackedMatrix($0.baseAddress!, rows: n, columns: k) }
            for m in [1, 2, 5, 7, 32, 200, 400] {
                let x = rng.normals(m * k)
                // Reference bits: each row alone, one thread, unpacked.
                Compute.setThreads(1)
                var alone = [Float](repeating: 0, count: m * n)
                for r in 0..<m {
                    x.withUnsafeBufferPointer { xp in
                        alone.withUnsafeMutableBufferPointer { yp in
                            project(yp.baseAddress! + r * n, xp.baseAddress! + r * k, rows: 1, w, outFeatures: n, inFeatures: k)
                        }
                    }
                }
                for threads in [1, 2] {
                    Compute.setThreads(threads)
                    for usePacked in [false, true] {
                        var y = [Float](repeating: .nan, count: m * n)
                        Compute.spinning {
                            project(&y, x, rows: m, w, outFeatures: n, inFeatures: k, packed: usePacked ? packed : nil)
                        }
                        let same = zip(y, alone).allSatisfy { $0.bitPattern == $1.bitPattern }
                        XCTAssertTrue(same, "M \(m) N \(n) K \(k) threads \(threads) packed \(usePacked)")
                    }
                }
                var reference = [Float](repeating: 0, count: m * n)
                for r in 0..<m {
                    for j in 0..<n {
                        var s = 0.0
                        for i in 0..<k { s += Double(x[r * k + i]) * Double(w[j * k + i]) }
                        reference[r * n + j] = Float(s)
                    }
                }
                assertClose(alone, reference, atol: 1e-4, rtol: 1e-5, "projection M \(m) N \(n) K \(k)")
            }
        }
    }

    /// Grouped-query attention (query heads sharing a KV head, processed in pairs) gives the
    /// bits of plain multi-head attention over K/V copied per query head, for even and odd group
    /// sizes and head sizes on and off the vector widths; and the float64 attention within rounding.
    func testGroupedAttentionEqualsPerHeadAttention() {
        for (heads, kvHeads, headSize) in [(4, 2, 64), (6, 2, 64), (3, 1, 32), (8, 2, 16), (4, 2, 12), (2, 2, 64)] {
            let T = 37, group = heads / kvHeads
            let q = rng.normals(T * heads * headSize)
            let kv = rng.normals(T * 2 * kvHeads * headSize)          // row t: k heads | v heads
            // The same keys and values with each KV head copied for every query head it serves.
            var wide = [Float](repeating: 0, count: T * 2 * heads * headSize)
            for t in 0..<T {
                for h in 0..<heads {
                    for d in 0..<headSize {
                        let g = h / group
                        wide[t * 2 * heads * headSize + h * headSize + d] = kv[t * 2 * kvHeads * headSize + g * headSize + d]
                        wide[t * 2 * heads * headSize + (heads + h) * headSize + d] =
                            kv[t * 2 * kvHeads * headSize + (kvHeads + g) * headSize + d]
                    }
                }
            }
            let scale = 1 / Float(headSize).squareRoot()
            func attend(_ kvRows: [Float], kvHeads nkv: Int, threads: Int) -> ([Float], [Float]) {
                Compute.setThreads(threads)
                var out = [Float](repeating: .nan, count: T * heads * headSize)
                var lse = [Float](repeating: .nan, count: T * heads)
                let stride = 2 * nkv * headSize
                kvRows.withUnsafeBufferPointer { p in
                    let base = p.baseAddress!
                    // Causal, with the last rows windowed, and row 0 seeing no keys.
                    attentionForward(&out, &lse, q: q, qStride: heads * headSize, rows: T,
                                     shape: AttentionShape(heads: heads, kvHeads: nkv, headSize: headSize, scale: scale),
                                     maxKeys: T) { t in
                        let first = t > 30 ? t - 9 : 0
                        return KeyValueSpan(keys: base + first * stride, values: base + first * stride + nkv * headSize,
                                            rowStride: stride, count: t - first)
                    }
                }
                return (out, lse)
            }
            let (grouped, groupedLSE) = attend(kv, kvHeads: kvHeads, threads: 2)
            let (single, singleLSE) = attend(wide, kvHeads: heads, threads: 1)
            let label = "heads \(heads) kv \(kvHeads) size \(headSize)"
            XCTAssertTrue(zip(grouped, single).allSatisfy { $0.bitPattern == $1.bitPattern }, label)
            XCTAssertTrue(zip(groupedLSE, singleLSE).allSatisfy { $0.bitPattern == $1.bitPattern }, label)
            var reference = [Float](repeating: 0, count: T * heads * headSize)
            for t in 0..<T {
                let first = t > 30 ? t - 9 : 0
                for h in 0..<heads {
                    let g = h / group
                    var scores: [Double] = []
                    for j in first..<t {
                        var s = 0.0
                        for d in 0..<headSize {
                            s += Double(q[(t * heads + h) * headSize + d]) * Double(kv[j * 2 * kvHeads * headSize + g * headSize + d])
                        }
                        scores.append(s * Double(scale))
                    }
                    let m = scores.max() ?? 0
                    let e = scores.map { Foundation.exp($0 - m) }
                    let z = e.reduce(0, +)
                    for d in 0..<headSize {
                        var acc = 0.0
                        for (i, j) in (first..<t).enumerated() {
                            acc += e[i] / z * Double(kv[j * 2 * kvHeads * headSize + (kvHeads + g) * headSize + d])
                        }
                        reference[(t * heads + h) * headSize + d] = Float(acc)
                    }
                }
            }
            assertClose(grouped, reference, atol: 1e-5, rtol: 1e-4, label)
        }
    }
}
