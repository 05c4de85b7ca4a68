// Llama 2 / Llama 3 (incl. llama3 RoPE scaling). Mirrors transformers
// `models/llama/modeling_llama.py` and mlx-swift-lm `Llama.swift`.
import Foundation
import Kernels

public enum Llama: ModelFamily {
    public static let modelTypes = ["llama"]
    public static let optionalPrefix = "model."

    /// config.json fields; absent ones take transformers' `LlamaConfig` defaults below.
    struct Config: Decodable {
        var vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads: Int?
        var numKeyValueHeads, headDim, maxPositionEmbeddings: Int?
        var rmsNormEps, ropeTheta: Double?
        var ropeScaling, ropeParameters: RopeConfig?
        var attentionBias, mlpBias, tieWordEmbeddings: Bool?
        var hiddenAct: String?

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
            case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
            case numKeyValueHeads = "num_key_value_heads", headDim = "head_dim"
            case maxPositionEmbeddings = "max_position_embeddings", rmsNormEps = "rms_norm_eps"
            case ropeTheta = "rope_theta", ropeScaling = "rope_scaling", ropeParameters = "rope_parameters"
            case attentionBias = "attention_bias", mlpBias = "mlp_bias"
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
        let attentionBias = c.attentionBias ?? false
        return Architecture(
            modelType: "llama", vocabSize: c.vocabSize ?? 32000, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: c.numKeyValueHeads ?? heads, headDim: headDim,
            intermediateSize: c.intermediateSize ?? 11008, maxPositions: c.maxPositionEmbeddings ?? 2048,
            norm: .rms, normEps: Float(c.rmsNormEps ?? 1e-6), position: .rope(rope), mlp: .swiglu,
            qkvBias: attentionBias, outputBias: attentionBias, mlpBias: c.mlpBias ?? false, qkNorm: false,
            tiedEmbeddings: c.tieWordEmbeddings ?? false, layerWindows: Array(repeating: 0, count: max(0, layers)))
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
