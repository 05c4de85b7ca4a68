#!/usr/bin/env python3
"""Writes the long-context and RoPE-table fixtures with PyTorch + transformers (CPU).

Tests/Fixtures/rope/tables.json
    For default, linear and llama3 RoPE over several thetas, head sizes and contexts: the
    inverse-frequency table transformers builds (fp32 bit patterns), and per entry whether
    PyTorch's fp32 power there is the correctly rounded one (its vectorized powf is off by one
    ulp in about 2% of arguments; Ember rounds correctly, so only those entries may differ).
Tests/Fixtures/long_context/<family>/
    A small random model of each family whose positions reach 320 (at least twice the llama3
    original context of 128), saved by save_pretrained, and long.json: one 320-token sequence,
    the log-probability of every next token from a float64 run (transformers keeps RoPE's table
    and angles in fp32 even then: they are part of the model) and from the fp32 run. Tests
    require Ember's error against the float64 run to stay within 2x of PyTorch fp32's.

Usage: .venv/bin/python scripts/make_long_context_fixtures.py   (needs torch, transformers)
"""
import json
import math
import os
import shutil

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from make_fixtures import randomize  # the golden fixtures' weight scales

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures")
T = 320
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}


def tables():
    cases = []
    scalings = [None, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 1.5}]
    for orig in (16, 128, 512):
        scalings.append(dict(LLAMA3, original_max_position_embeddings=orig))
    scalings.append({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192})
    for theta in (10000.0, 500000.0, 1000000.0):
        for dim in (8, 16, 32, 64, 128):
            for scaling in scalings:
                # transformers writes into the dict it is given: pass a copy.
                cfg = LlamaConfig(hidden_size=dim * 4, num_attention_heads=4, head_dim=dim, rope_theta=theta,
                                  rope_scaling=dict(scaling) if scaling else None, max_position_embeddings=16384)
                assert cfg.rope_parameters["rope_theta"] == theta
                inv = LlamaRotaryEmbedding(cfg).inv_freq.float()
                exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
                torch_pow = (theta ** exponents).tolist()
                exact_pow = [float(torch.tensor(math.pow(float(torch.tensor(theta, dtype=torch.float32)), e),
                                                dtype=torch.float32)) for e in exponents.tolist()]
                cases.append({"theta": theta, "head_dim": dim, "rope_scaling": scaling,
                              "inv_freq_bits": inv.view(torch.int32).tolist(),
                              "pow_correctly_rounded": [a == b for a, b in zip(torch_pow, exact_pow)]})
    os.makedirs(os.path.join(ROOT, "rope"), exist_ok=True)
    with open(os.path.join(ROOT, "rope", "tables.json"), "w") as f:
        json.dump(cases, f)
    print(f"rope tables: {len(cases)} configurations")


def families():
    return {
        "llama": LlamaConfig(**COMMON, num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=False),
        "llama3": LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(LLAMA3),
                              tie_word_embeddings=True),
        "mistral": MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=96, rope_theta=1000000.0,
                                 tie_word_embeddings=False),
        "qwen2": Qwen2Config(**COMMON, num_key_value_heads=1, rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=24, rope_theta=1000000.0,
                             tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=2, n_positions=512, n_inner=None,
                           activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    }


def next_token_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(input_ids=tokens[None, :]).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, tokens[1:, None])[:, 0].tolist()


def long_context():
    for i, (name, cfg) in enumerate(families().items()):
        gen = torch.Generator().manual_seed(2000 + i)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        randomize(model, gen)
        out = os.path.join(ROOT, "long_context", name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
        tokens = torch.randint(0, cfg.vocab_size, (T,), generator=gen)
        f32 = next_token_logprobs(model, tokens)
        f64 = next_token_logprobs(model.double(), tokens)
        with open(os.path.join(out, "long.json"), "w") as f:
            json.dump({"tokens": tokens.tolist(), "logprobs_f64": f64, "logprobs_f32": f32}, f)
        err = max(abs(a - b) for a, b in zip(f32, f64))
        print(f"{name}: PyTorch fp32 max |error| vs float64 {err:.2e}")


if __name__ == "__main__":
    tables()
    long_context()
