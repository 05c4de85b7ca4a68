// Drawing a token from one logits row: logit bias and presence/frequency penalties (on the raw
// logits, as vLLM applies them), temperature, then top-k, top-p and min-p truncation (in that
// order, as transformers' logits processors), renormalization and an inverse-CDF draw with the
// sequence's own generator. Every step uses only the row's bits, the sequence's own history and
// its random state, so a seeded sequence gives the same tokens whatever shares its batch and
// whatever the thread count. Reported log-probabilities stay those of the model at the sampling
// temperature: biases, penalties and truncation shape the draw, not the statistics that training
// compares against.
import Foundation
import Kernels

/// Sampling parameters of a request (names as in the protocol).
public struct SamplingParams: Sendable, Equatable {
    public var temperature: Float = 1
    public var topK: Int = 0          // 0: off
    public var topP: Float = 1
    public var minP: Float = 0
    public var maxTokens: Int = 64
    public var stop: [String] = []
    public var stopTokenIds: [Int32] = []
    public var seed: UInt64? = nil
    public var ignoreEOS = false
    /// Subtracted once from the logit of every token the sample has already produced (OpenAI, vLLM).
    public var presencePenalty: Float = 0
    /// Subtracted from a token's logit once per time the sample has produced it.
    public var frequencyPenalty: Float = 0
    /// Added to the logits of these tokens (OpenAI `logit_bias`, -100...100).
    public var logitBias: [Int32: Float] = [:]

    public init() {}

    /// Whether the draw needs the sample's history or a bias (a shifted copy of the row).
    public var shiftsLogits: Bool { presencePenalty != 0 || frequencyPenalty != 0 || !logitBias.isEmpty }

    /// Writes into `out` the row `z` (logits already divided by the temperature) with the bias and
    /// the penalties for `counts` (token -> times produced) applied to the raw logits, i.e. scaled
    /// by 1/temperature here.
    public func shifted(_ z: UnsafePointer<Float>, count: Int, counts: [Int32: Int], into out: UnsafeMutablePointer<Float>) {
        out.update(from: z, count: count)
        let scale: Float = temperature > 0 ? 1 / temperature : 1
        for (token, bias) in logitBias where Int(token) < count { out[Int(token)] += bias * scale }
        for (token, n) in counts where Int(token) < count {
            out[Int(token)] -= (frequencyPenalty * Float(n) + presencePenalty) * scale
        }
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and the same stream on every platform.
public struct SequenceRandom: Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var x = seed
        func next() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (next(), next(), next(), next())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }

    /// Uniform in [0, 1) with 53 bits.
    public mutating func uniform() -> Double { Double(next() >> 11) * 0x1p-53 }
}

public enum Sampler {
    /// Draws a token from `dist` (already at the sampling temperature) under `params`'
    /// truncations. Greedy (temperature 0) returns the first maximum.
    public static func draw(_ dist: RowDistribution, _ params: SamplingParams, _ rng: inout SequenceRandom) -> Int32 {
        let V = dist.count, z = dist.z
        if params.temperature <= 0 {
            var best = 0
            for i in 1..<V where z[i] > z[best] { best = i }
            return Int32(best)
        }
        let u = rng.uniform()
        let truncating = params.topK > 0 || params.topP < 1 || params.minP > 0
        if !truncating {
            // Inverse CDF over the full distribution in id order.
            var cum = 0.0
            let target = u
            var last = 0
            for i in 0..<V {
                let p = Double(exp1(z[i] - dist.lse))
                if p > 0 { last = i }
                cum += p
                if cum > target { return Int32(i) }
            }
            return Int32(last)
        }
        // Candidates sorted by probability (ties: lower id first).
        var order = Array(0..<V)
        if params.topK > 0 && params.topK < V {
            order = dist.top(params.topK).map { Int($0.token) }
        } else {
            order.sort { z[$0] > z[$1] || (z[$0] == z[$1] && $0 < $1) }
        }
        var probs = order.map { Double(exp1(z[$0] - dist.lse)) }
        // top-p over the top-k-renormalized distribution: keep the smallest prefix whose mass
        // reaches top_p (always at least one token).
        var total = probs.reduce(0, +)
        if params.topP < 1 {
            var cum = 0.0, keep = probs.count
            for (i, p) in probs.enumerated() {
                cum += p / total
                if cum >= Double(params.topP) { keep = i + 1; break }
            }
            order.removeSubrange(keep...)
            probs.removeSubrange(keep...)
            total = probs.reduce(0, +)
        }
        if params.minP > 0, let pmax = probs.first {
            let cut = Double(params.minP) * pmax
            let keep = max(1, probs.firstIndex(where: { $0 < cut }) ?? probs.count)
            order.removeSubrange(keep...)
            probs.removeSubrange(keep...)
            total = probs.reduce(0, +)
        }
        let target = u * total
        var cum = 0.0
        for (i, p) in probs.enumerated() {
            cum += p
            if cum > target { return Int32(order[i]) }
        }
        return Int32(order[order.count - 1])
    }
}
