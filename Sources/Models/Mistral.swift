// Mistral 7B family: Llama's layout plus a sliding attention window on every layer. Mirrors
// transformers `models/mistral/modeling_mistral.py` and mlx-swift-lm `Mistral.swift`.
import Foundation
import Kernels

public enum Mistral: ModelFamily {
    public static let modelTypes = ["mistral"]
    public static let optionalPrefix = "model."

    /// config.json fields; absent ones take transformers' `MistralConfig` defaults below.
    struct Config: Decodable {
        var vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads: Int?
        var numKeyValueHeads, headDim, maxPositionEmbeddings, slidingWindow: Int?
        var rmsNormEps, ropeTheta: Double?
        var ropeScaling, ropeParameters: RopeConfig?
        var tieWordEmbeddings: Bool?
        var hiddenAct: String?

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
            case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
            case numKeyValueHeads = "num_key_value_heads", headDim = "head_dim"
            case maxPositionEmbeddings = "max_position_embeddings", slidingWindow = "sliding_window"
            case rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta"
            case ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
            case tieWordEmbeddings = "tie_word_embeddings", hiddenAct = "hidden_act"
        }
    }

    public static func architecture(config: Data) throws -> Architecture {
        let c = try JSONDecoder().decode(Config.self, from: config)
        try requireSilu(c.hiddenAct)
        let hidden = c.hiddenSize ?? 4096, heads = c.numAttentionHeads ?? 32, layers = c.numHiddenLayers ?? 32
        let headDim = try resolveHeadDim(c.headDim, hidden: hidden, heads: heads)
        let rope = try RopeConfig.frequencies(parameters: c.ropeParameters, legacyTheta: c.ropeTheta,
                                              legacyScaling: c.ropeScaling, defaultTheta: 10000, headDim: headDim)
        // An absent `sliding_window` means the 4096 default; an explicit null means none.
        let raw = (try? JSONSerialization.jsonObject(with: config)) as? [String: Any] ?? [:]
        let window = raw.keys.contains("sliding_window") ? (c.slidingWindow ?? 0) : 4096
        if window < 0 { throw ModelError.invalidConfig(field: "sliding_window", reason: "must be positive or null") }
        return Architecture(
            modelType: "mistral", vocabSize: c.vocabSize ?? 32000, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: c.numKeyValueHeads ?? 8, headDim: headDim,
            intermediateSize: c.intermediateSize ?? 14336, maxPositions: c.maxPositionEmbeddings ?? 131072,
            norm: .rms, normEps: Float(c.rmsNormEps ?? 1e-6), position: .rope(rope), mlp: .swiglu,
            qkvBias: false, outputBias: false, mlpBias: false, qkNorm: false,
            tiedEmbeddings: c.tieWordEmbeddings ?? false, layerWindows: Array(repeating: window, count: max(0, layers)))
    }

    public static func bindings(_ arch: Architecture) -> [TensorBinding] { llamaStyleBindings(arch) }
}
