"""RLVR training loop against an Ember server: sample, verify, update (Lp-Reg by default).

    python -m ember.rl --start-server --task arithmetic --steps 40 --out runs/lpreg
    python -m ember.rl --server http://127.0.0.1:8377 --loss ppo --loss-options '{"eps_high": 0.28}'

    python -m ember.rl --server http://trainer:8377 --replica http://r1:8377 --replica http://r2:8377 \
        --max-off-policy-steps 2 --rollout-correction truncate

Each step draws --prompts training problems, samples --samples answers each (seeded), checks them
with the task's exact verifier, and sends one on-policy train_step referring to the rollouts by
id with their rewards (group = prompt; advantages by --advantage). Every --eval-every steps it
measures greedy pass@1 (and sampled pass@k) on a fixed held-out set. Writes metrics.jsonl,
eval.jsonl, plots/*.png and state.json under --out; --resume continues from the last checkpoint.
With --replica, sampler replicas (ember-server --follow) draw the rollouts up to
--max-off-policy-steps steps ahead of the trainer (ember.asyncrl); K = 0 is the synchronous
loop, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import advantages, tasks, verifiers
from .client import Client, EmberError
from .multiturn import run_episodes
from .asyncrl import AsyncSampler, ReplicaPool

LOSS_PRESETS = {
    # name: (mode, options, entropy_coef) -- the comparison's methods (docs/results.md)
    "grpo": ("ppo", {}, 0.0),
    "grpo_entropy": ("ppo", {}, 0.003),
    "clip_higher": ("ppo", {"eps_high": 0.28}, 0.0),
    "80_20": ("high_entropy", {"fraction": 0.2}, 0.0),
    "kl_cov": ("kl_cov", {}, 0.0),
    "clip_cov": ("clip_cov", {}, 0.0),
    "lp_reg": ("lp_reg", {}, 0.0),
    "gspo": ("gspo", {}, 0.0),
}


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int, start: int = 0):
        self.total, self.done, self.t0 = total, start, time.time()
        self.start = start
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str):
        self.done = step
        frac = step / max(1, self.total)
        rate = (time.time() - self.t0) / max(1, step - self.start)
        eta = rate * (self.total - step)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"[{bar}] {step}/{self.total} {text} eta {eta / 60:.1f} min"
        if self.tty:
            sys.stderr.write("\r" + line[:200] + " " * 5)
            if step == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def clear(self):
        if self.tty:
            sys.stderr.write("\r" + " " * 210 + "\r")


def find_server_binary(explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    if os.environ.get("EMBER_SERVER"):
        return os.environ["EMBER_SERVER"]
    here = os.path.dirname(os.path.abspath(__file__))
    for up in range(1, 6):
        root = os.path.abspath(os.path.join(here, *[".."] * up))
        cand = os.path.join(root, ".build", "release", "ember-server")
        if os.path.exists(cand):
            return cand
    found = shutil.which("ember-server")
    if not found:
        raise SystemExit("ember-server not found: build it (swift build -c release) or pass --ember-server PATH")
    return found


def mpirun_command(ranks: int, extra: Sequence[str] = ()) -> Tuple[List[str], dict]:
    """The prefix that starts ember-server as a data-parallel trainer of `ranks` ranks (Open MPI's
    mpirun; --enable-recovery keeps rank 0 serving, degraded, if another rank dies), and the
    environment it needs (as root, Open MPI's explicit consent)."""
    mpirun = shutil.which("mpirun")
    if not mpirun:
        raise SystemExit("--trainer-ranks needs Open MPI's mpirun (Debian: apt-get install openmpi-bin; scripts/setup installs it)")
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return [mpirun, "--enable-recovery", "-n", str(ranks), *extra], env


def die_with_parent() -> None:
    """preexec_fn for a server this process starts: the kernel sends it SIGTERM when its parent
    dies, so an orchestrator that is killed (even with SIGKILL) does not leave an orphaned server
    holding the cores and the memory. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(args) -> (subprocess.Popen, str):
    exe = find_server_binary(args.ember_server)
    ranks = getattr(args, "trainer_ranks", 1)
    threads = max(1, args.threads // ranks)
    cmd = [exe, "--port", "0", "--checkpoint-dir", os.path.join(args.out, "checkpoints"), "--log-level", "warning",
           "--threads", str(threads), "--slots", str(args.slots), "--max-seq-len", str(args.max_seq_len)]
    if args.model:
        cmd += ["--model", args.model]
    env = None
    if ranks > 1:
        prefix, env = mpirun_command(ranks, shlex.split(args.mpirun_args or ""))
        cmd = prefix + cmd
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=die_with_parent)
    line = p.stdout.readline()
    m = re.search(r"listening on http://([^ |]+)", line)
    if not m:
        p.kill()
        raise SystemExit(f"ember-server did not start: {line.strip()}")
    print(line.strip(), file=sys.stderr)
    return p, "http://" + m.group(1)


def stop_server(p: subprocess.Popen) -> None:
    """Stops a server start_server started (SIGTERM, then SIGKILL after 30 s)."""
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()


def evaluate(client: Client, problems, max_tokens: int, k: int, seed: int, adapter: Optional[str] = None,
             max_turns: int = 3) -> Dict[str, float]:
    """Greedy pass@1 and (when k > 1) sampled pass@k and mean@k (the mean accuracy of the k samples
    at temperature 1) on a fixed set of problems. Problems of a multi-turn task run as episodes
    (ember.multiturn.run_episodes); their `tool_rate` is the share of greedy episodes that call a
    tool."""
    single = [p for p in problems if not tasks.is_multiturn(p.task)]
    multi = [p for p in problems if tasks.is_multiturn(p.task)]
    greedy = 0
    passk = 0
    right = 0
    for i in range(0, len(single), 64):
        chunk = single[i:i + 64]
        out = client.generate(prompts=[p.prompt for p in chunk], n=1, max_tokens=max_tokens, temperature=0.0, logprobs=False,
                              adapter=adapter)
        greedy += sum(tasks.check(p, r["samples"][0]["text"]) for p, r in zip(chunk, out["results"]))
        if k > 1:
            out = client.generate(prompts=[p.prompt for p in chunk], n=k, max_tokens=max_tokens, temperature=1.0,
                                  seed=seed + i, logprobs=False, adapter=adapter)
            checks = [[tasks.check(p, s["text"]) for s in r["samples"]] for p, r in zip(chunk, out["results"])]
            passk += sum(any(c) for c in checks)
            right += sum(sum(c) for c in checks)
    result = {}
    if multi:
        episodes = run_episodes(client, [environment(p) for p in multi], max_turns=max_turns, max_tokens=max_tokens,
                                temperature=0.0, seed=seed, adapter=adapter)
        greedy += sum(e.reward > 0 for e in episodes)
        result["tool_rate"] = sum(any("<tool_call>" in t for t in e.turns) for e in episodes) / len(multi)
        if k > 1:
            episodes = run_episodes(client, [environment(p) for p in multi for _ in range(k)], max_turns=max_turns,
                                    max_tokens=max_tokens, temperature=1.0, seed=seed + 1, adapter=adapter)
            passk += sum(any(e.reward > 0 for e in episodes[j * k:(j + 1) * k]) for j in range(len(multi)))
            right += sum(e.reward > 0 for e in episodes)
    n = len(problems)
    result = {"pass@1": greedy / n, **result}
    if k > 1:
        result[f"pass@{k}"] = passk / n
        result[f"mean@{k}"] = right / (n * k)
    return result


def environment(problem):
    return tasks.get(problem.task).environment(problem)


def sample_episodes(client: Client, problems, args, seed: int, proxy, adapter):
    """A multi-turn step's rollouts: --samples episodes per problem, run together; returns the
    train_step items (advantages by --advantage within each problem's group, model tokens only
    trained, the sampler's log-probabilities as old_logprobs) and the per-episode stats."""
    envs = [environment(p) for p in problems for _ in range(args.samples)]
    episodes = run_episodes(client, envs, max_turns=args.max_turns, max_tokens=args.max_tokens,
                            temperature=args.temperature, seed=seed, adapter=adapter, proxy=proxy)
    rewards = [e.reward for e in episodes]
    groups = [i // args.samples for i in range(len(episodes))]
    adv = advantages.ESTIMATORS[args.advantage](rewards, groups)
    items = [e.train_item(a) for e, a in zip(episodes, adv)]
    lengths = [sum(e.loss_mask) for e in episodes]
    sparks = sum(any("<tool_call>" in t for t in e.turns) for e in episodes)
    return items, rewards, lengths, sparks


def spark_probability(client: Client, probes, adapter: Optional[str] = None) -> float:
    """Mean probability the policy gives the spark token where a reference trace takes it."""
    if not probes:
        return float("nan")
    seqs = [{"tokens": toks, "response_start": start} for toks, start, _ in probes]
    out = client.logprob(seqs, adapter=adapter)
    probs = []
    for (toks, start, ids), r in zip(probes, out["results"]):
        for k, lp in enumerate(r["logprobs"]):
            if toks[start + k] in ids and lp is not None:
                probs.append(math.exp(lp))
    return sum(probs) / len(probs) if probs else float("nan")


def build_probes(client: Client, task_names, count: int, seed: int):
    """Held-out traces that take the spark move, tokenized, with the spark token ids."""
    probes = []
    rng = random.Random(seed)
    for name in task_names:
        task = tasks.get(name)
        if tasks.is_multiturn(name):
            # The spark of a tool task is calling the tool: P(first token of "<tool_call>") at the
            # start of the first answer to a held-out problem.
            call = client.tokenize(text=task.spark_words[0], add_special_tokens=False)
            for p in tasks.sample(task, "heldout", count, seed + 7):
                env = environment(p)
                prompt = client.chat_render(env.reset(0), tools=env.tools, add_generation_prompt=True)["tokens"]
                probes.append((prompt + call, len(prompt), {call[0]}))
            continue
        ids = set()
        for word in task.spark_words:
            toks = client.tokenize(text=" " + word, add_special_tokens=False)
            ids.add(toks[0])
        problems = tasks.sample(task, "heldout", count, seed + 7)
        prompts = client.tokenize(texts=[p.prompt for p in problems], add_special_tokens=False)
        responses = client.tokenize(texts=[task.probe_trace(p, rng) for p in problems], add_special_tokens=False)
        for pt, rt in zip(prompts, responses):
            first = next((k for k, t in enumerate(rt) if t in ids), None)
            if first is not None:
                if getattr(task, "spark_opens_mode", False):
                    rt = rt[:first + 1]
                probes.append((pt + rt, len(pt), ids))
    return probes


def plot(out: str, metrics: List[dict], evals: List[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install 'ember-rl[plots]')", file=sys.stderr)
        return
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    steps = [m["step"] for m in metrics]

    def one(name, series, ylabel):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, xs, ys in series:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "plots", name + ".png"), dpi=100)
        plt.close(fig)

    one("reward", [("train reward", steps, [m["reward"] for m in metrics])], "mean reward")
    ev = [e for e in evals]
    if ev:
        series = [("held-out pass@1 (greedy)", [e["step"] for e in ev], [e["pass@1"] for e in ev])]
        for key in ev[0]:
            if key.startswith("pass@") and key != "pass@1":
                series.append((f"held-out {key}", [e["step"] for e in ev], [e[key] for e in ev]))
        one("accuracy", series, "accuracy")
    one("entropy", [("policy entropy", steps, [m["entropy"] for m in metrics])], "mean token entropy (nats)")
    one("lp_reg", [("selected", steps, [m["lp_reg_selected"] for m in metrics]),
                   ("regularized", steps, [m["lp_reg_regularized"] for m in metrics])], "tokens per step")
    if any("spark_prob" in e for e in ev):
        one("spark", [("P(spark token)", [e["step"] for e in ev], [e.get("spark_prob", float("nan")) for e in ev])],
            "probability")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ember.rl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="URL of a running server (http://host:port or unix:///path)")
    ap.add_argument("--start-server", action="store_true", help="start ember-server for the run and stop it at the end")
    ap.add_argument("--ember-server", help="path to the ember-server binary (default: the repo's release build)")
    ap.add_argument("--model", help="model folder for --start-server (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=256, help="--start-server: sequences decoded together")
    ap.add_argument("--max-seq-len", type=int, default=256, help="--start-server: KV-cache tokens per sequence")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--task", default="arithmetic", help=f"comma-separated, from: {', '.join(tasks.names())}")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=32, help="problems per step")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem (the GRPO group)")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per sample (per model turn for multi-turn tasks)")
    ap.add_argument("--max-turns", type=int, default=3, help="model turns per episode of a multi-turn task (tool-arith)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--method", default="lp_reg", choices=sorted(LOSS_PRESETS),
                    help="loss preset (mode, options, entropy bonus); --loss and --loss-options override")
    ap.add_argument("--loss", help="loss mode (overrides the preset's)")
    ap.add_argument("--loss-options", default="{}", help="JSON merged into the loss options")
    ap.add_argument("--entropy-coef", type=float)
    ap.add_argument("--advantage", default="grpo", choices=["grpo", "dr_grpo", "rloo"])
    ap.add_argument("--mini-batches", type=int, default=1,
                    help="optimizer steps per sampled batch (> 1 reuses the batch, so the importance ratio leaves 1 and clipping acts)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--eval-k", type=int, default=8, help="pass@k on the held-out set (1 = greedy only)")
    ap.add_argument("--probes", type=int, default=64, help="held-out spark-move traces for P(spark token)")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="save a server checkpoint every N steps (0 = at the end)")
    ap.add_argument("--out", default="runs/rl")
    ap.add_argument("--resume", action="store_true", help="continue from --out's state.json and its checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train a LoRA adapter of this rank instead of the full model (0 = full fine-tuning)")
    ap.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: twice the rank)")
    ap.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    ap.add_argument("--lora-name", default="rl", help="the adapter's name on the server")
    ap.add_argument("--replica", action="append", default=[],
                    help="URL of a sampler replica (ember-server --follow the trainer); repeat for several")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="start the trainer and --replicas followers as Ray actors (on the cluster at ADDRESS, or a local Ray) "
                         "and sample on them (ember.cluster)")
    ap.add_argument("--replicas", type=int, default=1, help="with --ray: sampler replicas to start")
    ap.add_argument("--cpus-per-server", type=float, default=1, help="with --ray: CPUs each ember-server asks Ray for")
    ap.add_argument("--trainer-ranks", type=int, default=1,
                    help="with --start-server or --ray: run the trainer data-parallel over this many MPI ranks (mpirun); "
                         "the weights are the same for any number of ranks")
    ap.add_argument("--mpirun-args", default="",
                    help="with --trainer-ranks: extra mpirun arguments (with '=': --mpirun-args='--host a,b' puts the ranks on other machines)")
    ap.add_argument("--replica-api-key", help="API key of the replicas (default: --api-key)")
    ap.add_argument("--max-off-policy-steps", type=int, default=0,
                    help="with --replica: sample up to K steps ahead of the trainer (staleness <= K; 0 = on-policy)")
    ap.add_argument("--rollout-correction", default="none",
                    help="weigh off-policy samples: none, or MODE[:LEVEL[:CAP]] with MODE truncate|mask, LEVEL token|sequence")
    args = ap.parse_args(argv)
    if args.max_off_policy_steps < 0:
        ap.error("--max-off-policy-steps must be >= 0")
    if args.trainer_ranks < 1:
        ap.error("--trainer-ranks must be >= 1")
    if args.trainer_ranks > 1 and not (args.start_server or args.ray is not None):
        ap.error("--trainer-ranks starts the trainer under mpirun: give --start-server or --ray")
    if args.max_off_policy_steps and not (args.replica or args.ray is not None):
        ap.error("--max-off-policy-steps needs --replica URL or --ray (the replicas sample ahead of the trainer)")
    if args.ray is not None and (args.replica or args.start_server or args.server):
        ap.error("--ray starts its own trainer and replicas: drop --server, --start-server and --replica")
    args.correction = parse_correction(ap, args.rollout_correction)
    return args


def parse_correction(ap, text: str) -> Optional[dict]:
    if text == "none":
        return None
    parts = text.split(":")
    if parts[0] not in ("truncate", "mask") or len(parts) > 3 or (len(parts) > 1 and parts[1] not in ("token", "sequence")):
        ap.error(f"--rollout-correction: none, or MODE[:LEVEL[:CAP]] (truncate|mask, token|sequence), not {text!r}")
    out = {"mode": parts[0], "level": parts[1] if len(parts) > 1 else "token"}
    if len(parts) > 2:
        try:
            out["cap"] = float(parts[2])
        except ValueError:
            ap.error(f"--rollout-correction: CAP must be a number, not {parts[2]!r}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    task_names = [t.strip() for t in args.task.split(",") if t.strip()]
    mode, options, entropy = LOSS_PRESETS[args.method]
    options = dict(options)
    options.update(json.loads(args.loss_options))
    loss = {"mode": args.loss or mode, **options,
            "entropy_coef": args.entropy_coef if args.entropy_coef is not None else entropy}

    server = None
    cluster = None
    if args.ray is not None:
        from .cluster import Cluster
        common = ["--threads", str(args.threads), "--slots", str(args.slots), "--max-seq-len", str(args.max_seq_len),
                  "--log-level", "warning"]
        cluster = Cluster(replicas=args.replicas, address=args.ray or None, model=args.model, cpus_per_server=args.cpus_per_server,
                          trainer_args=[*common, "--checkpoint-dir", os.path.abspath(os.path.join(args.out, "checkpoints"))],
                          replica_args=common, api_key=args.api_key, ember_server=args.ember_server,
                          trainer_ranks=args.trainer_ranks, mpirun_args=shlex.split(args.mpirun_args or ""))
        url = cluster.trainer_url
        print(f"ray: trainer {url}, replicas {', '.join(cluster.urls)}", file=sys.stderr)
    elif args.start_server:
        server, url = start_server(args)
    else:
        url = args.server or "http://127.0.0.1:8377"
    client = Client(url, api_key=args.api_key)
    state_path = os.path.join(args.out, "state.json")
    sampler = None
    try:
        client.wait_until_healthy(60)
        info = client.info()
        # Sample with the proxy the loss will use, so train_step reuses the sampling-time proxy
        # log-probabilities; the default kappa is the server's.
        proxy = None
        if loss["mode"] == "lp_reg":
            proxy = {"threshold": loss["threshold"]} if "threshold" in loss else \
                {"min_p": loss.get("min_p", info["loss_defaults"]["modes"]["lp_reg"]["min_p"])}
        start = 0
        metrics: List[dict] = []
        evals: List[dict] = []
        if args.resume and os.path.exists(state_path):
            state = json.load(open(state_path))
            client.load_checkpoint(state["checkpoint"])
            start = state["step"]
            metrics = [json.loads(l) for l in open(os.path.join(args.out, "metrics.jsonl"))][:start]
            evals = [json.loads(l) for l in open(os.path.join(args.out, "eval.jsonl"))]
            evals = [e for e in evals if e["step"] <= start]
            # Steps after the checkpoint are redone: drop their records.
            for f, rows in (("metrics.jsonl", metrics), ("eval.jsonl", evals)):
                with open(os.path.join(args.out, f), "w") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"resumed at step {start} from checkpoint {state['checkpoint']}", file=sys.stderr)
        else:
            for f in ("metrics.jsonl", "eval.jsonl"):
                open(os.path.join(args.out, f), "w").close()
        adapter = None
        if args.lora_rank:
            adapter = args.lora_name
            if adapter not in [a["name"] for a in client.list_adapters()]:
                targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
                client.create_adapter(adapter, rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                                      target_modules=targets, seed=args.seed)
        client.configure_optimizer(lr=args.lr, betas=[0.9, 0.999], weight_decay=0.0, grad_clip=1.0, adapter=adapter)
        held = [p for t in task_names for p in tasks.sample(tasks.get(t), "heldout", args.eval_size // len(task_names), 1000)]
        probes = build_probes(client, task_names, args.probes // len(task_names), args.seed) if args.probes else []
        mlog = open(os.path.join(args.out, "metrics.jsonl"), "a")
        elog = open(os.path.join(args.out, "eval.jsonl"), "a")

        def run_eval(step):
            version = client.info()["weights_version"] if adapter is None else \
                next(a["weights_version"] for a in client.list_adapters() if a["name"] == adapter)
            e = {"step": step, "weights_version": version,
                 **evaluate(client, held, args.max_tokens, args.eval_k, seed=12345, adapter=adapter, max_turns=args.max_turns)}
            if probes:
                e["spark_prob"] = spark_probability(client, probes, adapter)
            evals.append(e)
            elog.write(json.dumps(e) + "\n")
            elog.flush()
            return e

        if start == 0:
            first = run_eval(0)
            print(f"step 0: held-out pass@1 {first['pass@1']:.3f}"
                  + "".join(f", {k} {v:.3f}" for k, v in first.items() if k.startswith("pass@") and k != "pass@1"),
                  file=sys.stderr)
        bar = Progress(args.steps, start)
        if args.replica or cluster is not None:
            version = client.info()["weights_version"] if adapter is None else \
                next(a["weights_version"] for a in client.list_adapters() if a["name"] == adapter)
            pool = cluster.pool if cluster is not None else ReplicaPool(args.replica, api_key=args.replica_api_key or args.api_key)
            sampler = AsyncSampler(pool, args,
                                   task_names, proxy, adapter, start=start, start_version=version)
        for step in range(start + 1, args.steps + 1):
            t0 = time.time()
            rng = random.Random(f"{args.seed}:{step}")
            name = task_names[(step - 1) % len(task_names)] if len(task_names) > 1 else task_names[0]
            task = tasks.get(name)
            problems = tasks.sample(task, "train", args.prompts, seed=args.seed * 100003 + step)
            if sampler is not None:
                got = sampler.batch(step)
                t1 = time.time()
                rewards, lengths, sparks = got["rewards"], got["lengths"], got["sparks"]
                result = client.train_step(loss=loss, batch=got["items"],
                                           mini_batches=args.mini_batches if args.mini_batches > 1 else None,
                                           adapter=adapter, rollout_correction=args.correction)
                sampler.trained(step, result["weights_version"])
                refs = []
            elif tasks.is_multiturn(name):
                items, rewards, lengths, sparks = sample_episodes(client, problems, args, rng.randrange(2 ** 31), proxy, adapter)
                t1 = time.time()
                result = client.train_step(loss=loss, batch=items, mini_batches=args.mini_batches if args.mini_batches > 1 else None,
                                           adapter=adapter)
                refs = []
            else:
                out = client.generate(prompts=[p.prompt for p in problems], n=args.samples, max_tokens=args.max_tokens,
                                      temperature=args.temperature, seed=rng.randrange(2 ** 31), proxy=proxy, adapter=adapter)
                verify = verifiers.get(name)
                refs, rewards, lengths, sparks = [], [], [], 0
                for i, (p, r) in enumerate(zip(problems, out["results"])):
                    for s in r["samples"]:
                        reward = verify(p, s["text"])
                        rewards.append(reward)
                        lengths.append(len(s["tokens"]))
                        sparks += any(w in s["text"] for w in task.spark_words)
                        refs.append({"rollout_id": s["rollout_id"], "reward": reward, "group": f"{step}-{i}"})
                t1 = time.time()
                result = client.train_step(loss=loss, rollouts=refs, advantage_estimator=args.advantage,
                                           mini_batches=args.mini_batches if args.mini_batches > 1 else None, adapter=adapter)
            if refs:
                client.release_rollouts([r["rollout_id"] for r in refs])
            m = result["metrics"]
            rec = {"step": step, "task": name, "weights_version": result["weights_version"],
                   "reward": sum(rewards) / len(rewards), "response_tokens": sum(lengths) / len(lengths),
                   "spark_rate": sparks / len(rewards), "entropy": m["entropy"], "loss": m["loss"], "pg_loss": m["pg_loss"],
                   "grad_norm": m["grad_norm"], "clipfrac_low": m["clipfrac_low"], "clipfrac_high": m["clipfrac_high"],
                   "lp_reg_selected": m["lp_reg_selected"], "lp_reg_regularized": m["lp_reg_regularized"],
                   "logprob_max_abs_diff": m["logprob_max_abs_diff"], "sample_seconds": t1 - t0,
                   "train_seconds": time.time() - t1, "step_seconds": time.time() - t0,
                   "proxy_noise_mass": m["proxy_noise_mass"], "low_prob_proxy_kept": m.get("low_prob_proxy_kept")}
            if sampler is not None:
                # Sampling ran beside training: what the trainer waited for, and how stale it was.
                rec.update({"sample_seconds": got["sample_seconds"], "wait_seconds": t1 - t0,
                            "staleness": m.get("staleness", {}), "sampler_versions": got["versions"]})
                for key in ("rollout_is_mean", "rollout_is_min", "rollout_is_max", "rollout_corrected_fraction"):
                    if key in m:
                        rec[key] = m[key]
            if "lp_reg_tokens" in m:
                rec["lp_reg_tokens"] = m["lp_reg_tokens"]
                rec["lp_reg_probability_buckets"] = m["lp_reg_probability_buckets"]
            metrics.append(rec)
            mlog.write(json.dumps(rec) + "\n")
            mlog.flush()
            text = f"reward {rec['reward']:.2f} entropy {rec['entropy']:.3f} lp-reg {rec['lp_reg_regularized']}"
            if step % args.eval_every == 0 or step == args.steps:
                e = run_eval(step)
                text += f" | held-out pass@1 {e['pass@1']:.3f}"
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == args.steps:
                name_ckpt = f"rl-step{step}"
                try:
                    client.save_checkpoint(name_ckpt)
                    if adapter is not None and step == args.steps:
                        print(f"adapter saved as a PEFT folder: {client.save_adapter(adapter)['path']}", file=sys.stderr)
                    with open(state_path, "w") as f:
                        json.dump({"step": step, "checkpoint": name_ckpt, "args": vars(args)}, f, indent=1)
                except EmberError as err:
                    if err.kind != "checkpoints_disabled":
                        raise
            bar.update(step, text)
        plot(args.out, metrics, evals)
        before = next((e for e in evals if e["step"] == 0), evals[0])
        after = evals[-1]
        n = len(held)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"before": before, "after": after, "heldout_size": n, "loss": loss, "model": info["model"],
                       "args": vars(args)}, f, indent=1)
        print(f"metrics: {os.path.join(args.out, 'metrics.jsonl')}, plots: {os.path.join(args.out, 'plots')}")
        print(f"held-out pass@1: before {before['pass@1']:.3f} after {after['pass@1']:.3f} ({n} problems, greedy)")
        return 0
    finally:
        if sampler is not None:
            sampler.stop()
        if cluster is not None:
            cluster.stop()
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    import signal
    # SIGTERM (kill, a supervisor) unwinds like Ctrl-C, so main's cleanup stops the server it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
