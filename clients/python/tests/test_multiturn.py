"""Multi-turn rollouts keep the sampler's ids: three turns with user follow-ups in between, then
train_step on the assembled sequence with its loss mask recomputes the sampler's log-probabilities
bit for bit on every model token."""
from ember import Client
from ember.multiturn import Environment, TurnRenderer, parse_tool_calls, run_episode


class FollowUps(Environment):
    def __init__(self, turns=3):
        self.turns, self.seen = turns, 0

    def reset(self, seed):
        self.seen = 0
        return [{"role": "system", "content": "Count with me."}, {"role": "user", "content": "One."}]

    def step(self, text, tool_calls):
        self.seen += 1
        return [{"role": "user", "content": f"Next ({self.seen + 1})."}], self.seen >= self.turns

    def reward(self):
        return 1.0


def test_three_turns_train_on_the_sampled_ids(server):
    c = Client(server.url)
    ep = run_episode(c, FollowUps(), max_turns=3, max_tokens=5, seed=2, ignore_eos=True)
    assert len(ep.turns) == 3 and sum(ep.loss_mask) == 15
    assert len(ep.tokens) - ep.response_start == len(ep.loss_mask) == len(ep.logprobs)
    # The context between turns is the template's user turn, not model text.
    gaps, run = [], []
    for tok, m in zip(ep.tokens[ep.response_start:], ep.loss_mask):
        if m == 0:
            run.append(tok)
        elif run:
            gaps.append(run); run = []
    texts = [c.detokenize(tokens=g) for g in gaps]
    assert texts[0].startswith("<|im_end|>\n<|im_start|>user\nNext (2).<|im_end|>\n<|im_start|>assistant\n"), texts
    m = c.train_step(loss={"mode": "lp_reg"}, batch=[ep.train_item(1.0)], dry_run=True)["metrics"]
    assert m["tokens"] == 15
    assert m["logprob_max_abs_diff"] == 0.0, "the trainer sees the sampler's ids and log-probabilities"


def test_turn_renderer_finds_the_end_of_turn_marker(server):
    r = TurnRenderer(Client(server.url))
    assert r.end_of_turn == "<|im_end|>\n"
    tool = r.continuation([{"role": "tool", "content": "42"}], sampled_text_end="the answer<|im_end|>")
    assert tool.startswith("\n<|im_start|>user\n<tool_response>\n42\n</tool_response>"), tool
    assert parse_tool_calls('x <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> <tool_call>{bad}</tool_call>') == \
        [{"name": "f", "arguments": {"a": 1}}]
