// Rotary position embeddings in the Hugging Face "rotate half" convention:
// for i < HS/2, (x_i, x_{i+HS/2}) is rotated by angle pos · invFreq[i].
import Foundation

/// Inverse frequencies and their scaling (`rope_scaling` of config.json). Every table is computed
/// as transformers computes it: in fp32, one rounding per operation, in the same order (its
/// tables are part of the model's definition; a float64 transformers run keeps them too). A
/// table computed more exactly differs from it by an ulp here and there, and at a few hundred
/// positions that moves log-probabilities by more than fp32's own error.
public struct RopeFrequencies: Sendable, Equatable {
    public let invFreq: [Float]   // [HS/2]

    /// Plain RoPE: `inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim))`: the exponent
    /// in fp32, the power rounded to fp32 (correctly rounded here; PyTorch's vectorized powf is
    /// within one ulp of it), then its reciprocal in fp32.
    public init(headDim: Int, theta: Double) {
        let dim = Float(headDim)
        let base = Double(Float(theta))
        invFreq = (0..<(headDim / 2)).map { i in
            let exponent = Float(2 * i) / dim
            return 1 / Float(Foundation.pow(base, Double(exponent)))
        }
    }

    public init(invFreq: [Float]) { self.invFreq = invFreq }

    /// `rope_type: linear`: positions divided by `factor` (`inv_freq / factor` in fp32).
    public func linear(factor: Double) -> RopeFrequencies {
        let f = Float(factor)
        return RopeFrequencies(invFreq: invFreq.map { $0 / f })
    }

    /// `rope_type: llama3` (Llama 3.1+): low frequencies divided by `factor`, high ones kept, a
    /// smooth blend between (transformers `_compute_llama3_parameters`, op for op in fp32).
    public func llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double,
                       originalMaxPositions: Double) -> RopeFrequencies {
        let lowWavelen = Float(originalMaxPositions / lowFreqFactor)
        let highWavelen = Float(originalMaxPositions / highFreqFactor)
        let factor32 = Float(factor), low32 = Float(lowFreqFactor), span = Float(highFreqFactor - lowFreqFactor)
        let twoPi = Float(2 * Double.pi), context = Float(originalMaxPositions)
        return RopeFrequencies(invFreq: invFreq.map { f in
            // `scalar / tensor` is `tensor.reciprocal() * scalar` in PyTorch.
            let wavelen = (1 / f) * twoPi
            let kept = wavelen > lowWavelen ? f / factor32 : f
            let smooth = ((1 / wavelen) * context - low32) / span
            let smoothed = (1 - smooth) * kept / factor32 + smooth * kept
            let isMedium = !(wavelen < highWavelen) && !(wavelen > lowWavelen)
            return isMedium ? smoothed : kept
        })
    }

    /// cos/sin tables for the given positions: cos[T, HS/2], sin[T, HS/2]. The angle is formed
    /// in fp32 (as transformers does) and its cosine taken in double.
    public func tables(positions: UnsafePointer<Int32>, count: Int,
                       cos: UnsafeMutablePointer<Float>, sin: UnsafeMutablePointer<Float>) {
        let half = invFreq.count
        invFreq.withUnsafeBufferPointer { f in
            parallelFor(count, minPerThread: 128) { t in
                let p = Float(positions[t])
                for i in 0..<half {
                    let angle = Double(p * f[i])
                    cos[t * half + i] = Float(Foundation.cos(angle))
                    sin[t * half + i] = Float(Foundation.sin(angle))
                }
            }
        }
    }
}

/// Rotates `heads` consecutive head vectors of each token in place.
/// x: row t starts at x + t*rowStride, heads at offsets h*HS; cos/sin [T, HS/2].
public func ropeForward(_ x: UnsafeMutablePointer<Float>, rows: Int, rowStride: Int, heads: Int,
                        headSize HS: Int, cos: UnsafePointer<Float>, sin: UnsafePointer<Float>) {
    let half = HS / 2
    parallelFor(rows, minPerThread: 64) { t in
        let c = cos + t * half, s = sin + t * half
        for h in 0..<heads {
            let v = x + t * rowStride + h * HS
            for i in 0..<half {
                let a = v[i], b = v[i + half]
                v[i] = a * c[i] - b * s[i]
                v[i + half] = b * c[i] + a * s[i]
            }
        }
    }
}

/// Backward of `ropeForward`, in place on the gradient (rotation by −angle).
public func ropeBackward(_ dx: UnsafeMutablePointer<Float>, rows: Int, rowStride: Int, heads: Int,
                         headSize HS: Int, cos: UnsafePointer<Float>, sin: UnsafePointer<Float>) {
    let half = HS / 2
    parallelFor(rows, minPerThread: 64) { t in
        let c = cos + t * half, s = sin + t * half
        for h in 0..<heads {
            let v = dx + t * rowStride + h * HS
            for i in 0..<half {
                let a = v[i], b = v[i + half]
                v[i] = a * c[i] + b * s[i]
                v[i + half] = b * c[i] - a * s[i]
            }
        }
    }
}
