"""Multi-turn rollouts, token in and token out.

An environment answers the model's turns (tool results, user follow-ups); the runner keeps every
token id exactly as the sampler produced it and appends only the newly rendered messages, so the
trainer scores the ids the sampler drew (no re-tokenization drift: docs/design-notes.md shows
which chat templates would not survive a re-render). Model tokens get loss_mask 1, the rest 0.

    env = MyEnvironment()
    episode = run_episode(client, env, max_turns=4, max_tokens=128, seed=1)
    client.train_step(loss={"mode": "lp_reg"}, batch=[episode.train_item(advantage)])
"""
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .client import Client

PLACEHOLDER = "\u2063ember-placeholder\u2063"


class Environment(ABC):
    """What a multi-turn task implements (an abstract interface: ToolArithEnvironment in
    ember.tasks.toolarith is one)."""

    tools: Optional[List[dict]] = None

    @abstractmethod
    def reset(self, seed: int) -> List[dict]:
        """The opening messages (system, user, ...)."""

    @abstractmethod
    def step(self, text: str, tool_calls: List[dict]) -> Tuple[List[dict], bool]:
        """The model's turn (its text and parsed tool calls) in; the messages that follow (tool
        results, a user turn) and whether the episode is over out."""

    @abstractmethod
    def reward(self) -> float:
        """The episode's reward, once it is over."""


@dataclass
class Episode:
    tokens: List[int]
    response_start: int
    loss_mask: List[int]
    logprobs: List[float]  # sampler log-probability per response token (0.0 where masked)
    turns: List[str] = field(default_factory=list)
    reward: float = 0.0
    # The oldest weights version any of its turns was sampled under (a replica may move on
    # between turns; each token's log-probability is that of the weights that drew it).
    weights_version: Optional[int] = None

    def train_item(self, advantage: float) -> dict:
        """A train_step batch item: model tokens trained with their sampling log-probabilities."""
        item = {"tokens": self.tokens, "response_start": self.response_start, "advantage": advantage,
                "loss_mask": self.loss_mask, "old_logprobs": self.logprobs}
        if self.weights_version is not None:
            item["weights_version"] = self.weights_version
        return item


def parse_tool_calls(text: str) -> List[dict]:
    """Hermes-style <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (malformed
    ones are skipped)."""
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S):
        try:
            obj = json.loads(body)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append({"name": obj["name"], "arguments": obj.get("arguments", {})})
    return calls


class TurnRenderer:
    """Renders the messages that follow an assistant turn, and only them. The template renders a
    stand-in history ([user, assistant], the assistant with a tool call when tool results follow)
    with and without the new messages; what the new messages add is the difference. The
    assistant's end-of-turn marker (e.g. "<|im_end|>\n") goes first, minus what the sampled
    answer already ends with (the model's EOS token is that marker)."""

    def __init__(self, client: Client, tools: Optional[List[dict]] = None, template_kwargs: Optional[dict] = None):
        self.client, self.tools, self.kwargs = client, tools, template_kwargs
        self.plain = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PLACEHOLDER}]
        self.calling = [{"role": "user", "content": "u"},
                        {"role": "assistant", "content": PLACEHOLDER,
                         "tool_calls": [{"id": "call0", "type": "function", "function": {"name": "f", "arguments": {}}}]}]
        closed = self._render(self.plain, False)
        self.end_of_turn = closed[closed.index(PLACEHOLDER) + len(PLACEHOLDER):]

    def _render(self, messages, generation_prompt):
        return self.client.chat_render(messages, tools=self.tools, add_generation_prompt=generation_prompt,
                                       template_kwargs=self.kwargs)["text"]

    def continuation(self, messages: List[dict], sampled_text_end: str) -> str:
        base = self.calling if any(m.get("role") == "tool" for m in messages) else self.plain
        before, full = self._render(base, False), self._render(base + messages, True)
        if not full.startswith(before):
            raise ValueError("the chat template renders history differently once messages follow; "
                             "its turns cannot be appended token by token")
        eot = self.end_of_turn
        for k in range(len(eot), 0, -1):
            if sampled_text_end.endswith(eot[:k]):
                eot = eot[k:]
                break
        return eot + full[len(before):]


def run_episode(client: Client, env: Environment, max_turns: int = 4, max_tokens: int = 128, temperature: float = 1.0,
                seed: int = 0, adapter: Optional[str] = None, template_kwargs: Optional[dict] = None,
                ignore_eos: bool = False) -> Episode:
    """One episode (run_episodes with a single environment)."""
    return run_episodes(client, [env], max_turns=max_turns, max_tokens=max_tokens, temperature=temperature, seed=seed,
                        adapter=adapter, template_kwargs=template_kwargs, ignore_eos=ignore_eos)[0]


def run_episodes(client: Client, envs: Sequence[Environment], max_turns: int = 4, max_tokens: int = 128,
                 temperature: float = 1.0, seed: int = 0, adapter: Optional[str] = None,
                 template_kwargs: Optional[dict] = None, ignore_eos: bool = False, proxy: Optional[dict] = None,
                 max_len: Optional[int] = None) -> List[Episode]:
    """Runs many episodes together: each turn is one `generate` call over every episode still
    going (the server decodes them as one batch), so a step of multi-turn RL costs about as many
    generate calls as the longest episode has turns. Turn t samples with seed `seed * 1000 + 10 t` (+ g for the
    g-th token budget when some episodes near max_len get a smaller one)
    (the server derives each sequence's stream from it and the sequence's place in the call), so
    a run is reproducible from `seed` and the environments.

    Environments that share `tools` share one renderer. An episode ends when its environment says
    so, after `max_turns` model turns, or when the next turn would not fit in `max_len` tokens
    (the server's --max-seq-len; default: the server's, from server.info)."""
    if max_len is None:
        max_len = client.info()["limits"]["max_seq_len"]
    renderers: Dict[str, TurnRenderer] = {}
    state = []
    for k, env in enumerate(envs):
        messages = env.reset(seed * 1000003 + k)
        prompt = client.chat_render(messages, tools=env.tools, add_generation_prompt=True,
                                    template_kwargs=template_kwargs)["tokens"]
        if len(prompt) >= max_len:
            raise ValueError(f"episode {k}: its prompt is {len(prompt)} tokens and leaves no room under the server's "
                             f"--max-seq-len {max_len}; raise --max-seq-len or shorten the system prompt and tools")
        state.append({"tokens": list(prompt), "start": len(prompt), "mask": [], "logprobs": [], "turns": [], "done": False,
                      "versions": []})
    for turn in range(max_turns):
        active = [k for k, s in enumerate(state) if not s["done"]]
        if not active:
            break
        # One call per distinct token budget (an episode near max_len gets fewer new tokens);
        # usually every episode has the full budget and the turn is a single call.
        budgets: Dict[int, List[int]] = {}
        for k in active:
            budgets.setdefault(min(max_tokens, max_len - len(state[k]["tokens"])), []).append(k)
        results: Dict[int, dict] = {}
        for g, (budget, ks) in enumerate(sorted(budgets.items(), reverse=True)):
            out = client.generate(prompt_tokens=[state[k]["tokens"] for k in ks], n=1, max_tokens=budget,
                                  temperature=temperature, seed=seed * 1000 + turn * 10 + g, adapter=adapter,
                                  ignore_eos=ignore_eos, proxy=proxy)
            results.update(zip(ks, out["results"]))
        ends = client.detokenize(token_lists=[results[k]["samples"][0]["tokens"][-4:] for k in active])
        for k, end in zip(active, ends):
            r = results[k]
            s, sample = state[k], r["samples"][0]
            s["tokens"] += sample["tokens"]
            s["mask"] += [1] * len(sample["tokens"])
            s["logprobs"] += sample["logprobs"] if sample.get("logprobs") is not None else [0.0] * len(sample["tokens"])
            s["turns"].append(sample["text"])
            if sample.get("weights_version") is not None:
                s["versions"].append(sample["weights_version"])
            env = envs[k]
            following, done = env.step(sample["text"], parse_tool_calls(sample["text"]))
            if done or turn == max_turns - 1:
                s["done"] = True
                continue
            # Only the new messages are rendered and tokenized; the sampled ids stay as drawn.
            key = json.dumps(env.tools, sort_keys=True)
            if key not in renderers:
                renderers[key] = TurnRenderer(client, env.tools, template_kwargs)
            added = client.tokenize(text=renderers[key].continuation(following, end), add_special_tokens=False)
            if len(s["tokens"]) + len(added) + 1 > max_len:
                s["done"] = True   # no room for another model turn: the episode ends as it stands
                continue
            s["tokens"] += added
            s["mask"] += [0] * len(added)
            s["logprobs"] += [0.0] * len(added)
    return [Episode(tokens=s["tokens"], response_start=s["start"], loss_mask=s["mask"], logprobs=s["logprobs"],
                    turns=s["turns"], reward=env.reward(), weights_version=min(s["versions"]) if s["versions"] else None)
            for s, env in zip(state, envs)]
