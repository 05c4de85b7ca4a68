import COpenBLAS
import Foundation
import CKernels

/// The one entry point to BLAS matrix multiplication (backward passes, where rounding may depend
/// on the batch shape).
///
/// Row-major: `C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C`, where `op(X)` is `X`
/// or its transpose. `lda`, `ldb`, `ldc` are row strides of the stored matrices. OpenBLAS runs
/// with `Compute.threads` threads.
public func sgemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                  a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                  beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int) {
    KernelClock.time(.matrixProducts, flops: 2 * Double(m) * Double(n) * Double(k)) {
        sgemmUntimed(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda, b: b, ldb: ldb,
                     beta: beta, c: c, ldc: ldc)
    }
}

private func sgemmUntimed(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float,
                          a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                          beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
    if m == 0 || n == 0 { return }
    if k == 0 {
        for i in 0..<m {
            let row = c + i * ldc
            if beta == 0 { row.update(repeating: 0, count: n) } else { for j in 0..<n { row[j] *= beta } }
        }
        return
    }
    cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
                transB ? CblasTrans : CblasNoTrans, Int32(m), Int32(n), Int32(k), alpha,
                a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

// MARK: - Ember's GEMM

// OpenBLAS 0.3.21's sgemm rounds a row of A·Bᵀ differently depending on where the row falls in
// its tiles, on M, and on how the call is split between threads (docs/design-notes.md). Sampling,
// scoring and training must see the same bits for the same token, so every product goes through
// `gemm`: each output element is one fused multiply-add chain over k = 0..<K in order, whatever
// M, the row's position, the thread count or the kernel set. Blocking over k keeps the chain: a
// block's partial sums are stored in C and the next block continues from them (a float stored and
// loaded is exact). The micro-kernels are in Sources/CKernels (AVX2 and AVX-512 sets).

/// Columns per packed panel.
public let panelWidth = Int(EMBER_PANEL)

/// A weight matrix W[N, K] re-laid as panels of 16 columns: panel p holds W[16p..<16p+16, k]
/// for k = 0..<K, lane-contiguous (zero-padded past N). Built once per weights version for
/// decoding; `gemm` packs blocks on the fly otherwise.
public final class PackedMatrix: @unchecked Sendable {
    public let rows: Int      // N (output features)
    public let columns: Int   // K (input features)
    /// Panels hold bfloat16 values (W rounded to nearest even): half the bytes to stream, the
    /// same chains as float panels holding the rounded values.
    public let bf16: Bool
    let storage: UnsafeMutableRawPointer
    var panels: UnsafeMutablePointer<Float> { storage.assumingMemoryBound(to: Float.self) }
    var halfPanels: UnsafeMutablePointer<UInt16> { storage.assumingMemoryBound(to: UInt16.self) }

    public init(_ w: UnsafePointer<Float>, rows n: Int, columns k: Int, bf16: Bool = false) {
        rows = n; columns = k; self.bf16 = bf16
        let panelCount = (n + panelWidth - 1) / panelWidth
        storage = .allocate(byteCount: max(1, panelCount * panelWidth * k) * (bf16 ? 2 : 4), alignment: 64)
        let table = Kernels.table
        let chunk = 16   // panels per work item
        let (full, half) = (storage.assumingMemoryBound(to: Float.self), storage.assumingMemoryBound(to: UInt16.self))
        parallelFor((panelCount + chunk - 1) / chunk) { g in
            let j0 = g * chunk * panelWidth
            let width = Int32(min(n - j0, chunk * panelWidth)), offset = g * chunk * panelWidth * k
            if bf16 {
                table.pointee.pack_panels_bf16(w + j0 * k, 1, k, k, width, half + offset, panelWidth * k)
            } else {
                table.pointee.pack_panels(w + j0 * k, 1, k, k, width, full + offset, panelWidth * k)
            }
        }
    }

    deinit { storage.deallocate() }

    public var byteCount: Int { ((rows + panelWidth - 1) / panelWidth) * panelWidth * columns * (bf16 ? 2 : 4) }

    /// `gemm_block` over panels starting at panel `p`, row `kk` (strides in elements).
    @inline(__always)
    func block(_ table: UnsafePointer<ember_kernels>, _ a: UnsafePointer<Float>, _ rs: Int, _ ks: Int, rows m: Int,
               panel p: Int, k kk: Int, columns n: Int, depth kc: Int, _ c: UnsafeMutablePointer<Float>, _ ldc: Int,
               alpha: Float, loadC: Bool, finish: Bool, prefetchPanel: Int?) {
        let stride = panelWidth * columns, at = p * stride + kk * panelWidth
        if bf16 {
            table.pointee.gemm_block_bf16(a, rs, ks, Int32(m), halfPanels + at, stride, Int32(n), kc, c, ldc, alpha,
                                          loadC ? 1 : 0, finish ? 1 : 0, prefetchPanel.map { UnsafePointer(halfPanels + $0 * stride) })
        } else {
            table.pointee.gemm_block(a, rs, ks, Int32(m), panels + at, stride, Int32(n), kc, c, ldc, alpha,
                                     loadC ? 1 : 0, finish ? 1 : 0, prefetchPanel.map { UnsafePointer(panels + $0 * stride) })
        }
    }
}

/// Depth of a k block: a 32-column tile of B (kc x 32 floats) stays in L1 while the row tiles
/// of a block pass over it.
let kBlockTarget = Int(ProcessInfo.processInfo.environment["EMBER_GEMM_KC"] ?? "") ?? 256

/// Floats on a 64-byte boundary (a packed panel row is one cache line: no split loads).
/// Free with `UnsafeMutableRawPointer(p).deallocate()`.
func alignedFloats(_ count: Int) -> UnsafeMutablePointer<Float> {
    UnsafeMutableRawPointer.allocate(byteCount: max(1, count) * 4, alignment: 64).bindMemory(to: Float.self, capacity: max(1, count))
}

/// Where `gemm` reads B[k, n] from.
public enum GemmB {
    /// B = Wᵀ for W[n, k] with row stride `ld` (a weight in nn.Linear layout).
    case transposed(UnsafePointer<Float>, ld: Int)
    /// B stored row-major [k, n] with row stride `ld`.
    case rows(UnsafePointer<Float>, ld: Int)
    /// B = Wᵀ, W already packed.
    case packed(PackedMatrix)
}

/// Where `gemm` reads A from: op(A)[m, k].
public enum GemmA {
    /// A stored row-major [m, k] with row stride `ld`.
    case rows(UnsafePointer<Float>, ld: Int)
    /// A = Xᵀ for X stored [k, m] with row stride `ld` (e.g. dYᵀ in a weight gradient).
    case transposed(UnsafePointer<Float>, ld: Int)
}

/// C[m, n] (row stride ldc) = alpha · op(A)·B, or, with `accumulate`, C += op(A)·B with each
/// element's chain starting from its current value (alpha must then be 1; use `gemmAddScaled`).
public func gemm(m: Int, n: Int, k: Int, alpha: Float = 1, _ a: GemmA, _ b: GemmB,
                 _ c: UnsafeMutablePointer<Float>, ldc: Int, accumulate: Bool = false) {
    KernelClock.time(.matrixProducts, flops: 2 * Double(m) * Double(n) * Double(k)) {
        gemmUntimed(m: m, n: n, k: k, alpha: alpha, a, b, c, ldc: ldc, accumulate: accumulate)
    }
}

private func gemmUntimed(m: Int, n: Int, k: Int, alpha: Float, _ a: GemmA, _ b: GemmB,
                         _ c: UnsafeMutablePointer<Float>, ldc: Int, accumulate: Bool) {
    precondition(!accumulate || alpha == 1, "gemm: accumulate takes alpha 1")
    if m == 0 || n == 0 { return }
    if k == 0 {
        if !accumulate { for i in 0..<m { (c + i * ldc).update(repeating: 0, count: n) } }
        return
    }
    let table = Kernels.table
    let (aBase, aRS, aKS): (UnsafePointer<Float>, Int, Int) = switch a {
    case let .rows(p, ld): (p, ld, 1)
    case let .transposed(p, ld): (p, 1, ld)
    }
    // Decoding (a few rows): one k block, weights streamed once, work split by columns.
    let small = m <= 8
    let kBlocks = small ? 1 : (k + kBlockTarget - 1) / kBlockTarget
    let kc0 = (k + kBlocks - 1) / kBlocks
    let nc = small ? n : min(n, 2048)                 // columns per packed block of B
    var rowBlock = small ? m : 96                      // rows per work item (A block in L2)
    var colChunk = small ? 64 : 256                    // columns per work item (a multiple of 32)
    let threads = (m * n * k < (1 << 20) && n * k < (1 << 16)) ? 1 : Compute.threads
    var scratch: UnsafeMutablePointer<Float>? = nil
    if case .packed = b {} else {
        scratch = alignedFloats(((min(nc, n) + panelWidth - 1) / panelWidth) * panelWidth * kc0)
    }
    defer { scratch.map { UnsafeMutableRawPointer($0).deallocate() } }
    // Enough work items to keep every thread busy to the end (each item's results do not depend
    // on which thread runs it).
    if !small {
        let want = 4 * threads
        while ((m + rowBlock - 1) / rowBlock) * ((min(nc, n) + colChunk - 1) / colChunk) < want {
            if colChunk > 64 { colChunk /= 2 } else if rowBlock > 24 { rowBlock = max(24, rowBlock / 2 / 12 * 12) } else { break }
        }
    }

    // The packed matrix outlives the loop below, which reads its storage through raw pointers.
    defer { if case let .packed(pm) = b { withExtendedLifetime(pm) {} } }
    var jc = 0
    while jc < n {
        let nb = min(nc, n - jc)
        let panelCount = (nb + panelWidth - 1) / panelWidth
        var pc = 0
        while pc < k {
            let kc = min(kc0, k - pc)
            // B block: panels of columns jc..<jc+nb, rows pc..<pc+kc.
            var panels: UnsafeRawPointer, pstride: Int, half = false
            switch b {
            case let .packed(pm):
                pstride = panelWidth * pm.columns
                half = pm.bf16
                panels = UnsafeRawPointer(pm.storage) + ((jc / panelWidth) * pstride + pc * panelWidth) * (half ? 2 : 4)
            case .transposed, .rows:
                // B(kk, j) = base[kk * bks + j * bcs] for this block.
                let (base, bks, bcs): (UnsafePointer<Float>, Int, Int) = switch b {
                case let .transposed(w, ld): (w + jc * ld + pc, 1, ld)
                case let .rows(p, ld): (p + pc * ld + jc, ld, 1)
                case .packed: fatalError("unreachable")
                }
                let dst = scratch!
                pstride = panelWidth * kc
                let chunks = (panelCount + 15) / 16
                parallelFor(chunks, minPerThread: threads > 1 ? 1 : chunks) { g in
                    let j0 = g * 16 * panelWidth
                    table.pointee.pack_panels(base + j0 * bcs, bks, bcs, kc, Int32(min(nb - j0, 16 * panelWidth)),
                                              dst + g * 16 * pstride, pstride)
                }
                panels = UnsafeRawPointer(dst)
            }
            let loadC: Int32 = accumulate || pc > 0 ? 1 : 0, finish: Int32 = pc + kc >= k ? 1 : 0
            let rowBlocks = (m + rowBlock - 1) / rowBlock
            let colChunks = (nb + colChunk - 1) / colChunk
            let items = rowBlocks * colChunks
            let esize = half ? 2 : 4
            let body = { (item: Int) in
                let rb = item / colChunks, cb = item % colChunks
                let r0 = rb * rowBlock, rows = Int32(min(rowBlock, m - r0))
                let j0 = cb * colChunk, cols = Int32(min(colChunk, nb - j0))
                let a0 = aBase + r0 * aRS + pc * aKS, c0 = c + r0 * ldc + jc + j0
                let bp = panels + (j0 / panelWidth) * pstride * esize
                // Decoding (one row block) streams the weights: the next chunk's panels are pulled in meanwhile.
                let next: UnsafeRawPointer? = (small || rowBlocks == 1) && cb + 1 < colChunks ? bp + colChunk / panelWidth * pstride * esize : nil
                if half {
                    table.pointee.gemm_block_bf16(a0, aRS, aKS, rows, bp.assumingMemoryBound(to: UInt16.self), pstride, cols, kc,
                                                  c0, ldc, alpha, loadC, finish, next?.assumingMemoryBound(to: UInt16.self))
                } else {
                    table.pointee.gemm_block(a0, aRS, aKS, rows, bp.assumingMemoryBound(to: Float.self), pstride, cols, kc,
                                             c0, ldc, alpha, loadC, finish, next?.assumingMemoryBound(to: Float.self))
                }
            }
            if threads == 1 || items == 1 {
                for item in 0..<items { body(item) }
            } else if small {
                // Decoding: contiguous column ranges, each worker prefetching its own next chunk.
                parallelRanges(items, minPerThread: 1) { _, lo, hi in for item in lo..<hi { body(item) } }
            } else {
                // Workers claim items as they free up, so one that starts late (a thread
                // wake-up) or is descheduled by the host does not hold the others back.
                parallelClaim(items, body)
            }
            pc += kc
        }
        jc += nb
    }
}

/// C += alpha · op(A)·B with the product rounded first (alpha ≠ 1: LoRA's scaled gradients).
public func gemmAddScaled(m: Int, n: Int, k: Int, alpha: Float, _ a: GemmA, _ b: GemmB,
                          _ c: UnsafeMutablePointer<Float>, ldc: Int) {
    if alpha == 1 { gemm(m: m, n: n, k: k, a, b, c, ldc: ldc, accumulate: true); return }
    let t = UnsafeMutablePointer<Float>.allocate(capacity: max(1, m * n))
    defer { t.deallocate() }
    gemm(m: m, n: n, k: k, alpha: alpha, a, b, t, ldc: n)
    for i in 0..<m {
        let row = c + i * ldc, src = t + i * n
        for j in 0..<n { row[j] += src[j] }
    }
}

/// y[M, N] = x[M, K] · W[N, K]ᵀ, row-invariant (see above). `packed`, when given, must hold W.
public func project(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, rows m: Int,
                    _ w: UnsafePointer<Float>, outFeatures n: Int, inFeatures k: Int,
                    packed: PackedMatrix? = nil) {
    gemm(m: m, n: n, k: k, .rows(x, ld: k), packed.map { .packed($0) } ?? .transposed(w, ld: k), y, ldc: n)
}

/// y[m, n] (row stride `ldy`) = x[m, k] · Wᵀ with W packed, on the calling thread (callers
/// parallelise over their own work items): the same per-element chains as `project`. With
/// `addScaled`, y += s · (x · Wᵀ) instead: each element's chain result is multiplied by s, rounded,
/// then added (LoRA's delta).
public func projectSerial(_ y: UnsafeMutablePointer<Float>, ldy: Int, _ x: UnsafePointer<Float>, rows m: Int,
                          packed: PackedMatrix, addScaled scale: Float? = nil) {
    let n = packed.rows, k = packed.columns
    if m == 0 || n == 0 { return }
    let table = Kernels.table
    guard let scale else {
        packed.block(table, x, k, 1, rows: m, panel: 0, k: 0, columns: n, depth: k, y, ldy, alpha: 1, loadC: false,
                     finish: true, prefetchPanel: nil)
        return
    }
    withUnsafeTemporaryAllocation(of: Float.self, capacity: m * n) { t in
        let tile = t.baseAddress!
        packed.block(table, x, k, 1, rows: m, panel: 0, k: 0, columns: n, depth: k, tile, n, alpha: 1, loadC: false,
                     finish: true, prefetchPanel: nil)
        for i in 0..<m {
            let dst = y + i * ldy, src = tile + i * n
            for c in 0..<n { dst[c] += src[c] * scale }
        }
    }
}

/// y[T, O] = x[T, In] · W[O, In]ᵀ + b[O]   (PyTorch nn.Linear layout), row-invariant.
public func linearForward(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>,
                          _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                          rows: Int, inFeatures: Int, outFeatures: Int, packed: PackedMatrix? = nil) {
    project(y, x, rows: rows, weight, outFeatures: outFeatures, inFeatures: inFeatures, packed: packed)
    if let bias {
        parallelFor(rows, minPerThread: 64) { t in
            let row = y + t * outFeatures
            for o in 0..<outFeatures { row[o] += bias[o] }
        }
    }
}

/// Backward of `linearForward`.
/// - dx[T, In]: overwritten, or accumulated when `accumulateInput`; nil skips it.
/// - dW[O, In] += dyᵀ · x;  db[O] += Σ_t dy[t]. A nil dW (a frozen weight: adapter training)
///   skips both.
public func linearBackward(_ dx: UnsafeMutablePointer<Float>?, _ dWeight: UnsafeMutablePointer<Float>?,
                           _ dBias: UnsafeMutablePointer<Float>?, _ dy: UnsafePointer<Float>,
                           _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                           rows: Int, inFeatures: Int, outFeatures: Int,
                           accumulateInput: Bool = false) {
    if Compute.backwardBLAS {
        if let dx {
            sgemm(transA: false, transB: false, m: rows, n: inFeatures, k: outFeatures,
                  a: dy, lda: outFeatures, b: weight, ldb: inFeatures,
                  beta: accumulateInput ? 1 : 0, c: dx, ldc: inFeatures)
        }
        guard let dWeight else { return }
        sgemm(transA: true, transB: false, m: outFeatures, n: inFeatures, k: rows,
              a: dy, lda: outFeatures, b: x, ldb: inFeatures, beta: 1, c: dWeight, ldc: inFeatures)
    } else {
        if let dx {
            gemm(m: rows, n: inFeatures, k: outFeatures, .rows(dy, ld: outFeatures), .rows(weight, ld: inFeatures),
                 dx, ldc: inFeatures, accumulate: accumulateInput)
        }
        guard let dWeight else { return }
        gemm(m: outFeatures, n: inFeatures, k: rows, .transposed(dy, ld: outFeatures), .rows(x, ld: inFeatures),
             dWeight, ldc: inFeatures, accumulate: true)
    }
    if let dBias { columnSum(dBias, dy, rows: rows, columns: outFeatures) }
}

/// out[c] += Σ_t m[t, c], summed in fixed blocks of rows so the result is independent of the
/// thread count.
public func columnSum(_ out: UnsafeMutablePointer<Float>, _ m: UnsafePointer<Float>,
                      rows: Int, columns: Int) {
    columnReduce(out, rows: rows, columns: columns) { t, acc in
        let row = m + t * columns
        for c in 0..<columns { acc[c] += row[c] }
    }
}

/// Row-block reduction: `accumulate(t, acc)` adds row t's contribution into a zeroed
/// accumulator of `columns` floats; blocks of 64 rows are summed in order into `out`.
public func columnReduce(_ out: UnsafeMutablePointer<Float>, rows: Int, columns: Int,
                         _ accumulate: (Int, UnsafeMutablePointer<Float>) -> Void) {
    let block = 64
    let blocks = (rows + block - 1) / block
    if blocks == 0 { return }
    let partial = UnsafeMutablePointer<Float>.allocate(capacity: blocks * columns)
    defer { partial.deallocate() }
    partial.initialize(repeating: 0, count: blocks * columns)
    parallelFor(blocks) { b in
        let acc = partial + b * columns
        for t in (b * block)..<min(rows, (b + 1) * block) { accumulate(t, acc) }
    }
    for b in 0..<blocks {
        let acc = partial + b * columns
        for c in 0..<columns { out[c] += acc[c] }
    }
}
