// Policy-gradient losses over response tokens (../shared docs: lp-reg.md): clipped PPO/GRPO
// (asymmetric clip, dual clip), Lp-Reg, and supervised cross-entropy, with verl's aggregation
// modes. A loss is planned from the batch's current log-probabilities (Lp-Reg selects tokens
// across the whole batch), then applied row by row to logits chunks, turning each row into
// d(loss)/d(logits) through the same `RowDistribution` sampling and scoring use.
import Foundation
import Kernels
import Models

/// Clipped surrogate options (`ppo`; also Lp-Reg's unselected tokens).
public struct ClipOptions: Sendable, Equatable {
    public var epsLow: Float
    public var epsHigh: Float
    /// Dual clip c (> 1): for A < 0 the loss is capped at −A·c. nil: off.
    public var dualClip: Float?
    public init(epsLow: Float = 0.2, epsHigh: Float = 0.2, dualClip: Float? = nil) {
        self.epsLow = epsLow; self.epsHigh = epsHigh; self.dualClip = dualClip
    }
}

/// Lp-Reg options; defaults are the paper recipe and the reference code's semantics.
public struct LpRegOptions: Sendable, Equatable {
    public enum PercentileOver: String, Sendable { case negative, all }
    public var clip = ClipOptions(epsLow: 1.0, epsHigh: 9.0)
    public var proxy: ProxySpec = .minP(0.02)
    /// Fraction of negative-advantage tokens considered (lowest probability first).
    public var rho: Float = 0.01
    /// The same for positive-advantage tokens (0: off).
    public var rhoPos: Float = 0
    public var beta: Float = 1
    /// `negative` (reference code): the lowest-lp floor(N_neg·rho) tokens among A < 0, kept when
    /// lp < lp_proxy. `all` (paper): the lowest-lp floor(N·rho) tokens of the batch, kept when
    /// A < 0 and the proxy keeps the token.
    public var percentileOver: PercentileOver = .negative
    /// Reference-code quirk: nothing is selected when k <= 1.
    public var skipWhenKAtMostOne = true
    public init() {}
}

public enum LossMode: Sendable, Equatable {
    case crossEntropy
    case ppo(ClipOptions)
    case lpReg(LpRegOptions)
}

/// How per-token losses become the batch loss (verl's `loss_agg_mode` names).
public enum Aggregation: String, Sendable, CaseIterable {
    case tokenMean = "token-mean"
    case seqMeanTokenSum = "seq-mean-token-sum"
    case seqMeanTokenMean = "seq-mean-token-mean"
    /// Σ over sequences of token sums, divided by the longest response (verl divides by the
    /// padded response width, which is that length for an unpadded batch).
    case seqMeanTokenSumNorm = "seq-mean-token-sum-norm"
}

/// Per response token, in output-row order.
public struct PolicyTokens: Sendable {
    public var sequence: [Int]
    public var targets: [Int32]
    public var advantages: [Float]
    public var oldLogprobs: [Float]
    /// Sampling-time proxy log-probabilities (−infinity where the proxy dropped the token).
    public var proxyLogprobs: [Float]
    public init(sequence: [Int], targets: [Int32], advantages: [Float], oldLogprobs: [Float], proxyLogprobs: [Float]) {
        self.sequence = sequence; self.targets = targets; self.advantages = advantages
        self.oldLogprobs = oldLogprobs; self.proxyLogprobs = proxyLogprobs
    }
    public var count: Int { targets.count }
}

/// A loss planned for one batch: aggregation weights and the Lp-Reg selection.
public struct PolicyLossPlan: Sendable {
    public let mode: LossMode
    public let temperature: Float
    public let tokens: PolicyTokens
    /// Weight of each token's loss in the batch loss.
    public let weights: [Float]
    /// Lp-Reg: tokens regularized toward the proxy.
    public let selected: [Bool]

    /// Plans the loss given every token's current log-probability `logprobs` (at `temperature`).
    public init(mode: LossMode, aggregation: Aggregation, temperature: Float, tokens: PolicyTokens, logprobs: [Float]) {
        self.mode = mode
        self.temperature = temperature
        self.tokens = tokens
        let n = tokens.count
        var lengths: [Int: Int] = [:]
        for s in tokens.sequence { lengths[s, default: 0] += 1 }
        let sequences = Float(max(1, lengths.count)), longest = Float(lengths.values.max() ?? 1)
        weights = tokens.sequence.map { s in
            switch aggregation {
            case .tokenMean: 1 / Float(max(1, n))
            case .seqMeanTokenSum: 1 / sequences
            case .seqMeanTokenMean: 1 / (sequences * Float(lengths[s]!))
            case .seqMeanTokenSumNorm: 1 / longest
            }
        }
        var selected = [Bool](repeating: false, count: n)
        if case let .lpReg(o) = mode {
            func lowest(_ candidates: [Int], fraction: Float) -> [Int] {
                let k = Int((Float(candidates.count) * fraction).rounded(.down))
                if k == 0 || (o.skipWhenKAtMostOne && k <= 1) { return [] }
                return Array(candidates.sorted { logprobs[$0] < logprobs[$1] || (logprobs[$0] == logprobs[$1] && $0 < $1) }.prefix(k))
            }
            switch o.percentileOver {
            case .negative:
                let neg = (0..<n).filter { tokens.advantages[$0] < 0 }
                for i in lowest(neg, fraction: o.rho) where logprobs[i] < tokens.proxyLogprobs[i] { selected[i] = true }
                if o.rhoPos > 0 {
                    let pos = (0..<n).filter { tokens.advantages[$0] > 0 }
                    for i in lowest(pos, fraction: o.rhoPos) where logprobs[i] < tokens.proxyLogprobs[i] { selected[i] = true }
                }
            case .all:
                for i in lowest(Array(0..<n), fraction: o.rho)
                where tokens.advantages[i] < 0 && tokens.proxyLogprobs[i] > -.infinity { selected[i] = true }
            }
        }
        self.selected = selected
    }

    /// Token i's (weighted) loss and d(loss)/d(lp) at current log-probability `lp`.
    public func term(_ i: Int, logprob lp: Float) -> (loss: Double, dLogprob: Float) {
        let w = weights[i], a = tokens.advantages[i]
        switch mode {
        case .crossEntropy:
            return (Double(-lp * w), -w)
        case let .ppo(clip):
            let (l, g) = Self.clipped(a, lp, tokens.oldLogprobs[i], clip)
            return (Double(l * w), g * w)
        case let .lpReg(o):
            guard selected[i] else {
                let (l, g) = Self.clipped(a, lp, tokens.oldLogprobs[i], o.clip)
                return (Double(l * w), g * w)
            }
            // −A·r + β·k3(proxy ‖ policy), k3 = e^d − d − 1 with d = lp_proxy − lp, clamped to [−10, 10].
            let r = expf(lp - tokens.oldLogprobs[i])
            let d = tokens.proxyLogprobs[i] - lp
            let k3 = expf(d) - d - 1
            let clamped = min(max(k3, -10), 10)
            let dk3: Float = (k3 > -10 && k3 < 10) ? 1 - expf(d) : 0
            return (Double((-a * r + o.beta * clamped) * w), (-a * r + o.beta * dk3) * w)
        }
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
    /// d/dlogits = dL/dlp · (onehot − softmax(z)) / T, z = logits / T.
    public func apply(row: UnsafeMutablePointer<Float>, vocab V: Int, token i: Int) -> Double {
        let dist = RowDistribution(scaling: row, count: V, temperature: temperature)
        let target = Int(tokens.targets[i])
        let (loss, g) = term(i, logprob: dist.logprob(target))
        softmax(row, row, V, lse: dist.lse)
        let scale = temperature > 0 ? -g / temperature : -g
        for j in 0..<V { row[j] *= scale }
        row[target] -= scale
        return loss
    }
}

// MARK: - One forward/backward with a policy loss

public enum PolicyTraining {
    /// Result of a policy-loss forward/backward.
    public struct Result: Sendable {
        public let loss: Double
        public let plan: PolicyLossPlan
        /// Current log-probability of each response token (before the update).
        public let logprobs: [Float]
    }

    /// Adds d(policy loss)/d(parameters) into the model's gradients for a packed batch whose
    /// sequences' responses start at `responseStarts`. The body runs forward once; the output head
    /// runs twice: first for every token's current log-probability (Lp-Reg selects across the whole
    /// batch), then for the gradients.
    public static func accumulateGradients(model: TransformerModel, batch: PackedBatch, responseStarts: [Int],
                                           advantages: [Float], oldLogprobs: [Float], proxyLogprobs: [Float],
                                           mode: LossMode, aggregation: Aggregation = .tokenMean,
                                           temperature: Float = 1, chunkRows: Int? = nil,
                                           zeroGradients: Bool = true) throws -> Result {
        let (rows, targets) = Scoring.responseRows(batch, responseStarts: responseStarts)
        precondition(advantages.count == rows.count && oldLogprobs.count == rows.count && proxyLogprobs.count == rows.count)
        var sequence: [Int] = []
        for b in 0..<batch.sequenceCount { sequence += Array(repeating: b, count: batch.range(b).count - responseStarts[b]) }
        if zeroGradients { model.parameters.zeroGradients() }
        let acts = try model.forward(tokens: batch.tokens, positions: batch.positions,
                                     context: .packed(sequenceStarts: batch.sequenceStarts), saving: true)
        let V = model.architecture.vocabSize
        let chunk = chunkRows ?? model.defaultChunkRows()
        var current: [Float] = []
        current.reserveCapacity(rows.count)
        model.withLogitChunks(hidden: acts.hidden.pointer, rows: rows, chunkRows: chunk) { range, logits in
            for (i, r) in range.enumerated() {
                current.append(RowDistribution(scaling: logits + i * V, count: V, temperature: temperature).logprob(Int(targets[r])))
            }
        }
        let tokens = PolicyTokens(sequence: sequence, targets: targets, advantages: advantages,
                                  oldLogprobs: oldLogprobs, proxyLogprobs: proxyLogprobs)
        let plan = PolicyLossPlan(mode: mode, aggregation: aggregation, temperature: temperature, tokens: tokens,
                                  logprobs: current)
        let dHidden = FloatBuffer(zeros: batch.tokens.count * model.architecture.hiddenSize)
        var loss = 0.0
        model.withLogitChunks(hidden: acts.hidden.pointer, rows: rows, chunkRows: chunk, dHidden: dHidden.pointer) { range, logits in
            for (i, r) in range.enumerated() { loss += plan.apply(row: logits + i * V, vocab: V, token: r) }
        }
        guard loss.isFinite else { throw NonFiniteError(what: "the loss") }
        model.backward(acts, dHidden: dHidden.pointer)
        return Result(loss: loss, plan: plan, logprobs: current)
    }
}
