// Policy-gradient losses over response tokens (docs/lp-reg.md states each): clipped PPO/GRPO
// (asymmetric clip, dual clip), Lp-Reg, and supervised cross-entropy, with verl's aggregation
// modes. A loss is planned from the batch's current log-probabilities (Lp-Reg selects tokens
// across the whole batch), then applied row by row to logits chunks, turning each row into
// d(loss)/d(logits) through the same `RowDistribution` sampling and scoring use.
import Foundation
import Kernels

/// Per response token, in output-row order.
public struct PolicyTokens: Sendable {
    public var sequence: [Int]
    public var targets: [Int32]
    public var advantages: [Float]
    public var oldLogprobs: [Float]
    /// Sampling-time proxy log-probabilities (−infinity where the proxy dropped the token).
    public var proxyLogprobs: [Float]
    /// Reference-policy log-probabilities (for klCoef > 0).
    public var refLogprobs: [Float]?
    /// Rollout correction: importance weight of each token's policy term (nil: all 1).
    public var correction: [Float]?
    public init(sequence: [Int], targets: [Int32], advantages: [Float], oldLogprobs: [Float], proxyLogprobs: [Float],
                refLogprobs: [Float]? = nil, correction: [Float]? = nil) {
        self.sequence = sequence; self.targets = targets; self.advantages = advantages
        self.oldLogprobs = oldLogprobs; self.proxyLogprobs = proxyLogprobs; self.refLogprobs = refLogprobs
        self.correction = correction
    }
    public var count: Int { targets.count }
}

/// A loss planned for one batch from every token's current log-probability (and entropy): the
/// aggregation weights and each mode's batch-wide choices (Lp-Reg selection, Clip-Cov and KL-Cov
/// tokens, the 80/20 entropy mask, GSPO's sequence ratios).
public struct PolicyLossPlan: Sendable {
    public let config: LossConfig
    public let tokens: PolicyTokens
    /// Weight of each token's policy term.
    public let weights: [Float]
    /// Weight of each token's entropy and reference-KL terms (all tokens count).
    public let allWeights: [Float]
    /// Lp-Reg: regularized toward the proxy. KL-Cov: given the |Δlp| penalty. Clip-Cov: gradient
    /// dropped. 80/20: kept.
    public let selected: [Bool]
    /// GSPO: sequence ratio per token.
    let sequenceRatio: [Float]
    /// Lp-Reg: the log-probability cutoff of the selection (nil when nothing was selected).
    public let threshold: Float?

    public var mode: LossMode { config.mode }
    public var temperature: Float { config.temperature }

    /// - Parameters:
    ///   - logprobs: current log-probability of every token (first head pass).
    ///   - entropies: current entropy of every token (needed by 80/20 and entropyCoef).
    ///   - clipCovChoice: picks `count` of the candidates (default: seeded random, as verl).
    ///   - lpRegSelection: overrides Lp-Reg's selection (per-micro-batch selection is planned outside).
    public init(config: LossConfig, tokens: PolicyTokens, logprobs: [Float], entropies: [Float]? = nil,
                clipCovChoice: (([Int], Int) -> [Int])? = nil, lpRegSelection: [Bool]? = nil) {
        self.config = config
        self.tokens = tokens
        let n = tokens.count
        var agg = config.aggregation
        if case .gspo = config.mode { agg = .seqMeanTokenMean }
        allWeights = config.aggregation.weights(sequence: tokens.sequence)
        var selected = [Bool](repeating: false, count: n)
        var threshold: Float?
        var included: [Bool]?
        var ratios = [Float](repeating: 1, count: n)
        let A = tokens.advantages
        switch config.mode {
        case let .lpReg(o):
            func lowest(_ candidates: [Int], fraction: Float) -> [Int] {
                let k = Int((Float(candidates.count) * fraction).rounded(.down))
                if k == 0 || (o.skipWhenKAtMostOne && k <= 1) { return [] }
                return Array(candidates.sorted { logprobs[$0] < logprobs[$1] || (logprobs[$0] == logprobs[$1] && $0 < $1) }.prefix(k))
            }
            var chosen: [Int] = []
            switch o.percentileOver {
            case .negative:
                chosen = lowest((0..<n).filter { A[$0] < 0 }, fraction: o.rho)
                for i in chosen where logprobs[i] < tokens.proxyLogprobs[i] { selected[i] = true }
                if o.rhoPos > 0 {
                    let pos = lowest((0..<n).filter { A[$0] > 0 }, fraction: o.rhoPos)
                    for i in pos where logprobs[i] < tokens.proxyLogprobs[i] { selected[i] = true }
                }
            case .all:
                chosen = lowest(Array(0..<n), fraction: o.rho)
                for i in chosen where A[i] < 0 && tokens.proxyLogprobs[i] > -.infinity { selected[i] = true }
            }
            threshold = chosen.map { logprobs[$0] }.max()
            if let forced = lpRegSelection { selected = forced }
        case .gspo:
            var sums: [Int: (Float, Int)] = [:]
            for i in 0..<n {
                let s = tokens.sequence[i]
                let (a, c) = sums[s] ?? (0, 0)
                sums[s] = (a + (logprobs[i] - tokens.oldLogprobs[i]), c + 1)
            }
            ratios = tokens.sequence.map { s in let (a, c) = sums[s]!; return expf(a / Float(c)) }
        case let .clipCov(o):
            let cov = Self.covariance(A, logprobs)
            var candidates: [Int] = []
            for i in 0..<n {
                let r = expf(logprobs[i] - tokens.oldLogprobs[i])
                let alreadyClipped = -A[i] * min(max(r, 1 - o.clip.epsLow), 1 + o.clip.epsHigh) > -A[i] * r
                if !alreadyClipped && cov[i] > o.covLow && cov[i] < o.covHigh { candidates.append(i) }
            }
            let count = min(candidates.count, max(1, Int((o.ratio * Float(n)).rounded(.down))))
            let picked = clipCovChoice?(candidates, count) ?? Self.randomSubset(candidates, count, seed: o.seed)
            for i in picked { selected[i] = true }
        case let .klCov(o):
            let cov = Self.covariance(A, logprobs)
            let k = max(1, Int((Float(n) * o.ratio).rounded(.down)))
            let top = (0..<n).sorted { cov[$0] > cov[$1] || (cov[$0] == cov[$1] && $0 < $1) }.prefix(k)
            for i in top { selected[i] = true }
        case let .highEntropy(fraction, _):
            let e = entropies ?? []
            precondition(e.count == n, "80/20 needs every token's entropy")
            let cut = Self.quantile(e, 1 - Double(fraction))
            for i in 0..<n where e[i] >= cut { selected[i] = true }
            included = selected
        case .crossEntropy, .ppo, .cispo:
            break
        }
        weights = agg.weights(sequence: tokens.sequence, included: included)
        self.selected = selected
        self.threshold = threshold
        sequenceRatio = ratios
    }

    /// (A − mean A)·(lp − mean lp) per token.
    static func covariance(_ a: [Float], _ lp: [Float]) -> [Float] {
        let n = Float(max(1, a.count))
        let ma = a.reduce(0, +) / n, ml = lp.reduce(0, +) / n
        return zip(a, lp).map { ($0 - ma) * ($1 - ml) }
    }

    /// torch.quantile's default (linear interpolation between order statistics).
    static func quantile(_ x: [Float], _ q: Double) -> Float {
        let s = x.sorted()
        guard !s.isEmpty else { return .infinity }
        let pos = q * Double(s.count - 1)
        let lo = Int(pos.rounded(.down)), hi = min(s.count - 1, lo + 1)
        return Float(Double(s[lo]) + (pos - Double(lo)) * Double(s[hi] - s[lo]))
    }

    static func randomSubset(_ candidates: [Int], _ count: Int, seed: UInt64) -> [Int] {
        var pool = candidates
        var rng = SequenceRandom(seed: seed)
        for i in 0..<count {
            let j = i + Int(rng.next() % UInt64(pool.count - i))
            pool.swapAt(i, j)
        }
        return Array(pool.prefix(count))
    }

    /// Token i's weighted loss and d(loss)/d(lp) at current log-probability `lp` (policy term
    /// and reference KL; the entropy bonus is applied in `apply`).
    public func term(_ i: Int, logprob lp: Float) -> (loss: Double, dLogprob: Float) {
        let (loss, grad) = policyTerm(i, logprob: lp)
        // The rollout-correction weight scales the policy term only (a constant: no gradient).
        let w = weights[i] * (tokens.correction?[i] ?? 1)
        var total = Double(loss * w)
        var g = grad * w
        if config.klCoef != 0, let ref = tokens.refLogprobs?[i] {
            let wk = allWeights[i] * config.klCoef
            let r = ref - lp
            switch config.klType {
            case .k1: total += Double(wk * -r); g += wk
            case .k2: total += Double(wk * 0.5 * r * r); g += wk * -r
            case .k3:
                let k3 = expf(r) - r - 1
                total += Double(wk * min(max(k3, -10), 10))
                if k3 > -10 && k3 < 10 { g += wk * (1 - expf(r)) }
            }
        }
        return (total, g)
    }

    /// Whether token i's clipped surrogate is on its clipped branch, on the low side (A < 0,
    /// ratio < 1 − εl) or the high side (A > 0, ratio > 1 + εh): the ratio the mode clips, so
    /// GSPO's sequence ratio rather than the token's own. Both false for modes without a clip.
    public func clipped(_ i: Int, logprob lp: Float) -> (low: Bool, high: Bool) {
        let clip: ClipOptions
        switch config.mode {
        case let .ppo(c), let .gspo(c), let .cispo(c), let .highEntropy(_, c): clip = c
        case let .lpReg(o): clip = o.clip
        case let .clipCov(o): clip = o.clip
        case .klCov, .crossEntropy: return (false, false)
        }
        let a = tokens.advantages[i]
        let ratio: Float
        if case .gspo = config.mode { ratio = sequenceRatio[i] } else { ratio = expf(lp - tokens.oldLogprobs[i]) }
        return (a < 0 && ratio < 1 - clip.epsLow, a > 0 && ratio > 1 + clip.epsHigh)
    }

    /// Token i's unweighted policy loss and its derivative in lp.
    public func policyTerm(_ i: Int, logprob lp: Float) -> (loss: Float, dLogprob: Float) {
        let a = tokens.advantages[i], old = tokens.oldLogprobs[i]
        var loss: Float, grad: Float
        switch config.mode {
        case .crossEntropy:
            (loss, grad) = (-lp, -1)
        case let .ppo(clip):
            (loss, grad) = Self.clipped(a, lp, old, clip)
        case let .lpReg(o):
            if selected[i] && o.kl == .full {
                // −A·r here; β·KL(proxy ‖ policy) over the whole row is added in `apply`.
                let r = expf(lp - old)
                (loss, grad) = (-a * r, -a * r)
            } else if selected[i] {
                // −A·r + β·k3(proxy ‖ policy), k3 = e^d − d − 1 with d = lp_proxy − lp, clamped to [−10, 10].
                let r = expf(lp - old)
                let d = tokens.proxyLogprobs[i] - lp
                let k3 = expf(d) - d - 1
                let dk3: Float = (k3 > -10 && k3 < 10) ? 1 - expf(d) : 0
                (loss, grad) = (-a * r + o.beta * min(max(k3, -10), 10), -a * r + o.beta * dk3)
            } else {
                (loss, grad) = Self.clipped(a, lp, old, o.clip)
            }
        case let .gspo(clip):
            let s = sequenceRatio[i]
            let unclipped = -a * s, clippedValue = -a * min(max(s, 1 - clip.epsLow), 1 + clip.epsHigh)
            (loss, grad) = (max(unclipped, clippedValue), unclipped >= clippedValue ? -a * s : 0)
        case let .cispo(clip):
            let weight = min(max(expf(lp - old), 1 - clip.epsLow), 1 + clip.epsHigh)
            (loss, grad) = (-a * weight * lp, -a * weight)
        case let .clipCov(o):
            if selected[i] { (loss, grad) = (0, 0) } else { (loss, grad) = Self.clipped(a, lp, old, ClipOptions(epsLow: o.clip.epsLow, epsHigh: o.clip.epsHigh)) }
        case let .klCov(o):
            let r = expf(lp - old)
            if selected[i] {
                let diff = lp - old
                let sign: Float = diff > 0 ? 1 : (diff < 0 ? -1 : 0)
                (loss, grad) = (-a * r + o.coef * abs(diff), -a * r + o.coef * sign)
            } else {
                (loss, grad) = (-a * r, -a * r)
            }
        case let .highEntropy(_, clip):
            (loss, grad) = selected[i] ? Self.clipped(a, lp, old, clip) : (0, 0)
        }
        return (loss, grad)
    }

    /// max(−A·r, −A·clip(r, 1−εl, 1+εh)), capped at −A·c for A < 0 with dual clip; and its
    /// derivative in lp (the clipped branch is constant).
    static func clipped(_ a: Float, _ lp: Float, _ old: Float, _ c: ClipOptions) -> (Float, Float) {
        let r = expf(lp - old)
        let unclipped = -a * r
        let clipped = -a * min(max(r, 1 - c.epsLow), 1 + c.epsHigh)
        var loss = max(unclipped, clipped)
        var grad: Float = unclipped >= clipped ? -a * r : 0
        if let dual = c.dualClip, a < 0, -a * dual < loss {
            loss = -a * dual
            grad = 0
        }
        return (loss, grad)
    }

    /// Turns one logits row into d(loss)/d(logits) for token i; returns the token's loss.
    /// With z = logits / T and p = softmax(z):
    ///   d/dz = dL/dlp·(onehot − p) + entropyCoef·w·p·(log p + H) + [Lp-Reg full KL] β·w·(p − q).
    public func apply(row: UnsafeMutablePointer<Float>, vocab V: Int, token i: Int) -> Double {
        let T = config.temperature
        let dist = RowDistribution(scaling: row, count: V, temperature: T)
        let target = Int(tokens.targets[i])
        var (loss, g) = term(i, logprob: dist.logprob(target))
        let lse = dist.lse
        let scale: Float = T > 0 ? 1 / T : 1
        var fullKL: (c: Float, cut: Float, logKept: Float)?
        if case let .lpReg(o) = config.mode, o.kl == .full, selected[i] {
            let cut: Float
            switch o.proxy {
            case let .minP(kappa): cut = maxElement(row, V) + logf(kappa)
            case let .threshold(tau): cut = lse + logf(tau)
            }
            var kept = 0.0
            for j in 0..<V where row[j] >= cut { kept += Double(exp1(row[j] - lse)) }
            let logKept = Float(log(kept))
            // KL(q ‖ p) = Σ_kept q·(log q − log p) = −log(kept mass).
            loss += Double(o.beta * weights[i] * -logKept)
            fullKL = (o.beta * weights[i], cut, logKept)
        }
        let ce = config.entropyCoef * allWeights[i]
        if ce == 0 && fullKL == nil {
            softmax(row, row, V, lse: lse)
            let s = -g * scale
            for j in 0..<V { row[j] *= s }
        } else {
            let H = ce != 0 ? dist.entropy() : 0
            loss -= Double(ce * H)
            for j in 0..<V {
                let lpj = row[j] - lse
                let pj = exp1(lpj)
                var d = -g * pj + ce * pj * (lpj + H)
                if let k = fullKL {
                    let qj: Float = row[j] >= k.cut ? exp1(lpj - k.logKept) : 0
                    d += k.c * (pj - qj)
                }
                row[j] = d * scale
            }
        }
        row[target] += g * scale
        return loss
    }
}
