import CKernels
// Element types of checkpoint tensors and their conversion to the engine's fp32.

/// Safetensors dtype names this engine reads (floats are converted to F32 on load).
public enum DType: String, Sendable, CaseIterable {
    case f32 = "F32", f16 = "F16", bf16 = "BF16", f64 = "F64", i32 = "I32", i64 = "I64"

    public var byteSize: Int {
        switch self {
        case .f16, .bf16: 2
        case .f32, .i32: 4
        case .f64, .i64: 8
        }
    }
}

/// bfloat16 bits → Float (exact).
@inline(__always)
public func bf16ToFloat(_ bits: UInt16) -> Float { Float(bitPattern: UInt32(bits) << 16) }

/// Float → bfloat16 bits, round to nearest even (NaN stays NaN), as PyTorch does. The rule
/// lives in CKernels (`ember_bf16_bits`), which the bf16 weight panels are packed with too.
@inline(__always)
public func floatToBF16(_ x: Float) -> UInt16 { ember_bf16_bits(x) }

/// x rounded to the nearest bfloat16 value.
@inline(__always)
public func roundedToBF16(_ x: Float) -> Float { ember_bf16_round(x) }

/// IEEE half bits → Float (exact, subnormals included).
@inline(__always)
public func f16ToFloat(_ bits: UInt16) -> Float {
    #if arch(arm64)
    return Float(Float16(bitPattern: bits))
    #else
    let sign = UInt32(bits & 0x8000) << 16
    let exp = Int((bits >> 10) & 0x1F)
    let mant = UInt32(bits & 0x3FF)
    if exp == 0 {
        let v = Float(mant) * 0x1p-24
        return sign != 0 ? -v : v
    }
    if exp == 31 { return Float(bitPattern: sign | 0x7F80_0000 | (mant << 13)) }
    return Float(bitPattern: sign | (UInt32(exp + 112) << 23) | (mant << 13))
    #endif
}

/// Converts `count` elements of `dtype` at `source` to Float.
public func convertToFloat(_ source: UnsafeRawPointer, dtype: DType, count: Int,
                           into out: UnsafeMutablePointer<Float>) {
    switch dtype {
    case .f32:
        UnsafeMutableRawPointer(out).copyMemory(from: source, byteCount: count * 4)
    case .bf16:
        for i in 0..<count { out[i] = bf16ToFloat(source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
    case .f16:
        for i in 0..<count { out[i] = f16ToFloat(source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
    case .f64:
        for i in 0..<count { out[i] = Float(source.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)) }
    case .i32:
        for i in 0..<count { out[i] = Float(source.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
    case .i64:
        for i in 0..<count { out[i] = Float(source.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
    }
}
