import COpenBLAS

/// The one entry point to BLAS matrix multiplication.
///
/// Row-major: `C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C`, where `op(X)` is `X`
/// or its transpose. `lda`, `ldb`, `ldc` are row strides of the stored matrices. With OpenBLAS
/// 0.3.21 the rows of `A · Bᵀ` are bit-identical whatever `m` (see docs/design-notes).
@inline(__always)
public func sgemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                  a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                  beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int) {
    if m == 0 || n == 0 { return }
    if k == 0 {
        if beta == 0 { for i in 0..<m { (c + i * ldc).update(repeating: 0, count: n) } }
        else if beta != 1 { for i in 0..<m { for j in 0..<n { c[i * ldc + j] *= beta } } }
        return
    }
    cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
                transB ? CblasTrans : CblasNoTrans, Int32(m), Int32(n), Int32(k), alpha,
                a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
}

/// y[T, O] = x[T, In] · W[O, In]ᵀ + b[O]   (PyTorch nn.Linear layout).
public func linearForward(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>,
                          _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                          rows: Int, inFeatures: Int, outFeatures: Int) {
    sgemm(transA: false, transB: true, m: rows, n: outFeatures, k: inFeatures,
          a: x, lda: inFeatures, b: weight, ldb: inFeatures, c: y, ldc: outFeatures)
    if let bias {
        parallelFor(rows, minPerThread: 64) { t in
            let row = y + t * outFeatures
            for o in 0..<outFeatures { row[o] += bias[o] }
        }
    }
}

/// Backward of `linearForward`.
/// - dx[T, In]: overwritten, or accumulated when `accumulateInput`; nil skips it.
/// - dW[O, In] += dyᵀ · x;  db[O] += Σ_t dy[t].
public func linearBackward(_ dx: UnsafeMutablePointer<Float>?, _ dWeight: UnsafeMutablePointer<Float>,
                           _ dBias: UnsafeMutablePointer<Float>?, _ dy: UnsafePointer<Float>,
                           _ x: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                           rows: Int, inFeatures: Int, outFeatures: Int,
                           accumulateInput: Bool = false) {
    if let dx {
        sgemm(transA: false, transB: false, m: rows, n: inFeatures, k: outFeatures,
              a: dy, lda: outFeatures, b: weight, ldb: inFeatures,
              beta: accumulateInput ? 1 : 0, c: dx, ldc: inFeatures)
    }
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
