// Finite-difference checks of every kernel's backward (llama.cpp test-backend-ops, micrograd):
// for a random projection r, L = Σ r · forward(inputs); the backward given dOut = r must equal
// central differences of L in each input and parameter.
import Kernels
import TestSupport
import XCTest

final class GradientCheckTests: XCTestCase {
    var rng = SeededRandom(seed: 42)

    override func setUp() { Compute.setThreads(2) }

    /// Checks `analytic` against central differences of `loss` over every entry of `x`.
    func check(_ label: String, _ x: inout [Float], analytic: [Float], eps: Float = 1e-2,
               atol: Float = 2e-3, rtol: Float = 2e-2, loss: ([Float]) -> Double,
               file: StaticString = #filePath, line: UInt = #line) {
        var numeric = [Float](repeating: 0, count: x.count)
        for i in 0..<x.count {
            let saved = x[i]
            x[i] = saved + eps; let up = loss(x)
            x[i] = saved - eps; let down = loss(x)
            x[i] = saved
            numeric[i] = Float((up - down) / Double(2 * eps))
        }
        assertClose(analytic, numeric, atol: atol, rtol: rtol, label, file: file, line: line)
    }

    func project(_ out: [Float], _ r: [Float]) -> Double {
        zip(out, r).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
    }

    func testLinear() {
        let T = 5, I = 7, O = 6
        var x = rng.normals(T * I), w = rng.normals(O * I), b = rng.normals(O)
        let r = rng.normals(T * O)
        func fwd(_ x: [Float], _ w: [Float], _ b: [Float]) -> [Float] {
            var y = [Float](repeating: 0, count: T * O)
            linearForward(&y, x, w, b, rows: T, inFeatures: I, outFeatures: O)
            return y
        }
        var dx = [Float](repeating: 0, count: T * I), dw = [Float](repeating: 0, count: O * I)
        var db = [Float](repeating: 0, count: O)
        linearBackward(&dx, &dw, &db, r, x, w, rows: T, inFeatures: I, outFeatures: O)
        check("linear dx", &x, analytic: dx) { self.project(fwd($0, w, b), r) }
        check("linear dW", &w, analytic: dw) { self.project(fwd(x, $0, b), r) }
        check("linear db", &b, analytic: db) { self.project(fwd(x, w, $0), r) }
    }

    func testRMSNorm() {
        let T = 4, C = 9
        var x = rng.normals(T * C), w = rng.normals(C).map { $0 + 1 }
        let r = rng.normals(T * C)
        func fwd(_ x: [Float], _ w: [Float]) -> [Float] {
            var y = [Float](repeating: 0, count: T * C)
            rmsNormForward(&y, nil, x, w, rows: T, channels: C, eps: 1e-5)
            return y
        }
        var rstd = [Float](repeating: 0, count: T), y = [Float](repeating: 0, count: T * C)
        rmsNormForward(&y, &rstd, x, w, rows: T, channels: C, eps: 1e-5)
        var dx = [Float](repeating: 0, count: T * C), dw = [Float](repeating: 0, count: C)
        rmsNormBackward(&dx, &dw, r, x, w, rstd, rows: T, channels: C)
        check("rmsnorm dx", &x, analytic: dx) { self.project(fwd($0, w), r) }
        check("rmsnorm dw", &w, analytic: dw) { self.project(fwd(x, $0), r) }
    }

    func testHeadRMSNorm() {
        let T = 3, HS = 6, heads = 2, stride = 17
        var x = rng.normals(T * stride), w = rng.normals(HS).map { $0 + 1 }
        let r = rng.normals(T * stride).enumerated().map { i, v in (i % stride) < heads * HS ? v : 0 }
        func fwd(_ x: [Float], _ w: [Float]) -> [Float] {
            var y = x
            headRMSNormForward(&y, nil, x, w, rows: T, rowStride: stride, heads: heads, headSize: HS, eps: 1e-6)
            return y
        }
        var rstd = [Float](repeating: 0, count: T * heads), y = x
        headRMSNormForward(&y, &rstd, x, w, rows: T, rowStride: stride, heads: heads, headSize: HS, eps: 1e-6)
        var dx = r, dw = [Float](repeating: 0, count: HS)
        headRMSNormBackward(&dx, &dw, r, x, w, rstd, rows: T, rowStride: stride, heads: heads, headSize: HS)
        // Entries outside the heads pass through untouched: their gradient is r itself (0 here).
        check("head rmsnorm dx", &x, analytic: dx) { self.project(fwd($0, w), r) }
        check("head rmsnorm dw", &w, analytic: dw) { self.project(fwd(x, $0), r) }
    }

    func testLayerNorm() {
        let T = 4, C = 9
        var x = rng.normals(T * C), w = rng.normals(C).map { $0 + 1 }, b = rng.normals(C)
        let r = rng.normals(T * C)
        func fwd(_ x: [Float], _ w: [Float], _ b: [Float]) -> [Float] {
            var y = [Float](repeating: 0, count: T * C)
            layerNormForward(&y, nil, nil, x, w, b, rows: T, channels: C, eps: 1e-5)
            return y
        }
        var mean = [Float](repeating: 0, count: T), rstd = mean, y = [Float](repeating: 0, count: T * C)
        layerNormForward(&y, &mean, &rstd, x, w, b, rows: T, channels: C, eps: 1e-5)
        var dx = [Float](repeating: 0, count: T * C), dw = [Float](repeating: 0, count: C), db = dw
        layerNormBackward(&dx, &dw, &db, r, x, w, mean, rstd, rows: T, channels: C)
        check("layernorm dx", &x, analytic: dx) { self.project(fwd($0, w, b), r) }
        check("layernorm dw", &w, analytic: dw) { self.project(fwd(x, $0, b), r) }
        check("layernorm db", &b, analytic: db) { self.project(fwd(x, w, $0), r) }
    }

    func testRope() {
        let T = 4, HS = 8, heads = 3, stride = heads * HS
        let freqs = RopeFrequencies(headDim: HS, theta: 10000)
        let positions: [Int32] = [0, 3, 7, 11]
        var cos = [Float](repeating: 0, count: T * HS / 2), sin = cos
        freqs.tables(positions: positions, count: T, cos: &cos, sin: &sin)
        var x = rng.normals(T * stride)
        let r = rng.normals(T * stride)
        func fwd(_ x: [Float]) -> [Float] {
            var y = x
            ropeForward(&y, rows: T, rowStride: stride, heads: heads, headSize: HS, cos: cos, sin: sin)
            return y
        }
        var dx = r
        ropeBackward(&dx, rows: T, rowStride: stride, heads: heads, headSize: HS, cos: cos, sin: sin)
        check("rope dx", &x, analytic: dx) { self.project(fwd($0), r) }
    }

    func testSwiGLU() {
        let T = 3, I = 5
        var gu = rng.normals(T * 2 * I)
        let r = rng.normals(T * I)
        func fwd(_ gu: [Float]) -> [Float] {
            var h = [Float](repeating: 0, count: T * I)
            swigluForward(&h, gu, rows: T, intermediate: I)
            return h
        }
        var d = [Float](repeating: 0, count: T * 2 * I)
        swigluBackward(&d, r, gu, rows: T, intermediate: I)
        check("swiglu", &gu, analytic: d) { self.project(fwd($0), r) }
    }

    func testGELU() {
        let n = 20
        var x = rng.normals(n, scale: 2)
        let r = rng.normals(n)
        func fwd(_ x: [Float]) -> [Float] {
            var y = [Float](repeating: 0, count: n)
            geluForward(&y, x, count: n)
            return y
        }
        var d = [Float](repeating: 0, count: n)
        geluBackward(&d, r, x, count: n)
        check("gelu", &x, analytic: d) { self.project(fwd($0), r) }
    }

    func testCrossEntropy() {
        let rows = 3, V = 11
        var logits = rng.normals(rows * V, scale: 2)
        let targets: [Int32] = [0, 5, 10], weights: [Float] = [0.5, 1, 0.25]
        func loss(_ l: [Float]) -> Double {
            var copy = l
            return crossEntropyForwardBackward(&copy, targets: targets, weights: weights, rows: rows, vocab: V)
        }
        var d = logits
        _ = crossEntropyForwardBackward(&d, targets: targets, weights: weights, rows: rows, vocab: V)
        check("cross-entropy", &logits, analytic: d, loss: loss)
    }

    func testEmbedding() {
        let V = 6, C = 4, T = 5
        var table = rng.normals(V * C)
        let ids: [Int32] = [1, 3, 1, 5, 0]
        let r = rng.normals(T * C)
        func fwd(_ t: [Float]) -> [Float] {
            var y = [Float](repeating: 0, count: T * C)
            embeddingForward(&y, ids: ids, table: t, positions: nil, positionTable: nil, rows: T, channels: C)
            return y
        }
        var d = [Float](repeating: 0, count: V * C)
        embeddingBackward(&d, r, ids: ids, rows: T, channels: C)
        check("embedding", &table, analytic: d) { self.project(fwd($0), r) }
    }

    /// Attention over two packed sequences with GQA and a sliding window.
    func testAttention() {
        for window in [0, 3] {
            let NH = 4, NKV = 2, HS = 4, Q = (NH + 2 * NKV) * HS, A = NH * HS
            let starts = [0, 4, 9]
            let T = 9
            let shape = AttentionShape(heads: NH, kvHeads: NKV, headSize: HS, scale: 1 / Float(HS).squareRoot())
            var starting = [Int](repeating: 0, count: T)
            for b in 0..<2 { for t in starts[b]..<starts[b + 1] { starting[t] = starts[b] } }
            var qkv = rng.normals(T * Q)
            let r = rng.normals(T * A)
            func fwd(_ qkv: [Float], lse: UnsafeMutablePointer<Float>? = nil) -> [Float] {
                var out = [Float](repeating: 0, count: T * A)
                qkv.withUnsafeBufferPointer { p in
                    let base = p.baseAddress!
                    attentionForward(&out, lse, q: base, qStride: Q, rows: T, shape: shape, maxKeys: T) { t in
                        let s0 = window > 0 ? max(starting[t], t - window + 1) : starting[t]
                        return KeyValueSpan(keys: base + s0 * Q + A, values: base + s0 * Q + A + NKV * HS,
                                            rowStride: Q, count: t - s0 + 1)
                    }
                }
                return out
            }
            var lse = [Float](repeating: 0, count: T * NH)
            let out = fwd(qkv, lse: &lse)
            var d = [Float](repeating: 0, count: T * Q)
            attentionBackwardPacked(&d, r, qkv: qkv, out: out, lse: lse, rows: T, shape: shape,
                                    sequenceStarts: starts, window: window)
            check("attention window \(window)", &qkv, analytic: d) { self.project(fwd($0), r) }
        }
    }
}
