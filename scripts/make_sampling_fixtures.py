#!/usr/bin/env python3
"""numpy reference for the per-token statistics of sampling and scoring: log-probability at a
temperature, entropy, and Lp-Reg's proxy log-probability (min-p kappa and fixed threshold tau).
Writes Tests/Fixtures/sampling/stats.json. Usage: python3 scripts/make_sampling_fixtures.py"""
import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "sampling")


def log_softmax(z):
    z = z.astype(np.float64)
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


def main():
    rng = np.random.default_rng(7)
    cases = []
    for i in range(40):
        V = int(rng.integers(5, 300))
        logits = (rng.standard_normal(V) * rng.uniform(0.5, 6)).astype(np.float32)
        temperature = float(rng.choice([1.0, 0.7, 1.3, 0.25]))
        lp = log_softmax(logits.astype(np.float64) / temperature)
        p = np.exp(lp)
        kappa = float(rng.choice([0.02, 0.1, 0.5]))
        tau = float(rng.choice([0.001, 0.01, 0.05]))
        keep_minp = p >= kappa * p.max()
        keep_tau = p >= tau
        def proxy(keep):
            out = np.full(V, -np.inf)
            out[keep] = lp[keep] - np.log(p[keep].sum())
            return out
        tokens = [int(t) for t in rng.integers(0, V, 6)] + [int(p.argmax()), int(p.argmin())]
        pm, pt = proxy(keep_minp), proxy(keep_tau)
        enc = lambda x: None if np.isinf(x) else float(x)
        cases.append({"logits": [float(x) for x in logits], "temperature": temperature, "kappa": kappa, "tau": tau,
                      "tokens": tokens, "logprob": [float(lp[t]) for t in tokens],
                      "entropy": float(-(p * lp).sum()),
                      "proxy_min_p": [enc(pm[t]) for t in tokens], "proxy_threshold": [enc(pt[t]) for t in tokens]})
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "stats.json"), "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main()
