"""The embedded default model: it loads with its own tokenizer, reaches the base accuracy stated in
models/ember-default/training.json on the same held-out problems (greedy, so exactly), and a
short Lp-Reg run from it through the real server completes with finite metrics."""
import json
import math
import os

import pytest

from conftest import ROOT
from ember import Client, rl, tasks

MODEL = os.path.join(ROOT, "models", "ember-default")


def test_default_model_reaches_its_stated_base_accuracy(default_server):
    stated = json.load(open(os.path.join(MODEL, "training.json")))
    c = Client(default_server.url)
    info = c.info()
    assert info["model"]["model_type"] == "qwen2" and info["model"]["parameters"] <= 10_000_000
    assert os.path.getsize(os.path.join(MODEL, "model.safetensors")) <= 25 << 20
    size = stated["args"]["eval_size"]
    for name, want in stated["heldout_greedy_pass@1"].items():
        task = tasks.get(name)
        # The script's own evaluation (ember.rl's, greedy; multi-turn problems as episodes).
        got = rl.evaluate(c, tasks.sample(task, "heldout", size, 1000), 128, k=1, seed=0)["pass@1"]
        assert got == pytest.approx(want, abs=1e-9), name
        assert want <= 0.7, f"{name}: the base model leaves room for RL"
        if not tasks.is_multiturn(task):
            assert want >= 0.05, f"{name}: the base model can already solve some problems"


def test_short_lp_reg_run_from_the_default_model(default_server, tmp_path):
    out = str(tmp_path / "run")
    assert rl.main(["--server", default_server.url, "--task", "arithmetic", "--steps", "2", "--prompts", "8",
                    "--samples", "4", "--max-tokens", "64", "--eval-every", "2", "--eval-size", "16", "--eval-k", "4",
                    "--probes", "8", "--out", out]) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert metrics[1]["weights_version"] > metrics[0]["weights_version"]
    assert all(math.isfinite(m[k]) for m in metrics for k in ("reward", "entropy", "loss", "grad_norm"))
    evals = [json.loads(l) for l in open(os.path.join(out, "eval.jsonl"))]
    assert 0 < evals[0]["spark_prob"] < 1, "spark-token probability is measured on held-out probes"


def test_server_without_model_serves_the_embedded_default(tmp_path):
    import subprocess
    from conftest import SERVER
    p = subprocess.Popen([SERVER, "--port", "0", "--log-level", "warning"], stdout=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        banner = p.stdout.readline()
        assert "'ember-default'" in banner and "qwen2" in banner, banner
    finally:
        p.terminate()
        assert p.wait(timeout=30) == 0
