"""Writes Protocol/openrpc.json (OpenRPC 1.3) and clients/python/ember/protocol.py.

The server's own tables are the source: `ember-server --protocol` prints every method with its
traits (scheduling, mutates, retry_safe, large_bodies), every error kind with its code, message and
HTTP status, the loss options' defaults and the version. This script adds what only a document
needs (summaries, parameter schemas, examples) and refuses to run when its method list and the
server's differ. Tests compare the outputs with the server's tables, so a method added on one
side only fails the suite.
Run: swift build -c release --product ember-server && python3 scripts/make_openrpc.py"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}

NUM = {"type": "number"}
NUM_OR_NULL = {"type": ["number", "null"]}
INT = {"type": "integer"}
NONNEG = {"type": "integer", "minimum": 0}

schemas = {
    "TokenId": {"type": "integer", "minimum": 0, "description": "A token id in the model's vocabulary."},
    "TokenList": {"type": "array", "items": ref("TokenId")},
    "WeightsVersion": {"type": "integer", "minimum": 0,
                       "description": "+1 per optimizer step; 0 when a model is loaded; restored by checkpoint.load."},
    "PerTokenFloats": {"type": "array", "items": NUM_OR_NULL,
                       "description": "One entry per response token: entry k belongs to tokens[response_start + k]. "
                                      "Non-finite values (a proxy log-probability of a token outside the proxy's support) are null."},
    "TopLogprobs": {"type": "array", "description": "Per response token, the most likely alternatives, most likely first.",
                    "items": {"type": "array", "items": {"type": "object", "required": ["token", "logprob"],
                                                         "additionalProperties": False,
                                                         "properties": {"token": ref("TokenId"), "logprob": NUM}}}},
    "Proxy": {"type": "object", "additionalProperties": False,
              "description": "Lp-Reg proxy distribution: min-p filter with kappa (keep tokens with p >= kappa * max p) or a fixed "
                             "probability threshold tau; the kept mass is renormalised.",
              "oneOf": [{"required": ["min_p"]}, {"required": ["threshold"]}],
              "properties": {"min_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                             "threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}},
    "Sequence": {"type": "object", "required": ["tokens", "response_start"], "additionalProperties": False,
                 "properties": {"tokens": ref("TokenList"),
                                "response_start": {"type": "integer", "minimum": 1,
                                                   "description": "Index of the first response token."}}},
    "Sample": {"type": "object", "required": ["rollout_id", "tokens", "text", "finish_reason", "weights_version"], "additionalProperties": False,
               "properties": {"rollout_id": {"type": ["string", "null"], "description": "Id in the rollout store (train_step can refer to it)."},
                              "weights_version": {"$ref": "#/components/schemas/WeightsVersion",
                                                  "description": "The weights every token of this sample was drawn under."},
                              "tokens": ref("TokenList"), "text": {"type": "string"},
                              "finish_reason": {"enum": ["stop", "eos", "length"]},
                              "logprobs": ref("PerTokenFloats"), "entropies": ref("PerTokenFloats"),
                              "proxy_logprobs": ref("PerTokenFloats"), "top_logprobs": ref("TopLogprobs")}},
    "Scores": {"type": "object", "required": ["logprobs"], "additionalProperties": False,
               "properties": {"logprobs": ref("PerTokenFloats"), "entropies": ref("PerTokenFloats"),
                              "proxy_logprobs": ref("PerTokenFloats"), "top_logprobs": ref("TopLogprobs"),
                              "probe_logprobs": {"type": "array", "items": {"type": "array", "items": NUM},
                                                 "description": "Per response position, the log-probability of each of "
                                                                "probe_tokens, in the order given."}}},
    "OptimizerSettings": {"type": "object", "additionalProperties": False,
                          "properties": {"lr": {"type": "number", "minimum": 0},
                                         "betas": {"type": "array", "items": NUM, "minItems": 2, "maxItems": 2},
                                         "eps": {"type": "number", "minimum": 0},
                                         "weight_decay": {"type": "number", "minimum": 0},
                                         "grad_clip": {"type": "number", "minimum": 0, "description": "Global norm; 0 = off."}}},
    "Schedule": {"type": "object", "required": ["type"], "additionalProperties": False,
                 "properties": {"type": {"enum": ["constant", "linear_warmup", "cosine"]}, "warmup_steps": NONNEG,
                                "total_steps": {"type": "integer", "minimum": 1}, "min_lr": {"type": "number", "minimum": 0}}},
    "Loss": {"type": "object", "required": ["mode"], "additionalProperties": False,
             "description": "Loss mode and options (docs/lp-reg.md states every loss exactly). Defaults follow the paper's recipe where it has one.",
             "properties": {
                 "mode": {"enum": ["lp_reg", "ppo", "gspo", "clip_cov", "kl_cov", "high_entropy", "cispo", "cross_entropy"]},
                 "eps_low": {"type": "number", "minimum": 0, "description": "Lower clip range: the ratio is clipped below at 1 - eps_low."},
                 "eps_high": {"type": "number", "minimum": 0, "description": "Upper clip range (Clip-Higher raises it)."},
                 "dual_clip": {"type": "number", "minimum": 1, "description": "Dual-clip constant c (off when absent)."},
                 "min_p": {"type": "number", "minimum": 0, "maximum": 1, "description": "lp_reg proxy kappa."},
                 "threshold": {"type": "number", "minimum": 0, "maximum": 1, "description": "lp_reg fixed proxy threshold instead of min_p."},
                 "rho": {"type": "number", "minimum": 0, "maximum": 1, "description": "lp_reg: fraction of negative-advantage tokens regularised."},
                 "rho_pos": {"type": "number", "minimum": 0, "maximum": 1, "description": "lp_reg: same for positive-advantage tokens."},
                 "beta": {"type": "number", "description": "lp_reg KL coefficient."},
                 "kl": {"enum": ["k3", "full"], "description": "lp_reg: k3 estimator on the sampled token, or the full-vocabulary KL."},
                 "selection": {"enum": ["batch", "micro_batch"]},
                 "percentile_over": {"enum": ["negative", "all"]},
                 "skip_k_le_1": {"type": "boolean", "description": "Reference-code quirk: no selection when the quota k <= 1."},
                 "fraction": {"type": "number", "minimum": 0, "maximum": 1, "description": "high_entropy: top-entropy fraction trained."},
                 "ratio": {"type": "number", "minimum": 0, "maximum": 1, "description": "clip_cov / kl_cov: fraction of tokens."},
                 "cov_low": NUM, "cov_high": NUM, "coef": NUM,
                 "agg": {"enum": ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]},
                 "temperature": {"type": "number", "minimum": 0, "description": "Temperature of the trained log-probabilities."},
                 "entropy_coef": NUM, "kl_coef": {"type": "number", "minimum": 0, "description": "KL to the reference snapshot."},
                 "kl_type": {"enum": ["k1", "k2", "k3"]}}},
    "TrainItem": {"type": "object", "required": ["tokens", "response_start"], "additionalProperties": False,
                  "properties": {"tokens": ref("TokenList"), "response_start": {"type": "integer", "minimum": 1},
                                 "advantage": {"oneOf": [NUM, {"type": "array", "items": NUM}],
                                               "description": "One number for the whole response or one per response token (ignored by cross_entropy)."},
                                 "old_logprobs": {"type": "array", "items": NUM_OR_NULL},
                                 "proxy_logprobs": {"type": "array", "items": NUM_OR_NULL},
                                 "ref_logprobs": {"type": "array", "items": NUM_OR_NULL},
                                 "loss_mask": {"type": "array", "items": {"enum": [0, 1]},
                                               "description": "One per response token: 1 trained, 0 context only (no loss term, "
                                                              "not counted by any aggregation or selection), e.g. tool results in "
                                                              "a multi-turn rollout. Default: all 1."},
                                 "weights_version": {"type": "integer", "minimum": 0,
                                                     "description": "The weights version the sequence was sampled under (a replica's "
                                                                    "generate states it per sample): metrics.staleness counts sequences "
                                                                    "by the trainer's version minus this one."}}},
    "RolloutReward": {"type": "object", "required": ["rollout_id", "reward"], "additionalProperties": False,
                      "properties": {"rollout_id": {"type": "string"}, "reward": NUM,
                                     "group": {"type": ["string", "integer"], "description": "Advantages are normalised within a group (e.g. one prompt)."}}},
    "Metrics": {"type": "object", "additionalProperties": True,
                "required": ["loss", "pg_loss", "entropy", "clipfrac_low", "clipfrac_high", "ppo_kl", "grad_norm", "lr", "tokens",
                             "lp_reg_selected", "lp_reg_regularized", "logprob_max_abs_diff"],
                "properties": {"loss": NUM_OR_NULL, "pg_loss": NUM_OR_NULL, "entropy": NUM_OR_NULL,
                               "clipfrac_low": NUM, "clipfrac_high": NUM, "ppo_kl": NUM_OR_NULL, "kl_ref": NUM_OR_NULL,
                               "grad_norm": NUM_OR_NULL, "lr": NUM, "tokens": NONNEG, "lp_reg_selected": NONNEG,
                               "lp_reg_regularized": NONNEG, "lp_reg_threshold": NUM_OR_NULL,
                               "proxy_noise_mass": {"type": "number", "minimum": 0, "maximum": 1,
                                                    "description": "Mean over response tokens of the probability the proxy (Lp-Reg's, "
                                                                   "else the default min-p) drops as noise."},
                               "low_prob_proxy_kept": {"type": "number", "minimum": 0, "maximum": 1,
                                                       "description": "Of the lowest-probability rho share of negative-advantage tokens, "
                                                                      "the fraction the proxy keeps (absent when there were none)."},
                               "lp_reg_tokens": {"type": "object", "additionalProperties": NONNEG,
                                                 "description": "lp_reg: which tokens were regularised, token id -> count."},
                               "lp_reg_probability_buckets": {"type": "array", "items": NONNEG, "minItems": 5, "maxItems": 5,
                                                              "description": "lp_reg: the regularised tokens by current probability, "
                                                                             "counts in [0, 1e-4), [1e-4, 1e-3), [1e-3, 1e-2), [1e-2, 0.1), [0.1, 1]."},
                               "logprob_max_abs_diff": NUM_OR_NULL, "optimizer_steps": NONNEG,
                               "seconds_forward": NUM, "seconds_backward": NUM, "seconds_optimizer": NUM,
                               "rollout_is_mean": NUM, "rollout_is_min": NUM, "rollout_is_max": NUM,
                               "rollout_corrected_fraction": {"type": "number", "minimum": 0, "maximum": 1,
                                                              "description": "With rollout_correction: the importance ratios pi_old/pi_sampler "
                                                                             "(per token, or per sequence) before truncation, and the share "
                                                                             "truncated or masked."},
                               "staleness": {"type": "object", "additionalProperties": NONNEG,
                                             "description": "Sequences by staleness (the trainer's weights version minus the one each "
                                                            "was sampled under), for items that state it and for rollouts."}}},
    "Adapter": {"type": "object", "required": ["name", "rank", "alpha", "use_rslora", "target_modules", "modules", "parameters",
                                               "weights_version", "optimizer_steps"],
                "properties": {"name": {"type": "string"}, "rank": INT, "alpha": NUM, "use_rslora": {"type": "boolean"},
                               "target_modules": {"type": "array", "items": {"type": "string"}},
                               "modules": {"type": "integer", "description": "Projections adapted (over all layers)."},
                               "parameters": INT, "weights_version": ref("WeightsVersion"), "optimizer_steps": INT}},
    "ChatMessage": {"type": "object", "required": ["role"],
                    "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                                   "content": {"type": ["string", "array", "null"]},
                                   "tool_calls": {"type": "array", "items": {"type": "object"}},
                                   "tool_call_id": {"type": "string"}, "name": {"type": "string"},
                                   "reasoning_content": {"type": "string"}}},
    "ErrorData": {"type": "object", "required": ["kind"],
                  "properties": {"kind": {"type": "string"}, "path": {"type": "string"}, "hint": {"type": "string"}}},
}

# Example paths shown in the spec's error entries (documentation only).
ERROR_EXAMPLE_PATHS = {"method_not_found": "method", "invalid_params": "params.max_tokens", "context_overflow": "params.prompts[0]",
                       "unknown_rollout": "params.rollouts[0].rollout_id", "evicted_rollout": "params.rollouts[0].rollout_id",
                       "read_only": "method", "checkpoint_not_found": "params.name", "checkpoint_failed": "params.name",
                       "request_too_large": "params.max_tokens", "model_not_found": "model", "unknown_adapter": "params.adapter",
                       "adapter_exists": "params.name", "sync_failed": "params.version"}


def error_name(kind):
    return "".join(part.capitalize() for part in kind.split("_"))


def make_errors(table):
    out = {}
    for e in table["errors"]:
        data = {"kind": e["kind"]}
        if e["kind"] in ERROR_EXAMPLE_PATHS:
            data["path"] = ERROR_EXAMPLE_PATHS[e["kind"]]
        out[error_name(e["kind"])] = {"code": e["code"], "message": e["message"], "data": data,
                                      "x-ember-http-status": e["http_status"]}
    return out


def eref(name):
    return {"$ref": f"#/components/errors/{name}"}

def p(name, schema, description="", required=False):
    return {"name": name, "required": required, "description": description, "schema": schema}

def obj(props, required=()):
    return {"type": "object", "required": list(required), "additionalProperties": False, "properties": props}

COMMON = ["InvalidParams", "InternalError", "Unauthorized", "ShuttingDown"]
sampling_outputs = [
    p("logprobs", {"type": "boolean", "default": True}, "Report each sampled token's log-probability."),
    p("top_logprobs", {"type": "integer", "minimum": 0, "maximum": 20, "default": 0}, "Top alternatives per token."),
    p("entropy", {"type": "boolean", "default": False}, "Report the entropy of each token's distribution."),
    p("proxy", ref("Proxy"), "Report each token's Lp-Reg proxy log-probability."),
]

ADAPTER = p("adapter", {"type": "string"}, "A LoRA adapter's name (adapters.create / adapters.load): run under it, "
            "or for training and the optimizer, update it with the base frozen. Absent: the base model.")
ADAPTER_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$",
                "description": "Letters, digits, '.', '_', '-'; no leading dot, no '..', no '.v'."}

methods = [
    {"name": "server.info", "summary": "Server, model and weights version.",
     "params": [],
     "result": {"name": "info", "schema": obj({
         "name": {"const": "ember"}, "version": {"type": "string"}, "weights_version": ref("WeightsVersion"),
         "model": {"type": "object", "required": ["model_type", "parameters", "layers", "hidden_size", "vocab_size", "max_position_embeddings"],
                   "properties": {"model_type": {"type": "string"}, "parameters": INT, "layers": INT, "hidden_size": INT,
                                  "vocab_size": INT, "max_position_embeddings": INT, "heads": INT, "kv_heads": INT, "head_dim": INT,
                                  "tied_embeddings": {"type": "boolean"}}},
         "capabilities": {"type": "array", "items": {"type": "string"}, "description": "The methods served."},
         "loss_defaults": {"type": "object", "description": "Every loss mode's options and their defaults (null: off unless given): "
                                                            "{common: {...}, modes: {mode: {...}}}. Clients read defaults here."},
         "weights_dtype": {"type": "string", "enum": ["f32", "bf16"],
                           "description": "How the weights are held (--weights-dtype): bf16 rounds every weight to bfloat16, "
                                          "decodes from bf16 panels and trains a float32 master."},
         "kernels": {"type": "object", "description": "Ember's kernel set in use (set: avx2 or avx512, chosen from CPUID or "
                                                      "EMBER_KERNELS; every set gives the same bits), the sets this CPU runs, "
                                                      "which GEMM runs the backward (ember, or openblas with "
                                                      "EMBER_BACKWARD_GEMM=openblas) and OpenBLAS's own kernel set.",
                     "properties": {"set": {"type": "string", "enum": ["avx2", "avx512"]},
                                    "supported": {"type": "array", "items": {"type": "string"}},
                                    "backward_gemm": {"type": "string", "enum": ["ember", "openblas"]},
                                    "blas": {"type": "string"}}},
         "limits": {"type": "object", "description": "What one request may use: max_seq_len, the tokens (prompt + generated) "
                                                     "one sequence may hold in the KV cache (--max-seq-len); slots, the "
                                                     "sequences decoded together (--slots).",
                    "properties": {"max_seq_len": INT, "slots": INT}},
         "role": {"type": "string", "enum": ["trainer", "replica"],
                  "description": "replica: started with --follow; read-only to its clients, its weights follow its trainer's."},
         "following": {"type": ["string", "null"], "description": "The trainer a replica follows (--follow URL); null on a trainer."},
         "world_size": {"type": "integer", "minimum": 1, "description": "Ranks of the trainer (MPI); 1 without MPI."},
         "data_parallel": {"type": ["object", "null"],
                           "description": "A data-parallel trainer (started by mpirun; null otherwise): each rank's host, the "
                                          "micro-batches a mini-batch is cut into without micro_batch_tokens (--dp-micro-batches), "
                                          "the seconds a rank may stay silent (--dp-timeout), and why the trainer is degraded "
                                          "once a rank died or hung (null until then).",
                           "properties": {"hosts": {"type": "array", "items": {"type": "string"}}, "micro_batches": INT,
                                          "timeout": {"type": "number"}, "degraded": {"type": ["string", "null"]}}}},
         ["name", "version", "weights_version", "model", "capabilities", "limits", "role", "following", "world_size", "data_parallel"])},
     "errors": ["Unauthorized"],
     "example": ({}, None)},
    {"name": "tokenize", "summary": "Text to token ids with the model's tokenizer.",
     "params": [p("text", {"type": "string"}), p("texts", {"type": "array", "items": {"type": "string"}}),
                p("add_special_tokens", {"type": "boolean", "default": True}, "Apply the tokenizer's post-processor (e.g. BOS).")],
     "result": {"name": "tokens", "schema": {"oneOf": [obj({"tokens": ref("TokenList")}, ["tokens"]),
                                                        obj({"token_lists": {"type": "array", "items": ref("TokenList")}}, ["token_lists"])]}},
     "errors": COMMON + ["NoTokenizer"],
     "example": ({"text": "hello"}, None)},
    {"name": "detokenize", "summary": "Token ids to text.",
     "params": [p("tokens", ref("TokenList")), p("token_lists", {"type": "array", "items": ref("TokenList")}),
                p("skip_special_tokens", {"type": "boolean", "default": False})],
     "result": {"name": "text", "schema": {"oneOf": [obj({"text": {"type": "string"}}, ["text"]),
                                                      obj({"texts": {"type": "array", "items": {"type": "string"}}}, ["texts"])]}},
     "errors": COMMON + ["NoTokenizer"],
     "example": ({"tokens": [1, 2, 3]}, None)},
    {"name": "chat.render", "summary": "Render a conversation with the model's chat template, as transformers' apply_chat_template does.",
     "description": "The template comes from the model folder (chat_template.jinja, or tokenizer_config.json's chat_template). "
                    "Messages and tools keep the key order the client sent. The tokens are the text's ids without added special "
                    "tokens (the template writes them). A template's raise_exception answers invalid_params at params.messages.",
     "params": [p("messages", {"type": "array", "items": ref("ChatMessage"), "minItems": 1}, required=True),
                p("tools", {"type": "array", "items": {"type": "object"}}, "Tool schemas ({type: \"function\", function: {name, description, parameters}})."),
                p("add_generation_prompt", {"type": "boolean", "default": True}),
                p("template_kwargs", {"type": "object"}, "Extra template variables, e.g. {\"enable_thinking\": false}.")],
     "result": {"name": "rendered", "schema": obj({"text": {"type": "string"}, "tokens": ref("TokenList")}, ["text", "tokens"])},
     "errors": COMMON + ["NoTokenizer", "InvalidRequest"],
     "example": None},
    {"name": "generate", "summary": "Sample continuations (continuous batching with every other client's work).",
     "description": "Give prompts (text, tokenized with special tokens) or prompt_tokens. Each sample gets a rollout_id. "
                    "logprobs are of the sampled token under the full softmax at the sampling temperature, before top-k/top-p/min-p "
                    "truncation (temperature 0 reports at temperature 1). With a seed the samples do not depend on batch mates or "
                    "thread count. A generation never spans a weights change: the result's weights_version is the one every token was drawn under.",
     "params": [p("prompts", {"type": "array", "items": {"type": "string"}, "minItems": 1}),
                p("prompt_tokens", {"type": "array", "items": ref("TokenList"), "minItems": 1}),
                p("messages", {"oneOf": [{"type": "array", "items": ref("ChatMessage")},
                                         {"type": "array", "items": {"type": "array", "items": ref("ChatMessage")}}]},
                  "A conversation (or a list of them) rendered with the chat template and a generation prompt, instead of prompts."),
                p("tools", {"type": "array", "items": {"type": "object"}}, "With messages: tool schemas for the template."),
                p("template_kwargs", {"type": "object"}, "With messages: extra template variables."),
                p("n", {"type": "integer", "minimum": 1, "default": 1}, "Samples per prompt (the prompt is prefilled once)."),
                p("max_tokens", {"type": "integer", "minimum": 1, "default": 64}),
                p("temperature", {"type": "number", "minimum": 0, "default": 1.0}, "0 = greedy."),
                p("top_p", {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0}),
                p("top_k", {"type": "integer", "minimum": 0, "default": 0}, "0 = off."),
                p("min_p", {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0}),
                p("seed", {"type": "integer", "minimum": 0}),
                p("stop", {"type": "array", "items": {"type": "string", "minLength": 1}}, "Stop strings (also across token boundaries); the text ends before the match."),
                p("stop_token_ids", ref("TokenList")),
                p("ignore_eos", {"type": "boolean", "default": False}),
                p("presence_penalty", {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
                  "Subtracted once from the raw logit of every token this sample has produced (as vLLM). Shapes the draw only: "
                  "reported log-probabilities stay the model's."),
                p("frequency_penalty", {"type": "number", "minimum": -2, "maximum": 2, "default": 0},
                  "Subtracted from a token's raw logit once per time this sample has produced it."),
                p("logit_bias", {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                  "Token id (as a string key) -> bias added to its raw logit; -100 bans it."), ADAPTER] + sampling_outputs,
     "result": {"name": "generation", "schema": obj({
         "weights_version": ref("WeightsVersion"),
         "results": {"type": "array", "items": obj({"prompt_index": NONNEG, "prompt_tokens": ref("TokenList"),
                                                    "samples": {"type": "array", "items": ref("Sample")}},
                                                   ["prompt_index", "prompt_tokens", "samples"])}}, ["weights_version", "results"])},
     "errors": COMMON + ["ContextOverflow", "Overloaded", "NoTokenizer", "Cancelled", "RequestTooLarge", "UnknownAdapter"],
     "example": ({"prompt_tokens": [[1, 2, 3]], "max_tokens": 4, "temperature": 0.8, "seed": 1, "n": 2}, None)},
    {"name": "logprob", "summary": "Score token sequences: per response token log-probability (and optional statistics).",
     "description": "Uses the same code as sampling and training, so for the same weights the three agree bit for bit.",
     "params": [p("sequences", {"type": "array", "items": ref("Sequence"), "minItems": 1}, required=True),
                p("temperature", {"type": "number", "minimum": 0, "default": 1.0}), ADAPTER] + sampling_outputs[1:]
               + [p("probe_tokens", {"type": "array", "items": ref("TokenId"), "maxItems": 64},
                    "Tokens whose log-probability is reported at every response position (probe_logprobs), "
                    "whether or not the sequence takes them there.")],
     "result": {"name": "scores", "schema": obj({"weights_version": ref("WeightsVersion"),
                                                 "results": {"type": "array", "items": ref("Scores")}}, ["weights_version", "results"])},
     "errors": COMMON + ["RequestTooLarge", "UnknownAdapter"],
     "example": ({"sequences": [{"tokens": [1, 2, 3, 4], "response_start": 2}], "entropy": True}, None)},
    {"name": "train_step", "summary": "One policy-gradient update (or several mini-batch steps); bumps weights_version per optimizer step.",
     "description": "Items come from `batch` (tokens uploaded) or `rollouts` (ids from generate plus rewards; advantages computed "
                    "per group by advantage_estimator). Missing old/proxy log-probabilities are recomputed before any update. "
                    "Runs exclusively at a step boundary: generations queued before it finish under the old weights. "
                    "dry_run computes everything (grad_norm included) and changes nothing. A step with non-finite gradients is refused "
                    "with the weights unchanged. On a data-parallel trainer (mpirun) the ranks split the mini-batch by micro-batch and "
                    "sum the gradients over one fixed tree, so the result is the same for any number of ranks; a rank that dies or "
                    "hangs fails the step with `degraded` and no rank applies it.",
     "params": [p("batch", {"type": "array", "items": ref("TrainItem")}), p("rollouts", {"type": "array", "items": ref("RolloutReward")}),
                p("advantage_estimator", {"enum": ["grpo", "dr_grpo", "rloo"], "default": "grpo"}),
                p("drop_constant_groups", {"type": "boolean", "default": False}, "Drop groups whose rewards are all equal."),
                p("loss", ref("Loss"), required=True), p("optimizer", ref("OptimizerSettings"), "Overrides for this call only."),
                p("mini_batches", {"type": "integer", "minimum": 1, "default": 1}),
                p("micro_batch_tokens", {"type": "integer", "minimum": 1}, "Token budget per forward/backward; the update equals one big batch. "
                  "On a data-parallel trainer the micro-batches are the leaves of the gradient sum (default: --dp-micro-batches equal parts)."),
                p("dry_run", {"type": "boolean", "default": False}), ADAPTER,
                p("rollout_correction", obj({"mode": {"enum": ["none", "truncate", "mask"]},
                                             "level": {"enum": ["token", "sequence"], "default": "token"},
                                             "cap": {"type": "number", "minimum": 1, "default": 2}}, ["mode"]),
                  "Off-policy samples (earlier versions, replicas): each item's old_logprobs are the sampler's; the trainer "
                  "recomputes pi_old with its weights before the step (the clipped ratio's denominator) and weighs each policy "
                  "term by w = pi_old/pi_sampler, per token or per sequence (the product over its trained tokens). truncate: "
                  "min(w, cap). mask: tokens (sequences) with w outside [1/cap, cap] leave the loss as loss_mask 0 would.")],
     "result": {"name": "step", "schema": obj({"weights_version": ref("WeightsVersion"), "metrics": ref("Metrics")}, ["weights_version", "metrics"])},
     "errors": COMMON + ["ReadOnly", "NonFinite", "UnknownRollout", "EvictedRollout", "RequestTooLarge", "UnknownAdapter", "Degraded"],
     "example": ({"batch": [{"tokens": [1, 2, 3, 4, 5], "response_start": 2, "advantage": 1.0}], "loss": {"mode": "lp_reg"},
                  "optimizer": {"lr": 1e-5}}, None)},
    {"name": "optimizer.configure", "summary": "AdamW settings and learning-rate schedule for later steps.",
     "params": [p("lr", {"type": "number", "minimum": 0}), p("betas", {"type": "array", "items": NUM, "minItems": 2, "maxItems": 2}),
                p("eps", {"type": "number", "minimum": 0}), p("weight_decay", {"type": "number", "minimum": 0}),
                p("grad_clip", {"type": "number", "minimum": 0}), p("schedule", ref("Schedule")), ADAPTER],
     "result": {"name": "settings", "schema": {"allOf": [ref("OptimizerSettings"), {"required": ["lr", "betas", "eps", "weight_decay", "grad_clip"]}]}},
     "errors": COMMON + ["ReadOnly", "UnknownAdapter"],
     "example": ({"lr": 1e-5, "schedule": {"type": "cosine", "warmup_steps": 10, "total_steps": 200}}, None)},
    {"name": "reference.snapshot", "summary": "Freeze the current weights (or an adapter's) as the reference model for kl_coef.",
     "params": [ADAPTER], "result": {"name": "snapshot", "schema": obj({"weights_version": ref("WeightsVersion")}, ["weights_version"])},
     "errors": ["ReadOnly", "Unauthorized", "UnknownAdapter"], "example": ({}, None)},
    {"name": "rollouts.release", "summary": "Free stored rollouts.",
     "params": [p("rollout_ids", {"type": "array", "items": {"type": "string"}}, required=True)],
     "result": {"name": "released", "schema": obj({"released": NONNEG}, ["released"])},
     "errors": COMMON, "example": ({"rollout_ids": ["r-unknown"]}, None)},
    {"name": "checkpoint.save", "summary": "Save weights (Hugging Face folder) and optimizer state under a name in --checkpoint-dir.",
     "description": "Atomic: a new version folder is written and fsynced, then a symlink swapped with one rename, so a crash never leaves half a checkpoint under the name.",
     "params": [p("name", {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"}, "No leading dot, no '..', no '.v'.", required=True)],
     "result": {"name": "saved", "schema": obj({"name": {"type": "string"}, "weights_version": ref("WeightsVersion")}, ["name", "weights_version"])},
     "errors": COMMON + ["ReadOnly", "CheckpointsDisabled", "CheckpointFailed"], "example": None},
    {"name": "checkpoint.load", "summary": "Restore weights, optimizer state and weights_version from a named checkpoint.",
     "description": "The whole folder is validated before the live weights are touched. A data-parallel trainer sends the "
                    "loaded state to every rank (the other ranks need no access to the checkpoint folder).",
     "params": [p("name", {"type": "string"}, required=True)],
     "result": {"name": "loaded", "schema": obj({"name": {"type": "string"}, "weights_version": ref("WeightsVersion")}, ["name", "weights_version"])},
     "errors": COMMON + ["ReadOnly", "CheckpointsDisabled", "CheckpointNotFound", "Degraded"], "example": None},
    {"name": "checkpoint.list", "summary": "Names of saved checkpoints.",
     "params": [], "result": {"name": "names", "schema": obj({"names": {"type": "array", "items": {"type": "string"}}}, ["names"])},
     "errors": ["Unauthorized"], "example": ({}, None)},
    {"name": "adapters.create", "summary": "A new LoRA adapter on the base model, initialised as PEFT does (A Kaiming-uniform from the seed, B zero): "
                                           "it starts exactly as the base.",
     "description": "Each adapter has its own AdamW state, schedule, weights_version and reference; pass its name as `adapter` to "
                    "generate, logprob, train_step, optimizer.configure and reference.snapshot, or as `model` on /v1/completions.",
     "params": [p("name", ADAPTER_NAME, required=True),
                p("rank", {"type": "integer", "minimum": 1}, "r; at most the smaller side of every targeted projection.", required=True),
                p("alpha", {"type": "number", "exclusiveMinimum": 0}, "lora_alpha; default: the rank (scaling 1)."),
                p("target_modules", {"oneOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"const": "all-linear"}],
                                     "default": "all-linear"},
                  "PEFT's rule: a module matches an entry equal to its name or to its last dot-separated parts "
                  "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2: c_attn, c_proj, c_fc, mlp.c_proj)."),
                p("seed", {"type": "integer", "minimum": 0, "default": 0}),
                p("use_rslora", {"type": "boolean", "default": False}, "Scaling alpha/sqrt(r) instead of alpha/r.")],
     "result": {"name": "adapter", "schema": ref("Adapter")},
     "errors": COMMON + ["ReadOnly", "AdapterExists", "Overloaded"], "example": None},
    {"name": "adapters.list", "summary": "The adapters held, in creation order.",
     "params": [], "result": {"name": "adapters", "schema": obj({"adapters": {"type": "array", "items": ref("Adapter")}}, ["adapters"])},
     "errors": ["Unauthorized"], "example": ({}, None)},
    {"name": "adapters.delete", "summary": "Drop an adapter (calls already running under it finish).",
     "params": [p("name", {"type": "string"}, required=True)],
     "result": {"name": "deleted", "schema": obj({"deleted": {"type": "string"}}, ["deleted"])},
     "errors": COMMON + ["ReadOnly", "UnknownAdapter"], "example": None},
    {"name": "adapters.load", "summary": "Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) as a new adapter.",
     "description": "The path resolves inside --checkpoint-dir (relative paths start there) or an --adapter-dir; every tensor the "
                    "config implies must be present with this model's shapes, and no other.",
     "params": [p("name", ADAPTER_NAME, required=True), p("path", {"type": "string"}, required=True)],
     "result": {"name": "adapter", "schema": ref("Adapter")},
     "errors": COMMON + ["ReadOnly", "AdapterExists", "CheckpointsDisabled", "Overloaded"], "example": None},
    {"name": "adapters.save", "summary": "Write an adapter as a PEFT folder under <checkpoint-dir>/adapters/<name> (atomic, as checkpoint.save).",
     "params": [p("name", {"type": "string"}, required=True)],
     "result": {"name": "saved", "schema": obj({"name": {"type": "string"}, "path": {"type": "string"},
                                                "weights_version": ref("WeightsVersion")}, ["name", "path", "weights_version"])},
     "errors": COMMON + ["ReadOnly", "UnknownAdapter", "CheckpointsDisabled", "CheckpointFailed"], "example": None},
    {"name": "adapters.merge", "summary": "Write base + adapter (W + s*B*A on every adapted projection) as a full Hugging Face checkpoint.",
     "description": "The checkpoint is named in --checkpoint-dir and carries the base model's tokenizer files; the live weights do not change.",
     "params": [p("name", {"type": "string"}, required=True), p("checkpoint", ADAPTER_NAME, required=True)],
     "result": {"name": "merged", "schema": obj({"name": {"type": "string"}, "checkpoint": {"type": "string"}, "path": {"type": "string"}},
                                                ["name", "checkpoint", "path"])},
     "errors": COMMON + ["ReadOnly", "UnknownAdapter", "CheckpointsDisabled", "CheckpointFailed"], "example": None},
    {"name": "weights.sync", "summary": "On a replica (ember-server --follow URL): pull the trainer's weights now; answers once they are applied.",
     "description": "Reads the trainer's manifest, downloads the tensors and adapters whose SHA-256 differs from what the replica "
                    "holds (ranges of that one version, pinned with If-Match), checks every hash and swaps at a step boundary: "
                    "generations in flight finish on the old weights, calls queued behind the swap see the new ones. With "
                    "`version`, first waits (long poll, at most `timeout` seconds) until the trainer has published it. "
                    "A server that follows nothing answers not_a_replica.",
     "params": [p("version", NONNEG, "Wait until the trainer has published at least this weights version, then apply it."),
                p("timeout", {"type": "number", "minimum": 0, "maximum": 3600, "default": 60}, "Seconds to wait for `version`.")],
     "result": {"name": "synced", "schema": obj({"weights_version": ref("WeightsVersion"),
                                                 "manifest_id": {"type": "string", "description": "The applied manifest's id (content-derived)."},
                                                 "bytes": NONNEG, "seconds": {"type": "number"},
                                                 "lag": {"type": "integer", "minimum": 0, "description": "Versions the trainer is ahead (as last seen)."}},
                                                ["weights_version", "manifest_id", "bytes", "seconds", "lag"])},
     "errors": COMMON + ["NotAReplica", "SyncFailed"], "example": None},
    {"name": "cancel", "summary": "Cancel in-flight or queued generate calls by their JSON-RPC id; they answer with kind `cancelled`.",
     "params": [p("request_id", {"type": ["string", "integer"]}, "The id the generate call was sent with.", required=True)],
     "result": {"name": "cancelled", "schema": obj({"cancelled": NONNEG}, ["cancelled"])},
     "errors": COMMON, "example": ({"request_id": "gen-17"}, None)},
]

def server_table():
    """The server's tables (`ember-server --protocol`); EMBER_SERVER names another binary."""
    binary = os.environ.get("EMBER_SERVER", os.path.join(ROOT, ".build", "release", "ember-server"))
    return json.loads(subprocess.run([binary, "--protocol"], check=True, capture_output=True, text=True).stdout)


def loss_schema(table):
    """The Loss schema with each option's defaults per mode taken from the server's table."""
    loss = json.loads(json.dumps(schemas["Loss"]))
    d = table["loss_defaults"]
    loss["properties"]["mode"]["enum"] = list(d["modes"].keys())
    for key, prop in loss["properties"].items():
        per_mode = [f"{mode} {json.dumps(opts[key])}" for mode, opts in d["modes"].items() if key in opts and opts[key] is not None]
        if key in d["common"]:
            per_mode = [json.dumps(d["common"][key])]
        if per_mode:
            prop["description"] = (prop.get("description", "") + " Default: " + ", ".join(per_mode) + ".").strip()
    loss["x-ember-defaults"] = d
    return loss


def build(examples, table):
    served = [m["name"] for m in table["methods"]]
    documented = [m["name"] for m in methods]
    if served != documented:
        sys.exit(f"make_openrpc: the server's methods {served} differ from this script's {documented}: document every method")
    traits = {m["name"]: {k: m[k] for k in ("scheduling", "mutates", "retry_safe", "large_bodies")} for m in table["methods"]}
    errors = make_errors(table)
    out = []
    for m in methods:
        for e in m["errors"]:
            if e not in errors:
                sys.exit(f"make_openrpc: {m['name']} lists error {e}, which the server's table lacks")
        entry = {"name": m["name"], "summary": m["summary"], "paramStructure": "by-name", "params": m["params"],
                 "result": m["result"], "errors": [eref(e) for e in m["errors"]], "x-ember": traits[m["name"]]}
        if "description" in m:
            entry["description"] = m["description"]
        ex = examples.get(m["name"])
        if ex and ex[1] is not None:
            entry["examples"] = [{"name": f"{m['name']} example",
                                  "params": [{"name": k, "value": v} for k, v in ex[0].items()],
                                  "result": {"name": m["result"]["name"], "value": ex[1]}}]
        out.append(entry)
    return {
        "openrpc": "1.3.2",
        "info": {"title": "Ember", "version": table["version"],
                 "description": "JSON-RPC 2.0 over HTTP/1.1 (POST /rpc). See Protocol/README.md for transport, auth, weight versions and token positions."},
        "servers": [{"name": "local", "url": "http://127.0.0.1:8377/rpc"}],
        "methods": out,
        "components": {"schemas": {**schemas, "Loss": loss_schema(table)}, "errors": errors},
    }

def python_module(table):
    """clients/python/ember/protocol.py: the server's tables as Python constants."""
    methods_py = {m["name"]: {k: m[k] for k in ("scheduling", "mutates", "retry_safe", "large_bodies")} for m in table["methods"]}
    lines = ['"""The protocol\'s tables as the server states them (`ember-server --protocol`). Generated by',
             'scripts/make_openrpc.py: do not edit; tests compare it with Protocol/openrpc.json."""',
             "",
             f"VERSION = {table['version']!r}",
             "",
             "#: Every method with its traits: scheduling, mutates (refused by --read-only), retry_safe",
             "#: (changes nothing, may be resent after a dropped connection), large_bodies.",
             "METHODS = " + json.dumps(methods_py, indent=4).replace("true", "True").replace("false", "False"),
             "",
             "#: Methods a client may resend after a dropped connection.",
             "RETRY_SAFE = frozenset(name for name, t in METHODS.items() if t[\"retry_safe\"])",
             "",
             "#: Error kind (data.kind) -> JSON-RPC code.",
             "ERROR_CODES = " + json.dumps({e["kind"]: e["code"] for e in table["errors"]}, indent=4),
             ""]
    return "\n".join(lines)


def write_python(table):
    with open(os.path.join(ROOT, "clients", "python", "ember", "protocol.py"), "w") as f:
        f.write(python_module(table))


if __name__ == "__main__":
    # Example results are real answers from a fixture model (scripts/record_openrpc_examples.py fills them).
    path = os.path.join(ROOT, "Protocol", "examples.json")
    recorded = json.load(open(path)) if os.path.exists(path) else {}
    examples = {}
    for m in methods:
        if m["name"] in recorded:
            examples[m["name"]] = (recorded[m["name"]]["params"], recorded[m["name"]]["result"])
        elif m["example"] is not None:
            examples[m["name"]] = (m["example"][0], None)
    table = server_table()
    with open(os.path.join(ROOT, "Protocol", "openrpc.json"), "w") as f:
        json.dump(build(examples, table), f, indent=1)
        f.write("\n")
    write_python(table)
    with open(os.path.join(ROOT, "Protocol", "example_params.json"), "w") as f:
        json.dump({m["name"]: m["example"][0] for m in methods if m["example"]}, f, indent=1)
        f.write("\n")
