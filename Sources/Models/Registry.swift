// From Hugging Face `model_type` to the family that understands its config.json and tensor names.
import Foundation

/// Where one checkpoint tensor lives in the flat parameter buffer.
public struct TensorBinding: Sendable, Equatable {
    /// Name in the Hugging Face checkpoint, e.g. `model.layers.0.self_attn.q_proj.weight`.
    public let checkpointName: String
    /// Engine slot, e.g. `layers.0.qkv.weight` (several tensors may share a fused slot).
    public let slot: String
    /// Offset in elements inside the slot.
    public let elementOffset: Int
    /// Shape as stored in the checkpoint.
    public let shape: [Int]
    /// GPT-2 Conv1D weights are stored [in, out]; the engine keeps [out, in].
    public let transposed: Bool

    public init(_ checkpointName: String, slot: String, elementOffset: Int = 0, shape: [Int],
                transposed: Bool = false) {
        self.checkpointName = checkpointName; self.slot = slot; self.elementOffset = elementOffset
        self.shape = shape; self.transposed = transposed
    }
}

/// A model family: decodes its config and names its tensors.
public protocol ModelFamily: Sendable {
    static var modelTypes: [String] { get }
    /// Decodes and validates config.json.
    static func architecture(config: Data) throws -> Architecture
    /// Every checkpoint tensor the engine reads and writes, in file order.
    static func bindings(_ arch: Architecture) -> [TensorBinding]
    /// Checkpoint name prefixes that some exports omit (e.g. `model.`, `transformer.`).
    static var optionalPrefix: String { get }
}

public enum ModelRegistry {
    public static let families: [any ModelFamily.Type] = [Llama.self, Qwen.self, GPT2.self]

    public static var supportedTypes: [String] { families.flatMap { $0.modelTypes }.sorted() }

    /// The family for a `model_type`, or an error listing the supported ones.
    public static func family(for modelType: String) throws -> any ModelFamily.Type {
        guard let f = families.first(where: { $0.modelTypes.contains(modelType) }) else {
            throw ModelError.unknownModelType(modelType, supported: supportedTypes)
        }
        return f
    }

    /// Reads `model_type` from config.json data and decodes it with its family.
    public static func architecture(config: Data) throws -> (any ModelFamily.Type, Architecture) {
        guard let json = try? JSONSerialization.jsonObject(with: config) as? [String: Any] else {
            throw ModelError.invalidConfig(field: "(file)", reason: "not a JSON object")
        }
        guard let type = json["model_type"] as? String else {
            throw ModelError.invalidConfig(field: "model_type", reason: "missing")
        }
        let family = try family(for: type)
        do {
            let arch = try family.architecture(config: config)
            try arch.validate()
            return (family, arch)
        } catch let e as DecodingError {
            throw ModelError.invalidConfig(field: Self.fieldName(e), reason: Self.reason(e))
        }
    }

    static func fieldName(_ e: DecodingError) -> String {
        switch e {
        case let .typeMismatch(_, c), let .valueNotFound(_, c), let .dataCorrupted(c):
            return c.codingPath.map { $0.stringValue }.joined(separator: ".")
        case let .keyNotFound(k, c):
            return (c.codingPath + [k]).map { $0.stringValue }.joined(separator: ".")
        @unknown default: return "(unknown)"
        }
    }

    static func reason(_ e: DecodingError) -> String {
        switch e {
        case let .typeMismatch(t, _): "expected \(t)"
        case .valueNotFound: "value is null"
        case .keyNotFound: "missing"
        case let .dataCorrupted(c): c.debugDescription
        @unknown default: "invalid"
        }
    }
}

/// Engine slot names, shared by every family.
public enum Slot {
    public static let embed = "embed.weight"
    public static let positionEmbed = "pos_embed.weight"
    public static let finalNormWeight = "final_norm.weight"
    public static let finalNormBias = "final_norm.bias"
    public static let lmHead = "lm_head.weight"
    public static func layer(_ i: Int, _ name: String) -> String { "layers.\(i).\(name)" }
}
