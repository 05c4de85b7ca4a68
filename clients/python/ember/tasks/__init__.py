"""Verifiable task families: seeded problem generators with train and held-out splits, exact
checkers, and pre-training traces (with rare "spark" moves that pay off).

A task is an object with:
  name                      the registry key
  problem(rng) -> Problem   one random problem
  trace(problem, rng) -> str  a worked solution as the base model is taught to write it
  check(problem, response) -> bool  exact verifier of a sampled response
Splits are disjoint by construction: a problem's split is decided by a hash of its prompt.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: object
    info: dict = field(default_factory=dict, compare=False, hash=False)


def split_of(prompt: str, held_out_fraction: float = 0.1) -> str:
    """'heldout' for a fixed ~10% of all prompts (by hash), 'train' for the rest."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < held_out_fraction else "train"


_REGISTRY: Dict[str, object] = {}


def register(task):
    _REGISTRY[task.name] = task
    return task


def get(name: str):
    if name not in _REGISTRY:
        raise KeyError(f"unknown task '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def names() -> List[str]:
    return sorted(_REGISTRY)


def sample(task, split: str, count: int, seed: int, distinct: bool = True) -> List[Problem]:
    """`count` problems of `split` ('train' or 'heldout'), reproducible from `seed`; distinct
    unless `distinct` is False (pre-training corpora may repeat problems, with new traces)."""
    rng = random.Random(f"{task.name}:{split}:{seed}")
    out, seen = [], set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise RuntimeError(f"cannot draw {count} distinct {split} problems of {task.name}")
        p = task.problem(rng)
        if (distinct and p.prompt in seen) or split_of(p.prompt) != split:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def is_multiturn(task) -> bool:
    """Whether a task (or its name) runs as multi-turn episodes (ember.multiturn) rather than
    single prompts."""
    return bool(getattr(get(task) if isinstance(task, str) else task, "multiturn", False))


def check(problem: Problem, response: str) -> bool:
    return get(problem.task).check(problem, response)


from . import arithmetic, countdown, toolarith  # noqa: E402,F401  (registers the tasks)
