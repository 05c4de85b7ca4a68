// config.json decoding: the registry, defaults, and errors that name the field at fault.
import Foundation
import Kernels
import Models
import TestSupport
import Weights
import XCTest

final class ConfigTests: XCTestCase {
    func config(_ dict: [String: Any]) -> Data { try! JSONSerialization.data(withJSONObject: dict) }

    func testRegistryKnowsEveryFamily() throws {
        XCTAssertEqual(ModelRegistry.supportedTypes, ["gpt2", "llama", "mistral", "qwen2", "qwen3"])
        XCTAssertThrowsError(try ModelRegistry.architecture(config: config(["model_type": "mamba"]))) { e in
            XCTAssertEqual(e as? ModelError, .unknownModelType("mamba", supported: ModelRegistry.supportedTypes))
            XCTAssertTrue("\(e)".contains("mamba"))
        }
        XCTAssertThrowsError(try ModelRegistry.architecture(config: config(["hidden_size": 8])))
    }

    func testQwen25HalfBillionShapes() throws {
        let (_, a) = try ModelRegistry.architecture(config: config([
            "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": true,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "use_sliding_window": false, "sliding_window": 32768, "max_window_layers": 21]))
        XCTAssertEqual(a.headDim, 64)
        XCTAssertEqual(a.qkvWidth, (14 + 4) * 64)
        XCTAssertTrue(a.qkvBias && !a.outputBias && a.tiedEmbeddings)
        XCTAssertEqual(a.layerWindows, Array(repeating: 0, count: 24))
        let model = try TransformerModel(config: config([
            "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": true]))
        XCTAssertEqual(model.parameterCount, 494_032_768)   // Qwen2.5-0.5B's published count
    }

    func testInconsistentConfigsNameTheField() {
        let cases: [([String: Any], String)] = [
            (["model_type": "llama", "hidden_size": 30, "num_attention_heads": 4], "hidden_size"),
            (["model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 3], "num_key_value_heads"),
            (["model_type": "qwen3", "head_dim": 7, "hidden_size": 28, "num_attention_heads": 4, "num_key_value_heads": 4], "head_dim"),
            (["model_type": "llama", "hidden_size": "big"], "hidden_size"),
            (["model_type": "llama", "num_hidden_layers": 0], "num_hidden_layers"),
            (["model_type": "llama", "rope_scaling": ["rope_type": "yarn", "factor": 4.0]], "yarn"),
            (["model_type": "llama", "rope_scaling": ["rope_type": "llama3", "factor": 8.0]], "rope_scaling"),
            (["model_type": "llama", "hidden_act": "relu"], "relu"),
            (["model_type": "gpt2", "activation_function": "relu"], "relu"),
            (["model_type": "qwen2", "layer_types": ["full_attention"], "num_hidden_layers": 2], "layer_types"),
        ]
        for (dict, field) in cases {
            XCTAssertThrowsError(try ModelRegistry.architecture(config: config(dict)), "\(dict)") { e in
                XCTAssertTrue("\(e)".contains(field), "error '\(e)' should name \(field)")
            }
        }
    }

    func testMistralWindowDefaultsAndNull() throws {
        let (_, a) = try ModelRegistry.architecture(config: config(["model_type": "mistral", "num_hidden_layers": 2]))
        XCTAssertEqual(a.layerWindows, [4096, 4096])
        let (_, b) = try ModelRegistry.architecture(config: config(["model_type": "mistral", "num_hidden_layers": 2,
                                                                     "sliding_window": NSNull()]))
        XCTAssertEqual(b.layerWindows, [0, 0])
    }

    func testLlama3RopeFromBothConfigStyles() throws {
        let scaling: [String: Any] = ["rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192]
        let (_, legacy) = try ModelRegistry.architecture(config: config(["model_type": "llama", "rope_theta": 500000.0,
                                                                          "rope_scaling": scaling]))
        var params = scaling; params["rope_theta"] = 500000.0
        let (_, modern) = try ModelRegistry.architecture(config: config(["model_type": "llama", "rope_parameters": params]))
        XCTAssertEqual(legacy.position, modern.position)
        let plain = RopeFrequencies(headDim: 128, theta: 500000)
        guard case let .rope(f) = legacy.position else { return XCTFail("expected rope") }
        XCTAssertEqual(f.invFreq[0], plain.invFreq[0])                  // high frequency kept
        XCTAssertEqual(f.invFreq[63], plain.invFreq[63] / 8, accuracy: 1e-12)   // low frequency divided
    }

    func testCheckpointProblemsNameTheTensor() throws {
        let dir = NSTemporaryDirectory() + "ember-config-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = try TransformerModel.load(directory: fixtureModel("qwen3_headdim"))
        try model.save(to: dir)
        let reloaded = try TransformerModel.load(directory: dir)
        XCTAssertEqual(reloaded.parameters.checksum(), model.parameters.checksum())

        // Drop a tensor: the error names it.
        let file = try SafetensorsFile(path: dir + "/model.safetensors")
        var kept: [TensorToWrite] = []
        var arrays: [[Float]] = []
        for name in file.tensors.keys.sorted() where name != "model.layers.1.self_attn.k_norm.weight" {
            arrays.append(try file.floats(name))
        }
        let names = file.tensors.keys.sorted().filter { $0 != "model.layers.1.self_attn.k_norm.weight" }
        for (n, a) in zip(names, arrays) {
            a.withUnsafeBufferPointer { kept.append(TensorToWrite(name: n, shape: file.tensors[n]!.shape, data: $0)) }
        }
        try SafetensorsWriter.write(kept, dtype: .f32, to: dir + "/model.safetensors")
        XCTAssertThrowsError(try TransformerModel.load(directory: dir)) { e in
            XCTAssertTrue("\(e)".contains("model.layers.1.self_attn.k_norm.weight"), "\(e)")
        }

        // Wrong shape: the error names the tensor and both shapes.
        var wrong: [TensorToWrite] = []
        let extra = [Float](repeating: 1, count: 13)
        for (n, a) in zip(names, arrays) {
            a.withUnsafeBufferPointer { wrong.append(TensorToWrite(name: n, shape: file.tensors[n]!.shape, data: $0)) }
        }
        extra.withUnsafeBufferPointer { wrong.append(TensorToWrite(name: "model.layers.1.self_attn.k_norm.weight", shape: [13], data: $0)) }
        try SafetensorsWriter.write(wrong, dtype: .f32, to: dir + "/model.safetensors")
        XCTAssertThrowsError(try TransformerModel.load(directory: dir)) { e in
            XCTAssertEqual(e as? WeightsError, .shapeMismatch(tensor: "model.layers.1.self_attn.k_norm.weight", expected: [12], found: [13]))
        }

        // A tensor the config does not describe (e.g. biases with attention_bias false) is refused.
        var surplus: [TensorToWrite] = []
        let bias = [Float](repeating: 0, count: 48)
        for (n, a) in zip(names, arrays) {
            a.withUnsafeBufferPointer { surplus.append(TensorToWrite(name: n, shape: file.tensors[n]!.shape, data: $0)) }
        }
        let k = [Float](repeating: 1, count: 12)
        k.withUnsafeBufferPointer { surplus.append(TensorToWrite(name: "model.layers.1.self_attn.k_norm.weight", shape: [12], data: $0)) }
        bias.withUnsafeBufferPointer { surplus.append(TensorToWrite(name: "model.layers.0.self_attn.q_proj.bias", shape: [48], data: $0)) }
        try SafetensorsWriter.write(surplus, dtype: .f32, to: dir + "/model.safetensors")
        XCTAssertThrowsError(try TransformerModel.load(directory: dir)) { e in
            XCTAssertTrue("\(e)".contains("model.layers.0.self_attn.q_proj.bias"), "\(e)")
        }
        withExtendedLifetime((arrays, extra, bias, k)) {}
    }

    func testSavedFolderRoundTripsInBF16AndShards() throws {
        let dir = NSTemporaryDirectory() + "ember-save-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = try TransformerModel.load(directory: fixtureModel("gpt2"))
        try model.save(to: dir, dtype: .bf16, maxShardBytes: 16_000)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/model.safetensors.index.json"))
        let reloaded = try TransformerModel.load(directory: dir)
        let n = model.parameters.count
        for i in 0..<n {
            let want = bf16ToFloat(floatToBF16(model.parameters.values[i]))
            if reloaded.parameters.values[i] != want {
                return XCTFail("parameter \(i): \(reloaded.parameters.values[i]) != bf16(\(model.parameters.values[i]))")
            }
        }
    }
}
