// Advantage estimators from scalar rewards grouped by prompt (verl `core_algos.py` names):
//   grpo     A = (r − mean_g) / (std_g + 1e-6), std unbiased (n−1)
//   dr_grpo  A = r − mean_g (Dr. GRPO: no std normalization)
//   rloo     A = n/(n−1) · (r − mean_g) = r − mean of the other samples
// A group whose rewards are all equal gets A = 0 under every estimator (no signal); callers may
// drop such groups instead. A group of one is such a group: with no other sample there is no
// baseline, so its advantage is 0 under every estimator (verl's GRPO would instead pass the raw
// reward through, normalising by mean 0 and std 1). The Python client's estimators
// (clients/python/ember/advantages.py) follow the same rules; Tests/Fixtures/advantages.json
// holds cases both test suites check.

public enum AdvantageEstimator: String, Sendable, CaseIterable, Codable {
    case grpo
    case drGRPO = "dr_grpo"
    case rloo
}

public enum Advantages {
    /// One advantage per reward. `groups[i]` names the group of sample i (e.g. its prompt).
    public static func compute(_ estimator: AdvantageEstimator, rewards: [Double], groups: [String]) -> [Double] {
        precondition(rewards.count == groups.count)
        var members: [String: [Int]] = [:]
        var order: [String] = []
        for (i, g) in groups.enumerated() {
            if members[g] == nil { order.append(g) }
            members[g, default: []].append(i)
        }
        var out = [Double](repeating: 0, count: rewards.count)
        for g in order {
            let idx = members[g]!
            let n = Double(idx.count)
            let values = idx.map { rewards[$0] }
            if values.allSatisfy({ $0 == values[0] }) { continue }   // no signal (a group of one included)
            let mean = values.reduce(0, +) / n
            switch estimator {
            case .grpo:
                let std = (values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / (n - 1)).squareRoot()
                for i in idx { out[i] = (rewards[i] - mean) / (std + 1e-6) }
            case .drGRPO:
                for i in idx { out[i] = rewards[i] - mean }
            case .rloo:
                for i in idx { out[i] = n / (n - 1) * (rewards[i] - mean) }
            }
        }
        return out
    }

    /// Group names whose rewards are all equal (candidates for dropping).
    public static func constantGroups(rewards: [Double], groups: [String]) -> Set<String> {
        var first: [String: Double] = [:], varied = Set<String>()
        for (r, g) in zip(rewards, groups) {
            if let f = first[g] { if f != r { varied.insert(g) } } else { first[g] = r }
        }
        return Set(first.keys).subtracting(varied)
    }
}
