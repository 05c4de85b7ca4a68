// Causal multi-head attention with grouped-query heads, written per query row so that a row's
// result does not depend on which other rows or sequences are processed with it. The forward
// keeps only the log-sum-exp of each row's scores; the backward recomputes the probabilities
// (as FlashAttention does), so memory stays O(T · NH) rather than O(T² · NH).
import Foundation

/// The keys and values a query row attends to: rows `0..<count` starting at `keys` / `values`,
/// each `rowStride` floats apart; KV head g sits at offset g·HS within a row.
public struct KeyValueSpan {
    public var keys: UnsafePointer<Float>
    public var values: UnsafePointer<Float>
    public var rowStride: Int
    public var count: Int

    @inline(__always)
    public init(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, rowStride: Int, count: Int) {
        self.keys = keys; self.values = values; self.rowStride = rowStride; self.count = count
    }
}

/// Shape of one attention call.
public struct AttentionShape: Sendable {
    public var heads: Int          // NH
    public var kvHeads: Int        // NKV
    public var headSize: Int       // HS
    public var scale: Float        // usually 1/sqrt(HS)

    public init(heads: Int, kvHeads: Int, headSize: Int, scale: Float) {
        self.heads = heads; self.kvHeads = kvHeads; self.headSize = headSize; self.scale = scale
    }
}

/// out[T, NH·HS] = softmax(q·Kᵀ·scale)·V per row and head; lse[T, NH] saved when given.
/// q row t starts at q + t·qStride (heads at h·HS); `span(t)` gives row t's keys/values;
/// `maxKeys` bounds every span's count. The query heads that share a KV head are processed two
/// at a time, so each key and value row is read once per pair; every element's chain is the
/// one `scoreRow` and `weightedSum` compute for a single head.
public func attentionForward(_ out: UnsafeMutablePointer<Float>, _ lse: UnsafeMutablePointer<Float>?,
                             q: UnsafePointer<Float>, qStride: Int, rows: Int, shape: AttentionShape,
                             maxKeys: Int, span: (Int) -> KeyValueSpan) {
    KernelClock.time(.attention) {
        attentionForwardUntimed(out, lse, q: q, qStride: qStride, rows: rows, shape: shape, maxKeys: maxKeys, span: span)
    }
}

private func attentionForwardUntimed(_ out: UnsafeMutablePointer<Float>, _ lse: UnsafeMutablePointer<Float>?,
                                     q: UnsafePointer<Float>, qStride: Int, rows: Int, shape: AttentionShape,
                                     maxKeys: Int, span: (Int) -> KeyValueSpan) {
    let NH = shape.heads, NKV = shape.kvHeads, HS = shape.headSize, group = NH / NKV
    let work = rows * NKV
    let workers = max(1, min(Compute.threads, work))
    let stride = max(8, (maxKeys + 7) & ~7)
    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: workers * 2 * stride)
    defer { scratch.deallocate() }
    // Items per thread worth a wake-up: about 64k multiply-adds.
    let minItems = max(1, 65536 / max(1, maxKeys * HS * 2 * group))
    parallelRanges(work, minPerThread: minItems) { w, lo, hi in
        let scores = scratch + w * 2 * stride, scores2 = scores + stride
        var lastRow = -1
        var s = KeyValueSpan(keys: q, values: q, rowStride: 0, count: 0)
        for item in lo..<hi {
            let t = item / NKV, g = item % NKV
            if t != lastRow { s = span(t); lastRow = t }
            let kvOff = g * HS
            var h = g * group
            while h < (g + 1) * group {
                let pair = h + 1 < (g + 1) * group
                let qh = q + t * qStride + h * HS
                let o = out + t * NH * HS + h * HS
                if s.count == 0 {
                    o.update(repeating: 0, count: (pair ? 2 : 1) * HS)
                    lse?[t * NH + h] = -.infinity
                    if pair { lse?[t * NH + h + 1] = -.infinity }
                } else if pair {
                    scoreRowPair(scores, scores2, qh, qh + HS, s.keys + kvOff, rowStride: s.rowStride, count: s.count,
                                 headSize: HS, scale: shape.scale)
                    let m = maxElement(scores, s.count), m2 = maxElement(scores2, s.count)
                    let sum = expShiftSum(scores, scores, s.count, shift: m)
                    let sum2 = expShiftSum(scores2, scores2, s.count, shift: m2)
                    weightedSumPair(o, o + HS, scores, scores2, s.values + kvOff, rowStride: s.rowStride, count: s.count,
                                    headSize: HS, scale: 1 / sum, 1 / sum2)
                    lse?[t * NH + h] = m + logf(sum)
                    lse?[t * NH + h + 1] = m2 + logf(sum2)
                } else {
                    scoreRow(scores, qh, s.keys + kvOff, rowStride: s.rowStride, count: s.count, headSize: HS, scale: shape.scale)
                    let m = maxElement(scores, s.count)
                    let sum = expShiftSum(scores, scores, s.count, shift: m)
                    weightedSum(o, scores, s.values + kvOff, rowStride: s.rowStride, count: s.count, headSize: HS,
                                scale: 1 / sum)
                    lse?[t * NH + h] = m + logf(sum)
                }
                h += pair ? 2 : 1
            }
        }
    }
}

// The per-row pieces run in the kernel set (Sources/CKernels): each score is one 8-lane fused
// chain over the head's dimensions, each weighted-sum element one fused chain over the keys.

/// `scoreRow` for two query heads against the same keys (each key row read once).
@inline(__always)
func scoreRowPair(_ scores: UnsafeMutablePointer<Float>, _ scores2: UnsafeMutablePointer<Float>,
                  _ q: UnsafePointer<Float>, _ q2: UnsafePointer<Float>, _ keys: UnsafePointer<Float>,
                  rowStride: Int, count: Int, headSize HS: Int, scale: Float) {
    Kernels.table.pointee.score_rows(scores, scores2, q, q2, keys, rowStride, Int32(count), Int32(HS), scale)
}

/// `weightedSum` for two heads' weights over the same values.
@inline(__always)
func weightedSumPair(_ o: UnsafeMutablePointer<Float>, _ o2: UnsafeMutablePointer<Float>,
                     _ w: UnsafePointer<Float>, _ w2: UnsafePointer<Float>, _ values: UnsafePointer<Float>,
                     rowStride: Int, count: Int, headSize HS: Int, scale: Float, _ scale2: Float) {
    Kernels.table.pointee.weighted_sum(o, o2, w, w2, values, rowStride, Int32(count), Int32(HS), scale, scale2)
}

/// scores[j] = dot(q, k_j)·scale for j < count (each the chain of `dot`).
@inline(__always)
func scoreRow(_ scores: UnsafeMutablePointer<Float>, _ q: UnsafePointer<Float>, _ keys: UnsafePointer<Float>,
              rowStride: Int, count: Int, headSize HS: Int, scale: Float) {
    Kernels.table.pointee.score_rows(scores, nil, q, nil, keys, rowStride, Int32(count), Int32(HS), scale)
}

/// o[d] = scale · Σ_j w[j]·v_j[d], accumulated over j in order per element.
@inline(__always)
func weightedSum(_ o: UnsafeMutablePointer<Float>, _ w: UnsafePointer<Float>, _ values: UnsafePointer<Float>,
                 rowStride: Int, count: Int, headSize HS: Int, scale: Float) {
    Kernels.table.pointee.weighted_sum(o, nil, w, nil, values, rowStride, Int32(count), Int32(HS), scale, 1)
}

/// Backward of `attentionForward` over a packed batch whose keys/values are the batch's own rows
/// (training). qkv[T, Q] holds q | k | v per row (after RoPE); dqkv[T, Q] is overwritten.
/// `sequenceStarts` has B+1 entries; `window` > 0 limits each row to its last `window` keys.
public func attentionBackwardPacked(_ dqkv: UnsafeMutablePointer<Float>, _ dOut: UnsafePointer<Float>,
                                    qkv: UnsafePointer<Float>, out: UnsafePointer<Float>,
                                    lse: UnsafePointer<Float>, rows: Int, shape: AttentionShape,
                                    sequenceStarts: [Int], window: Int) {
    KernelClock.time(.attention) {
        attentionBackwardUntimed(dqkv, dOut, qkv: qkv, out: out, lse: lse, rows: rows, shape: shape,
                                 sequenceStarts: sequenceStarts, window: window)
    }
}

private func attentionBackwardUntimed(_ dqkv: UnsafeMutablePointer<Float>, _ dOut: UnsafePointer<Float>,
                                      qkv: UnsafePointer<Float>, out: UnsafePointer<Float>,
                                      lse: UnsafePointer<Float>, rows: Int, shape: AttentionShape,
                                      sequenceStarts: [Int], window: Int) {
    let NH = shape.heads, NKV = shape.kvHeads, HS = shape.headSize, group = NH / NKV
    let Q = (NH + 2 * NKV) * HS
    let kOff = NH * HS, vOff = (NH + NKV) * HS
    dqkv.update(repeating: 0, count: rows * Q)
    let B = sequenceStarts.count - 1
    var maxLen = 1
    for b in 0..<B { maxLen = max(maxLen, sequenceStarts[b + 1] - sequenceStarts[b]) }
    let stride = (maxLen + 7) & ~7
    let workers = max(1, min(Compute.threads, B * NKV))
    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: workers * 2 * stride)
    defer { scratch.deallocate() }
    let table = Kernels.table
    sequenceStarts.withUnsafeBufferPointer { starts in
        parallelRanges(B * NKV) { worker, lo, hi in
            let p = scratch + worker * 2 * stride, ds = p + stride
            for item in lo..<hi {
                let b = item / NKV, g = item % NKV
                let s0 = starts[b], s1 = starts[b + 1]
                let keys = qkv + kOff + g * HS, values = qkv + vOff + g * HS
                for h in (g * group)..<((g + 1) * group) {
                    for i in s0..<s1 {
                        let qi = qkv + i * Q + h * HS
                        let doi = dOut + i * NH * HS + h * HS
                        let di = dot(doi, out + i * NH * HS + h * HS, HS)
                        let l = lse[i * NH + h]
                        let j0 = window > 0 ? max(s0, i - window + 1) : s0
                        let n = i - j0 + 1
                        // p_j = exp(s_j − lse), ds_j = p_j (dO·v_j − D) · scale
                        scoreRow(p, qi, keys + j0 * Q, rowStride: Q, count: n, headSize: HS, scale: shape.scale)
                        scoreRow(ds, doi, values + j0 * Q, rowStride: Q, count: n, headSize: HS, scale: 1)
                        _ = expShiftSum(p, p, n, shift: l)
                        for j in 0..<n { ds[j] = p[j] * (ds[j] - di) * shape.scale }
                        // dq_i = Σ_j ds_j k_j; dk_j += ds_j q_i; dv_j += p_j dO_i
                        weightedSum(dqkv + i * Q + h * HS, ds, keys + j0 * Q, rowStride: Q, count: n,
                                    headSize: HS, scale: 1)
                        let rows = dqkv + j0 * Q
                        table.pointee.scatter_rows(rows + kOff + g * HS, ds, qi, rows + vOff + g * HS, p, doi,
                                                   Q, Int32(n), Int32(HS))
                    }
                }
            }
        }
    }
}
