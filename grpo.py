"""Critic-free RL for language models, in one file: GRPO, Dr. GRPO, RLOO, REINFORCE++ (+ the DAPO and GSPO options).

    python grpo.py                      # toy task: runs/sft + runs/reward_model -> runs/grpo, CPU, ~1 minute
    python grpo.py --help               # every option, explained
    python grpo.py --reward_fn toy_task:gold_reward --output_dir runs/grpo_gold     # a verifiable reward, no RM
    python grpo.py --advantage_estimator rloo --output_dir runs/rloo                # another estimator
    python grpo.py --model_name_or_path my-sft --prompts math.parquet --reward_fn rewards.py:accuracy --kl_coef 0
    torchrun --nproc_per_node 8 grpo.py ...                                          # many GPUs (FSDP2)

PPO (ppo.py) learns a critic V(s_t) as the baseline of its advantages. The critic-free family instead samples a group
of G responses y_1..y_G for every prompt x and uses the group itself as the baseline (DeepSeekMath, Shao et al. 2024;
RLOO, Ahmadian et al. 2024; as in TRL's GRPOTrainer, verl and OpenRLHF). One iteration:
  1. rollout   G samples per prompt, all in one batched generation; old_logprobs = log pi_old(y_t | x, y_<t)
  2. score     r_i = RM(x, y_i) or the weighted reward functions, - missing_eos_penalty, + DAPO's soft overlong penalty
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
--kl_coef 0 the reference model is not loaded at all (TRL's default beta is 0); with LoRA the reference is the policy
with its adapter switched off.

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

Prompts: prompt-only rows {"prompt": str | messages} or {"messages": [...]} from any source of common.load_rows; the
rows' other fields (e.g. a reference answer) reach the reward functions, called as TRL calls them.
"""

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

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
    # model
    model_name_or_path: str = "runs/sft"
    """policy to start from (the SFT checkpoint); a frozen copy is the KL reference (not loaded when kl_coef is 0)"""
    reward_model_path: str = "runs/reward_model"
    """frozen reward model (AutoModelForSequenceClassification, num_labels=1), e.g. the output of reward_model.py; the
    reward when no --reward_fn is given; with --reward_fn it scores the evaluation (proxy reward) when it exists and
    the prompts are the toy's, or when given explicitly"""
    trust_remote_code: bool = False
    """allow model code from the hub"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """weights' dtype. auto: trained weights in fp32 (master weights; bf16 compute on CUDA with --bf16), frozen
    models in bf16 on CUDA, fp32 on CPU; bfloat16: every weight in bf16 (AdamW states too); float32: all fp32
    (float16 training would need loss scaling, which these scripts do not do)"""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """attention kernel: sdpa (PyTorch's fused attention), flash_attention_2 (needs the flash-attn package), eager"""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA only the adapter is trained and saved (see merge_lora)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is lora_alpha / lora_r * B A"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch; must be 0 here: the ratios compare forward passes, which must be deterministic"""
    lora_target_modules: tuple[str, ...] = ()
    """module names to adapt (e.g. q_proj v_proj); default: every linear layer of the transformer blocks"""
    merge_lora: bool = False
    """also write the adapter merged into the base model: a full checkpoint that plain transformers loads (the
    adapter goes to output_dir/adapter)"""
    frozen_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the frozen models (reference, reward model); auto follows --dtype"""
    # data
    prompts: str = "data/toy/prompts_train.jsonl"
    """training prompts, prompt-only rows {"prompt": str | messages} or {"messages": [...]} (chat template, generation
    prompt added) from a .jsonl / .json / .parquet / .csv file, a datasets.save_to_disk folder or a hub dataset id;
    the rows' other fields are passed to reward functions"""
    prompts_split: str = "train"
    """split of a hub dataset or save_to_disk folder with several splits"""
    eval_prompts: str = "auto"
    """held-out prompts for the periodic evaluation (same sources and formats); "auto" = the toy's held-out prompts
    when training on the toy, else none (see --eval_split); "none" to skip"""
    eval_split: float = 0.0
    """hold out this fraction of the training prompts (seeded) for evaluation when no eval prompts are given"""
    max_prompt_length: int = 48
    """longer prompts are cut from the left (the end of a prompt matters most for its continuation); counted"""
    # reward
    reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function used instead of the reward model (rule-based or verifiable
    rewards, e.g. toy_task:gold_reward); repeat for several (each logged). Called like TRL's reward functions:
    f(prompts=..., completions=..., **the prompt rows' other fields) -> one float per completion, or None where it
    cannot score (such a response is left out of the loss and counted)"""
    reward_weights: tuple[float, ...] = ()
    """weight of each --reward_fn in the reward (default 1 each)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the reward of responses that never emit EOS (cut off at max_new_tokens)"""
    overlong_filter: bool = False
    """DAPO's overlong filtering (TRL's mask_truncated_completions): responses without EOS take no part in the loss"""
    overlong_buffer: int = 0
    """L_cache of DAPO's soft overlong punishment: responses longer than max_new_tokens - overlong_buffer tokens get
    a penalty growing linearly to -overlong_penalty_factor at max_new_tokens (0 = off)"""
    overlong_penalty_factor: float = 1.0
    """size of the soft overlong penalty at max_new_tokens"""
    # algorithm
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """grpo (group mean and std), dr_grpo (group mean only), rloo (leave-one-out mean), reinforce_pp (REINFORCE++:
    return-to-go whitened over the global batch), reinforce_pp_baseline (the same after subtracting the group mean)"""
    num_iterations: int = 140
    """rollout + update iterations (toy: 140 x 128 responses take a little less than PPO's 100 x 64 wall time)"""
    max_steps: int | None = None
    """stop after this many iterations (overrides num_iterations; the LR schedule spans them)"""
    rollout_batch_size: int = 16
    """prompts per iteration (global, over all ranks); each rank takes rollout_batch_size / world_size prompts and
    samples all G responses of each, so every group lives on one rank"""
    num_samples_per_prompt: int = 8
    """G, responses sampled per prompt (the group); at least 2 for every estimator but reinforce_pp"""
    max_new_tokens: int = 16
    """longest response; also L_max of seq_mean_token_sum_norm and of the overlong penalty"""
    temperature: float = 1.0
    """sampling temperature; training log-probs use the same temperature so the first-epoch ratio is 1"""
    top_k: int = 0
    """top-k sampling (0 = off). Log-probs are of the full temperature-scaled distribution, as in TRL"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off)"""
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
    # optimisation
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
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward"""
    seed: int = 1
    """seed (each rank samples with seed + rank)"""
    # evaluation
    eval_every: int = 20
    """evaluate on held-out prompts every this many iterations (and before and after training)"""
    eval_samples_per_prompt: int = 8
    """samples per held-out prompt in each evaluation"""
    sample_every: int = 20
    """print a few rollout completions every this many iterations"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function scoring evaluation samples (repeat for several); default: the
    training --reward_fn, else the toy's gold reward when training on the toy; "none" to disable"""
    # checkpoints
    output_dir: str = "runs/grpo"
    """where the policy (HF format + tokenizer), metrics.jsonl and eval.json are written; use runs/<name> for other
    estimators / settings so that `python toy_task.py report` lists them"""
    save_every: int = 0
    """write a checkpoint for --resume every this many iterations into output_dir/checkpoints (0 = never)"""
    save_total_limit: int = 2
    """checkpoints kept (the newest); older ones are deleted after each save"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir, exactly as if the run had not stopped"""
    # logging
    log_every: int = 5
    """print metrics every this many iterations (metrics.jsonl gets every iteration)"""
    tensorboard: bool = False
    """also log to TensorBoard"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project"""
    def __post_init__(self):
        common.check_lora_options(self)
        if self.lora_dropout:
            raise common.InputError("--lora_dropout must be 0: the forward passes that are compared must be "
                                    "deterministic (dropout is disabled everywhere for the same reason)")
        common.check_options(
            self, positive=("num_iterations", "rollout_batch_size", "num_samples_per_prompt", "max_prompt_length",
                            "max_new_tokens", "temperature", "max_sampling_rounds", "ppo_epochs", "num_minibatches",
                            "gradient_accumulation_steps", "learning_rate", "max_grad_norm", "eval_every",
                            "eval_samples_per_prompt", "sample_every", "log_every", "save_total_limit"),
            nonnegative=("top_k", "missing_eos_penalty", "overlong_buffer", "overlong_penalty_factor", "kl_coef",
                         "clip_low", "clip_high", "entropy_coef", "weight_decay", "save_every"),
            fractions=("gamma", "warmup_ratio", "eval_split"), probabilities=("top_p",))
        if self.clip_low >= 1:
            raise common.InputError(f"--clip_low must be < 1 (the ratio is clipped below at 1 - clip_low), got "
                                    f"{self.clip_low}")
        if self.num_samples_per_prompt < 2 and self.advantage_estimator != "reinforce_pp":
            raise common.InputError(f"--advantage_estimator {self.advantage_estimator} needs "
                                    "--num_samples_per_prompt >= 2 (a group)")
        if self.dynamic_sampling and self.num_samples_per_prompt < 2:
            raise common.InputError("--dynamic_sampling needs --num_samples_per_prompt >= 2")
        if self.kl_in_loss and self.kl_coef > 0 and self.kl_estimator == "k1":
            raise common.InputError("--kl_estimator k1 as a loss term has zero expected gradient; use k2 or k3 with "
                                    "--kl_in_loss")
        if self.overlong_buffer > self.max_new_tokens:
            raise common.InputError(f"--overlong_buffer {self.overlong_buffer} exceeds --max_new_tokens "
                                    f"{self.max_new_tokens}")
        if self.max_steps is not None and self.max_steps < 1:
            raise common.InputError(f"--max_steps must be >= 1, got {self.max_steps}")


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
    raise common.InputError(f"unknown KL estimator {estimator}")


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
    (all micro-batches and ranks) so that micro-batches and ranks add up to one minibatch. Every response counts in
    num_seqs, also one without loss tokens (overlong filtering, unscored), as in TRL."""
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
def prompt_columns(rows: list[tuple[str, dict]]) -> list[dict]:
    """The fields of prompt rows other than the prompt itself (e.g. a reference answer), for reward functions."""
    return [{k: v for k, v in row.items() if k not in ("prompt", "messages")} for _, row in rows]


def tokenize_prompts(prompts: list, tokenizer, max_prompt_length: int) -> tuple[list[list[int]], int]:
    """(token ids, number cut) of prompts (strings, or conversations rendered with the chat template); longer prompts
    keep their last max_prompt_length tokens."""
    ids, cut = [], 0
    for prompt in prompts:
        tokens = common.render_prompt(prompt, tokenizer)[1]
        if len(tokens) > max_prompt_length:
            tokens, cut = tokens[-max_prompt_length:], cut + 1
        ids.append(tokens)
    return ids, cut


def load_models(cfg: Config, device):
    """policy (trained), reference (frozen; with LoRA the policy with its adapter switched off; None when kl_coef is
    0), reward model (frozen: the reward without --reward_fn, else the evaluation's proxy reward when one is at hand),
    tokenizers."""
    trained_dtype, frozen_dtype = common.weight_dtypes(cfg.dtype, device, cfg.frozen_dtype)
    kw = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    policy_opt, rm_opt = "--model_name_or_path", "--reward_model_path"
    tokenizer = common.from_pretrained(AutoTokenizer, cfg.model_name_or_path, policy_opt,
                                       trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise common.InputError(f"{policy_opt} {cfg.model_name_or_path}: the tokenizer needs a pad token distinct from "
                                "EOS (sft.py adds one)")
    policy = common.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt, dtype=trained_dtype,
                                    **kw)
    common.check_model_kind(policy, cfg.model_name_or_path, policy_opt, "policy")
    # beta = 0: no KL term anywhere, so no reference model in memory (the evaluation's KL to SFT is then not measured)
    ref = None
    if cfg.kl_coef > 0 and not cfg.lora_r:
        ref = common.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt, dtype=frozen_dtype, **kw)
    proxy = os.path.isdir(cfg.reward_model_path) and (common.is_toy_data(cfg.prompts) or
                                                      cfg.reward_model_path != Config.reward_model_path)
    reward_model = reward_tokenizer = None
    if not cfg.reward_fn or proxy:
        reward_model = common.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path, rm_opt,
                                              dtype=frozen_dtype, **kw)
        common.check_model_kind(reward_model, cfg.reward_model_path, rm_opt, "reward")
        reward_tokenizer = common.from_pretrained(AutoTokenizer, cfg.reward_model_path, rm_opt,
                                                  trust_remote_code=cfg.trust_remote_code)
    for model in (policy, ref, reward_model):
        if model is not None:
            common.disable_dropout(model)  # dropout would make the rollout log-probs differ from the training ones
    for model in (ref, reward_model):
        if model is not None:
            model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy = common.add_lora(policy, cfg)
    compute = common.autocast_dtype(device, cfg.bf16)
    policy, ref, reward_model = [common.shard_model(m.to(device), compute) if m is not None else None
                                 for m in (policy, ref, reward_model)]
    if cfg.kl_coef > 0 and cfg.lora_r:
        ref = common.WithoutAdapter(policy)
    return policy, ref, reward_model, tokenizer, reward_tokenizer


def compute_scores(reward_fns: dict, reward_model, reward_tokenizer, tokenizer, query, query_mask, responses,
                   response_mask, prompts: list, completions: list[str], columns: dict):
    """Sequence rewards (B,): the weighted reward functions (NaN where none could score), or the reward model's
    normalised score read at the EOS token when there are none; and each function's scores (B,) by name (NaN where it
    returned None), for logging."""
    if not reward_fns:
        scores = common.score_responses(reward_model, reward_tokenizer, tokenizer, query, query_mask, responses,
                                        response_mask, prompts, completions).float()
        return scores, {"reward_model": scores}
    total, per_fn = common.score_with_fns(reward_fns, prompts, completions, columns)
    as_tensor = lambda values: torch.tensor([math.nan if v is None else v for v in values],  # noqa: E731
                                            dtype=torch.float32, device=query.device)
    return as_tensor(total), {name: as_tensor(values) for name, values in per_fn.items()}


def fill_unscored(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """A response no reward function could score (NaN) takes its group's mean score, which leaves the group's mean
    unchanged (the caller leaves it out of the loss); a group with no score at all gets 0. (B,) -> (B,)."""
    grouped = scores.view(-1, group_size)
    scored = ~grouped.isnan()
    means = torch.where(scored, grouped, 0.0).sum(1, keepdim=True) / scored.sum(1, keepdim=True).clamp(min=1)
    return torch.where(scored, grouped, means).view(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    rank, world_size, device = common.setup_distributed()
    common.set_seed(cfg.seed)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    G = cfg.num_samples_per_prompt
    estimator = cfg.advantage_estimator
    loss_agg = AUTO_LOSS_AGG[estimator] if cfg.loss_agg == "auto" else cfg.loss_agg
    kl_estimator = cfg.kl_estimator if cfg.kl_estimator != "auto" else "k3" if cfg.kl_in_loss else "k1"
    if cfg.rollout_batch_size % world_size:
        raise common.InputError(f"--rollout_batch_size {cfg.rollout_batch_size} is not divisible by the "
                                f"{world_size} processes")
    local_prompts = cfg.rollout_batch_size // world_size  # groups per rank: a group never spans ranks
    B = local_prompts * G  # sequences per rank
    if B % (cfg.num_minibatches * cfg.gradient_accumulation_steps):
        raise common.InputError(f"{B} sequences per rank do not split into --num_minibatches {cfg.num_minibatches} "
                                f"of --gradient_accumulation_steps {cfg.gradient_accumulation_steps} micro-batches")
    num_iterations = cfg.max_steps or cfg.num_iterations
    reward_fns = common.load_reward_fns(cfg.reward_fn, cfg.reward_weights)
    common.require_checkpoint(cfg.model_name_or_path, "sft.py")
    if not reward_fns:
        common.require_checkpoint(cfg.reward_model_path, "reward_model.py", "--reward_model_path")

    # 0. data, models
    common.check_attn_implementation(cfg.attn_implementation)
    rows = common.load_rows(cfg.prompts, "--prompts", cfg.prompts_split)
    eval_path = common.eval_data_path(cfg.eval_prompts, cfg.prompts, "data/toy/prompts_eval.jsonl")
    eval_rows = common.load_rows(eval_path, "--eval_prompts") if eval_path else []
    if not eval_rows and cfg.eval_split > 0:
        rows, eval_rows = common.split_rows(rows, cfg.eval_split, cfg.seed)
        eval_path = f"{cfg.eval_split:.0%} of {cfg.prompts}"
    prompts = [common.parse_prompt(row, where) for where, row in rows]
    columns = prompt_columns(rows)
    eval_prompts = [common.parse_prompt(row, where) for where, row in eval_rows]
    eval_columns = prompt_columns(eval_rows)
    eval_reward_fns = common.eval_reward_fns(cfg.eval_reward_fn, cfg.prompts, reward_fns)
    policy, ref, reward_model, tokenizer, reward_tokenizer = load_models(cfg, device)
    common.check_length(policy.config, cfg.max_prompt_length + cfg.max_new_tokens,
                        "--max_prompt_length + --max_new_tokens", cfg.model_name_or_path)
    prompt_ids, n_cut = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    eval_ids = tokenize_prompts(eval_prompts, tokenizer, cfg.max_prompt_length)[0]
    if rank == 0:
        print(f"{estimator}: policy {cfg.model_name_or_path} | prompts {cfg.prompts}: {len(prompts)} ({n_cut} cut to "
              f"{cfg.max_prompt_length} tokens) | reward {', '.join(reward_fns) or cfg.reward_model_path} | eval "
              f"prompts {eval_path or 'none'}{f' ({len(eval_prompts)})' if eval_prompts else ''} | eval reward "
              f"{', '.join(eval_reward_fns) or 'none'} | {num_iterations} iterations x {cfg.rollout_batch_size} "
              f"prompts x G={G}, loss {loss_agg}, beta {cfg.kl_coef} ({'loss' if cfg.kl_in_loss else 'reward'}) | "
              f"world size {world_size}", flush=True)
    common.prepare_output_dir(cfg.output_dir, rank)
    resume_from = common.resume_checkpoint(cfg.output_dir, cfg.resume)
    common.check_disk_space(cfg.output_dir, common.checkpoint_bytes([policy], policy, cfg.save_every),
                            "the final policy and a checkpoint")

    # the optimiser must hold FSDP2's sharded parameters: built before the first forward pass (the evaluation)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, eps=1e-5)
    scheduler = common.lr_scheduler(optimizer, cfg.lr_scheduler, num_iterations * cfg.ppo_epochs * cfg.num_minibatches,
                                    cfg.warmup_ratio)
    # all randomness in named generators (restored on resume): the prompt order is the same on every rank (they
    # agree on the global batch), the minibatch order too, sampling differs per rank
    batches = common.BatchOrder(len(prompts), cfg.rollout_batch_size, cfg.seed)
    minibatch_gen = torch.Generator().manual_seed(cfg.seed + 1)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    generators = {"minibatch": minibatch_gen, "sample": sample_gen}
    episodes, episodes_sampled, wall_time, start_iteration = 0, 0, 0.0, 0
    if resume_from is not None:
        state = common.load_state(resume_from, {"policy": policy}, [optimizer], generators, cfg)
        start_iteration, initial_eval = state["step"], state["state"]["initial_eval"]
        batches.load_state_dict(state["state"]["batches"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        episodes, episodes_sampled, wall_time = (state["state"][k] for k in ("episodes", "episodes_sampled",
                                                                             "wall_time"))
        if rank == 0:
            print(f"resumed from {resume_from} at iteration {start_iteration}", flush=True)
    logger = common.MetricsLogger(cfg.output_dir, rank, cfg.tensorboard, cfg.wandb_project, asdict(cfg), resume_from)

    def evaluate(iteration: int) -> dict:
        if not eval_prompts:
            return {}
        m = common.evaluate_policy(policy, tokenizer, eval_prompts, device, prompt_token_ids=eval_ids,
                                   prompt_columns=eval_columns, ref_policy=ref, reward_model=reward_model,
                                   reward_tokenizer=reward_tokenizer, reward_fns=eval_reward_fns,
                                   samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   seed=cfg.seed + 10_000, amp_dtype=amp_dtype)
        per_sample = m.pop("per_sample")
        logger.log(iteration, {f"eval/{k}": v for k, v in m.items()},
                   (*[f"eval/{n}_mean" for n in eval_reward_fns], "eval/proxy_reward_mean", "eval/kl_to_ref",
                    "eval/distinct_completions"))
        every = max(1, len(per_sample["prompt"]) // 6)  # six samples spread over the prompts
        m["samples"] = [{"prompt": common.prompt_text(per_sample["prompt"][i]),
                         **{k: per_sample[k][i] for k in ("completion", "proxy", *eval_reward_fns)}}
                        for i in range(0, len(per_sample["prompt"]), every)][:6]
        return m

    if resume_from is None:
        initial_eval = evaluate(0)
    t_start = time.time() - wall_time
    for iteration in range(start_iteration + 1, num_iterations + 1):
        # ---- 1. rollout: G samples of each of this rank's prompts in one batch; score; dynamic sampling rounds ------
        t0, t_score = time.time(), 0.0
        taken, dropped = [], []  # (rollout of one round, indices of its groups) kept for training / dropped
        n_kept = n_groups_seen = n_zero_std = rounds = 0
        while True:  # one round without dynamic sampling; every rank runs every round (FSDP: all ranks in a forward)
            rounds += 1
            batch_idx = [i for i in batches.next()[rank::world_size] for _ in range(G)]  # groups of G per prompt
            r = {"prompts": [prompts[i] for i in batch_idx]}
            r["query"], r["query_mask"] = common.left_pad([prompt_ids[i] for i in batch_idx], tokenizer.pad_token_id,
                                                          device)  # (B, P)
            policy.eval()
            with common.autocast(device, amp_dtype):
                r["responses"], r["response_mask"] = common.generate(  # (B, R)
                    policy, r["query"], r["query_mask"], cfg.max_new_tokens, tokenizer.eos_token_id,
                    tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, sample_gen, sync_ranks=True)
            policy.train()
            r["completions"] = tokenizer.batch_decode(r["responses"], skip_special_tokens=True)
            t1 = time.time()
            with torch.no_grad(), common.autocast(device, amp_dtype):
                scores, r["parts"] = compute_scores(reward_fns, reward_model, reward_tokenizer, tokenizer, r["query"],
                                                    r["query_mask"], r["responses"], r["response_mask"], r["prompts"],
                                                    r["completions"], common.batch_columns(columns, batch_idx))
            ended = (r["responses"] == tokenizer.eos_token_id).any(1)
            scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
            r["scores"] = scores + overlong_penalty(r["response_mask"].sum(1), cfg.max_new_tokens,
                                                    cfg.overlong_buffer, cfg.overlong_penalty_factor)  # (B,), NaN:
            t_score += time.time() - t1                                                                   # unscored
            zero_std = zero_std_groups(fill_unscored(r["scores"], G), G).tolist() if G > 1 \
                else [False] * local_prompts
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
        raw_scores = torch.cat([r["scores"][i] for r, i in chunks])  # (B,), NaN where nothing could score
        parts = {k: torch.cat([r["parts"][k][i] for r, i in chunks]) for k in chunks[0][0]["parts"]}
        batch_prompts = [r["prompts"][j] for r, i in chunks for j in i]
        completions = [r["completions"][j] for r, i in chunks for j in i]
        P = query.size(1)
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)  # (B, P + R)
        response_mask = response_mask.float()  # (B, R)
        ended = (responses == tokenizer.eos_token_id).any(1)  # (B,)
        scored = ~raw_scores.isnan()  # (B,) an unscored response is left out of the loss
        scores = fill_unscored(raw_scores, G)  # (B,) its group's statistics see its group's mean
        loss_mask = response_mask * scored[:, None]  # (B, R) the tokens in the loss
        if cfg.overlong_filter:
            loss_mask = loss_mask * ended[:, None]
        t_generate = time.time() - t0 - t_score

        # ---- 2. old log-probs (the rollout policy) and reference log-probs, no grad -------------------------------
        t1 = time.time()
        with torch.no_grad(), common.autocast(device, amp_dtype):
            old_logprobs = common.sequence_logprobs(policy, seq, seq_mask, P, cfg.temperature)  # (B, R)
            ref_logprobs = common.sequence_logprobs(ref, seq, seq_mask, P, cfg.temperature) if ref is not None \
                else None
        t_score += time.time() - t1

        # ---- 3. advantages ----------------------------------------------------------------------------------------
        kl = torch.zeros_like(response_mask) if ref is None else \
            kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * response_mask  # (B, R)
        advantages = compute_advantages(estimator, scores, kl, response_mask, G,
                                        0.0 if cfg.kl_in_loss else cfg.kl_coef, cfg.gamma, distributed=True)  # (B, R)

        # ---- 4. policy-gradient epochs over shuffled minibatches --------------------------------------------------
        t1 = time.time()
        # this rank's sums for the log (reduced over ranks once, in step 5)
        sums = dict.fromkeys(("pg_loss", "entropy", "clip_low", "clip_high", "trained_tokens"),
                             torch.zeros((), device=device, dtype=torch.float64))
        mb_size = B // cfg.num_minibatches
        micro_size = mb_size // cfg.gradient_accumulation_steps
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=minibatch_gen).tolist()
            for start in range(0, B, mb_size):
                mb = perm[start:start + mb_size]
                # the means are over the global minibatch: its tokens and responses on every micro-batch and rank
                num_tokens = common.all_reduce_sum(loss_mask[mb].sum())
                for mstart in range(0, mb_size, micro_size):
                    idx = torch.tensor(mb[mstart:mstart + micro_size], device=device)
                    mb_mask = loss_mask[idx]  # (b, R)
                    with common.autocast(device, amp_dtype):
                        logprobs, entropy = common.sequence_logprobs(policy, seq[idx], seq_mask[idx], P,
                                                                     cfg.temperature, return_entropy=True)
                    per_token, _, is_low, is_high = clipped_surrogate(
                        logprobs, old_logprobs[idx], advantages[idx], mb_mask, cfg.clip_low, cfg.clip_high,
                        cfg.importance_sampling_level)  # (b, R) each
                    loss_terms = per_token - cfg.entropy_coef * entropy if cfg.entropy_coef else per_token
                    if cfg.kl_in_loss and ref is not None:
                        loss_terms = loss_terms + cfg.kl_coef * kl_penalty(logprobs, ref_logprobs[idx], kl_estimator)
                    loss = aggregate_loss(loss_terms, mb_mask, loss_agg, num_seqs=mb_size * world_size,
                                          num_tokens=num_tokens, max_len=cfg.max_new_tokens)
                    (loss * world_size).backward()  # FSDP averages gradients over ranks; * world_size makes it a sum
                    for key, value in (("pg_loss", common.masked_sum(per_token, mb_mask)),
                                       ("entropy", common.masked_sum(entropy, mb_mask)), ("clip_low", is_low.sum()),
                                       ("clip_high", is_high.sum()), ("trained_tokens", mb_mask.sum())):
                        sums[key] = sums[key] + value.detach().double()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t1

        # ---- 5. log: one reduction of this rank's sums, one gather of the per-response values ---------------------
        episodes += B * world_size
        sums.update({k: torch.tensor(float(v), device=device, dtype=torch.float64) for k, v in (
            ("kl", kl.sum()), ("response_tokens", response_mask.sum()), ("zero_std_sampled", n_zero_std),
            ("groups_sampled", n_groups_seen), ("filled", n_filled))})
        totals = dict(zip(sums, common.all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        gathered = common.gather_lists([{
            "scores": raw_scores[scored].tolist(), "lengths": response_mask.sum(1).tolist(),
            "ended": ended.float().tolist(), "unscored": int((~scored).sum()),
            "zero_std": zero_std_groups(scores, G).float().tolist() if G > 1 else [],
            "group_std": scores.view(-1, G).std(1).tolist() if G > 1 else [0.0],
            **{name: values[~values.isnan()].tolist() for name, values in parts.items()}}])
        values = {k: [v for part in gathered for v in (part[k] if isinstance(part[k], list) else [part[k]])]
                  for k in gathered[0]}
        n_tok = max(1.0, totals["trained_tokens"])
        metrics = {
            "reward": np.mean(values["scores"]) if values["scores"] else math.nan,
            "reward_std": np.mean(values["group_std"]),  # the mean within-group std
            **{f"rewards/{name}/mean": np.mean(values[name]) if values[name] else math.nan for name in parts},
            "unscored": sum(values["unscored"]),
            "frac_reward_zero_std": np.mean(values["zero_std"]) if values["zero_std"] else 0.0,  # trained groups (TRL)
            "dynamic_sampling/frac_zero_std_sampled": totals["zero_std_sampled"] / totals["groups_sampled"],
            "completions/mean_length": np.mean(values["lengths"]), "completions/min_length": min(values["lengths"]),
            "completions/max_length": max(values["lengths"]),
            "completions/clipped_ratio": 1.0 - np.mean(values["ended"]),  # no EOS within max_new_tokens
            "entropy": totals["entropy"] / n_tok,
            # KL_t of the rollout (the estimator in use) to the reference: per token (TRL's kl) and per response
            "kl": totals["kl"] / max(1.0, totals["response_tokens"]) if ref is not None else math.nan,
            "kl_seq": totals["kl"] / (B * world_size) if ref is not None else math.nan,
            "clip_ratio/low_mean": totals["clip_low"] / n_tok, "clip_ratio/high_mean": totals["clip_high"] / n_tok,
            "loss/policy": totals["pg_loss"] / n_tok, "grad_norm": grad_norm.item(),
            "dynamic_sampling/rounds": rounds, "dynamic_sampling/filled": totals["filled"],
            "lr": scheduler.get_last_lr()[0], "episodes": episodes, "episodes_sampled": episodes_sampled,
            "episodes_per_s": episodes / (time.time() - t_start),
            "time/generate": t_generate, "time/score": t_score, "time/train": t_train,
        }
        logger.log(iteration, metrics, ("reward", "reward_std", "frac_reward_zero_std", "kl_seq", "entropy",
                                        "clip_ratio/high_mean") if iteration % cfg.log_every == 0 else ())
        if iteration % cfg.sample_every == 0 and rank == 0:
            for p, c, s in list(zip(batch_prompts, completions, raw_scores.tolist()))[:3]:
                print(f"   sample [{s:+.2f}] {common.prompt_text(p)} |{c}")
        if iteration % cfg.eval_every == 0 and iteration != num_iterations:
            evaluate(iteration)
        if cfg.save_every and iteration % cfg.save_every == 0 and iteration < num_iterations:
            common.save_state(cfg.output_dir, iteration, {"policy": policy}, [optimizer], generators, {
                "batches": batches.state_dict(), "scheduler": scheduler.state_dict(), "episodes": episodes,
                "episodes_sampled": episodes_sampled, "wall_time": time.time() - t_start,
                "initial_eval": initial_eval}, logger, cfg, cfg.save_total_limit)

    # ---- 6. final evaluation, save ---------------------------------------------------------------------------------
    final_eval = evaluate(num_iterations)
    result = {k: v for k, v in final_eval.items() if k != "samples"}
    result.update({"sft_" + k: v for k, v in initial_eval.items() if k != "samples"})
    # script / advantage_estimator / config: how toy_task.py report recognises and labels a grpo.py run
    result.update({"samples": final_eval.get("samples", []), "episodes": episodes, "episodes_sampled": episodes_sampled,
                   "wall_time_s": time.time() - t_start, "episodes_per_s": episodes / (time.time() - t_start),
                   "script": "grpo.py", "advantage_estimator": estimator, "loss_agg": loss_agg, "config": asdict(cfg)})
    common.save_model(policy, tokenizer, cfg.output_dir, result, logger, merge_lora=cfg.merge_lora)
    if rank == 0:
        line = [f"saved {cfg.output_dir}"]
        if final_eval:
            line += [f"held-out {name}: SFT {initial_eval[f'{name}_mean']:.3f} (std "
                     f"{initial_eval[f'{name}_std']:.3f}) -> {estimator} {final_eval[f'{name}_mean']:.3f}"
                     for name in eval_reward_fns]
            if reward_model is not None:
                line.append(f"proxy reward {initial_eval['proxy_reward_mean']:.3f} -> "
                            f"{final_eval['proxy_reward_mean']:.3f}")
            line += [f"KL to SFT {final_eval['kl_to_ref']:.3f}", f"distinct {final_eval['distinct_completions']:.3f}",
                     f"eos rate {final_eval['eos_rate']:.3f}"]
        print(" | ".join(line + [f"{result['wall_time_s']:.0f}s"]), flush=True)
        for s in final_eval.get("samples", []):
            shown = ", ".join(f"{s[k]:+.2f} {k}" for k in (*eval_reward_fns, "proxy")
                              if s[k] is not None and not math.isnan(s[k]))
            print(f"   [{shown}] {s['prompt']} |{s['completion']}")
    logger.close()
    common.cleanup_distributed()
    return result


if __name__ == "__main__":
    common.cli(main, Config)
