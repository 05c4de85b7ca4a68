"""The typed client against a live server."""
import os
import threading
import time

import pytest

from conftest import RunningServer
from ember import Client, EmberError, TransportError


def test_info_and_tokenizer_round_trip(client):
    info = client.info()
    assert info["name"] == "ember" and info["model"]["model_type"] == "qwen2"
    assert "cancel" in info["capabilities"] and "train_step" in info["capabilities"]
    ids = client.tokenize(text="def f(x): return x + 1")
    assert all(isinstance(i, int) for i in ids)
    assert client.detokenize(tokens=ids) == "def f(x): return x + 1"
    assert client.tokenize(texts=["a", "b c"]) == [client.tokenize(text="a"), client.tokenize(text="b c")]


def test_generate_is_seeded_and_agrees_with_logprob(client):
    kw = dict(prompts=["import os", "x = 1"], n=3, max_tokens=8, temperature=0.9, seed=11, entropy=True,
              proxy={"min_p": 0.05}, top_logprobs=2)
    a, b = client.generate(**kw), client.generate(**kw)
    assert [s["tokens"] for r in a["results"] for s in r["samples"]] == [s["tokens"] for r in b["results"] for s in r["samples"]]
    r0 = a["results"][0]
    s0 = r0["samples"][0]
    assert len(s0["logprobs"]) == len(s0["tokens"]) == len(s0["entropies"]) == len(s0["proxy_logprobs"]) == len(s0["top_logprobs"])
    scored = client.logprob([{"tokens": r0["prompt_tokens"] + s0["tokens"], "response_start": len(r0["prompt_tokens"])}],
                            temperature=0.9)
    assert scored["results"][0]["logprobs"] == s0["logprobs"], "sampler and scorer agree bit for bit"


def test_train_step_dry_run_and_versions(client):
    v0 = client.info()["weights_version"]
    batch = [{"tokens": [1, 2, 3, 4, 5], "response_start": 2, "advantage": 1.0}]
    dry = client.train_step(loss={"mode": "lp_reg"}, batch=batch, dry_run=True)
    assert dry["weights_version"] == v0 and dry["metrics"]["grad_norm"] > 0
    step = client.train_step(loss={"mode": "ppo"}, batch=batch, optimizer={"lr": 1e-4})
    assert step["weights_version"] == v0 + 1


def test_errors_are_exceptions_with_kind_and_path(client):
    with pytest.raises(EmberError) as e:
        client.generate(prompts=["x"], max_tokens=10_000)
    assert e.value.kind == "context_overflow" and e.value.code == -32001
    with pytest.raises(EmberError) as e:
        client.call("logprob", {"sequences": [{"tokens": [1, 2], "response_start": 0}]})
    assert e.value.code == -32602 and e.value.path == "params.sequences[0].response_start" and e.value.hint
    with pytest.raises(EmberError) as e:
        client.call("no.such.method")
    assert e.value.kind == "method_not_found"


def test_batch_and_notification(client):
    out = client.batch([("server.info", None), ("nope", None), ("tokenize", {"text": "hi"})])
    assert out[0]["name"] == "ember" and isinstance(out[1], EmberError) and isinstance(out[2], dict)
    client.notify("server.info")  # answered 204, nothing raised


def test_cancel_from_another_thread(client, server):
    result = {}

    def run():
        try:
            Client(server.url).generate(prompt_tokens=[[1, 2]], max_tokens=240, n=4, ignore_eos=True, id="long-gen")
            result["outcome"] = "finished"
        except EmberError as e:
            result["outcome"] = e.kind

    t = threading.Thread(target=run)
    t.start()
    cancelled = 0
    deadline = time.time() + 10
    while cancelled == 0 and time.time() < deadline and t.is_alive():
        cancelled = client.cancel("long-gen")
        time.sleep(0.001)
    t.join()
    # Either the cancel landed (the usual case) or the generation had already finished.
    assert result["outcome"] == ("cancelled" if cancelled else "finished")


def test_unix_socket_url(server):
    path = server.banner.split("unix:")[1].split(" ")[0]
    assert Client("unix://" + path).info()["name"] == "ember"


def test_unreachable_server_raises_transport_error():
    c = Client("http://127.0.0.1:9", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(TransportError):
        c.info()


def test_api_key_and_read_only(model_dir):
    from conftest import RunningServer
    s = RunningServer(model_dir, ["--api-key", "k3y", "--read-only"])
    try:
        with pytest.raises(EmberError) as e:
            Client(s.url, api_key="").info()
        assert e.value.kind == "unauthorized"
        c = Client(s.url, api_key="k3y")
        assert c.info()["name"] == "ember"
        assert c.healthy()
        with pytest.raises(EmberError) as e:
            c.train_step(loss={"mode": "ppo"}, batch=[{"tokens": [1, 2, 3], "response_start": 1, "advantage": 1.0}])
        assert e.value.kind == "read_only"
    finally:
        assert s.stop() == 0


def test_checkpoints_round_trip(client):
    v = client.info()["weights_version"]
    client.save_checkpoint("pytest-ckpt")
    assert "pytest-ckpt" in client.list_checkpoints()
    client.train_step(loss={"mode": "ppo"}, batch=[{"tokens": [5, 6, 7], "response_start": 1, "advantage": 1.0}],
                      optimizer={"lr": 1e-3})
    assert client.load_checkpoint("pytest-ckpt")["weights_version"] == v
    with pytest.raises(EmberError) as e:
        client.load_checkpoint("../etc")
    assert e.value.path == "params.name"


def test_metrics(client):
    before = client.metrics().get('ember_rpc_requests_total{method="server.info"}', 0)
    info = client.info()
    m = client.metrics()
    assert m["ember_weights_version"] == info["weights_version"]
    assert m['ember_rpc_requests_total{method="server.info"}'] == before + 1


def test_openai_sdk(server):
    import openai  # a test dependency: missing means failing, not skipping
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model = c.models.list().data[0].id
    r = c.completions.create(model=model, prompt="def f(x):", max_tokens=6, seed=3, logprobs=1)
    assert r.usage.completion_tokens == 6 and len(r.choices[0].logprobs.token_logprobs) == 6
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=model, prompt="def f(x):", max_tokens=6,
                                                                           seed=3, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_openai_penalties_best_of_and_user(model_dir, tmp_path):
    """presence/frequency penalties and logit_bias act on the draw (greedy paths change; a -100
    bias bans a token), best_of returns the samples with the highest cumulative log-probability of
    those the same seed draws with n = best_of, and `user` reaches the request log."""
    import openai
    log = open(tmp_path / "server.log", "w+")
    s = RunningServer(model_dir, stderr=log, log_level="info")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        model = c.models.list().data[0].id
        greedy = dict(model=model, prompt="def f(x):", max_tokens=16, temperature=0, logprobs=0)
        plain = c.completions.create(**greedy).choices[0]
        penalized = c.completions.create(**greedy, presence_penalty=2.0, frequency_penalty=2.0).choices[0]
        assert penalized.text != plain.text
        first = Client(s.url).tokenize(text=plain.logprobs.tokens[0], add_special_tokens=False)[0]
        banned = c.completions.create(**greedy, logit_bias={str(first): -100}).choices[0]
        assert banned.logprobs.tokens[0] != plain.logprobs.tokens[0]

        drawn = c.completions.create(model=model, prompt="x = ", max_tokens=8, n=4, seed=11, logprobs=0)
        best = c.completions.create(model=model, prompt="x = ", max_tokens=8, n=2, best_of=4, seed=11, logprobs=0)
        ranked = sorted(drawn.choices, key=lambda ch: (-sum(ch.logprobs.token_logprobs), ch.index))
        assert [ch.text for ch in best.choices] == [ch.text for ch in ranked[:2]]
        assert best.usage.completion_tokens == drawn.usage.completion_tokens, "every drawn token is counted"
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=model, prompt="x", max_tokens=2, n=1, best_of=2, stream=True)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=model, prompt="x", max_tokens=2, presence_penalty=3)
        c.completions.create(model=model, prompt="x", max_tokens=2, user="evaluator-7")
    finally:
        assert s.stop() == 0
    log.seek(0)
    assert "evaluator-7" in log.read()


def test_openblas_kernel_set_is_reported_and_never_an_old_one_on_an_avx2_cpu(model_dir):
    """server.info names the kernel sets; where OpenBLAS falls back to a pre-AVX2 set on a CPU
    with AVX2 and FMA, the server restarts itself with the Haswell set; a user's own
    OPENBLAS_CORETYPE stands."""
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    s = RunningServer(model_dir)
    try:
        kernels = Client(s.url).info()["kernels"]
        assert kernels["set"] == ("avx512" if "avx512f" in flags else "avx2"), kernels
        assert kernels["set"] in kernels["supported"] and kernels["backward_gemm"] == "ember", kernels
        if "avx2" in flags and "fma" in flags:
            assert kernels["blas"].split()[-1] in {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"}, kernels
    finally:
        assert s.stop() == 0
    s = RunningServer(model_dir, env={**os.environ, "OPENBLAS_CORETYPE": "Prescott"})
    try:
        assert Client(s.url).info()["kernels"]["blas"] == "OpenBLAS Prescott"
    finally:
        assert s.stop() == 0


def test_kernel_set_is_chosen_from_the_environment_and_a_bad_one_refused(model_dir):
    """EMBER_KERNELS=avx2 runs the narrower set on any CPU that has it; an unknown set stops
    the server at start-up with the variable and the choices named."""
    import subprocess
    from conftest import SERVER
    s = RunningServer(model_dir, env={**os.environ, "EMBER_KERNELS": "avx2"})
    try:
        assert Client(s.url).info()["kernels"]["set"] == "avx2"
    finally:
        assert s.stop() == 0
    r = subprocess.run([SERVER, "--model", model_dir, "--port", "0"], env={**os.environ, "EMBER_KERNELS": "sse9"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "EMBER_KERNELS=sse9: unknown kernel set (use one of: avx2, avx512)" in r.stderr, r.stderr


def test_loss_mask_per_sequence(client):
    """A masked response token is context only; a bad mask answers with its path."""
    from ember import EmberError
    item = {"tokens": [5, 6, 7, 8, 9], "response_start": 2, "advantage": 1.0}
    full = client.train_step(loss={"mode": "ppo"}, batch=[item], dry_run=True)["metrics"]
    masked = client.train_step(loss={"mode": "ppo"}, batch=[dict(item, loss_mask=[1, 0, 1])], dry_run=True)["metrics"]
    assert full["tokens"] == 3 and masked["tokens"] == 2
    try:
        client.train_step(loss={"mode": "ppo"}, batch=[dict(item, loss_mask=[1, 2, 1])], dry_run=True)
        raise AssertionError("a mask value of 2 must be refused")
    except EmberError as e:
        assert e.kind == "invalid_params" and e.path == "params.batch[0].loss_mask[1]", e


def test_bf16_weights_sample_score_and_train_consistently(model_dir):
    """--weights-dtype bf16: server.info says so; the sampler and the scorer agree bit for bit on
    the rounded weights before and after a train_step; the log-probs differ from float32's; a
    read-only bf16 server serves the same log-probs; a bad dtype is refused at start-up."""
    import subprocess
    from conftest import SERVER
    seq = [{"tokens": [5, 9, 2, 7, 1, 3], "response_start": 2}]
    f32 = RunningServer(model_dir)
    try:
        lp32 = Client(f32.url).logprob(seq)["results"][0]["logprobs"]
    finally:
        assert f32.stop() == 0
    s = RunningServer(model_dir, extra=["--weights-dtype", "bf16"])
    try:
        c = Client(s.url)
        assert c.info()["weights_dtype"] == "bf16"
        lp = c.logprob(seq)["results"][0]["logprobs"]
        assert lp != lp32 and max(abs(a - b) for a, b in zip(lp, lp32)) < 0.05
        for _ in range(2):
            g = c.generate(prompt_tokens=[[5, 9]], max_tokens=6, temperature=1.0, seed=3)
            smp = g["results"][0]["samples"][0]
            scored = c.logprob([{"tokens": [5, 9] + smp["tokens"], "response_start": 2}])
            assert scored["results"][0]["logprobs"] == smp["logprobs"], "bf16: sampler and scorer agree bit for bit"
            step = c.train_step(loss={"mode": "ppo"}, batch=[{"tokens": [5, 9] + smp["tokens"], "response_start": 2,
                                                             "advantage": 1.0}], optimizer={"lr": 1e-2})
            assert step["metrics"]["grad_norm"] > 0
        assert c.logprob(seq)["results"][0]["logprobs"] != lp, "the step moved the bf16 weights"
    finally:
        assert s.stop() == 0
    ro = RunningServer(model_dir, extra=["--weights-dtype", "bf16", "--read-only"])
    try:
        assert Client(ro.url).logprob(seq)["results"][0]["logprobs"] == lp
    finally:
        assert ro.stop() == 0
    r = subprocess.run([SERVER, "--model", model_dir, "--port", "0", "--weights-dtype", "fp8"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--weights-dtype: f32 or bf16, not 'fp8'" in r.stderr, r.stderr
