"""The long-horizon studies (docs/results.md, "Study 2" and "Study 3"): their runs, queued and
resumable, and their report.

    PYTHONPATH=clients/python nohup nice -n 19 .venv/bin/python scripts/study.py run &   # works through study 3's queue
    .venv-client/bin/python scripts/study.py report           # copies the logs, writes the tables and plots
    python3 scripts/study.py list                             # the queue and each run's progress
    (--study 2 for the rare-spark study whose spark did not pay; 3, the default, for the one that does)

`run` takes the runs in queue order, one at a time, each `python -m ember.rl
--start-server ... --resume` into runs/studyN/NAME; a run whose summary.json exists is done and
skipped, an interrupted one continues from its last checkpoint (every 20 steps in study 2, 25
in study 3). A run holds runs/studyN/NAME.lock while it runs, so a second driver (`run --only
NAMES`) skips it. Killing the driver and starting it again loses at most 24 steps; checkpoints are
not committed, so a run interrupted on one machine starts again from step 0 on a fresh one. `report` copies every run's
metrics.jsonl and eval.jsonl (and summary.json) to docs/results/studyN/NAME/ and writes
docs/results/studyN/summary.md and *.png. A run with no logs under runs/ is reported from its
committed copy, so a report on a fresh checkout keeps what earlier machines ran.
"""
import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from compare_methods import mean_sd  # noqa: E402
METHODS_OFF = ("grpo", "grpo_entropy", "clip_higher", "80_20", "kl_cov", "lp_reg", "gspo")


def spec(name, method, seed, steps, mini_batches=1, options=None, model=None, extra=None):
    """One run; `model` (a folder under models/) replaces the study's model; `extra` is more
    `ember.rl` arguments."""
    return {"name": name, "method": method, "seed": seed, "steps": steps, "mini_batches": mini_batches,
            "options": options or {}, "model": model, "extra": extra or []}


def seeds_and_off_policy():
    """Both studies' middle: seeds 1 and 2 of the on-policy methods (500 steps), then the
    off-policy set (4 mini-batches, 200 steps, seeds 0-2)."""
    q = []
    for seed in (1, 2):
        q += [spec(f"{m}-s{seed}", m, seed, 500) for m in ("grpo", "lp_reg", "grpo_entropy")]
    for seed in (0, 1, 2):
        q += [spec(f"{m}-s{seed}-mb4", m, seed, 200, mini_batches=4) for m in METHODS_OFF]
    return q


def queue2():
    """Most informative first: each method's seed 0, the proxy-cutoff ablation that tests
    prediction 4 and its follow-up (strength and breadth), then the other seeds, the off-policy comparison and the rest of the ablation."""
    q = [spec("grpo-s0", "grpo", 0, 500), spec("lp_reg-s0", "lp_reg", 0, 500),
         spec("lp_reg-s0-kappa0.001", "lp_reg", 0, 300, options={"min_p": 0.001}),
         spec("grpo_entropy-s0", "grpo_entropy", 0, 500)]
    # After the interim reading (prediction 4 failed: the wider proxy alone did not protect the
    # spark): is the regulariser too weak (beta) or too narrow (rho)? Both with kappa = 0.001.
    q += [spec("lp_reg-s0-kappa0.001-beta10", "lp_reg", 0, 300, options={"min_p": 0.001, "beta": 10}),
          spec("lp_reg-s0-kappa0.001-rho0.05", "lp_reg", 0, 300, options={"min_p": 0.001, "rho": 0.05})]
    q += seeds_and_off_policy()
    q += [spec("lp_reg-s0-kappa0.005", "lp_reg", 0, 300, options={"min_p": 0.005}),
          spec("lp_reg-s0-rho0.005", "lp_reg", 0, 300, options={"rho": 0.005}),
          spec("lp_reg-s0-rho0.02", "lp_reg", 0, 300, options={"rho": 0.02})]
    return q


def queue3():
    """Seed 0 of the three on-policy methods, then Lp-Reg with the wide proxy (kappa = 0.001, the
    mechanism test of prediction 3), GRPO on arm B (the rarer spark), the entropy bonus at 0.03,
    then seeds 1 and 2, the off-policy set and the rest of the rho and kappa ablation
    (docs/results.md, "Study 3")."""
    q = [spec(f"{m}-s0", m, 0, 500) for m in ("grpo", "lp_reg", "grpo_entropy")]
    q.append(spec("lp_reg-s0-kappa0.001", "lp_reg", 0, 300, options={"min_p": 0.001}))
    # Arm B: the same spark five times rarer (models/ember-spark-rarer).
    q.append(spec("rarer-grpo-s0", "grpo", 0, 500, model="ember-spark-rarer"))
    # The paper's entropy-bonus instability at a coefficient large enough to show it, if it is
    # there (study 2's 0.003 only followed GRPO; docs/results.md, "Study 3", prediction A6).
    q.append(spec("grpo_entropy-s0-coef0.03", "grpo_entropy", 0, 300, extra=["--entropy-coef", "0.03"]))
    q += seeds_and_off_policy()
    # The rest of the rho and kappa ablation.
    q += [spec("lp_reg-s0-rho0.005", "lp_reg", 0, 300, options={"rho": 0.005}),
          spec("lp_reg-s0-rho0.02", "lp_reg", 0, 300, options={"rho": 0.02}),
          spec("lp_reg-s0-kappa0.005", "lp_reg", 0, 300, options={"min_p": 0.005})]
    # Arm B's two Lp-Reg runs (kappa 0.02 and 0.001 on ember-spark-rarer) were dropped: GRPO took
    # the rarer spark up within 30 steps, and the ablation showed that Lp-Reg's strength and
    # breadth do not change the uptake (docs/results.md, "Study 3: conclusion").
    return q


STUDIES = {
    2: {"queue": queue2, "eval_size": 500,
        "common": ["--model", os.path.join(ROOT, "models", "ember-rare"), "--task", "arithmetic_rare", "--prompts", "32",
                   "--samples", "8", "--temperature", "1.0", "--max-tokens", "128", "--lr", "1e-4", "--eval-every", "20",
                   "--eval-size", "500", "--eval-k", "8", "--checkpoint-every", "20"]},
    # Half study 2's batch, so that a 500-step run fits in one working session of this 2-core machine.
    3: {"queue": queue3, "eval_size": 300,
        "common": ["--model", os.path.join(ROOT, "models", "ember-spark"), "--task", "arithmetic_spark", "--prompts", "16",
                   "--samples", "8", "--temperature", "1.0", "--max-tokens", "128", "--lr", "1e-4", "--eval-every", "25",
                   "--eval-size", "300", "--eval-k", "8", "--checkpoint-every", "25"]},
}


def runs_dir(study):
    return os.path.join(ROOT, "runs", f"study{study}")


def docs_dir(study):
    return os.path.join(ROOT, "docs", "results", f"study{study}")


def model_path(study, s):
    """The run's model folder: its own (arm B's runs name one) or the study's."""
    common = STUDIES[study]["common"]
    return os.path.join(ROOT, "models", s["model"]) if s.get("model") else common[common.index("--model") + 1]


def rl_arguments(study, s):
    """The run's `python -m ember.rl` arguments; the replays of spark_attribution.py parse the same."""
    args = ["--start-server", *STUDIES[study]["common"], "--method", s["method"], "--seed", str(s["seed"]),
            "--steps", str(s["steps"]), "--out", os.path.join(runs_dir(study), s["name"]), "--resume"]
    if s["mini_batches"] > 1:
        args += ["--mini-batches", str(s["mini_batches"])]
    if s["options"]:
        args += ["--loss-options", json.dumps(s["options"])]
    return args + s.get("extra", []) + ["--model", model_path(study, s)]  # the last --model wins


def command(study, s):
    return [sys.executable, "-m", "ember.rl", *rl_arguments(study, s)]


def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []


def logs(study, s):
    """The folder holding a run's logs: runs/ while it has them, else the committed copy."""
    live = os.path.join(runs_dir(study), s["name"])
    return live if os.path.exists(os.path.join(live, "metrics.jsonl")) else os.path.join(docs_dir(study), s["name"])


def progress(study, s):
    out = logs(study, s)
    done = os.path.exists(os.path.join(out, "summary.json"))
    steps = len(rows(os.path.join(out, "metrics.jsonl")))
    return done, steps


def run(args):
    runs = runs_dir(args.study)
    os.makedirs(runs, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python"))
    only = set(args.only.split(",")) if args.only else None
    queue = STUDIES[args.study]["queue"]()
    if only and only - {s["name"] for s in queue}:
        print(f"study{args.study}: --only names runs not in the queue: {sorted(only - {s['name'] for s in queue})}", file=sys.stderr)
        return 2
    for s in queue:
        if (only and s["name"] not in only) or progress(args.study, s)[0]:
            continue
        # A second driver (for example one given --only) skips the run another is running: each
        # run holds an exclusive lock on runs/studyN/NAME.lock while it runs.
        lock = open(os.path.join(runs, s["name"] + ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            if progress(args.study, s)[0]:
                continue
            # A run that fails is started again from its last checkpoint, twice at most: a pause for
            # a benchmark (SIGSTOP) that outlasts the client's socket timeout ends a run that way.
            for attempt in range(3):
                print(f"study{args.study}: {s['name']}" + (f" (attempt {attempt + 1})" if attempt else ""), flush=True)
                with open(os.path.join(runs, s["name"] + ".log"), "a") as log:
                    code = subprocess.call(command(args.study, s), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                if code == 0:
                    break
            if code != 0:
                print(f"study{args.study}: {s['name']} exited with {code}; see {s['name']}.log", flush=True)
                return code
        finally:
            lock.close()
    return 0


def window(metrics, key, lo, hi):
    vals = [m[key] for m in metrics if lo <= m["step"] <= hi and m.get(key) is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def report(args):
    docs = docs_dir(args.study)
    os.makedirs(docs, exist_ok=True)
    runs = [(s, logs(args.study, s)) for s in STUDIES[args.study]["queue"]()]
    runs = [(s, out, rows(os.path.join(out, "metrics.jsonl")), rows(os.path.join(out, "eval.jsonl"))) for s, out in runs]
    runs = [r for r in runs if r[2]]
    figures = ["pass@1", "pass@8"] + (["mean@8"] if any("mean@8" in e for r in runs for e in r[3]) else [])
    lines = [f"# Study {args.study} runs (written by scripts/study.py report --study {args.study})", "",
             "Steps done of planned; entropy is the mean sampled-token entropy over steps 1-10 and over the last "
             f"10 steps done; pass@1 (greedy) and pass@8 (T = 1) on {STUDIES[args.study]['eval_size']} held-out problems "
             "at step 0, the last evaluation, and the best one"
             + ("; mean@8 is the mean accuracy of those 8 samples" if "mean@8" in figures else "")
             + "; P(check) at step 0 and the last evaluation.", "",
             "| run | steps | entropy first -> last | " + " | ".join(f"{f} 0 / last / best" for f in figures)
             + " | P(check) 0 -> last |",
             "|---|---|---|" + "---|" * len(figures) + "---|"]
    series = {}
    for s, out, metrics, evals in runs:
        dest = os.path.join(docs, s["name"])
        if out != dest:
            os.makedirs(dest, exist_ok=True)
            for f in ("metrics.jsonl", "eval.jsonl", "summary.json"):
                if os.path.exists(os.path.join(out, f)):
                    shutil.copy(os.path.join(out, f), os.path.join(dest, f))
        done = os.path.exists(os.path.join(out, "summary.json"))
        state = "" if done else " (running)" if out != dest else " (stopped)"
        last = metrics[-1]["step"]
        first_e, last_e = evals[0], evals[-1]
        cells = [f"{first_e.get(f, float('nan')):.3f} / {last_e.get(f, float('nan')):.3f} / "
                 f"{max(e.get(f, float('nan')) for e in evals):.3f}" for f in figures]
        lines.append(f"| {s['name']} | {last}/{s['steps']}{state} | "
                     f"{window(metrics, 'entropy', 1, 10):.3f} -> {window(metrics, 'entropy', last - 9, last):.3f} | "
                     + " | ".join(cells) + " | "
                     f"{first_e.get('spark_prob', float('nan')):.4f} -> {last_e.get('spark_prob', float('nan')):.4f} |")
        series[s["name"]] = (metrics, evals)
    lines += table1(runs, figures)
    lines += token_level(args.study, runs)
    with open(os.path.join(docs, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(series, docs)


def table1(runs, figures):
    """The paper's Table 1 shape: per method (runs that differ only in seed), mean ± sd over the
    finished runs of each figure at the last evaluation and at the best one, the final entropy
    and P(check), and the median wall time of a step."""
    groups = {}
    for s, out, metrics, evals in runs:
        if os.path.exists(os.path.join(out, "summary.json")):
            groups.setdefault(s["name"].replace(f"-s{s['seed']}", ""), []).append((metrics, evals))
    if not groups:
        return []

    def cell(xs, scale=100.0, digits=1):
        m, sd = mean_sd(xs)
        return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"

    # One evaluation of 300 problems moves by 1-2 points from the next under the same run, so a
    # run's last evaluation alone carries that noise. `late` averages the evaluations over the
    # last fifth of the run (steps 400-500 of 500). Added 2026-12-04, after seeds 0-1 and GRPO's
    # seed 2 were seen: the column was chosen then, not in the design.
    head = figures[-1]

    def late(evals):
        end = evals[-1]["step"]
        xs = [x.get(head) for x in evals if x["step"] >= 0.8 * end and x.get(head) is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    out = ["", "Finished runs by method (mean ± sd over seeds; percent; best = the best evaluation of each "
           "run, as in the paper's Table 1; late = the mean of each run's evaluations over its last fifth of steps; "
           "entropy over the last 10 steps; s/step = the median wall time of a step).", "",
           "| method | seeds | " + " | ".join(f"{f} last | {f} best" for f in figures)
           + f" | {head} late | entropy last | P(check) last | s/step |",
           "|---|---|" + "---|---|" * len(figures) + "---|---|---|---|"]
    for name, rs in groups.items():
        cells = []
        for f in figures:
            cells += [cell([e[-1].get(f) for _, e in rs]), cell([max(x.get(f, float("nan")) for x in e) for _, e in rs])]
        cells.append(cell([late(e) for _, e in rs]))
        last = [m[-1]["step"] for m, _ in rs]
        entropy = [window(m, "entropy", n - 9, n) for (m, _), n in zip(rs, last)]
        seconds = sorted(x["step_seconds"] for m, _ in rs for x in m if "step_seconds" in x)
        out.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {cell(entropy, 1, 3)} | "
                   f"{cell([e[-1].get('spark_prob') for _, e in rs], 1, 4)} | "
                   f"{seconds[len(seconds) // 2] if seconds else float('nan'):.1f} |")
    return out


WINDOWS = ((1, 10), (11, 20), (21, 30), (91, 100), (191, 200), (291, 300), (491, 500))
TOKEN_MEASURES = (("spark_rate", "Share of samples that take the spark", "{:.3f}"),
                  ("low_prob_proxy_kept", "Share of the lowest-ρ negative-advantage tokens that the proxy keeps "
                   "(the paper's falling 27% -> 8% under GRPO)", "{:.2f}"),
                  ("proxy_noise_mass", "Probability mass the proxy calls noise, mean over response tokens "
                   "(the paper's instability argument: the entropy bonus inflates it)", "{:.5f}"),
                  ("lp_reg_regularized", "Tokens Lp-Reg regularised a step", "{:.1f}"))
BUCKETS = ("< 1e-4", "1e-4 - 1e-3", "1e-3 - 0.01", "0.01 - 0.1", ">= 0.1")


def vocabulary(study, s):
    """Token id -> text for the run's model, read from its tokenizer.json (byte-level: Ġ is a space)."""
    tok = json.load(open(os.path.join(model_path(study, s), "tokenizer.json")))
    vocab = {v: k for k, v in tok["model"]["vocab"].items()}
    vocab.update({t["id"]: t["content"] for t in tok.get("added_tokens", [])})
    return {i: repr(t.replace("Ġ", " ").replace("Ċ", "\\n")) for i, t in vocab.items()}


def token_level(study, runs):
    """The issue's token-level analyses from what train_step reported each step: the spark's
    sampling rate, the proxy's share of the lowest-probability tokens, the mass it calls noise,
    and which tokens Lp-Reg regularised, by token and by probability bucket."""
    if not runs:
        return []
    longest = max(m[-1]["step"] for _, _, m, _ in runs)
    windows = [w for w in WINDOWS if w[0] <= longest]
    out = ["", "## Token-level measures over training", "",
           "Means over the steps named, from the metrics `train_step` reported each step (blank: the run "
           "has not reached those steps, or the measure does not apply).", ""]
    for key, title, fmt in TOKEN_MEASURES:
        these = [r for r in runs if any(m.get(key) is not None for m in r[2])]
        if key == "lp_reg_regularized":
            these = [r for r in these if r[0]["method"] == "lp_reg"]
        if not these:
            continue
        out += [f"{title}:", "", "| run | " + " | ".join(f"{a}-{b}" for a, b in windows) + " |",
                "|---|" + "---|" * len(windows)]
        for s, _, metrics, _ in these:
            cells = [window(metrics, key, a, b) for a, b in windows]
            out.append(f"| {s['name']} | " + " | ".join("" if c != c else fmt.format(c) for c in cells) + " |")
        out.append("")
    lp = [r for r in runs if r[0]["method"] == "lp_reg" and any(m.get("lp_reg_tokens") for m in r[2])]
    if lp:
        out += ["Which tokens Lp-Reg regularised: the share of each probability bucket (the token's probability "
                "under the current policy) and the most frequent tokens, over steps 1-50 and over the rest of the run.", "",
                "| run | steps | tokens | " + " | ".join(BUCKETS) + " | most frequent (share) |",
                "|---|---|---|" + "---|" * len(BUCKETS) + "---|"]
        for s, _, metrics, _ in lp:
            vocab = vocabulary(study, s)
            last = metrics[-1]["step"]
            for a, b in ((1, 50), (51, last)):
                counts, buckets = {}, [0] * len(BUCKETS)
                for m in metrics:
                    if a <= m["step"] <= b:
                        for t, n in m.get("lp_reg_tokens", {}).items():
                            counts[int(t)] = counts.get(int(t), 0) + n
                        buckets = [x + y for x, y in zip(buckets, m.get("lp_reg_probability_buckets", [0] * len(BUCKETS)))]
                total = sum(buckets)
                if b < a or not total:
                    continue
                top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
                out.append(f"| {s['name']} | {a}-{b} | {total} | "
                           + " | ".join(f"{x / total:.2f}" for x in buckets) + " | "
                           + ", ".join(f"{vocab.get(t, t)} {n / total:.2f}" for t, n in top) + " |")
        out.append("")
    return out


def plot(series, docs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no matplotlib; tables only", file=sys.stderr)
        return
    groups = {"on-policy": lambda n: "-mb" not in n and "kappa" not in n and "rho" not in n and "coef" not in n
              and not n.startswith("rarer-"),
              "off-policy": lambda n: "-mb4" in n,
              "ablation": lambda n: (n.startswith("lp_reg-s0") or "coef" in n) and "-mb" not in n,
              "arm-b": lambda n: n.startswith("rarer-")}
    for group, keep in groups.items():
        names = [n for n in series if keep(n)]
        if not names:
            continue
        # Top row: entropy, then each evaluation figure the runs recorded (mean@8 only from study 3 on).
        # Bottom row: the token-level measures train_step reported, as 10-step moving means.
        panels = [("pass@1", "held-out pass@1 (greedy)"), ("mean@8", "held-out mean@8 (T = 1)"),
                  ("spark_prob", "P(check) on probes")]
        panels = [p for p in panels if any(p[0] in e for n in names for e in series[n][1])]
        tokens = [(k, t) for k, t in (("spark_rate", "share of samples taking the spark"),
                                      ("low_prob_proxy_kept", "lowest-rho tokens the proxy keeps"),
                                      ("proxy_noise_mass", "mass the proxy calls noise"))
                  if any(m.get(k) is not None for n in names for m in series[n][0])]
        cols = max(1 + len(panels), len(tokens), 1)
        fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), squeeze=False)
        top, bottom = axes[0], axes[1]
        for n in names:
            metrics, evals = series[n]
            top[0].plot([m["step"] for m in metrics], [m["entropy"] for m in metrics], label=n, linewidth=0.8)
            for ax, (key, _) in zip(top[1:], panels):
                ax.plot([e["step"] for e in evals], [e.get(key, float("nan")) for e in evals], label=n, marker="o",
                        markersize=2)
            for ax, (key, _) in zip(bottom, tokens):
                pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
                smooth = [sum(v for _, v in pts[max(0, i - 9):i + 1]) / len(pts[max(0, i - 9):i + 1]) for i in range(len(pts))]
                ax.plot([st for st, _ in pts], smooth, label=n, linewidth=0.8)
        titles = ["sampled-token entropy (nats)"] + [t for _, t in panels]
        for ax, title in list(zip(top, titles)) + list(zip(bottom, [t for _, t in tokens])):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(top[len(titles):]) + list(bottom[len(tokens):]):
            ax.axis("off")
        if panels and panels[-1][0] == "spark_prob":
            top[len(panels)].set_yscale("log")
        if tokens and tokens[-1][0] == "proxy_noise_mass":
            bottom[len(tokens) - 1].set_yscale("log")
        top[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(docs, f"{group}.png"), dpi=90)
        plt.close(fig)


def listing(args):
    for s in STUDIES[args.study]["queue"]():
        done, steps = progress(args.study, s)
        state = "done" if done else "%d/%d" % (steps, s["steps"])
        print(f"{s['name']:28s} {state}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "report", "list"])
    ap.add_argument("--study", type=int, choices=sorted(STUDIES), default=3)
    ap.add_argument("--only", help="run: only these runs (comma-separated names), e.g. for a second driver")
    args = ap.parse_args()
    return {"run": run, "report": report, "list": listing}[args.action](args) or 0


if __name__ == "__main__":
    sys.exit(main())
