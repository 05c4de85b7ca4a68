"""Advantage estimators over groups of samples of the same prompt (the server computes the same
ones when train_step is given rollouts and rewards; these are for orchestrators that upload
batches, and for checking). The rules are the server's (Sources/Engine/Advantages.swift): a group
whose rewards are all equal, a group of one included, gets 0 under every estimator;
Tests/Fixtures/advantages.json holds cases both test suites check."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence


def _groups(groups: Sequence) -> Dict[object, List[int]]:
    out = defaultdict(list)
    for i, g in enumerate(groups):
        out[g].append(i)
    return out


def grpo(rewards: Sequence[float], groups: Sequence, eps: float = 1e-6, scale: bool = True) -> List[float]:
    """(r - mean) / (std + eps) within each group (unbiased std; a group of one gets 0)."""
    out = [0.0] * len(rewards)
    for idx in _groups(groups).values():
        rs = [rewards[i] for i in idx]
        mean = sum(rs) / len(rs)
        if len(rs) < 2:
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
        for i in idx:
            out[i] = (rewards[i] - mean) / (std + eps) if scale else rewards[i] - mean
    return out


def dr_grpo(rewards: Sequence[float], groups: Sequence) -> List[float]:
    """Dr. GRPO: r - group mean (no std scaling)."""
    return grpo(rewards, groups, scale=False)


def rloo(rewards: Sequence[float], groups: Sequence) -> List[float]:
    """Leave-one-out baseline: r_i - mean of the other samples of the group."""
    out = [0.0] * len(rewards)
    for idx in _groups(groups).values():
        if len(idx) < 2:
            continue
        total = sum(rewards[i] for i in idx)
        for i in idx:
            out[i] = rewards[i] - (total - rewards[i]) / (len(idx) - 1)
    return out


ESTIMATORS = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}
