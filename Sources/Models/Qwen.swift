// Qwen2 / Qwen2.5 and Qwen3 (dense), one configuration reader. Both are Llama's layout; the
// differences, written out below:
//   - Qwen2: biases on q, k and v (never on o); head size = hidden_size / heads.
//   - Qwen3: per-head RMSNorm on q and k before RoPE; `head_dim` given independently (default
//     128); `attention_bias` puts biases on q, k, v and o together.
// Both may slide the attention window on some layers (`layer_types`, or `use_sliding_window`
// from `max_window_layers` on). Mirrors transformers `models/qwen2/modeling_qwen2.py` and
// `models/qwen3/modeling_qwen3.py`, and mlx-swift-lm `Qwen2.swift` / `Qwen3.swift`.
import Foundation
import Kernels

public enum Qwen: ModelFamily {
    public static let modelTypes = ["qwen2", "qwen3"]
    public static let optionalPrefix = "model."

    /// config.json fields; absent ones take transformers' `Qwen2Config` / `Qwen3Config` defaults.
    struct Config: Decodable {
        var modelType: String?
        var vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads: Int?
        var numKeyValueHeads, headDim, maxPositionEmbeddings, slidingWindow, maxWindowLayers: Int?
        var rmsNormEps, ropeTheta: Double?
        var ropeScaling, ropeParameters: RopeConfig?
        var tieWordEmbeddings, useSlidingWindow, attentionBias: Bool?
        var hiddenAct: String?
        var layerTypes: [String]?

        enum CodingKeys: String, CodingKey {
            case modelType = "model_type"
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
        let isQwen3 = c.modelType == "qwen3"
        try requireSilu(c.hiddenAct)
        let hidden = c.hiddenSize ?? 4096, heads = c.numAttentionHeads ?? 32, layers = c.numHiddenLayers ?? 32
        // Qwen2 ignores a `head_dim` key; Qwen3 reads it (default 128).
        let headDim = isQwen3 ? (c.headDim ?? 128) : try resolveHeadDim(nil, hidden: hidden, heads: heads)
        let rope = try RopeConfig.frequencies(parameters: c.ropeParameters, legacyTheta: c.ropeTheta,
                                              legacyScaling: c.ropeScaling, defaultTheta: 10000, headDim: headDim)
        // Without `layer_types`, sliding layers are those from `max_window_layers` on.
        var types = c.layerTypes
        if types == nil, c.useSlidingWindow ?? false {
            let from = c.maxWindowLayers ?? 28
            types = (0..<max(0, layers)).map { $0 >= from ? "sliding_attention" : "full_attention" }
        }
        let windows = try layerWindows(layerTypes: types, layers: max(0, layers), slidingWindow: c.slidingWindow ?? 4096)
        let qwen3Bias = c.attentionBias ?? false
        return Architecture(
            modelType: isQwen3 ? "qwen3" : "qwen2", vocabSize: c.vocabSize ?? 151936, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: c.numKeyValueHeads ?? heads, headDim: headDim,
            intermediateSize: c.intermediateSize ?? 22016, maxPositions: c.maxPositionEmbeddings ?? 32768,
            norm: .rms, normEps: Float(c.rmsNormEps ?? 1e-6), position: .rope(rope), mlp: .swiglu,
            qkvBias: isQwen3 ? qwen3Bias : true, outputBias: isQwen3 ? qwen3Bias : false, mlpBias: false, qkNorm: isQwen3,
            tiedEmbeddings: c.tieWordEmbeddings ?? false, layerWindows: windows)
    }

    public static func bindings(_ arch: Architecture) -> [TensorBinding] { llamaStyleBindings(arch) }
}
