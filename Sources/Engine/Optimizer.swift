// AdamW with bias correction and decoupled weight decay (Loshchilov & Hutter; PyTorch
// `torch.optim.AdamW`), global grad-norm clipping (`clip_grad_norm_`), and a guard that refuses
// a step whose gradients are not finite, leaving weights and moments bit-identical.
import Foundation
import Kernels
import Weights

/// Optimizer hyper-parameters.
public struct AdamWSettings: Sendable, Equatable, Codable {
    public var lr: Float = 1e-5
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var eps: Float = 1e-8
    public var weightDecay: Float = 0.0
    /// Maximum global gradient norm; 0 disables clipping.
    public var gradClip: Float = 1.0

    public init(lr: Float = 1e-5, beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8,
                weightDecay: Float = 0, gradClip: Float = 1) {
        self.lr = lr; self.beta1 = beta1; self.beta2 = beta2; self.eps = eps
        self.weightDecay = weightDecay; self.gradClip = gradClip
    }
}

/// Raised when a step is refused because the loss or a gradient is NaN or infinite.
public struct NonFiniteError: Error, CustomStringConvertible, Equatable {
    public let what: String
    public var description: String { "\(what) is not finite; the step was refused and the weights are unchanged" }
}

public final class AdamW {
    public var settings: AdamWSettings
    /// Optimizer steps taken (drives bias correction).
    public private(set) var stepCount: Int

    public init(settings: AdamWSettings = AdamWSettings(), stepCount: Int = 0) {
        self.settings = settings
        self.stepCount = stepCount
    }

    /// Sets the step counter (resuming from a checkpoint).
    public func restore(stepCount: Int) { self.stepCount = stepCount }

    /// Global L2 norm of the gradients, summed in Double over fixed blocks (independent of the
    /// thread count); NaN or infinity if any gradient is.
    public static func gradientNorm(_ store: ParameterStore) -> Double {
        let g = store.gradients, n = store.count
        let block = 1 << 16
        let blocks = (n + block - 1) / block
        var partial = [Double](repeating: 0, count: blocks)
        partial.withUnsafeMutableBufferPointer { part in
            parallelFor(blocks) { b in
                var s = 0.0
                for i in (b * block)..<min(n, (b + 1) * block) { let v = Double(g[i]); s += v * v }
                part[b] = s
            }
        }
        return partial.reduce(0, +).squareRoot()
    }

    /// Clips and applies one step from `store.gradients`, with `lr` overriding the setting (for
    /// schedules). Returns the gradient norm before clipping. Throws `NonFiniteError` without
    /// touching anything when the norm is not finite.
    @discardableResult
    public func step(_ store: ParameterStore, lr: Float? = nil, gradientNorm known: Double? = nil) throws -> Double {
        try Compute.spinning { try stepInScope(store, lr: lr, gradientNorm: known) }
    }

    private func stepInScope(_ store: ParameterStore, lr: Float?, gradientNorm known: Double?) throws -> Double {
        let norm = known ?? Self.gradientNorm(store)
        guard norm.isFinite else { throw NonFiniteError(what: "the gradient norm") }
        let s = settings
        let rate = lr ?? s.lr
        // clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied only when below 1.
        var scale: Float = 1
        if s.gradClip > 0 {
            let c = Double(s.gradClip) / (norm + 1e-6)
            if c < 1 { scale = Float(c) }
        }
        stepCount += 1
        let t = Float(stepCount)
        let bc1 = 1 - powf(s.beta1, t), bc2 = 1 - powf(s.beta2, t)
        let stepSize = rate / bc1, bc2Sqrt = bc2.squareRoot()
        let decay = 1 - rate * s.weightDecay
        // bf16 storage: the step updates the float32 master and the values become its rounding.
        let p = store.precise, g = store.gradients, m = store.firstMoment, v = store.secondMoment
        let rounded: UnsafeMutablePointer<Float>? = store.storage == .bf16 ? store.values : nil
        let (b1, b2, eps) = (s.beta1, s.beta2, s.eps)
        parallelRanges(store.count, minPerThread: 1 << 14) { _, lo, hi in
            for i in lo..<hi {
                let gi = g[i] * scale
                let mi = b1 * m[i] + (1 - b1) * gi
                let vi = b2 * v[i] + (1 - b2) * gi * gi
                m[i] = mi
                v[i] = vi
                p[i] = p[i] * decay - stepSize * mi / (vi.squareRoot() / bc2Sqrt + eps)
                if let rounded { rounded[i] = roundedToBF16(p[i]) }
            }
        }
        store.markModified()
        return norm
    }
}
