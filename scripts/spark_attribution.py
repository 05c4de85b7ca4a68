"""Studies 2 and 3: where does the spark gain or lose its probability? (docs/results.md)

    PYTHONPATH=clients/python nice -n 19 .venv/bin/python scripts/spark_attribution.py run \
        [--study 2] [--runs grpo-s0,lp_reg-s0] [--at 0,100,200,300] [--steps 5]
    python3 scripts/spark_attribution.py report [--study 2]   # tables from the committed JSON
    ... spark_attribution.py clip --study 3 --runs gspo-s1-mb4 --at 25   # how an off-policy clip treats checking samples

The reading under test: GRPO drives P(` check`) down mostly at positions where the sampled
response did not take the spark. There the update raises or lowers the token that was taken,
and the spark's probability moves with the softmax. Lp-Reg acts only on tokens that were sampled,
so it cannot reach those positions.

`run` restarts each run from its checkpoints (the run's own `rl-stepN`, or the base model for
step 0) and replays its next `--steps` steps exactly as `python -m ember.rl` ran them: the same
problems, sampling seeds, loss and optimizer. Around each `train_step` it scores the step's own
rollouts with `logprob`'s `probe_tokens`, which gives log P(spark) at every response position,
before and after the update. Each position's change is filed by:
  - taken: the sample took the spark at that position, or took another token;
  - the sample's GRPO advantage: positive, negative or zero.
The sums of the probability change (mass gained or lost) per class say where the spark's mass
goes. Writes docs/results/studyN/attribution.json and attribution.md; `report` rewrites the
tables from the JSON.

Needs the runs' checkpoints (runs/studyN/NAME/checkpoints, not committed); the JSON it writes is.
"""
import argparse
import json
import math
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import study  # noqa: E402

CLASSES = [(taken, sign) for taken in (True, False) for sign in ("+", "-", "0")]


def class_name(taken, sign):
    return f"{'taken' if taken else 'not taken'}, A{sign}"


class Replay:
    """A run restarted from its checkpoint at step `at` (the base model for 0) on its own server,
    with the run's own arguments: model, loss options, extras."""

    def __init__(self, number, name, at):
        from ember import tasks, verifiers
        from ember.client import Client
        from ember.rl import LOSS_PRESETS, parse_args, start_server

        self.spec = next(s for s in study.STUDIES[number]["queue"]() if s["name"] == name)
        self.args = args = parse_args(study.rl_arguments(number, self.spec))
        mode, options, entropy = LOSS_PRESETS[args.method]
        self.loss = {"mode": mode, **options, **self.spec["options"],
                     "entropy_coef": args.entropy_coef if args.entropy_coef is not None else entropy}
        self.server, url = start_server(args)
        self.client = client = Client(url)
        try:
            client.wait_until_healthy(60)
            self.info = client.info()
            if at > 0:
                client.load_checkpoint(f"rl-step{at}")
            client.configure_optimizer(lr=args.lr, betas=[0.9, 0.999], weight_decay=0.0, grad_clip=1.0)
            self.proxy = None
            if self.loss["mode"] == "lp_reg":
                self.proxy = {"min_p": self.loss.get("min_p", self.info["loss_defaults"]["modes"]["lp_reg"]["min_p"])}
            self.task = tasks.get(args.task)
            self.spark = sorted({client.tokenize(text=" " + w, add_special_tokens=False)[0] for w in self.task.spark_words})
            self.verify = verifiers.get(args.task)
        except BaseException:
            self.close()
            raise

    def close(self):
        from ember.rl import stop_server
        stop_server(self.server)

    def rollouts(self, step):
        """Step `step`'s rollouts exactly as `python -m ember.rl` sampled them: the scored sequences,
        the rollout references, rewards, GRPO advantages and, per response token, whether it is a
        spark token."""
        from ember import advantages, tasks
        args = self.args
        rng = random.Random(f"{args.seed}:{step}")
        problems = tasks.sample(self.task, "train", args.prompts, seed=args.seed * 100003 + step)
        out = self.client.generate(prompts=[p.prompt for p in problems], n=args.samples, max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=rng.randrange(2 ** 31), proxy=self.proxy)
        seqs, refs, rewards, groups, taken_at = [], [], [], [], []
        for i, (p, r) in enumerate(zip(problems, out["results"])):
            for s in r["samples"]:
                reward = self.verify(p, s["text"])
                rewards.append(reward)
                groups.append(i)
                refs.append({"rollout_id": s["rollout_id"], "reward": reward, "group": f"{step}-{i}"})
                seqs.append({"tokens": r["prompt_tokens"] + s["tokens"], "response_start": len(r["prompt_tokens"])})
                taken_at.append([t in self.spark for t in s["tokens"]])
        return seqs, refs, rewards, advantages.ESTIMATORS[args.advantage](rewards, groups), taken_at


def replay(number, name, at, steps):
    """Steps at+1 .. at+steps of run `name` from its checkpoint at step `at`, measured."""
    rp = Replay(number, name, at)
    client, args, loss, spark = rp.client, rp.args, rp.loss, rp.spark
    try:
        totals = {class_name(*c): {"positions": 0, "mass_change": 0.0, "mass_before": 0.0, "logp_change_sum": 0.0}
                  for c in CLASSES}
        per_step = []
        for step in range(at + 1, at + steps + 1):
            seqs, refs, rewards, adv, taken_at = rp.rollouts(step)
            before = client.logprob(seqs, temperature=args.temperature, probe_tokens=spark)["results"]
            result = client.train_step(loss=loss, rollouts=refs, advantage_estimator=args.advantage,
                                       mini_batches=args.mini_batches if args.mini_batches > 1 else None)
            after = client.logprob(seqs, temperature=args.temperature, probe_tokens=spark)["results"]
            client.release_rollouts([r["rollout_id"] for r in refs])
            step_totals = {class_name(*c): 0.0 for c in CLASSES}
            for a, taken, b, f in zip(adv, taken_at, before, after):
                sign = "+" if a > 1e-9 else "-" if a < -1e-9 else "0"
                for k, t in enumerate(taken):
                    pb = sum(math.exp(x) for x in b["probe_logprobs"][k])
                    pa = sum(math.exp(x) for x in f["probe_logprobs"][k])
                    c = totals[class_name(t, sign)]
                    c["positions"] += 1
                    c["mass_before"] += pb
                    c["mass_change"] += pa - pb
                    c["logp_change_sum"] += math.log(pa) - math.log(pb)
                    step_totals[class_name(t, sign)] += pa - pb
            per_step.append({"step": step, "reward": sum(rewards) / len(rewards),
                             "spark_samples": sum(any(t) for t in taken_at),
                             "lp_reg_regularized": result["metrics"].get("lp_reg_regularized"),
                             "mass_change": step_totals})
            print(f"{name} step {step}: reward {per_step[-1]['reward']:.2f}, spark samples {per_step[-1]['spark_samples']}, "
                  f"mass change " + ", ".join(f"{k} {v:+.4f}" for k, v in step_totals.items()), file=sys.stderr)
        return {"run": name, "method": rp.spec["method"], "options": rp.spec["options"], "from_step": at, "steps": steps,
                "spark_tokens": spark, "classes": totals, "per_step": per_step}
    finally:
        rp.close()


# One row per replayed sequence (rows keep clip.json small).
FIELDS = ["step", "mini_batch", "advantage", "checked", "length", "log_s", "spark_log_ratio"]


def replay_clip(number, name, at, steps):
    """Steps at+1 .. at+steps of an off-policy run from its checkpoint at `at`, one mini-batch at a
    time. The trainer splits a batch into the consecutive slices [n*k/m, n*(k+1)/m) (evenParts in
    Sources/Engine/DataParallel.swift), so one `train_step` per slice makes the same updates:
    replayed steps sample the rewards and spark counts the run logged. Before each mini-batch's
    update it scores that mini-batch's sequences against the step's sampling policy and records,
    per sequence, GSPO's ratio s = exp(mean_t(lp - lp_old)) and, at each sample's first spark
    token, the token's own ratio. After each update it measures P(spark) on the run's held-out
    probes (as the run's evaluation does), so each mini-batch's push on the spark shows."""
    from ember.rl import build_probes, spark_probability
    rp = Replay(number, name, at)
    client, args, loss = rp.client, rp.args, rp.loss
    probes = build_probes(client, [args.task], args.probes, args.seed)
    gspo = rp.info["loss_defaults"]["modes"]["gspo"]
    ppo = rp.info["loss_defaults"]["modes"]["ppo"]
    m = max(1, args.mini_batches)
    try:
        sequences, probe = [], [spark_probability(client, probes)]
        for step in range(at + 1, at + steps + 1):
            seqs, refs, rewards, adv, taken_at = rp.rollouts(step)
            old = [r["logprobs"] for r in client.logprob(seqs, temperature=args.temperature)["results"]]
            for k in range(m):
                lo, hi = len(seqs) * k // m, len(seqs) * (k + 1) // m
                now = old[lo:hi] if k == 0 else \
                    [r["logprobs"] for r in client.logprob(seqs[lo:hi], temperature=args.temperature)["results"]]
                for i in range(lo, hi):
                    d = [a - b for a, b in zip(now[i - lo], old[i])]
                    first = next((t for t, x in enumerate(taken_at[i]) if x), None)
                    sequences.append([step, k, round(adv[i], 5), int(first is not None), len(d),
                                      float(f"{sum(d) / max(1, len(d)):.5g}"),
                                      round(d[first], 5) if first is not None else None])
                client.train_step(loss=loss, rollouts=refs[lo:hi], advantage_estimator=args.advantage)
                probe.append(spark_probability(client, probes))
            client.release_rollouts([r["rollout_id"] for r in refs])
            print(f"{name} step {step}: reward {sum(rewards) / len(rewards):.2f}, "
                  f"checked {sum(any(t) for t in taken_at)}", file=sys.stderr)
        return {"run": name, "method": rp.spec["method"], "from_step": at, "steps": steps, "mini_batches": m,
                "gspo_eps": [gspo["eps_low"], gspo["eps_high"]], "ppo_eps": [ppo["eps_low"], ppo["eps_high"]],
                "fields": FIELDS, "sequences": sequences, "probe": probe}
    finally:
        rp.close()


CLIP_HEADER = """# How the clip treats the samples that check (scripts/spark_attribution.py clip)

Each table replays steps of an off-policy run (4 mini-batches a rollout batch) from its
checkpoint, one mini-batch at a time. Before each mini-batch's update, its sequences are scored
against the policy that sampled them. A sequence's GSPO ratio is s = exp(mean over its tokens of
(lp - lp_old)). Under GSPO's clip a sequence gives no gradient when A > 0 and s > 1 + eps_high, or
A < 0 and s < 1 - eps_low ("clipped"). The spark token's own ratio r, at each checking sample's
first spark, is shown against the token-level clip of GRPO (A > 0 and r > 1 + 0.2, or A < 0 and
r < 1 - 0.2). Mini-batch 1 is scored before any update of its step, so its ratios are 1 and
nothing in it is clipped; mini-batches 2-4 follow one to three updates.

"Payoff" compares the GRPO advantages of the samples that check with the rest's, over all the
replayed steps. "P(spark) on the probes" is the run's own evaluation measure, taken before the
first update and after each one; its change is summed by mini-batch (on-policy runs have one).

"""


def clip_table(r):
    """The spark's payoff (GRPO advantage of the samples that check against the rest); for an
    off-policy run, per class (checks or not, advantage sign) over mini-batches 2-4: sequences,
    mean log s, the share GSPO's rule clips and the spark token's own ratio; and P(spark) on the
    probes, its change by mini-batch."""
    el, eh = r["gspo_eps"]
    pl, ph = r["ppo_eps"]
    rows = [dict(zip(r["fields"], x)) for x in r["sequences"]]
    lines = [f"### {r['run']}, steps {r['from_step'] + 1}-{r['from_step'] + r['steps']}", ""]
    parts = []
    for checked in (1, 0):
        xs = [x["advantage"] for x in rows if x["checked"] == checked]
        if xs:
            parts.append(f"{'checking samples' if checked else 'the rest'} {len(xs)}, mean advantage {sum(xs) / len(xs):+.3f} "
                         f"({sum(a > 1e-9 for a in xs) / len(xs):.0%} positive)")
    lines += ["Payoff: " + "; ".join(parts) + ".", ""]
    later = [x for x in rows if x["mini_batch"] > 0]
    if later:
        lines += ["| mini-batches | sample | A | sequences | mean log s | clipped (GSPO) | spark ratio r, median | spark clipped (token level) |",
                  "|---|---|---|---|---|---|---|---|"]
    for checked in (1, 0):
        for sign in ("+", "-"):
            xs = [x for x in later if x["checked"] == checked and (x["advantage"] > 1e-9 if sign == "+" else x["advantage"] < -1e-9)]
            if not xs:
                continue
            clipped = sum((x["log_s"] > math.log1p(eh)) if sign == "+" else (x["log_s"] < math.log1p(-el)) for x in xs)
            cells = ["", ""]
            if checked:
                rs = sorted(math.exp(x["spark_log_ratio"]) for x in xs)
                hit = sum((v > 1 + ph) if sign == "+" else (v < 1 - pl) for v in rs)
                cells = [f"{rs[len(rs) // 2]:.3f}", f"{hit / len(rs):.0%}"]
            lines.append(f"| 2-{r['mini_batches']} | {'checks' if checked else 'does not check'} | {sign} | {len(xs)} | "
                         f"{sum(x['log_s'] for x in xs) / len(xs):+.5f} | {clipped / len(xs):.0%} | {cells[0]} | {cells[1]} |")
    if r.get("probe"):
        # P(spark) on the probes before and after each update: the change of log P by mini-batch.
        p, m = r["probe"], r["mini_batches"]
        d = [math.log(p[j + 1]) - math.log(p[j]) for j in range(len(p) - 1)]
        by = [sum(d[j] for j in range(k, len(d), m)) for k in range(m)]
        lines += ([""] if later else []) + [f"P(spark) on the probes {p[0]:.4f} -> {p[-1]:.4f}; change of log P summed over the steps"
                  + (", by mini-batch: " + ", ".join(f"{k + 1}: {v:+.3f}" for k, v in enumerate(by)) if m > 1 else f": {by[0]:+.3f}")
                  + "."]
    lines.append("")
    return "\n".join(lines)


HEADER = """# Where the spark gains or loses its probability (scripts/spark_attribution.py)

Each table replays five steps of a run from its checkpoint. It scores the steps' own rollouts
before and after each update and sums the change of P(` check`) over response positions. The
positions are classed by whether the sample took the spark there, and by the sign of the
sample's advantage. Zero-advantage samples get no gradient at all: what changes there comes
only through the shared weights.

"""


def report(results):
    lines = []
    for r in results:
        cls = r["classes"]
        lost = sum(c["mass_change"] for c in cls.values())
        lines.append(f"### {r['run']}, steps {r['from_step'] + 1}-{r['from_step'] + r['steps']}")
        lines.append("")
        lines.append(f"Spark mass summed over every response position: change {lost:+.4f}.")
        lines.append("")
        lines.append("| position class | positions | spark mass before | change | share of the net change | mean change of log P |")
        lines.append("|---|---|---|---|---|---|")
        for taken, sign in CLASSES:
            c = cls[class_name(taken, sign)]
            if not c["positions"]:
                continue
            share = c["mass_change"] / lost if lost else float("nan")
            lines.append(f"| {class_name(taken, sign)} | {c['positions']} | {c['mass_before']:.4f} | {c['mass_change']:+.4f} | "
                         f"{share:.0%} | {c['logp_change_sum'] / c['positions']:+.4f} |")
        lines.append("")
    return "\n".join(lines)


# Each kind of replay: its function, the JSON it keeps, its tables (from the JSON) and their header.
KINDS = {
    "attribution": (replay, lambda rs: report(rs), HEADER, {"indent": 1}),
    "clip": (replay_clip, lambda rs: "\n".join(clip_table(r) for r in sorted(rs, key=lambda x: (x["run"], x["from_step"]))),
             CLIP_HEADER, {}),
}


def replays(args, kind, rerun):
    """Replays each of --runs from each --at checkpoint (when `rerun`), keeping earlier replays (one
    of the same run and checkpoint is replaced), then writes the tables from the JSON."""
    measure, tables_of, header, dump = KINDS[kind]
    out = os.path.join(study.docs_dir(args.study), f"{kind}.json")
    results = json.load(open(out)) if os.path.exists(out) else []
    for name in args.runs.split(",") if rerun else []:
        for at in (int(x) for x in args.at.split(",")):
            r = measure(args.study, name, at, args.steps)
            results = [x for x in results if (x["run"], x["from_step"]) != (name, at)] + [r]
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(results, f, **dump)
    text = tables_of(results)
    open(os.path.join(study.docs_dir(args.study), f"{kind}.md"), "w").write(header + text)
    print(text)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "report", "clip", "clip-report"],
                    help="run/report: where the spark's mass goes; clip/clip-report: how the clip treats checking samples")
    ap.add_argument("--study", type=int, choices=sorted(study.STUDIES), default=2)
    ap.add_argument("--runs", default="grpo-s0,lp_reg-s0")
    ap.add_argument("--at", default="0,100,200,300", help="checkpoint steps to replay from")
    ap.add_argument("--steps", type=int, default=5, help="steps replayed from each checkpoint")
    args = ap.parse_args()
    kind = "clip" if args.command.startswith("clip") else "attribution"
    return replays(args, kind, rerun=args.command in ("run", "clip"))


if __name__ == "__main__":
    sys.exit(main())
