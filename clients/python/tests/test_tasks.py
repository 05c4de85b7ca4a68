"""Task generators, splits and exact checkers."""
import random

import pytest

from ember import advantages, tasks, verifiers


@pytest.mark.parametrize("name", tasks.names())
def test_problems_are_seeded_and_splits_disjoint(name):
    t = tasks.get(name)
    a = tasks.sample(t, "train", 300, seed=5)
    assert [p.prompt for p in a] == [p.prompt for p in tasks.sample(t, "train", 300, seed=5)]
    held = tasks.sample(t, "heldout", 100, seed=5)
    assert not {p.prompt for p in a} & {p.prompt for p in held}
    assert all(tasks.split_of(p.prompt) == "heldout" for p in held)


@pytest.mark.parametrize("name", [n for n in tasks.names() if not tasks.is_multiturn(n)])
def test_clean_traces_are_accepted(name):
    t = tasks.get(name)
    rng = random.Random(0)
    for p in tasks.sample(t, "heldout", 200, seed=1):
        clean = t.trace(p, rng, **({"slip_rate": 0.0} if name.startswith("arithmetic") else {}))
        assert t.check(p, clean), (p.prompt, clean)
        assert t.check(p, t.probe_trace(p, rng))


def test_arithmetic_answer_forms_and_near_misses():
    t = tasks.get("arithmetic")
    p = tasks.Problem("arithmetic", "calc 37+48-19=", 66, {"values": [37, 48, 19], "ops": ["+", "-"]})
    for good in ["answer 66", " 37+48=85 ; 85-19=66 ; answer 66", "answer: 66", "answer 066", "answer +66", "answer 66.0",
                 "answer 66 \n"]:
        assert t.check(p, good), good
    for bad in ["answer 65", "answer 67", "answer 6 6", "66", "answer 66 ; answer 65", "answer -66", "answer 660",
                "answer 66.5", ""]:
        assert not t.check(p, bad), bad


def test_arithmetic_base_traces_slip_and_checks_repair():
    t = tasks.get("arithmetic")
    rng = random.Random(3)
    problems = tasks.sample(t, "train", 2000, seed=2)
    plain = sum(t.check(p, t.trace(p, rng, check_rate=0.0)) for p in problems) / len(problems)
    checked = sum(t.check(p, t.trace(p, rng, check_rate=1.0)) for p in problems) / len(problems)
    assert 0.35 < plain < 0.8, plain          # the base data is imperfect
    assert checked == 1.0                      # checking every step repairs every slip
    base = [t.trace(p, rng) for p in problems]
    assert 0.05 < sum(" check " in s for s in base) / len(base) < 0.6   # the spark move is rare


def test_countdown_checker():
    t = tasks.get("countdown")
    p = tasks.Problem("countdown", "reach 24 with 3 5 7 9 :", 24, {"numbers": [3, 5, 7, 9]})
    assert t.check(p, "answer (9-5)*(7-3)") is False      # uses 3 and 7 once but 9,5,7,3 -> 4*4=16
    assert t.check(p, "answer 9+7+5+3")
    assert t.check(p, " 9+7=16 ; 5+3=8 ; 16+8=24 ; answer (9+7)+(5+3)")
    assert t.check(p, "answer (9-7)*(5+3)-(0)") is False  # 0 is not given
    assert not t.check(p, "answer 3*8")                   # 8 is not given
    assert not t.check(p, "answer 9+9+3+3")               # 9 used twice
    assert not t.check(p, "answer 9+7+5+2")               # near miss (23, and 2 not given)
    assert not t.check(p, "answer 9+7+5")                 # 21
    assert not t.check(p, "answer (9+7+5+3")              # malformed
    assert not t.check(p, "answer 9/0+24")


def test_verifier_registry_and_advantages():
    p = tasks.Problem("arithmetic", "calc 2+2=", 4, {"values": [2, 2], "ops": ["+"]})
    assert verifiers.get("arithmetic")(p, "answer 4") == 1.0
    assert verifiers.get("number")(p, "it is 4") == 1.0
    with pytest.raises(KeyError):
        verifiers.get("nope")
    g = advantages.grpo([1, 0, 0, 1, 1, 1], ["a", "a", "a", "a", "b", "b"])
    assert g[0] == pytest.approx(0.5 / (0.5773502691896258 + 1e-6)) and g[4] == 0.0
    assert advantages.rloo([1, 0, 0], ["a"] * 3) == pytest.approx([1.0, -0.5, -0.5])
    assert advantages.dr_grpo([1, 0], ["a", "a"]) == pytest.approx([0.5, -0.5])


def test_advantages_agree_with_the_servers_rules():
    """The cases the Swift suite checks the server's estimators on (Tests/Fixtures/advantages.json)."""
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "Tests", "Fixtures", "advantages.json")
    cases = json.load(open(path))
    assert any(len(set(c["groups"])) < len(c["groups"]) for c in cases)
    for c in cases:
        for name, expected in c["expected"].items():
            assert advantages.ESTIMATORS[name](c["rewards"], c["groups"]) == pytest.approx(expected, abs=1e-12), name
    assert advantages.grpo([0.5], ["solo"]) == [0.0], "a group of one has no baseline"


def test_rare_check_arithmetic_makes_the_spark_rare_and_useful():
    """The rare-spark task: checks at ~0.5% of steps in base traces, and a trace that checks every
    step is always right while one that never checks is right ~0.78^steps of the time."""
    t = tasks.get("arithmetic_rare")
    rng = random.Random(3)
    problems = tasks.sample(t, "train", 400, seed=2, distinct=False)
    steps = sum(len(p.info["ops"]) for p in problems)
    checks = sum(t.trace(p, rng).count(" check ") for p in problems for _ in range(5))
    assert 0.002 < checks / (5 * steps) < 0.01
    assert all(t.check(p, t.trace(p, rng, check_rate=1.0)) for p in problems)
    plain = sum(t.check(p, t.trace(p, rng, check_rate=0.0)) for p in problems) / len(problems)
    assert 0.15 < plain < 0.45
    assert min(len(p.info["ops"]) for p in problems) >= 4


def test_spark_check_arithmetic_keeps_checking_once_started_and_pays():
    """Study 3's task: a trace starts checking at ~0.5% of steps and then checks every later step;
    checked steps never slip, so starting at the first step always gives the right answer while
    starting at the last cannot repair an earlier slip, and traces that check are right far more
    often than those that do not."""
    t = tasks.get("arithmetic_spark")
    rng = random.Random(5)
    problems = tasks.sample(t, "train", 2000, seed=4, distinct=False)
    with_check, without, late_right = [], [], 0
    for p in problems:
        n = len(p.info["ops"])
        assert t.check(p, t.trace(p, rng, check_from=0))
        late = t.trace(p, rng, slip_rate=1.0, check_rate=0.0, check_from=n - 1)
        assert late.count("check ") == 1
        late_right += t.check(p, late)  # only when the earlier slips happen to cancel
        s = t.trace(p, rng)
        checked = [step.strip().startswith("check ") for step in s.split(" ; ")[:-1]]
        if any(checked):
            assert all(checked[checked.index(True):]), s
        (with_check if any(checked) else without).append(t.check(p, s))
    assert late_right / len(problems) < 0.1
    assert 0.01 < len(with_check) / len(problems) < 0.05
    assert sum(with_check) / len(with_check) > sum(without) / len(without) + 0.2
    probe = t.probe_trace(problems[0], rng)
    checked = [step.strip().startswith("check ") for step in probe.split(" ; ")[:-1]]
    assert t.check(problems[0], probe) and any(checked) and all(checked[checked.index(True):])
