// LoRA adapters through the protocol: generate, logprob and train_step agree bit for bit under an
// adapter; a decode step mixing adapters gives each row the bits it gets alone; training an
// adapter leaves the base untouched; checkpoints, PEFT folders and merges round-trip; bad calls
// are refused with their path and change nothing.
import Engine
import Foundation
import Kernels
import Models
import RPC
import TestSupport
import Tokenizer
import Weights
import XCTest

final class AdapterRPCTests: XCTestCase {
    var dispatcher: Dispatcher!
    var checkpointDir = ""

    override func setUpWithError() throws {
        Compute.setThreads(2)
        checkpointDir = NSTemporaryDirectory() + "adapter-rpc-\(UUID().uuidString)"
        let model = try TransformerModel.load(directory: fixtureModel("qwen2_tied"))
        var config = Dispatcher.Configuration()
        config.slots = 8
        config.capacity = 64
        config.checkpoints = try CheckpointStore.open(directory: checkpointDir)
        config.adapterDirectories = [fixturesDirectory + "/lora"]
        config.maxAdapters = 4
        dispatcher = Dispatcher(model: model, tokenizer: nil, configuration: config)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: checkpointDir) }

    func call(_ method: String, _ params: [String: Any]) throws -> [String: Any] {
        let body = try JSONSerialization.data(withJSONObject: ["jsonrpc": "2.0", "method": method, "params": params, "id": 1])
        guard case let .single(.success(request), _) = JSONRPC.decode(body) else { throw RPCError.invalidRequest("decode") }
        let result = try dispatcher.call(request.method, request.params)
        let encoded = JSONRPC.encode(JSONRPC.response(id: .number("1"), result: result))
        return (try JSONSerialization.jsonObject(with: encoded) as! [String: Any])["result"] as! [String: Any]
    }

    func expectError(_ method: String, _ params: [String: Any], kind: String, path: String? = nil, hint: String? = nil,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try dispatcher.call(method, params), file: file, line: line) { e in
            guard let r = e as? RPCError else { return XCTFail("\(e)", file: file, line: line) }
            XCTAssertEqual(r.kind.rawValue, kind, "\(r)", file: file, line: line)
            if let path { XCTAssertEqual(r.path, path, "\(r)", file: file, line: line) }
            if let hint { XCTAssertTrue(r.hint?.contains(hint) ?? false, "\(r)", file: file, line: line) }
        }
    }

    func floats(_ v: Any?) -> [Float] { (v as! [NSNumber]).map { $0.floatValue } }
    func sample(_ r: [String: Any], _ p: Int = 0, _ s: Int = 0) -> [String: Any] {
        ((r["results"] as! [[String: Any]])[p]["samples"] as! [[String: Any]])[s]
    }

    /// An adapter with non-zero B, so it changes the model (a fresh one is exactly the base).
    func perturbed(_ name: String, seed: UInt64) throws {
        _ = try call("adapters.create", ["name": name, "rank": 4, "alpha": 8, "seed": Int(seed)])
        _ = try call("train_step", ["adapter": name, "batch": [["tokens": [3, 9, 27, 81, 50, 11], "response_start": 2, "advantage": 1.0]],
                                    "loss": ["mode": "ppo"], "optimizer": ["lr": 0.05]])
    }

    func testGenerateLogprobAndTrainAgreeUnderAnAdapterAndTheBaseStaysFrozen() throws {
        let baseSum = dispatcher.model.parameters.checksum()
        let created = try call("adapters.create", ["name": "a", "rank": 4, "alpha": 8, "seed": 1])
        XCTAssertEqual(created["weights_version"] as? Int, 0)
        XCTAssertEqual(created["modules"] as? Int, 2 * 7)
        let gen = ["prompt_tokens": [[5, 6, 7]], "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2, "ignore_eos": true] as [String: Any]
        let baseOut = try call("generate", gen)
        // A new adapter is exactly the base.
        XCTAssertEqual(sample(try call("generate", gen.merging(["adapter": "a"]) { $1 }))["tokens"] as! [Int],
                       sample(baseOut)["tokens"] as! [Int])
        try perturbed("b", seed: 2)
        XCTAssertEqual(dispatcher.model.parameters.checksum(), baseSum, "adapter training must not move the base")
        XCTAssertEqual(try call("server.info", [:])["weights_version"] as? Int, 0)
        let out = try call("generate", gen.merging(["adapter": "b"]) { $1 })
        XCTAssertEqual(out["weights_version"] as? Int, 1)
        let s = sample(out)
        XCTAssertEqual(s["weights_version"] as? Int, 1)
        let tokens = [5, 6, 7] + (s["tokens"] as! [Int])
        let scored = try call("logprob", ["sequences": [["tokens": tokens, "response_start": 3]], "adapter": "b"])
        assertIdentical(floats((scored["results"] as! [[String: Any]])[0]["logprobs"]), floats(s["logprobs"]), "logprob vs generate")
        let base = try call("logprob", ["sequences": [["tokens": tokens, "response_start": 3]]])
        XCTAssertNotEqual(floats((base["results"] as! [[String: Any]])[0]["logprobs"]), floats(s["logprobs"]), "the adapter changes the model")
        // The trainer recomputes the sampler's log-probabilities bit for bit.
        let ids = ((out["results"] as! [[String: Any]])[0]["samples"] as! [[String: Any]]).map { $0["rollout_id"] as! String }
        let step = try call("train_step", ["adapter": "b", "rollouts": [["rollout_id": ids[0], "reward": 1.0], ["rollout_id": ids[1], "reward": 0.0]],
                                           "loss": ["mode": "lp_reg"], "dry_run": true])
        XCTAssertEqual((step["metrics"] as! [String: Any])["logprob_max_abs_diff"] as? Double, 0)
        // Rollouts of one policy do not train another.
        expectError("train_step", ["rollouts": [["rollout_id": ids[0], "reward": 1.0]], "loss": ["mode": "ppo"]],
                    kind: "invalid_params", path: "params.rollouts[0].rollout_id", hint: "adapter 'b'")
        XCTAssertEqual(dispatcher.model.parameters.checksum(), baseSum)
    }

    /// One decode batch with rows of two adapters and of the base: every sample has the tokens
    /// and log-probabilities it gets when its request runs alone.
    func testMixedAdapterDecodeRowsMatchTheirOwnRuns() throws {
        try perturbed("a", seed: 1)
        try perturbed("b", seed: 2)
        let requests: [String?] = ["a", nil, "b", "a"]
        func parsed(_ i: Int) throws -> Dispatcher.GenerateCall {
            var p: [String: Any] = ["prompt_tokens": [[1 + i, 8, 9]], "max_tokens": 10, "temperature": 1.0, "seed": 40 + i, "n": 2,
                                    "ignore_eos": true]
            if let a = requests[i] { p["adapter"] = a }
            return try dispatcher.prepareGenerate(try Params(p))
        }
        func run(_ indices: [Int]) throws -> [Int: GenerationResult] {
            var ids: [Int: Int] = [:]
            for i in indices { ids[try dispatcher.submit(try parsed(i))] = i }
            var done: [Int: GenerationResult] = [:]
            while done.count < indices.count {
                for r in try dispatcher.generator.step() { done[ids[r.requestId]!] = r }
            }
            return done
        }
        let together = try run(Array(requests.indices))
        for i in requests.indices {
            let alone = try run([i])[i]!
            for (x, y) in zip(together[i]!.results[0], alone.results[0]) {
                XCTAssertEqual(x.tokens, y.tokens, "request \(i)")
                assertIdentical(x.logprobs, y.logprobs, "request \(i)")
            }
        }
        XCTAssertNotEqual(together[0]!.results[0][0].tokens, together[1]!.results[0][0].tokens)
    }

    func testEachAdapterHasItsOwnOptimizerAndReference() throws {
        _ = try call("adapters.create", ["name": "a", "rank": 2])
        _ = try call("adapters.create", ["name": "b", "rank": 2, "target_modules": ["q_proj", "v_proj"]])
        let set = try call("optimizer.configure", ["adapter": "a", "lr": 0.25])
        XCTAssertEqual(set["lr"] as? Double, 0.25)
        XCTAssertEqual(dispatcher.trainer.optimizer.settings.lr, AdamWSettings().lr, "the base's optimizer is untouched")
        _ = try call("reference.snapshot", ["adapter": "a"])
        let list = try call("adapters.list", [:])["adapters"] as! [[String: Any]]
        XCTAssertEqual(list.map { $0["name"] as! String }, ["a", "b"])
        XCTAssertEqual(list[1]["target_modules"] as? [String], ["q_proj", "v_proj"])
        XCTAssertEqual(list[1]["modules"] as? Int, 4)
        XCTAssertEqual(list[0]["alpha"] as? Double, 2, "alpha defaults to the rank")
        // kl_coef needs the adapter's own reference: "b" has none.
        let item: [String: Any] = ["tokens": [3, 4, 5, 6], "response_start": 2, "advantage": 1.0]
        _ = try call("train_step", ["adapter": "a", "batch": [item], "loss": ["mode": "ppo", "kl_coef": 0.1]])
        expectError("train_step", ["adapter": "b", "batch": [item], "loss": ["mode": "ppo", "kl_coef": 0.1]],
                    kind: "invalid_params", path: "params.loss.kl_coef")
        let steps = (try call("adapters.list", [:])["adapters"] as! [[String: Any]]).map { $0["optimizer_steps"] as! Int }
        XCTAssertEqual(steps, [1, 0])
    }

    func testCheckpointsPEFTFoldersAndMergesRoundTrip() throws {
        try perturbed("a", seed: 1)
        let adapter = { (name: String) in try XCTUnwrap(self.dispatcher.adapter(named: name)) }
        let saved = try adapter("a").parameters.checksum()
        _ = try call("checkpoint.save", ["name": "c1"])
        try perturbed("later", seed: 5)
        _ = try call("train_step", ["adapter": "a", "batch": [["tokens": [7, 8, 9], "response_start": 1, "advantage": -1.0]],
                                    "loss": ["mode": "ppo"], "optimizer": ["lr": 0.05]])
        XCTAssertNotEqual(try adapter("a").parameters.checksum(), saved)
        // checkpoint.load restores the adapters as they were saved (and only those).
        _ = try call("checkpoint.load", ["name": "c1"])
        XCTAssertEqual(try adapter("a").parameters.checksum(), saved)
        XCTAssertEqual((try call("adapters.list", [:])["adapters"] as! [[String: Any]]).map { $0["name"] as! String }, ["a"])
        XCTAssertEqual((try call("adapters.list", [:])["adapters"] as! [[String: Any]])[0]["weights_version"] as? Int, 1)

        // adapters.save writes a PEFT folder that adapters.load reads back.
        let out = try call("adapters.save", ["name": "a"])
        XCTAssertTrue(FileManager.default.fileExists(atPath: (out["path"] as! String) + "/adapter_config.json"))
        _ = try call("adapters.load", ["name": "a2", "path": "adapters/a"])
        XCTAssertEqual(try adapter("a2").parameters.checksum(), saved)
        // A PEFT-written folder from an --adapter-dir.
        _ = try call("adapters.load", ["name": "peft", "path": fixturesDirectory + "/lora/qwen2_tied/adapter"])

        // The merged checkpoint scores as base + adapter does.
        _ = try call("adapters.merge", ["name": "a", "checkpoint": "merged"])
        let merged = try TransformerModel.load(directory: checkpointDir + "/merged")
        let seq = ScoredSequence(tokens: [4, 9, 16, 25, 36, 49], responseStart: 1)
        let viaAdapter = try call("logprob", ["sequences": [["tokens": seq.tokens.map(Int.init), "response_start": 1]], "adapter": "a"])
        let viaMerged = try Scoring.score(model: merged, sequences: [seq])[0].logprobs
        assertClose(viaMerged, floats((viaAdapter["results"] as! [[String: Any]])[0]["logprobs"]), atol: 1e-5, rtol: 1e-5, "merged")
        // Deleting an adapter frees its name.
        XCTAssertEqual(try call("adapters.delete", ["name": "a2"])["deleted"] as? String, "a2")
        expectError("generate", ["prompt_tokens": [[1]], "adapter": "a2"], kind: "unknown_adapter", path: "params.adapter")
    }

    func testBadAdapterCallsAreRefusedAndChangeNothing() throws {
        _ = try call("adapters.create", ["name": "a", "rank": 2])
        let before = try dispatcher.adapter(named: "a")!.parameters.checksum()
        expectError("adapters.create", ["name": "a", "rank": 2], kind: "adapter_exists", path: "params.name")
        expectError("adapters.create", ["name": "../x", "rank": 2], kind: "invalid_params", path: "params.name")
        expectError("adapters.create", ["name": "z", "rank": 0], kind: "invalid_params", path: "params.rank")
        expectError("adapters.create", ["name": "z", "rank": 64], kind: "invalid_params", path: "params.rank", hint: "exceeds")
        expectError("adapters.create", ["name": "z", "rank": 2, "target_modules": ["c_attn"]], kind: "invalid_params",
                    path: "params.target_modules[0]", hint: "q_proj")
        expectError("generate", ["prompt_tokens": [[1]], "adapter": "nope"], kind: "unknown_adapter", path: "params.adapter")
        expectError("logprob", ["sequences": [["tokens": [1, 2], "response_start": 1]], "adapter": "nope"], kind: "unknown_adapter")
        expectError("train_step", ["batch": [["tokens": [1, 2], "response_start": 1, "advantage": 1]], "loss": ["mode": "ppo"],
                                   "adapter": "nope"], kind: "unknown_adapter", path: "params.adapter")
        expectError("adapters.delete", ["name": "nope"], kind: "unknown_adapter", path: "params.name")
        expectError("adapters.load", ["name": "x", "path": "/etc"], kind: "invalid_params", path: "params.path", hint: "outside")
        expectError("adapters.load", ["name": "x", "path": fixturesDirectory + "/lora/gpt2/adapter"], kind: "invalid_params",
                    path: "params.path", hint: "c_attn")
        expectError("adapters.load", ["name": "x", "path": fixturesDirectory + "/lora/qwen3_headdim/adapter"], kind: "invalid_params",
                    path: "params.path", hint: "another shape")
        for i in 0..<3 { _ = try call("adapters.create", ["name": "n\(i)", "rank": 1]) }
        expectError("adapters.create", ["name": "n9", "rank": 1], kind: "overloaded", hint: "--max-adapters")
        XCTAssertEqual(try dispatcher.adapter(named: "a")!.parameters.checksum(), before)
        XCTAssertEqual((try call("adapters.list", [:])["adapters"] as! [Any]).count, 4)
    }

    func testReadOnlyRefusesAdapterChanges() throws {
        var config = Dispatcher.Configuration()
        config.readOnly = true
        dispatcher = Dispatcher(model: try TransformerModel.load(directory: fixtureModel("qwen2_tied")), tokenizer: nil, configuration: config)
        for (m, p) in [("adapters.create", ["name": "a", "rank": 2]), ("adapters.delete", ["name": "a"]),
                       ("adapters.load", ["name": "a", "path": "x"]), ("adapters.merge", ["name": "a", "checkpoint": "m"]),
                       ("adapters.save", ["name": "a"])] as [(String, [String: Any])] {
            expectError(m, p, kind: "read_only")
        }
        XCTAssertEqual((try call("adapters.list", [:])["adapters"] as! [Any]).count, 0)
    }
}
