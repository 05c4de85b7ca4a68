import COpenBLAS

/// The one entry point to BLAS matrix multiplication (backward passes, where rounding may depend
/// on the batch shape).
///
/// Row-major: `C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C`, where `op(X)` is `X`
/// or its transpose. `lda`, `ldb`, `ldc` are row strides of the stored matrices. OpenBLAS runs
/// with `Compute.threads` threads.
public func sgemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                  a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                  beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int) {
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

// MARK: - Row-invariant projection

// OpenBLAS 0.3.21's sgemm rounds a row of A·Bᵀ differently depending on where the row falls in
// its 12-wide tiles, on M, and on how the call is split between threads (measured on this
// machine kind's Haswell kernel; docs/design-notes.md). Sampling, scoring and training must see
// the same bits for the same token, so every forward projection goes through `project`: each
// output element is one fused multiply-add chain over k = 0..<K, whatever M, the row's position,
// the thread count or the CPU. Measured at 85-100% of OpenBLAS's throughput here.

/// Columns per packed panel (two 8-lane AVX registers).
public let panelWidth = 16
/// Columns per work unit: a group of panels packed together and shared by one thread.
let columnGroup = 256
/// Rows of A kept hot in L2 while a group's panels stream past.
let rowBlock = 96

/// A weight matrix W[N, K] re-laid as panels of 16 columns: panel p holds W[16p..<16p+16, k]
/// for k = 0..<K, lane-contiguous (zero-padded past N). Built once per weights version for
/// decoding; `project` packs on the fly otherwise.
public final class PackedMatrix {
    public let rows: Int      // N (output features)
    public let columns: Int   // K (input features)
    let panels: UnsafeMutablePointer<Float>

    public init(_ w: UnsafePointer<Float>, rows n: Int, columns k: Int) {
        rows = n; columns = k
        let count = ((n + panelWidth - 1) / panelWidth) * panelWidth * k
        panels = .allocate(capacity: max(1, count))
        let groups = (n + columnGroup - 1) / columnGroup
        parallelFor(groups) { g in
            packColumns(w, k: k, from: g * columnGroup, to: min(n, (g + 1) * columnGroup),
                        into: self.panels + g * columnGroup * k)
        }
    }

    deinit { panels.deallocate() }

    public var byteCount: Int { ((rows + panelWidth - 1) / panelWidth) * panelWidth * columns * 4 }
}

/// Packs W rows j0..<j1 into consecutive panels at `dst`.
@inline(__always)
func packColumns(_ w: UnsafePointer<Float>, k: Int, from j0: Int, to j1: Int, into dst: UnsafeMutablePointer<Float>) {
    var p = 0, j = j0
    while j < j1 {
        let width = min(panelWidth, j1 - j)
        let panel = dst + p * k * panelWidth
        for lane in 0..<panelWidth {
            if lane < width {
                let src = w + (j + lane) * k
                for kk in 0..<k { panel[kk * panelWidth + lane] = src[kk] }
            } else {
                for kk in 0..<k { panel[kk * panelWidth + lane] = 0 }
            }
        }
        p += 1
        j += panelWidth
    }
}

/// y[M, N] = x[M, K] · W[N, K]ᵀ, row-invariant (see above). `packed`, when given, must hold W.
/// Large M is split by rows (each worker packs every column group into its own scratch); small M
/// (decoding) by column groups. Neither split changes any element's chain.
public func project(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, rows m: Int,
                    _ w: UnsafePointer<Float>, outFeatures n: Int, inFeatures k: Int,
                    packed: PackedMatrix? = nil) {
    if m == 0 || n == 0 { return }
    let groups = (n + columnGroup - 1) / columnGroup
    let splitRows = m >= 2 * rowBlock && (Compute.threads > groups || m >= 4 * rowBlock * Compute.threads)
    // A thread wake-up pays off above ~1M multiply-adds, or when the weights alone are large
    // enough that reading them (decoding) takes longer than the wake-up.
    let threads = (m * n * k < (1 << 20) && n * k < (1 << 16)) ? 1 : Compute.threads
    // With packed weights a small M splits by panels instead of column groups, so that a
    // 256-column projection (one group) still keeps every thread busy.
    let panelCount = (n + panelWidth - 1) / panelWidth
    let splitPanels = !splitRows && packed != nil && groups < threads
    let workers = max(1, min(threads, splitRows ? (m + rowBlock - 1) / rowBlock : splitPanels ? panelCount : groups))
    let scratch = packed == nil ? UnsafeMutablePointer<Float>.allocate(capacity: workers * columnGroup * k) : nil
    defer { scratch?.deallocate() }

    /// Columns of group g for rows r0..<r1.
    func run(group g: Int, rows r0: Int, _ r1: Int, worker: Int) {
        let j0 = g * columnGroup, j1 = min(n, j0 + columnGroup)
        let panels: UnsafePointer<Float>
        if let packed {
            panels = UnsafePointer(packed.panels + g * columnGroup * k)
        } else {
            let buf = scratch! + worker * columnGroup * k
            packColumns(w, k: k, from: j0, to: j1, into: buf)
            panels = UnsafePointer(buf)
        }
        var b0 = r0
        while b0 < r1 {
            let b1 = min(r1, b0 + rowBlock)
            var j = j0, p = 0
            while j < j1 {
                let cols = min(panelWidth, j1 - j)
                var r = b0
                while r < b1 {
                    microTile(x + r * k, rows: min(6, b1 - r), panels + p * k * panelWidth, k: k,
                              y + r * n + j, ldc: n, cols: cols,
                              prefetch: packed != nil && r == b0 && j + panelWidth < j1 ? panels + (p + 1) * k * panelWidth : nil)
                    r += 6
                }
                j += panelWidth
                p += 1
            }
            b0 = b1
        }
    }

    /// Panels p0..<p1 (of the packed matrix) for every row.
    func runPanels(_ p0: Int, _ p1: Int) {
        let panels = UnsafePointer(packed!.panels)
        var b0 = 0
        while b0 < m {
            let b1 = min(m, b0 + rowBlock)
            for p in p0..<p1 {
                let j = p * panelWidth, cols = min(panelWidth, n - j)
                var r = b0
                while r < b1 {
                    microTile(x + r * k, rows: min(6, b1 - r), panels + p * k * panelWidth, k: k,
                              y + r * n + j, ldc: n, cols: cols,
                              prefetch: r == b0 && p + 1 < p1 ? panels + (p + 1) * k * panelWidth : nil)
                    r += 6
                }
            }
            b0 = b1
        }
    }

    if workers == 1 {
        for g in 0..<groups { run(group: g, rows: 0, m, worker: 0) }
    } else if splitPanels {
        parallelRanges(panelCount) { _, lo, hi in runPanels(lo, hi) }
    } else if splitRows {
        let blocks = (m + rowBlock - 1) / rowBlock
        parallelRanges(blocks, minPerThread: 1) { worker, lo, hi in
            if lo == hi { return }
            for g in 0..<groups { run(group: g, rows: lo * rowBlock, min(m, hi * rowBlock), worker: worker) }
        }
    } else {
        parallelRanges(groups) { worker, lo, hi in
            for g in lo..<hi { run(group: g, rows: 0, m, worker: worker) }
        }
    }
}

/// y[m, n] (row stride `ldy`) = x[m, k] · Wᵀ with W packed, on the calling thread (callers
/// parallelise over their own work items): the same per-element chains as `project`. With
/// `addScaled`, y += s · (x · Wᵀ) instead: each element's chain result is multiplied by s, rounded,
/// then added (LoRA's delta).
public func projectSerial(_ y: UnsafeMutablePointer<Float>, ldy: Int, _ x: UnsafePointer<Float>, rows m: Int,
                          packed: PackedMatrix, addScaled scale: Float? = nil) {
    let n = packed.rows, k = packed.columns
    if m == 0 || n == 0 { return }
    withUnsafeTemporaryAllocation(of: Float.self, capacity: 6 * panelWidth) { tileBuffer in
        let tile = tileBuffer.baseAddress!
        var r = 0
        while r < m {
            let rows = min(6, m - r)
            var j = 0, p = 0
            while j < n {
                let cols = min(panelWidth, n - j)
                let panel = UnsafePointer(packed.panels + p * k * panelWidth)
                if let scale {
                    microTile(x + r * k, rows: rows, panel, k: k, tile, ldc: panelWidth, cols: panelWidth)
                    for i in 0..<rows {
                        let dst = y + (r + i) * ldy + j, src = tile + i * panelWidth
                        for c in 0..<cols { dst[c] += src[c] * scale }
                    }
                } else {
                    microTile(x + r * k, rows: rows, panel, k: k, y + r * ldy + j, ldc: ldy, cols: cols)
                }
                j += panelWidth
                p += 1
            }
            r += rows
        }
    }
}

/// Up to 6 rows × 16 columns: acc[r][lane] = fma chain over k of x[r, k] · panel[k, lane].
/// One or two rows (decoding) take narrower tiles with the same per-element chains. `prefetch`:
/// the next panel of a packed matrix, pulled into cache one line per k step while the first row
/// tile of this panel runs (decoding streams the weights from memory; the prefetcher alone left
/// ~30% of the hot throughput on the table).
@inline(__always)
private func microTile(_ a: UnsafePointer<Float>, rows: Int, _ panel: UnsafePointer<Float>, k: Int,
                       _ c: UnsafeMutablePointer<Float>, ldc: Int, cols: Int, prefetch: UnsafePointer<Float>? = nil) {
    if rows == 1 { microTile1(a, panel, k: k, c, cols: cols) }
    else if rows == 2 { microTile2(a, rows: rows, panel, k: k, c, ldc: ldc, cols: cols) }
    else { microTile6(a, rows: rows, panel, k: k, c, ldc: ldc, cols: cols, prefetch: UnsafeRawPointer(prefetch ?? panel)) }
}

@inline(__always)
private func microTile1(_ a: UnsafePointer<Float>, _ panel: UnsafePointer<Float>, k: Int,
                       _ c: UnsafeMutablePointer<Float>, cols: Int) {
    var c0 = SIMD16<Float>()
    var bp = UnsafeRawPointer(panel)
    for kk in 0..<k {
        c0 = c0.addingProduct(SIMD16(repeating: a[kk]), bp.loadUnaligned(as: SIMD16<Float>.self))
        bp += panelWidth * 4
    }
    storeTileRow(c0, c, cols: cols)
}

@inline(__always)
private func microTile2(_ a: UnsafePointer<Float>, rows: Int, _ panel: UnsafePointer<Float>, k: Int,
                        _ c: UnsafeMutablePointer<Float>, ldc: Int, cols: Int) {
    var c0 = SIMD16<Float>(), c1 = SIMD16<Float>()
    let a0 = a, a1 = a + k * min(1, rows - 1)
    var bp = UnsafeRawPointer(panel)
    for kk in 0..<k {
        let b = bp.loadUnaligned(as: SIMD16<Float>.self)
        c0 = c0.addingProduct(SIMD16(repeating: a0[kk]), b)
        c1 = c1.addingProduct(SIMD16(repeating: a1[kk]), b)
        bp += panelWidth * 4
    }
    storeTileRow(c0, c, cols: cols)
    if rows > 1 { storeTileRow(c1, c + ldc, cols: cols) }
}

@inline(__always)
private func microTile6(_ a: UnsafePointer<Float>, rows: Int, _ panel: UnsafePointer<Float>, k: Int,
                       _ c: UnsafeMutablePointer<Float>, ldc: Int, cols: Int, prefetch: UnsafeRawPointer) {
    var c0 = SIMD16<Float>(), c1 = SIMD16<Float>(), c2 = SIMD16<Float>()
    var c3 = SIMD16<Float>(), c4 = SIMD16<Float>(), c5 = SIMD16<Float>()
    // Rows past `rows` repeat the last row (results discarded) so the loop has no branches.
    let a0 = a, a1 = a + k * min(1, rows - 1), a2 = a + k * min(2, rows - 1)
    let a3 = a + k * min(3, rows - 1), a4 = a + k * min(4, rows - 1), a5 = a + k * min(5, rows - 1)
    var bp = UnsafeRawPointer(panel)
    for kk in 0..<k {
        let b = bp.loadUnaligned(as: SIMD16<Float>.self)
        c0 = c0.addingProduct(SIMD16(repeating: a0[kk]), b)
        c1 = c1.addingProduct(SIMD16(repeating: a1[kk]), b)
        c2 = c2.addingProduct(SIMD16(repeating: a2[kk]), b)
        c3 = c3.addingProduct(SIMD16(repeating: a3[kk]), b)
        c4 = c4.addingProduct(SIMD16(repeating: a4[kk]), b)
        c5 = c5.addingProduct(SIMD16(repeating: a5[kk]), b)
        ember_prefetch(prefetch + kk * 64)
        bp += panelWidth * 4
    }
    storeTileRow(c0, c, cols: cols)
    if rows > 1 { storeTileRow(c1, c + ldc, cols: cols) }
    if rows > 2 { storeTileRow(c2, c + 2 * ldc, cols: cols) }
    if rows > 3 { storeTileRow(c3, c + 3 * ldc, cols: cols) }
    if rows > 4 { storeTileRow(c4, c + 4 * ldc, cols: cols) }
    if rows > 5 { storeTileRow(c5, c + 5 * ldc, cols: cols) }
}

/// Stores the first `cols` lanes of one tile row.
@inline(__always)
private func storeTileRow(_ acc: SIMD16<Float>, _ dst: UnsafeMutablePointer<Float>, cols: Int) {
    if cols == panelWidth { UnsafeMutableRawPointer(dst).storeBytes(of: acc, as: SIMD16<Float>.self) }
    else { for j in 0..<cols { dst[j] = acc[j] } }
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
    if let dx {
        sgemm(transA: false, transB: false, m: rows, n: inFeatures, k: outFeatures,
              a: dy, lda: outFeatures, b: weight, ldb: inFeatures,
              beta: accumulateInput ? 1 : 0, c: dx, ldc: inFeatures)
    }
    guard let dWeight else { return }
    sgemm(transA: true, transB: false, m: outFeatures, n: inFeatures, k: rows,
          a: dy, lda: outFeatures, b: x, ldb: inFeatures, beta: 1, c: dWeight, ldc: inFeatures)
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
