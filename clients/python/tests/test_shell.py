"""clients/sh/ember-rpc against a live server: results on stdout, errors on stderr with exit 1,
transport failures exit 2."""
import json
import os
import shutil
import subprocess


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RPC = os.path.join(ROOT, "clients", "sh", "ember-rpc")

# scripts/setup installs curl and jq: their absence is a failure, not a skip.
assert shutil.which("jq") and shutil.which("curl"), "clients/sh needs curl and jq (bash scripts/setup installs them)"


def run(server_url, *args, env=None):
    e = dict(os.environ, EMBER_URL=server_url, **(env or {}))
    return subprocess.run([RPC, *args], capture_output=True, text=True, env=e, timeout=60)


def test_call_prints_result(server):
    r = run(server.url, "server.info")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "ember"
    r = run(server.url, "tokenize", '{"text": "hello world"}')
    assert json.loads(r.stdout)["tokens"]


def test_errors_and_exit_codes(server):
    r = run(server.url, "generate", '{"prompts": ["x"], "max_tokens": "ten"}')
    assert r.returncode == 1 and json.loads(r.stderr)["data"]["path"] == "params.max_tokens"
    assert run(server.url, "tokenize", "{not json").returncode == 2
    assert run("http://127.0.0.1:9", "server.info").returncode == 2


def test_unix_socket(server):
    path = server.banner.split("unix:")[1].split(" ")[0]
    r = run("unix:" + path, "checkpoint.list")
    assert r.returncode == 0 and "names" in json.loads(r.stdout)


def test_worked_shell_rlvr_loop(tmp_path):
    """clients/sh/rlvr-loop.sh against the default model: each step samples, rewards, trains."""
    from conftest import ROOT as R, RunningServer
    s = RunningServer(os.path.join(R, "models", "ember-default"))
    try:
        r = subprocess.run([os.path.join(R, "clients", "sh", "rlvr-loop.sh"), "2"], capture_output=True, text=True,
                           env=dict(os.environ, EMBER_URL=s.url), timeout=300)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert [l.split(":")[0] for l in lines] == ["step 1", "step 2"]
        assert "weights_version 1," in lines[0] and "weights_version 2," in lines[1]
        # The same loop training a LoRA adapter: the adapter's version rises, the base's does not.
        r = subprocess.run([os.path.join(R, "clients", "sh", "rlvr-loop.sh"), "2"], capture_output=True, text=True,
                           env=dict(os.environ, EMBER_URL=s.url, EMBER_ADAPTER="shell-lora", EMBER_LORA_RANK="4"), timeout=300)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert "weights_version 1," in lines[0] and "weights_version 2," in lines[1], lines
        from ember import Client
        c = Client(s.url)
        assert c.info()["weights_version"] == 2, "only the first loop moved the base"
        assert [a["weights_version"] for a in c.list_adapters()] == [2]
    finally:
        assert s.stop() == 0
