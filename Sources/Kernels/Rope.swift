// Rotary position embeddings in the Hugging Face "rotate half" convention:
// for i < HS/2, (x_i, x_{i+HS/2}) is rotated by angle pos · invFreq[i].
import Foundation

/// Inverse frequencies and their scaling (`rope_scaling` of config.json).
public struct RopeFrequencies: Sendable, Equatable {
    public let invFreq: [Float]   // [HS/2]

    /// Plain RoPE: invFreq[i] = 1 / theta^(2i / dim), computed in fp32 as transformers does.
    public init(headDim: Int, theta: Double) {
        let dim = Float(headDim)
        invFreq = (0..<(headDim / 2)).map { i in
            Float(1.0 / pow(theta, Double(Float(2 * i) / dim)))
        }
    }

    public init(invFreq: [Float]) { self.invFreq = invFreq }

    /// `rope_type: linear`: positions divided by `factor`.
    public func linear(factor: Double) -> RopeFrequencies {
        RopeFrequencies(invFreq: invFreq.map { Float(Double($0) / factor) })
    }

    /// `rope_type: llama3` (Llama 3.1+): low frequencies divided by `factor`, high kept,
    /// a smooth blend between (transformers `_compute_llama3_parameters`).
    public func llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double,
                       originalMaxPositions: Double) -> RopeFrequencies {
        let lowWavelen = originalMaxPositions / lowFreqFactor
        let highWavelen = originalMaxPositions / highFreqFactor
        return RopeFrequencies(invFreq: invFreq.map { f32 in
            let f = Double(f32)
            let wavelen = 2 * Double.pi / f
            var scaled = wavelen > lowWavelen ? f / factor : f
            let isMedium = !(wavelen < highWavelen) && !(wavelen > lowWavelen)
            if isMedium {
                let smooth = (originalMaxPositions / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor)
                scaled = (1 - smooth) * scaled / factor + smooth * scaled
            }
            return Float(scaled)
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
