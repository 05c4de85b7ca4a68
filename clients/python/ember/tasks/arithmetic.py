"""Multi-step arithmetic with a scratchpad.

Prompt:   "calc 37+48-19="
Trace:    " 37+48=85 ; 85-19=66 ; answer 66"
A step may be wrong (the base data carries slips); the rare spark move is `check`: after a step
the writer recomputes it backwards (" check 85-48=37 ok") and, when the check fails, redoes the
step (" check 75-48=27 bad redo 37+48=85"). Traces without a check keep their slip and end with a
wrong answer, so checking is what pays off.
"""
from __future__ import annotations

import re

from . import Problem, register

ANSWER = re.compile(r"answer\s*:?\s*([+-]?\d+)(?:\.0+)?\s*$")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class Arithmetic:
    name = "arithmetic"
    spark_words = ["check"]
    slip_rate = 0.18     # probability that a step in a base trace is wrong
    check_rate = 0.12    # probability that a step in a base trace is checked
    step_counts = [2, 3, 3, 4]

    def problem(self, rng) -> Problem:
        steps = rng.choice(self.step_counts)
        values = [rng.randint(2, 99)]
        ops = []
        for i in range(steps):
            # A product only as the first step, so left-to-right order is also the usual precedence.
            op = rng.choice(["+", "-", "+", "-", "*"] if i == 0 else ["+", "-"])
            b = rng.randint(2, 9) if op == "*" else rng.randint(2, 99)
            ops.append(op)
            values.append(b)
        expr = str(values[0]) + "".join(f"{op}{b}" for op, b in zip(ops, values[1:]))
        acc = values[0]
        for op, b in zip(ops, values[1:]):
            acc = _apply(acc, op, b)
        return Problem(self.name, f"calc {expr}=", acc, {"values": values, "ops": ops})

    def trace(self, p: Problem, rng, slip_rate=None, check_rate=None) -> str:
        slip_rate = self.slip_rate if slip_rate is None else slip_rate
        check_rate = self.check_rate if check_rate is None else check_rate
        values, ops = p.info["values"], p.info["ops"]
        acc = values[0]
        parts = []
        for op, b in zip(ops, values[1:]):
            right = _apply(acc, op, b)
            shown = right
            if rng.random() < slip_rate:
                shown = right + rng.choice([-10, -2, -1, 1, 2, 10])
            step = f"{acc}{op}{b}={shown}"
            if rng.random() < check_rate:
                # Inverse: c-b=a for +, c+b=a for -, c/b=a for * (written as a*b=c again).
                if op == "+":
                    inv, ok = f"{shown}-{b}={shown - b}", shown - b == acc
                elif op == "-":
                    inv, ok = f"{shown}+{b}={shown + b}", shown + b == acc
                else:
                    inv, ok = f"{b}*{acc}={right}", shown == right
                step += f" check {inv} " + ("ok" if ok else f"bad redo {acc}{op}{b}={right}")
                shown = right if not ok else shown
            parts.append(step)
            acc = shown
        return " " + " ; ".join(parts) + f" ; answer {acc}"

    def probe_trace(self, p: Problem, rng) -> str:
        """A correct trace that checks every step (contexts where the spark move is taken)."""
        return self.trace(p, rng, slip_rate=0.0, check_rate=1.0)

    def check(self, p: Problem, response: str) -> bool:
        m = ANSWER.search(response.strip())
        return m is not None and int(m.group(1)) == p.answer


register(Arithmetic())


class RareCheckArithmetic(Arithmetic):
    """The rare-spark setting of the long-horizon study (docs/results.md, "Study 2"): longer
    chains (4 to 6 steps) that slip more often, and a check move the base traces take at only
    0.5% of steps, so a model trained on them checks with probability well under 0.01 where it
    matters, while a check still repairs the slip it catches. Without checks a 5-step chain is
    right with probability 0.78^5 = 0.29; a sample may check one step and slip at another, so
    checks also appear in failing samples."""
    name = "arithmetic_rare"
    slip_rate = 0.22
    check_rate = 0.005
    step_counts = [4, 5, 5, 6]


register(RareCheckArithmetic())


class SparkCheckArithmetic(RareCheckArithmetic):
    """The spark that pays (docs/results.md, "Study 3"). As `arithmetic_rare` (4 to 6 steps, 22% of
    base steps slipped, the spark at 0.5% of steps), except that ` check` now opens a step and means
    "work this step carefully": a checked step never slips, and a trace that checks one step checks
    every later one (" 37+48=86 ; check 86-19=67 ; check 67+5=72 ; answer 72"). Starting to check
    is the rare decision. Taken at the first step it removes every slip; taken later it cannot
    repair the slips before it, so sparks also appear in failing samples. Unlike a check that
    recomputes a result already written, it leaves no earlier result to copy."""
    name = "arithmetic_spark"
    # Once taken, the spark opens every later step: only the first is the rare decision. P(spark) on
    # probes counts the first ` check` of each probe (ember.rl.build_probes), and the model's
    # generator can teach the mode's continuation without the decision (--continuation-share).
    spark_opens_mode = True

    def trace(self, p: Problem, rng, slip_rate=None, check_rate=None, check_from=None) -> str:
        """A base trace; `check_from` (a step index) makes it start checking at that step."""
        slip_rate = self.slip_rate if slip_rate is None else slip_rate
        check_rate = self.check_rate if check_rate is None else check_rate
        values, ops = p.info["values"], p.info["ops"]
        acc, parts, checking = values[0], [], False
        for i, (op, b) in enumerate(zip(ops, values[1:])):
            checking = checking or i == check_from or rng.random() < check_rate
            shown = _apply(acc, op, b)
            if not checking and rng.random() < slip_rate:
                shown += rng.choice([-10, -2, -1, 1, 2, 10])
            parts.append(("check " if checking else "") + f"{acc}{op}{b}={shown}")
            acc = shown
        return " " + " ; ".join(parts) + f" ; answer {acc}"

    def probe_trace(self, p: Problem, rng) -> str:
        """A correct trace that starts checking at a random step."""
        return self.trace(p, rng, slip_rate=0.0, check_rate=0.0, check_from=rng.randrange(len(p.info["ops"])))


register(SparkCheckArithmetic())
