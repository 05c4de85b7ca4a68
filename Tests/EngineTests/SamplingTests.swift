// Sampling and scoring: statistics against numpy, the truncated distributions (chi-square),
// greedy determinism, seeded reproducibility whatever the batch mates and thread count, stop
// strings across token boundaries, and exact agreement between generate, logprob scoring and the
// training forward.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import Tokenizer
import XCTest

final class SamplingTests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    // MARK: - Statistics

    func testStatisticsMatchNumpy() throws {
        let data = FileManager.default.contents(atPath: fixturesDirectory + "/sampling/stats.json")!
        let cases = try JSONSerialization.jsonObject(with: data) as! [[String: Any]]
        var worst = 0.0
        for (i, c) in cases.enumerated() {
            var logits = (c["logits"] as! [Double]).map(Float.init)
            let T = Float(c["temperature"] as! Double)
            let dist = RowDistribution(scaling: &logits, count: logits.count, temperature: T)
            let tokens = c["tokens"] as! [Int]
            for (k, t) in tokens.enumerated() {
                let want = (c["logprob"] as! [Double])[k]
                worst = max(worst, abs(Double(dist.logprob(t)) - want))
                XCTAssertEqual(Double(dist.logprob(t)), want, accuracy: 2e-5 + 1e-6 * abs(want), "case \(i) logprob")
                for (key, spec) in [("proxy_min_p", ProxySpec.minP(Float(c["kappa"] as! Double))),
                                    ("proxy_threshold", ProxySpec.threshold(Float(c["tau"] as! Double)))] {
                    let got = dist.proxyLogprob(t, spec)
                    if let want = (c[key] as! [Any])[k] as? Double {
                        XCTAssertEqual(Double(got), want, accuracy: 2e-5 + 1e-6 * abs(want), "case \(i) \(key) token \(t)")
                    } else {
                        XCTAssertEqual(got, -.infinity, "case \(i) \(key): token \(t) should be filtered out")
                    }
                }
            }
            XCTAssertEqual(Double(dist.entropy()), c["entropy"] as! Double, accuracy: 2e-5, "case \(i) entropy")
        }
        print("statistics vs numpy: worst logprob |diff| \(worst)")
    }

    // MARK: - Truncated distributions

    /// Draws many tokens and compares the counts with the truncated, renormalized distribution.
    func chiSquare(_ logits: [Float], _ params: SamplingParams, expected: [Double], draws: Int = 40_000) -> (Double, Int) {
        var row = logits
        let dist = RowDistribution(scaling: &row, count: row.count, temperature: params.temperature)
        var rng = SequenceRandom(seed: 12345)
        var counts = [Int](repeating: 0, count: logits.count)
        for _ in 0..<draws { counts[Int(Sampler.draw(dist, params, &rng))] += 1 }
        var chi = 0.0, df = -1
        for i in 0..<logits.count {
            if expected[i] == 0 {
                XCTAssertEqual(counts[i], 0, "token \(i) should be truncated away")
                continue
            }
            let e = expected[i] * Double(draws)
            chi += (Double(counts[i]) - e) * (Double(counts[i]) - e) / e
            df += 1
        }
        return (chi, df)
    }

    func testTruncationsMatchTheirDistributions() {
        let logits: [Float] = [2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0]
        let T: Float = 0.8
        let p = { () -> [Double] in
            let z = logits.map { Double($0 / T) }
            let m = z.max()!
            let e = z.map { Foundation.exp($0 - m) }
            let s = e.reduce(0, +)
            return e.map { $0 / s }
        }()
        func renorm(_ keep: [Bool]) -> [Double] {
            let s = zip(p, keep).filter { $0.1 }.map { $0.0 }.reduce(0, +)
            return zip(p, keep).map { $0.1 ? $0.0 / s : 0 }
        }
        // 99.9% chi-square critical values by degrees of freedom.
        let critical: [Int: Double] = [1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88]
        var params = SamplingParams()
        params.temperature = T
        var cases: [(String, SamplingParams, [Double])] = [("full", params, p)]
        var k = params; k.topK = 4
        cases.append(("top_k 4", k, renorm((0..<10).map { $0 < 4 })))
        var tp = params; tp.topP = 0.8
        var cum = 0.0
        let keepP = p.map { v -> Bool in let keep = cum < 0.8; cum += v; return keep }
        cases.append(("top_p 0.8", tp, renorm(keepP)))
        var mp = params; mp.minP = 0.2
        cases.append(("min_p 0.2", mp, renorm(p.map { $0 >= 0.2 * p[0] })))
        var all = params; all.topK = 6; all.topP = 0.95; all.minP = 0.1
        let k6 = renorm((0..<10).map { $0 < 6 })
        var cum2 = 0.0
        let keep2 = k6.map { v -> Bool in let keep = v > 0 && cum2 < 0.95; cum2 += v; return keep }
        let afterP = renorm(keep2)
        cases.append(("top_k + top_p + min_p", all, renorm(afterP.map { $0 > 0 && $0 >= 0.1 * afterP[0] })))
        for (name, params, expected) in cases {
            let (chi, df) = chiSquare(logits, params, expected: expected)
            print("\(name): chi-square \(String(format: "%.2f", chi)) with \(df) degrees of freedom")
            XCTAssertLessThan(chi, critical[df] ?? 30, name)
        }
    }

    // MARK: - Generation

    func model(_ name: String = "qwen2_tied") throws -> TransformerModel {
        try TransformerModel.load(directory: fixtureModel(name))
    }

    func testGreedyIsDeterministicAndFollowsTheArgmax() throws {
        let m = try model()
        let gen = Generator(model: m, tokenizer: nil, slots: 4, capacity: 48)
        var params = SamplingParams()
        params.temperature = 0
        params.maxTokens = 12
        let a = try gen.generate(prompts: [[3, 14, 15, 92]], params: params)
        let b = try gen.generate(prompts: [[3, 14, 15, 92]], params: params)
        let tokens = a.results[0][0].tokens
        XCTAssertEqual(tokens, b.results[0][0].tokens)
        XCTAssertEqual(tokens.count, 12)
        XCTAssertEqual(a.results[0][0].finishReason, .length)
        // Each greedy token is the argmax of a full forward over prompt + earlier tokens.
        let seq: [Int32] = [3, 14, 15, 92] + tokens
        let V = m.architecture.vocabSize
        let logits = try m.logits(tokens: seq, positions: (0..<seq.count).map { Int32($0) },
                                  context: .packed(sequenceStarts: [0, seq.count]), rows: Array(3..<(seq.count - 1)))
        for (i, t) in tokens.enumerated() {
            let row = Array(logits[(i * V)..<((i + 1) * V)])
            XCTAssertEqual(Int(t), row.firstIndex(of: row.max()!)!, "step \(i)")
        }
    }

    /// A seeded request alone on one thread, then again with other requests around it (one of
    /// them arriving mid-generation) on two threads, rows sampled in parallel: identical tokens
    /// and identical log-probs.
    func testSeededSamplingIgnoresBatchMatesAndThreads() throws {
        var params = SamplingParams()
        params.temperature = 0.9
        params.topP = 0.95
        params.maxTokens = 20
        params.seed = 2024
        var options = GenerationOptions()
        options.proxy = .minP(0.02)
        options.entropy = true

        Compute.setThreads(1)
        let alone = try Generator(model: try model(), tokenizer: nil, slots: 8, capacity: 40)
            .generate(prompts: [[5, 6, 7]], n: 3, params: params, options: options)

        Compute.setThreads(2)
        let gen = Generator(model: try model(), tokenizer: nil, slots: 8, capacity: 40, parallelSamplingMinLogits: 1)
        var other = params
        other.seed = 7
        other.temperature = 1.2
        _ = try gen.submit(prompts: [[1, 2, 3, 4, 5, 6, 7, 8], [9]], params: other)
        _ = try gen.step()
        _ = try gen.step()
        let target = try gen.submit(prompts: [[5, 6, 7]], n: 3, params: params, options: options)
        var together: GenerationResult?
        var late: Int?
        while together == nil {
            if late == nil && gen.runningCount > 0 { late = try gen.submit(prompts: [[40, 41]], n: 2, params: other) }
            for r in try gen.step() where r.requestId == target { together = r }
        }
        for s in 0..<3 {
            let x = alone.results[0][s], y = together!.results[0][s]
            XCTAssertEqual(x.tokens, y.tokens, "sample \(s)")
            XCTAssertEqual(x.logprobs.map(\.bitPattern), y.logprobs.map(\.bitPattern), "sample \(s) logprobs")
            XCTAssertEqual(x.proxyLogprobs!.map(\.bitPattern), y.proxyLogprobs!.map(\.bitPattern))
            XCTAssertEqual(x.entropies!.map(\.bitPattern), y.entropies!.map(\.bitPattern))
        }
        // The three samples of one prompt differ from each other (their own random streams).
        XCTAssertNotEqual(alone.results[0][0].tokens, alone.results[0][1].tokens)
    }

    /// Log-probs of generated samples equal those from scoring and from the training forward.
    func testGenerateScoreAndTrainAgree() throws {
        let m = try model("llama_gqa")
        let gen = Generator(model: m, tokenizer: nil, slots: 6, capacity: 32)
        var params = SamplingParams()
        params.temperature = 0.7
        params.maxTokens = 10
        params.seed = 99
        var options = GenerationOptions()
        options.proxy = .minP(0.05)
        let out = try gen.generate(prompts: [[1, 2, 3], [50, 60, 70, 80, 90]], n: 2, params: params, options: options)
        var seqs: [ScoredSequence] = [], sampled: [[Float]] = [], sampledProxy: [[Float]] = []
        for (p, prompt) in out.promptTokens.enumerated() {
            for s in out.results[p] {
                seqs.append(ScoredSequence(tokens: prompt + s.tokens, responseStart: prompt.count))
                sampled.append(s.logprobs)
                sampledProxy.append(s.proxyLogprobs!)
            }
        }
        let scored = try Scoring.score(model: m, sequences: seqs, temperature: 0.7, options: options)
        var worstScore: Float = 0
        for (a, b) in zip(sampled, scored) {
            for (x, y) in zip(a, b.logprobs) { worstScore = max(worstScore, abs(x - y)) }
        }
        for (a, b) in zip(sampledProxy, scored) { XCTAssertEqual(a.map(\.bitPattern), b.proxyLogprobs!.map(\.bitPattern)) }

        // Training forward: a loss that records the same statistic from each logits chunk.
        let batch = PackedBatch(seqs.map { $0.tokens })
        let (rows, targets) = Scoring.responseRows(batch, responseStarts: seqs.map { $0.responseStart })
        var trained: [Float] = []
        _ = try Training.accumulateGradients(model: m, batch: batch, outputRows: rows, chunkRows: 7) { chunk in
            for i in 0..<chunk.rows.count {
                let dist = RowDistribution(scaling: chunk.logits + i * chunk.vocabSize, count: chunk.vocabSize, temperature: 0.7)
                trained.append(dist.logprob(Int(targets[chunk.rows.lowerBound + i])))
                (chunk.logits + i * chunk.vocabSize).update(repeating: 0, count: chunk.vocabSize)
            }
            return 0
        }
        var worstTrain: Float = 0
        for (x, y) in zip(sampled.flatMap { $0 }, trained) { worstTrain = max(worstTrain, abs(x - y)) }
        print("agreement: generate vs logprob max |diff| \(worstScore), generate vs train forward \(worstTrain)")
        XCTAssertLessThanOrEqual(worstScore, 1e-6)
        XCTAssertLessThanOrEqual(worstTrain, 1e-6)
        XCTAssertEqual(worstScore, 0, "expected bit-identical log-probs")
        XCTAssertEqual(worstTrain, 0, "expected bit-identical log-probs")
    }

    func testStopStringsAcrossTokenBoundaries() throws {
        let tok = try Tokenizer(directory: fixturesDirectory + "/tokenizers/gpt2")
        // A random model over the tokenizer's vocabulary.
        let config: [String: Any] = ["model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "num_key_value_heads": 1, "intermediate_size": 48, "vocab_size": tok.vocabSize]
        let m = try TransformerModel(config: try JSONSerialization.data(withJSONObject: config))
        var rng = SeededRandom(seed: 3)
        for i in 0..<m.parameters.count { m.parameters.values[i] = rng.normal() * 0.5 }
        m.parameters.markModified()
        let gen = Generator(model: m, tokenizer: tok, slots: 2, capacity: 64)
        var params = SamplingParams()
        params.temperature = 0
        params.maxTokens = 30
        params.ignoreEOS = true
        let prompt = try tok.encode("Hello world", addSpecialTokens: false)
        let free = try gen.generate(prompts: [prompt], params: params).results[0][0]
        // Find a boundary between two multi-character token texts and stop on a string spanning it.
        var pieces: [String] = []
        for t in free.tokens { pieces.append(try tok.decode([t])) }
        func usable(_ s: String) -> Bool { !s.isEmpty && !s.contains("\u{FFFD}") }
        guard let k = (1..<pieces.count).first(where: { (i: Int) -> Bool in usable(pieces[i - 1]) && usable(pieces[i]) }) else {
            return XCTFail("no usable token boundary in \(pieces)")
        }
        let stop = String(pieces[k - 1].suffix(1)) + String(pieces[k].prefix(1))
        let before = pieces[0..<(k - 1)].joined() + String(pieces[k - 1].dropLast())
        XCTAssertFalse(before.contains(stop), "pick a stop string with no earlier occurrence")
        print("stop string \(stop.debugDescription) spans tokens \(k - 1) and \(k)")
        params.stop = [stop]
        let stopped = try gen.generate(prompts: [prompt], params: params).results[0][0]
        XCTAssertEqual(stopped.finishReason, .stop)
        XCTAssertEqual(stopped.text, before)
        XCTAssertEqual(stopped.tokens, Array(free.tokens[0...k]), "generation stops at the token that completes the stop string")
        XCTAssertEqual(stopped.logprobs.count, stopped.tokens.count)
    }

    func testEOSStopTokensAndLimits() throws {
        let m = try model()
        let gen = Generator(model: m, tokenizer: nil, slots: 2, capacity: 16)
        var params = SamplingParams()
        params.temperature = 0
        params.maxTokens = 8
        let free = try gen.generate(prompts: [[1, 2]], params: params).results[0][0]
        params.stopTokenIds = [free.tokens[2]]
        let stopped = try gen.generate(prompts: [[1, 2]], params: params).results[0][0]
        XCTAssertEqual(stopped.finishReason, .stop)
        XCTAssertEqual(stopped.tokens, Array(free.tokens[0...(free.tokens.firstIndex(of: free.tokens[2])!)]))
        params.maxTokens = 20
        XCTAssertThrowsError(try gen.submit(prompts: [[1, 2]], params: params)) { e in
            XCTAssertEqual(e as? GenerationError, .contextOverflow(promptIndex: 0, needed: 22, capacity: 16))
        }
        XCTAssertThrowsError(try gen.submit(prompts: [[]], params: SamplingParams()))
        XCTAssertThrowsError(try gen.submit(prompts: [[1, 500]], params: SamplingParams()))
        XCTAssertThrowsError(try gen.submit(prompts: [[1]], n: 3, params: SamplingParams()))
        var bad = SamplingParams(); bad.topP = 0
        XCTAssertThrowsError(try gen.submit(prompts: [[1]], params: bad))
        XCTAssertTrue(gen.isIdle)
        XCTAssertEqual(gen.kvBytesInUse, 0)
    }

    func testCancelFreesSlots() throws {
        let gen = Generator(model: try model(), tokenizer: nil, slots: 2, capacity: 40)
        var params = SamplingParams()
        params.maxTokens = 30
        let id = try gen.submit(prompts: [[1, 2, 3]], n: 2, params: params)
        _ = try gen.step()
        XCTAssertEqual(gen.runningCount, 2)
        XCTAssertGreaterThan(gen.kvBytesInUse, 0)
        XCTAssertTrue(gen.cancel(id))
        XCTAssertEqual(gen.runningCount, 0)
        XCTAssertEqual(gen.kvBytesInUse, 0)
        XCTAssertFalse(gen.cancel(id))
        // A request needing more slots than are free waits, then runs.
        let a = try gen.submit(prompts: [[1]], n: 2, params: params)
        let b = try gen.submit(prompts: [[2]], n: 1, params: params)
        var done: Set<Int> = []
        while done.count < 2 { for r in try gen.step() { done.insert(r.requestId) } }
        XCTAssertEqual(done, [a, b])
    }

    // MARK: - Rollout store

    func testRolloutStoreBudgetEvictionAndRelease() throws {
        let store = RolloutStore(budgetBytes: 1000)
        let r = Rollout(tokens: Array(repeating: 1, count: 50), responseStart: 10, logprobs: Array(repeating: 0, count: 40),
                        proxyLogprobs: [], temperature: 1, proxy: nil, weightsVersion: 0)
        let ids = (0..<5).map { _ in store.add(r) }
        XCTAssertLessThanOrEqual(store.bytes, 1000)
        XCTAssertThrowsError(try store.get(ids[0])) { e in XCTAssertEqual(e as? RolloutError, .evicted(ids[0])) }
        XCTAssertEqual(try store.get(ids[4]).responseStart, 10)
        XCTAssertThrowsError(try store.get("r-nope-1")) { e in XCTAssertEqual(e as? RolloutError, .unknown("r-nope-1")) }
        XCTAssertEqual(store.release([ids[4], "r-nope-1"]), 1)
        XCTAssertThrowsError(try store.get(ids[4])) { e in XCTAssertEqual(e as? RolloutError, .unknown(ids[4])) }

        // Released as it goes and never evicting, the store's bookkeeping stays bounded.
        let roomy = RolloutStore(budgetBytes: 1 << 30)
        var kept: [String] = []
        for i in 0..<50_000 {
            let id = roomy.add(r)
            if i % 100 == 0 { kept.append(id) } else { roomy.release([id]) }
        }
        XCTAssertEqual(roomy.count, 500)
        XCTAssertLessThanOrEqual(roomy.trackedIds, 2 * 500 + 4096 + 1)
        for id in kept { XCTAssertEqual(try roomy.get(id).responseStart, 10) }

        // Generation records rollouts with their sampling-time statistics.
        let gen = Generator(model: try model(), tokenizer: nil, slots: 2, capacity: 16, rolloutStore: RolloutStore(budgetBytes: 1 << 20))
        var params = SamplingParams(); params.maxTokens = 4; params.seed = 1
        var options = GenerationOptions(); options.proxy = .threshold(0.01)
        let out = try gen.generate(prompts: [[4, 5]], params: params, options: options).results[0][0]
        let stored = try gen.rolloutStore!.get(out.rolloutId!)
        XCTAssertEqual(stored.tokens, [4, 5] + out.tokens)
        XCTAssertEqual(stored.responseStart, 2)
        XCTAssertEqual(stored.logprobs, out.logprobs)
        XCTAssertEqual(stored.proxyLogprobs, out.proxyLogprobs!)
    }
}
