// LoRA against PEFT (scripts/make_lora_fixtures.py): logits and every adapter gradient on every
// family, PEFT's folder read and written, merge_and_unload, a new adapter being exactly the base,
// rows independent of the adapters beside them, and bad adapters refused.
import Engine
import Foundation
import Kernels
import Models
import TestSupport
import Weights
import XCTest

final class LoRATests: XCTestCase {
    override func setUp() { Compute.setThreads(2) }

    func fixture(_ name: String) -> String { fixturesDirectory + "/lora/" + name }

    func load(_ name: String) throws -> (TransformerModel, LoRAAdapter, GoldenTests.Golden, SafetensorsFile) {
        let model = try TransformerModel.load(directory: fixtureModel(name))
        let adapter = try LoRAAdapter.load(directory: fixture(name) + "/adapter", model: model)
        return (model, adapter, try GoldenTests.Golden(fixtureModel(name)),
                try SafetensorsFile(path: fixture(name) + "/golden.safetensors"))
    }

    func logits(_ model: TransformerModel, _ b: PackedBatch, _ adapters: AdapterRows?) throws -> [Float] {
        let acts = try model.forward(tokens: b.tokens, positions: b.positions, context: .packed(sequenceStarts: b.sequenceStarts),
                                     adapters: adapters)
        var out: [Float] = []
        model.withLogitChunks(hidden: acts.hidden.pointer, rows: Array(0..<b.tokens.count), chunkRows: 64) { range, l in
            out += Array(UnsafeBufferPointer(start: l, count: range.count * model.architecture.vocabSize))
        }
        return out
    }

    func testLogitsAndEveryAdapterGradientMatchPEFT() throws {
        for name in GoldenTests.families {
            let (model, adapter, golden, peft) = try load(name)
            let b = golden.batch
            let cmp = assertClose(try logits(model, b, AdapterRows(adapter, tokens: b.tokens.count)), try peft.floats("logits"),
                                  name + " adapted logits")
            let ce = NextTokenCrossEntropy(batch: b)
            let result = try Training.accumulateGradients(model: model, batch: b, outputRows: ce.outputRows, chunkRows: 5,
                                                          adapter: adapter, loss: ce.function)
            assertClose([Float(result.loss)], try peft.floats("loss"), name + " loss")
            var worst: Float = 0
            for slot in adapter.parameters.layout.slots {
                let actual = Array(UnsafeBufferPointer(start: adapter.parameters.gradients + slot.offset, count: slot.count))
                worst = max(worst, assertClose(actual, try peft.floats("grad." + slot.name), "\(name) grad \(slot.name)").maxAbsDiff)
            }
            XCTAssertEqual(Set(adapter.parameters.layout.slots.map { "grad." + $0.name }),
                           Set(peft.tensors.keys.filter { $0.hasPrefix("grad.") }), name)
            XCTAssertNil(model.parameters.gradientsIfAllocated, "\(name): adapter training must not touch the base gradients")
            print("\(name): adapted logits max |diff| vs PEFT \(cmp.maxAbsDiff), worst adapter gradient \(worst)")
        }
    }

    func testMergedCheckpointMatchesMergeAndUnload() throws {
        for name in GoldenTests.families {
            let (model, adapter, golden, peft) = try load(name)
            let merged = try adapter.merged(into: model)
            for binding in merged.bindings {
                assertClose(merged.checkpointTensor(binding, from: merged.parameters.values),
                            try peft.floats("merged." + binding.checkpointName), atol: 1e-5, rtol: 1e-5,
                            "\(name) merged \(binding.checkpointName)")
            }
            assertClose(try logits(merged, golden.batch, nil), try peft.floats("merged_logits"), name + " merged logits")
            // The merge is a new model: the base is unchanged.
            let base = try TransformerModel.load(directory: fixtureModel(name))
            XCTAssertEqual(model.parameters.checksum(), base.parameters.checksum())
            // A merged checkpoint saves and loads as a plain Hugging Face model.
            let dir = NSTemporaryDirectory() + "merged-\(UUID().uuidString)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try merged.save(to: dir)
            XCTAssertEqual(try TransformerModel.load(directory: dir).parameters.checksum(), merged.parameters.checksum())
        }
    }

    func testSavedAdapterIsPEFTsFolder() throws {
        for name in GoldenTests.families {
            let (model, adapter, _, _) = try load(name)
            let dir = NSTemporaryDirectory() + "adapter-\(UUID().uuidString)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try adapter.save(to: dir, model: model, baseModelPath: "Tests/Fixtures/models/\(name)")
            // Same tensor names, shapes and dtype as PEFT's own file; the values round-trip exactly.
            let ours = try SafetensorsFile(path: dir + "/adapter_model.safetensors")
            let theirs = try SafetensorsFile(path: fixture(name) + "/adapter/adapter_model.safetensors")
            XCTAssertEqual(Set(ours.tensors.keys), Set(theirs.tensors.keys), name)
            for (k, info) in theirs.tensors {
                XCTAssertEqual(ours.tensors[k]?.shape, info.shape, "\(name) \(k)")
                XCTAssertEqual(ours.tensors[k]?.dtype, info.dtype, "\(name) \(k)")
                assertIdentical(try ours.floats(k), try theirs.floats(k), "\(name) \(k)")
            }
            let read = { (p: String) in try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: p))) as! [String: Any] }
            let c = try read(dir + "/adapter_config.json"), p = try read(fixture(name) + "/adapter/adapter_config.json")
            for key in ["peft_type", "task_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "bias", "base_model_name_or_path"] {
                XCTAssertEqual("\(c[key]!)", "\(p[key]!)", "\(name) \(key)")
            }
            XCTAssertEqual(Set(c["target_modules"] as! [String]), Set(p["target_modules"] as! [String]), name)
            let again = try LoRAAdapter.load(directory: dir, model: model)
            XCTAssertEqual(again.parameters.checksum(), adapter.parameters.checksum())
            // The same files held in memory (a replica's download) load to the same values.
            let fromMemory = try loadFromMemory(dir, "downloaded", model)
            XCTAssertEqual(fromMemory.parameters.checksum(), adapter.parameters.checksum())
        }
    }

    /// The folder's two files read into memory and loaded from there, as a replica does.
    func loadFromMemory(_ dir: String, _ name: String, _ model: TransformerModel) throws -> LoRAAdapter {
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_config.json"))) as! [String: Any]
        let bytes = try Data(contentsOf: URL(fileURLWithPath: dir + "/adapter_model.safetensors"))
        let block = ByteBlock(adopting: .allocate(byteCount: max(1, bytes.count), alignment: 64), count: bytes.count)
        bytes.copyBytes(to: block.pointer.assumingMemoryBound(to: UInt8.self), count: bytes.count)
        return try LoRAAdapter.load(config: config, weights: block, name: name, model: model)
    }

    func testNewAdapterIsExactlyTheBase() throws {
        for name in ["qwen2_tied", "gpt2"] {
            let model = try TransformerModel.load(directory: fixtureModel(name))
            let b = try GoldenTests.Golden(fixtureModel(name)).batch
            let adapter = try LoRAAdapter(model: model, options: LoRAOptions(rank: 4, alpha: 8, targetModules: ["all-linear"]), seed: 7)
            assertIdentical(try logits(model, b, AdapterRows(adapter, tokens: b.tokens.count)), try logits(model, b, nil), name)
            for s in adapter.sites {
                let a = UnsafeBufferPointer(start: adapter.parameters.values + s.aOffset, count: 4 * s.inFeatures)
                let bound = 1 / Float(s.inFeatures).squareRoot()
                XCTAssertTrue(a.allSatisfy { abs($0) <= bound } && a.contains { $0 != 0 }, "\(name) \(s.module) A ~ U(±1/√in)")
                XCTAssertTrue(UnsafeBufferPointer(start: adapter.parameters.values + s.bOffset, count: 4 * s.outFeatures).allSatisfy { $0 == 0 })
            }
            let same = try LoRAAdapter(model: model, options: adapter.options, seed: 7)
            let other = try LoRAAdapter(model: model, options: adapter.options, seed: 8)
            XCTAssertEqual(same.parameters.checksum(), adapter.parameters.checksum())
            XCTAssertNotEqual(other.parameters.checksum(), adapter.parameters.checksum())
        }
    }

    /// Rows of two adapters and of the base in one packed batch give each sequence the bits it
    /// gets alone, whatever shares the batch.
    func testMixedAdapterBatchRowsMatchTheirOwnBatch() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        let first = try LoRAAdapter.load(directory: fixture("llama_gqa") + "/adapter", model: model)
        let second = try LoRAAdapter(model: model, options: LoRAOptions(rank: 8, alpha: 4, targetModules: ["q_proj", "down_proj"]), seed: 3)
        var rng = SeededRandom(seed: 11)
        for s in second.sites {   // give B values so the second adapter changes the outputs
            for i in 0..<(8 * s.outFeatures) { second.parameters.values[s.bOffset + i] = rng.normal() * 0.2 }
        }
        let seqs: [[Int32]] = [[1, 5, 9, 2], [7, 7, 3], [4, 8, 15, 16, 23], [42, 1]]
        let owners: [LoRAAdapter?] = [first, nil, second, first]
        func alone(_ i: Int) throws -> [Float] {
            let b = PackedBatch([seqs[i]])
            return try logits(model, b, owners[i].map { AdapterRows($0, tokens: b.tokens.count) })
        }
        let b = PackedBatch(seqs)
        let perToken = zip(seqs, owners).flatMap { s, a in Array(repeating: a, count: s.count) }
        let mixed = try logits(model, b, AdapterRows(perToken: perToken))
        let V = model.architecture.vocabSize
        for i in seqs.indices {
            assertIdentical(Array(mixed[(b.sequenceStarts[i] * V)..<(b.sequenceStarts[i + 1] * V)]), try alone(i), "sequence \(i)")
        }
        XCTAssertNotEqual(try alone(0), try logits(model, PackedBatch([seqs[0]]), nil), "the adapter changes the logits")
    }

    func testBadAdaptersAreRefusedWithThePathAtFault() throws {
        let model = try TransformerModel.load(directory: fixtureModel("llama_gqa"))
        func refused(_ options: LoRAOptions, _ path: String, _ fragment: String, line: UInt = #line) {
            XCTAssertThrowsError(try LoRAAdapter(model: model, options: options, seed: 1), line: line) { e in
                guard case let LoRAError.invalid(p, r) = e else { return XCTFail("\(e)", line: line) }
                XCTAssertEqual(p, path, line: line)
                XCTAssertTrue(r.contains(fragment), r, line: line)
            }
        }
        refused(LoRAOptions(rank: 0, alpha: 8, targetModules: ["q_proj"]), "rank", "at least 1")
        refused(LoRAOptions(rank: 33, alpha: 8, targetModules: ["q_proj"]), "rank", "exceeds")
        refused(LoRAOptions(rank: 4, alpha: 8, targetModules: ["q_proj", "c_attn"]), "target_modules[1]", "q_proj")
        refused(LoRAOptions(rank: 4, alpha: 8, targetModules: []), "target_modules", "at least one")
        refused(LoRAOptions(rank: 4, alpha: .nan, targetModules: ["q_proj"]), "alpha", "finite")

        // Folders: a copy of PEFT's, broken one way at a time.
        let src = fixture("llama_gqa") + "/adapter"
        func broken(_ edit: (String) throws -> Void, _ fragment: String, line: UInt = #line) throws {
            let dir = NSTemporaryDirectory() + "bad-adapter-\(UUID().uuidString)"
            try FileManager.default.copyItem(atPath: src, toPath: dir)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try edit(dir)
            XCTAssertThrowsError(try LoRAAdapter.load(directory: dir, model: model), line: line) { e in
                XCTAssertTrue("\(e)".contains(fragment), "\(e)", line: line)
                XCTAssertTrue("\(e)".contains(dir), "the error names the file: \(e)", line: line)
            }
            // Held in memory (a replica's download): the same refusal, naming the download.
            guard FileManager.default.fileExists(atPath: dir + "/adapter_config.json") else { return }
            XCTAssertThrowsError(try loadFromMemory(dir, "the trainer's adapter 'a'", model), line: line) { e in
                XCTAssertTrue("\(e)".contains(fragment), "\(e)", line: line)
                XCTAssertTrue("\(e)".contains("the trainer's adapter 'a'/adapter_"), "the error names the download: \(e)", line: line)
            }
        }
        func rewriteTensors(_ dir: String, _ change: (inout [(String, [Int], [Float])]) -> Void) throws {
            let f = try SafetensorsFile(path: dir + "/adapter_model.safetensors")
            var list = try f.tensors.keys.sorted().map { ($0, f.tensors[$0]!.shape, try f.floats($0)) }
            change(&list)
            let arrays = list.map { $0.2 }
            var tensors: [TensorToWrite] = []
            for (i, t) in list.enumerated() {
                arrays[i].withUnsafeBufferPointer { tensors.append(TensorToWrite(name: t.0, shape: t.1, data: $0)) }
            }
            try withExtendedLifetime(arrays) { try SafetensorsWriter.write(tensors, dtype: .f32, to: dir + "/adapter_model.safetensors") }
        }
        func rewriteConfig(_ dir: String, _ change: (inout [String: Any]) -> Void) throws {
            let p = dir + "/adapter_config.json"
            var c = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: p))) as! [String: Any]
            change(&c)
            try JSONSerialization.data(withJSONObject: c).write(to: URL(fileURLWithPath: p))
        }
        try broken({ try rewriteTensors($0) { $0.removeLast() } }, "missing tensor")
        try broken({ try rewriteTensors($0) { $0.append(("base_model.model.lm_head.lora_A.weight", [4, 32], [Float](repeating: 0, count: 128))) } },
                   "does not describe")
        try broken({ try rewriteTensors($0) { l in l[0].2[3] = .nan } }, "not finite")
        try broken({ try rewriteConfig($0) { $0["use_dora"] = true } }, "DoRA")
        try broken({ try rewriteConfig($0) { $0["peft_type"] = "IA3" } }, "LORA")
        try broken({ try rewriteConfig($0) { $0["r"] = 8 } }, "another shape")
        try broken({ try FileManager.default.removeItem(atPath: $0 + "/adapter_config.json") }, "missing")
        // An adapter of another model's shape.
        let other = try TransformerModel.load(directory: fixtureModel("qwen3_headdim"))
        XCTAssertThrowsError(try LoRAAdapter.load(directory: src, model: other)) { e in
            XCTAssertTrue("\(e)".contains("another shape"), "\(e)")
        }
    }
}
