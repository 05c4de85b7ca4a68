"""Countdown: reach the target with some of the given numbers (each at most once) and + - * /.

Prompt:   "reach 24 with 3 5 7 9 :"
Trace:    " 9-5=4 ; 3+7=10 no ; 7-4=3 ... answer (9-5)*(3+3)" style steps ending in an expression.
The spark move is `retry`: base traces sometimes start down a path that cannot reach the target,
notice it (" no") and restart (" retry"), which is how the solution is found when the first
idea fails.
"""
from __future__ import annotations

import itertools
import re
from fractions import Fraction

from . import Problem, register

ANSWER = re.compile(r"answer\s*:?\s*([0-9+\-*/() ]+?)\s*$")


def _combine(a, b):
    """(value, expression) results of one operation on two (value, expression) pairs."""
    (x, ex), (y, ey) = a, b
    out = [(x + y, f"({ex}+{ey})"), (x * y, f"({ex}*{ey})")]
    if x - y >= 0:
        out.append((x - y, f"({ex}-{ey})"))
    if y - x >= 0:
        out.append((y - x, f"({ey}-{ex})"))
    if y != 0 and x % y == 0:
        out.append((x // y, f"({ex}/{ey})"))
    if x != 0 and y % x == 0:
        out.append((y // x, f"({ey}/{ex})"))
    return out


def solve(numbers, target, limit=1):
    """Up to `limit` solutions as lists of steps (a, op, b, result) plus the final expression."""
    found = []

    def rec(items, steps):
        if len(found) >= limit:
            return
        for i, j in itertools.combinations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            for value, expr in _combine(items[i], items[j]):
                step = steps + [(expr, value)]
                if value == target:
                    found.append(step)
                    return
                if rest:
                    rec(rest + [(value, expr)], step)
                if len(found) >= limit:
                    return

    rec([(n, str(n)) for n in numbers], [])
    return found


def _strip(expr: str) -> str:
    return expr[1:-1] if expr.startswith("(") and expr.endswith(")") else expr


def evaluate(expr: str):
    """Exact value of an expression of integers, + - * / and parentheses (None if malformed)."""
    tokens = re.findall(r"\d+|[+\-*/()]", expr)
    if "".join(tokens) != expr.replace(" ", ""):
        return None
    pos = 0

    def atom():
        nonlocal pos
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            v = add()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError
            pos += 1
            return v
        if pos < len(tokens) and tokens[pos].isdigit():
            pos += 1
            return Fraction(int(tokens[pos - 1]))
        raise ValueError

    apply = {"+": lambda v, w: v + w, "-": lambda v, w: v - w, "*": lambda v, w: v * w, "/": lambda v, w: v / w}

    def level(operand, ops):
        """A left-associative chain of `operand` joined by the operators in `ops`."""
        def parse():
            nonlocal pos
            v = operand()
            while pos < len(tokens) and tokens[pos] in ops:
                op = tokens[pos]
                pos += 1
                v = apply[op](v, operand())   # x/0 raises ZeroDivisionError
            return v
        return parse

    add = level(level(atom, "*/"), "+-")

    try:
        v = add()
        return v if pos == len(tokens) else None
    except (ValueError, ZeroDivisionError):
        return None


class Countdown:
    name = "countdown"
    spark_words = ["retry"]
    detour_rate = 0.2    # base traces that first try a dead end, then `retry`

    def problem(self, rng):
        while True:
            numbers = sorted(rng.randint(1, 12) for _ in range(rng.choice([3, 4])))
            target = rng.randint(10, 60)
            if solve(numbers, target):
                return Problem(self.name, f"reach {target} with {' '.join(map(str, numbers))} :", target,
                               {"numbers": numbers})

    def trace(self, p: Problem, rng, detour_rate=None) -> str:
        detour_rate = self.detour_rate if detour_rate is None else detour_rate
        numbers, target = p.info["numbers"], p.answer
        solution = solve(numbers, target)[0]
        parts = []
        if rng.random() < detour_rate:
            # A first step that is not on the solution path, abandoned.
            a, b = rng.sample(numbers, 2)
            value, expr = rng.choice(_combine((a, str(a)), (b, str(b))))
            if all(value != v for _, v in solution):
                parts.append(f"{_strip(expr)}={value} no retry")
        for expr, value in solution:
            parts.append(f"{_strip(_last_op(expr, solution))}={value}")
        return " " + " ; ".join(parts) + f" ; answer {_strip(solution[-1][0])}"

    def probe_trace(self, p: Problem, rng) -> str:
        """A trace that takes the spark move (a dead end, then retry) whenever it can."""
        return self.trace(p, rng, detour_rate=1.0)

    def check(self, p: Problem, response: str) -> bool:
        m = ANSWER.search(response.strip())
        if not m:
            return False
        expr = m.group(1).strip()
        used = [int(t) for t in re.findall(r"\d+", expr)]
        pool = list(p.info["numbers"])
        for u in used:
            if u not in pool:
                return False
            pool.remove(u)
        value = evaluate(expr)
        return value is not None and value == p.answer


def _last_op(expr: str, solution) -> str:
    """A step shown with earlier results as numbers: ((3+5)*2) -> 8*2 when 3+5 was a step."""
    inner = expr
    for e, v in sorted(solution, key=lambda s: -len(s[0])):
        if e != expr and e in inner:
            inner = inner.replace(e, str(v))
    return inner


register(Countdown())
