// Qwen3 (dense): per-head RMSNorm on q and k before RoPE, `head_dim` independent of
// hidden_size / heads, optional `attention_bias` on q, k, v and o. Mirrors transformers
// `models/qwen3/modeling_qwen3.py` and mlx-swift-lm `Qwen3.swift`.
import Foundation
import Kernels

public enum Qwen3: ModelFamily {
    public static let modelTypes = ["qwen3"]
    public static let optionalPrefix = "model."

    /// config.json fields; absent ones take transformers' `Qwen3Config` defaults below.
    struct Config: Decodable {
        var vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads: Int?
        var numKeyValueHeads, headDim, maxPositionEmbeddings, slidingWindow, maxWindowLayers: Int?
        var rmsNormEps, ropeTheta: Double?
        var ropeScaling, ropeParameters: RopeConfig?
        var tieWordEmbeddings, useSlidingWindow, attentionBias: Bool?
        var hiddenAct: String?
        var layerTypes: [String]?

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
            case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
            case numKeyValueHeads = "num_key_value_heads", headDim = "head_dim"
            case maxPositionEmbeddings = "max_position_embeddings"
            case slidingWindow = "sliding_window", maxWindowLayers = "max_window_layers"
            case rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta"
            case ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
            case tieWordEmbeddings = "tie_word_embeddings", useSlidingWindow = "use_sliding_window"
            case attentionBias = "attention_bias", hiddenAct = "hidden_act", layerTypes = "layer_types"
        }
    }

    public static func architecture(config: Data) throws -> Architecture {
        let c = try JSONDecoder().decode(Config.self, from: config)
        try requireSilu(c.hiddenAct)
        let hidden = c.hiddenSize ?? 4096, heads = c.numAttentionHeads ?? 32, layers = c.numHiddenLayers ?? 32
        let headDim = c.headDim ?? 128
        let rope = try RopeConfig.frequencies(parameters: c.ropeParameters, legacyTheta: c.ropeTheta,
                                              legacyScaling: c.ropeScaling, defaultTheta: 10000, headDim: headDim)
        var types = c.layerTypes
        if types == nil, c.useSlidingWindow ?? false {
            let from = c.maxWindowLayers ?? 28
            types = (0..<max(0, layers)).map { $0 >= from ? "sliding_attention" : "full_attention" }
        }
        let windows = try layerWindows(layerTypes: types, layers: max(0, layers), slidingWindow: c.slidingWindow ?? 4096)
        let bias = c.attentionBias ?? false
        return Architecture(
            modelType: "qwen3", vocabSize: c.vocabSize ?? 151936, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: c.numKeyValueHeads ?? heads, headDim: headDim,
            intermediateSize: c.intermediateSize ?? 22016, maxPositions: c.maxPositionEmbeddings ?? 32768,
            norm: .rms, normEps: Float(c.rmsNormEps ?? 1e-6), position: .rope(rope), mlp: .swiglu,
            qkvBias: bias, outputBias: bias, mlpBias: false, qkNorm: true,
            tiedEmbeddings: c.tieWordEmbeddings ?? false, layerWindows: windows)
    }

    public static func bindings(_ arch: Architecture) -> [TensorBinding] { llamaStyleBindings(arch) }
}
