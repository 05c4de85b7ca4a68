// The one exp (Cephes `expf` polynomial, ~1 ulp on [-87, 88]) used by every kernel that
// exponentiates: softmax, log-sum-exp, attention, SiLU. It lives in Sources/CKernels
// (ember_kernels.h), where the kernel sets use it in 16 lanes and Swift in 8 lanes or one: the
// same operations, so sampling, scoring and training agree bit for bit.
import CKernels

/// e^x lane-wise. NaN stays NaN, +inf gives +inf, -inf and x < -87.34 give 0.
@inline(__always)
public func exp8(_ x: SIMD8<Float>) -> SIMD8<Float> { ember_exp8(x) }

/// e^x for one value, through the same lanes as `exp8` (bit-identical to it).
@inline(__always)
public func exp1(_ x: Float) -> Float { ember_exp1(x) }

/// out[i] = e^(x[i] - shift) over n elements (may alias); returns Σ out[i] summed in 8 lanes
/// then left to right (`ember_sum8`).
@inline(__always)
public func expShiftSum(_ out: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int, shift: Float) -> Float {
    Kernels.table.pointee.exp_shift_sum(out, x, n, shift)
}
