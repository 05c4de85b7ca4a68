// End to end on a tiny model: a few Lp-Reg steps raise the probability of a selected
// low-probability token relative to plain PPO on the same negative-advantage batch.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import XCTest

final class LpRegTrainingTests: XCTestCase {
    func testLpRegProtectsSelectedLowProbabilityTokens() throws {
        Compute.setThreads(2)
        let sampler = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let gen = Generator(model: sampler, tokenizer: nil, slots: 8, capacity: 40)
        var params = SamplingParams()
        params.temperature = 1
        params.maxTokens = 24
        params.seed = 11
        var options = GenerationOptions()
        options.proxy = .minP(0.02)
        let out = try gen.generate(prompts: [[1, 2, 3, 4]], n: 6, params: params, options: options)
        let prompt = out.promptTokens[0]
        let samples = out.results[0]
        // Every sample failed: negative advantage on every token (the Lp-Reg scenario).
        let items = samples.map { s in
            TrainItem(tokens: prompt + s.tokens, responseStart: prompt.count,
                      advantages: Array(repeating: -1, count: s.tokens.count),
                      oldLogprobs: s.logprobs, proxyLogprobs: s.proxyLogprobs)
        }
        let old = samples.flatMap { $0.logprobs }

        var lpReg = LpRegOptions()
        lpReg.rho = 0.1
        let modes: [(String, LossMode)] = [("ppo", .ppo(ClipOptions(epsLow: 1, epsHigh: 9))), ("lp_reg", .lpReg(lpReg))]
        var finalLogprobs: [String: [Float]] = [:]
        var selected: [Bool] = []
        for (name, mode) in modes {
            let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
            let trainer = Trainer(model: model, optimizer: AdamW(settings: AdamWSettings(lr: 3e-3, weightDecay: 0, gradClip: 1)))
            for step in 0..<4 {
                let m = try trainer.step(items: items, config: LossConfig(mode: mode))
                if step == 0 {
                    // On-policy: the trainer's log-probs are the sampler's, bit for bit.
                    XCTAssertEqual(m.logprobMaxAbsDiff, 0)
                    if name == "lp_reg" { selected = trainer.lastSelection }
                }
            }
            finalLogprobs[name] = try Scoring.score(model: model, sequences: items.map {
                ScoredSequence(tokens: $0.tokens, responseStart: $0.responseStart)
            }).flatMap { $0.logprobs }
        }
        let chosen = selected.indices.filter { selected[$0] }
        XCTAssertGreaterThan(chosen.count, 0, "Lp-Reg should select some low-probability tokens")
        var lifted = 0
        for i in chosen where finalLogprobs["lp_reg"]![i] > finalLogprobs["ppo"]![i] { lifted += 1 }
        print("Lp-Reg selected \(chosen.count) tokens; \(lifted) end more probable than under PPO; e.g. token \(chosen[0]): sampled \(old[chosen[0]]), PPO \(finalLogprobs["ppo"]![chosen[0]]), Lp-Reg \(finalLogprobs["lp_reg"]![chosen[0]])")
        XCTAssertEqual(lifted, chosen.count, "every selected token should end more probable under Lp-Reg than under PPO")
    }
}
