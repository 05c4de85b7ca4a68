// Rollout correction for off-policy samples (verl's rollout correction, TRL's vLLM importance
// sampling): a sequence sampled under the weights of an earlier version, or by a replica, carries
// the sampler's log-probabilities μ. The trainer recomputes π_old (its weights before the step),
// which becomes the proximal policy of the clipped ratio π/π_old, and weighs each policy term
// by w = π_old/μ:
//   truncate: w ← min(w, cap) (truncated importance sampling);
//   mask:     tokens (or whole sequences) with w outside [1/cap, cap] leave the loss, as a
//             loss_mask would take them out (rejection sampling);
// per token, or per sequence with w = Π_t w_t over its trained tokens.
import Foundation

public struct RolloutCorrection: Sendable, Equatable, Codable {
    public enum Mode: String, Sendable, CaseIterable, Codable { case none, truncate, mask }
    public enum Level: String, Sendable, CaseIterable, Codable { case token, sequence }
    public var mode: Mode
    public var level: Level
    public var cap: Float
    public static let defaultCap: Float = 2
    public static let none = RolloutCorrection(mode: .none, level: .token, cap: defaultCap)
    public init(mode: Mode, level: Level, cap: Float) { self.mode = mode; self.level = level; self.cap = cap }

    /// Sets each item's `correction` (and, for mask, its loss mask) from the sampler's
    /// log-probabilities in `oldLogprobs`, then replaces those with `proximal`. Returns the
    /// ratios' mean, min and max before truncation (over trained tokens, or sequences) and the
    /// share corrected.
    func apply(to items: inout [TrainItem], proximal: [[Float]]) -> (mean: Double, min: Double, max: Double, corrected: Double) {
        var sum = 0.0, lo = Double.infinity, hi = -Double.infinity, count = 0, corrected = 0
        func note(_ w: Float, _ changed: Bool) {
            sum += Double(w); lo = Swift.min(lo, Double(w)); hi = Swift.max(hi, Double(w)); count += 1
            if changed { corrected += 1 }
        }
        for i in items.indices {
            let sampler = items[i].oldLogprobs!, prox = proximal[i], n = items[i].responseLength
            let trained = items[i].lossMask ?? Array(repeating: true, count: n)
            var weights = [Float](repeating: 1, count: n)
            var mask = trained
            switch level {
            case .token:
                for t in 0..<n where trained[t] {
                    let w = expf(prox[t] - sampler[t])
                    switch mode {
                    case .truncate: weights[t] = Swift.min(w, cap); note(w, w > cap)
                    case .mask:
                        let out = w > cap || w < 1 / cap
                        if out { mask[t] = false }
                        note(w, out)
                    case .none: break
                    }
                }
            case .sequence:
                var logw: Float = 0
                for t in 0..<n where trained[t] { logw += prox[t] - sampler[t] }
                guard trained.contains(true) else { break }
                let w = expf(logw)
                switch mode {
                case .truncate:
                    weights = Array(repeating: Swift.min(w, cap), count: n); note(w, w > cap)
                case .mask:
                    let out = w > cap || w < 1 / cap
                    if out { mask = Array(repeating: false, count: n) }
                    note(w, out)
                case .none: break
                }
            }
            items[i].correction = weights
            if mode == .mask { items[i].lossMask = mask }
            items[i].oldLogprobs = prox
        }
        guard count > 0 else { return (1, 1, 1, 0) }
        return (sum / Double(count), lo, hi, Double(corrected) / Double(count))
    }
}
