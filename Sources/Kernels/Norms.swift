// RMSNorm (Llama, Mistral, Qwen) and LayerNorm (GPT-2), forward next to backward.
import Foundation

// MARK: - RMSNorm

/// out[T, C] = x · rstd · w, rstd[T] = 1 / sqrt(mean(x²) + eps). Saves `rstd`.
/// Also serves Qwen3's per-head q/k norm (T = tokens × heads, C = HS).
public func rmsNormForward(_ out: UnsafeMutablePointer<Float>, _ rstd: UnsafeMutablePointer<Float>?,
                           _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                           rows: Int, channels C: Int, eps: Float) {
    parallelFor(rows, minPerThread: 64) { t in
        let xr = x + t * C, o = out + t * C
        var ss: Float = 0
        for c in 0..<C { ss += xr[c] * xr[c] }
        let r = 1 / (ss / Float(C) + eps).squareRoot()
        rstd?[t] = r
        for c in 0..<C { o[c] = weight[c] * (xr[c] * r) }
    }
}

/// Backward of `rmsNormForward`: dx overwritten (or accumulated), dw accumulated.
/// dx = rstd · (dxhat − xhat · mean(dxhat · xhat)), dxhat = dOut · w, xhat = x · rstd.
public func rmsNormBackward(_ dx: UnsafeMutablePointer<Float>, _ dWeight: UnsafeMutablePointer<Float>?,
                            _ dOut: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                            _ weight: UnsafePointer<Float>, _ rstd: UnsafePointer<Float>,
                            rows: Int, channels C: Int, accumulateInput: Bool = false) {
    parallelFor(rows, minPerThread: 64) { t in
        let xr = x + t * C, d = dOut + t * C, g = dx + t * C
        let r = rstd[t]
        var dot: Float = 0
        for c in 0..<C { dot += d[c] * weight[c] * xr[c] * r }
        let m = dot / Float(C)
        for c in 0..<C {
            let v = r * (d[c] * weight[c] - xr[c] * r * m)
            if accumulateInput { g[c] += v } else { g[c] = v }
        }
    }
    guard let dWeight else { return }   // frozen weight (adapter training)
    columnReduce(dWeight, rows: rows, columns: C) { t, acc in
        let xr = x + t * C, d = dOut + t * C
        let r = rstd[t]
        for c in 0..<C { acc[c] += d[c] * xr[c] * r }
    }
}

// MARK: - RMSNorm over heads (Qwen3 q/k norm)

/// RMSNorm of each of `heads` head vectors per row, in place when `out == x`.
/// Row t, head h lives at t·rowStride + h·HS; rstd[T, heads] saved when given.
public func headRMSNormForward(_ out: UnsafeMutablePointer<Float>, _ rstd: UnsafeMutablePointer<Float>?,
                               _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                               rows: Int, rowStride: Int, heads: Int, headSize HS: Int, eps: Float) {
    parallelFor(rows, minPerThread: 64) { t in
        for h in 0..<heads {
            let xr = x + t * rowStride + h * HS, o = out + t * rowStride + h * HS
            var ss: Float = 0
            for c in 0..<HS { ss += xr[c] * xr[c] }
            let r = 1 / (ss / Float(HS) + eps).squareRoot()
            rstd?[t * heads + h] = r
            for c in 0..<HS { o[c] = weight[c] * (xr[c] * r) }
        }
    }
}

/// Backward of `headRMSNormForward`; dx may alias dOut (each head is read before it is written).
public func headRMSNormBackward(_ dx: UnsafeMutablePointer<Float>, _ dWeight: UnsafeMutablePointer<Float>?,
                                _ dOut: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                                _ weight: UnsafePointer<Float>, _ rstd: UnsafePointer<Float>,
                                rows: Int, rowStride: Int, heads: Int, headSize HS: Int) {
    if let dWeight { columnReduce(dWeight, rows: rows, columns: HS) { t, acc in
        for h in 0..<heads {
            let xr = x + t * rowStride + h * HS, d = dOut + t * rowStride + h * HS
            let r = rstd[t * heads + h]
            for c in 0..<HS { acc[c] += d[c] * xr[c] * r }
        }
    } }
    parallelFor(rows, minPerThread: 64) { t in
        for h in 0..<heads {
            let xr = x + t * rowStride + h * HS, d = dOut + t * rowStride + h * HS
            let g = dx + t * rowStride + h * HS
            let r = rstd[t * heads + h]
            var dot: Float = 0
            for c in 0..<HS { dot += d[c] * weight[c] * xr[c] * r }
            let m = dot / Float(HS)
            for c in 0..<HS { g[c] = r * (d[c] * weight[c] - xr[c] * r * m) }
        }
    }
}

// MARK: - LayerNorm

/// out[T, C] = (x − mean) · rstd · w + b. Saves `mean` and `rstd` (biased variance, as PyTorch).
public func layerNormForward(_ out: UnsafeMutablePointer<Float>, _ mean: UnsafeMutablePointer<Float>?,
                             _ rstd: UnsafeMutablePointer<Float>?, _ x: UnsafePointer<Float>,
                             _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>,
                             rows: Int, channels C: Int, eps: Float) {
    parallelFor(rows, minPerThread: 64) { t in
        let xr = x + t * C, o = out + t * C
        var s: Float = 0
        for c in 0..<C { s += xr[c] }
        let m = s / Float(C)
        var v: Float = 0
        for c in 0..<C { let d = xr[c] - m; v += d * d }
        let r = 1 / (v / Float(C) + eps).squareRoot()
        mean?[t] = m
        rstd?[t] = r
        for c in 0..<C { o[c] = (xr[c] - m) * r * weight[c] + bias[c] }
    }
}

/// Backward of `layerNormForward`: dx overwritten (or accumulated), dw and db accumulated.
public func layerNormBackward(_ dx: UnsafeMutablePointer<Float>, _ dWeight: UnsafeMutablePointer<Float>?,
                              _ dBias: UnsafeMutablePointer<Float>?, _ dOut: UnsafePointer<Float>,
                              _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                              _ mean: UnsafePointer<Float>, _ rstd: UnsafePointer<Float>,
                              rows: Int, channels C: Int, accumulateInput: Bool = false) {
    parallelFor(rows, minPerThread: 64) { t in
        let xr = x + t * C, d = dOut + t * C, g = dx + t * C
        let m = mean[t], r = rstd[t]
        var dnormMean: Float = 0, dnormNormMean: Float = 0
        for c in 0..<C {
            let n = (xr[c] - m) * r
            let dn = weight[c] * d[c]
            dnormMean += dn
            dnormNormMean += dn * n
        }
        dnormMean /= Float(C)
        dnormNormMean /= Float(C)
        for c in 0..<C {
            let n = (xr[c] - m) * r
            let v = r * (weight[c] * d[c] - dnormMean - n * dnormNormMean)
            if accumulateInput { g[c] += v } else { g[c] = v }
        }
    }
    guard let dWeight, let dBias else { return }   // frozen weights (adapter training)
    columnReduce(dWeight, rows: rows, columns: C) { t, acc in
        let xr = x + t * C, d = dOut + t * C
        let m = mean[t], r = rstd[t]
        for c in 0..<C { acc[c] += d[c] * (xr[c] - m) * r }
    }
    columnSum(dBias, dOut, rows: rows, columns: C)
}
