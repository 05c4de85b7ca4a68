"""ember.cluster on Ray (one host: a local Ray instance): the trainer and replicas run as actors
owning ember-server processes, replicas follow the trainer, a killed replica is replaced and
catches up, and `python -m ember.rl --ray --replicas N` runs the async loop on them."""
import json
import os
import signal
import subprocess
import time

import pytest
import ray

from conftest import tiny_model  # noqa: E402
from ember import Client, rl  # noqa: E402
from ember.cluster import Cluster  # noqa: E402

KEY = "cluster-key"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(str(tmp_path_factory.mktemp("cluster-model")))


def small_args():
    return ["--threads", "1", "--slots", "16", "--max-seq-len", "256", "--log-level", "warning"]


def test_replicas_follow_and_a_dead_one_is_replaced(local_ray, model):
    with Cluster(replicas=2, model=model, cpus_per_server=0.5, trainer_args=small_args(), replica_args=small_args(),
                 api_key=KEY, check_seconds=0.5) as c:
        trainer = c.client()
        assert trainer.info()["role"] == "trainer"
        for u in c.urls:
            info = Client(u, api_key=KEY).info()
            assert info["role"] == "replica" and info["following"] == c.trainer_url
        v = trainer.train_step({"mode": "cross_entropy"}, batch=[{"tokens": [5, 6, 7, 8, 9], "response_start": 2}],
                               optimizer={"lr": 1e-2})["weights_version"]
        seqs = [{"tokens": [5, 6, 7, 8, 9], "response_start": 2}]
        for u in c.urls:
            r = Client(u, api_key=KEY)
            assert r.weights_sync(version=v)["weights_version"] == v
            assert r.logprob(seqs)["results"] == trainer.logprob(seqs)["results"], "bit for bit at the same version"
        # kill -9 one replica's process: the cluster replaces it and the new one catches up.
        old = c.urls[0]
        os.kill(c.replica_pid(0), signal.SIGKILL)
        deadline = time.time() + 60
        while c.restarts == 0 and time.time() < deadline:
            time.sleep(0.2)
        assert c.restarts == 1 and c.urls[0] != old and c.pool.urls[0] == c.urls[0]
        assert Client(c.urls[0], api_key=KEY).info()["weights_version"] == v
        # The pool sends calls to healthy replicas.
        out = c.pool.call(lambda cl: cl.generate(prompt_tokens=[[1, 2, 3]], max_tokens=4, seed=1))
        assert out["results"][0]["samples"][0]["weights_version"] == v


def test_rl_runs_on_ray(local_ray, model, tmp_path):
    out = str(tmp_path / "ray-run")
    args = ["--ray", "--replicas", "2", "--cpus-per-server", "0.5", "--model", model, "--threads", "1", "--slots", "16",
            "--task", "arithmetic", "--steps", "3", "--prompts", "4", "--samples", "4", "--max-tokens", "10",
            "--eval-every", "100", "--eval-size", "4", "--eval-k", "1", "--probes", "0", "--out", out,
            "--max-off-policy-steps", "1", "--rollout-correction", "truncate"]
    assert rl.main(args) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(sum(m["staleness"].values()) == 16 and all(int(k) <= 1 for k in m["staleness"]) for m in metrics)


def test_ray_spans_network_namespace_hosts(model):
    """A Ray head and two workers on three test hosts (network namespaces): the trainer and the
    replicas land on different hosts, follow across the bridge, and a killed replica is replaced."""
    import secrets
    from conftest import Hosts
    ray_bin = os.path.join(os.path.dirname(os.path.abspath(os.sys.executable)), "ray")
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    with Hosts(("a", "b", "c")) as hosts:
        def ray_cli(name, *args):
            return subprocess.run([*hosts.prefix(name), ray_bin, *args], env=env, capture_output=True, text=True, timeout=120)
        head = f"{hosts.addresses['a']}:6379"
        try:
            r = ray_cli("a", "start", "--head", "--node-ip-address", hosts.addresses["a"], "--port", "6379", "--num-cpus", "1",
                        "--include-dashboard", "false", "--disable-usage-stats")
            assert r.returncode == 0, r.stderr[-2000:]
            for name in ("b", "c"):
                r = ray_cli(name, "start", "--address", head, "--node-ip-address", hosts.addresses[name], "--num-cpus", "1",
                            "--disable-usage-stats")
                assert r.returncode == 0, r.stderr[-2000:]
            # The driver runs on the head's host (a driver needs a raylet on its own node), in its
            # own process: Ray reads its auth settings when it is imported.
            driver = subprocess.run([*hosts.prefix("a"), os.sys.executable, "-c", DRIVER, head, hosts.addresses["a"], model, KEY],
                                    env={**env, "PYTHONPATH": os.pathsep.join(os.sys.path)}, capture_output=True, text=True,
                                    timeout=300)
            assert driver.returncode == 0, driver.stderr[-3000:]
            got = json.loads(driver.stdout.strip().splitlines()[-1])
            assert set(got["ips"]) == set(hosts.addresses.values()), "one server per host"
            assert got["synced"] == [got["version"]] * 2 and got["same_logprobs"]
            assert got["restarts"] == 1 and got["replaced_version"] == got["version"]
        finally:
            for name in ("c", "b", "a"):
                ray_cli(name, "stop", "--force")


DRIVER = """
import json, os, signal, sys, time
import ray
from ember import Client
from ember.cluster import Cluster
head, ip, model, key = sys.argv[1:5]
ray.init(address=head, _node_ip_address=ip, log_to_driver=False)
small = ["--threads", "1", "--slots", "16", "--max-seq-len", "256", "--log-level", "warning"]
with Cluster(replicas=2, model=model, cpus_per_server=1, trainer_args=small, replica_args=small, api_key=key,
             check_seconds=0.5) as c:
    out = {"ips": [u.split("//")[1].rsplit(":", 1)[0] for u in [c.trainer_url, *c.urls]]}
    trainer = c.client()
    v = trainer.train_step({"mode": "cross_entropy"}, batch=[{"tokens": [4, 5, 6, 7], "response_start": 2}],
                           optimizer={"lr": 1e-2})["weights_version"]
    seqs = [{"tokens": [4, 5, 6, 7, 8], "response_start": 2}]
    out["version"] = v
    out["synced"] = [Client(u, api_key=key).weights_sync(version=v)["weights_version"] for u in c.urls]
    out["same_logprobs"] = all(Client(u, api_key=key).logprob(seqs)["results"] == trainer.logprob(seqs)["results"] for u in c.urls)
    old = c.urls[1]
    os.kill(c.replica_pid(1), signal.SIGKILL)     # another network namespace, the same PID space
    deadline = time.time() + 60
    while c.restarts == 0 and time.time() < deadline:
        time.sleep(0.2)
    out["restarts"] = c.restarts
    out["replaced_version"] = Client(c.urls[1], api_key=key).info()["weights_version"] if c.urls[1] != old else None
print(json.dumps(out))
"""
