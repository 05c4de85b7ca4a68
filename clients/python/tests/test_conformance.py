"""Live answers validate against Protocol/openrpc.json's result schemas, the methods served are
exactly the methods documented, and the client's generated protocol module states the same tables
as the spec and the server."""
import json
import os

import jsonschema  # a test dependency (scripts/setup-python installs it): missing means failing, not skipping
import pytest

import ember
from ember import protocol

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DOC = json.load(open(os.path.join(ROOT, "Protocol", "openrpc.json")))
EXAMPLES = json.load(open(os.path.join(ROOT, "Protocol", "example_params.json")))
METHODS = {m["name"]: m for m in DOC["methods"]}


def validate(schema, value):
    root = dict(schema)
    root["components"] = DOC["components"]
    jsonschema.validate(value, root, cls=jsonschema.Draft202012Validator)


def test_served_methods_are_documented(client):
    assert client.info()["capabilities"] == list(METHODS)


def test_client_protocol_module_matches_the_spec_and_the_server(client):
    assert list(protocol.METHODS) == list(METHODS)
    for name, traits in protocol.METHODS.items():
        assert METHODS[name]["x-ember"] == traits, name
    assert protocol.ERROR_CODES == {e["data"]["kind"]: e["code"] for e in DOC["components"]["errors"].values()}
    assert protocol.VERSION == DOC["info"]["version"] == client.info()["version"] == ember.__version__
    # The retry set is the table's: exactly the methods that change nothing.
    assert protocol.RETRY_SAFE == {n for n, m in METHODS.items() if m["x-ember"]["retry_safe"]}
    assert protocol.RETRY_SAFE == {"server.info", "tokenize", "detokenize", "chat.render", "logprob", "checkpoint.list", "adapters.list",
                                  "weights.sync"}


def test_loss_defaults_come_from_the_server(client):
    defaults = client.loss_defaults()
    assert defaults == DOC["components"]["schemas"]["Loss"]["x-ember-defaults"]
    assert defaults["modes"]["lp_reg"]["min_p"] == 0.02 and defaults["modes"]["ppo"]["eps_high"] == 0.2
    with pytest.raises(ember.EmberError) as e:
        client.train_step(loss={"mode": "ppo", "eps_hihg": 0.28}, batch=[{"tokens": [1, 2, 3], "response_start": 1, "advantage": 1.0}],
                          dry_run=True)
    assert e.value.path == "params.loss.eps_hihg", "a misspelt loss option is refused, never ignored"


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
