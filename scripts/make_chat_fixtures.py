#!/usr/bin/env python3
"""Writes the chat-template parity fixtures (Tests/Fixtures/chat/) with transformers.

1. Fetches the models' chat templates as shipped: llama.cpp keeps copies of them under
   models/templates/, and the llama-cpp-python source distribution on PyPI vendors llama.cpp, so
   the sdist (PyPI is reachable; no model hub is needed) is downloaded once into --cache and the
   chosen templates are copied to Tests/Fixtures/chat/templates/ unchanged.
2. Renders each template on each conversation below with transformers' apply_chat_template
   (tokenize=False, then the token ids as apply_chat_template(tokenize=True) makes them), with the
   fixture Qwen2 tokenizer (Tests/Fixtures/tokenizers/qwen2) and the family's special tokens, and
   with the clock fixed at 2026-01-15 10:30:00 for strftime_now. A template that raises records
   its message instead.
3. Writes Tests/Fixtures/chat/cases.json: conversations, templates' special tokens, and per
   (template, conversation) the text and ids, or the error.

Usage: .venv/bin/python scripts/make_chat_fixtures.py [--cache .work/llama-cpp-python]
Needs: transformers, tokenizers, jinja2. Tests never need them: the outputs are committed.
"""
import argparse
import datetime as real_datetime
import json
import os
import shutil
import tarfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "Tests", "Fixtures", "chat")
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_URL = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
             "llama_cpp_python-0.3.36.tar.gz")

LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
CHATML = {"eos_token": "<|im_end|>"}
TEMPLATES = {
    # fixture name: (file in llama.cpp's models/templates, special tokens)
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", CHATML),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", CHATML),
    "qwq": ("Qwen-QwQ-32B.jinja", CHATML),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3),
    "llama3.3": ("meta-llama-Llama-3.3-70B-Instruct.jinja", LLAMA3),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral-small-3.2": ("Mistral-Small-3.2-24B-Instruct-2506.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
    "deepseek-r1-qwen": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                         {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}),
    "deepseek-r1-llama": ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
                          {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B.jinja", CHATML),
    "gemma2": ("google-gemma-2-2b-it.jinja", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "phi3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
    "hermes3": ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"}),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
CALC = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

CONVERSATIONS = {
    "system_user": {"messages": [{"role": "system", "content": "You are a terse assistant."},
                                 {"role": "user", "content": "What is 2+2?"}],
                    "add_generation_prompt": True},
    "user_only": {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    "multi_turn": {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
                                {"role": "user", "content": "Another one, please."}],
                   "add_generation_prompt": True},
    "ends_with_assistant": {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
                            "add_generation_prompt": False},
    "unicode": {"messages": [{"role": "user", "content": "Übersetze: \"naïve café\" — 東京 🚀\n\ttab 'quote' \\ back"}],
                "add_generation_prompt": True},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, CALC],
              "add_generation_prompt": True},
    "tool_call_and_result": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                          {"role": "assistant", "content": "", "tool_calls": [CALL]},
                                          {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather",
                                           "content": "{\"temperature\": 18, \"sky\": \"clear\"}"}],
                             "tools": [WEATHER], "add_generation_prompt": True},
    "thinking_history": {"messages": [{"role": "user", "content": "What is 3*4?"},
                                      {"role": "assistant", "content": "<think>\n3 times 4 is 12.\n</think>\n\n12"},
                                      {"role": "user", "content": "And 5*6?"}],
                         "add_generation_prompt": True},
    "thinking_off": {"messages": [{"role": "user", "content": "Quick: capital of France?"}],
                     "add_generation_prompt": True, "kwargs": {"enable_thinking": False}},
}


# Small templates for the interpreter's corners, rendered by the same Jinja environment
# transformers builds (trim_blocks, lstrip_blocks, its tojson, ...): output or error.
SNIPPETS = [
    ("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1.5 * 2 }}", {}),
    ("{{ 'abc'[1:] }}|{{ 'abc'[::-1] }}|{{ [1,2,3,4][1:3] }}|{{ [1,2,3][-1] }}|{{ 'hello'[-3:] }}", {}),
    ("{{ x }} {{ y }} {{ z }} {{ n }} {{ f }} {{ l }} {{ d }}", {"x": None, "y": True, "z": False, "n": 3, "f": 2.0,
                                                              "l": [1, "a", None], "d": {"k": "v", "n": 1.5}}),
    ("{{ 1e-5 }} {{ 0.1 + 0.2 }} {{ 1e16 }} {{ 123456789.0 }} {{ 3.0e20 }} {{ 1/3 }}", {}),
    ("{% for i in range(3) %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }};{% endfor %}", {}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}|{% for k in d %}{{ k }}{% endfor %}", {"d": {"b": 1, "a": 2}}),
    ("{% for x in xs if x > 1 %}{{ x }}{% else %}none{% endfor %}|{% for x in [] %}{{ x }}{% else %}empty{% endfor %}", {"xs": [1, 2, 3]}),
    ("{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", {"xs": [1, 2, 3, 4, 5]}),
    ("{% set ns = namespace(total=0, seen=[]) %}{% for x in [1,2,3] %}{% set ns.total = ns.total + x %}{% endfor %}{{ ns.total }}", {}),
    ("{% set a = 1 %}{% for x in [1] %}{% set a = 2 %}{{ a }}{% endfor %}{{ a }}", {}),
    ("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Ann') }} {{ greet('Bo', punct='?') }}", {}),
    ("{{ '  x  ' | trim }}|{{ 'a,b,,c'.split(',') }}|{{ '  a  b '.split() }}|{{ 'a b c'.split(' ', 1) }}|{{ 'xxhixx'.strip('x') }}", {}),
    ("{{ 'Hello'.upper() }}{{ 'Hello'.lower() }}{{ 'hello world'.title() }}{{ 'hELLO'.capitalize() }}{{ 'abc'.replace('b', 'X') }}", {}),
    ("{{ 'abc'.startswith('a') }}{{ 'abc'.endswith(('x', 'c')) }}{{ 'banana'.count('a') }}{{ 'banana'.find('n') }}{{ 'banana'.rfind('n') }}", {}),
    ("{{ xs | length }} {{ xs | first }} {{ xs | last }} {{ xs | join('-') }} {{ xs | reverse | list }} {{ xs | sum }}", {"xs": [3, 1, 2]}),
    ("{{ xs | sort }} {{ xs | unique | list }} {{ [1.5, 2] | sum }} {{ -3 | abs }} {{ 2.567 | round(2) }} {{ '42' | int + 1 }}", {"xs": [3, 1, 3, 2]}),
    ("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(', ') }}",
     {"ms": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}),
    ("{{ ms | rejectattr('tool') | list | length }} {{ ms | selectattr('tool') | list | length }}", {"ms": [{"tool": True}, {"tool": False}, {}]}),
    ("{{ x is defined }}{{ y is defined }}{{ x is none }}{{ 'a' is string }}{{ 1 is number }}{{ [1] is iterable }}{{ {} is mapping }}{{ 3 is odd }}{{ 4 is even }}{{ 6 is divisibleby 3 }}",
     {"x": None}),
    ("{{ d.a }}{{ d['b'] }}{{ d.get('c', 'z') }}{{ d.missing is defined }}{{ d | length }}", {"d": {"a": 1, "b": 2}}),
    (r"""{{ obj | tojson }}|{{ obj | tojson(indent=2) }}|{{ 'é\u00e9"\n' | tojson }}|{{ [] | tojson }}|{{ {} | tojson }}""",
     {"obj": {"b": [1, 2.5, None, True], "a": {"x": "y"}}}),
    ("{{ obj | tojson(separators=(',', ':')) }}|{{ obj | tojson(sort_keys=true) }}", {"obj": {"b": 1, "a": [1, 2]}}),
    ("{{ 'a' ~ 1 ~ none }}|{{ 'ab' * 3 }}|{{ [1] + [2] }}|{{ 'x' in 'xyz' }}|{{ 2 in [1, 2] }}|{{ 'k' in {'k': 1} }}|{{ 'q' not in 'xyz' }}", {}),
    ("{{ 'yes' if x else 'no' }}|{{ 'y' if not x }}|{{ x and 'a' or 'b' }}|{{ 1 < 2 < 3 }}|{{ 'b' > 'a' }}", {"x": 0}),
    ("{%- if true -%}\n  a\n{%- endif %}\n   {% if true %}\n  b\n  {% endif %}\nc {# comment #}\n  {# another #}\nd", {}),
    ("line1\n    {% if true %}\n    inner\n    {% endif %}\nline2 {{- ' x ' -}}  y", {}),
    ("{% set t %}block {{ 1 + 1 }}{% endset %}[{{ t }}]{{ t | length }}", {}),
    ("{{ raise_exception('bad role: ' ~ r) }}", {"r": "robot"}),
    ("{{ undefined_thing.attr }}", {}),
    ("{{ x + 1 }}", {}),
    ("{% for x in 5 %}{% endfor %}", {}),
    ("{{ 'abc'.nosuchmethod() }}", {}),
    ("{% unknowntag %}", {}),
    ("{{ x | nosuchfilter }}", {"x": 1}),
    (r"""{{ [1, [2, 'x']] }} {{ {'a': [1]} }} {{ 'it' 's' }} {{ "q'" }}""", {}),
    (r"""{{ '%d' }} {{ "a\tb" }} {{ 'x\'y' }}""", {}),
    ("{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %} {{ dict(x=1, y='z') | tojson }}", {}),
    ("{{ messages[0]['content'] }}{{ messages[-1].content | upper }}{{ messages | map(attribute='role') | list }}",
     {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]}),
    ("{{ 10 | string + 'x' }} {{ none | string }} {{ [1, 2] | string }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' == 'a' }}", {}),
    ("{{ x.y.z }}", {"x": {}}),
]


def snippet_cases(env_source_render):
    out = []
    for source, context in SNIPPETS:
        try:
            out.append({"source": source, "context": context, "output": env_source_render(source, context)})
        except Exception as e:
            out.append({"source": source, "context": context, "error": f"{type(e).__name__}: {e}"})
    return out


def fetch_templates(cache):
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, SDIST)
    if not os.path.exists(path):
        print(f"downloading {SDIST_URL}")
        with urllib.request.urlopen(SDIST_URL, timeout=600) as r, open(path + ".part", "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(path + ".part", path)
    dest = os.path.join(OUT, "templates")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    wanted = {f: name for name, (f, _) in TEMPLATES.items()}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if "/models/templates/" in m.name and base in wanted:
                data = tar.extractfile(m).read()
                with open(os.path.join(dest, wanted[base] + ".jinja"), "wb") as f:
                    f.write(data)
    missing = [n for n in TEMPLATES if not os.path.exists(os.path.join(dest, n + ".jinja"))]
    if missing:
        raise SystemExit(f"templates not found in {SDIST}: {missing}")


class FixedDatetime(real_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 15, 10, 30, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(ROOT, ".work", "llama-cpp-python"))
    args = ap.parse_args()
    fetch_templates(args.cache)

    import transformers.utils.chat_template_utils as ctu
    from transformers import PreTrainedTokenizerFast
    ctu.datetime = FixedDatetime
    ctu._compile_jinja_template.cache_clear()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ROOT, "Tests", "Fixtures", "tokenizers", "qwen2", "tokenizer.json"))

    out = {"tokenizer": "qwen2", "now": "2026-01-15T10:30:00", "conversations": CONVERSATIONS, "templates": {}}
    for name, (_, special) in TEMPLATES.items():
        source = open(os.path.join(OUT, "templates", name + ".jinja"), encoding="utf-8").read()
        cases = {}
        for conv_name, conv in CONVERSATIONS.items():
            kwargs = dict(special, **conv.get("kwargs", {}))
            try:
                text = tok.apply_chat_template(conv["messages"], tools=conv.get("tools"), chat_template=source, tokenize=False,
                                               add_generation_prompt=conv["add_generation_prompt"], **kwargs)
                ids = tok.apply_chat_template(conv["messages"], tools=conv.get("tools"), chat_template=source, tokenize=True,
                                              add_generation_prompt=conv["add_generation_prompt"], return_dict=False, **kwargs)
                if isinstance(ids, dict):
                    ids = ids["input_ids"]
                assert ids == tok(text, add_special_tokens=False)["input_ids"]
                cases[conv_name] = {"text": text, "ids": ids}
            except Exception as e:  # the template raised: record its message
                cases[conv_name] = {"error": str(e)}
        out["templates"][name] = {"special_tokens": special, "cases": cases}
        errors = sum(1 for c in cases.values() if "error" in c)
        print(f"{name}: {len(cases) - errors} rendered, {errors} raised")
    out["snippets"] = snippet_cases(lambda source, context: ctu._compile_jinja_template(source).render(**context))
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
