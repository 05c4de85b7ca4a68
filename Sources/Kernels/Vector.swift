// Small vector primitives with a fixed summation order (8 lanes, then left to right), used by
// attention and softmax so that results never depend on batch composition or the kernel set.
import CKernels


/// Σ a[i]·b[i] over n elements: 8-lane fused chains, `sum8`, then the tail.
@inline(__always)
public func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
    var s: Float = 0
    Kernels.table.pointee.score_rows(&s, nil, a, nil, b, 0, 1, Int32(n), 1)
    return s
}

/// y[i] = fma(alpha, x[i], y[i]) over n elements.
@inline(__always)
public func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
    Kernels.table.pointee.axpy(alpha, x, y, n)
}

/// max of n > 0 elements.
@inline(__always)
public func maxElement(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
    var m = x[0]
    for i in 1..<max(1, n) where x[i] > m { m = x[i] }
    return m
}

/// The sum of `count` floats, each read once (the benchmark's memory read bandwidth probe).
public func readFloats(_ p: UnsafePointer<Float>, count: Int) -> Float { Kernels.table.pointee.read_sum(p, count) }

/// Whether every one of `count` floats is finite (one vectorised pass).
public func allFinite(_ p: UnsafePointer<Float>, count: Int) -> Bool { Kernels.table.pointee.all_finite(p, count) != 0 }
