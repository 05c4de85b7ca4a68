"""LoRA through the live server: the RL loop trains an adapter end to end with the base frozen,
the OpenAI routes list adapters and sample under one by its name, and the three calls a user
needs (create, train_step with adapter, save) work from the client."""
import json
import math
import os
import urllib.request

from ember import Client, EmberError, rl


def test_rl_loop_trains_an_adapter_and_leaves_the_base(server, tmp_path):
    client = Client(server.url)
    base_version = client.info()["weights_version"]
    out = str(tmp_path / "lora")
    args = ["--server", server.url, "--task", "arithmetic", "--steps", "3", "--prompts", "4", "--samples", "4",
            "--max-tokens", "10", "--eval-every", "3", "--eval-size", "4", "--eval-k", "1", "--probes", "2", "--out", out,
            "--method", "lp_reg", "--lora-rank", "4", "--lora-name", "rl-lora", "--lr", "1e-3",
            "--entropy-coef", "0.01"]   # a gradient even when every reward is 0 (a random model)
    assert rl.main(args) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["weights_version"] for m in metrics] == [1, 2, 3], "the adapter's own version"
    for m in metrics:
        assert m["logprob_max_abs_diff"] == 0.0, "sampler and trainer agree exactly under the adapter"
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert client.info()["weights_version"] == base_version, "the base model did not move"
    seq = [{"tokens": [5, 6, 7, 8, 9], "response_start": 1}]
    assert client.logprob(seq, adapter="rl-lora")["results"] != client.logprob(seq)["results"], "the adapter trained"
    adapter = next(a for a in client.list_adapters() if a["name"] == "rl-lora")
    assert adapter["weights_version"] == 3 and adapter["rank"] == 4 and adapter["alpha"] == 8
    evals = [json.loads(l) for l in open(os.path.join(out, "eval.jsonl"))]
    assert [e["weights_version"] for e in evals] == [0, 3]
    saved = client.save_adapter("rl-lora")["path"]
    assert os.path.exists(os.path.join(saved, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(saved, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["all-linear"]
    client.delete_adapter("rl-lora")


def test_openai_routes_serve_adapters_by_model_name(server):
    client = Client(server.url)
    client.create_adapter("tenant-a", rank=2, seed=5)
    try:
        with urllib.request.urlopen(server.url + "/v1/models") as r:
            models = json.load(r)["data"]
        ids = [m["id"] for m in models]
        assert "tenant-a" in ids and next(m for m in models if m["id"] == "tenant-a")["parent"] == ids[0]
        body = json.dumps({"model": "tenant-a", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            answer = json.load(r)
        assert answer["model"] == "tenant-a" and len(answer["choices"]) == 1
        # A fresh adapter is the base model: greedy text is the same.
        base = json.loads(body)
        base["model"] = ids[0]
        req = urllib.request.Request(server.url + "/v1/completions", json.dumps(base).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            assert json.load(r)["choices"][0]["text"] == answer["choices"][0]["text"]
    finally:
        client.delete_adapter("tenant-a")
    try:
        client.generate(prompt_tokens=[[1, 2]], max_tokens=2, adapter="tenant-a")
        raise AssertionError("a deleted adapter must be refused")
    except EmberError as e:
        assert e.kind == "unknown_adapter" and e.data.get("path") == "params.adapter"
