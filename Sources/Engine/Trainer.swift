// train_step: a policy update over a batch of sequences. Missing old, proxy and reference
// log-probabilities are computed first (from the weights before the update and the frozen
// reference); the batch is then split into mini-batches (one optimizer step each, off-policy
// after the first) and micro-batches by token budget (gradient accumulation giving the same
// update as one big batch: the loss is planned over the whole mini-batch, so selection and
// aggregation weights do not depend on the split). `weightsVersion` rises by one per step.
import Foundation
import Kernels
import Models
import Weights

/// One sequence to train on (positions as in the protocol: per-token arrays start at
/// `responseStart`).
public struct TrainItem: Sendable, Codable {
    public var tokens: [Int32]
    public var responseStart: Int
    /// One advantage per response token (a sequence-level advantage repeated).
    public var advantages: [Float]
    public var oldLogprobs: [Float]?
    public var proxyLogprobs: [Float]?
    public var refLogprobs: [Float]?
    /// Which response tokens the loss trains (nil: all). A masked token is context only: no
    /// policy, entropy or KL term, and it counts in no aggregation or selection (tool results
    /// and user turns of a multi-turn rollout).
    public var lossMask: [Bool]?
    /// The weights version the sequence was sampled under (a replica's), for staleness metrics.
    public var samplerVersion: Int?
    /// Rollout correction: the importance weight of each response token's policy term (set by
    /// the trainer from `RolloutCorrection`, never by callers).
    var correction: [Float]?

    public init(tokens: [Int32], responseStart: Int, advantages: [Float], oldLogprobs: [Float]? = nil,
                proxyLogprobs: [Float]? = nil, refLogprobs: [Float]? = nil, lossMask: [Bool]? = nil, samplerVersion: Int? = nil) {
        self.tokens = tokens; self.responseStart = responseStart; self.advantages = advantages
        self.oldLogprobs = oldLogprobs; self.proxyLogprobs = proxyLogprobs; self.refLogprobs = refLogprobs
        self.lossMask = lossMask; self.samplerVersion = samplerVersion
    }

    public var responseLength: Int { tokens.count - responseStart }
    /// Response tokens the loss trains.
    public var trainedLength: Int { lossMask.map { $0.lazy.filter { $0 }.count } ?? responseLength }

    /// The per-token arrays cut to the trained tokens (the mask kept for the rows).
    func masked() -> TrainItem {
        guard let m = lossMask else { return self }
        func keep(_ a: [Float]?) -> [Float]? { a.map { zip($0, m).filter { $0.1 }.map { $0.0 } } }
        var out = TrainItem(tokens: tokens, responseStart: responseStart, advantages: keep(advantages)!, oldLogprobs: keep(oldLogprobs),
                            proxyLogprobs: keep(proxyLogprobs), refLogprobs: keep(refLogprobs), lossMask: m, samplerVersion: samplerVersion)
        out.correction = keep(correction)
        return out
    }

    /// Response token offsets the loss trains.
    var trainedOffsets: [Int] { lossMask.map { m in m.indices.filter { m[$0] } } ?? Array(0..<responseLength) }
}

/// Learning-rate schedule over optimizer steps.
public enum LRSchedule: Sendable, Equatable, Codable {
    case constant
    /// Linear ramp from 0 over `warmupSteps`, then constant.
    case linearWarmup(warmupSteps: Int)
    /// Linear warm-up, then cosine decay to `minLR` at `totalSteps`.
    case cosine(warmupSteps: Int, totalSteps: Int, minLR: Float)

    /// Learning rate for optimizer step `step` (1-based) with base rate `lr`.
    public func rate(_ lr: Float, step: Int) -> Float {
        switch self {
        case .constant: return lr
        case let .linearWarmup(w):
            return w > 0 && step <= w ? lr * Float(step) / Float(w) : lr
        case let .cosine(w, total, minLR):
            if w > 0 && step <= w { return lr * Float(step) / Float(w) }
            let progress = min(1, Float(step - w) / Float(max(1, total - w)))
            return minLR + (lr - minLR) * 0.5 * (1 + cosf(Float.pi * progress))
        }
    }
}

/// Metrics of one train_step call (means over response tokens of the whole batch unless noted).
public struct TrainMetrics: Sendable {
    public var loss = 0.0
    public var pgLoss = 0.0
    public var entropy = 0.0
    public var clipFracLow = 0.0
    public var clipFracHigh = 0.0
    public var ppoKL = 0.0
    public var refKL = 0.0
    public var gradNorm = 0.0
    public var lr: Float = 0
    public var tokens = 0
    public var lpRegSelected = 0
    public var lpRegRegularized = 0
    /// Probability of the highest-probability token in Lp-Reg's candidate set (the cutoff).
    public var lpRegThreshold: Double?
    /// Which tokens Lp-Reg regularised: token id -> count.
    public var lpRegTokens: [Int32: Int] = [:]
    /// The same tokens by their current probability: counts in [0, 1e-4), [1e-4, 1e-3),
    /// [1e-3, 1e-2), [1e-2, 1e-1), [1e-1, 1].
    public var lpRegProbabilityBuckets = [0, 0, 0, 0, 0]
    /// Mean over response tokens of the probability mass the proxy drops as noise (Lp-Reg's
    /// proxy, or the default min-p proxy under other losses).
    public var proxyNoiseMass = 0.0
    /// The lowest-probability `rho` share of negative-advantage tokens (at least one; Lp-Reg's
    /// rho, else its default), and how many of them the proxy keeps.
    public var lowProbabilityTokens = 0
    public var lowProbabilityProxyKept = 0
    /// Upper edges of `lpRegProbabilityBuckets` but the last.
    public static let probabilityBucketEdges: [Float] = [1e-4, 1e-3, 1e-2, 1e-1]
    /// max |provided old log-prob − recomputed log-prob| (sampler/trainer agreement).
    public var logprobMaxAbsDiff = 0.0
    /// Rollout correction: the importance ratios π_old/π_sampler over trained tokens (token
    /// level) or sequences (sequence level) before truncation, and the share truncated or masked.
    public var rolloutIS: (mean: Double, min: Double, max: Double, corrected: Double)?
    /// Sequences by staleness (the trainer's version minus the sampler's), for items that name
    /// the version they were sampled under.
    public var staleness: [Int: Int] = [:]
    public var optimizerSteps = 0
    public var secondsForward = 0.0
    public var secondsBackward = 0.0
    public var secondsOptimizer = 0.0
    public init() {}
}

public enum TrainError: Error, CustomStringConvertible, Equatable {
    case invalid(path: String, reason: String)
    /// `rollouts[index]` could not be fetched from the rollout store.
    case rollout(index: Int, RolloutError)
    public var description: String {
        switch self {
        case let .invalid(p, r): "\(p): \(r)"
        case let .rollout(i, e): "rollouts[\(i)].rollout_id: \(e)"
        }
    }
}

/// Not Sendable: one thread drives it (the server's compute thread).
public final class Trainer {
    public let model: TransformerModel
    /// The LoRA adapter this trainer updates (the base stays frozen); nil trains every weight.
    public let adapter: LoRAAdapter?
    public let optimizer: AdamW
    public private(set) var schedule: LRSchedule = .constant
    /// +1 per optimizer step; 0 when the model was loaded.
    public internal(set) var weightsVersion = 0

    /// A replica's trainer takes the version of the weights it was sent (it never steps itself).
    public func adopt(weightsVersion version: Int) { weightsVersion = version }
    /// Frozen copy of the weights for the KL-to-reference term (`snapshotReference`).
    public private(set) var reference: TransformerModel?
    /// Adapter training: the frozen copy is of the adapter (the base never changes under it).
    public private(set) var referenceAdapter: LoRAAdapter?
    /// The last mini-batch's per-token choice (Lp-Reg: regularized tokens), in response-token order.
    public private(set) var lastSelection: [Bool] = []
    /// The ranks of a data-parallel trainer (nil: this process alone, the default).
    public var group: RankGroup?
    /// With a rank group and no `micro_batch_tokens`: the micro-batches (summation leaves) a
    /// mini-batch is cut into, whatever the number of ranks.
    public var dataParallelMicroBatches = 8
    private var pool: GradientPool?

    public init(model: TransformerModel, adapter: LoRAAdapter? = nil, optimizer: AdamW = AdamW()) {
        self.model = model
        self.adapter = adapter
        self.optimizer = optimizer
    }

    /// The weights this trainer updates: the adapter's, or the model's.
    public var trainable: ParameterStore { adapter?.parameters ?? model.parameters }

    /// Each sequence's adapter for scoring (nil when training the full model).
    private func adapterList(_ count: Int, _ a: LoRAAdapter?) -> [LoRAAdapter?]? {
        a.map { Array(repeating: $0, count: count) }
    }

    /// Freezes the current weights as the reference policy.
    public func snapshotReference() throws {
        if let adapter {
            referenceAdapter = try adapter.copy(model: model)
            return
        }
        let copy = try TransformerModel(config: model.configJSON)
        copy.parameters.values.update(from: model.parameters.values, count: model.parameters.count)
        copy.parameters.markModified()
        reference = copy
    }

    /// Sets the optimizer's settings and, when given, the learning-rate schedule (`optimizer.configure`).
    public func configure(_ settings: AdamWSettings, schedule: LRSchedule? = nil) {
        optimizer.settings = settings
        if let schedule { self.schedule = schedule }
    }

    /// Runs one train_step. Throws before changing anything on invalid input; a non-finite loss or
    /// gradient refuses that optimizer step (earlier mini-batches of the same call stay applied).
    /// `optimizer`, when given, applies to this call only (`optimizer.configure` changes
    /// `self.optimizer.settings` for good).
    public func step(items: [TrainItem], config: LossConfig, miniBatches: Int = 1, microBatchTokens: Int? = nil,
                     proxy: ProxySpec? = nil, optimizer override: AdamWSettings? = nil,
                     dryRun: Bool = false, correction: RolloutCorrection = .none) throws -> TrainMetrics {
        try run(command(items: items, config: config, miniBatches: miniBatches, microBatchTokens: microBatchTokens,
                        proxy: proxy, optimizer: override, dryRun: dryRun, correction: correction))
    }

    /// Checks a train_step call and packs it as the command every rank of a data-parallel
    /// trainer runs (`run`). Changes nothing; throws on invalid input before any rank starts.
    public func command(items: [TrainItem], config: LossConfig, miniBatches: Int = 1, microBatchTokens: Int? = nil,
                        proxy: ProxySpec? = nil, optimizer override: AdamWSettings? = nil,
                        dryRun: Bool = false, correction: RolloutCorrection = .none) throws -> TrainCommand {
        try validate(items, config: config, miniBatches: miniBatches)
        if correction.mode != .none, let i = items.firstIndex(where: { $0.oldLogprobs == nil }) {
            throw TrainError.invalid(path: "batch[\(i)].old_logprobs",
                                     reason: "rollout_correction needs the sampler's log-probabilities of every item")
        }
        if let o = override {
            guard o.lr >= 0, o.lr.isFinite, o.beta1 >= 0, o.beta1 < 1, o.beta2 >= 0, o.beta2 < 1, o.eps > 0,
                  o.weightDecay >= 0, o.gradClip >= 0 else {
                throw TrainError.invalid(path: "optimizer", reason: "lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0, grad_clip >= 0")
            }
        }
        if config.klCoef != 0 && items.contains(where: { $0.refLogprobs == nil }) && referencePolicy == nil {
            throw TrainError.invalid(path: "loss.kl_coef", reason: "no reference policy: call reference.snapshot first or send ref_logprobs")
        }
        return TrainCommand(items: items, config: config, miniBatches: miniBatches, microBatchTokens: microBatchTokens, dryRun: dryRun,
                            settings: override ?? optimizer.settings, schedule: schedule, weightsVersion: weightsVersion,
                            optimizerSteps: optimizer.stepCount, proxy: proxy, correction: correction)
    }

    /// The reference policy the KL term scores against: a frozen model, or for an adapter the
    /// base with a frozen adapter.
    private var referencePolicy: TransformerModel? { adapter == nil ? reference : (referenceAdapter == nil ? nil : model) }

    /// Runs a checked command: fills in what the batch leaves out, then the mini-batches. Every
    /// rank of a data-parallel trainer runs it on the same command and takes the same steps.
    /// (The other ranks check first that they are at the command's version: `RankCommands`.)
    public func run(_ c: TrainCommand) throws -> TrainMetrics {
        let (items, metrics) = try prepare(c)
        return try train(c, items: items, metrics: metrics)
    }

    /// Scores sequences under `model`; with a rank group each rank scores its share and the
    /// ranks gather the results (a sequence's scores do not depend on its batch mates).
    private func score(_ model: TransformerModel, _ sequences: [ScoredSequence], temperature: Float,
                       options: GenerationOptions = GenerationOptions(), adapters: [LoRAAdapter?]?) throws -> [(logprobs: [Float], proxy: [Float]?)] {
        guard let g = group, g.size > 1 else {
            return try Scoring.score(model: model, sequences: sequences, temperature: temperature, options: options, adapters: adapters)
                .map { ($0.logprobs, $0.proxyLogprobs) }
        }
        let shares = evenParts(sequences.count, g.size)
        let mine = shares[g.rank]
        var w = ByteWriter()
        if !mine.isEmpty {
            let scored = try Scoring.score(model: model, sequences: Array(sequences[mine]), temperature: temperature, options: options,
                                           adapters: adapters.map { Array($0[mine]) })
            for r in scored {
                w.floats(r.logprobs)
                w.byte(r.proxyLogprobs == nil ? 0 : 1)
                if let p = r.proxyLogprobs { w.floats(p) }
            }
        }
        var out: [(logprobs: [Float], proxy: [Float]?)] = []
        for (r, bytes) in try g.allGather(w.bytes).enumerated() {
            var reader = ByteReader(bytes)
            for _ in shares[r] {
                let lp = try reader.floats()
                out.append((lp, try reader.byte() == 1 ? try reader.floats() : nil))
            }
        }
        return out
    }

    /// Fills in what the batch leaves out (old, proxy and reference log-probabilities, the
    /// rollout correction's weights) from the weights before any update.
    private func prepare(_ c: TrainCommand) throws -> ([TrainItem], TrainMetrics) {
        var items = c.items
        let config = c.config, correction = c.correction
        var metrics = TrainMetrics()
        let t0 = Date()
        let sequences = items.map { ScoredSequence(tokens: $0.tokens, responseStart: $0.responseStart) }
        let needOld = items.contains { $0.oldLogprobs == nil }
        let proxySpec: ProxySpec? = { if case let .lpReg(o) = config.mode { return c.proxy ?? o.proxy }; return nil }()
        let needProxy = proxySpec != nil && items.contains { $0.proxyLogprobs == nil }
        if needOld || needProxy {
            var opts = GenerationOptions()
            opts.proxy = proxySpec
            let scored = try score(model, sequences, temperature: config.temperature, options: opts, adapters: adapterList(items.count, adapter))
            for i in items.indices {
                if items[i].oldLogprobs == nil { items[i].oldLogprobs = scored[i].logprobs }
                if needProxy && items[i].proxyLogprobs == nil { items[i].proxyLogprobs = scored[i].proxy }
            }
        }
        if config.klCoef != 0 && items.contains(where: { $0.refLogprobs == nil }) {
            guard let ref = referencePolicy else {
                throw TrainError.invalid(path: "loss.kl_coef", reason: "no reference policy: call reference.snapshot first or send ref_logprobs")
            }
            let scored = try score(ref, sequences, temperature: config.temperature, adapters: adapterList(items.count, referenceAdapter))
            for i in items.indices where items[i].refLogprobs == nil { items[i].refLogprobs = scored[i].logprobs }
        }
        if correction.mode != .none {
            // π_old is the trainer's policy now (the proximal policy of the clipped ratio); the
            // sampler's log-probabilities become importance weights (verl's rollout correction).
            let scored = try score(model, sequences, temperature: config.temperature, adapters: adapterList(items.count, adapter))
            metrics.rolloutIS = correction.apply(to: &items, proximal: scored.map(\.logprobs))
        }
        for item in items {
            if let v = item.samplerVersion { metrics.staleness[weightsVersion - v, default: 0] += 1 }
        }
        metrics.secondsForward += Date().timeIntervalSince(t0)
        guard items.contains(where: { $0.trainedLength > 0 }) else {
            throw TrainError.invalid(path: "rollout_correction", reason: "every token was masked by the correction (raise cap)")
        }
        // From here on each item's per-token arrays hold its trained tokens only.
        return (items.map { $0.masked() }, metrics)
    }

    /// The mini-batches' gradients and optimizer steps over prepared items.
    private func train(_ c: TrainCommand, items: [TrainItem], metrics start: TrainMetrics) throws -> TrainMetrics {
        let saved = optimizer.settings
        optimizer.settings = c.settings
        defer { optimizer.settings = saved }
        schedule = c.schedule
        var metrics = start
        let config = c.config
        let groups = Self.split(items.count, into: c.miniBatches)
        var totalTokens = 0
        for (m, range) in groups.enumerated() {
            let mini = Array(items[range])
            let (result, seconds) = try accumulate(mini, config: config, microBatchTokens: c.microBatchTokens)
            metrics.secondsForward += seconds.forward
            metrics.secondsBackward += seconds.backward
            let n = mini.reduce(0) { $0 + $1.trainedLength }
            totalTokens += n
            accumulateMetrics(&metrics, result, items: mini, config: config, tokens: n, first: m == 0)
            let t1 = Date()
            let norm = AdamW.gradientNorm(trainable)
            guard norm.isFinite else { throw NonFiniteError(what: "the gradient norm") }
            metrics.gradNorm = norm
            let lr = schedule.rate(optimizer.settings.lr, step: optimizer.stepCount + 1)
            metrics.lr = lr
            if !c.dryRun {
                // Every rank has the whole gradient; none steps before all have it.
                try group?.barrier()
                try optimizer.step(trainable, lr: lr, gradientNorm: norm)
                weightsVersion += 1
                metrics.optimizerSteps += 1
            }
            metrics.secondsOptimizer += Date().timeIntervalSince(t1)
        }
        for key in [\TrainMetrics.loss, \.pgLoss, \.entropy, \.clipFracLow, \.clipFracHigh, \.ppoKL, \.refKL, \.proxyNoiseMass] {
            metrics[keyPath: key] /= Double(max(1, totalTokens))
        }
        metrics.tokens = totalTokens
        return metrics
    }

    // MARK: - Internals

    private struct MiniBatchResult {
        var loss = 0.0
        var plan: PolicyLossPlan
        var logprobs: [Float]
        var entropies: [Float]
        /// Per token: whether the proxy keeps it, and the mass the proxy drops at its position.
        var proxyKeeps: [Bool]
        var proxyNoiseMass: [Float]
    }

    /// Plans the loss over the whole mini-batch, then accumulates gradients micro-batch by micro-batch.
    /// With a rank group, each rank runs its run of micro-batches (the leaves of `LeafTree`) and
    /// the ranks exchange per-token values after pass 1 and gradients after pass 2.
    private func accumulate(_ items: [TrainItem], config: LossConfig,
                            microBatchTokens: Int?) throws -> (MiniBatchResult, (forward: Double, backward: Double)) {
        let V = model.architecture.vocabSize
        let micro: [[Int]]
        if group != nil && microBatchTokens == nil {
            micro = Self.split(items.count, into: min(dataParallelMicroBatches, items.count)).map { Array($0) }
        } else {
            micro = Self.microBatches(items, tokenBudget: microBatchTokens)
        }
        let tree = LeafTree(leaves: micro.count)
        let blocks = tree.blocks(ranks: group?.size ?? 1)
        let mine = group.map { blocks[$0.rank] } ?? 0..<micro.count
        // Pass 1's activations serve pass 2 when this rank has one micro-batch, and on a rank
        // group when the caller set no token budget (the ranks' own cut of the mini-batch holds
        // no more activations at once than one process keeps for the whole mini-batch).
        let keep = mine.count == 1 || (group != nil && microBatchTokens == nil)
        let tf = Date()
        // Pass 1: every token's current log-probability and entropy. With one micro-batch the
        // body runs once (activations kept for pass 2); otherwise each micro-batch runs twice.
        var current: [Float] = [], entropies: [Float] = [], proxyKeeps: [Bool] = [], noiseMass: [Float] = []
        // The proxy the analyses use: the loss's own for lp_reg, the default min-p otherwise.
        var analysisProxy = ProxySpec.minP(LossDefaults.number("lp_reg", "min_p"))
        if case let .lpReg(o) = config.mode { analysisProxy = o.proxy }
        var kept: [Int: Activations] = [:]
        for (j, group) in zip(mine, micro[mine]) {
            let batch = PackedBatch(group.map { items[$0].tokens })
            let (rows, targets) = Self.trainedRows(batch, group.map { items[$0] })
            let acts = try model.forward(tokens: batch.tokens, positions: batch.positions,
                                         context: .packed(sequenceStarts: batch.sequenceStarts), saving: keep,
                                         adapters: adapter.map { AdapterRows($0, tokens: batch.tokens.count) })
            if keep { kept[j] = acts }
            model.withLogitChunks(hidden: acts.hidden.pointer, rows: rows, chunkRows: model.defaultChunkRows()) { range, logits in
                for (i, r) in range.enumerated() {
                    let dist = RowDistribution(scaling: logits + i * V, count: V, temperature: config.temperature)
                    current.append(dist.logprob(Int(targets[r])))
                    entropies.append(dist.entropy())
                    let filter = dist.proxyFilter(Int(targets[r]), analysisProxy)
                    proxyKeeps.append(filter.keeps)
                    noiseMass.append(filter.noiseMass)
                }
            }
        }
        if let g = group {
            // Every rank plans the loss over the whole mini-batch: gather the per-token values
            // (ranks hold consecutive micro-batches, so rank order is token order).
            var w = ByteWriter()
            w.floats(current); w.floats(entropies); w.floats(noiseMass); w.bools(proxyKeeps)
            current = []; entropies = []; noiseMass = []; proxyKeeps = []
            for bytes in try g.allGather(w.bytes) {
                var r = ByteReader(bytes)
                current += try r.floats(); entropies += try r.floats(); noiseMass += try r.floats(); proxyKeeps += try r.bools()
            }
        }
        var sequence: [Int] = [], targets: [Int32] = []
        for (b, item) in items.enumerated() {
            sequence += Array(repeating: b, count: item.trainedLength)
            targets += item.trainedOffsets.map { item.tokens[item.responseStart + $0] }
        }
        let tokens = PolicyTokens(sequence: sequence, targets: targets, advantages: items.flatMap { $0.advantages },
                                  oldLogprobs: items.flatMap { $0.oldLogprobs! },
                                  proxyLogprobs: items.flatMap { $0.proxyLogprobs ?? Array(repeating: -.infinity, count: $0.trainedLength) },
                                  refLogprobs: config.klCoef != 0 ? items.flatMap { $0.refLogprobs! } : nil,
                                  correction: items.contains { $0.correction != nil }
                                      ? items.flatMap { $0.correction ?? Array(repeating: 1, count: $0.trainedLength) } : nil)
        let starts = items.reduce(into: [0]) { $0.append($0.last! + $1.trainedLength) }
        var forced: [Bool]?
        if case let .lpReg(o) = config.mode, o.selection == .microBatch, micro.count > 1 {
            // The reference code's semantics: each micro-batch selects among its own tokens.
            var selected: [Bool] = []
            for group in micro {
                let r = starts[group.first!]..<starts[group.last! + 1]
                let sub = PolicyTokens(sequence: Array(tokens.sequence[r]), targets: Array(tokens.targets[r]),
                                       advantages: Array(tokens.advantages[r]), oldLogprobs: Array(tokens.oldLogprobs[r]),
                                       proxyLogprobs: Array(tokens.proxyLogprobs[r]))
                selected += PolicyLossPlan(config: config, tokens: sub, logprobs: Array(current[r])).selected
            }
            forced = selected
        }
        let plan = PolicyLossPlan(config: config, tokens: tokens, logprobs: current, entropies: entropies,
                                  lpRegSelection: forced)
        lastSelection = plan.selected
        var seconds = (forward: Date().timeIntervalSince(tf), backward: 0.0)

        /// One micro-batch's loss, its gradient accumulated into the trainable gradients.
        func backward(_ j: Int, zero: Bool) throws -> Double {
            let group = micro[j]
            let tb = Date()
            defer { seconds.backward += Date().timeIntervalSince(tb) }
            let batch = PackedBatch(group.map { items[$0].tokens })
            let (rows, _) = Self.trainedRows(batch, group.map { items[$0] })
            let base = starts[group[0]]   // first token of the micro-batch in plan order
            return try Training.accumulateGradients(model: model, batch: batch, outputRows: rows, zeroGradients: zero,
                                                    activations: kept.removeValue(forKey: j), adapter: adapter) { chunk in
                var sum = 0.0
                for i in 0..<chunk.rows.count {
                    sum += plan.apply(row: chunk.logits + i * V, vocab: V, token: base + chunk.rows.lowerBound + i)
                }
                return sum
            }.loss
        }
        var loss = 0.0
        if let g = group {
            loss = try accumulateParallel(g, micro: micro, tree: tree, blocks: blocks) { try backward($0, zero: true) }
        } else {
            // Pass 2: gradients, micro-batch by micro-batch, through the gradient-accumulation path
            // the golden gradient tests check.
            trainable.zeroGradients()
            for j in micro.indices { loss += try backward(j, zero: false) }
        }
        return (MiniBatchResult(loss: loss, plan: plan, logprobs: current, entropies: entropies, proxyKeeps: proxyKeeps,
                                proxyNoiseMass: noiseMass), seconds)
    }

    /// Pass 2 on a rank group: this rank's leaves one by one (each from zero), summed over the
    /// tree's largest subtrees inside its run; then every rank's status and leaf losses; then
    /// the exchange that leaves the root in the trainable gradients on every rank. Returns the
    /// mini-batch loss (the leaves' losses summed in leaf order).
    private func accumulateParallel(_ g: RankGroup, micro: [[Int]], tree: LeafTree, blocks: [Range<Int>],
                                    backward: (Int) throws -> Double) throws -> Double {
        let n = trainable.count
        if pool?.count != n { pool = GradientPool(count: n) }
        let pool = pool!
        let mine = blocks[g.rank]
        var leafLoss = [Double](repeating: 0, count: micro.count)
        var values: [UnsafeMutablePointer<Float>] = []
        var failure: Error?
        do {
            for node in tree.nodes(covering: mine) {
                let v = try tree.evaluate(node, leaf: { j in
                    leafLoss[j] = try backward(j)
                    let buffer = pool.take()
                    buffer.update(from: trainable.gradients, count: n)
                    return buffer
                }, add: { a, b in
                    addInPlace(a, b, count: n)
                    pool.give(b)
                    return a
                })
                values.append(v!)
            }
        } catch { failure = error }
        // Status and losses from every rank: a rank that failed makes every rank refuse the step.
        var w = ByteWriter()
        switch failure {
        case nil: w.byte(0)
        case let e as NonFiniteError: w.byte(1); w.text(e.what)
        case let e?: w.byte(2); w.text("\(e)")
        }
        w.doubles(Array(leafLoss[mine]))
        let statuses: [[UInt8]]
        do { statuses = try g.allGather(w.bytes) } catch { throw error }   // the group is unusable; buffers stay with it
        var problem: Error?
        for (r, bytes) in statuses.enumerated() {
            var reader = ByteReader(bytes)
            let kind = try reader.byte()
            if kind != 0 {
                let what = try reader.text()
                if problem == nil {
                    problem = kind == 1 ? NonFiniteError(what: what) : TrainError.invalid(path: "batch", reason: "rank \(r): \(what)")
                }
                continue
            }
            let losses = try reader.doubles()
            for (k, j) in blocks[r].enumerated() where k < losses.count { leafLoss[j] = losses[k] }
        }
        if let problem {
            values.forEach(pool.give)
            throw problem
        }
        try g.reduce(tree: tree, blocks: blocks, local: values, count: n, into: trainable.gradients)
        values.forEach(pool.give)
        return leafLoss.reduce(0, +)
    }

    private func accumulateMetrics(_ m: inout TrainMetrics, _ r: MiniBatchResult, items: [TrainItem],
                                   config: LossConfig, tokens n: Int, first: Bool) {
        let plan = r.plan, t = plan.tokens
        m.loss += r.loss * Double(n)   // averaged over the call's tokens at the end
        for i in 0..<t.count {
            let lp = r.logprobs[i], old = t.oldLogprobs[i]
            m.pgLoss += Double(plan.policyTerm(i, logprob: lp).loss)
            m.entropy += Double(r.entropies[i])
            m.ppoKL += Double(old - lp)
            if let ref = t.refLogprobs?[i] { m.refKL += Double(lp - ref) }
            let clipped = plan.clipped(i, logprob: lp)
            if clipped.low { m.clipFracLow += 1 }
            if clipped.high { m.clipFracHigh += 1 }
            if first { m.logprobMaxAbsDiff = max(m.logprobMaxAbsDiff, Double(abs(lp - old))) }
        }
        m.proxyNoiseMass += r.proxyNoiseMass.reduce(0.0) { $0 + Double($1) }
        var rho = LossDefaults.number("lp_reg", "rho")
        if case let .lpReg(o) = config.mode { rho = o.rho }
        let negatives = (0..<t.count).filter { t.advantages[$0] < 0 }
            .sorted { r.logprobs[$0] < r.logprobs[$1] || (r.logprobs[$0] == r.logprobs[$1] && $0 < $1) }
        let lowest = negatives.prefix(max(1, Int((Float(negatives.count) * rho).rounded(.down))))
        m.lowProbabilityTokens += lowest.count
        m.lowProbabilityProxyKept += lowest.filter { r.proxyKeeps[$0] }.count
        if case let .lpReg(o) = config.mode {
            m.lpRegRegularized += plan.selected.filter { $0 }.count
            for i in 0..<t.count where plan.selected[i] {
                m.lpRegTokens[t.targets[i], default: 0] += 1
                let p = expf(r.logprobs[i])
                m.lpRegProbabilityBuckets[TrainMetrics.probabilityBucketEdges.firstIndex { p < $0 } ?? 4] += 1
            }
            let negatives = t.advantages.filter { $0 < 0 }.count
            let k = Int((Float(o.percentileOver == .negative ? negatives : t.count) * o.rho).rounded(.down))
            m.lpRegSelected += (k == 0 || (o.skipWhenKAtMostOne && k <= 1)) ? 0 : k
            if let th = plan.threshold { m.lpRegThreshold = Double(expf(th)) }
        }
    }

    private func validate(_ items: [TrainItem], config: LossConfig, miniBatches: Int) throws {
        guard !items.isEmpty else { throw TrainError.invalid(path: "batch", reason: "at least one sequence") }
        guard items.contains(where: { $0.trainedLength > 0 }) else {
            throw TrainError.invalid(path: "batch", reason: "every response token is masked out (loss_mask): nothing to train")
        }
        guard miniBatches >= 1, miniBatches <= items.count else {
            throw TrainError.invalid(path: "mini_batches", reason: "must be in 1...\(items.count) (the batch size)")
        }
        guard config.temperature > 0, config.temperature.isFinite else {
            throw TrainError.invalid(path: "loss.temperature", reason: "must be a finite number > 0")
        }
        let a = model.architecture
        try Scoring.validate(items.map { ScoredSequence(tokens: $0.tokens, responseStart: $0.responseStart) },
                             vocabSize: a.vocabSize, maxPositions: a.position == .learned ? a.maxPositions : nil)
        for (i, item) in items.enumerated() {
            let n = item.responseLength
            guard item.advantages.count == n else {
                throw TrainError.invalid(path: "batch[\(i)].advantage", reason: "\(item.advantages.count) values for \(n) response tokens")
            }
            if let bad = item.advantages.firstIndex(where: { !$0.isFinite }) {
                throw TrainError.invalid(path: "batch[\(i)].advantage[\(bad)]", reason: "not a finite number")
            }
            if let m = item.lossMask, m.count != n {
                throw TrainError.invalid(path: "batch[\(i)].loss_mask", reason: "\(m.count) values for \(n) response tokens")
            }
            for (name, values) in [("old_logprobs", item.oldLogprobs), ("proxy_logprobs", item.proxyLogprobs), ("ref_logprobs", item.refLogprobs)] {
                guard let v = values else { continue }
                guard v.count == n else {
                    throw TrainError.invalid(path: "batch[\(i)].\(name)", reason: "\(v.count) values for \(n) response tokens")
                }
                if name != "proxy_logprobs", let bad = v.firstIndex(where: { !$0.isFinite || $0 > 0 }) {
                    throw TrainError.invalid(path: "batch[\(i)].\(name)[\(bad)]", reason: "a log-probability must be finite and <= 0")
                }
            }
        }
    }

    /// Rows of a packed batch whose logits predict trained response tokens, with their targets.
    static func trainedRows(_ batch: PackedBatch, _ items: [TrainItem]) -> (rows: [Int], targets: [Int32]) {
        var rows: [Int] = [], targets: [Int32] = []
        for (b, item) in items.enumerated() {
            let start = batch.sequenceStarts[b] + item.responseStart - 1
            for k in item.trainedOffsets {
                rows.append(start + k)
                targets.append(item.tokens[item.responseStart + k])
            }
        }
        return (rows, targets)
    }

    /// Contiguous, nearly equal groups (none empty).
    static func split(_ n: Int, into parts: Int) -> [Range<Int>] { evenParts(n, parts).filter { !$0.isEmpty } }

    /// Consecutive items packed while their tokens fit the budget (an item larger than the
    /// budget forms its own micro-batch).
    static func microBatches(_ items: [TrainItem], tokenBudget: Int?) -> [[Int]] {
        guard let budget = tokenBudget, budget > 0 else { return [Array(items.indices)] }
        var out: [[Int]] = [[]], used = 0
        for (i, item) in items.enumerated() {
            if !out[out.count - 1].isEmpty && used + item.tokens.count > budget { out.append([]); used = 0 }
            out[out.count - 1].append(i)
            used += item.tokens.count
        }
        return out
    }
}
