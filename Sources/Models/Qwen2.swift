// Qwen2 / Qwen2.5: Llama's layout with biases on the q, k and v projections (not on o).
// Mirrors transformers `models/qwen2/modeling_qwen2.py` and mlx-swift-lm `Qwen2.swift`.
import Foundation
import Kernels

public enum Qwen2: ModelFamily {
    public static let modelTypes = ["qwen2"]
    public static let optionalPrefix = "model."

    /// config.json fields; absent ones take transformers' `Qwen2Config` defaults below.
    struct Config: Decodable {
        var vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads: Int?
        var numKeyValueHeads, maxPositionEmbeddings, slidingWindow, maxWindowLayers: Int?
        var rmsNormEps, ropeTheta: Double?
        var ropeScaling, ropeParameters: RopeConfig?
        var tieWordEmbeddings, useSlidingWindow: Bool?
        var hiddenAct: String?
        var layerTypes: [String]?

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
            case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
            case numKeyValueHeads = "num_key_value_heads", maxPositionEmbeddings = "max_position_embeddings"
            case slidingWindow = "sliding_window", maxWindowLayers = "max_window_layers"
            case rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta"
            case ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
            case tieWordEmbeddings = "tie_word_embeddings", useSlidingWindow = "use_sliding_window"
            case hiddenAct = "hidden_act", layerTypes = "layer_types"
        }
    }

    public static func architecture(config: Data) throws -> Architecture {
        let c = try JSONDecoder().decode(Config.self, from: config)
        try requireSilu(c.hiddenAct)
        let hidden = c.hiddenSize ?? 4096, heads = c.numAttentionHeads ?? 32, layers = c.numHiddenLayers ?? 32
        let headDim = try resolveHeadDim(nil, hidden: hidden, heads: heads)
        let rope = try RopeConfig.frequencies(parameters: c.ropeParameters, legacyTheta: c.ropeTheta,
                                              legacyScaling: c.ropeScaling, defaultTheta: 10000, headDim: headDim)
        // Without `layer_types`, sliding layers are those from `max_window_layers` on.
        var types = c.layerTypes
        if types == nil, c.useSlidingWindow ?? false {
            let from = c.maxWindowLayers ?? 28
            types = (0..<max(0, layers)).map { $0 >= from ? "sliding_attention" : "full_attention" }
        }
        let windows = try layerWindows(layerTypes: types, layers: max(0, layers), slidingWindow: c.slidingWindow ?? 4096)
        return Architecture(
            modelType: "qwen2", vocabSize: c.vocabSize ?? 151936, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: c.numKeyValueHeads ?? heads, headDim: headDim,
            intermediateSize: c.intermediateSize ?? 22016, maxPositions: c.maxPositionEmbeddings ?? 32768,
            norm: .rms, normEps: Float(c.rmsNormEps ?? 1e-6), position: .rope(rope), mlp: .swiglu,
            qkvBias: true, outputBias: false, mlpBias: false, qkNorm: false,
            tiedEmbeddings: c.tieWordEmbeddings ?? false, layerWindows: windows)
    }

    public static func bindings(_ arch: Architecture) -> [TensorBinding] { llamaStyleBindings(arch) }
}
