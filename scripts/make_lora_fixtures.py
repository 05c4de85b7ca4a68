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

`--check-ember-adapters` checks the other direction on every family: it starts ember-server on
the fixture model, creates an adapter, trains it two steps (so B is not zero), saves it with
adapters.save, loads that folder with PEFT's PeftModel.from_pretrained, and compares the
per-token log-probabilities of the golden batch from PEFT with Ember's `logprob` under the adapter.

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


def check_ember_adapters():
    import re
    import subprocess
    import tempfile
    sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
    from ember import Client
    exe = os.path.join(HERE, "..", ".build", "release", "ember-server")
    worst_all = 0.0
    for name, (targets, r, alpha, rs) in CASES.items():
        with tempfile.TemporaryDirectory() as ckpt:
            p = subprocess.Popen([exe, "--model", os.path.join(ROOT, "models", name), "--port", "0", "--checkpoint-dir", ckpt,
                                  "--log-level", "warning", "--threads", "1"], stdout=subprocess.PIPE, text=True)
            try:
                port = re.search(r"127\.0\.0\.1:(\d+)", p.stdout.readline()).group(1)
                c = Client(f"http://127.0.0.1:{port}")
                c.create_adapter("x", rank=r, alpha=alpha, target_modules=targets, use_rslora=rs, seed=3)
                model, seqs = load(name)
                batch = [{"tokens": s.tolist(), "response_start": 1, "advantage": 1.0 - 2 * (i % 2)} for i, s in enumerate(seqs)]
                for _ in range(2):
                    c.train_step(loss={"mode": "ppo"}, batch=batch, optimizer={"lr": 0.05}, adapter="x")
                folder = c.save_adapter("x")["path"]
                ember = c.logprob([{"tokens": s.tolist(), "response_start": 1} for s in seqs], adapter="x")["results"]
                peft_model = PeftModel.from_pretrained(model, folder).eval()
                worst = 0.0
                with torch.no_grad():
                    for s, e in zip(seqs, ember):
                        lp = torch.log_softmax(peft_model(input_ids=s[None, :]).logits[0, :-1], -1)
                        ours = lp.gather(1, s[1:, None])[:, 0]
                        worst = max(worst, (ours - torch.tensor(e["logprobs"])).abs().max().item())
                print(f"{name}: PEFT loaded Ember's adapter; max |log-prob difference| {worst:.3g}")
                worst_all = max(worst_all, worst)
            finally:
                p.terminate()
                p.wait()
    return worst_all


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-ember-adapters", action="store_true")
    args = ap.parse_args()
    if args.check_ember_adapters:
        sys.exit(0 if check_ember_adapters() < 1e-4 else 1)
    torch.manual_seed(0)
    for i, name in enumerate(CASES):
        make(name, 2000 + i)


if __name__ == "__main__":
    main()
