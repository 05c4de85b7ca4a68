// What defines a train_step loss besides the data: the mode and its options, aggregation,
// temperature, entropy and reference-KL terms (docs/lp-reg.md states each). Defaults come from
// `LossDefaults`.
import Foundation
import Kernels

/// Clipped surrogate options (`ppo`; also Lp-Reg's unselected tokens).
public struct ClipOptions: Sendable, Equatable, Codable {
    public var epsLow: Float
    public var epsHigh: Float
    /// Dual clip c (> 1): for A < 0 the loss is capped at −A·c. nil: off.
    public var dualClip: Float?
    /// Defaults: `ppo`'s (LossDefaults).
    public init(epsLow: Float = LossDefaults.number("ppo", "eps_low"), epsHigh: Float = LossDefaults.number("ppo", "eps_high"),
                dualClip: Float? = nil) {
        self.epsLow = epsLow; self.epsHigh = epsHigh; self.dualClip = dualClip
    }
}

/// Lp-Reg options; defaults (LossDefaults) are the paper recipe and the reference code's semantics.
public struct LpRegOptions: Sendable, Equatable, Codable {
    public enum PercentileOver: String, Sendable, Codable { case negative, all }
    public var clip = LossDefaults.clip("lp_reg")
    public var proxy: ProxySpec = .minP(LossDefaults.number("lp_reg", "min_p"))
    /// Fraction of negative-advantage tokens considered (lowest probability first).
    public var rho = LossDefaults.number("lp_reg", "rho")
    /// The same for positive-advantage tokens (0: off).
    public var rhoPos = LossDefaults.number("lp_reg", "rho_pos")
    public var beta = LossDefaults.number("lp_reg", "beta")
    /// `negative` (reference code): the lowest-lp floor(N_neg·rho) tokens among A < 0, kept when
    /// lp < lp_proxy. `all` (paper): the lowest-lp floor(N·rho) tokens of the batch, kept when
    /// A < 0 and the proxy keeps the token.
    public var percentileOver = PercentileOver(rawValue: LossDefaults.text("lp_reg", "percentile_over"))!
    /// Reference-code quirk: nothing is selected when k <= 1.
    public var skipWhenKAtMostOne = LossDefaults.flag("lp_reg", "skip_k_le_1")
    public enum KL: String, Sendable, Codable { case k3, full }
    /// `k3`: the reference code's estimator on the sampled token. `full`: the exact
    /// KL(proxy ‖ policy) over the vocabulary at selected positions, the proxy taken from the row
    /// being trained (the sampling policy when on-policy; a detached target either way).
    public var kl = KL(rawValue: LossDefaults.text("lp_reg", "kl"))!
    public enum Selection: String, Sendable, Codable { case batch, microBatch = "micro_batch" }
    /// `batch` (default): select across the whole mini-batch. `micro_batch`: within each
    /// micro-batch, as the reference code does.
    public var selection = Selection(rawValue: LossDefaults.text("lp_reg", "selection"))!
    public init() {}
}

/// Clip-Cov options (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs").
public struct ClipCovOptions: Sendable, Equatable, Codable {
    public var clip = LossDefaults.clip("clip_cov")
    /// Fraction of tokens whose gradient is dropped (at least one).
    public var ratio = LossDefaults.number("clip_cov", "ratio")
    /// Candidates have covariance strictly inside (covLow, covHigh).
    public var covLow = LossDefaults.number("clip_cov", "cov_low")
    public var covHigh = LossDefaults.number("clip_cov", "cov_high")
    /// Seed of the random choice among candidates.
    public var seed: UInt64 = 0
    public init() {}
}

/// KL-Cov options: the top `ratio` tokens by covariance get −A·r + coef·|lp − lp_old|.
public struct KLCovOptions: Sendable, Equatable, Codable {
    public var ratio = LossDefaults.number("kl_cov", "ratio")
    public var coef = LossDefaults.number("kl_cov", "coef")
    public init() {}
}

public enum LossMode: Sendable, Equatable, Codable {
    /// Supervised warm-up: −lp (advantages ignored).
    case crossEntropy
    /// Clipped surrogate (GRPO / PPO; Clip-Higher with epsHigh > epsLow; dual clip).
    case ppo(ClipOptions)
    case lpReg(LpRegOptions)
    /// GSPO: sequence-level ratio s = exp(mean_t(lp − lp_old)); per token s·exp(lp − sg(lp)),
    /// clipped; always aggregated seq-mean-token-mean (as verl does).
    case gspo(ClipOptions)
    /// CISPO: −sg(clip(r, 1−εl, 1+εh))·A·lp (clipped importance weight, gradient on every token).
    case cispo(ClipOptions)
    case clipCov(ClipCovOptions)
    case klCov(KLCovOptions)
    /// 80/20: the clipped surrogate only on tokens whose entropy is in the top `fraction` of the
    /// batch (threshold: linear-interpolated quantile, as torch.quantile); aggregated over them.
    case highEntropy(fraction: Float, clip: ClipOptions)
}

/// KL estimators toward the frozen reference policy (per token, r = lp_ref − lp):
/// k1 = −r, k2 = r²/2, k3 = e^r − r − 1 clamped to [−10, 10] (verl's low_var_kl).
public enum ReferenceKL: String, Sendable, CaseIterable, Codable {
    case k1, k2, k3
}

/// Everything that defines a train_step loss besides the data.
public struct LossConfig: Sendable, Equatable, Codable {
    public var mode: LossMode
    public var aggregation = Aggregation(rawValue: LossDefaults.text("common", "agg"))!
    /// Log-probabilities are taken of softmax(logits / temperature), as at sampling time.
    public var temperature = LossDefaults.number("common", "temperature")
    /// Subtracts entropyCoef × aggregated entropy.
    public var entropyCoef = LossDefaults.number("common", "entropy_coef")
    /// Adds klCoef × aggregated KL to the reference (needs reference log-probs).
    public var klCoef = LossDefaults.number("common", "kl_coef")
    public var klType = ReferenceKL(rawValue: LossDefaults.text("common", "kl_type"))!
    public init(mode: LossMode) { self.mode = mode }
}

/// How per-token losses become the batch loss (verl's `loss_agg_mode` names).
public enum Aggregation: String, Sendable, CaseIterable, Codable {
    case tokenMean = "token-mean"
    case seqMeanTokenSum = "seq-mean-token-sum"
    case seqMeanTokenMean = "seq-mean-token-mean"
    /// Σ over sequences of token sums, divided by the longest response (verl divides by the
    /// padded response width, which is that length for an unpadded batch).
    case seqMeanTokenSumNorm = "seq-mean-token-sum-norm"

    /// Weight of each token given its sequence; tokens outside `included` weigh 0 and do not count.
    func weights(sequence: [Int], included: [Bool]? = nil) -> [Float] {
        var lengths: [Int: Int] = [:]
        var n = 0
        for (i, s) in sequence.enumerated() where included?[i] ?? true { lengths[s, default: 0] += 1; n += 1 }
        let sequences = Float(max(1, lengths.count)), longest = Float(lengths.values.max() ?? 1)
        return sequence.enumerated().map { i, s in
            guard included?[i] ?? true else { return 0 }
            switch self {
            case .tokenMean: return 1 / Float(max(1, n))
            case .seqMeanTokenSum: return 1 / sequences
            case .seqMeanTokenMean: return 1 / (sequences * Float(lengths[s]!))
            case .seqMeanTokenSumNorm: return 1 / longest
            }
        }
    }
}
