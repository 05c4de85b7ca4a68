#!/usr/bin/env python3
"""The PyTorch side of bench/run: the same shapes and measurements as ember-bench, on
PyTorch CPU eager (transformers' Qwen2 model), printed as JSON lines.

  torch_bench.py engine --shape tiny|0.5b [--steps N] [--threads N]
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "tiny": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=768, vocab_size=1024, tie_word_embeddings=True,
                  max_position_embeddings=2048), 64, 128),
    "0.5b": (dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768), 8, 256),
    "1.5b": (dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768), 8, 256),
}


def engine(shape, steps, threads):
    torch.set_num_threads(threads)
    cfg, batch, seq = SHAPES[shape]
    model = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation="sdpa")).float()
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    tokens = batch * seq
    model.eval()
    fwd = []
    with torch.no_grad():
        for i in range(steps + 1):
            t0 = time.perf_counter()
            model(input_ids=ids).logits.sum()
            if i:
                fwd.append(time.perf_counter() - t0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    train = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i:
            train.append(time.perf_counter() - t0)
    f, t = statistics.median(fwd), statistics.median(train)
    print(json.dumps({"kind": "engine", "impl": "pytorch", "shape": shape, "tokens": tokens, "threads": threads,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "forward_tok_s": tokens / f, "train_tok_s": tokens / t, "forward_s": fwd, "train_s": train,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "torch": torch.__version__}), flush=True)


def random_model(shape):
    cfg, batch, seq = SHAPES[shape]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation="sdpa")).float().eval()
    return model, cfg, batch, seq


def generate(shape, batch, prompt, new, threads):
    """Hugging Face generate, greedy, KV cache, `new` tokens per sequence (no early stop)."""
    torch.set_num_threads(threads)
    model, cfg, _, _ = random_model(shape)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.randint(0, cfg["vocab_size"], (batch, prompt))
    times = []
    with torch.no_grad():
        for i in range(3):
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)
            if i:
                times.append(time.perf_counter() - t0)
            assert out.shape[1] == prompt + new
    print(json.dumps({"kind": "generate", "impl": "pytorch", "shape": shape, "batch": batch, "prompt": prompt,
                      "new": new, "decode_tok_s": batch * new / statistics.median(times), "seconds": times}), flush=True)


def score(shape, threads):
    """Forward + log-softmax + gather of every next token (what scoring returns)."""
    torch.set_num_threads(threads)
    model, cfg, batch, seq = random_model(shape)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    times = []
    with torch.no_grad():
        for i in range(3):
            t0 = time.perf_counter()
            logits = model(input_ids=ids).logits[:, :-1]
            torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])
            if i:
                times.append(time.perf_counter() - t0)
    print(json.dumps({"kind": "score", "impl": "pytorch", "shape": shape, "tokens": batch * seq,
                      "score_tok_s": batch * seq / statistics.median(times), "seconds": times}), flush=True)


def train(shape, mode, steps, threads, lora_rank=0, clock=False):
    """One optimizer step per call with the PPO or Lp-Reg loss written in PyTorch (token-mean,
    advantages +-1 per sequence, on-policy old log-probs, min-p 0.02 proxy, rho 0.01, beta 1)."""
    torch.set_num_threads(threads)
    model, cfg, batch, seq = random_model(shape)
    if lora_rank:
        # PEFT LoRA on every linear projection (the base frozen), as Ember's --lora-rank.
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                                 lora_dropout=0.0))
    model.train()
    prompt = 16
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    adv = torch.tensor([1.0 if b % 2 == 0 else -1.0 for b in range(batch)])[:, None].expand(batch, seq - prompt)
    targets = ids[:, prompt:]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, prompt - 1:-1].float()
        logp_all = torch.log_softmax(logits, -1)
        old = logp_all.gather(-1, targets[..., None])[..., 0]
        p = logp_all.exp()
        keep = p >= 0.02 * p.max(-1, keepdim=True).values
        masked = torch.where(keep, logp_all, torch.full_like(logp_all, float("-inf")))
        proxy = (masked - torch.logsumexp(masked, -1, keepdim=True)).gather(-1, targets[..., None])[..., 0]
        del logits, logp_all, p, keep, masked
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    times = []
    # --clock: one more step under torch.profiler, after the timed ones; the self time of the
    # matrix-product ops (MKL/oneDNN calls) and of the attention ops, as in `ember-bench train --clock`.
    clocked = None
    for i in range(steps + 1 + (1 if clock else 0)):
        profiler = None
        if i == steps + 1:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, prompt - 1:-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        ratio = torch.exp(lp - old)
        if mode == "ppo":
            per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
        else:
            neg = adv < 0
            flat_lp = lp.detach()[neg]
            k = int(flat_lp.numel() * 0.01)
            sel = torch.zeros_like(lp, dtype=torch.bool)
            if k > 1:
                cut = torch.topk(flat_lp, k, largest=False).values.max()
                sel = neg & (lp.detach() <= cut) & (lp.detach() < proxy)
            d = proxy - lp
            k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
            per = torch.where(sel, -adv * ratio + k3, torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.0, 10.0)))
        loss = per.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if profiler is not None:
            wall = time.perf_counter() - t0
            profiler.__exit__(None, None, None)
            clocked = {"clocked_step_seconds": wall, "matmul_seconds": 0.0, "attention_seconds": 0.0}
            for e in profiler.key_averages():
                name = e.key
                if name in MATMUL_OPS:
                    clocked["matmul_seconds"] += e.self_cpu_time_total / 1e6
                elif "scaled_dot_product" in name or "attention" in name:
                    clocked["attention_seconds"] += e.self_cpu_time_total / 1e6
        elif i:
            times.append(time.perf_counter() - t0)
    tokens = batch * seq
    print(json.dumps({"kind": "train", "impl": "pytorch", "shape": shape, "mode": mode, "tokens": tokens, "lora_rank": lora_rank,
                      "train_tok_s": tokens / statistics.median(times), "seconds": times,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **(clocked or {})}), flush=True)


# The ATen ops whose self time is a BLAS / oneDNN matrix product (what Ember's `gemm` does).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def sgemm(threads, n=2048):
    """torch.mm on 2048^3 float32 (MKL/oneDNN), best of 5: the third candidate for the peak."""
    torch.set_num_threads(threads)
    a, b = torch.rand(n, n) - 0.5, torch.rand(n, n) - 0.5
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        torch.mm(a, b.T)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"kind": "sgemm", "impl": "pytorch", "size": n, "threads": threads,
                      "gflops": 2 * n ** 3 / min(times[1:]) / 1e9}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["engine", "generate", "score", "train", "sgemm"])
    ap.add_argument("--mode", default="ppo")
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--clock", action="store_true")
    a = ap.parse_args()
    if a.what == "engine":
        engine(a.shape, a.steps, a.threads)
    elif a.what == "train":
        train(a.shape, a.mode, a.steps, a.threads, a.lora_rank, a.clock)
    elif a.what == "generate":
        generate(a.shape, a.batch, a.prompt, a.new, a.threads)
    elif a.what == "sgemm":
        sgemm(a.threads)
    else:
        score(a.shape, a.threads)
