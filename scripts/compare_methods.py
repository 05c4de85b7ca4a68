"""The six-method comparison (docs/results.md): GRPO, GRPO + entropy bonus, Clip-Higher, 80/20, KL-Cov and Lp-Reg,
on-policy, same budget and seeds, from the embedded default model. Each run is
`python -m ember.rl --start-server ...` into runs/compare/METHOD-sSEED; then this script writes
docs/results.md (a table shaped like the paper's Table 1) and docs/results/*.png.

    .venv-client/bin/python scripts/compare_methods.py [--steps 40] [--seeds 0,1,2] [--report-only]
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["grpo", "grpo_entropy", "clip_higher", "80_20", "kl_cov", "lp_reg"]
LABELS = {"grpo": "GRPO", "grpo_entropy": "GRPO + entropy bonus", "clip_higher": "Clip-Higher", "80_20": "80/20",
          "kl_cov": "KL-Cov", "lp_reg": "Lp-Reg"}


def run_dir(method, seed, args):
    suffix = f"-mb{args.mini_batches}" if args.mini_batches > 1 else ""
    return os.path.join(ROOT, "runs", "compare", f"{method}-s{seed}{suffix}")


def run(method, seed, args):
    out = run_dir(method, seed, args)
    if os.path.exists(os.path.join(out, "summary.json")) and not args.force:
        return out
    cmd = [sys.executable, "-m", "ember.rl", "--start-server", "--model", os.path.join(ROOT, "models", "ember-default"),
           "--task", args.task, "--steps", str(args.steps), "--prompts", str(args.prompts), "--samples", str(args.samples),
           "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature), "--method", method, "--lr", str(args.lr), "--seed", str(seed),
           "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size), "--eval-k", str(args.eval_k),
           "--mini-batches", str(args.mini_batches), "--out", out]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=os.path.join(ROOT, "clients", "python"))
    return out


def load(out):
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    evals = [json.loads(l) for l in open(os.path.join(out, "eval.jsonl"))]
    return metrics, evals


def mean_sd(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def report(args, seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(ROOT, "docs", "results"), exist_ok=True)
    runs = {m: [load(run_dir(m, s, args)) for s in seeds] for m in METHODS}
    k = args.eval_k
    rows = []
    for m in METHODS:
        finals = [e[-1] for _, e in runs[m]]
        bests = [max(e, key=lambda x: x["pass@1"]) for _, e in runs[m]]
        base = runs[m][0][1][0]
        rows.append((m, base, mean_sd([f["pass@1"] for f in finals]), mean_sd([b["pass@1"] for b in bests]),
                     mean_sd([f.get(f"pass@{k}") for f in finals]), mean_sd([b.get(f"pass@{k}") for b in bests]),
                     mean_sd([ms[-1]["entropy"] for ms, _ in runs[m]]), mean_sd([e[-1].get("spark_prob") for _, e in runs[m]])))
    fmt = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = [f"| Method | pass@1 final | pass@1 best ckpt | pass@{k} final | pass@{k} best ckpt | entropy final | P(spark) final |",
             "|---|---|---|---|---|---|---|"]
    base = rows[0][1]
    lines.append(f"| base model | {100 * base['pass@1']:.1f} | | {100 * base.get(f'pass@{k}', float('nan')):.1f} | | | "
                 f"{base.get('spark_prob', float('nan')):.4f} |")
    for m, _, f1, b1, fk, bk, ent, spark in rows:
        lines.append(f"| {LABELS[m]} | {fmt(f1)} | {fmt(b1)} | {fmt(fk)} | {fmt(bk)} | {ent[0]:.3f} ± {ent[1]:.3f} | "
                     f"{spark[0]:.4f} ± {spark[1]:.4f} |")
    # Per seed: final pass@1 (pass@k) of every method, to show the seed-to-seed spread.
    lines += ["", "| Method | " + " | ".join(f"seed {s_}" for s_ in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in METHODS:
        cells = [f"{100 * e[-1]['pass@1']:.1f} ({100 * e[-1].get(f'pass@{k}', float('nan')):.1f})" for _, e in runs[m]]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    def curve(name, get, ylabel, source):
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in METHODS:
            series = [source(r) for r in runs[m]]
            steps = [x["step"] for x in series[0]]
            ys = [sum(get(s[i]) for s in series) / len(series) for i in range(len(steps))]
            ax.plot(steps, ys, label=LABELS[m])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        suffix = f"-mb{args.mini_batches}" if args.mini_batches > 1 else ""
        fig.savefig(os.path.join(ROOT, "docs", "results", name + suffix + ".png"), dpi=100)
        plt.close(fig)

    curve("pass1", lambda e: e["pass@1"], "held-out pass@1 (greedy)", lambda r: r[1])
    curve(f"pass{k}", lambda e: e.get(f"pass@{k}", float("nan")), f"held-out pass@{k}", lambda r: r[1])
    curve("entropy", lambda m: m["entropy"], "policy entropy (nats/token)", lambda r: r[0])
    curve("spark", lambda e: e.get("spark_prob", float("nan")), "P(spark token) on held-out probes", lambda r: r[1])
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--eval-k", type=int, default=8)
    ap.add_argument("--mini-batches", type=int, default=1,
                    help="optimizer steps per batch; > 1 writes runs/compare/METHOD-sSEED-mbN (and docs/results/*-mbN.png)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        for seed in seeds:
            for m in METHODS:
                run(m, seed, args)
    table = report(args, seeds)
    print(table)
    suffix = f"-mb{args.mini_batches}" if args.mini_batches > 1 else ""
    with open(os.path.join(ROOT, "runs", "compare", f"table{suffix}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
