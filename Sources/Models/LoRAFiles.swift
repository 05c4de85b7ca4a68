// PEFT's adapter folder (adapter_config.json + adapter_model.safetensors) in both directions, and
// merging an adapter into a full checkpoint (PEFT's merge_and_unload).
import Foundation
import Kernels
import Weights

extension LoRAAdapter {
    public static let configFile = "adapter_config.json"
    public static let weightsFile = "adapter_model.safetensors"

    /// Writes `directory`/adapter_config.json and adapter_model.safetensors (F32) as PEFT's
    /// `save_pretrained` does; `directory` must exist.
    public func save(to directory: String, model: TransformerModel, baseModelPath: String? = nil) throws {
        let config = peftConfig(model: model, baseModelPath: baseModelPath)
        var tensors: [TensorToWrite] = []
        for slot in parameters.layout.slots {
            tensors.append(TensorToWrite(name: slot.name, shape: slot.shape,
                                         data: UnsafeBufferPointer(start: parameters.values + slot.offset, count: slot.count)))
        }
        try SafetensorsWriter.write(tensors, dtype: .f32, to: directory + "/" + Self.weightsFile)
        let data = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
        let path = directory + "/" + Self.configFile
        guard FileManager.default.createFile(atPath: path, contents: data) else {
            throw LoRAError.invalid(path: path, reason: "could not be written")
        }
    }

    /// adapter_config.json's content, as PEFT's `save_pretrained` writes it.
    public func peftConfig(model: TransformerModel, baseModelPath: String? = nil) -> [String: Any] {
        var config: [String: Any] = [
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": options.rank, "lora_alpha": Double(options.alpha),
            "target_modules": options.targetModules, "use_rslora": options.useRSLoRA, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": model.bindings.contains { $0.transposed }, "inference_mode": true,
            "init_lora_weights": true, "use_dora": false, "rank_pattern": [String: Int](), "alpha_pattern": [String: Double](),
            "modules_to_save": NSNull(), "layers_to_transform": NSNull(), "layers_pattern": NSNull(),
            "base_model_name_or_path": baseModelPath.map { $0 as Any } ?? NSNull(), "revision": NSNull(),
        ]
        if options.alpha == options.alpha.rounded() { config["lora_alpha"] = Int(options.alpha) }
        return config
    }

    /// adapter_model.safetensors as one image in memory (F32, PEFT's tensor names).
    public func weightsImage() throws -> SafetensorsImage {
        let slots = parameters.layout.slots, values = parameters.values
        return try SafetensorsImage(tensors: slots.map { ($0.name, $0.shape) }, dtype: .f32) { i, out in
            out.update(from: values + slots[i].offset, count: slots[i].count)
        }
    }

    /// Reads a PEFT LoRA folder for `model`. Every tensor the configuration implies must be
    /// present with its shape, and no other; settings Ember does not implement are refused.
    public static func load(directory: String, model: TransformerModel) throws -> LoRAAdapter {
        let configPath = directory + "/" + configFile
        guard let data = FileManager.default.contents(atPath: configPath) else {
            throw LoRAError.invalid(path: configPath, reason: "missing: a PEFT adapter folder holds \(configFile) and \(weightsFile)")
        }
        guard let c = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw LoRAError.invalid(path: configPath, reason: "not a JSON object")
        }
        let weightsPath = directory + "/" + weightsFile
        return try load(config: c, configPath: configPath, model: model) {
            guard FileManager.default.fileExists(atPath: weightsPath) else {
                throw LoRAError.invalid(path: weightsPath, reason: "missing (Ember reads safetensors adapters, not adapter_model.bin)")
            }
            do { return try SafetensorsFile(path: weightsPath) } catch {
                throw LoRAError.invalid(path: weightsPath, reason: "\(error)")
            }
        }
    }

    /// A PEFT LoRA adapter held in memory: adapter_config.json's content and
    /// adapter_model.safetensors' bytes (a replica's download), checked as a folder is; `name`
    /// stands for the folder in errors. `reusing` (an adapter nothing else holds) lends its
    /// storage when its settings are the same: its values are overwritten, valid or not.
    public static func load(config: [String: Any], weights: ByteBlock, name: String, model: TransformerModel,
                            reusing spare: LoRAAdapter? = nil) throws -> LoRAAdapter {
        let weightsPath = name + "/" + weightsFile
        return try load(config: config, configPath: name + "/" + configFile, model: model, reusing: spare) {
            do { return try SafetensorsFile(block: weights, name: weightsPath) } catch {
                throw LoRAError.invalid(path: weightsPath, reason: "\(error)")
            }
        }
    }

    /// The configuration checked, then the weights `open` gives.
    private static func load(config c: [String: Any], configPath: String, model: TransformerModel, reusing spare: LoRAAdapter? = nil,
                             weights open: () throws -> SafetensorsFile) throws -> LoRAAdapter {
        func bad(_ key: String, _ reason: String) -> LoRAError { .invalid(path: "\(configPath): \(key)", reason: reason) }
        guard (c["peft_type"] as? String)?.uppercased() == "LORA" else { throw bad("peft_type", "must be \"LORA\"") }
        guard let rank = c["r"] as? Int else { throw bad("r", "must be an integer") }
        guard let alpha = (c["lora_alpha"] as? NSNumber)?.floatValue else { throw bad("lora_alpha", "must be a number") }
        let rs = c["use_rslora"] as? Bool ?? false
        if let b = c["bias"] as? String, b != "none" { throw bad("bias", "only \"none\" is supported (adapter biases are not)") }
        if c["use_dora"] as? Bool == true { throw bad("use_dora", "DoRA adapters are not supported") }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let d = c[key] as? [String: Any], !d.isEmpty { throw bad(key, "per-module ranks or alphas are not supported") }
        }
        if c["lora_bias"] as? Bool == true { throw bad("lora_bias", "biases on lora_B are not supported") }
        for key in ["modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules", "layer_replication",
                    "target_parameters", "trainable_token_indices", "alora_invocation_tokens"] {
            if let v = c[key], !(v is NSNull), !((v as? [Any])?.isEmpty ?? false) {
                throw bad(key, "not supported (must be null)")
            }
        }
        var targets: [String]
        if let list = c["target_modules"] as? [String] {
            targets = list
        } else if let pattern = c["target_modules"] as? String {
            if pattern == "all-linear" {
                targets = [pattern]
            } else {
                // A string is a regular expression over whole module names.
                guard let re = try? NSRegularExpression(pattern: "^(?:" + pattern + ")$") else {
                    throw bad("target_modules", "not a valid regular expression")
                }
                targets = model.adaptableModules.map(\.module).filter {
                    re.firstMatch(in: $0, range: NSRange($0.startIndex..., in: $0)) != nil
                }
                if targets.isEmpty { throw bad("target_modules", "the pattern matches no projection of this model") }
            }
        } else {
            throw bad("target_modules", "must be a list of module names or a pattern")
        }
        let adapter: LoRAAdapter
        let options = LoRAOptions(rank: rank, alpha: alpha, targetModules: targets, useRSLoRA: rs)
        do {
            if let spare, spare.options == options, spare.baseShape == model.shapeSignature {
                adapter = spare   // every value is read below (all tensors are required)
            } else {
                adapter = try LoRAAdapter(model: model, options: options)
            }
        } catch let LoRAError.invalid(path, reason) {
            throw LoRAError.invalid(path: "\(configPath): \(path == "rank" ? "r" : path)", reason: reason)
        }
        let file = try open()
        let weightsPath = file.path
        let expected = Set(adapter.parameters.layout.slots.map(\.name))
        let extra = file.tensors.keys.filter { !expected.contains($0) }.sorted()
        if !extra.isEmpty {
            throw LoRAError.invalid(path: weightsPath, reason: "tensors the configuration does not describe: \(extra.prefix(3).joined(separator: ", "))"
                + (extra.count > 3 ? " (+\(extra.count - 3) more)" : ""))
        }
        for slot in adapter.parameters.layout.slots {
            guard let info = file.tensors[slot.name] else {
                throw LoRAError.invalid(path: weightsPath, reason: "missing tensor \(slot.name)")
            }
            guard info.shape == slot.shape else {
                throw LoRAError.invalid(path: weightsPath,
                                        reason: "\(slot.name) has shape \(info.shape), this model needs \(slot.shape): the adapter was saved for a model of another shape")
            }
            guard info.dtype == .f32 || info.dtype == .bf16 || info.dtype == .f16 else {
                throw LoRAError.invalid(path: weightsPath, reason: "\(slot.name) is \(info.dtype.rawValue); adapters must be F32, BF16 or F16")
            }
        }
        // Checked: every tensor is present with its shape and a float dtype. Copied and checked
        // for non-finite values on the compute threads, a tensor per item.
        let slots = adapter.parameters.layout.slots, values = adapter.parameters.values
        // Per tensor: 0 read and finite, 1 not finite, 2 unreadable (not expected after the checks).
        let status = UnsafeMutablePointer<UInt8>.allocate(capacity: max(1, slots.count))
        defer { status.deallocate() }
        parallelFor(slots.count) { i in
            let out = values + slots[i].offset
            do {
                try file.read(slots[i].name, shape: slots[i].shape, into: out)
                status[i] = allFinite(out, count: slots[i].count) ? 0 : 1
            } catch { status[i] = 2 }
        }
        if let bad = (0..<slots.count).first(where: { status[$0] != 0 }) {
            throw LoRAError.invalid(path: weightsPath, reason: status[bad] == 1 ? "holds a value that is not finite (in \(slots[bad].name))"
                                                                                : "\(slots[bad].name) could not be read")
        }
        adapter.parameters.markModified()
        return adapter
    }

    /// The base model with this adapter folded in: W += s·B·A on every site (PEFT's
    /// merge_and_unload). A new model; `model` is unchanged.
    public func merged(into model: TransformerModel) throws -> TransformerModel {
        let out = try TransformerModel(config: model.configJSON)
        out.parameters.values.update(from: model.parameters.values, count: model.parameters.count)
        let r = options.rank, w = parameters.values
        for s in sites {
            let K = s.inFeatures, O = s.outFeatures
            let delta = FloatBuffer(O * K)
            gemm(m: O, n: K, k: r, .rows(w + s.bOffset, ld: r), .rows(w + s.aOffset, ld: K), delta.pointer, ldc: K)
            let slot = out.parameters.layout.slot(Slot.layer(s.layer, s.projection.slotName))!
            let dst = out.parameters.values + slot.offset + s.rowStart * K
            for i in 0..<(O * K) { dst[i] += delta.pointer[i] * scaling }
        }
        out.parameters.markModified()
        return out
    }
}
