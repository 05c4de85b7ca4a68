// Llama 2 / Llama 3 (with llama3 RoPE scaling) and Mistral, one implementation. Mistral is
// Llama's layout with two differences, written out below: a sliding attention window on every
// layer, and its own config defaults. Mirrors transformers `models/llama/modeling_llama.py` and
// `models/mistral/modeling_mistral.py`, and mlx-swift-lm `Llama.swift` (which serves both).
import Foundation
import Kernels

public enum Llama: ModelFamily {
    public static let modelTypes = ["llama", "mistral"]
    public static let optionalPrefix = "model."

    /// config.json fields; absent ones take the defaults of transformers' `LlamaConfig` or
    /// `MistralConfig` (`Defaults`).
    struct Config: Decodable {
        var modelType: String?
        var vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads: Int?
        var numKeyValueHeads, headDim, maxPositionEmbeddings, slidingWindow: Int?
        var rmsNormEps, ropeTheta: Double?
        var ropeScaling, ropeParameters: RopeConfig?
        var attentionBias, mlpBias, tieWordEmbeddings: Bool?
        var hiddenAct: String?

        enum CodingKeys: String, CodingKey {
            case modelType = "model_type"
            case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
            case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
            case numKeyValueHeads = "num_key_value_heads", headDim = "head_dim"
            case maxPositionEmbeddings = "max_position_embeddings", slidingWindow = "sliding_window"
            case rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta"
            case ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
            case attentionBias = "attention_bias", mlpBias = "mlp_bias"
            case tieWordEmbeddings = "tie_word_embeddings", hiddenAct = "hidden_act"
        }
    }

    /// Values of fields a config.json may omit.
    struct Defaults {
        let vocabSize: Int, kvHeads: Int?, intermediateSize: Int, maxPositions: Int
    }
    static let llamaDefaults = Defaults(vocabSize: 32000, kvHeads: nil, intermediateSize: 11008, maxPositions: 2048)
    static let mistralDefaults = Defaults(vocabSize: 32000, kvHeads: 8, intermediateSize: 14336, maxPositions: 131072)

    public static func architecture(config: Data) throws -> Architecture {
        let c = try JSONDecoder().decode(Config.self, from: config)
        let isMistral = c.modelType == "mistral"
        let d = isMistral ? mistralDefaults : llamaDefaults
        try requireSilu(c.hiddenAct)
        let hidden = c.hiddenSize ?? 4096, heads = c.numAttentionHeads ?? 32, layers = c.numHiddenLayers ?? 32
        let headDim = try resolveHeadDim(c.headDim, hidden: hidden, heads: heads)
        let rope = try RopeConfig.frequencies(parameters: c.ropeParameters, legacyTheta: c.ropeTheta,
                                              legacyScaling: c.ropeScaling, defaultTheta: 10000, headDim: headDim)
        // Mistral: every layer attends within `sliding_window` tokens; an absent key means
        // MistralConfig's 4096, an explicit null means no window. Llama attends to the whole prefix.
        var window = 0
        if isMistral {
            let raw = (try? JSONSerialization.jsonObject(with: config)) as? [String: Any] ?? [:]
            window = raw.keys.contains("sliding_window") ? (c.slidingWindow ?? 0) : 4096
            if window < 0 { throw ModelError.invalidConfig(field: "sliding_window", reason: "must be positive or null") }
        }
        let attentionBias = c.attentionBias ?? false
        return Architecture(
            modelType: isMistral ? "mistral" : "llama", vocabSize: c.vocabSize ?? d.vocabSize, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: c.numKeyValueHeads ?? d.kvHeads ?? heads, headDim: headDim,
            intermediateSize: c.intermediateSize ?? d.intermediateSize, maxPositions: c.maxPositionEmbeddings ?? d.maxPositions,
            norm: .rms, normEps: Float(c.rmsNormEps ?? 1e-6), position: .rope(rope), mlp: .swiglu,
            qkvBias: attentionBias, outputBias: attentionBias, mlpBias: c.mlpBias ?? false, qkNorm: false,
            tiedEmbeddings: c.tieWordEmbeddings ?? false, layerWindows: Array(repeating: window, count: max(0, layers)))
    }

    public static func bindings(_ arch: Architecture) -> [TensorBinding] {
        llamaStyleBindings(arch)
    }
}

/// Tensor names shared by Llama, Mistral, Qwen2 and Qwen3 (`model.layers.N.self_attn.q_proj`...).
/// Optional tensors follow the architecture's flags: q/k/v bias (Qwen2), output and MLP biases
/// (Llama `attention_bias` / `mlp_bias`), per-head q/k norms (Qwen3), untied `lm_head`.
func llamaStyleBindings(_ a: Architecture) -> [TensorBinding] {
    let C = a.hiddenSize, HS = a.headDim, NH = a.heads, NKV = a.kvHeads, I = a.intermediateSize
    var b: [TensorBinding] = [TensorBinding("model.embed_tokens.weight", slot: Slot.embed, shape: [a.vocabSize, C])]
    for i in 0..<a.layers {
        let p = "model.layers.\(i)."
        b.append(.init(p + "input_layernorm.weight", slot: Slot.layer(i, "attn_norm.weight"), shape: [C]))
        b.append(.init(p + "self_attn.q_proj.weight", slot: Slot.layer(i, "qkv.weight"), shape: [NH * HS, C]))
        b.append(.init(p + "self_attn.k_proj.weight", slot: Slot.layer(i, "qkv.weight"),
                       elementOffset: NH * HS * C, shape: [NKV * HS, C]))
        b.append(.init(p + "self_attn.v_proj.weight", slot: Slot.layer(i, "qkv.weight"),
                       elementOffset: (NH + NKV) * HS * C, shape: [NKV * HS, C]))
        if a.qkvBias {
            b.append(.init(p + "self_attn.q_proj.bias", slot: Slot.layer(i, "qkv.bias"), shape: [NH * HS]))
            b.append(.init(p + "self_attn.k_proj.bias", slot: Slot.layer(i, "qkv.bias"),
                           elementOffset: NH * HS, shape: [NKV * HS]))
            b.append(.init(p + "self_attn.v_proj.bias", slot: Slot.layer(i, "qkv.bias"),
                           elementOffset: (NH + NKV) * HS, shape: [NKV * HS]))
        }
        if a.qkNorm {
            b.append(.init(p + "self_attn.q_norm.weight", slot: Slot.layer(i, "q_norm.weight"), shape: [HS]))
            b.append(.init(p + "self_attn.k_norm.weight", slot: Slot.layer(i, "k_norm.weight"), shape: [HS]))
        }
        b.append(.init(p + "self_attn.o_proj.weight", slot: Slot.layer(i, "o.weight"), shape: [C, NH * HS]))
        if a.outputBias {
            b.append(.init(p + "self_attn.o_proj.bias", slot: Slot.layer(i, "o.bias"), shape: [C]))
        }
        b.append(.init(p + "post_attention_layernorm.weight", slot: Slot.layer(i, "mlp_norm.weight"), shape: [C]))
        b.append(.init(p + "mlp.gate_proj.weight", slot: Slot.layer(i, "mlp_in.weight"), shape: [I, C]))
        b.append(.init(p + "mlp.up_proj.weight", slot: Slot.layer(i, "mlp_in.weight"),
                       elementOffset: I * C, shape: [I, C]))
        b.append(.init(p + "mlp.down_proj.weight", slot: Slot.layer(i, "mlp_out.weight"), shape: [C, I]))
        if a.mlpBias {
            b.append(.init(p + "mlp.gate_proj.bias", slot: Slot.layer(i, "mlp_in.bias"), shape: [I]))
            b.append(.init(p + "mlp.up_proj.bias", slot: Slot.layer(i, "mlp_in.bias"), elementOffset: I, shape: [I]))
            b.append(.init(p + "mlp.down_proj.bias", slot: Slot.layer(i, "mlp_out.bias"), shape: [C]))
        }
    }
    b.append(.init("model.norm.weight", slot: Slot.finalNormWeight, shape: [C]))
    if !a.tiedEmbeddings {
        b.append(.init("lm_head.weight", slot: Slot.lmHead, shape: [a.vocabSize, C]))
    }
    return b
}
