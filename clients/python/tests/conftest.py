"""Live-server fixtures: a release build of ember-server on a free port, serving a tiny random
qwen2 model written here in pure Python with the fixture tokenizer (Tests/Fixtures/tokenizers/qwen2)."""
import json
import itertools
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

from ember import Client  # noqa: E402

# EMBER_SERVER points the suite at another build (scripts/sanitize runs it against a sanitized one).
SERVER = os.environ.get("EMBER_SERVER") or os.path.join(ROOT, ".build", "release", "ember-server")


def write_safetensors(path, tensors):
    """tensors: name -> (shape, list of floats); F32 little-endian."""
    header, offset, blobs = {}, 0, []
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def tiny_model(folder, vocab=8192, hidden=32, layers=2, heads=4, kv_heads=2, inter=48, seed=3):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    hd = hidden // heads
    kv = kv_heads * hd
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": True}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))

    def w(*shape, std=0.3):
        n = 1
        for s in shape:
            n *= s
        return (shape, [rng.gauss(0, std) for _ in range(n)])

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": ((hidden,), [1.0] * hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ((hidden,), [1.0] * hidden)
        t[p + "post_attention_layernorm.weight"] = ((hidden,), [1.0] * hidden)
        for name, rows in (("q", hidden), ("k", kv), ("v", kv)):
            t[p + f"self_attn.{name}_proj.weight"] = w(rows, hidden)
            t[p + f"self_attn.{name}_proj.bias"] = ((rows,), [0.0] * rows)
        t[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    write_safetensors(os.path.join(folder, "model.safetensors"), t)
    tok = os.path.join(ROOT, "Tests", "Fixtures", "tokenizers", "qwen2")
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), folder)
    # Qwen2.5's chat template as the model ships it (the chat routes need one).
    shutil.copy(os.path.join(ROOT, "Tests", "Fixtures", "chat", "templates", "qwen2.5.jinja"),
                os.path.join(folder, "chat_template.jinja"))
    return folder


class RunningServer:
    def __init__(self, model, extra=(), env=None, prefix=(), stderr=None, log_level="warning"):
        if not os.path.exists(SERVER):
            pytest.fail(f"{SERVER} is missing: build with `swift build -c release` first")
        cmd = [*prefix, SERVER, "--model", model, "--port", "0", "--threads", "2", "--log-level", log_level,
               "--slots", "32", "--max-seq-len", "256", *extra]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        line = self.process.stdout.readline()
        m = re.search(r"listening on http://([^ |]+)", line)
        if not m:
            self.process.kill()
            pytest.fail(f"ember-server did not start: {line!r}")
        self.url = "http://" + m.group(1)
        self.banner = line

    def stop(self):
        self.process.terminate()
        return self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny_model(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    s = RunningServer(model_dir, ["--checkpoint-dir", str(tmp_path_factory.mktemp("ckpt")),
                                  "--unix-socket", str(tmp_path_factory.mktemp("sock") / "ember.sock")])
    yield s
    assert s.stop() == 0, "graceful shutdown exits 0"


@pytest.fixture()
def client(server):
    return Client(server.url)


@pytest.fixture(scope="module")
def default_server():
    """ember-server on the embedded default model (models/ember-default), one per test module."""
    s = RunningServer(os.path.join(ROOT, "models", "ember-default"))
    yield s
    assert s.stop() == 0


class Hosts:
    """Two test hosts in network namespaces on a bridge (docs/test-hosts.md's recipe); the root
    namespace joins the bridge as .254. Removed on exit, even after a failure."""

    made = itertools.count()

    def __init__(self, names=("a", "b")):
        # Unique per process and instance: a namespace's veth can outlive `ip netns del` for a
        # moment (the kernel frees it asynchronously), so a reused name could still be taken.
        tag = f"{os.getpid() % 100000}{next(Hosts.made) % 1000}"
        self.subnet = f"10.77.{os.getpid() % 200 + 20}"
        self.bridge = f"brem{tag}"[:15]
        self.hosts = {n: f"em{tag}{n}" for n in names}
        self.addresses = {n: f"{self.subnet}.{i + 1}" for i, n in enumerate(names)}

    def ip(self, *args, check=True):
        return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)

    def __enter__(self):
        if os.geteuid() != 0:
            pytest.fail("the multi-host tests make network namespaces and need root (CI runs as root)")
        try:
            self.ip("link", "add", self.bridge, "type", "bridge")
            self.ip("link", "set", self.bridge, "up")
            self.ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            for n, ns in self.hosts.items():
                self.ip("netns", "add", ns)
                veth = f"v{ns}"[:15]
                self.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self.ip("link", "set", veth, "master", self.bridge)
                self.ip("link", "set", veth, "up")
                self.ip("-n", ns, "link", "set", "lo", "up")
                self.ip("-n", ns, "link", "set", "eth0", "up")
                self.ip("-n", ns, "addr", "add", f"{self.addresses[n]}/24", "dev", "eth0")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def prefix(self, name):
        return ("ip", "netns", "exec", self.hosts[name])

    def link(self, name, up):
        self.ip("-n", self.hosts[name], "link", "set", "eth0", "up" if up else "down")

    def __exit__(self, *exc):
        for ns in self.hosts.values():
            # Whatever still runs inside (an MPI daemon cut off by a partition) goes too.
            for pid in self.ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (OSError, ValueError):
                    pass
            self.ip("netns", "del", ns, check=False)
        self.ip("link", "del", self.bridge, check=False)
