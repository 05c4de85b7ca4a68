"""Weight publishing (GET /v1/weights/manifest, GET /v1/weights) and sampler replicas
(ember-server --follow URL): versions are immutable, hashes check every byte, only changed
tensors travel, and a replica samples bit for bit as its trainer does at the same version."""
import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, SERVER, Hosts, RunningServer, tiny_model
from ember import Client, EmberError

KEY = "trainer-key"


def get(url, headers=None, key=KEY):
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def ce_batch(seed=0, n=4):
    """A cross-entropy batch over the tiny model's vocabulary."""
    import random
    rng = random.Random(seed)
    return [{"tokens": [rng.randrange(1, 8000) for _ in range(12)], "response_start": 4, "advantage": 1.0} for _ in range(n)]


def step(client, seed=0, adapter=None):
    return client.train_step({"mode": "cross_entropy"}, batch=ce_batch(seed), optimizer={"lr": 1e-2}, adapter=adapter)


def metrics(url):
    _, _, body = get(url + "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def same_samples(a, b):
    sa = [s for r in a["results"] for s in r["samples"]]
    sb = [s for r in b["results"] for s in r["samples"]]
    assert [s["tokens"] for s in sa] == [s["tokens"] for s in sb]
    # Bit for bit: JSON floats round-trip exactly.
    assert [s["logprobs"] for s in sa] == [s["logprobs"] for s in sb]
    return sa


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(str(tmp_path_factory.mktemp("replica-model")))


@pytest.fixture(scope="module")
def trainer(model):
    s = RunningServer(model, ["--api-key", KEY])
    yield s
    s.stop()


def follow(model, trainer_url, extra=(), key=KEY):
    return RunningServer(model, ["--follow", trainer_url, *(["--follow-api-key", key] if key else []), *extra],
                         log_level="info", stderr=subprocess.DEVNULL)


def test_manifest_describes_the_body_byte_for_byte(trainer):
    status, headers, body = get(trainer.url + "/v1/weights/manifest")
    assert status == 200
    m = json.loads(body)
    assert headers["ETag"] == f'"{m["weights_version"]}"'
    assert m["model"]["model_type"] == "qwen2" and m["dtype"] == "F32" and m["adapters"] == []
    status, headers, weights = get(trainer.url + "/v1/weights")
    assert status == 200 and headers["ETag"] == f'"{m["weights_version"]}"' and len(weights) == m["length"]
    assert headers["Accept-Ranges"] == "bytes"
    # The body is a safetensors file whose header agrees with the manifest, and every tensor's
    # bytes hash to its digest.
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + n])
    assert {t["name"] for t in m["tensors"]} == set(header) - {"__metadata__"}
    for t in m["tensors"]:
        h = header[t["name"]]
        assert h["shape"] == t["shape"] and h["dtype"] == t["dtype"]
        assert 8 + n + h["data_offsets"][0] == t["offset"] and h["data_offsets"][1] - h["data_offsets"][0] == t["length"]
        assert hashlib.sha256(weights[t["offset"]:t["offset"] + t["length"]]).hexdigest() == t["sha256"]


def test_an_unchanged_model_publishes_its_files_values(model, tmp_path):
    # A fresh server publishes exactly the values of its model folder's safetensors.
    s = RunningServer(model)
    try:
        m = json.loads(get(s.url + "/v1/weights/manifest", key=None)[2])
        _, _, weights = get(s.url + "/v1/weights", key=None)
        with open(os.path.join(model, "model.safetensors"), "rb") as f:
            original = f.read()
        n = struct.unpack("<Q", original[:8])[0]
        header = json.loads(original[8:8 + n])
        for t in m["tensors"]:
            a, b = header[t["name"]]["data_offsets"]
            assert weights[t["offset"]:t["offset"] + t["length"]] == original[8 + n + a:8 + n + b], t["name"]
    finally:
        s.stop()


def test_ranges_preconditions_and_bad_queries(trainer):
    _, _, whole = get(trainer.url + "/v1/weights")
    version = json.loads(get(trainer.url + "/v1/weights/manifest")[2])["weights_version"]
    status, headers, part = get(trainer.url + "/v1/weights", {"Range": "bytes=100-1123"})
    assert status == 206 and part == whole[100:1124] and headers["Content-Range"] == f"bytes 100-1123/{len(whole)}"
    status, _, tail = get(trainer.url + "/v1/weights", {"Range": "bytes=-10"})
    assert status == 206 and tail == whole[-10:]
    status, headers, _ = get(trainer.url + "/v1/weights", {"Range": f"bytes={len(whole)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(whole)}"
    # If-Range with another version: the whole body, not a range of a different file.
    status, _, body = get(trainer.url + "/v1/weights", {"Range": "bytes=0-9", "If-Range": '"999"'})
    assert status == 200 and body == whole
    status, _, body = get(trainer.url + "/v1/weights", {"If-Match": '"999"'})
    assert status == 412 and json.loads(body)["path"] == "header.If-Match"
    assert get(trainer.url + "/v1/weights", {"If-Match": f'"{version}"'})[0] == 200
    status, _, body = get(trainer.url + "/v1/weights/manifest?after=x")
    assert status == 400 and json.loads(body)["path"] == "query.after"
    status, _, body = get(trainer.url + "/v1/weights?version=3")
    assert status == 400 and json.loads(body)["path"] == "query.version"
    status, _, body = get(trainer.url + "/v1/weights?adapter=nope")
    assert status == 404 and json.loads(body)["path"] == "query.adapter"
    # Behind the API key.
    assert get(trainer.url + "/v1/weights/manifest", key=None)[0] == 401
    assert get(trainer.url + "/v1/weights", key="wrong")[0] == 401
    # A long poll with nothing new answers 304 at its timeout.
    t0 = time.time()
    status, _, _ = get(trainer.url + f"/v1/weights/manifest?after={version}&timeout=1")
    assert status == 304 and 0.9 < time.time() - t0 < 10


def test_long_poll_answers_when_a_step_lands_and_versions_stay_immutable(trainer):
    c = Client(trainer.url, api_key=KEY)
    m0 = json.loads(get(trainer.url + "/v1/weights/manifest")[2])
    _, _, old = get(trainer.url + "/v1/weights", {"If-Match": f'"{m0["weights_version"]}"'})
    answer = {}

    def poll():
        answer["r"] = get(trainer.url + f"/v1/weights/manifest?after={m0['weights_version']}&timeout=60")
        answer["t"] = time.time()

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    assert "r" not in answer
    stepped = time.time()
    v = step(c)["weights_version"]
    t.join(30)
    status, headers, body = answer["r"]
    m1 = json.loads(body)
    assert status == 200 and m1["weights_version"] == v == m0["weights_version"] + 1 and answer["t"] >= stepped
    assert m1["manifest_id"] != m0["manifest_id"]
    changed = {t["name"] for t in m1["tensors"]} - {(t["name"]) for t in m1["tensors"] if t in m0["tensors"]}
    assert changed, "a step changes tensors"
    # The old version is gone once nothing holds it; asking for it by ETag is refused, never mixed.
    status, _, part = get(trainer.url + "/v1/weights", {"If-Match": f'"{m0["weights_version"]}"', "Range": "bytes=0-99"})
    assert status in (206, 412)
    if status == 206:   # (asked again, it may be gone by then: this one answer is checked)
        assert part == old[:100]
    _, _, new = get(trainer.url + "/v1/weights")
    for t in m1["tensors"]:
        assert hashlib.sha256(new[t["offset"]:t["offset"] + t["length"]]).hexdigest() == t["sha256"]


def test_replica_samples_and_scores_bit_for_bit_with_its_trainer(model, trainer):
    c = Client(trainer.url, api_key=KEY)
    step(c, seed=1)
    replica = follow(model, trainer.url)
    try:
        r = Client(replica.url)
        info = r.info()
        assert info["role"] == "replica" and info["following"] == trainer.url and info["world_size"] == 1
        assert c.info()["role"] == "trainer" and c.info()["following"] is None
        assert "replica following" in replica.banner
        # It starts at the trainer's version, having downloaded what a step changed.
        assert info["weights_version"] == c.info()["weights_version"]
        assert metrics(replica.url)["ember_weights_syncs_total"] == 1
        # Read-only to its clients.
        with pytest.raises(EmberError) as e:
            step(r)
        assert e.value.kind == "read_only"
        # Same version, same samples and scores, bit for bit.
        prompts = [[5, 17, 99, 3], [42, 7]]
        a = c.generate(prompt_tokens=prompts, n=3, max_tokens=12, seed=11)
        b = r.generate(prompt_tokens=prompts, n=3, max_tokens=12, seed=11)
        samples = same_samples(a, b)
        assert all(s["weights_version"] == info["weights_version"] for s in samples)
        seqs = [{"tokens": p + s["tokens"], "response_start": len(p)} for p, res in zip(prompts, b["results"]) for s in res["samples"]]
        assert c.logprob(seqs)["results"] == r.logprob(seqs)["results"]
        # A new step: weights.sync answers once it is applied; again identical.
        v = step(c, seed=2)["weights_version"]
        got = r.weights_sync(version=v)
        assert got["weights_version"] == v and got["bytes"] > 0
        # The answer is the spec's.
        with open(os.path.join(ROOT, "Protocol", "openrpc.json")) as f:
            spec = next(m for m in json.load(f)["methods"] if m["name"] == "weights.sync")["result"]["schema"]
        assert set(got) == set(spec["properties"]) and set(spec["required"]) <= set(got)
        same_samples(c.generate(prompt_tokens=prompts, n=2, max_tokens=10, seed=5),
                     r.generate(prompt_tokens=prompts, n=2, max_tokens=10, seed=5))
        # Without weights.sync the replica follows by itself (long poll).
        v = step(c, seed=3)["weights_version"]
        deadline = time.time() + 20
        while r.info()["weights_version"] != v and time.time() < deadline:
            time.sleep(0.1)
        assert r.info()["weights_version"] == v
        m = metrics(replica.url)
        assert m["ember_weights_lag_versions"] == 0 and m["ember_weights_syncs_total"] >= 3
        # A sync with nothing new moves nothing.
        assert r.weights_sync()["weights_version"] == v
    finally:
        replica.stop()


def test_adapter_updates_travel_alone(model, trainer):
    c = Client(trainer.url, api_key=KEY)
    replica = follow(model, trainer.url)
    try:
        r = Client(replica.url)
        base_bytes = json.loads(get(trainer.url + "/v1/weights/manifest")[2])["length"]
        c.create_adapter("tenant-a", rank=4, seed=1)
        step(c, seed=4, adapter="tenant-a")
        m = json.loads(get(trainer.url + "/v1/weights/manifest")[2])
        (a,) = m["adapters"]
        assert a["name"] == "tenant-a" and a["weights_version"] == 1 and a["rank"] == 4 and a["config"]["peft_type"] == "LORA"
        status, headers, blob = get(trainer.url + "/v1/weights?adapter=tenant-a")
        assert status == 200 and hashlib.sha256(blob).hexdigest() == a["sha256"] == headers["ETag"].strip('"')
        # The file's chunks cover it end to end, each with the digest of exactly its bytes.
        assert len(a["chunks"]) > 1 and a["chunks"][0]["offset"] == 0
        assert sum(ch["length"] for ch in a["chunks"]) == a["length"] == len(blob)
        for x, y in zip(a["chunks"], a["chunks"][1:]):
            assert x["offset"] + x["length"] == y["offset"]
        for ch in a["chunks"]:
            assert hashlib.sha256(blob[ch["offset"]:ch["offset"] + ch["length"]]).hexdigest() == ch["sha256"]
        got = r.weights_sync()
        # Only the adapter moved: megabytes at most, never the base.
        assert got["bytes"] == a["length"] and got["bytes"] < base_bytes / 4
        assert [x["name"] for x in r.list_adapters()] == ["tenant-a"] and r.list_adapters()[0]["weights_version"] == 1
        prompts = [[9, 8, 7]]
        same_samples(c.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=2, adapter="tenant-a"),
                     r.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=2, adapter="tenant-a"))
        c.delete_adapter("tenant-a")
        assert r.weights_sync()["bytes"] == 0 and r.list_adapters() == []
    finally:
        replica.stop()


def test_in_flight_generations_finish_on_the_old_weights(model, trainer):
    c = Client(trainer.url, api_key=KEY)
    replica = follow(model, trainer.url)
    try:
        r = Client(replica.url)
        before = r.info()["weights_version"]
        out = {}

        def long_generation():
            out["g"] = r.generate(prompt_tokens=[[1, 2, 3]] * 4, max_tokens=200, ignore_eos=True, seed=1)
            out["t"] = time.time()

        t = threading.Thread(target=long_generation)
        t.start()
        time.sleep(0.3)
        v = step(c, seed=5)["weights_version"]
        synced = r.weights_sync(version=v)
        done = time.time()
        t.join(60)
        assert synced["weights_version"] == v
        # The generation that was running when the swap was queued finished first, on the old weights.
        assert out["t"] <= done
        assert {s["weights_version"] for res in out["g"]["results"] for s in res["samples"]} == {before}
        assert all(len(s["tokens"]) == 200 for res in out["g"]["results"] for s in res["samples"])
        after = r.generate(prompt_tokens=[[1, 2, 3]], max_tokens=4, seed=1)
        assert after["results"][0]["samples"][0]["weights_version"] == v
    finally:
        replica.stop()


def test_sync_errors_are_named(model, trainer, tmp_path):
    c = Client(trainer.url, api_key=KEY)
    with pytest.raises(EmberError) as e:
        c.weights_sync()
    assert e.value.kind == "not_a_replica" and "--follow" in e.value.hint
    # A wrong key or another model stops the replica at start, with the reason.
    for extra, key, words in [((), "wrong", "refused this replica's key"),
                              ((), KEY, "serves another model")]:
        other = model if key == "wrong" else tiny_model(str(tmp_path / "other"), hidden=48, heads=4, kv_heads=2)
        p = subprocess.run([SERVER, "--model", other, "--port", "0", "--follow", trainer.url, "--follow-api-key", key],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and words in p.stderr, p.stderr
    p = subprocess.run([SERVER, "--follow", "ftp://x"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "--follow" in p.stderr
    replica = follow(model, trainer.url)
    try:
        r = Client(replica.url)
        with pytest.raises(EmberError) as e:
            r.call("weights.sync", {"version": -1})
        assert e.value.path == "params.version"
        with pytest.raises(EmberError) as e:
            r.call("weights.sync", {"version": 10 ** 6, "timeout": 1})
        assert e.value.kind == "sync_failed" and e.value.path == "params.version"
    finally:
        replica.stop()


class FaultProxy:
    """Forwards TCP to `target` and damages responses to GET /v1/weights (not the manifest):
    `cut` bytes then a closed connection (once), `corrupt` (flip one body byte while set), or
    `slow` (seconds of sleep per 64 KB while set); `dead` stops forwarding (the host is gone)."""

    def __init__(self, target, cut=None):
        host, port = target.replace("http://", "").rsplit(":", 1)
        self.target = (host, int(port))
        self.cut = cut
        self.cuts = 0
        self.corrupt = False
        self.corrupted = 0
        self.slow = 0.0
        # Set: the far host is gone; what the kernel had buffered from it is lost too.
        self.dead = False
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client):
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        first = client.recv(65536)
        weights = first.startswith(b"GET /v1/weights ") or first.startswith(b"GET /v1/weights?")
        cutting = weights and self.cut is not None
        corrupting = weights and self.corrupt
        seen, body_at = b"", None
        upstream.sendall(first)

        def up():
            try:
                while True:
                    d = client.recv(65536)
                    if not d:
                        break
                    upstream.sendall(d)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        sent = 0
        try:
            while True:
                d = upstream.recv(65536)
                if not d or self.dead:
                    break
                if corrupting:
                    # The first body byte, wherever the headers end (they may arrive alone).
                    if body_at is None:
                        seen += d
                        if b"\r\n\r\n" in seen:
                            body_at = seen.index(b"\r\n\r\n") + 4 - (len(seen) - len(d))
                    elif body_at < 0:
                        body_at = 0
                    if body_at is not None and 0 <= body_at < len(d):
                        d = d[:body_at] + bytes([d[body_at] ^ 0xFF]) + d[body_at + 1:]
                        corrupting = False
                        self.corrupted += 1
                    elif body_at is not None:
                        body_at = -1    # the body starts in the next piece
                if cutting and sent + len(d) > self.cut:
                    with self.lock:         # one cut in all, on whichever response gets there first
                        cut_now = self.cuts == 0
                        self.cuts += cut_now
                    if cut_now:
                        client.sendall(d[: self.cut - sent])
                        break
                    cutting = False
                if weights and self.slow:
                    time.sleep(self.slow)
                if self.dead:
                    break
                client.sendall(d)
                sent += len(d)
        except OSError:
            pass
        # shutdown, not only close: the reader thread's recv would keep the socket open.
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_a_torn_download_resumes_where_it_broke(model, trainer):
    c = Client(trainer.url, api_key=KEY)
    step(c, seed=6)
    proxy = FaultProxy(trainer.url, cut=200_000)
    replica = follow(model, proxy.url)
    try:
        r = Client(replica.url)
        assert proxy.cuts == 1
        m = metrics(replica.url)
        assert m["ember_weights_sync_errors_total"] >= 1 and m["ember_weights_syncs_total"] == 1
        assert r.info()["weights_version"] == c.info()["weights_version"]
        # Resumed, not restarted: the bytes counted once.
        manifest = json.loads(get(trainer.url + "/v1/weights/manifest")[2])
        assert m["ember_weights_last_sync_bytes"] <= manifest["length"]
        prompts = [[4, 4, 4]]
        same_samples(c.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=3),
                     r.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=3))
    finally:
        replica.stop()
        proxy.sock.close()


def test_a_replica_on_another_host_follows_through_a_partition(model):
    with Hosts() as hosts:
        trainer = RunningServer(model, ["--host", hosts.addresses["a"], "--api-key", KEY], prefix=hosts.prefix("a"))
        replica = None
        try:
            c = Client(trainer.url, api_key=KEY)
            assert trainer.url.startswith(f"http://{hosts.addresses['a']}:")
            v = step(c, seed=7)["weights_version"]
            replica = RunningServer(model, ["--host", hosts.addresses["b"], "--follow", trainer.url, "--follow-api-key", KEY],
                                    prefix=hosts.prefix("b"), stderr=subprocess.DEVNULL)
            r = Client(replica.url)
            assert r.info()["weights_version"] == v and r.info()["following"] == trainer.url
            prompts = [[3, 1, 4, 1, 5]]
            same_samples(c.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=9),
                         r.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=9))
            # Partition the trainer: the replica keeps serving the version it holds and counts failures.
            hosts.link("a", up=False)
            with pytest.raises(EmberError) as e:
                r.weights_sync(timeout=0)
            assert e.value.kind == "sync_failed"
            assert r.generate(prompt_tokens=prompts, max_tokens=4, seed=1)["results"][0]["samples"][0]["weights_version"] == v
            # Heal: a step taken meanwhile arrives.
            hosts.link("a", up=True)
            v2 = step(c, seed=8)["weights_version"]
            assert r.weights_sync(version=v2, timeout=60)["weights_version"] == v2
            same_samples(c.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=9),
                         r.generate(prompt_tokens=prompts, n=2, max_tokens=8, seed=9))
            assert metrics(replica.url)["ember_weights_sync_errors_total"] >= 1
        finally:
            if replica:
                replica.stop()
            trainer.stop()


def test_rollout_correction_weighs_off_policy_samples(trainer):
    """Importance weights w = pi_old / pi_sampler scale the policy gradient exactly: checked through
    dry runs' gradient norms (a gradient linear in w when the ratio is 1 and nothing clips)."""
    import math
    c = Client(trainer.url, api_key=KEY)
    seqs = [{"tokens": b["tokens"], "response_start": b["response_start"]} for b in ce_batch(seed=9, n=4)]
    current = [r["logprobs"] for r in c.logprob(seqs)["results"]]
    loss = {"mode": "ppo"}
    advantages = [1.0, -1.0, 0.5, -0.5]

    def batch(shift, version=None):
        return [{**s, "advantage": a, "old_logprobs": [lp - shift for lp in cur],
                 **({"weights_version": version} if version is not None else {})}
                for s, a, cur in zip(seqs, advantages, current)]

    def norm(shift, correction=None, version=None):
        params = {"loss": loss, "batch": batch(shift, version), "dry_run": True}
        if correction:
            params["rollout_correction"] = correction
        return c.call("train_step", params)["metrics"]

    base = norm(0.0)
    # On-policy samples: w = 1, the same gradient bit for bit.
    same = norm(0.0, {"mode": "truncate", "cap": 5})
    assert same["grad_norm"] == base["grad_norm"] and same["rollout_is_mean"] == 1.0 and same["rollout_corrected_fraction"] == 0
    # The sampler gave every token e^-0.1 less probability: w = e^0.1 on every token, below the cap.
    delta = 0.1
    m = norm(delta, {"mode": "truncate", "level": "token", "cap": 5})
    assert math.isclose(m["grad_norm"], math.exp(delta) * base["grad_norm"], rel_tol=1e-4)
    assert math.isclose(m["rollout_is_mean"], math.exp(delta), rel_tol=1e-5) and m["rollout_corrected_fraction"] == 0
    # Above the cap: truncated to it.
    m = norm(1.0, {"mode": "truncate", "cap": 2})
    assert math.isclose(m["grad_norm"], 2 * base["grad_norm"], rel_tol=1e-4) and m["rollout_corrected_fraction"] == 1
    # Sequence level: w is the product over the sequence's tokens (8 response tokens each).
    n = len(seqs[0]["tokens"]) - seqs[0]["response_start"]
    m = norm(0.01, {"mode": "truncate", "level": "sequence", "cap": 100})
    assert math.isclose(m["rollout_is_mean"], math.exp(0.01 * n), rel_tol=1e-4)
    assert math.isclose(m["grad_norm"], math.exp(0.01 * n) * base["grad_norm"], rel_tol=1e-4)
    # Mask: out-of-range samples leave the loss; all of them out is an error naming the cap.
    with pytest.raises(EmberError) as e:
        norm(1.0, {"mode": "mask", "cap": 2})
    assert e.value.path == "params.rollout_correction"
    mixed = batch(0.0)
    mixed[0]["old_logprobs"] = [lp - 1.0 for lp in current[0]]
    m = c.call("train_step", {"loss": loss, "batch": mixed, "dry_run": True,
                              "rollout_correction": {"mode": "mask", "level": "sequence", "cap": 2}})["metrics"]
    assert m["rollout_corrected_fraction"] == 0.25 and m["tokens"] == 3 * n
    # Staleness counts sequences by the versions they were sampled under.
    v = c.info()["weights_version"]
    assert norm(0.0, version=v)["staleness"] == {"0": 4}
    if v >= 1:
        assert norm(0.0, version=v - 1)["staleness"] == {"1": 4}
    # Bad input: named.
    with pytest.raises(EmberError) as e:
        c.call("train_step", {"loss": loss, "batch": [{**seqs[0], "advantage": 1.0}], "dry_run": True,
                              "rollout_correction": {"mode": "truncate"}})
    assert e.value.path == "params.batch[0].old_logprobs"
    for bad, path in [({"mode": "clip"}, "params.rollout_correction.mode"), ({"mode": "mask", "cap": 0.5}, "params.rollout_correction.cap"),
                      ({"mode": "mask", "level": "word"}, "params.rollout_correction.level")]:
        with pytest.raises(EmberError) as e:
            c.call("train_step", {"loss": loss, "batch": batch(0.0), "dry_run": True, "rollout_correction": bad})
        assert e.value.path == path, (bad, e.value.path)


def rl_args(url, out, *extra):
    return ["--server", url, "--api-key", KEY, "--task", "arithmetic", "--steps", "3", "--prompts", "4", "--samples", "4",
            "--max-tokens", "10", "--eval-every", "100", "--eval-size", "4", "--eval-k", "1", "--probes", "0",
            "--out", out, "--method", "lp_reg", "--loss-options", '{"rho": 0.5}', "--lr", "1e-3", *extra]


def test_async_rl_with_k0_is_the_synchronous_run_bit_for_bit(model, tmp_path):
    from ember import rl
    sync_trainer = RunningServer(model, ["--api-key", KEY])
    async_trainer = RunningServer(model, ["--api-key", KEY])
    replicas = []
    try:
        assert rl.main(rl_args(sync_trainer.url, str(tmp_path / "sync"))) == 0
        replicas = [follow(model, async_trainer.url)]
        assert rl.main(rl_args(async_trainer.url, str(tmp_path / "async"), "--replica", replicas[0].url,
                               "--max-off-policy-steps", "0")) == 0
        a = [json.loads(l) for l in open(tmp_path / "sync" / "metrics.jsonl")]
        b = [json.loads(l) for l in open(tmp_path / "async" / "metrics.jsonl")]
        for x, y in zip(a, b):
            for key in ("reward", "loss", "pg_loss", "entropy", "grad_norm", "lp_reg_selected", "lp_reg_regularized", "weights_version"):
                assert x[key] == y[key], (key, x[key], y[key])
            assert y["staleness"] == {"0": 16} and y["sampler_versions"] == [x["weights_version"] - 1]
        # The same weights, byte for byte.
        ms = json.loads(get(sync_trainer.url + "/v1/weights/manifest")[2])
        ma = json.loads(get(async_trainer.url + "/v1/weights/manifest")[2])
        assert [t["sha256"] for t in ms["tensors"]] == [t["sha256"] for t in ma["tensors"]]
        assert ms["manifest_id"] == ma["manifest_id"]
        # K = 2 on two replicas: sampling runs ahead, staleness stays within K, nothing is dropped,
        # and the correction reports its importance ratios.
        replicas.append(follow(model, async_trainer.url))
        out = str(tmp_path / "k2")
        assert rl.main(rl_args(async_trainer.url, out, "--replica", replicas[0].url, "--replica", replicas[1].url,
                               "--max-off-policy-steps", "2", "--rollout-correction", "truncate:token:2", "--steps", "5")) == 0
        k2 = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        assert [m["step"] for m in k2] == [1, 2, 3, 4, 5]
        for m in k2:
            assert sum(m["staleness"].values()) == 16 and all(0 <= int(s) <= 2 for s in m["staleness"])
            assert m["rollout_is_min"] <= m["rollout_is_mean"] <= m["rollout_is_max"]
        assert k2[0]["staleness"] == {"0": 16}
        assert any(int(s) > 0 for m in k2 for s in m["staleness"]), "sampling ran ahead of training"
        assert [m["weights_version"] for m in k2] == list(range(k2[0]["weights_version"], k2[0]["weights_version"] + 5))
    finally:
        for r in replicas:
            r.stop()
        sync_trainer.stop()
        async_trainer.stop()


def test_async_multi_turn_episodes_with_k0_are_the_synchronous_run(tmp_path):
    """tool-arith episodes (chat turns, tool results as context) sampled on a replica at K = 0
    train exactly as the synchronous loop's; each item names the oldest version its turns saw."""
    from ember import rl
    # The embedded default model: trained on tool-arith, it samples ids its tokenizer knows.
    model = os.path.join(ROOT, "models", "ember-default")
    sync_trainer = RunningServer(model, ["--api-key", KEY])
    async_trainer = RunningServer(model, ["--api-key", KEY])
    replica = None
    try:
        def args(url, out, *extra):
            a = rl_args(url, out, "--max-turns", "2", "--steps", "2", *extra)
            a[a.index("--task") + 1] = "tool-arith"
            return a
        assert rl.main(args(sync_trainer.url, str(tmp_path / "sync"))) == 0
        replica = follow(model, async_trainer.url)
        assert rl.main(args(async_trainer.url, str(tmp_path / "async"), "--replica", replica.url,
                            "--max-off-policy-steps", "0")) == 0
        a = [json.loads(l) for l in open(tmp_path / "sync" / "metrics.jsonl")]
        b = [json.loads(l) for l in open(tmp_path / "async" / "metrics.jsonl")]
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            for key in ("reward", "loss", "pg_loss", "entropy", "grad_norm", "weights_version", "response_tokens"):
                assert x[key] == y[key], (key, x[key], y[key])
            assert y["staleness"] == {"0": 16} and y["sampler_versions"] == [x["weights_version"] - 1]
        ms = json.loads(get(sync_trainer.url + "/v1/weights/manifest")[2])
        ma = json.loads(get(async_trainer.url + "/v1/weights/manifest")[2])
        assert ms["manifest_id"] == ma["manifest_id"]
    finally:
        if replica:
            replica.stop()
        sync_trainer.stop()
        async_trainer.stop()


@contextlib.contextmanager
def behind_proxy(model, trainer):
    """A replica following `trainer` through a FaultProxy: (trainer client, replica client, proxy)."""
    proxy = FaultProxy(trainer.url)
    replica = follow(model, proxy.url)
    try:
        yield Client(trainer.url, api_key=KEY), Client(replica.url), proxy
    finally:
        replica.stop()
        proxy.sock.close()


def test_a_corrupted_download_is_refused_and_the_old_version_kept(model, trainer):
    with behind_proxy(model, trainer) as (c, r, proxy):
        old = r.info()["weights_version"]
        seqs = [{"tokens": [7, 8, 9, 10, 11, 12], "response_start": 2}]
        before = r.logprob(seqs)["results"]
        proxy.corrupt = True
        v = step(c, seed=10)["weights_version"]
        with pytest.raises(EmberError) as e:
            r.weights_sync(version=v)
        assert e.value.kind == "sync_failed" and "SHA-256" in e.value.hint and proxy.corrupted >= 1
        assert r.info()["weights_version"] == old and r.logprob(seqs)["results"] == before, "the old version is kept whole"
        proxy.corrupt = False
        assert r.weights_sync(version=v)["weights_version"] == v
        assert r.logprob(seqs)["results"] == c.logprob(seqs)["results"]


def test_a_corrupted_adapter_chunk_is_refused_and_later_updates_stay_exact(model, trainer):
    with behind_proxy(model, trainer) as (c, r, proxy):
        c.create_adapter("tenant-c", rank=8, seed=3)
        seqs = [{"tokens": [7, 8, 9, 10, 11, 12], "response_start": 2}]
        step(c, seed=11, adapter="tenant-c")
        r.weights_sync()
        before = r.logprob(seqs, adapter="tenant-c")["results"]
        assert before == c.logprob(seqs, adapter="tenant-c")["results"]
        proxy.corrupt = True
        step(c, seed=12, adapter="tenant-c")
        with pytest.raises(EmberError) as e:
            r.weights_sync()
        assert e.value.kind == "sync_failed" and "adapter 'tenant-c' (bytes" in e.value.hint and "SHA-256" in e.value.hint
        assert r.logprob(seqs, adapter="tenant-c")["results"] == before, "the old adapter is kept whole"
        proxy.corrupt = False
        # Later updates reuse the replica's buffers (the download's and the replaced adapter's):
        # each must still equal the trainer bit for bit.
        for seed in (12, 13, 14):
            if seed != 12:
                step(c, seed=seed, adapter="tenant-c")
            r.weights_sync()
            got = r.logprob(seqs, adapter="tenant-c")["results"]
            assert got == c.logprob(seqs, adapter="tenant-c")["results"] and got != before
            before = got
        c.delete_adapter("tenant-c")


def test_a_trainer_killed_mid_publish_leaves_replicas_on_the_last_whole_version(model, tmp_path):
    trainer = RunningServer(model, ["--api-key", KEY])
    proxy = FaultProxy(trainer.url)
    replica = follow(model, proxy.url)
    try:
        c, r = Client(trainer.url, api_key=KEY), Client(replica.url)
        seqs = [{"tokens": [3, 5, 7, 9, 11], "response_start": 2}]
        old = r.info()["weights_version"]
        before = r.logprob(seqs)["results"]
        assert before == c.logprob(seqs)["results"]
        proxy.slow = 0.05       # about 1.3 MB/s: the download of a step takes about a second
        step(c, seed=11)
        time.sleep(0.4)         # the replica's long poll has seen the step and is downloading
        trainer.process.kill()
        proxy.dead = True
        trainer.process.wait()
        time.sleep(1.0)
        assert r.info()["weights_version"] == old and r.logprob(seqs)["results"] == before
        out = r.generate(prompt_tokens=[[1, 2]], max_tokens=4, seed=1)
        assert out["results"][0]["samples"][0]["weights_version"] == old
        assert metrics(replica.url)["ember_weights_sync_errors_total"] >= 1
    finally:
        replica.stop()
        proxy.sock.close()
        if trainer.process.poll() is None:
            trainer.stop()


def test_a_restarted_replica_catches_up_and_a_dead_one_is_routed_around(model, trainer):
    from ember.asyncrl import ReplicaPool
    c = Client(trainer.url, api_key=KEY)
    a, b = follow(model, trainer.url), follow(model, trainer.url)
    try:
        # Killed while generating: the pool moves the call to the other replica.
        pool = ReplicaPool([a.url, b.url])
        out = {}

        def long_call():
            out["r"] = pool.call(lambda cl: cl.generate(prompt_tokens=[[1, 2, 3]] * 32, n=4, max_tokens=200, ignore_eos=True, seed=2))

        t = threading.Thread(target=long_call)
        t.start()
        deadline = time.time() + 10
        while sum(pool.in_flight) == 0 and time.time() < deadline:
            time.sleep(0.01)
        busy = pool.in_flight.index(1)
        victim = (a, b)[busy]
        time.sleep(0.2)
        victim.process.kill()
        victim.process.wait()
        t.join(60)
        assert len(out["r"]["results"]) == 32 and all(len(s["tokens"]) == 200 for x in out["r"]["results"] for s in x["samples"])
        assert pool.down_until[busy] > time.time() - 1
        # A restarted replica catches up on the steps it missed.
        step(c, seed=12)
        v = step(c, seed=13)["weights_version"]
        restarted = follow(model, trainer.url)
        try:
            assert Client(restarted.url).info()["weights_version"] == v
        finally:
            restarted.stop()
    finally:
        for s in (a, b):
            if s.process.poll() is None:
                s.stop()
