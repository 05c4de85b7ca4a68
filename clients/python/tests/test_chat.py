"""The chat routes against the live server: chat.render equals transformers' apply_chat_template
is checked by the Swift fixtures; here the OpenAI SDK's chat client, streaming, logprobs,
usage, errors, and the RPC's chat.render / generate(messages=) agree with each other."""
import json
import urllib.error
import urllib.request

import pytest

from ember import Client, EmberError

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_chat_render_and_generate_with_messages(server):
    c = Client(server.url)
    r = c.chat_render(CONVERSATION)
    assert r["text"].startswith("<|im_start|>system\nYou are terse.") and r["text"].endswith("<|im_start|>assistant\n")
    assert r["tokens"] == c.tokenize(text=r["text"], add_special_tokens=False)
    a = c.generate(messages=CONVERSATION, max_tokens=5, seed=7, ignore_eos=True)
    b = c.generate(prompt_tokens=[r["tokens"]], max_tokens=5, seed=7, ignore_eos=True)
    assert a["results"][0]["prompt_tokens"] == r["tokens"]
    assert a["results"][0]["samples"][0]["tokens"] == b["results"][0]["samples"][0]["tokens"]
    with pytest.raises(EmberError) as e:
        c.chat_render([{"role": "wizard", "content": "x"}])
    assert e.value.kind == "invalid_params" and e.value.path == "params.messages[0].role"


def test_openai_sdk_chat_client(server):
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert r.usage.prompt_tokens == len(Client(server.url).chat_render(CONVERSATION)["tokens"])
    # Streaming gives the same text, then usage.
    chunks = list(client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # Two samples, and tools offered (the answer is parsed for tool calls; a random model makes none).
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    r = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=4, n=2, seed=1, tools=tools)
    assert [c.index for c in r.choices] == [0, 1]
    streamed = list(client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=4, tools=tools, stream=True))
    assert any(ch.choices and ch.choices[0].finish_reason for ch in streamed)
    # A named tool_choice shows the template that tool alone; "none" shows none.
    two = tools + [{"type": "function", "function": {"name": "mul", "parameters": {"type": "object", "properties": {}}}}]
    c = Client(server.url)
    for choice, shown in [({"type": "function", "function": {"name": "mul"}}, two[1:]), ("none", None), ("auto", two)]:
        r = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=1, tools=two, tool_choice=choice)
        assert r.usage.prompt_tokens == len(c.chat_render(CONVERSATION, tools=shown)["tokens"]), choice
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=1, tools=two,
                                       tool_choice={"type": "function", "function": {"name": "div"}})
    assert e.value.body["param"] == "tool_choice.function.name"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user"}], max_tokens=2)
    assert e.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CONVERSATION, max_tokens=2)


def test_chat_route_refuses_bad_bodies_with_400(server):
    for body, param in [(b"[1]", "body"), (json.dumps({"messages": CONVERSATION, "bogus": 1}).encode(), "bogus"),
                        (json.dumps({"messages": CONVERSATION, "response_format": {"type": "json_object"}}).encode(),
                         "response_format.type"),
                        (json.dumps({"messages": [{"role": "tool", "content": "5"}]}).encode(), "messages[0]")]:
        req = urllib.request.Request(server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400
        err = json.load(e.value)["error"]
        assert err["param"] == param, err
