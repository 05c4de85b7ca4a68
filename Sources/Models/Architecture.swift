// The engine's normalized description of a decoder-only transformer. Each family file decodes
// its own config.json into one of these; the shared forward/backward in Transformer.swift reads
// only this.
import Foundation
import Kernels

/// Errors in model folders and configs; messages name the field or file at fault.
public enum ModelError: Error, CustomStringConvertible, Equatable {
    case unknownModelType(String, supported: [String])
    case invalidConfig(field: String, reason: String)
    case missingFile(path: String)
    case unsupported(feature: String, reason: String)

    public var description: String {
        switch self {
        case let .unknownModelType(t, s):
            "unknown model_type '\(t)'; supported: \(s.joined(separator: ", "))"
        case let .invalidConfig(f, r): "config.json: \(f): \(r)"
        case let .missingFile(p): "missing file \(p)"
        case let .unsupported(f, r): "unsupported \(f): \(r)"
        }
    }
}

public enum NormKind: String, Sendable { case rms, layer }
public enum MLPKind: String, Sendable { case swiglu, geluTanh }
public enum PositionKind: Sendable, Equatable {
    case rope(RopeFrequencies)
    case learned
}

/// Everything the shared transformer code needs to know about a model.
public struct Architecture: Sendable {
    public var modelType: String
    public var vocabSize: Int
    public var hiddenSize: Int            // C
    public var layers: Int
    public var heads: Int                 // NH
    public var kvHeads: Int               // NKV
    public var headDim: Int               // HS
    public var intermediateSize: Int      // I
    public var maxPositions: Int
    public var norm: NormKind
    public var normEps: Float
    public var position: PositionKind
    public var mlp: MLPKind
    /// Bias on the fused q|k|v projection.
    public var qkvBias: Bool
    /// Bias on the attention output projection.
    public var outputBias: Bool
    /// Biases on both MLP projections.
    public var mlpBias: Bool
    /// Qwen3: RMSNorm over each q and k head before RoPE.
    public var qkNorm: Bool
    public var tiedEmbeddings: Bool
    /// Per layer: 0 for full causal attention, or the sliding-window width.
    public var layerWindows: [Int]

    /// Width of a fused q|k|v row (Q in the kernel legend).
    public var qkvWidth: Int { (heads + 2 * kvHeads) * headDim }
    public var attentionWidth: Int { heads * headDim }
    public var kvWidth: Int { kvHeads * headDim }
    /// Width of the MLP input projection output: [gate | up] for SwiGLU.
    public var mlpInWidth: Int { mlp == .swiglu ? 2 * intermediateSize : intermediateSize }

    /// Checks the relations between sizes; throws naming the field.
    public func validate() throws {
        func positive(_ v: Int, _ f: String) throws {
            guard v > 0 else { throw ModelError.invalidConfig(field: f, reason: "must be positive, got \(v)") }
        }
        try positive(vocabSize, "vocab_size")
        try positive(hiddenSize, "hidden_size")
        try positive(layers, "num_hidden_layers")
        try positive(heads, "num_attention_heads")
        try positive(kvHeads, "num_key_value_heads")
        try positive(headDim, "head_dim")
        try positive(intermediateSize, "intermediate_size")
        try positive(maxPositions, "max_position_embeddings")
        guard heads % kvHeads == 0 else {
            throw ModelError.invalidConfig(field: "num_key_value_heads",
                reason: "\(kvHeads) does not divide num_attention_heads \(heads)")
        }
        if case .rope = position, headDim % 2 != 0 {
            throw ModelError.invalidConfig(field: "head_dim", reason: "RoPE needs an even head size, got \(headDim)")
        }
        guard normEps > 0, normEps.isFinite else {
            throw ModelError.invalidConfig(field: "norm eps", reason: "must be a positive number, got \(normEps)")
        }
        guard layerWindows.count == layers else {
            throw ModelError.invalidConfig(field: "layer_types", reason: "\(layerWindows.count) entries for \(layers) layers")
        }
    }
}

// MARK: - config.json helpers shared by the family files

/// Decodes `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (earlier
/// checkpoints) into frequencies for head size `headDim`.
struct RopeConfig: Decodable {
    var ropeType: String?
    var type: String?
    var ropeTheta: Double?
    var factor: Double?
    var lowFreqFactor: Double?
    var highFreqFactor: Double?
    var originalMaxPositionEmbeddings: Double?

    enum CodingKeys: String, CodingKey {
        case ropeType = "rope_type", type, ropeTheta = "rope_theta", factor
        case lowFreqFactor = "low_freq_factor", highFreqFactor = "high_freq_factor"
        case originalMaxPositionEmbeddings = "original_max_position_embeddings"
    }

    static func frequencies(parameters: RopeConfig?, legacyTheta: Double?, legacyScaling: RopeConfig?,
                            defaultTheta: Double, headDim: Int) throws -> RopeFrequencies {
        let theta = parameters?.ropeTheta ?? legacyTheta ?? defaultTheta
        guard theta > 0 else { throw ModelError.invalidConfig(field: "rope_theta", reason: "must be positive, got \(theta)") }
        let base = RopeFrequencies(headDim: headDim, theta: theta)
        let scaling = parameters ?? legacyScaling
        let kind = scaling?.ropeType ?? scaling?.type ?? "default"
        switch kind {
        case "default":
            return base
        case "linear":
            guard let f = scaling?.factor, f > 0 else {
                throw ModelError.invalidConfig(field: "rope_scaling.factor", reason: "linear scaling needs a positive factor")
            }
            return base.linear(factor: f)
        case "llama3":
            guard let s = scaling, let f = s.factor, let lo = s.lowFreqFactor, let hi = s.highFreqFactor,
                  let orig = s.originalMaxPositionEmbeddings, f > 0, hi > lo, orig > 0 else {
                throw ModelError.invalidConfig(field: "rope_scaling",
                    reason: "llama3 scaling needs factor, low_freq_factor < high_freq_factor, original_max_position_embeddings")
            }
            return base.llama3(factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositions: orig)
        default:
            throw ModelError.unsupported(feature: "rope_type '\(kind)'", reason: "supported: default, linear, llama3")
        }
    }
}

/// Per-layer attention windows from `layer_types` ("full_attention" | "sliding_attention").
func layerWindows(layerTypes: [String]?, layers: Int, slidingWindow: Int?) throws -> [Int] {
    if let types = layerTypes {
        guard types.count == layers else {
            throw ModelError.invalidConfig(field: "layer_types", reason: "\(types.count) entries for \(layers) layers")
        }
        return try types.map { t in
            switch t {
            case "full_attention": return 0
            case "sliding_attention":
                guard let w = slidingWindow, w > 0 else {
                    throw ModelError.invalidConfig(field: "sliding_window", reason: "sliding_attention layers need a positive sliding_window")
                }
                return w
            default: throw ModelError.unsupported(feature: "layer type '\(t)'", reason: "supported: full_attention, sliding_attention")
            }
        }
    }
    return Array(repeating: 0, count: layers)
}

/// Activation names accepted for SwiGLU MLPs.
func requireSilu(_ act: String?) throws {
    let a = act ?? "silu"
    guard a == "silu" || a == "swish" else {
        throw ModelError.unsupported(feature: "hidden_act '\(a)'", reason: "this family supports silu")
    }
}

/// `head_dim` if given, else hidden_size / num_attention_heads (which must divide).
func resolveHeadDim(_ headDim: Int?, hidden: Int, heads: Int) throws -> Int {
    if let headDim { return headDim }
    guard heads > 0 else { throw ModelError.invalidConfig(field: "num_attention_heads", reason: "must be positive, got \(heads)") }
    guard hidden % heads == 0 else {
        throw ModelError.invalidConfig(field: "hidden_size",
            reason: "\(hidden) is not divisible by num_attention_heads \(heads) and head_dim is not given")
    }
    return hidden / heads
}
