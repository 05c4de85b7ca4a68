// The protocol's methods through the dispatcher, without sockets, with JSON round trips: results
// agree across generate / logprob / train_step after encoding, and bad calls are refused with
// the parameter's path and a stable kind.
import Engine
import Foundation
import Kernels
import Models
import RPC
import TestSupport
import Tokenizer
import Weights
import XCTest

final class DispatcherTests: XCTestCase {
    var dispatcher: Dispatcher!

    override func setUpWithError() throws {
        Compute.setThreads(2)
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        let tok = try Tokenizer(directory: fixturesDirectory + "/tokenizers/qwen2")
        var config = Dispatcher.Configuration()
        config.slots = 8
        config.capacity = 64
        dispatcher = Dispatcher(model: model, tokenizer: tok, configuration: config)
    }

    /// Calls a method through a full JSON round trip (request encoded, response decoded).
    func call(_ method: String, _ params: [String: Any]) throws -> [String: Any] {
        let body = try JSONSerialization.data(withJSONObject: ["jsonrpc": "2.0", "method": method, "params": params, "id": 1])
        guard case let .single(.success(request), _) = JSONRPC.decode(body) else { throw RPCError.invalidRequest("decode") }
        let result = try dispatcher.call(request.method, request.params)
        let encoded = JSONRPC.encode(JSONRPC.response(id: .number("1"), result: result))
        let obj = try JSONSerialization.jsonObject(with: encoded) as! [String: Any]
        return obj["result"] as! [String: Any]
    }

    func expectError(_ method: String, _ params: [String: Any], kind: String, path: String? = nil,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try dispatcher.call(method, params), file: file, line: line) { e in
            guard let r = e as? RPCError else { return XCTFail("\(e)", file: file, line: line) }
            XCTAssertEqual(r.kind.rawValue, kind, "\(r)", file: file, line: line)
            if let path { XCTAssertEqual(r.path, path, "\(r)", file: file, line: line) }
        }
    }

    func floats(_ v: Any?) -> [Float] { (v as! [NSNumber]).map { $0.floatValue } }

    func testInfoTokenizeDetokenize() throws {
        let info = try call("server.info", [:])
        XCTAssertEqual((info["model"] as! [String: Any])["model_type"] as? String, "qwen2")
        XCTAssertEqual(info["weights_version"] as? Int, 0)
        let t = try call("tokenize", ["text": "hello world", "add_special_tokens": false])
        let ids = (t["tokens"] as! [NSNumber]).map { $0.int32Value }
        XCTAssertEqual(ids, try dispatcher.tokenizer!.encode("hello world", addSpecialTokens: false))
        let d = try call("detokenize", ["tokens": ids.map(Int.init)])
        XCTAssertEqual(d["text"] as? String, "hello world")
        let many = try call("tokenize", ["texts": ["a", "b c"]])
        XCTAssertEqual((many["token_lists"] as! [Any]).count, 2)
    }

    /// Log-probs from generate, sent back through JSON to logprob and train_step, agree exactly.
    func testGenerateLogprobTrainStepRoundTrip() throws {
        let g = try call("generate", ["prompt_tokens": [[1, 2, 3], [4, 5]], "n": 2, "max_tokens": 6, "seed": 7,
                                      "temperature": 0.8, "proxy": ["min_p": 0.05], "entropy": true, "top_logprobs": 2])
        let results = g["results"] as! [[String: Any]]
        XCTAssertEqual(results.count, 2)
        var sequences: [[String: Any]] = [], sampled: [[Float]] = [], rollouts: [[String: Any]] = []
        for r in results {
            let prompt = r["prompt_tokens"] as! [Int]
            for (k, s) in (r["samples"] as! [[String: Any]]).enumerated() {
                sequences.append(["tokens": prompt + (s["tokens"] as! [Int]), "response_start": prompt.count])
                sampled.append(floats(s["logprobs"]))
                XCTAssertEqual((s["top_logprobs"] as! [Any]).count, (s["tokens"] as! [Any]).count)
                XCTAssertEqual(s["weights_version"] as? Int, 0, "every sample names the weights it was drawn under")
                rollouts.append(["rollout_id": s["rollout_id"] as! String, "reward": Double(k)])
            }
        }
        let scored = try call("logprob", ["sequences": sequences, "temperature": 0.8])
        for (a, r) in zip(sampled, scored["results"] as! [[String: Any]]) {
            XCTAssertEqual(a.map(\.bitPattern), floats(r["logprobs"]).map(\.bitPattern))
        }
        let step = try call("train_step", ["rollouts": rollouts, "advantage_estimator": "grpo",
                                           "loss": ["mode": "lp_reg", "temperature": 0.8, "rho": 0.2, "min_p": 0.05],
                                           "optimizer": ["lr": 1e-3]])
        XCTAssertEqual(step["weights_version"] as? Int, 1)
        let metrics = step["metrics"] as! [String: Any]
        XCTAssertEqual(metrics["logprob_max_abs_diff"] as? Double, 0)
        XCTAssertEqual((try call("server.info", [:]))["weights_version"] as? Int, 1)
        let after = try call("generate", ["prompt_tokens": [[1, 2, 3]], "max_tokens": 2, "seed": 1])
        let afterSample = ((after["results"] as! [[String: Any]])[0]["samples"] as! [[String: Any]])[0]
        XCTAssertEqual(afterSample["weights_version"] as? Int, 1)
        // Explicit batch items with per-sequence advantages and the sampled log-probs, dry run.
        let batch = zip(sequences, sampled).map { s, lp -> [String: Any] in
            var b = s; b["advantage"] = 1.0; b["old_logprobs"] = lp.map(Double.init); return b
        }
        let dry = try call("train_step", ["batch": batch, "loss": ["mode": "ppo"], "dry_run": true])
        XCTAssertEqual(dry["weights_version"] as? Int, 1)
        let released = try call("rollouts.release", ["rollout_ids": [rollouts[0]["rollout_id"]!]])
        XCTAssertEqual(released["released"] as? Int, 1)
        expectError("train_step", ["rollouts": [rollouts[0]], "loss": ["mode": "ppo"]], kind: "unknown_rollout",
                    path: "params.rollouts[0].rollout_id")
    }

    /// probe_tokens reports named tokens at every position: the taken token's probe equals its
    /// logprob bit for bit, the probes agree with top_logprobs where both name a token, and the
    /// probabilities of every vocabulary token, probed, sum to 1.
    func testProbeTokensReportNamedTokensAtEveryPosition() throws {
        let tokens = [1, 2, 3, 4, 5, 6, 7]
        let info = try call("server.info", [:])
        let vocab = (info["model"] as! [String: Any])["vocab_size"] as! Int
        let top = try call("logprob", ["sequences": [["tokens": tokens, "response_start": 2]], "temperature": 0.7, "top_logprobs": 3])
        let topRows = (top["results"] as! [[String: Any]])[0]["top_logprobs"] as! [[[String: Any]]]
        for pos in 0..<5 {
            let taken = tokens[2 + pos], best = topRows[pos][0]["token"] as! Int
            let r = try call("logprob", ["sequences": [["tokens": tokens, "response_start": 2]], "temperature": 0.7,
                                         "probe_tokens": [taken, best, 0]])
            let s = (r["results"] as! [[String: Any]])[0]
            let probes = (s["probe_logprobs"] as! [[NSNumber]]).map { $0.map(\.floatValue) }
            XCTAssertEqual(probes.count, 5)
            XCTAssertEqual(probes[pos][0].bitPattern, floats(s["logprobs"])[pos].bitPattern, "position \(pos)")
            XCTAssertEqual(probes[pos][1].bitPattern, (topRows[pos][0]["logprob"] as! NSNumber).floatValue.bitPattern)
        }
        // Every token probed (in slices of the limit): the probabilities sum to 1 at each position.
        var sums = [Double](repeating: 0, count: 5)
        for start in stride(from: 0, to: vocab, by: Dispatcher.maxProbeTokens) {
            let ids = Array(start..<min(vocab, start + Dispatcher.maxProbeTokens))
            let r = try call("logprob", ["sequences": [["tokens": tokens, "response_start": 2]], "probe_tokens": ids])
            let probes = ((r["results"] as! [[String: Any]])[0]["probe_logprobs"] as! [[NSNumber]])
            for (pos, row) in probes.enumerated() { sums[pos] += row.reduce(0) { $0 + exp($1.doubleValue) } }
        }
        for s in sums { XCTAssertEqual(s, 1, accuracy: 1e-4) }
        let plain = try call("logprob", ["sequences": [["tokens": tokens, "response_start": 2]]])
        XCTAssertNil((plain["results"] as! [[String: Any]])[0]["probe_logprobs"], "only when asked")
        expectError("logprob", ["sequences": [["tokens": tokens, "response_start": 2]], "probe_tokens": [3, vocab]],
                    kind: "invalid_params", path: "params.probe_tokens[1]")
        expectError("logprob", ["sequences": [["tokens": tokens, "response_start": 2]], "probe_tokens": [-1]],
                    kind: "invalid_params", path: "params.probe_tokens[0]")
        expectError("logprob", ["sequences": [["tokens": tokens, "response_start": 2]],
                                "probe_tokens": Array(repeating: 1, count: Dispatcher.maxProbeTokens + 1)],
                    kind: "invalid_params", path: "params.probe_tokens")
    }

    /// Error kinds travel as types from the engine to the wire: an evicted rollout is
    /// `evicted_rollout` because the store said so, and no message text decides a kind.
    func testErrorKindsAreTypedNotReadFromMessages() throws {
        var config = Dispatcher.Configuration()
        config.rolloutBudgetBytes = 400    // room for about two short rollouts
        let d = Dispatcher(model: try TransformerModel.load(directory: fixtureModel("qwen2_tied")), tokenizer: nil, configuration: config)
        var ids: [Any] = []
        for seed in 0..<4 {
            let r = try d.call("generate", ["prompt_tokens": [[1, 2]], "max_tokens": 3, "seed": seed]) as! [String: Any]
            ids.append(((r["results"] as! [[String: Any]])[0]["samples"] as! [[String: Any]])[0]["rollout_id"]!)
        }
        XCTAssertThrowsError(try d.call("train_step", ["rollouts": [["rollout_id": ids[0], "reward": 1.0]], "loss": ["mode": "ppo"]])) { e in
            XCTAssertEqual((e as? RPCError)?.kind, .evictedRollout)
            XCTAssertEqual((e as? RPCError)?.path, "params.rollouts[0].rollout_id")
        }
        // Messages that mention rollouts or eviction do not change a kind.
        let worded = Dispatcher.translate(TrainError.invalid(path: "rollouts[0]", reason: "this rollout was evicted"))
        XCTAssertEqual(worded.kind, .invalidParams)
        XCTAssertEqual(Dispatcher.translate(TrainError.rollout(index: 2, .unknown("r"))).kind, .unknownRollout)
        XCTAssertEqual(Dispatcher.translate(TrainError.rollout(index: 2, .evicted("r"))).path, "params.rollouts[2].rollout_id")
        XCTAssertEqual(Dispatcher.translate(CheckpointStoreError.notFound("x")).kind, .checkpointNotFound)
        XCTAssertEqual(Dispatcher.translate(GenerationError.overloaded("busy")).kind, .overloaded)
        // A direct call to cancel is refused: cancellation lives in the scheduler alone.
        XCTAssertThrowsError(try d.call("cancel", ["request_id": 1])) { XCTAssertEqual(($0 as? RPCError)?.kind, .invalidRequest) }
    }

    func testBadCallsNameTheParameter() throws {
        expectError("no.such", [:], kind: "method_not_found")
        expectError("generate", ["prompt_tokens": [[1, 2]], "max_tokens": "ten"], kind: "invalid_params", path: "params.max_tokens")
        expectError("generate", ["prompt_tokens": [[1, -2]]], kind: "invalid_params", path: "params.prompt_tokens[0][1]")
        expectError("generate", ["prompt_tokens": [[1, 2]], "temprature": 1], kind: "invalid_params", path: "params.temprature")
        expectError("generate", ["prompt_tokens": [[1, 2]], "max_tokens": 500], kind: "context_overflow", path: "params.prompts[0]")
        expectError("generate", ["prompt_tokens": [[1, 2]], "top_p": 0], kind: "invalid_params", path: "params.top_p")
        expectError("logprob", ["sequences": [["tokens": [1, 2, 3], "response_start": 0]]], kind: "invalid_params",
                    path: "params.sequences[0].response_start")
        expectError("logprob", ["sequences": [["tokens": [1, 2, 3], "response_start": 5]]], kind: "invalid_params")
        expectError("train_step", ["batch": [["tokens": [1, 2, 3], "response_start": 1, "advantage": 1]],
                                   "loss": ["mode": "lp_regg"]], kind: "invalid_params", path: "params.loss.mode")
        expectError("train_step", ["batch": [["tokens": [1, 2, 3], "response_start": 1, "advantage": [1]]],
                                   "loss": ["mode": "ppo"]], kind: "invalid_params", path: "params.batch[0].advantage")
        expectError("train_step", ["batch": [["tokens": [1, 2, 3], "response_start": 1, "advantage": 1]],
                                   "loss": ["mode": "ppo", "kl_coef": 0.1]], kind: "invalid_params", path: "params.loss.kl_coef")
        expectError("optimizer.configure", ["lr": -1], kind: "invalid_params", path: "params.lr")
        // Nothing is silently ignored or accepted out of range.
        expectError("optimizer.configure", ["betas": [1.5, 0.9]], kind: "invalid_params", path: "params.betas")
        expectError("optimizer.configure", ["eps": 0], kind: "invalid_params", path: "params.eps")
        expectError("optimizer.configure", ["schedule": ["type": "cosine", "total_steps": 5, "warmup": 2]], kind: "invalid_params",
                    path: "params.schedule.warmup")
        expectError("train_step", ["batch": [["tokens": [1, 2, 3], "response_start": 1, "advantage": 1]],
                                   "loss": ["mode": "ppo", "eps_hihg": 0.28]], kind: "invalid_params", path: "params.loss.eps_hihg")
        expectError("train_step", ["batch": [["tokens": [1, 2, 3], "response_start": 1, "advantage": 1]],
                                   "loss": ["mode": "ppo", "rho": 0.1]], kind: "invalid_params", path: "params.loss.rho")
        expectError("train_step", ["batch": [["tokens": [1, 2, 3], "response_start": 1, "advantage": 1]],
                                   "loss": ["mode": "ppo"], "optimizer": ["learning_rate": 0.1]], kind: "invalid_params",
                    path: "params.optimizer.learning_rate")
        expectError("server.info", ["verbose": true], kind: "invalid_params", path: "params.verbose")
        expectError("checkpoint.list", ["all": true], kind: "invalid_params", path: "params.all")
        expectError("reference.snapshot", ["name": "x"], kind: "invalid_params", path: "params.name")
        expectError("generate", ["prompt_tokens": [[1, 2]], "presence_penalty": 2.5], kind: "invalid_params", path: "params.presence_penalty")
        expectError("generate", ["prompt_tokens": [[1, 2]], "logit_bias": ["x": 1]], kind: "invalid_params", path: "params.logit_bias.x")
        expectError("generate", ["prompt_tokens": [[1, 2]], "logit_bias": ["999999": 1]], kind: "invalid_params", path: "params.logit_bias")
        let full = dispatcher
        var small = Dispatcher.Configuration()
        small.maxRequestTokens = 10
        dispatcher = Dispatcher(model: try TransformerModel.load(directory: fixtureModel("qwen2_tied")), tokenizer: nil, configuration: small)
        expectError("generate", ["prompt_tokens": [[1, 2]], "max_tokens": 5, "n": 2], kind: "request_too_large", path: "params.max_tokens")
        expectError("logprob", ["sequences": [["tokens": Array(repeating: 1, count: 11), "response_start": 1]]], kind: "request_too_large")
        expectError("train_step", ["batch": [["tokens": Array(repeating: 1, count: 11), "response_start": 1, "advantage": 1]],
                                   "loss": ["mode": "ppo"]], kind: "request_too_large", path: "params.batch")
        dispatcher = full
        XCTAssertEqual(dispatcher.trainer.weightsVersion, 0, "refused calls change nothing")
        let cfg = try call("optimizer.configure", ["lr": 0.01, "betas": [0.9, 0.95], "schedule": ["type": "linear_warmup", "warmup_steps": 5]])
        XCTAssertEqual((cfg["betas"] as! [NSNumber]).map { $0.floatValue }, [0.9, 0.95])
    }
}

final class CheckpointAndReadOnlyTests: XCTestCase {
    func testCheckpointsAreConfinedAtomicAndRestoreExactly() throws {
        Compute.setThreads(2)
        let dir = NSTemporaryDirectory() + "ember-ckpt-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = Dispatcher.Configuration()
        config.slots = 2
        config.capacity = 32
        let off = Dispatcher(model: try TransformerModel.load(directory: fixtureModel("llama_gqa")), tokenizer: nil, configuration: config)
        XCTAssertThrowsError(try off.call("checkpoint.save", ["name": "a"])) { XCTAssertEqual(($0 as? RPCError)?.kind, .checkpointsDisabled) }
        config.checkpoints = CheckpointStore(directory: dir)
        var d = Dispatcher(model: try TransformerModel.load(directory: fixtureModel("llama_gqa")), tokenizer: nil, configuration: config)
        var model: TransformerModel { d.model }
        func err(_ m: String, _ p: [String: Any]) -> RPCError? {
            do { _ = try d.call(m, p); return nil } catch { return error as? RPCError }
        }
        let batch: [[String: Any]] = [["tokens": [1, 2, 3, 4, 5], "response_start": 2, "advantage": 1.0]]
        _ = try d.call("train_step", ["batch": batch, "loss": ["mode": "ppo"], "optimizer": ["lr": 0.01]])
        _ = try d.call("checkpoint.save", ["name": "step-1"])
        _ = try d.call("checkpoint.save", ["name": "step-1"])    // overwrite: a new version behind the same name
        let saved = model.parameters.checksum()
        _ = try d.call("train_step", ["batch": batch, "loss": ["mode": "ppo"]])
        XCTAssertNotEqual(model.parameters.checksum(), saved)
        let loaded = try d.call("checkpoint.load", ["name": "step-1"]) as! [String: Any]
        XCTAssertEqual(model.parameters.checksum(), saved)
        XCTAssertEqual(loaded["weights_version"] as? Int, 1)
        XCTAssertEqual((try d.call("checkpoint.list", [:]) as! [String: Any])["names"] as? [String], ["step-1"])
        let entries = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        XCTAssertEqual(entries, ["step-1", "step-1.v2"], "old versions and temporaries are gone")
        for bad in ["../escape", "/etc/passwd", "a/b", "..", ".hidden", "x.v3", ""] {
            XCTAssertEqual(err("checkpoint.save", ["name": bad])?.path, "params.name", bad)
        }
        XCTAssertEqual(err("checkpoint.load", ["name": "missing"])?.kind.rawValue, "checkpoint_not_found")
        // A checkpoint whose optimizer state is damaged is refused before anything changes.
        _ = try d.call("checkpoint.save", ["name": "torn"])
        let tornFolder = try CheckpointStore(directory: dir).folder("torn")
        try Data("not safetensors".utf8).write(to: URL(fileURLWithPath: tornFolder + "/optimizer.safetensors"))
        _ = try d.call("train_step", ["batch": batch, "loss": ["mode": "ppo"]])
        let live = model.parameters.checksum(), liveVersion = d.trainer.weightsVersion
        XCTAssertNotNil(err("checkpoint.load", ["name": "torn"]))
        XCTAssertEqual(model.parameters.checksum(), live, "weights untouched by a failed load")
        XCTAssertEqual(d.trainer.weightsVersion, liveVersion)

        config.readOnly = true
        d = Dispatcher(model: try TransformerModel.load(directory: fixtureModel("llama_gqa")), tokenizer: nil, configuration: config)
        let before = model.parameters.checksum()
        for m in ["train_step", "optimizer.configure", "reference.snapshot", "checkpoint.save", "checkpoint.load"] {
            XCTAssertEqual(err(m, m == "train_step" ? ["batch": batch, "loss": ["mode": "ppo"]] : ["name": "step-1"])?.kind.rawValue, "read_only", m)
        }
        XCTAssertNoThrow(try d.call("train_step", ["batch": batch, "loss": ["mode": "ppo"], "dry_run": true]))
        XCTAssertNoThrow(try d.call("logprob", ["sequences": [["tokens": [1, 2, 3], "response_start": 1]]]))
        XCTAssertEqual(model.parameters.checksum(), before)
    }
}
