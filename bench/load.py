"""Load test: ember-server on the default model, and ember-bench load in a second
process with 64 keep-alive connections mixing generate, logprob and server.info while one more
client sends a train_step every 2 s. Samples the server's resident memory every second and fits
a line to the samples after warm-up (the first 20% of the run): MB per minute.
    python3 bench/load.py [--seconds 300] [--connections 64]"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slope(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    srv = subprocess.Popen([os.path.join(ROOT, ".build", "release", "ember-server"), "--port", "0", "--log-level", "warning",
                            "--slots", "128", "--max-connections", "256"], stdout=subprocess.PIPE, text=True)
    port = re.search(r"127\.0\.0\.1:(\d+)", srv.stdout.readline()).group(1)
    samples = []
    done = threading.Event()

    def sample():
        t0 = time.time()
        while not done.is_set():
            samples.append((time.time() - t0, rss_mb(srv.pid)))
            time.sleep(1)

    threading.Thread(target=sample, daemon=True).start()
    try:
        out = subprocess.run([os.path.join(ROOT, ".build", "release", "ember-bench"), "load", "--port", port,
                              "--connections", str(args.connections), "--seconds", str(args.seconds), "--vocab", "312"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        done.set()
        srv.terminate()
        code = srv.wait(timeout=60)
    result = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    warm = [s for s in samples if s[0] >= 0.2 * args.seconds]
    result["server_exit"] = code
    result["rss_mb_start"] = round(warm[0][1], 1) if warm else None
    result["rss_mb_end"] = round(samples[-1][1], 1)
    result["rss_mb_max"] = round(max(s[1] for s in samples), 1)
    result["rss_mb_per_minute_after_warmup"] = round(60 * slope([s[0] for s in warm], [s[1] for s in warm]), 3) if len(warm) > 2 else None
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    json.dump({"result": result, "rss": samples}, open(os.path.join(ROOT, "bench", "out", "load.json"), "w"), indent=1)
    print(json.dumps(result, indent=1))
    ok = result["errors"] == 0 and result["lost"] == 0 and result["versions_increasing"] and code == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
