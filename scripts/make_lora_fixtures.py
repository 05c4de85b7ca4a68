#!/usr/bin/env python3
"""Writes the LoRA parity fixtures with PyTorch + transformers + PEFT (CPU, fp32).

For each tiny model of Tests/Fixtures/models (made by make_fixtures.py) it wraps the model in a
PEFT LoRA adapter, gives A and B random values (a fresh adapter has B = 0, which would leave A's
gradient zero), and writes under Tests/Fixtures/lora/<model>/:
  adapter/                         the adapter as PEFT's save_pretrained writes it
  golden.safetensors
    logits [T, V]                  next-token logits of the golden packed batch, adapter applied
    loss []                        mean next-token cross-entropy (as make_fixtures.py)
    grad.<PEFT tensor name>        d(loss)/d(adapter tensor)
    merged.<HF tensor name>        every weight of merge_and_unload()'s model
    merged_logits [T, V]           logits of the merged model
The inputs (tokens, seq_lens) are the model's own golden.safetensors.

`--check-ember-adapter DIR MODEL` instead loads an adapter folder written by Ember with PEFT and
prints the largest logit difference against logits Ember wrote beside it (ember_logits.safetensors):
the other direction of the round trip.

Usage: .venv/bin/python scripts/make_lora_fixtures.py   (needs torch, transformers, peft, safetensors)
Tests never need them: the outputs are committed.
"""
import argparse
import os
import shutil
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import packed_forward  # noqa: E402

ROOT = os.path.join(HERE, "..", "Tests", "Fixtures")
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# model -> (target_modules, r, alpha, use_rslora): every family, every projection kind, rsLoRA
# once, and a subset of targets once.
CASES = {
    "llama_gqa": (LLAMA_ALL, 4, 8, False),
    "llama3_tied": (LLAMA_ALL, 2, 4, False),
    "mistral_window": (["q_proj", "v_proj", "down_proj"], 4, 16, False),
    "qwen2_tied": (LLAMA_ALL, 4, 8, True),
    "qwen3_headdim": (LLAMA_ALL, 3, 6, False),
    "gpt2": (["c_attn", "c_proj", "c_fc"], 4, 8, False),
}


def load(name):
    path = os.path.join(ROOT, "models", name)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    g = load_file(os.path.join(path, "golden.safetensors"))
    seqs = list(torch.split(g["tokens"].long(), g["seq_lens"].tolist()))
    return model, seqs


def peft_name(name):
    """PEFT's saved tensor name for a parameter of the wrapped model."""
    return name.replace(".default", "")


def make(name, seed):
    targets, r, alpha, rs = CASES[name]
    model, seqs = load(name)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rs,
                     fan_in_fan_out=name == "gpt2", bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = os.path.join(ROOT, "lora", name)
    shutil.rmtree(out, ignore_errors=True)
    # A path relative to the repository, not this machine's.
    peft_model.peft_config["default"].base_model_name_or_path = f"Tests/Fixtures/models/{name}"
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    os.remove(os.path.join(out, "adapter", "README.md"))   # PEFT's model card template

    golden = {}
    logits, loss = packed_forward(peft_model, seqs)
    loss.backward()
    golden["logits"] = logits.detach().contiguous()
    golden["loss"] = loss.detach().reshape(())
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            golden["grad." + peft_name(n)] = p.grad.detach().clone().contiguous()
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        golden["merged_logits"] = packed_forward(merged, seqs)[0].detach().contiguous()
    for n, p in merged.state_dict().items():
        golden["merged." + n] = p.detach().clone().contiguous()
    save_file(golden, os.path.join(out, "golden.safetensors"), metadata={"format": "pt"})
    count = sum(1 for k in golden if k.startswith("grad."))
    print(f"{name}: {count} adapter tensors, loss {loss.item():.5f}")


def check_ember_adapter(folder, name):
    model, seqs = load(name)
    peft_model = PeftModel.from_pretrained(model, folder).eval()
    with torch.no_grad():
        logits, _ = packed_forward(peft_model, seqs)
    ember = load_file(os.path.join(folder, "ember_logits.safetensors"))["logits"]
    diff = (logits - ember).abs().max().item()
    print(f"PEFT loaded {folder}: max |logit difference| against Ember = {diff:.3g}")
    return diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-ember-adapter", nargs=2, metavar=("DIR", "MODEL"))
    args = ap.parse_args()
    if args.check_ember_adapter:
        diff = check_ember_adapter(*args.check_ember_adapter)
        sys.exit(0 if diff < 1e-4 else 1)
    torch.manual_seed(0)
    for i, name in enumerate(CASES):
        make(name, 2000 + i)


if __name__ == "__main__":
    main()
