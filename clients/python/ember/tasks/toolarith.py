"""tool-arith: multi-step arithmetic with a calculator tool.

Problems mix two-digit products with sums (`calc 37*48-19+6*12=`, usual precedence), which a
small model gets wrong often when it computes in its head and right when it calls the tool:
the tool is a spark that pays. The task is verifiable (the final `answer N`), and its
environment (`ToolArithEnvironment`) answers Hermes-style tool calls with the calculator's
result, for `ember.multiturn.run_episode`.
"""
from __future__ import annotations

import re
from typing import List, Tuple

from . import Problem, register
from ..multiturn import Environment

CALCULATOR = {"type": "function", "function": {
    "name": "calculate",
    "description": "Evaluate an arithmetic expression of integers with + - * and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 37*48-19"}},
                   "required": ["expression"]}}}

USE_TOOL = "Use the calculator."   # the system message after which traces always call the tool
ANSWER = re.compile(r"answer\s+(-?\d+)\s*$")
TOKEN = re.compile(r"\s*(\d+|[-+*()])")


def calculate(expression: str) -> str:
    """The tool: integers, + - *, parentheses, usual precedence; anything else is an error
    message (never evaluated as code)."""
    if not isinstance(expression, str) or len(expression) > 200:
        return "error: expression must be a string of at most 200 characters"
    tokens, pos = [], 0
    while pos < len(expression):
        m = TOKEN.match(expression, pos)
        if not m:
            if expression[pos:].strip() == "":
                break
            return f"error: unexpected '{expression[pos:].strip()[:10]}'"
        tokens.append(m.group(1))
        pos = m.end()
    i = 0

    def atom():
        nonlocal i
        if i < len(tokens) and tokens[i] == "-":
            i += 1
            return -atom()
        if i < len(tokens) and tokens[i] == "(":
            i += 1
            v = expr()
            if i >= len(tokens) or tokens[i] != ")":
                raise ValueError("missing ')'")
            i += 1
            return v
        if i < len(tokens) and tokens[i].isdigit():
            i += 1
            return int(tokens[i - 1])
        raise ValueError("expected a number")

    def term():
        nonlocal i
        v = atom()
        while i < len(tokens) and tokens[i] == "*":
            i += 1
            v *= atom()
            if abs(v) > 10 ** 12:
                raise ValueError("result too large")
        return v

    def expr():
        nonlocal i
        v = term()
        while i < len(tokens) and tokens[i] in "+-":
            op = tokens[i]
            i += 1
            v = v + term() if op == "+" else v - term()
        return v

    try:
        v = expr()
        if i != len(tokens):
            raise ValueError(f"unexpected '{tokens[i]}'")
        return str(v)
    except ValueError as e:
        return f"error: {e}"


def worked_steps(expr: str) -> List[str]:
    """`37*48-19+6*12` -> ['37*48=1776', '6*12=72', '1776-19=1757', '1757+72=1829']."""
    terms = re.split(r"([+-])", expr)
    steps, values = [], []
    for t in terms[0::2]:
        if "*" in t:
            v = calculate(t)
            steps.append(f"{t}={v}")
            values.append(v)
        else:
            values.append(t)
    acc = values[0]
    for op, v in zip(terms[1::2], values[1:]):
        nxt = calculate(f"{acc}{op}{v}")
        steps.append(f"{acc}{op}{v}={nxt}")
        acc = nxt
    return steps


class ToolArithmetic:
    name = "tool-arith"
    spark_words = ["<tool_call>"]
    multiturn = True   # its episodes run through ember.multiturn (chat template and tool results)

    def problem(self, rng) -> Problem:
        terms = [f"{rng.randint(11, 99)}*{rng.randint(11, 99)}"] + \
                [rng.choice([str(rng.randint(2, 99)), f"{rng.randint(2, 9)}*{rng.randint(11, 99)}"]) for _ in range(rng.randint(1, 3))]
        ops = [rng.choice("+-") for _ in terms[1:]]
        expr = terms[0] + "".join(op + t for op, t in zip(ops, terms[1:]))
        return Problem(self.name, f"calc {expr}=", int(calculate(expr)), {"expression": expr})

    def trace(self, p: Problem, rng, tool_rate: float = 0.3, system: str = "") -> List[dict]:
        """A worked solution as chat messages. With probability `tool_rate` (always when the
        system message asks for the calculator) one tool call, its result and the answer;
        otherwise the products and then the sums worked in the head, left to right, and the
        answer. A small model slips on two-digit products, so the tool is the move that pays."""
        expr = p.info["expression"]
        head = [{"role": "system", "content": system}] if system else []
        head.append({"role": "user", "content": p.prompt})
        if system == USE_TOOL or rng.random() < tool_rate:
            return head + [{"role": "assistant", "content": "",
                            "tool_calls": [{"type": "function", "function": {"name": "calculate", "arguments": {"expression": expr}}}]},
                           {"role": "tool", "name": "calculate", "content": calculate(expr)},
                           {"role": "assistant", "content": f"answer {p.answer}"}]
        return head + [{"role": "assistant", "content": " ; ".join(worked_steps(expr)) + f" ; answer {p.answer}"}]

    def environment(self, p: Problem, max_calls: int = 4) -> "ToolArithEnvironment":
        """The episode's environment (for ember.multiturn.run_episodes)."""
        return ToolArithEnvironment(p, max_calls)

    def check(self, p: Problem, response: str) -> bool:
        m = ANSWER.search(response.strip())
        return m is not None and int(m.group(1)) == p.answer


register(ToolArithmetic())


class ToolArithEnvironment(Environment):
    """One problem; every turn with tool calls gets their results back, a turn without them
    ends the episode and is checked."""

    tools = [CALCULATOR]

    def __init__(self, problem: Problem, max_calls: int = 4):
        self.problem, self.max_calls = problem, max_calls
        self.calls, self.final = 0, ""

    def reset(self, seed: int) -> List[dict]:
        self.calls, self.final = 0, ""
        return [{"role": "user", "content": self.problem.prompt}]

    def step(self, text: str, tool_calls: List[dict]) -> Tuple[List[dict], bool]:
        if not tool_calls or self.calls >= self.max_calls:
            self.final = text
            return [], True
        results = []
        for call in tool_calls:
            self.calls += 1
            args = call.get("arguments") or {}
            out = calculate(args.get("expression", "")) if call.get("name") == "calculate" and isinstance(args, dict) \
                else f"error: unknown tool '{call.get('name')}'"
            results.append({"role": "tool", "name": "calculate", "content": out})
        return results, False

    def reward(self) -> float:
        return 1.0 if ToolArithmetic().check(self.problem, self.final) else 0.0
