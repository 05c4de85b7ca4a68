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
/// `maxKeys` bounds every span's count.
public func attentionForward(_ out: UnsafeMutablePointer<Float>, _ lse: UnsafeMutablePointer<Float>?,
                             q: UnsafePointer<Float>, qStride: Int, rows: Int, shape: AttentionShape,
                             maxKeys: Int, span: (Int) -> KeyValueSpan) {
    let NH = shape.heads, HS = shape.headSize, group = NH / shape.kvHeads
    let work = rows * NH
    let workers = max(1, min(Compute.threads, work))
    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: workers * max(1, maxKeys))
    defer { scratch.deallocate() }
    parallelRanges(work) { w, lo, hi in
        let scores = scratch + w * max(1, maxKeys)
        var lastRow = -1
        var s = KeyValueSpan(keys: q, values: q, rowStride: 0, count: 0)
        for item in lo..<hi {
            let t = item / NH, h = item % NH
            if t != lastRow { s = span(t); lastRow = t }
            let qh = q + t * qStride + h * HS
            let kvOff = (h / group) * HS
            let o = out + t * NH * HS + h * HS
            o.update(repeating: 0, count: HS)
            if s.count == 0 { lse?[t * NH + h] = -.infinity; continue }
            var m = -Float.infinity
            for j in 0..<s.count {
                let v = dot(qh, s.keys + j * s.rowStride + kvOff, HS) * shape.scale
                scores[j] = v
                if v > m { m = v }
            }
            var sum: Float = 0
            for j in 0..<s.count {
                let p = expf(scores[j] - m)
                sum += p
                axpy(p, s.values + j * s.rowStride + kvOff, o, HS)
            }
            let inv = 1 / sum
            for d in 0..<HS { o[d] *= inv }
            lse?[t * NH + h] = m + logf(sum)
        }
    }
}

/// Backward of `attentionForward` over a packed batch whose keys/values are the batch's own rows
/// (training). qkv[T, Q] holds q | k | v per row (after RoPE); dqkv[T, Q] is overwritten.
/// `sequenceStarts` has B+1 entries; `window` > 0 limits each row to its last `window` keys.
public func attentionBackwardPacked(_ dqkv: UnsafeMutablePointer<Float>, _ dOut: UnsafePointer<Float>,
                                    qkv: UnsafePointer<Float>, out: UnsafePointer<Float>,
                                    lse: UnsafePointer<Float>, rows: Int, shape: AttentionShape,
                                    sequenceStarts: [Int], window: Int) {
    let NH = shape.heads, NKV = shape.kvHeads, HS = shape.headSize, group = NH / NKV
    let Q = (NH + 2 * NKV) * HS
    let kOff = NH * HS, vOff = (NH + NKV) * HS
    dqkv.update(repeating: 0, count: rows * Q)
    let B = sequenceStarts.count - 1
    sequenceStarts.withUnsafeBufferPointer { starts in
        parallelFor(B * NKV) { item in
            let b = item / NKV, g = item % NKV
            let s0 = starts[b], s1 = starts[b + 1]
            for h in (g * group)..<((g + 1) * group) {
                for i in s0..<s1 {
                    let qi = qkv + i * Q + h * HS
                    let dqi = dqkv + i * Q + h * HS
                    let doi = dOut + i * NH * HS + h * HS
                    let di = dot(doi, out + i * NH * HS + h * HS, HS)
                    let l = lse[i * NH + h]
                    let j0 = window > 0 ? max(s0, i - window + 1) : s0
                    for j in j0...i {
                        let kj = qkv + j * Q + kOff + g * HS
                        let vj = qkv + j * Q + vOff + g * HS
                        let p = expf(dot(qi, kj, HS) * shape.scale - l)
                        let dp = dot(doi, vj, HS)
                        let ds = p * (dp - di) * shape.scale
                        axpy(ds, kj, dqi, HS)
                        axpy(ds, qi, dqkv + j * Q + kOff + g * HS, HS)
                        axpy(p, doi, dqkv + j * Q + vOff + g * HS, HS)
                    }
                }
            }
        }
    }
}
