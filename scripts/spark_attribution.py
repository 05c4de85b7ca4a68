"""Studies 2 and 3: where does the spark gain or lose its probability? (docs/results.md)

    PYTHONPATH=clients/python nice -n 19 .venv/bin/python scripts/spark_attribution.py run \
        [--study 2] [--runs grpo-s0,lp_reg-s0] [--at 0,100,200,300] [--steps 5]
    python3 scripts/spark_attribution.py report [--study 2]   # tables from the committed JSON

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


def replay(number, name, at, steps):
    """Steps at+1 .. at+steps of run `name` from its checkpoint at step `at`, measured."""
    from ember import advantages, tasks, verifiers
    from ember.client import Client
    from ember.rl import LOSS_PRESETS, parse_args, start_server, stop_server

    spec = next(s for s in study.STUDIES[number]["queue"]() if s["name"] == name)
    args = parse_args(study.rl_arguments(number, spec))  # the run's own arguments: model, options, extras
    mode, options, entropy = LOSS_PRESETS[args.method]
    loss = {"mode": mode, **options, **spec["options"],
            "entropy_coef": args.entropy_coef if args.entropy_coef is not None else entropy}
    server, url = start_server(args)
    client = Client(url)
    try:
        client.wait_until_healthy(60)
        info = client.info()
        if at > 0:
            client.load_checkpoint(f"rl-step{at}")
        client.configure_optimizer(lr=args.lr, betas=[0.9, 0.999], weight_decay=0.0, grad_clip=1.0)
        proxy = None
        if loss["mode"] == "lp_reg":
            proxy = {"min_p": loss.get("min_p", info["loss_defaults"]["modes"]["lp_reg"]["min_p"])}
        task = tasks.get(args.task)
        spark = sorted({client.tokenize(text=" " + w, add_special_tokens=False)[0] for w in task.spark_words})
        verify = verifiers.get(args.task)
        totals = {class_name(*c): {"positions": 0, "mass_change": 0.0, "mass_before": 0.0, "logp_change_sum": 0.0}
                  for c in CLASSES}
        per_step = []
        for step in range(at + 1, at + steps + 1):
            rng = random.Random(f"{args.seed}:{step}")
            problems = tasks.sample(task, "train", args.prompts, seed=args.seed * 100003 + step)
            out = client.generate(prompts=[p.prompt for p in problems], n=args.samples, max_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=rng.randrange(2 ** 31), proxy=proxy)
            seqs, refs, rewards, groups, taken_at = [], [], [], [], []
            for i, (p, r) in enumerate(zip(problems, out["results"])):
                for s in r["samples"]:
                    reward = verify(p, s["text"])
                    rewards.append(reward)
                    groups.append(i)
                    refs.append({"rollout_id": s["rollout_id"], "reward": reward, "group": f"{step}-{i}"})
                    seqs.append({"tokens": r["prompt_tokens"] + s["tokens"], "response_start": len(r["prompt_tokens"])})
                    taken_at.append([t in spark for t in s["tokens"]])
            adv = advantages.ESTIMATORS[args.advantage](rewards, groups)
            before = client.logprob(seqs, temperature=args.temperature, probe_tokens=spark)["results"]
            result = client.train_step(loss=loss, rollouts=refs, advantage_estimator=args.advantage)
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
        return {"run": name, "method": spec["method"], "options": spec["options"], "from_step": at, "steps": steps,
                "spark_tokens": spark, "classes": totals, "per_step": per_step}
    finally:
        stop_server(server)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "report"])
    ap.add_argument("--study", type=int, choices=sorted(study.STUDIES), default=2)
    ap.add_argument("--runs", default="grpo-s0,lp_reg-s0")
    ap.add_argument("--at", default="0,100,200,300", help="checkpoint steps to replay from")
    ap.add_argument("--steps", type=int, default=5, help="steps replayed from each checkpoint")
    args = ap.parse_args()
    out = os.path.join(study.docs_dir(args.study), "attribution.json")
    tables = os.path.join(study.docs_dir(args.study), "attribution.md")
    if args.command == "report":
        text = report(json.load(open(out)))
        open(tables, "w").write(HEADER + text)
        print(text)
        return 0
    # Earlier replays stay; a replay of the same run and checkpoint replaces its entry.
    results = json.load(open(out)) if os.path.exists(out) else []
    for name in args.runs.split(","):
        for at in (int(x) for x in args.at.split(",")):
            r = replay(args.study, name, at, args.steps)
            results = [x for x in results if (x["run"], x["from_step"]) != (name, at)] + [r]
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)
    text = report(results)
    open(tables, "w").write(HEADER + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
