"""A registry of verifiers: functions (problem, response_text) -> reward in [0, 1].

    @register("my_task")
    def my_verifier(problem, response): ...

The task suite registers one exact verifier per task family; `exact` and `number` are generic.
"""
from __future__ import annotations

import re
from typing import Callable, Dict

from . import tasks

_VERIFIERS: Dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        _VERIFIERS[name] = fn
        return fn
    return wrap


def get(name: str) -> Callable:
    if name in _VERIFIERS:
        return _VERIFIERS[name]
    if name in tasks.names():
        task = tasks.get(name)
        return lambda problem, response: 1.0 if task.check(problem, response) else 0.0
    raise KeyError(f"unknown verifier '{name}' (known: {', '.join(sorted(set(_VERIFIERS) | set(tasks.names())))})")


def names():
    return sorted(set(_VERIFIERS) | set(tasks.names()))


@register("exact")
def exact(problem, response: str) -> float:
    """The response, stripped, equals the expected answer's text."""
    return 1.0 if response.strip() == str(problem.answer).strip() else 0.0


_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


@register("number")
def number(problem, response: str) -> float:
    """The last number in the response equals the expected number."""
    found = _NUMBER.findall(response)
    try:
        return 1.0 if found and float(found[-1]) == float(problem.answer) else 0.0
    except (TypeError, ValueError):
        return 0.0
