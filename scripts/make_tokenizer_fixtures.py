#!/usr/bin/env python3
"""Trains small byte-level BPE tokenizers with the Hugging Face `tokenizers` library on local
text and records the encodings of held-out strings, for Swift's exact-parity tests.

Writes Tests/Fixtures/tokenizers/<name>/{tokenizer.json, tokenizer_config.json} for
  gpt2    ByteLevel pre-tokenizer (GPT-2 regex inside), ByteLevel decoder and post-processor
  qwen2   NFC normalizer, Split with the Qwen2 regex, ByteLevel (no regex), ChatML specials
  llama3  Split with the Llama 3 regex, ByteLevel, TemplateProcessing adding <|begin_of_text|>
and Tests/Fixtures/tokenizers/cases.json: held-out strings with the ids each tokenizer gives,
with and without special-token processing, and the decoded text (skipping special tokens).

Usage: .venv/bin/python scripts/make_tokenizer_fixtures.py   (needs tokenizers)
"""
import glob
import json
import os
import random
import sys
import unicodedata

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "tokenizers")
VOCAB = 8000
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = {
    "gpt2": ["<|endoftext|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
}


def corpus_files():
    """Local text: Python's standard library sources and Debian's /usr/share/doc."""
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    files += sorted(glob.glob("/usr/share/doc/*/copyright"))[:400]
    files += sorted(glob.glob("/usr/share/doc/*/README*"))[:100]
    return [f for f in files if os.path.isfile(f) and not f.endswith(".gz")]


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def unicode_samples(rng, n):
    """Strings that stress the pre-tokenizers: scripts, emoji, combining marks, CRLF, long runs of
    spaces and digits, contractions in any case, special tokens inside text."""
    scripts = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0400, 0x04FF), (0x0600, 0x06FF),
               (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x0370, 0x03FF), (0x1F600, 0x1F64F), (0x1F300, 0x1F5FF),
               (0x2000, 0x206F), (0x00A0, 0x00FF), (0x2070, 0x209F), (0x2150, 0x218F), (0xFF00, 0xFFEF)]
    pieces = ["'s", "'T", "'RE", "'ve", "'M", "'ll", "'D", "don't", "I'M", " \r\n", "\r\n\r\n", "\n\n\n", "\t\t",
              "     ", " " * 17, "1234567890", "3.14159", "2024-11-28", "e\u0301", "n\u0303o", "a\u0308\u0304",
              "\u200d", "👨‍👩‍👧", "🇫🇷", "½", "²³", "Ⅻ", "٣٤", "१२३", "\u00a0", "\u3000", "\u2028", "ﬁ", "Å", "Å",
              "x = f(y) + 1;", "#include <stdio.h>", "    return None\n", "¿Qué?", "naïve café"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.35:
                lo, hi = rng.choice(scripts)
                cps = [rng.randint(lo, hi) for _ in range(rng.randint(1, 6))]
                parts.append("".join(chr(c) for c in cps if unicodedata.category(chr(c)) != "Cn"))
            elif r < 0.7:
                parts.append(rng.choice(pieces))
            elif r < 0.8:
                parts.append(rng.choice(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"]))
            else:
                parts.append(rng.choice(["hello", " world", "The", " quick", "brown", "Fox", " 42", "!!", "...", "?"]))
            if rng.random() < 0.5:
                parts.append(rng.choice([" ", "  ", "\n", "", "\t", " \n "]))
        out.append("".join(parts))
    return out


def make(name, train_files):
    tok = Tokenizer(models.BPE())
    if name == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        pattern = QWEN2 if name == "qwen2" else LLAMA3
        if name == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS[name], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(train_files, trainer)
    if name == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)])
    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {
        "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        "qwen2": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    }[name]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tok


def main():
    rng = random.Random(1234)
    files = corpus_files()
    rng.shuffle(files)
    held_out, train = files[:60], files[60:]
    print(f"training on {len(train)} files, holding out {len(held_out)}", file=sys.stderr)
    toks = {name: make(name, train) for name in ["gpt2", "qwen2", "llama3"]}

    # Held-out strings: lines and multi-line windows of held-out files, plus synthetic Unicode.
    cases = []
    for path in held_out:
        text = read(path)
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), 7):
            cases.append("".join(lines[i:i + rng.randint(1, 4)]))
    rng.shuffle(cases)
    cases = [c for c in cases if c][:3500]
    cases += unicode_samples(rng, 1600)
    cases += ["", " ", "\n", "  \n  ", "a" * 300, "9" * 40, " " * 64 + "x", "\r\n" * 5, "<|endoftext|>",
              "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y", "<|endoftext|><|endoftext|>"]
    records = []
    for text in cases:
        rec = {"text": text}
        for name, tok in toks.items():
            with_special = tok.encode(text, add_special_tokens=True).ids
            plain = tok.encode(text, add_special_tokens=False).ids
            rec[name] = plain
            if with_special != plain:
                rec[name + "+special"] = with_special
            decoded = tok.decode(plain, skip_special_tokens=True)
            if decoded != text:
                rec[name + ":decoded"] = decoded
        records.append(rec)
    with open(os.path.join(ROOT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {len(records)} cases to {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
