"""Critic-free RL for language models, in one file: GRPO, Dr. GRPO, RLOO, REINFORCE++ (+ the DAPO and GSPO options).

    python grpo.py                      # toy task: runs/sft + runs/reward_model -> runs/grpo, CPU, ~2 minutes
    python grpo.py --help               # every option, explained
    python grpo.py --reward_fn toy_task:gold_reward --output_dir runs/grpo_gold     # a verifiable reward, no RM
    python grpo.py --advantage_estimator rloo --output_dir runs/rloo                # another estimator
    torchrun --nproc_per_node 8 grpo.py --model_name_or_path ... --reward_model_path ... --prompts my_prompts.jsonl

PPO (ppo.py) learns a critic V(s_t) as the baseline of its advantages. The critic-free family instead samples a group
of G responses y_1..y_G for every prompt x and uses the group itself as the baseline (seeds 000, 004; DeepSeekMath).
One iteration:
  1. rollout   G samples per prompt, all in one batched generation; old_logprobs = log pi_old(y_t | x, y_<t)
  2. score     r_i = RM(x, y_i) or sum of reward functions, - missing_eos_penalty, + DAPO's soft overlong penalty
  3. advantage (--advantage_estimator), the same A_i on every token of response i for the group estimators:
               grpo                   A_i = (r_i - mean_G r) / (std_G r + eps)     Shao et al. 2024 (2402.03300)
               dr_grpo                A_i = r_i - mean_G r                         Liu et al. 2025 (2503.20783)
               rloo                   A_i = r_i - 1/(G-1) sum_{j != i} r_j         Ahmadian et al. 2024 (2402.14740)
               reinforce_pp           r_t = -beta KL_t (+ r_i on the last token), A_t = whiten(sum_{k >= t} gamma^(k-t)
                                      r_k) over all tokens of the global batch     Hu 2025 (2501.03262)
               reinforce_pp_baseline  the same after r_i <- r_i - mean_G r
  4. update    ratio_t = exp(logprobs_t - old_logprobs_t)   (--importance_sampling_level sequence: GSPO's
               s_i = exp(1/|y_i| sum_t (logprobs_t - old_logprobs_t)), Zheng et al. 2025, 2507.18071)
               l_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high))  (+ beta k3_t with --kl_in_loss)
               loss = aggregate(l_t) (--loss_agg), over --ppo_epochs x --num_minibatches optimiser steps

KL to the reference: in the reward (PPO's way, the default: per-token r_t = -beta KL_t with KL_t = k1; the group
estimators then use r_i - beta sum_t KL_t) or as a loss term (GRPO's way, --kl_in_loss: beta * k3_t added to l_t). With
--kl_coef 0 the reference model is not loaded at all (TRL's default beta is 0).

The ratio and the clipping only matter when the policy moves between rollout and update, i.e. with --ppo_epochs > 1
or --num_minibatches > 1: with one epoch of one minibatch (GRPO's mu = 1, TRL's default num_iterations=1) the ratio is
exactly 1 and the loss is plain REINFORCE with the group baseline.

Loss aggregation (--loss_agg), l_it the per-token loss of token t of response i, over the real tokens of a minibatch:
  token_mean               sum_it l_it / (number of tokens of the global minibatch)     DAPO eq. 8 (2503.14476)
  seq_mean_token_mean      1/N sum_i (1/|y_i| sum_t l_it)                              GRPO paper eq. 3
  seq_mean_token_sum_norm  1/(N L_max) sum_i sum_t l_it, L_max = --max_new_tokens      Dr. GRPO
"auto" (default) takes the estimator's paper: grpo -> seq_mean_token_mean, dr_grpo -> seq_mean_token_sum_norm, rloo ->
seq_mean_token_sum_norm (the paper's sequence-level REINFORCE, sum_t log pi per response, divided by the constant
L_max), reinforce_pp(_baseline) -> token_mean (OpenRLHF's token-level loss). Library defaults: TRL's GRPOTrainer
loss_type="dapo" (token_mean over the global accumulated batch; "grpo", "dr_grpo", "bnpo" selectable), verl
actor.loss_agg_mode="token-mean", OpenRLHF PolicyLoss(token_level_loss=True). token_mean is the only one that weights
every token equally; seq_mean_token_mean favours short responses when A > 0 and long ones when A < 0 (Dr. GRPO's
length bias). All three are computed over the global minibatch, so N processes and any number of micro-batches give
the same update as one process (tested).

DAPO options (Yu et al. 2025): --clip_low 0.2 --clip_high 0.28 (clip-higher), --dynamic_sampling (drop groups whose
rewards are all equal, sample more prompts until the batch is full, at most --max_sampling_rounds rounds),
--overlong_filter (truncated responses take no part in the loss), --overlong_buffer / --overlong_penalty_factor (the
soft overlong punishment, DAPO eq. 13).
"""

import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
AUTO_LOSS_AGG = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                 "rloo": "seq_mean_token_sum_norm", "reinforce_pp": "token_mean", "reinforce_pp_baseline": "token_mean"}


@dataclass
class Config:
    model_name_or_path: str = "runs/sft"
    """policy to start from (the SFT checkpoint); a frozen copy is the KL reference (not loaded when kl_coef is 0)"""
    reward_model_path: str = "runs/reward_model"
    """frozen reward model (AutoModelForSequenceClassification, num_labels=1), e.g. the output of reward_model.py; used
    for training when reward_fn is not given, and for the proxy reward of the evaluation when it exists"""
    reward_fn: str | None = None
    """module:function (prompts, completions) -> list[float] used instead of the reward model (rule-based or
    verifiable rewards, e.g. toy_task:gold_reward); several, comma-separated, are summed (each one logged)"""
    prompts: str = "data/toy/prompts_train.jsonl"
    """training prompts, JSON lines {"prompt": str} or {"messages": [...]} (chat template, generation prompt added)"""
    eval_prompts: str = "data/toy/prompts_eval.jsonl"
    """held-out prompts for the periodic evaluation"""
    eval_reward_fn: str = "auto"
    """module:function scoring evaluation samples (the gold reward); "auto" = toy_task:gold_reward when the prompts
    are under data/toy, "none" to disable"""
    output_dir: str = "runs/grpo"
    """where the policy (HF format + tokenizer), metrics.jsonl and eval.json are written; use runs/<name> for other
    estimators / settings so that `python toy_task.py report` lists them"""
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """grpo (group mean and std), dr_grpo (group mean only), rloo (leave-one-out mean), reinforce_pp (REINFORCE++:
    return-to-go whitened over the global batch), reinforce_pp_baseline (the same after subtracting the group mean)"""
    num_iterations: int = 150
    """rollout + update iterations (toy: 150 x 128 responses take about PPO's 100 x 64 wall time)"""
    rollout_batch_size: int = 16
    """prompts per iteration (global, over all ranks); each rank takes rollout_batch_size / world_size prompts and
    samples all G responses of each, so every group lives on one rank"""
    num_samples_per_prompt: int = 8
    """G, responses sampled per prompt (the group); at least 2 for every estimator but reinforce_pp"""
    max_prompt_length: int = 48
    """longer prompts are cut from the left (the end of a prompt matters most for its continuation); counted"""
    max_new_tokens: int = 16
    """longest response; also L_max of seq_mean_token_sum_norm and of the overlong penalty"""
    temperature: float = 1.0
    """sampling temperature; training log-probs use the same temperature so the first-epoch ratio is 1"""
    top_k: int = 0
    """top-k sampling (0 = off). Log-probs are of the full temperature-scaled distribution, as in TRL"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the reward of responses that never emit EOS (cut off at max_new_tokens)"""
    overlong_filter: bool = False
    """DAPO's overlong filtering (TRL's mask_truncated_completions): responses without EOS take no part in the loss"""
    overlong_buffer: int = 0
    """L_cache of DAPO's soft overlong punishment: responses longer than max_new_tokens - overlong_buffer tokens get
    a penalty growing linearly to -overlong_penalty_factor at max_new_tokens (0 = off)"""
    overlong_penalty_factor: float = 1.0
    """size of the soft overlong penalty at max_new_tokens"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal (zero advantage for the group estimators)
    and sample more prompts until every rank holds rollout_batch_size / world_size groups"""
    max_sampling_rounds: int = 4
    """cap on the generation rounds of dynamic sampling per iteration (verl's max_num_gen_batches); when reached, the
    batch is completed with dropped groups so that it keeps its size (counted in dynamic_sampling/filled)"""
    kl_coef: float = 0.2
    """beta. 0 = no KL term and no reference model (TRL's default); GRPO paper 0.04 (in the loss), verl's
    kl_loss_coef 0.001. On the toy 0.2 in the reward (ppo.py's value) ends at PPO's KL to SFT; larger values trade
    gold reward for KL (README table)"""
    kl_in_loss: bool = False
    """add beta * KL_t to the per-token loss (GRPO's way) instead of -beta * KL_t to the per-token reward (PPO's
    way, the default: on the toy the same beta in the loss let the KL grow half as large again, README)"""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """per-token KL estimator: k1 = log pi/pi_ref, k2 = (log pi/pi_ref)^2 / 2, k3 = pi_ref/pi - 1 - log pi_ref/pi;
    auto = k1 in the reward (PPO), k3 in the loss (GRPO). In the loss only k2 or k3: k1 as a loss term has zero
    expected gradient"""
    gamma: float = 1.0
    """discount of the REINFORCE++ return-to-go"""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "auto"
    """how per-token losses become one number (module docstring); auto = the estimator's paper"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: PPO's per-token ratio; sequence: GSPO's length-normalised sequence ratio (GSPO clips at 3e-4 / 4e-4)"""
    ppo_epochs: int = 2
    """passes over each rollout batch (GRPO's mu; 1 with num_minibatches 1 makes the ratio exactly 1)"""
    num_minibatches: int = 2
    """minibatches per epoch (one optimiser step each)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch (the loss is normalised over the whole minibatch, so this changes nothing but
    memory)"""
    clip_low: float = 0.2
    """ratio clipped below at 1 - clip_low"""
    clip_high: float = 0.2
    """ratio clipped above at 1 + clip_high (DAPO's clip-higher: 0.28)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus"""
    learning_rate: float = 1e-4
    """learning rate (the toy model is tiny; use ~1e-6 for pretrained models, TRL's default)"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "linear"
    """learning-rate decay after warmup"""
    warmup_ratio: float = 0.0
    """fraction of optimiser steps in linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    eval_every: int = 20
    """evaluate on held-out prompts every this many iterations (and before and after training)"""
    eval_samples_per_prompt: int = 8
    """samples per held-out prompt in each evaluation"""
    sample_every: int = 20
    """print a few rollout completions every this many iterations"""
    log_every: int = 5
    """print metrics every this many iterations (metrics.jsonl gets every iteration)"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward"""
    seed: int = 1
    """seed (each rank samples with seed + rank)"""
    trust_remote_code: bool = False
    """allow model code from the hub"""
    tensorboard: bool = False
    """also log to TensorBoard"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project"""


# ---------------------------------------------------------------------------------------------------------------------
# The math, as small pure functions (tested against naive loops in tests/test_grpo.py)
# ---------------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4):
    """GRPO: A_i = (r_i - mean_G r) / (std_G r + eps); Dr. GRPO (scale_by_std=False): A_i = r_i - mean_G r.

    rewards (B,) laid out as consecutive groups of group_size responses to one prompt -> (B,). std is the sample
    standard deviation (Bessel-corrected, torch.std, as in TRL and verl); a group of equal rewards gets A = 0.
    Dr. GRPO drops the std because it up-weights prompts that are almost always solved or always failed."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    return advantages.view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = r_i - 1/(G-1) sum_{j != i} r_j, the mean of the other G-1 rewards as the baseline (it does not
    depend on y_i, so the gradient stays unbiased). Equals G/(G-1) (r_i - mean_G r). rewards (B,) -> (B,)."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def reinforce_pp_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ return-to-go G_t = sum_{k >= t} gamma^(k-t) r_k over the real tokens of each response, (B, R) ->
    (B, R); 0 on padding. The caller whitens it over all real tokens of the global batch (the advantage)."""
    rewards = torch.where(response_mask.bool(), rewards, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * response_mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples y_t ~ pi, (B, R) -> (B, R) (as in ppo.py). With
    log_ratio = log pi - log pi_ref: k1 = log_ratio, k2 = log_ratio^2 / 2, k3 = exp(-log_ratio) - 1 + log_ratio
    (>= 0; GRPO eq. 4, verl's "low_var_kl")."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator}")


def sequence_rewards_with_kl(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """Per-token rewards r_t = -beta KL_t on real response tokens plus the score on the last real one (the EOS token
    when the response ended), as in ppo.py. scores (B,), kl/response_mask (B, R) -> (B, R)."""
    rewards = torch.where(response_mask.bool(), -kl_coef * kl, 0.0)
    last = response_mask.sum(1).long().clamp(min=1) - 1  # (B,) index of the last real response token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def compute_advantages(estimator: str, scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                       group_size: int, kl_coef_in_reward: float, gamma: float = 1.0, distributed: bool = False):
    """Advantages (B, R) of every estimator from the sequence scores (B,) (consecutive groups of group_size) and the
    per-token KL (B, R). With the KL in the reward (kl_coef_in_reward = beta > 0) the per-token rewards are
    r_t = -beta KL_t plus the score on the last real token; the group estimators use their sum r_i = s_i - beta
    sum_t KL_t and put A_i on every real token; REINFORCE++ whitens the return-to-go over the real tokens of the
    batch (of all ranks with distributed=True), after subtracting the group mean of the scores for the baseline
    variant. Padding gets 0."""
    mask = response_mask
    if estimator in GROUP_ESTIMATORS:
        seq_rewards = sequence_rewards_with_kl(scores, kl, mask, kl_coef_in_reward).sum(1)  # (B,)
        if estimator == "rloo":
            seq_advantages = rloo_advantages(seq_rewards, group_size)
        else:
            seq_advantages = group_advantages(seq_rewards, group_size, scale_by_std=estimator == "grpo")
        return seq_advantages[:, None] * mask
    if estimator == "reinforce_pp_baseline":
        scores = scores - scores.view(-1, group_size).mean(1).repeat_interleave(group_size)
    elif estimator != "reinforce_pp":
        raise ValueError(f"unknown advantage estimator {estimator}")
    returns = reinforce_pp_returns(sequence_rewards_with_kl(scores, kl, mask, kl_coef_in_reward), mask, gamma)
    return common.masked_whiten(returns, mask, distributed=distributed)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO eq. 13, soft overlong punishment of a response of L tokens, with L_cache = buffer:
    0 if L <= L_max - L_cache;  ((L_max - L_cache) - L) / L_cache if L_max - L_cache < L <= L_max;  -1 beyond;
    times factor. lengths (B,) -> (B,)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    return factor * (((max_len - buffer) - lengths.float()) / buffer).clamp(-1.0, 0.0)


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                      level: str = "token"):
    """Per-token clipped surrogate l_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high)), (B, R).

    level "token": ratio_t = pi(y_t) / pi_old(y_t). level "sequence" (GSPO): every token of response i carries
    s_i = exp(1/|y_i| sum_t log(pi(y_t) / pi_old(y_t))) as its value, with the gradient of GSPO-token
    (sg[s_i] pi(y_t) / sg[pi(y_t)]), so that 1/|y_i| sum_t l_t has exactly the gradient of GSPO's sequence loss.
    Padding positions (mask 0) get ratio 1, whatever log-probs they hold. Returns (l (B, R), ratio (B, R),
    is_low_clipped, is_high_clipped): the tokens whose gradient the clip removes, ratio < 1 - clip_low with A < 0 and
    ratio > 1 + clip_high with A > 0 (TRL's clip_ratio/low_mean and clip_ratio/high_mean)."""
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

    num_tokens / num_seqs: the counts the means are over, by default this batch's; pass those of the global minibatch
    (divided by the world size, to undo FSDP's gradient mean) so that micro-batches and ranks add up to one
    minibatch. Every response counts in num_seqs, also one without loss tokens (overlong filtering), as in TRL."""
    real = mask.bool()
    losses = torch.where(real, per_token_loss, 0.0)
    num_seqs = per_token_loss.size(0) if num_seqs is None else num_seqs
    if mode == "token_mean":
        num_tokens = mask.sum() if num_tokens is None else num_tokens
        return losses.sum() / max(float(num_tokens), 1.0)
    if mode == "seq_mean_token_mean":
        return (losses.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    if mode == "seq_mean_token_sum_norm":
        return losses.sum() / (num_seqs * max_len)
    raise ValueError(f"unknown loss aggregation {mode}")


def zero_std_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """(num_groups,) True where all G rewards of a group are equal (to tol): such a group has zero advantage under
    every group estimator, the groups DAPO's dynamic sampling drops (TRL's frac_reward_zero_std)."""
    grouped = scores.view(-1, group_size)
    return (grouped.max(1).values - grouped.min(1).values) <= tol


def cat_padded(tensors: list[torch.Tensor], pad_value: int, left: bool) -> torch.Tensor:
    """Concatenate (B_k, T_k) tensors along the batch after padding them to the longest T, on the left (prompts)
    or on the right (responses): the rollouts of several dynamic-sampling rounds become one batch."""
    T = max(t.size(1) for t in tensors)
    widths = [(T - t.size(1), 0) if left else (0, T - t.size(1)) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, w, value=pad_value) for t, w in zip(tensors, widths)], 0)


# ---------------------------------------------------------------------------------------------------------------------
# Models, data, rewards
# ---------------------------------------------------------------------------------------------------------------------
def load_prompts(path: str, tokenizer, max_prompt_length: int) -> tuple[list[str], list[list[int]], int]:
    """(prompt texts, token ids, number cut) of a prompts file; chat rows are rendered with the chat template."""
    rows = common.load_jsonl(path, alternatives=(("prompt",), ("messages",)))
    texts, ids, cut = [], [], 0
    for i, row in enumerate(rows):
        if "messages" in row:
            text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = row["prompt"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{i + 1}: field 'prompt' must be a non-empty string")
            tokens = tokenizer(text)["input_ids"]
        if len(tokens) > max_prompt_length:
            tokens, cut = tokens[-max_prompt_length:], cut + 1
        texts.append(text)
        ids.append(tokens)
    return texts, ids, cut


def load_models(cfg: Config, device):
    """policy (trained), reference (frozen; None when kl_coef is 0), reward model (frozen; None with reward_fn unless
    it exists for the evaluation's proxy reward), tokenizers."""
    common.require_checkpoint(cfg.model_name_or_path, "sft.py")
    kw = dict(trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{cfg.model_name_or_path}: the tokenizer needs a pad token distinct from EOS "
                         "(sft.py adds one)")
    policy = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kw)
    # beta = 0: no KL term anywhere, so no reference model in memory (the evaluation's KL to SFT is then not measured)
    ref = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kw) if cfg.kl_coef > 0 else None
    reward_model = reward_tokenizer = None
    if cfg.reward_fn is None:
        common.require_checkpoint(cfg.reward_model_path, "reward_model.py")
    if cfg.reward_fn is None or os.path.isdir(cfg.reward_model_path):
        reward_model = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model_path, num_labels=1, **kw)
        reward_tokenizer = AutoTokenizer.from_pretrained(cfg.reward_model_path, trust_remote_code=cfg.trust_remote_code)
    for model in (policy, ref, reward_model):
        if model is not None:
            common.disable_dropout(model)  # dropout would make the rollout log-probs differ from the training ones
    for model in (ref, reward_model):
        if model is not None:
            model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    models = [common.shard_model(m.to(device)) if m is not None else None for m in (policy, ref, reward_model)]
    return (*models, tokenizer, reward_tokenizer)


def compute_scores(reward_fns: dict, reward_model, reward_tokenizer, tokenizer, query, query_mask, responses,
                   response_mask, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, dict]:
    """Sequence rewards (B,): the sum of the reward functions, or the reward model's normalised score read at the
    EOS token when there is none; and each component (B,) by name, for logging."""
    parts = {}
    for name, fn in reward_fns.items():
        parts[name] = torch.tensor(fn(prompts, completions), dtype=torch.float32, device=query.device)
    if not reward_fns:
        parts["reward_model"] = common.score_responses(reward_model, reward_tokenizer, tokenizer, query, query_mask,
                                                       responses, response_mask, prompts, completions).float()
    return torch.stack(list(parts.values())).sum(0), parts


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    rank, world_size, device = common.setup_distributed()
    common.set_seed(cfg.seed)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    G = cfg.num_samples_per_prompt
    estimator = cfg.advantage_estimator
    loss_agg = AUTO_LOSS_AGG[estimator] if cfg.loss_agg == "auto" else cfg.loss_agg
    if G < 2 and estimator != "reinforce_pp":
        raise ValueError(f"--advantage_estimator {estimator} needs --num_samples_per_prompt >= 2 (a group)")
    if cfg.dynamic_sampling and G < 2:
        raise ValueError("--dynamic_sampling needs --num_samples_per_prompt >= 2")
    kl_estimator = cfg.kl_estimator if cfg.kl_estimator != "auto" else "k3" if cfg.kl_in_loss else "k1"
    if cfg.kl_in_loss and cfg.kl_coef > 0 and kl_estimator == "k1":
        raise ValueError("--kl_estimator k1 as a loss term has zero expected gradient; use k2 or k3 with --kl_in_loss")
    if cfg.rollout_batch_size % world_size:
        raise ValueError(f"rollout_batch_size {cfg.rollout_batch_size} is not divisible by world size {world_size}")
    local_prompts = cfg.rollout_batch_size // world_size  # groups per rank: a group never spans ranks
    B = local_prompts * G  # sequences per rank
    if B % (cfg.num_minibatches * cfg.gradient_accumulation_steps):
        raise ValueError(f"{B} sequences per rank do not split into {cfg.num_minibatches} minibatches of "
                         f"{cfg.gradient_accumulation_steps} micro-batches")

    # 0. models, data
    policy, ref, reward_model, tokenizer, reward_tokenizer = load_models(cfg, device)
    reward_fns = {spec.split(":")[-1]: common.load_function(spec) for spec in (cfg.reward_fn or "").split(",") if spec}
    eval_spec = cfg.eval_reward_fn
    if eval_spec == "auto":
        eval_spec = "toy_task:gold_reward" if "data/toy" in os.path.abspath(cfg.prompts) else "none"
    eval_reward_fn = None if eval_spec == "none" else common.load_function(eval_spec)
    prompt_texts, prompt_ids, n_cut = load_prompts(cfg.prompts, tokenizer, cfg.max_prompt_length)
    eval_texts, eval_ids, _ = load_prompts(cfg.eval_prompts, tokenizer, cfg.max_prompt_length)
    if rank == 0:
        print(f"{estimator}: {len(prompt_texts)} prompts ({n_cut} cut to {cfg.max_prompt_length} tokens), "
              f"{cfg.num_iterations} iterations x {cfg.rollout_batch_size} prompts x G={G}, loss {loss_agg}, "
              f"beta {cfg.kl_coef} ({'loss' if cfg.kl_in_loss else 'reward'}), "
              f"reward: {cfg.reward_fn or cfg.reward_model_path}, world size {world_size}", flush=True)

    # the optimiser must hold FSDP2's sharded parameters: built before the first forward pass (the evaluation)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5)
    total_updates = cfg.num_iterations * cfg.ppo_epochs * cfg.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: common.cosine_schedule(
        s, total_updates, int(cfg.warmup_ratio * total_updates), cfg.lr_scheduler))
    logger = common.MetricsLogger(cfg.output_dir, rank, cfg.tensorboard, cfg.wandb_project, asdict(cfg))
    # all randomness in named generators (the state a resume restores): prompt order is the same on every rank (they
    # agree on the global batch), minibatch order too, sampling differs per rank
    data_gen = torch.Generator().manual_seed(cfg.seed)
    minibatch_gen = torch.Generator().manual_seed(cfg.seed + 1)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    order, pos = [], 0  # the epoch's prompt order and the position in it

    def evaluate(iteration: int) -> dict:
        m = common.evaluate_policy(policy, tokenizer, eval_texts, device, ref_policy=ref, reward_model=reward_model,
                                   reward_tokenizer=reward_tokenizer, reward_fn=eval_reward_fn,
                                   samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   seed=cfg.seed + 10_000, amp_dtype=amp_dtype, prompt_token_ids=eval_ids)
        per_sample = m.pop("per_sample")
        logger.log(iteration, {f"eval/{k}": v for k, v in m.items()},
                   ("eval/gold_reward_mean", "eval/proxy_reward_mean", "eval/kl_to_ref", "eval/distinct_completions"))
        every = max(1, len(per_sample["prompt"]) // 6)  # six samples spread over the prompts
        m["samples"] = [{k: per_sample[k][i] for k in ("prompt", "completion", "gold", "proxy")}
                        for i in range(0, len(per_sample["prompt"]), every)][:6]
        return m

    initial_eval = evaluate(0)
    t_start, episodes, episodes_sampled = time.time(), 0, 0
    for iteration in range(1, cfg.num_iterations + 1):
        # ---- 1. rollout: G samples of each of this rank's prompts in one batch; score; dynamic sampling rounds ------
        t0, t_score = time.time(), 0.0
        taken, dropped = [], []  # (rollout of one round, indices of its groups) kept for training / dropped
        n_kept = n_groups_seen = n_zero_std = rounds = 0
        while True:  # one round without dynamic sampling; every rank runs every round (FSDP: all ranks in a forward)
            rounds += 1
            if pos + cfg.rollout_batch_size > len(order):
                order, pos = torch.randperm(len(prompt_texts), generator=data_gen).tolist() * \
                    max(1, -(-cfg.rollout_batch_size // len(prompt_texts))), 0
            batch_idx = order[pos:pos + cfg.rollout_batch_size][rank::world_size]
            pos += cfg.rollout_batch_size
            batch_idx = [i for i in batch_idx for _ in range(G)]  # consecutive groups of G samples of one prompt
            r = {"prompts": [prompt_texts[i] for i in batch_idx]}
            r["query"], r["query_mask"] = common.left_pad([prompt_ids[i] for i in batch_idx], tokenizer.pad_token_id,
                                                          device)
            policy.eval()
            with autocast():
                r["responses"], r["response_mask"] = common.generate(
                    policy, r["query"], r["query_mask"], cfg.max_new_tokens, tokenizer.eos_token_id,
                    tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, sample_gen, sync_ranks=True)
            policy.train()
            r["completions"] = tokenizer.batch_decode(r["responses"], skip_special_tokens=True)
            t1 = time.time()
            with torch.no_grad(), autocast():
                scores, r["parts"] = compute_scores(reward_fns, reward_model, reward_tokenizer, tokenizer, r["query"],
                                                    r["query_mask"], r["responses"], r["response_mask"], r["prompts"],
                                                    r["completions"])
            ended = (r["responses"] == tokenizer.eos_token_id).any(1)
            scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
            r["scores"] = scores + overlong_penalty(r["response_mask"].sum(1), cfg.max_new_tokens,
                                                    cfg.overlong_buffer, cfg.overlong_penalty_factor)
            t_score += time.time() - t1
            zero_std = zero_std_groups(r["scores"], G).tolist() if G > 1 else [False] * local_prompts
            n_groups_seen += local_prompts
            n_zero_std += sum(zero_std)
            drop = [g for g in range(local_prompts) if cfg.dynamic_sampling and zero_std[g]]
            take = [g for g in range(local_prompts) if g not in drop][:local_prompts - n_kept]
            taken.append((r, take))
            dropped.append((r, drop))
            n_kept += len(take)
            episodes_sampled += B * world_size
            need_more = common.all_reduce_sum(torch.tensor(float(n_kept < local_prompts), device=device)).item() > 0
            if not need_more or rounds >= cfg.max_sampling_rounds:
                break
        n_filled = local_prompts - n_kept
        for r, drop in dropped:  # the cap was reached: complete the batch with dropped groups, so it keeps its size
            taken.append((r, drop[:local_prompts - n_kept]))
            n_kept += len(taken[-1][1])
        chunks = [(r, [g * G + j for g in groups for j in range(G)]) for r, groups in taken if groups]  # sequences
        query = cat_padded([r["query"][i] for r, i in chunks], tokenizer.pad_token_id, left=True)  # (B, P)
        query_mask = cat_padded([r["query_mask"][i] for r, i in chunks], 0, left=True)
        responses = cat_padded([r["responses"][i] for r, i in chunks], tokenizer.pad_token_id, left=False)  # (B, R)
        response_mask = cat_padded([r["response_mask"][i] for r, i in chunks], 0, left=False)
        scores = torch.cat([r["scores"][i] for r, i in chunks])  # (B,)
        parts = {k: torch.cat([r["parts"][k][i] for r, i in chunks]) for k in chunks[0][0]["parts"]}
        batch_prompts = [r["prompts"][j] for r, i in chunks for j in i]
        completions = [r["completions"][j] for r, i in chunks for j in i]
        P = query.size(1)
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
        mask = response_mask.float()  # (B, R)
        ended = (responses == tokenizer.eos_token_id).any(1)  # (B,)
        loss_mask = mask * ended[:, None].float() if cfg.overlong_filter else mask  # (B, R) tokens in the loss
        t_generate = time.time() - t0 - t_score

        # ---- 2. old log-probs (the rollout policy) and reference log-probs, no grad -------------------------------
        t1 = time.time()
        with torch.no_grad(), autocast():
            old_logprobs = common.sequence_logprobs(policy, seq, seq_mask, P, cfg.temperature)  # (B, R)
            ref_logprobs = common.sequence_logprobs(ref, seq, seq_mask, P, cfg.temperature) if ref is not None \
                else None
        t_score += time.time() - t1

        # ---- 3. advantages ----------------------------------------------------------------------------------------
        kl = torch.zeros_like(mask) if ref is None else kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * mask
        advantages = compute_advantages(estimator, scores, kl, mask, G, 0.0 if cfg.kl_in_loss else cfg.kl_coef,
                                        cfg.gamma, distributed=True)  # (B, R)

        # ---- 4. policy-gradient epochs over shuffled minibatches --------------------------------------------------
        t1 = time.time()
        stats = {k: torch.zeros((), device=device) for k in
                 ("pg_loss", "entropy", "clip_low", "clip_high", "tokens")}
        mb_size = B // cfg.num_minibatches
        micro_size = mb_size // cfg.gradient_accumulation_steps
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=minibatch_gen).tolist()
            for start in range(0, B, mb_size):
                mb = perm[start:start + mb_size]
                # means over the global minibatch; / world_size undoes FSDP's gradient mean over ranks
                num_tokens = common.all_reduce_sum(loss_mask[mb].sum()) / world_size
                for mstart in range(0, mb_size, micro_size):
                    idx = torch.tensor(mb[mstart:mstart + micro_size], device=device)
                    m = loss_mask[idx]
                    with autocast():
                        logprobs, entropy = common.sequence_logprobs(policy, seq[idx], seq_mask[idx], P,
                                                                     cfg.temperature, return_entropy=True)
                    per_token, _, is_low, is_high = clipped_surrogate(
                        logprobs, old_logprobs[idx], advantages[idx], m, cfg.clip_low, cfg.clip_high,
                        cfg.importance_sampling_level)
                    loss_terms = per_token - cfg.entropy_coef * entropy if cfg.entropy_coef else per_token
                    if cfg.kl_in_loss and ref is not None:
                        kl_t = kl_penalty(logprobs, ref_logprobs[idx], kl_estimator)  # (micro, R)
                        loss_terms = loss_terms + cfg.kl_coef * kl_t
                    loss = aggregate_loss(loss_terms, m, loss_agg, num_seqs=mb_size, num_tokens=num_tokens,
                                          max_len=cfg.max_new_tokens)
                    loss.backward()
                    stats["pg_loss"] += common.masked_sum(per_token.detach(), m)
                    stats["entropy"] += common.masked_sum(entropy.detach(), m)
                    stats["clip_low"] += is_low.sum()
                    stats["clip_high"] += is_high.sum()
                    stats["tokens"] += m.sum()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t1

        # ---- 5. log -----------------------------------------------------------------------------------------------
        episodes += B * world_size
        stats = {k: common.all_reduce_sum(v) for k, v in stats.items()}
        n_tok = stats.pop("tokens").clamp(min=1)
        all_scores = torch.cat(common.gather_lists([scores.cpu()]))
        lengths = torch.cat(common.gather_lists([mask.sum(1).cpu()]))
        all_ended = torch.cat(common.gather_lists([ended.float().cpu()]))
        zero_std_batch = torch.cat(common.gather_lists([zero_std_groups(scores, G).float().cpu()])).mean().item() \
            if G > 1 else 0.0
        counts = common.all_reduce_sum(torch.tensor([n_zero_std, n_groups_seen, n_filled, kl.sum().item(),
                                                     mask.sum().item()], dtype=torch.float64, device=device))
        metrics = {
            "reward": all_scores.mean().item(),
            "reward_std": all_scores.view(-1, G).std(1).mean().item() if G > 1 else 0.0,  # mean within-group std
            **{f"rewards/{k}/mean": torch.cat(common.gather_lists([v.cpu()])).mean().item() for k, v in parts.items()},
            "frac_reward_zero_std": zero_std_batch,  # of the groups trained on (TRL's)
            "dynamic_sampling/frac_zero_std_sampled": (counts[0] / counts[1]).item(),  # of every group sampled
            "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": 1.0 - all_ended.mean().item(),  # no EOS within max_new_tokens
            "entropy": (stats["entropy"] / n_tok).item(),
            # KL_t of the rollout (the estimator in use) to the reference: per token (TRL's kl) and per response
            "kl": (counts[3] / counts[4]).item() if ref is not None else float("nan"),
            "kl_seq": (counts[3] / (B * world_size)).item() if ref is not None else float("nan"),
            "clip_ratio/low_mean": (stats["clip_low"] / n_tok).item(),
            "clip_ratio/high_mean": (stats["clip_high"] / n_tok).item(),
            "loss/policy": (stats["pg_loss"] / n_tok).item(), "grad_norm": grad_norm.item(),
            "dynamic_sampling/rounds": rounds, "dynamic_sampling/filled": counts[2].item(),
            "lr": scheduler.get_last_lr()[0], "episodes": episodes, "episodes_sampled": episodes_sampled,
            "episodes_per_s": episodes / (time.time() - t_start),
            "time/generate": t_generate, "time/score": t_score, "time/train": t_train,
        }
        logger.log(iteration, metrics, ("reward", "reward_std", "frac_reward_zero_std", "kl_seq", "entropy",
                                        "clip_ratio/high_mean") if iteration % cfg.log_every == 0 else ())
        if iteration % cfg.sample_every == 0 and rank == 0:
            for p, c, s in list(zip(batch_prompts, completions, scores.tolist()))[:3]:
                print(f"   sample [{s:+.2f}] {p} |{c}")
        if iteration % cfg.eval_every == 0 and iteration != cfg.num_iterations:
            evaluate(iteration)

    # ---- 6. final evaluation, save ---------------------------------------------------------------------------------
    final_eval = evaluate(cfg.num_iterations)
    common.save_checkpoint(policy, tokenizer, cfg.output_dir)
    result = {k: v for k, v in final_eval.items() if k != "samples"}
    result.update({"sft_" + k: v for k, v in initial_eval.items() if k != "samples"})
    # script / advantage_estimator / config: how toy_task.py report recognises and labels a grpo.py run
    result.update({"samples": final_eval["samples"], "episodes": episodes, "episodes_sampled": episodes_sampled,
                   "wall_time_s": time.time() - t_start, "episodes_per_s": episodes / (time.time() - t_start),
                   "script": "grpo.py", "advantage_estimator": estimator, "loss_agg": loss_agg, "config": asdict(cfg)})
    if rank == 0:
        common.write_json_atomic(os.path.join(cfg.output_dir, "eval.json"), result)
        print(f"saved {cfg.output_dir}\n"
              f"held-out gold reward: SFT {initial_eval['gold_reward_mean']:.3f} "
              f"(std {initial_eval['gold_reward_std']:.3f}) -> {estimator} {final_eval['gold_reward_mean']:.3f} | "
              f"proxy reward "
              f"{initial_eval['proxy_reward_mean']:.3f} -> {final_eval['proxy_reward_mean']:.3f} | KL to SFT "
              f"{final_eval['kl_to_ref']:.3f} | distinct {final_eval['distinct_completions']:.3f} | "
              f"eos rate {final_eval['eos_rate']:.3f} | {result['wall_time_s']:.0f}s", flush=True)
        for s in final_eval["samples"]:
            print(f"   [{s['gold']:+.2f} gold, {s['proxy']:+.2f} proxy] {s['prompt']} |{s['completion']}")
    logger.close()
    common.cleanup_distributed()
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
