// Presence and frequency penalties and logit bias: greedy decoding against the model's logits
// recomputed step by step, reported log-probs that stay the model's, and seeded sampling that
// ignores batch mates.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import XCTest

final class PenaltyTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    func model(_ name: String) throws -> TransformerModel { try TransformerModel.load(directory: fixtureModel(name)) }

    /// Presence and frequency penalties and logit bias, as vLLM applies them: on the raw logits
    /// of the sample's own output so far. Greedy decoding is checked against the model's logits
    /// recomputed step by step; reported log-probs stay the model's (scoring agrees bit for bit);
    /// seeded penalized sampling ignores batch mates.
    func testPenaltiesAndLogitBiasFollowTheirDefinition() throws {
        let m = try model("llama_gqa")
        var params = SamplingParams()
        params.temperature = 0
        params.maxTokens = 12
        params.presencePenalty = 1.5
        params.frequencyPenalty = 0.75
        params.logitBias = [7: 2.5, 11: -100]
        let prompt: [Int32] = [3, 1, 4, 1, 5]
        let out = try Generator(model: m, tokenizer: nil, slots: 2, capacity: 32).generate(prompts: [prompt], params: params)
        let tokens = out.results[0][0].tokens
        var counts: [Int32: Int] = [:]
        let V = m.architecture.vocabSize
        for (k, token) in tokens.enumerated() {
            let seq = prompt + tokens[..<k]
            var logits = try m.logits(tokens: Array(seq), positions: (0..<Int32(seq.count)).map { $0 }, context: .packed(sequenceStarts: [0, seq.count]),
                                      rows: [seq.count - 1])
            for (t, b) in params.logitBias { logits[Int(t)] += b }
            for (t, c) in counts { logits[Int(t)] -= params.frequencyPenalty * Float(c) + params.presencePenalty }
            var best = 0
            for i in 1..<V where logits[i] > logits[best] { best = i }
            XCTAssertEqual(Int(token), best, "step \(k)")
            counts[token, default: 0] += 1
        }
        XCTAssertFalse(tokens.contains(11), "a -100 bias bans the token")
        let plain = try Generator(model: m, tokenizer: nil, slots: 2, capacity: 32).generate(prompts: [prompt], params: {
            var p = params; p.presencePenalty = 0; p.frequencyPenalty = 0; p.logitBias = [:]; return p }())
        XCTAssertNotEqual(plain.results[0][0].tokens, tokens, "the penalties change the greedy path here")

        // Sampled with penalties: reported log-probs are the model's, and batch mates change nothing.
        params.temperature = 0.8
        params.seed = 5
        let alone = try Generator(model: m, tokenizer: nil, slots: 4, capacity: 32).generate(prompts: [prompt], n: 2, params: params)
        let gen = Generator(model: m, tokenizer: nil, slots: 4, capacity: 32)
        var other = SamplingParams(); other.maxTokens = 5; other.seed = 1
        _ = try gen.submit(prompts: [[9, 9, 9]], params: other)
        _ = try gen.step()
        let together = try gen.generate(prompts: [prompt], n: 2, params: params)
        for s in 0..<2 {
            XCTAssertEqual(alone.results[0][s].tokens, together.results[0][s].tokens)
            XCTAssertEqual(alone.results[0][s].logprobs.map(\.bitPattern), together.results[0][s].logprobs.map(\.bitPattern))
            let sample = alone.results[0][s]
            let scored = try Scoring.score(model: m, sequences: [ScoredSequence(tokens: prompt + sample.tokens, responseStart: prompt.count)],
                                           temperature: 0.8)[0]
            XCTAssertEqual(scored.logprobs.map(\.bitPattern), sample.logprobs.map(\.bitPattern))
        }
        var bad = params
        bad.presencePenalty = 2.5
        XCTAssertThrowsError(try gen.submit(prompts: [prompt], params: bad))
        bad = params
        bad.logitBias = [Int32(V): 1]
        XCTAssertThrowsError(try gen.submit(prompts: [prompt], params: bad))
    }
}
