"""Records real answers for Protocol/openrpc.json's examples: starts ember-server on the default
model (or --model), calls every method with its example params (Protocol/example_params.json,
written by make_openrpc.py), stores Protocol/examples.json, then re-runs make_openrpc.py.
    python3 scripts/record_openrpc_examples.py [--model models/ember-default]"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from ember import Client, EmberError  # noqa: E402


def shorten(value, depth=0):
    """Long arrays cut to 6 entries so the document stays readable."""
    if isinstance(value, list):
        return [shorten(v, depth + 1) for v in value[:6]]
    if isinstance(value, dict):
        return {k: shorten(v, depth + 1) for k, v in value.items()}
    return value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "ember-default"))
    args = ap.parse_args()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_openrpc.py")], check=True)
    params = json.load(open(os.path.join(ROOT, "Protocol", "example_params.json")))
    ckpt = tempfile.mkdtemp()
    p = subprocess.Popen([os.path.join(ROOT, ".build", "release", "ember-server"), "--model", args.model, "--port", "0",
                          "--checkpoint-dir", ckpt, "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    try:
        url = "http://" + re.search(r"listening on http://([^ |]+)", p.stdout.readline()).group(1)
        c = Client(url)
        c.wait_until_healthy()
        recorded = {}
        # Examples in prompt form where the model has a tokenizer.
        params["generate"] = {"prompts": ["calc 12+30="], "n": 2, "max_tokens": 24, "temperature": 0.8, "seed": 1}
        params["tokenize"] = {"text": "calc 12+30="}
        params["detokenize"] = {"tokens": c.tokenize(text="calc 12+30=")}
        prompt = c.tokenize(text="calc 12+30=")
        response = c.tokenize(text=" 12+30=42 ; answer 42", add_special_tokens=False)
        seq = {"tokens": prompt + response, "response_start": len(prompt)}
        params["logprob"] = {"sequences": [seq], "entropy": True}
        params["train_step"] = {"batch": [{**seq, "advantage": 1.0}], "loss": {"mode": "lp_reg"}, "dry_run": True}
        params["checkpoint.save"] = {"name": "example"}
        params["checkpoint.load"] = {"name": "example"}
        for method, ps in params.items():
            try:
                recorded[method] = {"params": ps, "result": shorten(c.call(method, ps))}
            except EmberError as e:
                print(f"{method}: {e}", file=sys.stderr)
        json.dump(recorded, open(os.path.join(ROOT, "Protocol", "examples.json"), "w"), indent=1)
    finally:
        p.terminate()
        p.wait()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_openrpc.py")], check=True)


if __name__ == "__main__":
    main()
