#!/usr/bin/env python3
"""Measures a model on a task before any RL, as the study's design asks (docs/results.md,
"Study 2" and "Study 3"): held-out greedy pass@1 and pass@k at temperature 1, the mean probability of the
spark token where held-out reference traces take it (P(spark)), the spark's sampling frequency,
the accuracy of the temperature-1 samples that take the spark against those that do not (and,
where the spark opens a mode, with the spark forced at the first step), and the mean
sampled-token entropy at temperature 1. Starts ember-server on the model, writes
the figures as JSON (default: <model>/baseline.json) and prints them.

    python3 scripts/describe_model.py --model models/ember-rare --task arithmetic_rare
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

from ember import Client, tasks  # noqa: E402
from ember.rl import build_probes, evaluate, spark_probability, start_server, stop_server  # noqa: E402


def continuation_probability(client, task, count):
    """For a task whose spark opens a mode: the mean P(spark) at its occurrences after the first in
    held-out reference traces, i.e. how well the model learned to stay in the mode."""
    import math
    import random
    spark = client.tokenize(text=" " + task.spark_words[0], add_special_tokens=False)[0]
    rng = random.Random(11)
    problems = tasks.sample(task, "heldout", count, 11)
    prompts = client.tokenize(texts=[p.prompt for p in problems], add_special_tokens=False)
    responses = client.tokenize(texts=[task.probe_trace(p, rng) for p in problems], add_special_tokens=False)
    out = client.logprob([{"tokens": pt + rt, "response_start": len(pt)} for pt, rt in zip(prompts, responses)])
    probs = []
    for rt, r in zip(responses, out["results"]):
        at = [k for k, t in enumerate(rt) if t == spark]
        probs += [math.exp(r["logprobs"][k]) for k in at[1:]]
    return sum(probs) / len(probs) if probs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="arithmetic_rare")
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--samples", type=int, default=512, help="samples at temperature 1 for entropy and spark frequency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON output (default: <model>/baseline.json)")
    args = ap.parse_args()
    server_args = argparse.Namespace(ember_server=None, out=os.path.join(ROOT, ".work", "describe"), threads=args.threads,
                                     slots=256, max_seq_len=256, model=args.model)
    os.makedirs(server_args.out, exist_ok=True)
    server, url = start_server(server_args)
    try:
        client = Client(url)
        client.wait_until_healthy(60)
        task = tasks.get(args.task)
        held = tasks.sample(task, "heldout", args.eval_size, 1000)
        figures = {"model": os.path.relpath(os.path.abspath(args.model), ROOT), "task": args.task, "heldout_size": len(held)}
        figures.update(evaluate(client, held, args.max_tokens, args.k, seed=12345))
        probes = build_probes(client, [args.task], args.probes, 0)
        figures["spark_probes"] = len(probes)
        figures["spark_prob"] = spark_probability(client, probes)
        if getattr(task, "spark_opens_mode", False):
            figures["spark_continuation_prob"] = continuation_probability(client, task, args.probes)
        # Sampled-token entropy and spark frequency at temperature 1 on training problems.
        problems = tasks.sample(task, "train", args.samples // 8, 777)
        out = client.generate(prompts=[p.prompt for p in problems], n=8, max_tokens=args.max_tokens, temperature=1.0,
                              seed=4242, entropy=True, logprobs=False)
        entropies, sparks, samples, correct, spark_correct = [], 0, 0, 0, 0
        for p, r in zip(problems, out["results"]):
            for s in r["samples"]:
                entropies += s["entropies"]
                samples += 1
                took = any(w in s["text"] for w in task.spark_words)
                right = tasks.check(p, s["text"])
                sparks += took
                correct += right
                spark_correct += took and right
        figures["sampled_entropy"] = sum(entropies) / max(1, len(entropies))
        figures["spark_sample_rate"] = sparks / max(1, samples)
        figures["train_reward_t1"] = correct / max(1, samples)
        # Does the spark pay? Accuracy of the temperature-1 samples that take it against those that do not.
        figures["spark_samples"] = sparks
        figures["reward_t1_with_spark"] = spark_correct / sparks if sparks else float("nan")
        figures["reward_t1_without_spark"] = (correct - spark_correct) / max(1, samples - sparks)
        if getattr(task, "spark_opens_mode", False):
            # The spark's payoff where it pays most: the same problems with the spark forced as the
            # response's first token, continued at temperature 1.
            word = " " + task.spark_words[0]
            forced = client.generate(prompts=[p.prompt + word for p in problems], n=8, max_tokens=args.max_tokens,
                                     temperature=1.0, seed=4242, logprobs=False)
            right = [tasks.check(p, word + s["text"]) for p, r in zip(problems, forced["results"]) for s in r["samples"]]
            figures["reward_t1_spark_forced_first"] = sum(right) / len(right)
        path = args.out or os.path.join(args.model, "baseline.json")
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)
        print(json.dumps(figures, indent=1))
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
