"""Live answers validate against Protocol/openrpc.json's result schemas, and the methods served
are exactly the methods documented."""
import json
import os

import pytest

jsonschema = pytest.importorskip("jsonschema")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DOC = json.load(open(os.path.join(ROOT, "Protocol", "openrpc.json")))
EXAMPLES = json.load(open(os.path.join(ROOT, "Protocol", "example_params.json")))
METHODS = {m["name"]: m for m in DOC["methods"]}


def validate(schema, value):
    root = dict(schema)
    root["components"] = DOC["components"]
    jsonschema.validate(value, root, cls=jsonschema.Draft202012Validator)


def test_served_methods_are_documented(client):
    assert set(client.info()["capabilities"]) == set(METHODS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_answers_match_result_schema(client, name):
    params = dict(EXAMPLES[name])
    if name == "detokenize":
        params = {"tokens": client.tokenize(text="hello")}
    result = client.call(name, params)
    validate(METHODS[name]["result"]["schema"], result)
    # Documented params are a superset of those used.
    assert set(params) <= {p["name"] for p in METHODS[name]["params"]}


def test_generate_with_every_output_matches_schema(client):
    r = client.generate(prompts=["hi", "there"], n=2, max_tokens=5, seed=1, entropy=True, top_logprobs=3,
                        proxy={"min_p": 0.1}, stop=["\n"])
    validate(METHODS["generate"]["result"]["schema"], r)
    ids = [s["rollout_id"] for x in r["results"] for s in x["samples"]]
    step = client.train_step(loss={"mode": "lp_reg"}, rollouts=[{"rollout_id": i, "reward": float(k % 2), "group": k // 2}
                                                                 for k, i in enumerate(ids)], dry_run=True)
    validate(METHODS["train_step"]["result"]["schema"], step)


def test_checkpoint_answers_match_schema(client):
    validate(METHODS["checkpoint.save"]["result"]["schema"], client.call("checkpoint.save", {"name": "schema-check"}))
    validate(METHODS["checkpoint.load"]["result"]["schema"], client.call("checkpoint.load", {"name": "schema-check"}))


def test_error_answers_match_error_data_schema(client):
    from ember import EmberError
    for method, params in [("generate", {"max_tokens": "x", "prompts": ["a"]}), ("checkpoint.load", {"name": "missing"}),
                           ("no.such", {}), ("train_step", {"rollouts": [{"rollout_id": "r-x", "reward": 1}], "loss": {"mode": "ppo"}})]:
        with pytest.raises(EmberError) as e:
            client.call(method, params)
        validate({"$ref": "#/components/schemas/ErrorData"}, e.value.data)
        codes = {v["code"] for v in DOC["components"]["errors"].values()}
        assert e.value.code in codes, f"{method}: code {e.value.code} is documented"
