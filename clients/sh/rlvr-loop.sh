#!/usr/bin/env bash
# A worked RLVR loop in shell: sample, check, train with Lp-Reg, all through ember-rpc.
# Task: "calc a+b=" problems (the default model's arithmetic task); the reward is 1 when the
# sampled text ends with "answer <a+b>".
# With EMBER_ADAPTER=NAME it trains a LoRA adapter of that name instead of the full model
# (created on first use with rank EMBER_LORA_RANK, default 16, on every projection): the same
# calls, each with "adapter": NAME.
#   EMBER_URL=http://127.0.0.1:8377 clients/sh/rlvr-loop.sh [STEPS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rpc() { "$here/ember-rpc" "$@"; }
steps=${1:-5}
n=8
adapter=""
if [ -n "${EMBER_ADAPTER:-}" ]; then
  rank=${EMBER_LORA_RANK:-16}
  if ! rpc adapters.list | jq -e --arg a "$EMBER_ADAPTER" '.adapters | any(.name == $a)' >/dev/null; then
    rpc adapters.create "{\"name\": \"$EMBER_ADAPTER\", \"rank\": $rank, \"alpha\": $((2 * rank))}" >/dev/null
  fi
  adapter=", \"adapter\": \"$EMBER_ADAPTER\""
fi
for step in $(seq 1 "$steps"); do
  # Four problems per step, eight samples each.
  problems=()
  for i in 1 2 3 4; do problems+=("$((RANDOM % 90 + 10)) $((RANDOM % 90 + 10))"); done
  prompts=$(for p in "${problems[@]}"; do set -- $p; echo "calc $1+$2="; done | jq -R . | jq -cs .)
  out=$(rpc generate "{\"prompts\": $prompts, \"n\": $n, \"max_tokens\": 48, \"temperature\": 1.0,
                      \"seed\": $step, \"proxy\": {\"min_p\": 0.02}$adapter}")
  # Reward each sample: the answer must be the sum.
  refs=$(jq -c --argjson sums "$(for p in "${problems[@]}"; do set -- $p; echo $(($1 + $2)); done | jq -cs .)" '
    [.results[] as $r | $r.samples[] |
      {rollout_id, group: ($r.prompt_index | tostring),
       reward: (if (.text | test("answer " + ($sums[$r.prompt_index] | tostring) + "\\s*$")) then 1 else 0 end)}]' <<<"$out")
  mean=$(jq '[.[].reward] | add / length' <<<"$refs")
  result=$(rpc train_step "{\"rollouts\": $refs, \"loss\": {\"mode\": \"lp_reg\"}, \"optimizer\": {\"lr\": 2e-5}$adapter}")
  rpc rollouts.release "{\"rollout_ids\": $(jq -c '[.[].rollout_id]' <<<"$refs")}" >/dev/null
  echo "step $step: reward $mean, weights_version $(jq .weights_version <<<"$result"), entropy $(jq .metrics.entropy <<<"$result"), lp_reg_regularized $(jq .metrics.lp_reg_regularized <<<"$result")"
done
