// train_step and optimizer.configure: parameters to a Trainer call, metrics to JSON. Loss options
// and their defaults live in one table (Engine's `LossDefaults`): the parser reads its defaults
// there and server.info reports it, so clients never keep their own copy.
import Engine
import Foundation
import Ranks

/// Reads one loss object's options against the table.
struct LossOptionReader {
    let params: Params
    let defaults: [String: LossDefault]

    func number(_ key: String, min: Float? = nil, max: Float? = nil) throws -> Float {
        if case let .number(x) = defaults[key] { return try params.float(key, Float(x), min: min, max: max) }
        return try params.float(key, min: min, max: max)
    }
    func optionalNumber(_ key: String, min: Float? = nil, max: Float? = nil) throws -> Float? {
        params.has(key) ? try params.float(key, min: min, max: max) : nil
    }
    func text(_ key: String, oneOf: [String]) throws -> String {
        guard case let .text(s) = defaults[key] else { return try params.string(key, oneOf: oneOf) }
        return try params.string(key, s, oneOf: oneOf)
    }
    func flag(_ key: String) throws -> Bool {
        guard case let .flag(b) = defaults[key] else { return try params.bool(key, false) }
        return try params.bool(key, b)
    }
    func clip() throws -> ClipOptions {
        ClipOptions(epsLow: try number("eps_low", min: 0), epsHigh: try number("eps_high", min: 0),
                    dualClip: try optionalNumber("dual_clip", min: 1))
    }
}

extension Dispatcher {
    func lossConfig(_ p: Params) throws -> LossConfig {
        guard let l = try p.object("loss") else { throw RPCError.invalidParams(path: "params.loss", "required (loss.mode)") }
        let mode = try l.string("mode", oneOf: LossDefaults.modeNames)
        let defaults = LossDefaults.options(mode)
        try l.only(Set(defaults.keys).union(["mode"]))
        let r = LossOptionReader(params: l, defaults: defaults)
        let lossMode: LossMode
        switch mode {
        case "ppo": lossMode = .ppo(try r.clip())
        case "gspo": lossMode = .gspo(try r.clip())
        case "cispo": lossMode = .cispo(try r.clip())
        case "high_entropy": lossMode = .highEntropy(fraction: try r.number("fraction", min: 0, max: 1), clip: try r.clip())
        case "clip_cov":
            var o = ClipCovOptions()
            o.clip = try r.clip()
            o.ratio = try r.number("ratio", min: 0, max: 1)
            o.covLow = try r.number("cov_low")
            o.covHigh = try r.number("cov_high")
            lossMode = .clipCov(o)
        case "kl_cov":
            var o = KLCovOptions()
            o.ratio = try r.number("ratio", min: 0, max: 1)
            o.coef = try r.number("coef")
            lossMode = .klCov(o)
        case "lp_reg":
            var o = LpRegOptions()
            o.clip = try r.clip()
            if let tau = try r.optionalNumber("threshold", min: 0, max: 1) { o.proxy = .threshold(tau) }
            else { o.proxy = .minP(try r.number("min_p", min: 0, max: 1)) }
            o.rho = try r.number("rho", min: 0, max: 1)
            o.rhoPos = try r.number("rho_pos", min: 0, max: 1)
            o.beta = try r.number("beta")
            o.kl = try r.text("kl", oneOf: ["k3", "full"]) == "full" ? .full : .k3
            o.selection = try r.text("selection", oneOf: ["batch", "micro_batch"]) == "batch" ? .batch : .microBatch
            o.percentileOver = try r.text("percentile_over", oneOf: ["negative", "all"]) == "all" ? .all : .negative
            o.skipWhenKAtMostOne = try r.flag("skip_k_le_1")
            lossMode = .lpReg(o)
        default: lossMode = .crossEntropy
        }
        var c = LossConfig(mode: lossMode)
        c.aggregation = Aggregation(rawValue: try r.text("agg", oneOf: Aggregation.allCases.map(\.rawValue)))!
        c.temperature = try r.number("temperature", min: 0)
        c.entropyCoef = try r.number("entropy_coef")
        c.klCoef = try r.number("kl_coef", min: 0)
        c.klType = ReferenceKL(rawValue: try r.text("kl_type", oneOf: ["k1", "k2", "k3"]))!
        return c
    }

    func adamW(_ o: Params, base: AdamWSettings) throws -> AdamWSettings {
        var s = base
        s.lr = try o.float("lr", base.lr, min: 0)
        if o.has("betas") {
            let b = try o.floats("betas")
            guard b.count == 2, b.allSatisfy({ $0 >= 0 && $0 < 1 }) else {
                throw RPCError.invalidParams(path: "\(o.path).betas", "expected [beta1, beta2], each in [0, 1)")
            }
            s.beta1 = b[0]; s.beta2 = b[1]
        }
        s.eps = try o.float("eps", base.eps, min: .leastNonzeroMagnitude)
        s.weightDecay = try o.float("weight_decay", base.weightDecay, min: 0)
        s.gradClip = try o.float("grad_clip", base.gradClip, min: 0)
        return s
    }

    func configure(_ p: Params) throws -> Any {
        try p.only(["lr", "betas", "eps", "weight_decay", "grad_clip", "schedule", "adapter"])
        let trainer = try trainer(for: p)
        let s = try adamW(p, base: trainer.optimizer.settings)
        var schedule: LRSchedule?
        if let sched = try p.object("schedule") {
            try sched.only(["type", "warmup_steps", "total_steps", "min_lr"])
            switch try sched.string("type", oneOf: ["constant", "linear_warmup", "cosine"]) {
            case "linear_warmup": schedule = .linearWarmup(warmupSteps: try sched.int("warmup_steps", min: 0))
            case "cosine": schedule = .cosine(warmupSteps: try sched.int("warmup_steps", 0, min: 0),
                                              totalSteps: try sched.int("total_steps", min: 1),
                                              minLR: try sched.float("min_lr", 0, min: 0))
            default: schedule = .constant
            }
        }
        trainer.configure(s, schedule: schedule)
        return ["lr": s.lr, "betas": [s.beta1, s.beta2], "eps": s.eps, "weight_decay": s.weightDecay, "grad_clip": s.gradClip]
    }

    func trainStep(_ p: Params) throws -> Any {
        try p.only(["batch", "rollouts", "advantage_estimator", "drop_constant_groups", "loss", "optimizer",
                    "mini_batches", "micro_batch_tokens", "dry_run", "adapter", "rollout_correction"])
        let trainer = try trainer(for: p)
        let config = try lossConfig(p)
        var proxy: ProxySpec?
        if case let .lpReg(o) = config.mode { proxy = o.proxy }
        var items: [TrainItem] = []
        if p.has("batch") {
            for b in try p.objects("batch") {
                try b.only(["tokens", "response_start", "advantage", "old_logprobs", "proxy_logprobs", "ref_logprobs", "loss_mask",
                            "weights_version"])
                let tokens = try b.tokens("tokens")
                let start = try b.int("response_start", min: 1)
                let n = max(0, tokens.count - start)
                let advantages: [Float]
                if b.object["advantage"] is [Any] { advantages = try b.floats("advantage") }
                else { advantages = Array(repeating: try b.float("advantage", config.mode == .crossEntropy ? 0 : nil), count: n) }
                items.append(TrainItem(tokens: tokens, responseStart: start, advantages: advantages,
                                       oldLogprobs: b.has("old_logprobs") ? try b.floats("old_logprobs") : nil,
                                       proxyLogprobs: b.has("proxy_logprobs") ? try b.floats("proxy_logprobs", null: -.infinity) : nil,
                                       refLogprobs: b.has("ref_logprobs") ? try b.floats("ref_logprobs") : nil,
                                       lossMask: b.has("loss_mask") ? try b.floats("loss_mask").enumerated().map { k, v in
                                           guard v == 0 || v == 1 else {
                                               throw RPCError.invalidParams(path: "\(b.path).loss_mask[\(k)]", "0 (context only) or 1 (trained)")
                                           }
                                           return v == 1
                                       } : nil,
                                       samplerVersion: b.has("weights_version") ? try b.int("weights_version", min: 0) : nil))
            }
        }
        if p.has("rollouts") {
            let refs = try p.objects("rollouts").map { r -> RolloutReward in
                try r.only(["rollout_id", "reward", "group"])
                return RolloutReward(rolloutId: try r.string("rollout_id"), reward: Double(try r.float("reward")),
                                     group: r.has("group") ? (r.object["group"] as? String ?? "\(r.object["group"]!)") : nil)
            }
            let estimator = AdvantageEstimator(rawValue: try p.string("advantage_estimator", "grpo", oneOf: AdvantageEstimator.allCases.map(\.rawValue)))!
            items += try Trainer.items(from: refs, store: rollouts, estimator: estimator, temperature: config.temperature,
                                       proxy: proxy, dropConstantGroups: try p.bool("drop_constant_groups", false),
                                       adapter: trainer.adapter?.name)
        }
        guard !items.isEmpty else { throw RPCError.invalidParams(path: "params.batch", "give batch items or rollouts") }
        try limit(items.reduce(0) { $0 + $1.tokens.count }, p.has("batch") ? "params.batch" : "params.rollouts")
        let override = try p.object("optimizer").map { o in
            try o.only(["lr", "betas", "eps", "weight_decay", "grad_clip"])
            return try adamW(o, base: trainer.optimizer.settings)
        }
        var correction = RolloutCorrection.none
        if let c = try p.object("rollout_correction") {
            try c.only(["mode", "level", "cap"])
            correction = RolloutCorrection(
                mode: RolloutCorrection.Mode(rawValue: try c.string("mode", oneOf: RolloutCorrection.Mode.allCases.map(\.rawValue)))!,
                level: RolloutCorrection.Level(rawValue: try c.string("level", "token", oneOf: RolloutCorrection.Level.allCases.map(\.rawValue)))!,
                cap: try c.float("cap", RolloutCorrection.defaultCap, min: 1))
        }
        if let world = configuration.ranks, trainer.group != nil, let reason = world.failure { throw Self.degraded(reason) }
        let command = try trainer.command(items: items, config: config, miniBatches: try p.int("mini_batches", 1, min: 1),
                                          microBatchTokens: p.has("micro_batch_tokens") ? try p.int("micro_batch_tokens", min: 1) : nil,
                                          optimizer: override, dryRun: try p.bool("dry_run", false), correction: correction)
        // A data-parallel trainer's ranks train the base weights together; an adapter trains here alone.
        if let world = configuration.ranks, trainer.group != nil { try RankCommands.sendTrain(world, command) }
        let m: TrainMetrics
        do {
            m = try trainer.run(command)
        } catch let e where configuration.ranks != nil && trainer.group != nil && !(e is NonFiniteError || e is TrainError || e is RankFailure) {
            // Every rank refuses NonFinite and TrainError together; anything else left the
            // ranks at different points of the step, and only a restart brings them together.
            throw configuration.ranks!.fail("rank 0 failed inside a step: \(e)")
        }
        var metrics: [String: Any] = [
            "loss": m.loss, "pg_loss": m.pgLoss, "entropy": m.entropy, "clipfrac_low": m.clipFracLow,
            "clipfrac_high": m.clipFracHigh, "ppo_kl": m.ppoKL, "kl_ref": m.refKL, "grad_norm": m.gradNorm, "lr": m.lr,
            "tokens": m.tokens, "lp_reg_selected": m.lpRegSelected, "lp_reg_regularized": m.lpRegRegularized,
            "logprob_max_abs_diff": m.logprobMaxAbsDiff, "optimizer_steps": m.optimizerSteps,
            "seconds_forward": m.secondsForward, "seconds_backward": m.secondsBackward, "seconds_optimizer": m.secondsOptimizer,
        ]
        if let t = m.lpRegThreshold { metrics["lp_reg_threshold"] = t }
        if let r = m.rolloutIS {
            metrics["rollout_is_mean"] = r.mean; metrics["rollout_is_min"] = r.min; metrics["rollout_is_max"] = r.max
            metrics["rollout_corrected_fraction"] = r.corrected
        }
        if !m.staleness.isEmpty {
            metrics["staleness"] = Dictionary(uniqueKeysWithValues: m.staleness.map { (String($0.key), $0.value) })
        }
        metrics["proxy_noise_mass"] = m.proxyNoiseMass
        if m.lowProbabilityTokens > 0 {
            metrics["low_prob_proxy_kept"] = Double(m.lowProbabilityProxyKept) / Double(m.lowProbabilityTokens)
        }
        if case .lpReg = config.mode {
            metrics["lp_reg_tokens"] = Dictionary(uniqueKeysWithValues: m.lpRegTokens.map { (String($0.key), $0.value) })
            metrics["lp_reg_probability_buckets"] = m.lpRegProbabilityBuckets
        }
        return ["weights_version": trainer.weightsVersion, "metrics": metrics]
    }
}
