#!/usr/bin/env python3
"""Runs ember-bench and bench/torch_bench.py on the same shapes, one process per measurement
(so peak RSS is per run), and prints the figures side by side with ratios (Ember / PyTorch)."""
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBER = os.path.join(ROOT, ".build", "release", "ember-bench")
TORCH = [os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "bench", "torch_bench.py")]


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def engine(quick):
    rows = []
    sg = run([EMBER, "sgemm"])[0]
    print(f"machine: {machine()}")
    print(f"sgemm 2048^3, 2 threads: OpenBLAS {sg['openblas_gflops']:.0f} GFLOP/s, "
          f"Ember row-invariant kernel {sg['ember_project_gflops']:.0f} GFLOP/s")
    shapes = ["tiny"] if quick else ["tiny", "0.5b"]
    print(f"\n{'shape':6} {'metric':16} {'ember':>10} {'pytorch':>10} {'ratio':>7}  ember GFLOP/s")
    for shape in shapes:
        e = run([EMBER, "engine", "--shape", shape])[0]
        t = run(TORCH + ["engine", "--shape", shape, "--steps", "5" if shape == "tiny" else "2"])[0]
        for key, gf in [("forward_tok_s", "forward_gflops"), ("train_tok_s", "train_gflops")]:
            print(f"{shape:6} {key:16} {e[key]:10.1f} {t[key]:10.1f} {e[key] / t[key]:6.2f}x  "
                  f"{e[gf]:.0f} ({100 * e[gf] / sg['openblas_gflops']:.0f}% of sgemm peak)")
        print(f"{shape:6} {'peak RSS GB':16} {e['peak_rss_bytes'] / 1e9:10.2f} {t['peak_rss_bytes'] / 1e9:10.2f}")
        rows.append({"ember": e, "pytorch": t})
    with open(os.path.join(ROOT, "bench", "out", "engine.json"), "w") as f:
        json.dump({"machine": machine(), "sgemm": sg, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    engine("--quick" in args)
