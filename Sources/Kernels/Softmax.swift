// Softmax, log-softmax and cross-entropy over vocabulary rows. Sampling, scoring and training
// all go through `logSumExp`, so their log-probabilities agree bit for bit.
import Foundation

/// log Σ exp(x[i]) over one row of V logits, in a fixed order: max first, then 8 interleaved
/// partial sums of exp(x − max) added left to right (`expShiftSum`'s order).
public func logSumExp(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
    let m = maxElement(x, n)
    if !m.isFinite { return m }
    return m + logf(Kernels.table.pointee.exp_sum(x, n, m))
}

/// Writes softmax(x) = exp(x − lse) into `p` (may alias `x`).
@inline(__always)
public func softmax(_ p: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int, lse: Float) {
    _ = expShiftSum(p, x, n, shift: lse)
}

/// Cross-entropy on a chunk of rows, in place: logits[n, V] become d(loss)/d(logits) for
/// loss = Σ_r weight[r] · (lse_r − logit_r[target_r]). Returns that weighted sum (in Double).
/// Rows with weight 0 get zero gradient. Targets must be in 0..<V.
public func crossEntropyForwardBackward(_ logits: UnsafeMutablePointer<Float>,
                                        targets: UnsafePointer<Int32>, weights: UnsafePointer<Float>,
                                        rows: Int, vocab V: Int) -> Double {
    let partial = UnsafeMutablePointer<Double>.allocate(capacity: rows)
    defer { partial.deallocate() }
    parallelFor(rows) { r in
        let row = logits + r * V
        let w = weights[r]
        if w == 0 {
            row.update(repeating: 0, count: V)
            partial[r] = 0
            return
        }
        let target = Int(targets[r])
        let lse = logSumExp(row, V)
        partial[r] = Double(w) * Double(lse - row[target])
        softmax(row, row, V, lse: lse)
        for i in 0..<V { row[i] *= w }
        row[target] -= w
    }
    var total = 0.0
    for r in 0..<rows { total += partial[r] }
    return total
}
