"""Data-parallel training under mpirun (Open MPI): one logical trainer over R ranks.

- The weights and the step metrics are bit-identical for R = 1, 2, 3 and 4 (the weights compared
  tensor by tensor through the SHA-256 digests of /v1/weights/manifest), and across a checkpoint
  saved under one R and resumed under another.
- With one micro-batch per mini-batch the ranks' path and a server started without mpirun agree too.
- A rank that dies or hangs fails the step with `degraded` (no rank applies it), /healthz turns
  503, sampling and checkpoint.save still work, and a restarted job resumes from the checkpoint.
- Ranks on separate hosts (network namespaces, mpirun's rsh agent entering them) give the same bits.
"""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import ROOT, Client, Hosts, RunningServer, tiny_model
from ember import EmberError

MPIRUN = shutil.which("mpirun")
RSH_AGENT = os.path.join(ROOT, "scripts", "netns-rsh")

ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       # The exchange in segments of 1,000 floats: the tiny model's gradient crosses in ~30 of
       # them, so the pipelined path (segment s+1 arriving while s is added) runs.
       "EMBER_DP_SEGMENT_FLOATS": "1000",
       # Ranks on one machine talk through shared memory and loopback TCP only.
       "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}


def mpirun_prefix(ranks, extra=()):
    assert MPIRUN, "mpirun is missing: scripts/setup installs Open MPI"
    return [MPIRUN, "--enable-recovery", "--oversubscribe", "-n", str(ranks), *extra]


@pytest.fixture(scope="module")
def dp_model(tmp_path_factory):
    return tiny_model(str(tmp_path_factory.mktemp("dp-model")), vocab=512, hidden=32, layers=2, seed=11)


def batch(seed, n=11):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt = [rng.randrange(1, 500) for _ in range(rng.randrange(3, 9))]
        response = [rng.randrange(1, 500) for _ in range(rng.randrange(4, 21))]
        items.append({"tokens": prompt + response, "response_start": len(prompt),
                      "advantage": rng.choice([-1.0, -0.5, 0.5, 1.0])})
    return items


STEPS = [
    dict(loss={"mode": "ppo"}, mini_batches=2, seed=1),
    dict(loss={"mode": "lp_reg", "rho": 0.2}, seed=2),
    dict(loss={"mode": "ppo", "eps_high": 0.28}, micro_batch_tokens=60, seed=3),
    dict(loss={"mode": "gspo", "agg": "seq-mean-token-mean", "kl_coef": 0.05}, seed=4),
]


def run_step(client, spec):
    s = dict(spec)
    seed = s.pop("seed")
    return client.train_step(batch=batch(seed), **s)["metrics"]


def digests(client):
    status, body = client.request("GET", "/v1/weights/manifest")
    assert status == 200, body
    m = json.loads(body)
    return m["weights_version"], {t["name"]: t["sha256"] for t in m["tensors"]}


def exact(metrics):
    return {k: metrics[k] for k in ("loss", "pg_loss", "entropy", "grad_norm", "tokens", "ppo_kl", "kl_ref", "lp_reg_regularized")}


def start(model, ranks, ckpt, extra=(), mpi=(), env=ENV):
    prefix = mpirun_prefix(ranks, mpi) if ranks else ()
    return RunningServer(model, ["--threads", "1", "--checkpoint-dir", ckpt, *extra], env=env, prefix=prefix)


@contextlib.contextmanager
def serving(model, ranks, ckpt, extra=()):
    """A trainer of `ranks` ranks (0: no mpirun) and a client; stopped on the way out."""
    s = start(model, ranks, ckpt, extra)
    try:
        yield Client(s.url)
    finally:
        s.stop()


def trajectory(model, ranks, ckpt, extra=(), steps=range(len(STEPS))):
    """Runs the steps on a fresh trainer; returns the per-step metrics and final digests."""
    with serving(model, ranks, ckpt, extra) as c:
        assert c.info()["world_size"] == (ranks or 1)
        c.configure_optimizer(lr=3e-3)
        out = []
        for i in steps:
            if i == 3:
                c.snapshot_reference()
            out.append(exact(run_step(c, STEPS[i])))
            if i == 1:
                c.save_checkpoint(f"after2-r{ranks}")
        return out, digests(c)


def test_bit_identical_for_one_to_four_ranks_and_across_resume(dp_model, tmp_path):
    ckpt = str(tmp_path)
    runs = {r: trajectory(dp_model, r, ckpt) for r in (1, 2, 3, 4)}
    metrics1, (version1, weights1) = runs[1]
    assert version1 == 5  # mini_batches=2 took two optimizer steps
    for r in (2, 3, 4):
        metrics, (version, weights) = runs[r]
        assert metrics == metrics1, f"R={r} metrics differ from R=1"
        assert version == version1
        differing = [n for n in weights1 if weights[n] != weights1[n]]
        assert not differing, f"R={r}: tensors differ from R=1: {differing[:5]}"
    # The steps changed the weights (a test that cannot fail proves nothing).
    with serving(dp_model, 0, ckpt) as c:
        assert digests(c)[1] != weights1
    # Saved under R = 2, resumed under R = 3: the last two steps give the same bits.
    with serving(dp_model, 3, ckpt) as c:
        c.load_checkpoint("after2-r2")
        resumed = []
        for i, spec in enumerate(STEPS[2:]):
            if i == 1:
                c.snapshot_reference()
            resumed.append(exact(run_step(c, spec)))
        assert resumed == metrics1[2:]
        assert digests(c) == (version1, weights1)


def test_one_micro_batch_matches_the_single_process_server(dp_model, tmp_path):
    # Without micro_batch_tokens (which a single process chains and the ranks sum over the tree).
    steps = (0, 1, 3)
    alone = trajectory(dp_model, 0, str(tmp_path), steps=steps)
    ranks = trajectory(dp_model, 2, str(tmp_path), extra=("--dp-micro-batches", "1"), steps=steps)
    assert ranks == alone


def test_bf16_weights_are_the_same_for_one_and_three_ranks(dp_model, tmp_path):
    """--weights-dtype bf16: every rank keeps the float32 master and the same bf16 rounding."""
    one = trajectory(dp_model, 1, str(tmp_path), extra=("--weights-dtype", "bf16"), steps=(0, 1))
    three = trajectory(dp_model, 3, str(tmp_path), extra=("--weights-dtype", "bf16"), steps=(0, 1))
    assert one == three
    assert one != trajectory(dp_model, 1, str(tmp_path), steps=(0, 1)), "bf16 storage changes the steps"


def rank_pids(mpirun_pid):
    """The ranks' PIDs by rank (mpirun's children carry OMPI_COMM_WORLD_RANK)."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(mpirun_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for e in env:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=")[1])] = int(pid)
    return out


def long_batch():
    """About 7 s of training for three ranks of the tiny model on this machine's two cores."""
    rng = random.Random(1)
    return [{"tokens": [rng.randrange(1, 500) for _ in range(120)], "response_start": 8,
             "advantage": rng.choice([-1.0, 1.0])} for _ in range(2000)]


def injure_and_step(c, victim, fault):
    """Kills or stops the victim rank before a step, or kills it while every rank is inside a
    long one; returns the step's error."""
    if fault != "kill-mid-step":
        os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        with pytest.raises(EmberError) as e:
            run_step(c, STEPS[1])
        return e.value
    outcome = {}

    def step():
        try:
            outcome["metrics"] = c.train_step(batch=long_batch(), loss={"mode": "ppo"})
        except EmberError as err:
            outcome["error"] = err
    th = threading.Thread(target=step)
    th.start()
    time.sleep(1.5)
    os.kill(victim, signal.SIGKILL)
    th.join(timeout=60)
    assert "error" in outcome, f"the step finished before the kill: {outcome}"
    return outcome["error"]


@pytest.mark.parametrize("fault", ["kill", "hang", "kill-mid-step"])
def test_a_dead_or_hung_rank_fails_the_step_cleanly(dp_model, tmp_path, fault):
    ckpt = str(tmp_path)
    s = start(dp_model, 3, ckpt, extra=("--dp-timeout", "3"))
    victim = None
    try:
        c = Client(s.url, retries=0)
        c.configure_optimizer(lr=3e-3)
        run_step(c, STEPS[0])
        c.save_checkpoint("good")
        before = digests(c)
        pids = rank_pids(s.process.pid)
        assert sorted(pids) == [0, 1, 2], pids
        victim = pids[2]
        t0 = time.time()
        error = injure_and_step(c, victim, fault)
        took = time.time() - t0
        assert error.kind == "degraded", error.data
        assert "rank 2" in error.hint and "restart" in error.hint
        assert took < 30, f"the failure took {took:.1f} s to surface (timeout 3 s)"
        # No rank applied it: rank 0's weights are those of before the step.
        assert digests(c) == before
        status, body = c.request("GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "degraded"
        assert c.info()["data_parallel"]["degraded"]
        # Still samples and saves; trains no more.
        assert c.generate(prompt_tokens=[[1, 2, 3]], max_tokens=4, temperature=0)["results"]
        c.save_checkpoint("after-fault")
        with pytest.raises(EmberError) as e:
            run_step(c, STEPS[1])
        assert e.value.data["kind"] == "degraded"
    finally:
        if victim and fault == "hang":
            os.kill(victim, signal.SIGKILL)
        s.process.kill()
        s.process.wait(timeout=30)
    # The restarted job resumes from the checkpoint and lands where an uninterrupted run does.
    with serving(dp_model, 2, ckpt) as c:
        c.load_checkpoint("after-fault")
        assert digests(c) == before
        resumed = run_step(c, STEPS[1])
        after = digests(c)
    with serving(dp_model, 1, ckpt) as c:
        c.load_checkpoint("good")
        assert exact(run_step(c, STEPS[1])) == exact(resumed)
        assert digests(c) == after


@pytest.mark.parametrize("fault", ["partition", "kill"])
def test_ranks_on_separate_hosts_give_the_same_bits_and_a_lost_host_degrades(dp_model, tmp_path, fault):
    """Three namespace hosts; mpirun (root namespace, on the bridge) starts one rank on each
    through scripts/netns-rsh, the ranks talk TCP across the bridge. Then host c drops off the
    network, or its rank is killed (its TCP peers see the connection reset)."""
    ckpt = str(tmp_path)
    reference = trajectory(dp_model, 1, ckpt, steps=(0, 1))
    with Hosts(("a", "b", "c")) as hosts:
        names = ",".join(hosts.hosts[n] for n in ("a", "b", "c"))
        mpi = ("--mca", "plm_rsh_agent", RSH_AGENT, "--host", names, "--mca", "btl", "tcp,self",
               "--mca", "btl_tcp_if_include", f"{hosts.subnet}.0/24", "--mca", "oob_tcp_if_include", f"{hosts.subnet}.0/24")
        env = {k: v for k, v in ENV.items() if not k.startswith("OMPI_MCA_")}
        s = start(dp_model, 3, ckpt, extra=("--host", hosts.addresses["a"], "--dp-timeout", "4"), mpi=mpi, env=env)
        try:
            assert s.url.startswith(f"http://{hosts.addresses['a']}:")
            c = Client(s.url, retries=0)
            assert c.info()["world_size"] == 3
            c.configure_optimizer(lr=3e-3)
            got = [exact(run_step(c, STEPS[i])) for i in (0, 1)]
            assert (got, digests(c)) == reference
            # Host c is lost: the next step fails cleanly, nothing applied.
            if fault == "partition":
                hosts.link("c", False)
            else:
                pids = hosts.ip("netns", "pids", hosts.hosts["c"]).stdout.split()
                ranks = [p for p in pids if open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].endswith(b"ember-server")]
                assert len(ranks) == 1, ranks
                os.kill(int(ranks[0]), signal.SIGKILL)
            with pytest.raises(EmberError) as e:
                run_step(c, STEPS[2])
            assert e.value.kind == "degraded" and "rank 2" in e.value.hint
            assert digests(c) == reference[1]
        finally:
            s.process.kill()
            s.process.wait(timeout=30)


def test_the_rl_loop_on_a_data_parallel_trainer(tmp_path):
    """python -m ember.rl --start-server --trainer-ranks R: rollouts from generate, resolved on
    rank 0, trained on R ranks; two and three ranks take the same steps."""
    from ember import rl
    runs = {}
    for ranks in (2, 3):
        out = str(tmp_path / f"r{ranks}")
        args = ["--start-server", "--trainer-ranks", str(ranks), "--task", "arithmetic", "--steps", "2", "--prompts", "4",
                "--samples", "4", "--max-tokens", "12", "--eval-every", "10", "--eval-size", "4", "--eval-k", "1",
                "--probes", "2", "--out", out, "--method", "lp_reg", "--threads", "2", "--mpirun-args=--oversubscribe"]
        assert rl.main(args) == 0
        runs[ranks] = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    keys = ("reward", "loss", "grad_norm", "entropy", "weights_version", "lp_reg_regularized")
    assert [{k: m[k] for k in keys} for m in runs[2]] == [{k: m[k] for k in keys} for m in runs[3]]
    assert [m["weights_version"] for m in runs[2]] == [1, 2]


def test_stop_ends_every_rank_and_a_lost_rank_0_ends_the_job(dp_model, tmp_path):
    # SIGTERM to rank 0: it answers what is in flight, tells the ranks to leave, all exit 0.
    s = start(dp_model, 3, str(tmp_path))
    pids = rank_pids(s.process.pid)
    os.kill(pids[0], signal.SIGTERM)
    assert s.process.wait(timeout=30) == 0
    # Rank 0 killed: the other ranks find it silent and leave, so the job ends instead of hanging.
    s = start(dp_model, 3, str(tmp_path), extra=("--dp-timeout", "2"))
    pids = rank_pids(s.process.pid)
    os.kill(pids[0], signal.SIGKILL)
    s.process.wait(timeout=30)
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_adapters_train_on_rank_0_beside_the_ranks(dp_model, tmp_path):
    """A LoRA adapter trains on rank 0 alone (the base weights, which the ranks share, stay put);
    the base still trains on every rank afterwards."""
    with serving(dp_model, 2, str(tmp_path)) as c:
        base = digests(c)
        c.create_adapter("a", rank=4, seed=1)
        r = c.train_step(batch=batch(5), loss={"mode": "ppo"}, adapter="a", optimizer={"lr": 1e-2})
        assert r["weights_version"] == 1 and digests(c) == base
        assert c.info()["weights_version"] == 0
        run_step(c, STEPS[0])
        assert digests(c)[0] == 2


def test_a_restarted_job_continues_the_rl_loop_as_if_never_stopped(tmp_path):
    """The loop stops after 2 steps under 2 ranks (checkpoint each step); the job is restarted
    with 3 ranks and `--resume`; step 3 is the uninterrupted run's step 3."""
    from ember import rl

    def run(out, ranks, steps, *extra):
        args = ["--start-server", "--trainer-ranks", str(ranks), "--task", "arithmetic", "--steps", str(steps),
                "--prompts", "4", "--samples", "4", "--max-tokens", "12", "--eval-every", "10", "--eval-size", "4",
                "--eval-k", "1", "--probes", "2", "--out", out, "--method", "lp_reg", "--threads", "2",
                "--checkpoint-every", "1", "--mpirun-args=--oversubscribe", *extra]
        assert rl.main(args) == 0
        return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]

    keys = ("reward", "loss", "grad_norm", "entropy", "weights_version")
    straight = run(str(tmp_path / "straight"), 2, 3)
    run(str(tmp_path / "stopped"), 2, 2)
    resumed = run(str(tmp_path / "stopped"), 3, 3, "--resume")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert [{k: m[k] for k in keys} for m in resumed] == [{k: m[k] for k in keys} for m in straight]
