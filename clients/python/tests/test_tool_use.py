"""Tool use with the embedded default model, which its script taught a chat template and the
calculator tool: an agents SDK from PyPI (openai-agents) runs its tool loop against
/v1/chat/completions, and `python -m ember.rl --task tool-arith` trains on episodes, token in and
token out (the trainer's log-probabilities equal the sampler's on every model token)."""
import asyncio
import json
import math
import os

from ember import Client, rl, tasks
from ember.multiturn import run_episodes
from ember.tasks.toolarith import CALCULATOR, USE_TOOL, calculate

PROBLEM = "calc 37*48-19+6*12="


def test_the_default_model_calls_the_calculator_through_the_chat_api(default_server):
    import openai
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    messages = [{"role": "system", "content": USE_TOOL}, {"role": "user", "content": PROBLEM}]
    r = client.chat.completions.create(model="ember-default", messages=messages, tools=[CALCULATOR], temperature=0,
                                       max_tokens=64)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "calculate" and json.loads(call.function.arguments) == {"expression": "37*48-19+6*12"}
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": calculate("37*48-19+6*12")}]
    r = client.chat.completions.create(model="ember-default", messages=messages, tools=[CALCULATOR], temperature=0,
                                       max_tokens=16)
    assert r.choices[0].message.content == "answer 1829" and r.choices[0].finish_reason == "stop"


def test_an_agents_sdk_runs_its_tool_loop_against_the_chat_api(default_server):
    import agents   # openai-agents, a test extra
    from openai import AsyncOpenAI
    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool(name_override="calculate")
    def calculate_tool(expression: str) -> str:
        """Evaluate an arithmetic expression of integers with + - * and parentheses."""
        seen.append(expression)
        return calculate(expression)

    model = agents.OpenAIChatCompletionsModel(model="ember-default",
                                              openai_client=AsyncOpenAI(base_url=default_server.url + "/v1", api_key="x"))
    agent = agents.Agent(name="calculator", instructions=USE_TOOL, model=model, tools=[calculate_tool],
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=64))
    result = asyncio.run(agents.Runner.run(agent, PROBLEM, max_turns=4))
    assert seen == ["37*48-19+6*12"], "the agent called the tool the model asked for"
    assert result.final_output == "answer 1829"


def test_tool_arith_rl_trains_on_episodes(default_server, tmp_path):
    out = str(tmp_path / "run")
    assert rl.main(["--server", default_server.url, "--task", "tool-arith", "--steps", "2", "--prompts", "4",
                    "--samples", "4", "--max-tokens", "64", "--eval-every", "2", "--eval-size", "8", "--eval-k", "2",
                    "--probes", "4", "--lr", "1e-4", "--out", out]) == 0
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["weights_version"] for m in metrics] == [metrics[0]["weights_version"], metrics[0]["weights_version"] + 1]
    assert all(m["logprob_max_abs_diff"] == 0.0 for m in metrics), "the trainer scores the ids the sampler drew"
    assert all(math.isfinite(m[k]) for m in metrics for k in ("reward", "entropy", "loss", "grad_norm"))
    evals = [json.loads(l) for l in open(os.path.join(out, "eval.jsonl"))]
    assert 0 < evals[0]["spark_prob"] < 1 and 0 <= evals[0]["tool_rate"] <= 1
    assert {"pass@1", "pass@2"} <= set(evals[-1])


def test_episodes_mask_tool_results_and_keep_the_sampled_ids(default_server):
    c = Client(default_server.url)
    task = tasks.get("tool-arith")
    problems = tasks.sample(task, "heldout", 6, 5)
    episodes = run_episodes(c, [task.environment(p) for p in problems for _ in range(2)], max_turns=3, max_tokens=64,
                            temperature=1.0, seed=3)
    called = [e for e in episodes if len(e.turns) > 1]
    assert called, "some episodes call the tool"
    for e in called:
        text = c.detokenize(tokens=e.tokens[e.response_start:])
        assert "<|im_start|>tool\n" in text
        masked = c.detokenize(tokens=[t for t, m in zip(e.tokens[e.response_start:], e.loss_mask) if m == 0])
        assert masked.startswith("\n<|im_start|>tool\n"), masked
    m = c.train_step(loss={"mode": "ppo"}, batch=[e.train_item(1.0 if e.reward else -1.0) for e in episodes],
                     dry_run=True)["metrics"]
    assert m["tokens"] == sum(sum(e.loss_mask) for e in episodes)
    assert m["logprob_max_abs_diff"] == 0.0
