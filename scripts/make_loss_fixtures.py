#!/usr/bin/env python3
"""Reference losses for train_step, written independently in PyTorch: for random logits rows,
per-token advantages, old and proxy log-probabilities, each loss mode's value and
d(loss)/d(logits) by autograd. Writes Tests/Fixtures/losses/cases.json.

Semantics follow docs/lp-reg.md:
  ppo     max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); dual clip caps A<0 tokens at -A c
  lp_reg  selected tokens: -A r + beta * clamp(k3, -10, 10), k3 = e^d - d - 1, d = lp_proxy - lp;
          others: the clipped term with lp_reg's eps. Selection "negative": the floor(N_neg rho)
          lowest-lp tokens with A<0 (none when k<=1), kept when lp < lp_proxy; "all": the
          floor(N rho) lowest-lp tokens of the batch, kept when A<0 and lp_proxy > -inf.
  gspo    s = exp(mean_t(lp - lp_old)) per sequence, s_t = sg(s) exp(lp - sg(lp)), clipped;
          seq-mean-token-mean
  cispo   -sg(clip(r, 1-eps_low, 1+eps_high)) A lp
  clip_cov  tokens not already clipped with cov in (cov_low, cov_high): a random
          max(1, floor(ratio N)) of them lose their term (the choice is recorded)
  kl_cov  the top max(1, floor(ratio N)) tokens by cov get -A r + coef |lp - lp_old|, others -A r
  high_entropy  clipped term on tokens with entropy >= torch.quantile(entropy, 1 - fraction),
          aggregated over those tokens
  + entropy_coef (minus coef x aggregated entropy) and kl_coef with k1/k2/k3 to reference lp
  cross_entropy  -lp
Aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm.
Usage: .venv/bin/python scripts/make_loss_fixtures.py
"""
import json
import math
import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "losses")


def proxy_logprobs(logits, targets, T, kappa):
    lp = torch.log_softmax(logits / T, -1)
    p = lp.exp()
    keep = p >= kappa * p.max(-1, keepdim=True).values
    masked = torch.where(keep, lp, torch.full_like(lp, -math.inf))
    proxy = masked - torch.logsumexp(masked, -1, keepdim=True)
    return proxy.gather(-1, targets[:, None])[:, 0]


def weights(seq, agg, included=None):
    inc = included if included is not None else [True] * len(seq)
    kept = [s for s, k in zip(seq, inc) if k]
    n = len(kept)
    lengths = {s: kept.count(s) for s in set(kept)}
    B, longest = len(lengths), max(lengths.values())
    return torch.tensor([{"token-mean": 1 / n, "seq-mean-token-sum": 1 / B,
                          "seq-mean-token-mean": 1 / (B * lengths[s]), "seq-mean-token-sum-norm": 1 / longest}[agg]
                         if k else 0.0 for s, k in zip(seq, inc)], dtype=torch.float64)


def lowest(idx, lp, fraction, quirk):
    k = math.floor(len(idx) * fraction)
    if k == 0 or (quirk and k <= 1):
        return []
    return sorted(idx, key=lambda i: (lp[i], i))[:k]


def clipped(A, r, lo, hi):
    return torch.maximum(-A * r, -A * torch.clamp(r, 1 - lo, 1 + hi))


def case(rng_seed, mode, opts, agg, T):
    g = torch.Generator().manual_seed(rng_seed)
    seq_lens = [7, 12, 3, 18, 10, 9]
    seq = [s for s, n in enumerate(seq_lens) for _ in range(n)]
    N, V = len(seq), 37
    logits = (torch.randn(N, V, generator=g) * 2.5).to(torch.float32)
    targets = torch.multinomial(torch.softmax(logits / T, -1), 1, generator=g)[:, 0]
    adv_seq = torch.randn(len(seq_lens), generator=g)
    A = adv_seq[torch.tensor(seq)].to(torch.float32)
    with torch.no_grad():
        lp0 = torch.log_softmax(logits / T, -1).gather(-1, targets[:, None])[:, 0]
    old = (lp0 + 0.4 * torch.randn(N, generator=g)).to(torch.float32)
    sampling_logits = logits + 0.3 * torch.randn(N, V, generator=g)
    proxy = proxy_logprobs(sampling_logits, targets, T, opts.get("kappa", 0.02)).to(torch.float32)

    ref = (lp0 + 0.3 * torch.randn(N, generator=g)).to(torch.float32)
    x = logits.clone().double().requires_grad_(True)
    logp_all = torch.log_softmax(x / T, -1)
    lp = logp_all.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    w_all = weights(seq, agg)
    w = weights(seq, "seq-mean-token-mean" if mode == "gspo" else agg)
    extra = {}
    Ad, oldd, proxyd = A.double(), old.double(), proxy.double()
    r = torch.exp(lp - oldd)
    selected = [False] * N
    if mode == "cross_entropy":
        per = -lp
    elif mode == "gspo":
        seq_t = torch.tensor(seq)
        log_s = torch.zeros(N, dtype=torch.float64)
        for s in set(seq):
            m = seq_t == s
            log_s[m] = (lp[m] - oldd[m]).mean()
        s_tok = torch.exp(log_s.detach()) * torch.exp(lp - lp.detach())
        per = torch.maximum(-Ad * s_tok, -Ad * torch.clamp(s_tok, 1 - opts["eps_low"], 1 + opts["eps_high"]))
    elif mode == "cispo":
        per = -torch.clamp(r, 1 - opts["eps_low"], 1 + opts["eps_high"]).detach() * Ad * lp
    elif mode in ("clip_cov", "kl_cov"):
        lpd = lp.detach()
        cov = (Ad - Ad.mean()) * (lpd - lpd.mean())
        if mode == "clip_cov":
            l1, l2 = -Ad * r, -Ad * torch.clamp(r, 1 - opts["eps_low"], 1 + opts["eps_high"])
            clipped_before = (l2 > l1).tolist()
            cand = [i for i in range(N) if not clipped_before[i] and opts["cov_low"] < cov[i].item() < opts["cov_high"]]
            count = min(len(cand), max(1, math.floor(opts["ratio"] * N)))
            perm = torch.randperm(len(cand), generator=g).tolist()
            chosen = sorted(cand[j] for j in perm[:count])
            corr = torch.ones(N, dtype=torch.float64)
            corr[chosen] = 0
            per = torch.maximum(l1, l2) * corr
            extra = {"candidates": cand, "chosen": chosen}
            selected = [i in chosen for i in range(N)]
        else:
            k = max(1, math.floor(N * opts["ratio"]))
            order = sorted(range(N), key=lambda i: (-cov[i].item(), i))[:k]
            sel = torch.zeros(N, dtype=torch.bool)
            sel[order] = True
            per = torch.where(sel, -Ad * r + opts["coef"] * (lp - oldd).abs(), -Ad * r)
            selected = sel.tolist()
    elif mode == "high_entropy":
        ent = entropy.detach()
        cut = torch.quantile(ent, 1 - opts["fraction"])
        keep = (ent >= cut).tolist()
        selected = keep
        w = weights(seq, agg, keep)
        per = clipped(Ad, r, opts["eps_low"], opts["eps_high"]) * torch.tensor(keep, dtype=torch.float64)
    elif mode == "ppo":
        per = clipped(Ad, r, opts["eps_low"], opts["eps_high"])
        if opts.get("dual_clip"):
            per = torch.where(Ad < 0, torch.minimum(per, -Ad * opts["dual_clip"]), per)
    else:
        lpv = lp.detach().tolist()
        if opts["percentile_over"] == "negative":
            for i in lowest([i for i in range(N) if A[i] < 0], lpv, opts["rho"], opts["quirk"]):
                selected[i] = lpv[i] < proxy[i].item()
            if opts["rho_pos"] > 0:
                for i in lowest([i for i in range(N) if A[i] > 0], lpv, opts["rho_pos"], opts["quirk"]):
                    selected[i] = lpv[i] < proxy[i].item()
        else:
            for i in lowest(list(range(N)), lpv, opts["rho"], opts["quirk"]):
                selected[i] = bool(A[i] < 0) and proxy[i].item() > -math.inf
        sel = torch.tensor(selected)
        if opts.get("kl") == "full":
            # Exact KL(q || p) with q the min-p proxy of the trained row itself (detached).
            with torch.no_grad():
                lp_all = torch.log_softmax(x / T, -1)
                keep = lp_all.exp() >= opts["kappa"] * lp_all.exp().max(-1, keepdim=True).values
                q = torch.where(keep, lp_all.exp(), torch.zeros_like(lp_all))
                q = q / q.sum(-1, keepdim=True)
            logp = torch.log_softmax(x / T, -1)
            kl = (q * (torch.log(q.clamp_min(1e-300)) - logp)).sum(-1)
            per = torch.where(sel, -Ad * r + opts["beta"] * kl, clipped(Ad, r, opts["eps_low"], opts["eps_high"]))
        else:
            d = torch.where(sel, proxyd - lp, torch.zeros_like(lp))
            k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
            per = torch.where(sel, -Ad * r + opts["beta"] * k3, clipped(Ad, r, opts["eps_low"], opts["eps_high"]))
    loss = (per * w).sum()
    ent_coef, kl_coef, kl_type = opts.get("entropy_coef", 0.0), opts.get("kl_coef", 0.0), opts.get("kl_type", "k3")
    if ent_coef:
        loss = loss - ent_coef * (entropy * w_all).sum()
    if kl_coef:
        rr = ref.double() - lp
        kl = {"k1": -rr, "k2": 0.5 * rr * rr, "k3": torch.clamp(torch.exp(rr) - rr - 1, -10, 10)}[kl_type]
        loss = loss + kl_coef * (kl * w_all).sum()
    loss.backward()
    return {"mode": mode, "options": opts, "aggregation": agg, "temperature": T, "vocab": V,
            "sequence": seq, "targets": targets.tolist(), "advantages": A.tolist(), "old_logprobs": old.tolist(),
            "proxy_logprobs": [None if math.isinf(v) else v for v in proxy.tolist()],
            "ref_logprobs": ref.tolist(), "logits": logits.flatten().tolist(), "loss": loss.item(),
            "dlogits": x.grad.flatten().tolist(), "selected": selected, **extra}


def main():
    cases = []
    # kappa is small here so that low-probability tokens survive the proxy filter and get selected.
    lp_reg = dict(eps_low=1.0, eps_high=9.0, kappa=0.001, rho=0.4, rho_pos=0.0, beta=1.0, percentile_over="negative", quirk=True)
    specs = [
        ("ppo", dict(eps_low=0.2, eps_high=0.2), "token-mean", 1.0),
        ("ppo", dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0), "seq-mean-token-mean", 0.7),
        ("ppo", dict(eps_low=0.1, eps_high=0.1), "seq-mean-token-sum", 1.0),
        ("lp_reg", lp_reg, "token-mean", 1.0),
        ("lp_reg", dict(lp_reg, rho=0.3, beta=0.5, kappa=0.0002), "seq-mean-token-sum-norm", 0.8),
        ("lp_reg", dict(lp_reg, rho_pos=0.3), "token-mean", 1.0),
        ("lp_reg", dict(lp_reg, percentile_over="all", rho=0.2), "token-mean", 1.2),
        ("lp_reg", dict(lp_reg, rho=0.04), "token-mean", 1.0),
        ("lp_reg", dict(lp_reg, rho=0.04, quirk=False), "token-mean", 1.0),
        ("cross_entropy", {}, "token-mean", 1.0),
        ("cross_entropy", {}, "seq-mean-token-mean", 1.0),
        ("gspo", dict(eps_low=0.0003, eps_high=0.0004), "token-mean", 1.0),
        ("gspo", dict(eps_low=0.2, eps_high=0.2), "token-mean", 0.9),
        ("cispo", dict(eps_low=1.0, eps_high=0.2), "token-mean", 1.0),
        ("clip_cov", dict(eps_low=0.2, eps_high=0.2, ratio=0.05, cov_low=0.05, cov_high=5.0), "token-mean", 1.0),
        ("kl_cov", dict(ratio=0.05, coef=1.0), "token-mean", 1.0),
        ("high_entropy", dict(fraction=0.2, eps_low=0.2, eps_high=0.2), "token-mean", 1.0),
        ("high_entropy", dict(fraction=0.5, eps_low=0.2, eps_high=0.28), "seq-mean-token-mean", 0.8),
        ("ppo", dict(eps_low=0.2, eps_high=0.2, entropy_coef=0.01), "token-mean", 1.0),
        ("ppo", dict(eps_low=0.2, eps_high=0.2, kl_coef=0.1, kl_type="k1"), "token-mean", 1.0),
        ("ppo", dict(eps_low=0.2, eps_high=0.2, kl_coef=0.1, kl_type="k2"), "seq-mean-token-sum", 1.0),
        ("lp_reg", dict(lp_reg, kl_coef=0.05, kl_type="k3", entropy_coef=0.002), "token-mean", 1.0),
        ("lp_reg", dict(lp_reg, kl="full", kappa=0.02), "token-mean", 1.0),
        ("lp_reg", dict(lp_reg, kl="full", kappa=0.02, entropy_coef=0.01), "seq-mean-token-mean", 0.9),
    ]
    for k, (mode, opts, agg, T) in enumerate(specs):
        cases.append(case(100 + k, mode, opts, agg, T))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f)
    print(f"{len(cases)} cases; selected per lp_reg case:",
          [sum(c["selected"]) for c in cases if c["mode"] == "lp_reg"])


if __name__ == "__main__":
    main()
