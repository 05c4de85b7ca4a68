"""tool-arith: the calculator tool (exact, never evaluates code), the task's problems and
checker, and its environment's turns."""
import random

from ember import tasks
from ember.multiturn import parse_tool_calls
from ember.tasks.toolarith import CALCULATOR, ToolArithEnvironment, calculate


def test_calculator_is_exact_and_refuses_anything_else():
    assert calculate("37*48-19+6*12") == str(37 * 48 - 19 + 6 * 12)
    assert calculate("-(2+3)*4") == "-20" and calculate(" 7 ") == "7"
    for bad in ["__import__('os')", "2/3", "2**8", "1+", "(1", "", "9" * 250, "1e3"]:
        assert calculate(bad).startswith("error"), bad
    assert calculate(12) .startswith("error")


def test_problems_checker_and_traces():
    task = tasks.get("tool-arith")
    problems = tasks.sample(task, "train", 50, 0)
    assert all(p.prompt.startswith("calc ") and p.prompt.endswith("=") for p in problems)
    assert all(str(p.answer) == calculate(p.info["expression"]) for p in problems)
    p = problems[0]
    assert task.check(p, f"... answer {p.answer}") and not task.check(p, f"answer {p.answer + 1}")
    trace = task.trace(p, random.Random(0), tool_rate=1.0)
    assert trace[-1]["content"] == f"answer {p.answer}" and trace[2]["content"] == str(p.answer)
    head = task.trace(p, random.Random(0), tool_rate=0.0)
    assert len(head) == 2 and head[1]["content"].endswith(f"answer {p.answer}")
    # Every step of the worked solution is right: each "a op b=c" checks with the calculator.
    for step in head[1]["content"].split(" ; ")[:-1]:
        lhs, rhs = step.split("=")
        assert calculate(lhs) == rhs, step
    system = task.trace(p, random.Random(0), tool_rate=0.0, system="Use the calculator.")
    assert system[0]["role"] == "system" and "tool_calls" in system[2]
    assert set(tasks.sample(task, "heldout", 20, 0)).isdisjoint(problems)


def test_environment_answers_tool_calls_then_checks_the_answer():
    p = tasks.sample(tasks.get("tool-arith"), "train", 1, 3)[0]
    env = ToolArithEnvironment(p)
    assert env.tools == [CALCULATOR]
    assert env.reset(0) == [{"role": "user", "content": p.prompt}]
    text = '<tool_call>{"name": "calculate", "arguments": {"expression": "%s"}}</tool_call>' % p.info["expression"]
    follow, done = env.step(text, parse_tool_calls(text))
    assert not done and follow == [{"role": "tool", "name": "calculate", "content": str(p.answer)}]
    follow, done = env.step(f"answer {p.answer}", [])
    assert done and follow == [] and env.reward() == 1.0
    env.reset(1)
    _, done = env.step("answer 0", [])
    assert done and env.reward() == (1.0 if p.answer == 0 else 0.0)
