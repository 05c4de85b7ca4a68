// The AVX2 and AVX-512 kernel sets give the same bits for every kernel, and those bits are the
// documented chains: each GEMM element is one fused multiply-add chain over k in order (checked
// against a scalar chain written here), whatever the set, the thread count or the blocking. A CPU
// without AVX-512 runs its one set and compares it with the recorded bits (Tests/Fixtures/kernel-bits.json).
import Kernels
import TestSupport
import XCTest

final class KernelSetTests: XCTestCase {
    var rng = SeededRandom(seed: 11)

    override func tearDown() {
        try? KernelSet.use(KernelSet.best!)
        Compute.setThreads(2)
    }

    /// Runs `body` under each set this CPU has (and each thread count) and asserts the outputs are
    /// bit-identical to each other and to the recorded bits (`KernelBits`), which stand in for
    /// the set a CPU without AVX-512 cannot run.
    func assertSameBits(_ label: String, threads: [Int] = [1, 2], _ body: () -> [Float]) throws {
        var first: [Float]? = nil
        defer { if let first { KernelBits.check(label, first) } }
        for set in KernelSet.supported {
            try KernelSet.use(set)
            for t in threads {
                Compute.setThreads(t)
                let out = body()
                if let first {
                    let same = first.count == out.count && zip(first, out).allSatisfy { $0.bitPattern == $1.bitPattern }
                    XCTAssertTrue(same, "\(label): \(set.rawValue), \(t) threads differs from the first run")
                } else {
                    first = out
                }
            }
        }
    }

    func testUnsupportedOrUnknownSetsAreRefused() {
        XCTAssertNotNil(KernelSet.best, "the CI machine has AVX2 and FMA")
        XCTAssertEqual(KernelSet.applyEnvironment(["EMBER_KERNELS": "sse9"]),
                       "EMBER_KERNELS=sse9: unknown kernel set (use one of: avx2, avx512)")
        XCTAssertNil(KernelSet.applyEnvironment(["EMBER_KERNELS": "avx2"]))
        XCTAssertEqual(KernelSet.active, .avx2)
        XCTAssertNil(KernelSet.applyEnvironment([:]))
    }

    /// Every form of `gemm` on awkward shapes: both sets and thread counts give the same bits, and
    /// those bits are the scalar chain fma(a, b, acc) over k from 0 (or from C when accumulating),
    /// then times alpha. k up to 700 crosses the 256-deep blocks. k = 1,024 and 2,048 give A rows
    /// 4 and 8 KB apart, which the kernels copy to a stride that does not alias in L1.
    func testGemmIsOneChainPerElementInEverySet() throws {
        for (m, n, k) in [(1, 1, 1), (1, 100, 300), (2, 33, 17), (3, 16, 5), (7, 47, 700), (13, 64, 260), (50, 15, 33),
                          (97, 130, 257), (13, 64, 1024), (25, 40, 2048)] {
            let a = rng.normals(m * k), at = rng.normals(k * m), w = rng.normals(n * k), bRows = rng.normals(k * n)
            let c0 = rng.normals(m * n)
            let packed = w.withUnsafeBufferPointer { PackedMatrix($0.baseAddress!, rows: n, columns: k) }
            for (aForm, bForm, acc, alpha) in [(0, 0, false, Float(1)), (0, 2, false, 1), (1, 1, true, 1), (0, 1, true, 1),
                                               (1, 0, false, 0.5), (0, 1, false, -3)] {
                // Reference: the scalar chain.
                var want = [Float](repeating: 0, count: m * n)
                for i in 0..<m {
                    for j in 0..<n {
                        var s: Float = acc ? c0[i * n + j] : 0
                        for kk in 0..<k {
                            let av = aForm == 0 ? a[i * k + kk] : at[kk * m + i]
                            let bv = bForm == 1 ? bRows[kk * n + j] : w[j * k + kk]
                            s = s.addingProduct(av, bv)
                        }
                        want[i * n + j] = alpha == 1 ? s : s * alpha
                    }
                }
                let label = "gemm m \(m) n \(n) k \(k) A \(aForm) B \(bForm) accumulate \(acc) alpha \(alpha)"
                try assertSameBits(label) {
                    var c = acc ? c0 : [Float](repeating: .nan, count: m * n)
                    a.withUnsafeBufferPointer { ap in at.withUnsafeBufferPointer { atp in
                        w.withUnsafeBufferPointer { wp in bRows.withUnsafeBufferPointer { bp in
                            let A: GemmA = aForm == 0 ? .rows(ap.baseAddress!, ld: k) : .transposed(atp.baseAddress!, ld: m)
                            let B: GemmB = bForm == 0 ? .transposed(wp.baseAddress!, ld: k)
                                : bForm == 1 ? .rows(bp.baseAddress!, ld: n) : .packed(packed)
                            gemm(m: m, n: n, k: k, alpha: alpha, A, B, &c, ldc: n, accumulate: acc)
                        } }
                    } }
                    XCTAssertTrue(zip(c, want).allSatisfy { $0.bitPattern == $1.bitPattern }, label + ": not the scalar chain")
                    return c
                }
            }
        }
    }

    /// A row-major A whose row stride is not its depth: strides 4-12 KB apart alias in L1 and the
    /// kernels copy the rows to a padded stride first. Depths 330 and 700 give k blocks of 165 and
    /// 234 floats (a 12-row tile at 165 once searched for a stride forever); 1,536 / 3,072-float
    /// strides are real models' widths. Every set, both thread counts: the scalar chain's bits.
    func testGemmOnRowsThatAliasInL1IsTheScalarChain() throws {
        for (m, n, k, ld) in [(13, 64, 330, 2048), (30, 48, 700, 1536), (25, 40, 165, 3072), (7, 33, 256, 1024)] {
            let a = rng.normals(m * ld), w = rng.normals(n * k)
            var want = [Float](repeating: 0, count: m * n)
            for i in 0..<m {
                for j in 0..<n {
                    var s: Float = 0
                    for kk in 0..<k { s = s.addingProduct(a[i * ld + kk], w[j * k + kk]) }
                    want[i * n + j] = s
                }
            }
            let label = "gemm m \(m) n \(n) k \(k) lda \(ld)"
            try assertSameBits(label) {
                var c = [Float](repeating: .nan, count: m * n)
                a.withUnsafeBufferPointer { ap in w.withUnsafeBufferPointer { wp in
                    gemm(m: m, n: n, k: k, .rows(ap.baseAddress!, ld: ld), .transposed(wp.baseAddress!, ld: k), &c, ldc: n)
                } }
                XCTAssertTrue(zip(c, want).allSatisfy { $0.bitPattern == $1.bitPattern }, label + ": not the scalar chain")
                return c
            }
        }
    }

    /// Attention forward and backward (scores, softmax, weighted sums, the dK/dV scatter) on
    /// grouped heads, head sizes on and off the vector widths, a window, several sequences.
    func testAttentionForwardAndBackwardAgreeAcrossSets() throws {
        for (heads, kvHeads, HS, window) in [(4, 2, 64, 0), (6, 2, 64, 5), (3, 1, 12, 0), (2, 2, 40, 0)] {
            let starts = [0, 9, 30, 33]
            let T = starts.last!
            let Q = (heads + 2 * kvHeads) * HS
            let qkv = rng.normals(T * Q), dOut = rng.normals(T * heads * HS)
            let shape = AttentionShape(heads: heads, kvHeads: kvHeads, headSize: HS, scale: 1 / Float(HS).squareRoot())
            try assertSameBits("attention heads \(heads)/\(kvHeads) HS \(HS) window \(window)") {
                var out = [Float](repeating: .nan, count: T * heads * HS), lse = [Float](repeating: .nan, count: T * heads)
                var dqkv = [Float](repeating: .nan, count: T * Q)
                qkv.withUnsafeBufferPointer { qp in
                    let base = qp.baseAddress!
                    attentionForward(&out, &lse, q: base, qStride: Q, rows: T, shape: shape, maxKeys: T) { t in
                        let b = starts.lastIndex { $0 <= t }!
                        let j0 = window > 0 ? max(starts[b], t - window + 1) : starts[b]
                        return KeyValueSpan(keys: base + j0 * Q + heads * HS, values: base + j0 * Q + (heads + kvHeads) * HS,
                                            rowStride: Q, count: t - j0 + 1)
                    }
                    attentionBackwardPacked(&dqkv, dOut, qkv: base, out: out, lse: lse, rows: T, shape: shape,
                                            sequenceStarts: starts, window: window)
                }
                return out + lse + dqkv
            }
        }
    }

    /// exp with its sums, log-sum-exp, SwiGLU forward and backward, dot and axpy: lengths that end
    /// on and off 8 and 16 lanes, and the special values.
    func testElementwiseKernelsAgreeAcrossSets() throws {
        for n in [1, 7, 8, 15, 16, 17, 100, 1000] {
            var x = rng.normals(n, scale: 30)
            if n > 4 { x[0] = .infinity; x[1] = -.infinity; x[2] = -100; x[3] = .nan }
            let y = rng.normals(n), g = rng.normals(n, scale: 4), u = rng.normals(n), d = rng.normals(n)
            try assertSameBits("elementwise n \(n)", threads: [2]) {
                var e = [Float](repeating: 0, count: n)
                let s = expShiftSum(&e, x, n, shift: 1.5)
                let l = logSumExp(y, n)
                var h = [Float](repeating: 0, count: n)
                var gu = g + u, dgu = [Float](repeating: 0, count: 2 * n)
                swigluForward(&h, gu, rows: 1, intermediate: n)
                swigluBackward(&dgu, d, gu, rows: 1, intermediate: n)
                var z = y
                axpy(0.75, u, &z, n)
                gu[0] = dot(y, u, n)
                return e + [s, l, gu[0]] + h + dgu + z
            }
            // The scalar exp is lane 0 of the vector one.
            var e = [Float](repeating: 0, count: n)
            _ = expShiftSum(&e, x, n, shift: 0)
            for i in 0..<n where !x[i].isNaN { XCTAssertEqual(e[i].bitPattern, exp1(x[i]).bitPattern, "exp(\(x[i]))") }
        }
    }

    func testFiniteCheckFindsEveryNonFiniteValueInEverySet() throws {
        let specials: [Float] = [.infinity, -.infinity, .nan, -.nan, Float(bitPattern: 0x7fc0_0001), Float(bitPattern: 0xff80_0001)]
        for set in KernelSet.supported {
            try KernelSet.use(set)
            for n in [1, 15, 16, 17, 64, 1000] {
                var x = rng.normals(n, scale: 1e30)
                x[n - 1] = .greatestFiniteMagnitude
                x[0] = -.leastNonzeroMagnitude
                XCTAssertTrue(allFinite(x, count: n), "\(set.rawValue) n \(n): all finite")
                for at in Set([0, n / 2, n - 1]) {
                    for v in specials {
                        var y = x
                        y[at] = v
                        XCTAssertFalse(allFinite(y, count: n), "\(set.rawValue) n \(n): \(v) at \(at)")
                    }
                }
            }
        }
    }
}
