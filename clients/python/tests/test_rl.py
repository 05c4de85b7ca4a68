"""A short RLVR run through the real server: finite metrics, increasing weights versions, plots,
summary, and resume."""
import json
import math
import os

from ember import rl


def test_rl_smoke_run_and_resume(server, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--server", server.url, "--task", "arithmetic,countdown", "--steps", "3", "--prompts", "4", "--samples", "4",
            "--max-tokens", "12", "--eval-every", "2", "--eval-size", "8", "--eval-k", "2", "--probes", "4", "--out", out,
            "--checkpoint-every", "2", "--method", "lp_reg", "--loss-options", '{"rho": 0.5}']
    assert rl.main(args) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    versions = [m["weights_version"] for m in metrics]
    assert versions == sorted(versions) and len(set(versions)) == 3, versions
    for m in metrics:
        for k in ("reward", "entropy", "loss", "grad_norm"):
            assert math.isfinite(m[k]), (k, m)
        assert m["logprob_max_abs_diff"] == 0.0, "sampler and trainer agree exactly on-policy"
        assert m["step_seconds"] >= m["train_seconds"] > 0
        assert 0 <= m["proxy_noise_mass"] <= 1 and (m["low_prob_proxy_kept"] is None or 0 <= m["low_prob_proxy_kept"] <= 1)
        assert sum(m["lp_reg_probability_buckets"]) == m["lp_reg_regularized"] == sum(m["lp_reg_tokens"].values())
    assert metrics[0]["task"] == "arithmetic" and metrics[1]["task"] == "countdown"
    evals = [json.loads(l) for l in open(os.path.join(out, "eval.jsonl"))]
    assert [e["step"] for e in evals] == [0, 2, 3] and all("pass@2" in e for e in evals)
    assert all(0 <= e["mean@2"] <= e["pass@2"] for e in evals), "a problem counts for pass@k if any sample is right"
    for name in ("reward", "accuracy", "entropy", "lp_reg"):
        assert os.path.getsize(os.path.join(out, "plots", name + ".png")) > 1000
    assert "held-out pass@1: before" in capsys.readouterr().out
    # Resume from the step-2 checkpoint state... the last state is step 3; extend to 4 steps.
    args[args.index("--steps") + 1] = "4"
    assert rl.main(args + ["--resume"]) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[3]["weights_version"] > metrics[2]["weights_version"]


def test_mini_batches_take_one_optimizer_step_each(server, tmp_path):
    out = str(tmp_path / "mb")
    from ember import Client
    v0 = Client(server.url).info()["weights_version"]
    args = ["--server", server.url, "--task", "arithmetic", "--steps", "2", "--prompts", "4", "--samples", "2",
            "--max-tokens", "8", "--eval-every", "10", "--eval-size", "4", "--eval-k", "1", "--probes", "2", "--out", out,
            "--method", "clip_higher", "--mini-batches", "2"]
    assert rl.main(args) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["weights_version"] for m in metrics] == [v0 + 2, v0 + 4], "two optimizer steps per batch"
