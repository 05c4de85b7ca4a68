"""The Swift CLI `ember` (libcurl) against a live server: JSON on stdout, clear errors, exit codes
(0 ok, 1 error answer, 3 unreachable, 64 usage)."""
import json
import os
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EMBER = os.path.join(ROOT, ".build", "release", "ember")


def ember(*args, env=None):
    if not os.path.exists(EMBER):
        pytest.fail(f"{EMBER} is missing: swift build -c release")
    return subprocess.run([EMBER, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {})))


def test_info_generate_logprob(server):
    r = ember("info", "--url", server.url)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "ember"
    r = ember("generate", "--url", server.url, "--prompt", "def f(x):", "-n", "2", "--max-tokens", "4", "--seed", "1")
    samples = json.loads(r.stdout)["results"][0]["samples"]
    assert len(samples) == 2 and all(len(s["tokens"]) == 4 for s in samples)
    r2 = ember("generate", "--url", server.url, "--prompt", "def f(x):", "-n", "2", "--max-tokens", "4", "--seed", "1", "--text")
    assert r2.stdout.splitlines() == [s["text"] for s in samples]
    r = ember("logprob", "--json", '{"sequences": [{"tokens": [1, 2, 3], "response_start": 1}]}', env={"EMBER_URL": server.url})
    assert len(json.loads(r.stdout)["results"][0]["logprobs"]) == 2


def test_train_step_and_checkpoints(server, tmp_path):
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"batch": [{"tokens": [1, 2, 3, 4], "response_start": 1, "advantage": 1.0}]}))
    r = ember("train-step", "--url", server.url, "--json", f"@{batch}", "--loss", "ppo", "--dry-run")
    assert r.returncode == 0 and "grad_norm" in json.loads(r.stdout)["metrics"]
    assert ember("checkpoint", "save", "cli-test", "--url", server.url).returncode == 0
    assert "cli-test" in json.loads(ember("checkpoint", "list", "--url", server.url).stdout)["names"]


def test_errors_and_exit_codes(server):
    r = ember("call", "generate", '{"prompts": ["x"], "max_tokens": "ten"}', "--url", server.url)
    assert r.returncode == 1 and "params.max_tokens" in r.stderr
    r = ember("info", "--url", "http://127.0.0.1:9")
    assert r.returncode == 3 and "cannot reach" in r.stderr
    assert ember("checkpoint", "bogus", "--url", server.url).returncode == 64
