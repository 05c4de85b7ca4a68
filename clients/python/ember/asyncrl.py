"""Asynchronous RLVR: sampler replicas draw the rollouts (single prompts or multi-turn episodes)
of steps t+1 ... t+K while the trainer trains step t (``python -m ember.rl --replica URL [--replica URL ...] --max-off-policy-steps K``).

Staleness is bounded by admission, not by dropping work: sampling for step s starts only once
the trainer has finished step s-1-K, and on a replica that has applied that version (it is asked
with ``weights.sync {version}``). Every finished rollout is trained on, in step order. Each
batch item carries the sampler's log-probabilities, proxy log-probabilities and
``weights_version``, so the trainer needs no rollout store; ``--rollout-correction`` weighs the
stale ones (docs/design-notes.md). With K = 0 each step samples the trainer's current weights
with the synchronous loop's seeds, and the run is the synchronous one bit for bit (tested).
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Sequence

from . import advantages, tasks, verifiers
from .client import Client, EmberError, TransportError


class ReplicaPool:
    """Fixed replicas (a Kubernetes Service's pods, or ember.cluster's actors): each call goes to
    the healthy replica with the fewest calls in flight; a replica that fails is skipped for
    `cooldown` seconds and the call moves on to another."""

    def __init__(self, urls: Sequence[str], api_key: Optional[str] = None, cooldown: float = 5.0):
        if not urls:
            raise ValueError("at least one replica URL")
        self.clients = [Client(u, api_key=api_key) for u in urls]
        self.urls = list(urls)
        self.in_flight = [0] * len(urls)
        self.down_until = [0.0] * len(urls)
        self.cooldown = cooldown
        self.lock = threading.Lock()

    def update(self, urls: Sequence[str]) -> None:
        """New addresses (a replaced replica): counts restart for the changed ones."""
        with self.lock:
            for i, u in enumerate(urls):
                if u != self.urls[i]:
                    self.urls[i] = u
                    self.clients[i] = Client(u, api_key=self.clients[i].api_key)
                    self.down_until[i] = 0.0

    def _pick(self, tried) -> int:
        with self.lock:
            now = time.time()
            order = sorted((i for i in range(len(self.clients)) if i not in tried),
                           key=lambda i: (self.down_until[i] > now, self.in_flight[i], i))
            if not order:
                raise TransportError("every replica failed: " + ", ".join(self.urls))
            i = order[0]
            self.in_flight[i] += 1
            return i

    def call(self, fn):
        """fn(client) on the least-loaded healthy replica, moving on when one fails."""
        tried = set()
        last = None
        while len(tried) < len(self.clients):
            i = self._pick(tried)
            try:
                return fn(self.clients[i])
            except (TransportError, OSError, EmberError) as e:
                if isinstance(e, EmberError) and e.kind not in ("shutting_down", "overloaded", "sync_failed"):
                    raise
                last = e
                tried.add(i)
                with self.lock:
                    self.down_until[i] = time.time() + self.cooldown
            finally:
                with self.lock:
                    self.in_flight[i] -= 1
        raise TransportError(f"every replica failed; last error: {last}")


class AsyncSampler:
    """Samples the batches of steps start+1 ... steps on replicas, at most K steps ahead of the
    trainer. `batch(step)` waits for a step's batch; `trained(step, version)` admits more."""

    def __init__(self, pool: ReplicaPool, args, task_names: List[str], proxy: Optional[dict], adapter: Optional[str],
                 start: int, start_version: int, workers: Optional[int] = None):
        self.pool, self.args, self.task_names, self.proxy, self.adapter = pool, args, task_names, proxy, adapter
        self.k = args.max_off_policy_steps
        self.cond = threading.Condition()
        self.versions: Dict[int, int] = {start: start_version}   # step -> trainer version after it
        self.trained_step = start
        self.next_step = start + 1
        self.ready: Dict[int, dict] = {}
        self.error: Optional[BaseException] = None
        self.stopping = False
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"ember-sampler-{i}")
                        for i in range(workers or len(pool.clients))]
        for t in self.threads:
            t.start()

    def _work(self):
        while True:
            with self.cond:
                # Admission: step s samples once step s-1-K is trained.
                while not self.stopping and self.next_step <= self.args.steps and self.next_step - 1 - self.k > self.trained_step:
                    self.cond.wait()
                if self.stopping or self.next_step > self.args.steps or self.error:
                    return
                step = self.next_step
                self.next_step += 1
                need = self.versions[max(step - 1 - self.k, min(self.versions))]
            try:
                got = self._sample(step, need)
            except BaseException as e:  # surfaced to the trainer's loop
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return
            with self.cond:
                self.ready[step] = got
                self.cond.notify_all()

    def _sample(self, step: int, need: int) -> dict:
        import random
        args = self.args
        t0 = time.time()
        rng = random.Random(f"{args.seed}:{step}")
        name = self.task_names[(step - 1) % len(self.task_names)] if len(self.task_names) > 1 else self.task_names[0]
        task = tasks.get(name)
        problems = tasks.sample(task, "train", args.prompts, seed=args.seed * 100003 + step)
        seed = rng.randrange(2 ** 31)
        if tasks.is_multiturn(name):
            # Episodes (ember.multiturn): every turn of a step's episodes on one replica, which
            # must hold the admitted version before the first turn (it may move on between turns).
            from .rl import sample_episodes

            def episodes(client: Client):
                self._ensure(client, need)
                return sample_episodes(client, problems, args, seed, self.proxy, self.adapter)

            items, rewards, lengths, sparks = self.pool.call(episodes)
            return {"task": name, "items": items, "rewards": rewards, "lengths": lengths, "sparks": sparks,
                    "sample_seconds": time.time() - t0,
                    "versions": sorted({i["weights_version"] for i in items if "weights_version" in i})}

        def run(client: Client):
            # The replica must hold at least the admitted version (it may be newer).
            self._ensure(client, need)
            return client.generate(prompts=[p.prompt for p in problems], n=args.samples, max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=seed, proxy=self.proxy, adapter=self.adapter)

        out = self.pool.call(run)
        verify = verifiers.get(name)
        rewards, groups, lengths, sparks, rows = [], [], [], 0, []
        for i, (p, r) in enumerate(zip(problems, out["results"])):
            for s in r["samples"]:
                reward = verify(p, s["text"])
                rewards.append(reward)
                groups.append(i)
                lengths.append(len(s["tokens"]))
                sparks += any(w in s["text"] for w in task.spark_words)
                rows.append((r["prompt_tokens"], s))
        adv = advantages.ESTIMATORS[args.advantage](rewards, groups)
        items = []
        for (prompt, s), a in zip(rows, adv):
            item = {"tokens": list(prompt) + list(s["tokens"]), "response_start": len(prompt), "advantage": a,
                    "old_logprobs": s["logprobs"], "weights_version": s["weights_version"]}
            if s.get("proxy_logprobs") is not None:
                item["proxy_logprobs"] = s["proxy_logprobs"]
            items.append(item)
        return {"task": name, "items": items, "rewards": rewards, "lengths": lengths, "sparks": sparks,
                "sample_seconds": time.time() - t0,
                "versions": sorted({s["weights_version"] for _, s in rows})}

    def _ensure(self, client: Client, need: int, timeout: float = 600) -> None:
        """Waits until the replica holds version `need` of the trained weights (the adapter's,
        when a LoRA adapter is trained: adapter steps leave the base version alone)."""
        if self.adapter is None:
            client.weights_sync(version=need, timeout=timeout)
            return
        deadline = time.time() + timeout
        while True:
            client.weights_sync(timeout=timeout)
            held = {a["name"]: a["weights_version"] for a in client.list_adapters()}
            if held.get(self.adapter, -1) >= need:
                return
            if time.time() > deadline:
                raise TransportError(f"replica {client.url} did not reach version {need} of adapter {self.adapter}")
            time.sleep(0.05)

    def batch(self, step: int) -> dict:
        with self.cond:
            while step not in self.ready and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            return self.ready.pop(step)

    def trained(self, step: int, version: int) -> None:
        with self.cond:
            self.versions[step] = version
            self.trained_step = step
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
