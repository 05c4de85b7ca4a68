"""Fault injection against the real server process: kill -9 in the middle of
checkpoint.save, a full disk during save, non-finite steps, memory budgets, disconnects."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SERVER, RunningServer
from ember import Client, EmberError

DEFAULT_MODEL = os.path.join(ROOT, "models", "ember-default")
SEQ = {"tokens": [5, 17, 30, 41, 52, 63, 74, 85, 96, 107], "response_start": 3}


def folder_digest(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def batch(client, n=4, seed=0):
    out = client.generate(prompts=["12+7="], n=n, max_tokens=12, temperature=1.0, seed=seed)
    samples = out["results"][0]["samples"]
    prompt = out["results"][0]["prompt_tokens"]
    return [{"tokens": prompt + s["tokens"], "response_start": len(prompt), "advantage": 1.0 if i % 2 else -1.0}
            for i, s in enumerate(samples)]


def send_raw(url, method, params, rpc_id=1):
    """Sends one call without waiting for its answer; returns the socket."""
    host, port = url[len("http://"):].rsplit(":", 1)
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rpc_id}).encode()
    s = socket.create_connection((host.strip("[]"), int(port)))
    s.sendall(b"POST /rpc HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return s


def test_kill9_during_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    server = RunningServer(DEFAULT_MODEL, ["--checkpoint-dir", str(ckpt)])
    client = Client(server.url)
    client.train_step(loss={"mode": "ppo"}, batch=batch(client), optimizer={"lr": 1e-4})
    assert client.save_checkpoint("a")["weights_version"] == 1
    v1 = os.readlink(ckpt / "a")
    digest = folder_digest(ckpt / v1)
    reference = client.logprob([SEQ])["results"][0]["logprobs"]

    # Each round changes the weights, starts a save of the same name and kills the process
    # with SIGKILL once the save has begun writing (a different file each round).
    kill_points = ["", "model.safetensors", "optimizer.safetensors"]
    for round_, marker in enumerate(kill_points):
        client.train_step(loss={"mode": "ppo"}, batch=batch(client, seed=round_ + 1), optimizer={"lr": 1e-4})
        sock = send_raw(server.url, "checkpoint.save", {"name": "a"})
        killed_during = None
        deadline = time.time() + 30
        while time.time() < deadline:
            tmps = [e for e in os.listdir(ckpt) if e.startswith(".tmp-") and os.path.isdir(ckpt / e)]
            if tmps and (not marker or os.path.exists(ckpt / tmps[0] / marker)):
                server.process.kill()
                killed_during = tmps[0]
                break
            if server.process.poll() is not None or os.readlink(ckpt / "a") != v1:
                break
        server.process.kill()
        server.process.wait(timeout=30)
        sock.close()
        assert killed_during, f"round {round_}: the save finished before it could be interrupted at {marker}"
        # The name still points at the first version, byte for byte.
        assert os.readlink(ckpt / "a") == v1
        assert folder_digest(ckpt / v1) == digest

        server = RunningServer(DEFAULT_MODEL, ["--checkpoint-dir", str(ckpt)])
        client = Client(server.url)
        leftovers = [e for e in os.listdir(ckpt) if e.startswith(".tmp-")]
        assert leftovers == [], "the remains of the interrupted save are removed at start-up"
        assert client.list_checkpoints() == ["a"]
        assert client.load_checkpoint("a")["weights_version"] == 1
        assert client.logprob([SEQ])["results"][0]["logprobs"] == reference, "restored weights are bit-identical"

    # A crash between publishing the new folder and swapping the link leaves an unlinked
    # version folder; the next start removes it and the next save of that name succeeds.
    server.stop()
    os.makedirs(ckpt / "a.v2")
    open(ckpt / "a.v2" / "model.safetensors", "wb").write(b"partial")
    server = RunningServer(DEFAULT_MODEL, ["--checkpoint-dir", str(ckpt)])
    client = Client(server.url)
    assert not os.path.exists(ckpt / "a.v2")
    client.load_checkpoint("a")
    client.train_step(loss={"mode": "ppo"}, batch=batch(client), optimizer={"lr": 1e-4})
    assert client.save_checkpoint("a")["weights_version"] == 2
    assert os.readlink(ckpt / "a") == "a.v2" and not os.path.exists(ckpt / v1)
    assert server.stop() == 0


def mount_prefix(path, size):
    """Runs the server in a private mount namespace with a small tmpfs at `path`."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the full-disk test")
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    return ["unshare", *flags, "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs "{path}" && exec "$0" "$@"']


def test_full_disk_during_save_is_an_error_and_the_server_keeps_serving(tmp_path):
    ckpt = tmp_path / "small-disk"
    os.makedirs(ckpt)
    # One checkpoint of the default model is ~39 MB (weights + AdamW moments): a 60 MB disk
    # holds the first save but not a second one beside it.
    server = RunningServer(DEFAULT_MODEL, ["--checkpoint-dir", str(ckpt)], prefix=mount_prefix(ckpt, "60m"))
    client = Client(server.url)
    client.train_step(loss={"mode": "ppo"}, batch=batch(client), optimizer={"lr": 1e-4})
    assert client.save_checkpoint("first")["weights_version"] == 1
    reference = client.logprob([SEQ])["results"][0]["logprobs"]
    client.train_step(loss={"mode": "ppo"}, batch=batch(client, seed=5), optimizer={"lr": 1e-4})
    after_step = client.logprob([SEQ])["results"][0]["logprobs"]
    for name in ("first", "second"):
        with pytest.raises(EmberError) as e:
            client.save_checkpoint(name)
        assert e.value.kind == "checkpoint_failed" and e.value.code == -32014
        assert "No space left" in e.value.hint
    # Still serving, weights untouched by the failed saves, the first checkpoint intact.
    assert client.info()["weights_version"] == 2
    assert client.logprob([SEQ])["results"][0]["logprobs"] == after_step
    assert client.generate(prompts=["3+4="], max_tokens=4, temperature=0)["results"][0]["samples"][0]["tokens"]
    assert client.list_checkpoints() == ["first"]
    assert client.load_checkpoint("first")["weights_version"] == 1
    assert client.logprob([SEQ])["results"][0]["logprobs"] == reference
    assert server.stop() == 0


def test_non_finite_step_is_refused_and_the_weights_are_unchanged(model_dir):
    server = RunningServer(model_dir)
    client = Client(server.url)
    before = client.logprob([SEQ])["results"][0]["logprobs"]
    v0 = client.info()["weights_version"]
    huge = [{"tokens": SEQ["tokens"], "response_start": 3, "advantage": 3e38},
            {"tokens": SEQ["tokens"][:8], "response_start": 3, "advantage": -3e38}]
    for mode in ("ppo", "lp_reg"):
        with pytest.raises(EmberError) as e:
            client.train_step(loss={"mode": mode}, batch=huge, optimizer={"lr": 1e-2})
        assert e.value.kind == "non_finite" and e.value.code == -32004
        assert client.info()["weights_version"] == v0
        assert client.logprob([SEQ])["results"][0]["logprobs"] == before, "weights unchanged, bit for bit"
    # Non-finite numbers in the request itself are refused before any work.
    # (1e39 is valid JSON but overflows fp32; Infinity is not JSON at all.)
    with pytest.raises(EmberError) as e:
        client.call("train_step", {"loss": {"mode": "ppo"}, "batch": [dict(SEQ, advantage=1e39)]})
    assert e.value.code == -32602 and "advantage" in e.value.path
    with pytest.raises(EmberError) as e:
        client.call("train_step", {"loss": {"mode": "ppo"}, "batch": [dict(SEQ, advantage=float("inf"))]})
    assert e.value.code == -32700
    # The optimizer state was not poisoned: a normal step still works.
    ok = client.train_step(loss={"mode": "ppo"}, batch=[dict(SEQ, advantage=1.0)], optimizer={"lr": 1e-3})
    assert ok["weights_version"] == v0 + 1
    assert all(x == x for x in client.logprob([SEQ])["results"][0]["logprobs"])
    assert server.stop() == 0


def metric(url, name):
    return Client(url).metrics()[name]


def test_memory_budgets_answer_overloaded(model_dir):
    server = RunningServer(model_dir, ["--slots", "2", "--max-queued-sequences", "4", "--rollout-budget-mb", "0.005"])
    client = Client(server.url)
    # More samples than KV slots, more queued sequences than allowed, more rollout bytes than
    # the store's budget: each is refused up front with a hint naming the limit.
    cases = [(dict(prompts=["a"], n=3, max_tokens=4), "concurrent sequences"),
             (dict(prompts=["a", "b", "c", "d", "e"], n=1, max_tokens=4), "--max-queued-sequences"),
             (dict(prompts=["a", "b"], n=2, max_tokens=200), "--rollout-budget-mb")]
    for params, hint in cases:
        with pytest.raises(EmberError) as e:
            client.generate(**params)
        assert e.value.kind == "overloaded" and e.value.code == -32002 and hint in e.value.hint

    # A flood of concurrent calls: each is answered (samples or overloaded), none is lost.
    answers, errors = [], []

    def one(i):
        c = Client(server.url)
        try:
            answers.append(c.generate(prompts=["x", "y"], n=2, max_tokens=100, temperature=1.0, seed=i))
        except EmberError as e:
            errors.append(e.kind)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) + len(errors) == 12
    assert set(errors) <= {"overloaded"} and errors, "the queue limit was reached and reported"
    assert answers, "calls within the limits were served"
    assert metric(server.url, "ember_kv_cache_bytes_in_use") == 0
    assert client.info()["name"] == "ember"
    assert server.stop() == 0


def test_kv_cache_beyond_the_machine_is_refused_at_start(model_dir):
    out = subprocess.run([SERVER, "--model", model_dir, "--port", "0", "--slots", "100000000", "--max-seq-len", "512"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "KV cache" in out.stderr and "--slots" in out.stderr


def test_disconnect_mid_generation_frees_the_kv_cache(model_dir):
    # ignore_eos: a sample that drew EOS early would finish (and free its slot) before the
    # polling below saw it, on a loaded machine.
    server = RunningServer(model_dir, ["--slots", "4"])
    socks = [send_raw(server.url, "generate", {"prompts": ["abc"], "n": 2, "max_tokens": 240, "temperature": 1.0,
                                                 "ignore_eos": True}, rpc_id=i)
             for i in range(2)]
    deadline = time.time() + 10
    while metric(server.url, "ember_sequences_running") < 4 and time.time() < deadline:
        time.sleep(0.01)
    assert metric(server.url, "ember_kv_cache_bytes_in_use") > 0
    for s in socks:
        s.close()
    deadline = time.time() + 10
    while metric(server.url, "ember_sequences_running") > 0 and time.time() < deadline:
        time.sleep(0.01)
    assert metric(server.url, "ember_sequences_running") == 0
    assert metric(server.url, "ember_kv_cache_bytes_in_use") == 0
    generated = metric(server.url, "ember_tokens_generated_total")
    assert generated < 4 * 240, "the generations stopped when their clients left"
    assert server.stop() == 0


def server_pids(marker):
    """Pids of ember-server processes whose command line holds `marker` (a test's own path)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"ember-server") and any(marker.encode() in c for c in cmd):
                out.append(int(pid))
    return out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_orchestrator_takes_its_server_with_it(tmp_path, sig):
    """`python -m ember.rl --start-server`, killed mid-run (a supervisor's SIGTERM, or SIGKILL),
    leaves no orphaned server holding the cores and the memory."""
    import signal
    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python"), EMBER_SERVER=SERVER)
    p = subprocess.Popen([sys.executable, "-m", "ember.rl", "--start-server", "--ember-server", SERVER, "--task", "arithmetic",
                          "--steps", "1000", "--prompts", "2", "--samples", "2", "--max-tokens", "8", "--eval-every", "1000",
                          "--eval-size", "2", "--eval-k", "1", "--probes", "2", "--threads", "1", "--out", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.time() < deadline:
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.2)
        pids = server_pids(out)
        assert len(pids) == 1, pids
        p.send_signal(getattr(signal, sig))
        p.wait(timeout=60)
        deadline = time.time() + 40
        while server_pids(out) and time.time() < deadline:
            time.sleep(0.2)
        assert not server_pids(out), f"the server outlived its orchestrator ({sig})"
    finally:
        p.kill()
        for pid in server_pids(out):
            os.kill(pid, 9)
