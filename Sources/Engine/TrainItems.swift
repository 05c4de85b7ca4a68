// Train items from stored rollouts: a rollout id, its reward and group become a sequence with
// per-token advantages and, where they still apply, its sampling-time log-probabilities.
import Foundation

/// A rollout reference in a train_step: the id from `generate`, its reward, and its group
/// (default: the rollouts sharing its prompt tokens).
public struct RolloutReward: Sendable {
    public var rolloutId: String
    public var reward: Double
    public var group: String?
    public init(rolloutId: String, reward: Double, group: String? = nil) {
        self.rolloutId = rolloutId; self.reward = reward; self.group = group
    }
}

extension Trainer {
    /// Train items from stored rollouts: advantages by `estimator` over the groups; sampling-time
    /// old and proxy log-probabilities are reused when they were taken at `temperature` (and, for
    /// the proxy, with the same filter), else left to be recomputed. With `dropConstantGroups`,
    /// groups whose rewards are all equal are left out (they carry no signal); they would get
    /// zero advantage otherwise.
    public static func items(from rollouts: [RolloutReward], store: RolloutStore, estimator: AdvantageEstimator,
                             temperature: Float, proxy: ProxySpec?, dropConstantGroups: Bool = false,
                             adapter: String? = nil) throws -> [TrainItem] {
        var fetched: [Rollout] = []
        for (i, r) in rollouts.enumerated() {
            guard r.reward.isFinite else {
                throw TrainError.invalid(path: "rollouts[\(i)].reward", reason: "not a finite number")
            }
            do { fetched.append(try store.get(r.rolloutId)) } catch let e as RolloutError {
                throw TrainError.rollout(index: i, e)
            }
            // A rollout trains the policy it was sampled from: its old log-probabilities are that policy's.
            if fetched[i].adapter != adapter {
                let sampled = fetched[i].adapter.map { "adapter '\($0)'" } ?? "the base model"
                let trains = adapter.map { "adapter '\($0)'" } ?? "the base model"
                throw TrainError.invalid(path: "rollouts[\(i)].rollout_id",
                                         reason: "sampled under \(sampled) but this train_step trains \(trains); pass the same adapter to generate and train_step")
            }
        }
        let groups = zip(rollouts, fetched).map { r, f in
            r.group ?? "prompt:" + f.tokens[..<f.responseStart].map(String.init).joined(separator: ",")
        }
        let rewards = rollouts.map(\.reward)
        let advantages = Advantages.compute(estimator, rewards: rewards, groups: groups)
        let dropped = dropConstantGroups ? Advantages.constantGroups(rewards: rewards, groups: groups) : []
        var items: [TrainItem] = []
        for (i, f) in fetched.enumerated() where !dropped.contains(groups[i]) {
            let n = f.tokens.count - f.responseStart
            let sameTemperature = f.temperature == temperature || (f.temperature == 0 && temperature == 1)
            items.append(TrainItem(tokens: f.tokens, responseStart: f.responseStart,
                                   advantages: Array(repeating: Float(advantages[i]), count: n),
                                   oldLogprobs: sameTemperature ? f.logprobs : nil,
                                   proxyLogprobs: sameTemperature && proxy != nil && f.proxy == proxy ? f.proxyLogprobs : nil,
                                   samplerVersion: f.weightsVersion))
        }
        return items
    }
}
