"""Writes the committed seed corpora for scripts/fuzz (fuzz/corpus/NAME/*): valid and nearly valid
inputs for each harness. The tokenizer seeds use .work/fuzz-tokenizer.json, a small BPE trained
here with `tokenizers` (run with the .venv python)."""
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(harness, name, data):
    d = os.path.join(OUT, harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def http():
    body = '{"jsonrpc":"2.0","method":"server.info","id":1}'
    put("http", "post", f"\x30POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    put("http", "pipelined", "\x10" + "GET /healthz HTTP/1.1\r\n\r\n" * 3)
    put("http", "chunked", "\x40POST /rpc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    put("http", "continue", f"\x20POST /rpc HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{{}}")
    put("http", "smuggle", "\x05POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    put("http", "http10", "\x08GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")


def jsonrpc():
    calls = {
        "info": {"method": "server.info"},
        "generate": {"method": "generate", "params": {"prompt_tokens": [[1, 2, 3]], "max_tokens": 4, "n": 2, "seed": 1,
                                                      "top_k": 5, "top_p": 0.9, "min_p": 0.1, "entropy": True,
                                                      "top_logprobs": 2, "proxy": {"min_p": 0.02}, "stop_token_ids": [7]}},
        "logprob": {"method": "logprob", "params": {"sequences": [{"tokens": [1, 2, 3, 4], "response_start": 2}],
                                                    "temperature": 0.7, "proxy": {"threshold": 0.01}}},
        "train": {"method": "train_step", "params": {"batch": [{"tokens": [1, 2, 3, 4], "response_start": 1,
                                                                "advantage": [1, -1, 0.5]}],
                                                     "loss": {"mode": "lp_reg", "rho": 0.5, "kl": "full"}, "dry_run": True}},
        "rollouts": {"method": "train_step", "params": {"rollouts": [{"rollout_id": "r-1", "reward": 1, "group": 0}],
                                                        "loss": {"mode": "ppo", "dual_clip": 3}, "dry_run": True}},
        "configure": {"method": "optimizer.configure", "params": {"lr": 1e-4, "schedule": {"type": "cosine", "total_steps": 10}}},
        "cancel": {"method": "cancel", "params": {"request_id": "x"}},
    }
    for name, c in calls.items():
        put("jsonrpc", name, json.dumps({"jsonrpc": "2.0", "id": 1, **c}))
    put("jsonrpc", "batch", json.dumps([{"jsonrpc": "2.0", "id": i, **c} for i, c in enumerate(calls.values())][:4]))
    put("jsonrpc", "deep", "[" * 70 + "]" * 70)
    put("jsonrpc", "bignum", '{"jsonrpc":"2.0","id":1e999,"method":"generate","params":{"max_tokens":1e400,"prompt_tokens":[[99999999999999999999]]}}')
    put("jsonrpc", "utf8", b'{"jsonrpc":"2.0","id":"\xff\xfe","method":"tokenize","params":{"text":"\xc3\x28"}}')


def safetensors():
    def file(header, payload):
        h = json.dumps(header).encode()
        return struct.pack("<Q", len(h)) + h + payload
    put("safetensors", "f32", file({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                                    "__metadata__": {"format": "pt"}}, struct.pack("<4f", 1, 2, 3, 4)))
    put("safetensors", "mixed", file({"b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                                      "c": {"dtype": "F16", "shape": [1], "data_offsets": [6, 8]},
                                      "d": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}, bytes(16)))
    put("safetensors", "overlap", file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(8)))
    put("safetensors", "short", struct.pack("<Q", 1 << 40) + b"{}")


def tokenizer():
    path = os.path.join(ROOT, ".work", "fuzz-tokenizer.json")
    if not os.path.exists(path):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers, normalizers
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 50, trainer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tok.save(path)
    data = open(path, "rb").read()
    put("tokenizer", "bpe", data + b"\0" + "Hello wörld 123 <|endoftext|> 🙂".encode())
    gpt2 = json.loads(data)
    gpt2["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    gpt2["post_processor"] = {"type": "ByteLevel", "trim_offsets": False}
    put("tokenizer", "gpt2style", json.dumps(gpt2).encode() + b"\0the fox's   dog\r\n")


if __name__ == "__main__":
    http()
    jsonrpc()
    safetensors()
    tokenizer()
    for h in sorted(os.listdir(OUT)):
        print(h, len(os.listdir(os.path.join(OUT, h))), "seeds")
