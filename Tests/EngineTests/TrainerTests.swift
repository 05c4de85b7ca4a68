// train_step mechanics: micro-batching gives the same gradients as one batch, mini-batches take
// one optimizer step each, dry runs and refused non-finite steps change nothing, missing
// log-probabilities are recomputed, schedules, and the reference-KL precondition.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import XCTest

final class TrainerTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    func items(_ model: TransformerModel, count: Int = 6, seed: UInt64 = 5) throws -> [TrainItem] {
        let gen = Generator(model: model, tokenizer: nil, slots: count, capacity: 40)
        var params = SamplingParams()
        params.maxTokens = 12
        params.seed = seed
        var options = GenerationOptions()
        options.proxy = .minP(0.02)
        let out = try gen.generate(prompts: [[1, 2, 3], [7, 8, 9, 10, 11]], n: count / 2, params: params, options: options)
        var list: [TrainItem] = []
        for (p, prompt) in out.promptTokens.enumerated() {
            for (s, sample) in out.results[p].enumerated() {
                let adv: Float = s % 2 == 0 ? 1 : -1
                list.append(TrainItem(tokens: prompt + sample.tokens, responseStart: prompt.count,
                                      advantages: Array(repeating: adv, count: sample.tokens.count),
                                      oldLogprobs: sample.logprobs, proxyLogprobs: sample.proxyLogprobs))
            }
        }
        return list
    }

    func lpRegConfig() -> LossConfig {
        var o = LpRegOptions()
        o.rho = 0.2
        var c = LossConfig(mode: .lpReg(o))
        c.entropyCoef = 0.001
        return c
    }

    func testMicroBatchesGiveTheSameGradientAsOneBatch() throws {
        let model = try TransformerModel.load(directory: fixtureModel("qwen3_headdim"))
        let trainer = Trainer(model: model)
        let batch = try items(model)
        let whole = try trainer.step(items: batch, config: lpRegConfig(), dryRun: true)
        let g1 = Array(UnsafeBufferPointer(start: model.parameters.gradients, count: model.parameters.count))
        let split = try trainer.step(items: batch, config: lpRegConfig(), microBatchTokens: 20, dryRun: true)
        let g2 = Array(UnsafeBufferPointer(start: model.parameters.gradients, count: model.parameters.count))
        assertClose(g2, g1, atol: 1e-6, rtol: 1e-4, "micro-batched gradients")
        XCTAssertEqual(split.loss, whole.loss, accuracy: 1e-6 * max(1, abs(whole.loss)))
        XCTAssertEqual(split.lpRegRegularized, whole.lpRegRegularized)
        XCTAssertEqual(whole.logprobMaxAbsDiff, 0, "on-policy: the trainer recomputes the sampler's log-probs exactly")
        XCTAssertGreaterThan(whole.lpRegRegularized, 0)
        // Which tokens: counted by id and by probability bucket, both summing to the regularised count.
        XCTAssertEqual(whole.lpRegTokens.values.reduce(0, +), whole.lpRegRegularized)
        XCTAssertEqual(whole.lpRegProbabilityBuckets.reduce(0, +), whole.lpRegRegularized)
        XCTAssertEqual(split.lpRegTokens, whole.lpRegTokens)
        let targets = Set(batch.flatMap { $0.tokens[$0.responseStart...] })
        XCTAssertTrue(whole.lpRegTokens.keys.allSatisfy { targets.contains($0) })
    }

    /// The analysis metrics against a recomputation from the model's own distributions: the mass
    /// the default min-p proxy drops, and the share of the lowest-probability negative tokens it keeps.
    func testProxyAnalysisMetricsMatchARecomputation() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let batch = try items(model, count: 8)
        let m = try Trainer(model: model).step(items: batch, config: LossConfig(mode: .ppo(ClipOptions())), dryRun: true)
        let kappa = 0.02
        var massSum = 0.0, n = 0
        var negatives: [(lp: Double, kept: Bool)] = []
        let V = model.architecture.vocabSize
        for item in batch {
            let T = item.tokens.count
            let logits = try model.logits(tokens: item.tokens, positions: (0..<Int32(T)).map { $0 },
                                          context: .packed(sequenceStarts: [0, T]), rows: Array((item.responseStart - 1)..<(T - 1)))
            for (k, target) in item.tokens[item.responseStart...].enumerated() {
                let row = logits[(k * V)..<((k + 1) * V)].map(Double.init)
                let mx = row.max()!, lse = mx + log(row.map { exp($0 - mx) }.reduce(0, +))
                let cut = mx + log(kappa)
                massSum += row.filter { $0 < cut }.map { exp($0 - lse) }.reduce(0, +)
                n += 1
                if item.advantages[k] < 0 { negatives.append((row[Int(target)] - lse, row[Int(target)] >= cut)) }
            }
        }
        XCTAssertEqual(m.proxyNoiseMass, massSum / Double(n), accuracy: 1e-5)
        XCTAssertGreaterThan(m.proxyNoiseMass, 0)
        let lowest = negatives.sorted { $0.lp < $1.lp }.prefix(max(1, Int(Double(negatives.count) * 0.01)))
        XCTAssertEqual(m.lowProbabilityTokens, lowest.count)
        XCTAssertEqual(m.lowProbabilityProxyKept, lowest.filter(\.kept).count)
    }

    /// Per-micro-batch selection (reference code) differs from batch-wide selection only in which
    /// tokens are regularized; with one micro-batch they coincide.
    func testLpRegSelectionScopes() throws {
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        let trainer = Trainer(model: model)
        let batch = try items(model, count: 8)
        var o = LpRegOptions()
        o.rho = 0.25
        var perMicro = o
        perMicro.selection = .microBatch
        let wholeBatch = try trainer.step(items: batch, config: LossConfig(mode: .lpReg(o)), microBatchTokens: 30, dryRun: true)
        let micro = try trainer.step(items: batch, config: LossConfig(mode: .lpReg(perMicro)), microBatchTokens: 30, dryRun: true)
        let single = try trainer.step(items: batch, config: LossConfig(mode: .lpReg(perMicro)), dryRun: true)
        XCTAssertEqual(single.lpRegRegularized, wholeBatch.lpRegRegularized)
        XCTAssertGreaterThan(wholeBatch.lpRegRegularized, 0)
        print("Lp-Reg regularized: batch-wide \(wholeBatch.lpRegRegularized), per micro-batch \(micro.lpRegRegularized)")
    }

    func testDryRunAndRefusedStepsChangeNothing() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let trainer = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 1e-2)))
        var batch = try items(model)
        let before = model.parameters.checksum()
        let dry = try trainer.step(items: batch, config: lpRegConfig(), dryRun: true)
        XCTAssertGreaterThan(dry.gradNorm, 0)
        XCTAssertEqual(model.parameters.checksum(), before)
        XCTAssertEqual(trainer.weightsVersion, 0)
        XCTAssertEqual(trainer.optimizer.stepCount, 0)

        // An absurd old log-prob makes the ratio overflow: the loss is infinite, the step refused.
        batch[1].oldLogprobs![0] = -1e30   // sample 1 has A < 0: -A·r = +inf
        XCTAssertThrowsError(try trainer.step(items: batch, config: LossConfig(mode: .ppo(ClipOptions(dualClip: nil))))) { e in
            XCTAssertTrue(e is NonFiniteError, "\(e)")
        }
        XCTAssertEqual(model.parameters.checksum(), before)
        XCTAssertEqual(trainer.weightsVersion, 0)

        // Invalid input is refused before anything runs, naming the parameter.
        var bad = try items(model)
        bad[1].advantages.removeLast()
        XCTAssertThrowsError(try trainer.step(items: bad, config: lpRegConfig())) { e in
            XCTAssertTrue("\(e)".contains("batch[1].advantage"), "\(e)")
        }
        bad = try items(model)
        bad[2].oldLogprobs![3] = 0.5
        XCTAssertThrowsError(try trainer.step(items: bad, config: lpRegConfig())) { e in
            XCTAssertTrue("\(e)".contains("batch[2].old_logprobs[3]"), "\(e)")
        }
        XCTAssertThrowsError(try trainer.step(items: try items(model), config: lpRegConfig(), miniBatches: 0))
        var withKL = LossConfig(mode: .ppo(ClipOptions()))
        withKL.klCoef = 0.1
        XCTAssertThrowsError(try trainer.step(items: try items(model), config: withKL)) { e in
            XCTAssertTrue("\(e)".contains("reference"), "\(e)")
        }
        XCTAssertEqual(model.parameters.checksum(), before)
    }

    func testMiniBatchesStepOncePerMiniBatchAndMissingLogprobsAreRecomputed() throws {
        let model = try TransformerModel.load(directory: fixtureModel("gpt2"))
        let trainer = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 1e-3)))
        let batch = try items(model)
        var stripped = batch
        for i in stripped.indices { stripped[i].oldLogprobs = nil; stripped[i].proxyLogprobs = nil }
        let m = try trainer.step(items: stripped, config: lpRegConfig(), miniBatches: 3)
        XCTAssertEqual(m.optimizerSteps, 3)
        XCTAssertEqual(trainer.weightsVersion, 3)
        XCTAssertEqual(m.tokens, batch.reduce(0) { $0 + $1.responseLength })
        XCTAssertEqual(m.logprobMaxAbsDiff, 0, "recomputed old log-probs equal the current ones at the first mini-batch")
        XCTAssertTrue(m.loss.isFinite && m.entropy > 0)

        // With a reference snapshot, KL to the reference starts at 0 and grows after updates.
        try trainer.snapshotReference()
        var cfg = LossConfig(mode: .ppo(ClipOptions()))
        cfg.klCoef = 0.1
        let first = try trainer.step(items: batch, config: cfg)
        XCTAssertEqual(first.refKL, 0, accuracy: 1e-7)
        let second = try trainer.step(items: batch, config: cfg)
        XCTAssertNotEqual(second.refKL, 0)
        XCTAssertEqual(trainer.weightsVersion, 5)
    }

    func testPerCallOptimizerSettingsDoNotPersist() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let trainer = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 1e-3)))
        let batch = [TrainItem(tokens: [1, 2, 3, 4], responseStart: 1, advantages: [1, -1, 1])]
        let m = try trainer.step(items: batch, config: LossConfig(mode: .ppo(ClipOptions())),
                                 optimizer: AdamWSettings(lr: 5e-2, weightDecay: 0.1))
        XCTAssertEqual(m.lr, 5e-2)
        XCTAssertEqual(trainer.optimizer.settings.lr, 1e-3)
        XCTAssertThrowsError(try trainer.step(items: batch, config: LossConfig(mode: .ppo(ClipOptions())),
                                              optimizer: AdamWSettings(lr: -1))) { e in
            XCTAssertTrue("\(e)".contains("optimizer"))
        }
        trainer.configure(trainer.optimizer.settings, schedule: .linearWarmup(warmupSteps: 10))
        let warm = try trainer.step(items: batch, config: LossConfig(mode: .ppo(ClipOptions())))
        XCTAssertEqual(warm.lr, 2e-4, accuracy: 1e-10, "second optimizer step of a 10-step warm-up")
    }

    func testSchedules() {
        XCTAssertEqual(LRSchedule.constant.rate(1e-3, step: 7), 1e-3)
        XCTAssertEqual(LRSchedule.linearWarmup(warmupSteps: 4).rate(1e-3, step: 1), 2.5e-4)
        XCTAssertEqual(LRSchedule.linearWarmup(warmupSteps: 4).rate(1e-3, step: 9), 1e-3)
        let cos = LRSchedule.cosine(warmupSteps: 2, totalSteps: 12, minLR: 1e-4)
        XCTAssertEqual(cos.rate(1e-3, step: 1), 5e-4, accuracy: 1e-9)
        XCTAssertEqual(cos.rate(1e-3, step: 2), 1e-3, accuracy: 1e-9)
        XCTAssertEqual(cos.rate(1e-3, step: 7), 5.5e-4, accuracy: 1e-9)
        XCTAssertEqual(cos.rate(1e-3, step: 12), 1e-4, accuracy: 1e-9)
        XCTAssertEqual(cos.rate(1e-3, step: 40), 1e-4, accuracy: 1e-9)
    }
}

final class TrainerStateTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    /// Two steps, save, two more steps; versus load and the same two steps: bit-identical weights.
    func testResumeContinuesExactly() throws {
        let dir = NSTemporaryDirectory() + "ember-resume-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let batch = [TrainItem(tokens: [1, 2, 3, 4, 5, 6], responseStart: 2, advantages: [1, 1, 1, 1]),
                     TrainItem(tokens: [7, 8, 9, 10, 11], responseStart: 3, advantages: [-1, -1])]
        let config = LossConfig(mode: .ppo(ClipOptions()))
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let trainer = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 5e-3, beta1: 0.8, weightDecay: 0.01)))
        for _ in 0..<2 { _ = try trainer.step(items: batch, config: config) }
        try model.save(to: dir)
        try trainer.saveState(to: dir)
        for _ in 0..<2 { _ = try trainer.step(items: batch, config: config) }

        let resumedModel = try TransformerModel(config: model.configJSON)
        let resumed = Trainer(model: resumedModel)
        try resumed.loadState(from: dir, weights: try TransformerModel.load(directory: dir))
        XCTAssertEqual(resumed.weightsVersion, 2)
        XCTAssertEqual(resumed.optimizer.settings, trainer.optimizer.settings)
        for _ in 0..<2 { _ = try resumed.step(items: batch, config: config) }
        XCTAssertEqual(resumed.weightsVersion, 4)
        XCTAssertEqual(resumedModel.parameters.checksum(), model.parameters.checksum(), "resumed run must continue exactly")
    }

    func testRolloutsBecomeItemsWithAdvantages() throws {
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        let store = RolloutStore(budgetBytes: 1 << 20)
        let gen = Generator(model: model, tokenizer: nil, slots: 4, capacity: 24, rolloutStore: store)
        var params = SamplingParams(); params.maxTokens = 6; params.seed = 3
        var options = GenerationOptions(); options.proxy = .minP(0.02)
        let out = try gen.generate(prompts: [[1, 2], [3, 4]], n: 2, params: params, options: options)
        let ids = out.results.flatMap { $0.map { $0.rolloutId! } }
        let rewards = [RolloutReward(rolloutId: ids[0], reward: 1), RolloutReward(rolloutId: ids[1], reward: 0),
                       RolloutReward(rolloutId: ids[2], reward: 1), RolloutReward(rolloutId: ids[3], reward: 1)]
        let items = try Trainer.items(from: rewards, store: store, estimator: .drGRPO, temperature: 1, proxy: .minP(0.02))
        XCTAssertEqual(items.map { $0.advantages.first! }, [0.5, -0.5, 0, 0])
        XCTAssertEqual(items[0].oldLogprobs!, out.results[0][0].logprobs)
        XCTAssertEqual(items[0].proxyLogprobs!, out.results[0][0].proxyLogprobs!)
        let dropped = try Trainer.items(from: rewards, store: store, estimator: .grpo, temperature: 1, proxy: nil,
                                        dropConstantGroups: true)
        XCTAssertEqual(dropped.count, 2, "the second prompt's rewards are all equal")
        XCTAssertNil(dropped[0].proxyLogprobs)
        let other = try Trainer.items(from: rewards, store: store, estimator: .grpo, temperature: 0.5, proxy: nil)
        XCTAssertNil(other[0].oldLogprobs, "log-probs at another temperature are recomputed")
        XCTAssertThrowsError(try Trainer.items(from: [RolloutReward(rolloutId: "r-x-1", reward: 1)], store: store,
                                               estimator: .grpo, temperature: 1, proxy: nil)) { e in
            XCTAssertTrue("\(e)".contains("rollouts[0].rollout_id"), "\(e)")
        }
        let trainer = Trainer(model: model)
        let m = try trainer.step(items: items, config: LossConfig(mode: .lpReg(LpRegOptions())))
        XCTAssertEqual(m.logprobMaxAbsDiff, 0, "stored sampling log-probs equal the trainer's")
        XCTAssertEqual(trainer.weightsVersion, 1)
    }
}

/// Per-token loss masks: a masked token is context only.
final class LossMaskTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    /// Under a causal model, training the first k response tokens of a sequence with the rest
    /// masked is training the sequence cut after them: same tokens counted, same update.
    func testMaskedTailTrainsAsTheTruncatedSequence() throws {
        let tokens: [Int32] = [3, 9, 27, 81, 50, 11, 60, 7]
        for mode in [LossConfig(mode: .ppo(ClipOptions())), LossConfig(mode: .lpReg(LpRegOptions()))] {
            let a = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
            let b = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
            let settings = AdamWSettings(lr: 1e-2, weightDecay: 0, gradClip: 0)
            let masked = TrainItem(tokens: tokens, responseStart: 2, advantages: [1, 1, 1, 1, 1, 1],
                                   lossMask: [true, true, true, false, false, false])
            let cut = TrainItem(tokens: Array(tokens[0..<5]), responseStart: 2, advantages: [1, 1, 1])
            let other = TrainItem(tokens: [5, 4, 3, 2, 1], responseStart: 1, advantages: [-1, -1, -1, -1])
            let ma = try Trainer(model: a, optimizer: AdamW(settings: settings)).step(items: [masked, other], config: mode)
            let mb = try Trainer(model: b, optimizer: AdamW(settings: settings)).step(items: [cut, other], config: mode)
            XCTAssertEqual(ma.tokens, 7)
            XCTAssertEqual(mb.tokens, 7)
            XCTAssertEqual(ma.loss, mb.loss, accuracy: 1e-6)
            assertClose(Array(UnsafeBufferPointer(start: a.parameters.values, count: a.parameters.count)),
                        Array(UnsafeBufferPointer(start: b.parameters.values, count: b.parameters.count)),
                        atol: 1e-6, rtol: 1e-5, "weights after a masked step vs a truncated one")
        }
    }

    func testMaskedTokensMoveNothingAndBadMasksAreRefused() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let trainer = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 1e-2)))
        let before = model.parameters.checksum()
        XCTAssertThrowsError(try trainer.step(items: [TrainItem(tokens: [1, 2, 3, 4], responseStart: 1, advantages: [1, 1, 1],
                                                                lossMask: [false, false, false])],
                                              config: LossConfig(mode: .ppo(ClipOptions())))) { e in
            XCTAssertEqual(e as? TrainError, .invalid(path: "batch", reason: "every response token is masked out (loss_mask): nothing to train"))
        }
        XCTAssertThrowsError(try trainer.step(items: [TrainItem(tokens: [1, 2, 3, 4], responseStart: 1, advantages: [1, 1, 1],
                                                                lossMask: [true])],
                                              config: LossConfig(mode: .ppo(ClipOptions())))) { e in
            guard case let .invalid(path, _)? = e as? TrainError else { return XCTFail("\(e)") }
            XCTAssertEqual(path, "batch[0].loss_mask")
        }
        XCTAssertEqual(model.parameters.checksum(), before)
    }
}
