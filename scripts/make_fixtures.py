#!/usr/bin/env python3
"""Writes the engine's golden fixtures with PyTorch + transformers (CPU, fp32).

For each tiny random model family it writes, under Tests/Fixtures/models/<name>/:
  config.json, model.safetensors      the model, saved by transformers' save_pretrained
  golden.safetensors                  inputs and expected outputs:
    tokens [T] (I32), seq_lens [B] (I32)   a packed batch of B sequences
    logits [T, V]                          next-token logits of every position
    loss []                                mean next-token cross-entropy within each sequence
    grad.<hf name>                         d(loss)/d(parameter) for every parameter
    adam_losses [5]                        loss before each of 5 AdamW steps on the same batch
    final.<hf name>                        parameters after those 5 steps
Plus a sharded copy of one model and a BF16 copy of another (with its own logits).

Usage: .venv/bin/python scripts/make_fixtures.py   (needs torch, transformers, safetensors)
Tests never need torch: the outputs are committed.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "models")
SEQ_LENS = [7, 5, 9]
# eps is large enough that coordinates whose exact gradient is ~0 (GPT-2's key bias, RoPE
# dimensions that barely rotate) do not turn rounding noise into full-size Adam steps, which
# no two implementations would reproduce; real gradients here are 10-100x larger.
ADAM = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)
CLIP = 1.0
STEPS = 5

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)


def configs():
    return {
        # Llama 2 style: grouped-query attention, untied head.
        "llama_gqa": LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False,
                                 rope_theta=10000.0),
        # Llama 3.1 style RoPE scaling, tied head, attention and MLP biases. Written with the
        # legacy rope_theta / rope_scaling keys (see legacy_rope below).
        "llama3_tied": LlamaConfig(**COMMON, num_key_value_heads=4, tie_word_embeddings=True,
                                   attention_bias=True, mlp_bias=True, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16}),
        # Mistral: sliding window shorter than the longest sequence.
        "mistral_window": MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4,
                                        tie_word_embeddings=False, rope_theta=1000000.0),
        # Qwen2 / 2.5: q, k, v biases, tied head (as Qwen2.5-0.5B).
        "qwen2_tied": Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=1000000.0),
        # Qwen3: head_dim (12) independent of hidden / heads (8), per-head q/k norms.
        "qwen3_headdim": Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=12,
                                     tie_word_embeddings=False, rope_theta=1000000.0),
        # GPT-2: LayerNorm, learned positions, GELU-tanh, Conv1D layout, tied head.
        "gpt2": GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                           n_inner=None, activation_function="gelu_new", resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0),
    }


def randomize(model, gen):
    """Weights large enough that logits and gradients are far from zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name):
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5) * 1.5)


def batch(gen, vocab):
    return [torch.randint(0, vocab, (n,), generator=gen) for n in SEQ_LENS]


def packed_forward(model, seqs):
    """Logits of every position, sequences run separately and concatenated, and the mean
    next-token cross-entropy over all predicted positions."""
    logits = [model(input_ids=s[None, :]).logits[0] for s in seqs]
    total, count = 0.0, 0
    for s, lg in zip(seqs, logits):
        total = total + torch.nn.functional.cross_entropy(lg[:-1], s[1:], reduction="sum")
        count += len(s) - 1
    return torch.cat(logits), total / count


def legacy_rope(path):
    """Rewrite rope_parameters as the rope_theta + rope_scaling keys older checkpoints use."""
    cfg = json.load(open(path))
    params = cfg.pop("rope_parameters", None)
    if params:
        cfg["rope_theta"] = params.pop("rope_theta")
        if params.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = params
    json.dump(cfg, open(path, "w"), indent=2, sort_keys=True)


def make(name, config, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize(model, gen)
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    if name == "llama3_tied":
        legacy_rope(os.path.join(out, "config.json"))
        reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    # Sanity: the saved folder reloads to the same numbers.
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()

    seqs = batch(gen, config.vocab_size)
    golden = {
        "tokens": torch.cat(seqs).to(torch.int32),
        "seq_lens": torch.tensor(SEQ_LENS, dtype=torch.int32),
    }
    params = dict(model.named_parameters())
    logits, loss = packed_forward(model, seqs)
    loss.backward()
    golden["logits"] = logits.detach().contiguous()
    golden["loss"] = loss.detach().reshape(())
    for n, p in params.items():
        golden["grad." + n] = p.grad.detach().clone().contiguous()

    opt = torch.optim.AdamW(params.values(), **ADAM)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        _, l = packed_forward(model, seqs)
        losses.append(l.item())
        l.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), CLIP)
        opt.step()
    golden["adam_losses"] = torch.tensor(losses, dtype=torch.float32)
    for n, p in params.items():
        golden["final." + n] = p.detach().clone().contiguous()
    save_file(golden, os.path.join(out, "golden.safetensors"), metadata={"format": "pt"})
    print(f"{name}: {sum(p.numel() for p in params.values())} parameters, loss {loss.item():.5f}")
    return out


def main():
    os.makedirs(ROOT, exist_ok=True)
    dirs = {}
    for i, (name, cfg) in enumerate(configs().items()):
        dirs[name] = make(name, cfg, seed=1000 + i)

    # Sharded copy of llama_gqa (same golden numbers).
    model = AutoModelForCausalLM.from_pretrained(dirs["llama_gqa"])
    sharded = os.path.join(ROOT, "llama_gqa_sharded")
    shutil.rmtree(sharded, ignore_errors=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))

    # BF16 copy of qwen2_tied, with fp32 logits of the bf16-rounded weights.
    model = AutoModelForCausalLM.from_pretrained(dirs["qwen2_tied"], attn_implementation="eager")
    bf = os.path.join(ROOT, "qwen2_tied_bf16")
    shutil.rmtree(bf, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(bf, safe_serialization=True)
    # Reload in fp32 so only the weights are rounded (not RoPE's inv_freq buffer).
    model = AutoModelForCausalLM.from_pretrained(bf, dtype=torch.float32, attn_implementation="eager").eval()
    assert next(model.parameters()).dtype == torch.float32
    from safetensors.torch import load_file
    g = load_file(os.path.join(dirs["qwen2_tied"], "golden.safetensors"))
    seqs = list(torch.split(g["tokens"].long(), SEQ_LENS))
    with torch.no_grad():
        logits, loss = packed_forward(model, seqs)
    save_file({"tokens": g["tokens"], "seq_lens": g["seq_lens"], "logits": logits.contiguous(),
               "loss": loss.reshape(())}, os.path.join(bf, "golden.safetensors"), metadata={"format": "pt"})
    print("wrote", ROOT)


if __name__ == "__main__":
    main()
