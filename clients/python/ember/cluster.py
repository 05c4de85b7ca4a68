"""Ember on Ray: a trainer and N sampler replicas as Ray actors, each owning one ember-server
process on the node Ray places it on (with the CPUs it asks for). Replicas follow the trainer
(ember-server --follow); a replica whose process or actor dies is replaced, and generate calls
go to the least-loaded healthy replica (ember.asyncrl.ReplicaPool). Ray is an optional extra:
``pip install 'ember-rl[ray]'``.

    from ember.cluster import Cluster
    with Cluster(replicas=2, cpus_per_server=2) as c:       # ray.init() or an ADDRESS
        python -m ember.rl ... is what `python -m ember.rl --ray [ADDRESS] --replicas N` runs
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from typing import List, Optional, Sequence

from .asyncrl import ReplicaPool
from .client import Client


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the message is the point
        raise SystemExit("ember.cluster needs Ray: pip install 'ember-rl[ray]' (or pip install ray)") from e
    return ray


class _Server:
    """The actor's body: one ember-server process on this node, bound to the node's address."""

    def __init__(self, binary: str, args: Sequence[str], env: Optional[dict] = None, prefix: Sequence[str] = ()):
        import ray
        from .rl import die_with_parent
        host = ray.util.get_node_ip_address()
        # The server goes down with its actor, even when Ray kills the actor's process outright.
        self.process = subprocess.Popen([*prefix, binary, "--host", host, "--port", "0", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})},
                                        preexec_fn=die_with_parent)
        line = self.process.stdout.readline()
        m = re.search(r"listening on (http://[^ |]+)", line)
        if not m:
            self.process.kill()
            raise RuntimeError(f"ember-server did not start on {host}: {line.strip()!r}")
        self.address = m.group(1)

    def url(self) -> str:
        return self.address

    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class Cluster:
    """Starts the trainer and `replicas` followers on a Ray cluster and keeps the replicas alive
    (checked every `check_seconds`). `pool` sends calls to the healthy ones.

    `trainer_ranks` > 1 runs the trainer data-parallel: its actor asks Ray for that many times
    `cpus_per_server` on one node and starts `mpirun -n R ember-server` there. `mpirun_args`
    (e.g. ``["--host", "a,b"]`` with ssh between the nodes) spreads the ranks over machines that
    mpirun reaches itself; Ray places and supervises the launcher, not the ranks."""

    def __init__(self, replicas: int = 1, address: Optional[str] = None, model: Optional[str] = None,
                 cpus_per_server: float = 1, trainer_args: Sequence[str] = (), replica_args: Sequence[str] = (),
                 api_key: Optional[str] = None, ember_server: Optional[str] = None, check_seconds: float = 1.0,
                 trainer_ranks: int = 1, mpirun_args: Sequence[str] = ()):
        from .rl import find_server_binary, mpirun_command
        self.ray = _ray()
        if not self.ray.is_initialized():
            self.ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.binary = find_server_binary(ember_server)
        self.model_args = ["--model", model] if model else []
        self.api_key = api_key
        self.cpus = cpus_per_server
        self.replica_args = list(replica_args)
        self.actor = self.ray.remote(num_cpus=cpus_per_server, max_restarts=0)(_Server)
        env = {"EMBER_API_KEY": api_key} if api_key else {}
        prefix: List[str] = []
        trainer_actor = self.actor
        if trainer_ranks > 1:
            prefix, mpi_env = mpirun_command(trainer_ranks, mpirun_args)
            env.update({k: v for k, v in mpi_env.items() if k.startswith("OMPI_")})
            trainer_actor = self.ray.remote(num_cpus=cpus_per_server * trainer_ranks, max_restarts=0)(_Server)
        self.trainer = trainer_actor.remote(self.binary, [*self.model_args, *trainer_args], env, prefix)
        self.trainer_url = self.ray.get(self.trainer.url.remote())
        self.replicas: List = []
        self.urls: List[str] = []
        for _ in range(replicas):
            a, u = self._start_replica()
            self.replicas.append(a)
            self.urls.append(u)
        self.pool = ReplicaPool(self.urls, api_key=api_key)
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, args=(check_seconds,), daemon=True, name="ember-cluster")
        self._watcher.start()

    def _start_replica(self):
        env = {"EMBER_FOLLOW_API_KEY": self.api_key} if self.api_key else {}
        a = self.actor.remote(self.binary, [*self.model_args, *self.replica_args, "--follow", self.trainer_url], env)
        return a, self.ray.get(a.url.remote())

    def _healthy(self, actor) -> bool:
        try:
            return self.ray.get(actor.alive.remote(), timeout=10)
        except Exception:  # the actor itself died (its node, or a kill)
            return False

    def _watch(self, every: float):
        while not self._stop.wait(every):
            for i in range(len(self.replicas)):
                if self._stop.is_set() or self._healthy(self.replicas[i]):
                    continue
                try:
                    self.ray.kill(self.replicas[i])
                except Exception:
                    pass
                try:
                    a, u = self._start_replica()
                except Exception:
                    continue            # tried again at the next check
                with self._lock:
                    self.replicas[i], self.urls[i] = a, u
                    self.restarts += 1
                self.pool.update(self.urls)

    def client(self) -> Client:
        return Client(self.trainer_url, api_key=self.api_key)

    def replica_pid(self, i: int) -> int:
        return self.ray.get(self.replicas[i].pid.remote())

    def stop(self):
        self._stop.set()
        self._watcher.join(timeout=30)
        for a in [*self.replicas, self.trainer]:
            try:
                self.ray.get(a.stop.remote(), timeout=60)
            except Exception:
                pass
            try:
                self.ray.kill(a)
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
