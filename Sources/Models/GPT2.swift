// GPT-2: LayerNorm, learned absolute positions, GELU (tanh), biases everywhere, tied head, and
// Conv1D weights stored [in, out] (transposed here to the engine's [out, in]). Mirrors
// transformers `models/gpt2/modeling_gpt2.py` and llm.c `train_gpt2.c`.
import Foundation
import Kernels

public enum GPT2: ModelFamily {
    public static let modelTypes = ["gpt2"]
    public static let optionalPrefix = "transformer."

    /// config.json fields; absent ones take transformers' `GPT2Config` defaults below.
    struct Config: Decodable {
        var vocabSize, nPositions, nEmbd, nLayer, nHead, nInner: Int?
        var layerNormEpsilon: Double?
        var activationFunction: String?
        var tieWordEmbeddings, scaleAttnByInverseLayerIdx, scaleAttnWeights: Bool?

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size", nPositions = "n_positions", nEmbd = "n_embd", nLayer = "n_layer"
            case nHead = "n_head", nInner = "n_inner", layerNormEpsilon = "layer_norm_epsilon"
            case activationFunction = "activation_function", tieWordEmbeddings = "tie_word_embeddings"
            case scaleAttnByInverseLayerIdx = "scale_attn_by_inverse_layer_idx"
            case scaleAttnWeights = "scale_attn_weights"
        }
    }

    public static func architecture(config: Data) throws -> Architecture {
        let c = try JSONDecoder().decode(Config.self, from: config)
        let act = c.activationFunction ?? "gelu_new"
        guard ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"].contains(act) else {
            throw ModelError.unsupported(feature: "activation_function '\(act)'", reason: "GPT-2 support covers the tanh GELU (gelu_new)")
        }
        if c.scaleAttnByInverseLayerIdx ?? false {
            throw ModelError.unsupported(feature: "scale_attn_by_inverse_layer_idx", reason: "not implemented")
        }
        if !(c.scaleAttnWeights ?? true) {
            throw ModelError.unsupported(feature: "scale_attn_weights = false", reason: "not implemented")
        }
        let hidden = c.nEmbd ?? 768, heads = c.nHead ?? 12, layers = c.nLayer ?? 12
        let headDim = try resolveHeadDim(nil, hidden: hidden, heads: heads)
        return Architecture(
            modelType: "gpt2", vocabSize: c.vocabSize ?? 50257, hiddenSize: hidden, layers: layers,
            heads: heads, kvHeads: heads, headDim: headDim, intermediateSize: c.nInner ?? 4 * hidden,
            maxPositions: c.nPositions ?? 1024, norm: .layer, normEps: Float(c.layerNormEpsilon ?? 1e-5),
            position: .learned, mlp: .geluTanh, qkvBias: true, outputBias: true, mlpBias: true, qkNorm: false,
            tiedEmbeddings: c.tieWordEmbeddings ?? true, layerWindows: Array(repeating: 0, count: max(0, layers)))
    }

    public static func bindings(_ a: Architecture) -> [TensorBinding] {
        let C = a.hiddenSize, I = a.intermediateSize
        var b: [TensorBinding] = [
            .init("transformer.wte.weight", slot: Slot.embed, shape: [a.vocabSize, C]),
            .init("transformer.wpe.weight", slot: Slot.positionEmbed, shape: [a.maxPositions, C]),
        ]
        for i in 0..<a.layers {
            let p = "transformer.h.\(i)."
            b += [
                .init(p + "ln_1.weight", slot: Slot.layer(i, "attn_norm.weight"), shape: [C]),
                .init(p + "ln_1.bias", slot: Slot.layer(i, "attn_norm.bias"), shape: [C]),
                .init(p + "attn.c_attn.weight", slot: Slot.layer(i, "qkv.weight"), shape: [C, 3 * C], transposed: true),
                .init(p + "attn.c_attn.bias", slot: Slot.layer(i, "qkv.bias"), shape: [3 * C]),
                .init(p + "attn.c_proj.weight", slot: Slot.layer(i, "o.weight"), shape: [C, C], transposed: true),
                .init(p + "attn.c_proj.bias", slot: Slot.layer(i, "o.bias"), shape: [C]),
                .init(p + "ln_2.weight", slot: Slot.layer(i, "mlp_norm.weight"), shape: [C]),
                .init(p + "ln_2.bias", slot: Slot.layer(i, "mlp_norm.bias"), shape: [C]),
                .init(p + "mlp.c_fc.weight", slot: Slot.layer(i, "mlp_in.weight"), shape: [C, I], transposed: true),
                .init(p + "mlp.c_fc.bias", slot: Slot.layer(i, "mlp_in.bias"), shape: [I]),
                .init(p + "mlp.c_proj.weight", slot: Slot.layer(i, "mlp_out.weight"), shape: [I, C], transposed: true),
                .init(p + "mlp.c_proj.bias", slot: Slot.layer(i, "mlp_out.bias"), shape: [C]),
            ]
        }
        b.append(.init("transformer.ln_f.weight", slot: Slot.finalNormWeight, shape: [C]))
        b.append(.init("transformer.ln_f.bias", slot: Slot.finalNormBias, shape: [C]))
        if !a.tiedEmbeddings { b.append(.init("lm_head.weight", slot: Slot.lmHead, shape: [a.vocabSize, C])) }
        return b
    }
}
