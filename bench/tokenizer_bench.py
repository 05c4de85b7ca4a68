#!/usr/bin/env python3
"""The Rust `tokenizers` side of the tokenizer benchmark: encode throughput of a tokenizer.json
on a text file cut into 50-line documents, one thread (RAYON_NUM_THREADS=1, plain encode loop).

  tokenizer_bench.py --dir D --file F
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tokenizers  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--file", required=True)
a = ap.parse_args()
tok = tokenizers.Tokenizer.from_file(os.path.join(a.dir, "tokenizer.json"))
raw = open(a.file, "rb").read()
text = raw.decode("utf-8", errors="replace")
lines = text.splitlines(keepends=True)
docs = ["".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]
times = []
for _ in range(3):
    t0 = time.perf_counter()
    n = sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    times.append(time.perf_counter() - t0)
print(json.dumps({"kind": "tokenizer", "impl": "tokenizers", "version": tokenizers.__version__, "dir": a.dir,
                  "bytes": len(raw), "tokens": n, "mb_s": len(raw) / 1e6 / statistics.median(times), "seconds": times}))
