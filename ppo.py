"""PPO for language models (RLHF stage three), in one file: actor, critic, frozen reward model, frozen reference.

    python ppo.py                       # toy task: runs/sft + runs/reward_model, CPU, ~1 minute
    python ppo.py --help                # every option, explained
    python ppo.py --reward_fn toy_task:gold_reward          # a rule-based / verifiable reward instead of a model
    torchrun --nproc_per_node 8 ppo.py --model_name_or_path ... --reward_model_path ... --prompts my_prompts.jsonl

One iteration (Ziegler et al. 2019; Ouyang et al. 2022; the implementation details of Huang et al. 2024,
"The N+ implementation details of RLHF with PPO", and of OpenRLHF, Hu et al. 2024):
  1. rollout   y ~ pi_old(. | x) for a batch of prompts x; logprobs = log pi_old(y_t | x, y_<t) at the same temperature
  2. score     s = RM(x, y) read at the EOS token (or a reward function); penalty if the response never ended
  3. rewards   r_t = -beta * KL_t  (+ s on the last response token, the EOS itself, never on padding after it)
               KL_t from one of  k1 = log pi/pi_ref,  k2 = (log pi/pi_ref)^2 / 2,  k3 = pi_ref/pi - 1 - log pi_ref/pi
  4. GAE       delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lambda A_{t+1};  returns = A + V
  5. update    ratio = exp(logprobs_new - logprobs_old)
               L_pg = mean_t max(-A_t ratio, -A_t clip(ratio, 1 - eps, 1 + eps))
               L_V  = 1/2 mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
               loss = L_pg + vf_coef L_V - entropy_coef H, means over real response tokens only
"""

import math
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common


@dataclass
class Config:
    # model
    model_name_or_path: str = "runs/sft"
    """policy to start from (the SFT checkpoint); a frozen copy is the KL reference"""
    reward_model_path: str = "runs/reward_model"
    """frozen reward model (AutoModelForSequenceClassification, num_labels=1), e.g. the output of reward_model.py"""
    critic_init: Literal["reward_model", "sft"] = "reward_model"
    """initialise the critic (value model) from the reward model (OpenRLHF's default) or from the SFT model with a
    fresh value head"""
    trust_remote_code: bool = False
    """allow model code from the hub"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """weights' dtype. auto: trained weights in fp32 (master weights; bf16 compute on CUDA with --bf16), frozen
    models in bf16 on CUDA, fp32 on CPU; bfloat16: every weight in bf16 (AdamW states too); float32: all fp32
    (float16 training would need loss scaling, which these scripts do not do)"""
    frozen_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the frozen models (reference, reward model); auto follows --dtype"""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """attention kernel: sdpa (PyTorch's fused attention), flash_attention_2 (needs the flash-attn package), eager"""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA only the adapter is trained and saved (see merge_lora)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is lora_alpha / lora_r * B A"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch; must be 0 here: the ratios / implicit rewards compare forward passes, which must
    be deterministic"""
    lora_target_modules: tuple[str, ...] = ()
    """module names to adapt (e.g. q_proj v_proj); default: every linear layer of the transformer blocks"""
    merge_lora: bool = False
    """also write the adapter merged into the base model: a full checkpoint that plain transformers loads (the
    adapter goes to output_dir/adapter)"""
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
    rewards, e.g. toy_task:gold_reward); repeat for several. Called like TRL's reward functions: f(prompts=...,
    completions=..., **the prompt rows' other fields) -> one float per completion, or None where it cannot score (such
    samples are left out of the loss and counted)"""
    reward_weights: tuple[float, ...] = ()
    """weight of each --reward_fn in the score (default 1 each)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of responses that never emit EOS (cut off at max_new_tokens)"""
    score_norm: Literal["none", "running", "per_prompt"] = "none"
    """score normalisation: running whitening over all scores seen so far, or the per-prompt
    r - mean(r of the same prompt) + global mean (needs num_samples_per_prompt > 1)"""
    score_clip: float = 0.0
    """clip scores to [-score_clip, score_clip] after normalisation (0 = off)"""
    # algorithm
    num_iterations: int = 100
    """rollout + update iterations"""
    max_steps: int | None = None
    """stop after this many iterations (overrides num_iterations; the LR schedule spans them)"""
    rollout_batch_size: int = 64
    """prompts per iteration (global, over all ranks)"""
    num_samples_per_prompt: int = 1
    """responses sampled per prompt (N > 1 enables the per-prompt score normalisation)"""
    max_new_tokens: int = 16
    """longest response"""
    temperature: float = 1.0
    """sampling temperature; training log-probs use the same temperature so the first-epoch ratio is 1"""
    top_k: int = 0
    """top-k sampling (0 = off). Log-probs are of the full temperature-scaled distribution, as in TRL"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off)"""
    kl_coef: float = 0.2
    """beta in r_t = -beta * KL_t; larger keeps the policy closer to the reference (initial value if adaptive). On the
    toy, 0.05 (TRL's default) reaches slightly more gold reward at twice the KL and collapses the diversity"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator in the reward (Schulman's k1 / k2 / k3)"""
    adaptive_kl: bool = False
    """adapt beta to keep the KL near target_kl (Ziegler et al. 2019)"""
    target_kl: float = 4.0
    """target per-sequence KL for the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (in episodes) of the adaptive controller: beta moves by at most 20% * episodes / horizon per iteration"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_advantages: bool = True
    """normalise advantages over the real response tokens of the batch (all ranks)"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_minibatches: int = 2
    """minibatches per PPO epoch (one optimiser step each)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""
    cliprange: float = 0.2
    """policy ratio clip epsilon"""
    cliprange_value: float = 0.2
    """value clip epsilon (around the rollout values)"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus"""
    # optimisation
    learning_rate: float = 1e-4
    """actor learning rate (the toy model is tiny; use ~1e-6 to 1e-5 for pretrained models)"""
    critic_learning_rate: float = 2e-4
    """critic learning rate"""
    shared_optimizer: bool = False
    """one AdamW over actor and critic (with learning_rate) instead of one optimiser each"""
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
    """recompute activations in backward (actor and critic)"""
    seed: int = 1
    """seed (each rank samples with seed + rank)"""
    # evaluation
    eval_every: int = 20
    """evaluate on held-out prompts every this many iterations (and before and after training)"""
    eval_samples_per_prompt: int = 8
    """samples per held-out prompt in each evaluation"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function scoring evaluation samples (repeat for several); default: the
    training --reward_fn, else the toy's gold reward when training on the toy; "none" to disable"""
    sample_every: int = 20
    """print a few rollout completions every this many iterations"""
    # checkpoints
    output_dir: str = "runs/ppo"
    """where the policy (HF format + tokenizer), metrics.jsonl and eval.json are written"""
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
                            "max_new_tokens", "temperature", "target_kl", "kl_horizon", "ppo_epochs",
                            "num_minibatches", "gradient_accumulation_steps", "cliprange", "cliprange_value",
                            "learning_rate", "critic_learning_rate", "max_grad_norm", "eval_every",
                            "eval_samples_per_prompt", "sample_every", "log_every", "save_total_limit"),
            nonnegative=("top_k", "missing_eos_penalty", "kl_coef", "score_clip", "vf_coef", "entropy_coef",
                         "weight_decay", "save_every"),
            fractions=("gamma", "lam", "warmup_ratio", "eval_split"), probabilities=("top_p",))
        if self.score_norm == "per_prompt" and self.num_samples_per_prompt < 2:
            raise common.InputError("--score_norm per_prompt needs --num_samples_per_prompt >= 2")
        if self.max_steps is not None and self.max_steps < 1:
            raise common.InputError(f"--max_steps must be >= 1, got {self.max_steps}")


# ---------------------------------------------------------------------------------------------------------------------
# The math, as small pure functions (tested against naive loops in tests/test_ppo.py)
# ---------------------------------------------------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples y_t ~ pi, (B, R) -> (B, R).

    With log_ratio = log pi - log pi_ref:
    k1 = log_ratio (unbiased, can be negative), k2 = log_ratio^2 / 2 (biased, low variance),
    k3 = exp(-log_ratio) - 1 + log_ratio (unbiased, always >= 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise common.InputError(f"unknown KL estimator {estimator}")


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """r_t = -beta * KL_t on real response tokens, plus the score on the last real one (the EOS token itself when the
    response ended, else its last token), never on padding after it. scores (B,), kl/response_mask (B, R) -> (B, R)."""
    non_score = -kl_coef * kl * response_mask
    last = response_mask.sum(1).long().clamp(min=1) - 1  # (B,) index of the last real response token
    rewards = non_score.clone()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens, (B, R) -> advantages, returns (B, R).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last real token
    (the episode ends at EOS), returns = A + V. Padding positions get 0."""
    values = values * response_mask
    rewards = rewards * response_mask
    R = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_values = values[:, t + 1] if t + 1 < R else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def policy_loss(logprobs, old_logprobs, advantages, response_mask, cliprange: float, token_count):
    """Clipped surrogate (Schulman et al. 2017): sum_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) / token_count,
    over real response tokens; all inputs (B, R).

    token_count: the number of real tokens the mean is over, those of the whole global minibatch (all
    micro-batches and ranks). Returns (loss, stats): approxkl_sum, the sum of k2 = (log ratio)^2 / 2 of new vs old
    policy, and clipped_tokens, the number of tokens whose clipped term was the larger one (zero gradient)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = common.masked_sum(torch.max(pg_losses, pg_losses_clipped), response_mask) / token_count
    with torch.no_grad():
        stats = {"approxkl_sum": common.masked_sum(0.5 * log_ratio ** 2, response_mask),
                 "clipped_tokens": common.masked_sum((pg_losses_clipped > pg_losses).float(), response_mask)}
    return loss, stats


def value_loss(values, old_values, returns, response_mask, cliprange_value: float, token_count):
    """1/2 sum_t max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) / token_count over real tokens, (B, R)
    inputs. Returns (loss, stats) with clipped_tokens, the tokens whose clipped value error was the larger one."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * common.masked_sum(torch.max(losses, losses_clipped), response_mask) / token_count
    with torch.no_grad():
        stats = {"clipped_tokens": common.masked_sum((losses_clipped > losses).float(), response_mask)}
    return loss, stats


def per_prompt_normalize(scores: torch.Tensor, group_size: int, global_mean: torch.Tensor | None = None,
                         scored: torch.Tensor | None = None):
    """r - mean(r of the same prompt) + global mean (the group baseline of RLOO / GRPO, keeping the scale), for scores
    (B,) laid out as consecutive groups of group_size samples of one prompt. global_mean: the batch mean over all ranks
    (default: of these scores). scored (B,): the samples that have a score; a prompt's mean is over those only."""
    grouped = scores.view(-1, group_size)
    global_mean = scores.mean() if global_mean is None else global_mean
    counted = torch.ones_like(grouped) if scored is None else scored.view(-1, group_size).to(grouped.dtype)
    group_mean = (grouped * counted).sum(1, keepdim=True) / counted.sum(1, keepdim=True).clamp(min=1)
    return (grouped - group_mean + global_mean).view(-1)


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_episodes / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        proportional_error = np.clip(current_kl / self.target - 1, -0.2, 0.2)
        self.value *= 1 + proportional_error * n_episodes / self.horizon


class RunningMoments:
    """Running mean / std of all scores seen so far (parallel Welford update; statistics over all ranks)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        count = torch.tensor(float(x.numel()), device=x.device)  # on x's device: stack (and NCCL) need one device
        stats = common.all_reduce_sum(torch.stack([x.sum(), (x ** 2).sum(), count]).double())
        n = stats[2].item()
        if n == 0:  # nothing was scored in this batch
            return
        batch_mean = stats[0].item() / n
        batch_var = max(stats[1].item() / n - batch_mean ** 2, 0.0)
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var ** 0.5 + 1e-8)


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
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
    """actor (trained), ref (frozen; with LoRA the actor with its adapter switched off), reward model (frozen, or None
    with --reward_fn), critic (trained; with LoRA an adapter on its own backbone and a fully trained value head)."""
    trained_dtype, frozen_dtype = common.weight_dtypes(cfg.dtype, device, cfg.frozen_dtype)
    kw = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    policy_opt, rm_opt = "--model_name_or_path", "--reward_model_path"
    tokenizer = common.from_pretrained(AutoTokenizer, cfg.model_name_or_path, policy_opt,
                                       trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise common.InputError(f"{policy_opt} {cfg.model_name_or_path}: the tokenizer needs a pad token distinct from "
                                "EOS (sft.py adds one)")
    actor = common.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt, dtype=trained_dtype, **kw)
    common.check_model_kind(actor, cfg.model_name_or_path, policy_opt, "policy")
    ref = None if cfg.lora_r else common.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt,
                                                         dtype=frozen_dtype, **kw)
    reward_model = reward_tokenizer = None
    if not cfg.reward_fn:
        reward_model = common.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path, rm_opt,
                                              dtype=frozen_dtype, **kw)
        common.check_model_kind(reward_model, cfg.reward_model_path, rm_opt, "reward")
        reward_tokenizer = common.from_pretrained(AutoTokenizer, cfg.reward_model_path, rm_opt,
                                                  trust_remote_code=cfg.trust_remote_code)
    if cfg.critic_init == "reward_model":
        critic = common.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path, rm_opt,
                                        dtype=trained_dtype, **kw)
        common.check_model_kind(critic, cfg.reward_model_path, rm_opt, "reward")
        if not common.same_tokenizer(AutoTokenizer.from_pretrained(cfg.reward_model_path), tokenizer):
            raise common.InputError("--critic_init reward_model needs the reward model to share the policy's "
                                    "tokenizer; use --critic_init sft")
    else:
        critic = common.from_pretrained(AutoModelForSequenceClassification, cfg.model_name_or_path, policy_opt,
                                        num_labels=1, dtype=trained_dtype, **kw)
        hidden = critic.score.weight.size(1)
        torch.nn.init.normal_(critic.score.weight, std=1 / np.sqrt(hidden + 1))
    critic.config.pad_token_id = tokenizer.pad_token_id
    for model in (actor, ref, reward_model, critic):
        if model is not None:
            common.disable_dropout(model)  # dropout would make the rollout log-probs differ from the training ones
    for model in (ref, reward_model):
        if model is not None:
            model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
        critic.gradient_checkpointing_enable()
    actor, critic = common.add_lora(actor, cfg), common.add_lora(critic, cfg, modules_to_save=["score"])
    compute = common.autocast_dtype(device, cfg.bf16)
    actor, ref, reward_model, critic = [common.shard_model(m.to(device), compute) if m is not None else None
                                        for m in (actor, ref, reward_model, critic)]
    return actor, ref or common.WithoutAdapter(actor), reward_model, critic, tokenizer, reward_tokenizer


def critic_values(critic, input_ids, attention_mask, context_length: int) -> torch.Tensor:
    """V(s_t) for every response token t: the value head at the position just before the token, (B, R)."""
    return common.head_outputs(critic, input_ids, attention_mask)[:, context_length - 1:-1]


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    rank, world_size, device = common.setup_distributed()
    common.set_seed(cfg.seed)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    if cfg.rollout_batch_size % world_size:
        raise common.InputError(f"--rollout_batch_size {cfg.rollout_batch_size} is not divisible by the "
                                f"{world_size} processes")
    local_batch = cfg.rollout_batch_size // world_size * cfg.num_samples_per_prompt  # sequences per rank
    if local_batch % (cfg.num_minibatches * cfg.gradient_accumulation_steps):
        raise common.InputError(f"{local_batch} sequences per rank do not split into --num_minibatches "
                                f"{cfg.num_minibatches} of --gradient_accumulation_steps "
                                f"{cfg.gradient_accumulation_steps} micro-batches")
    num_iterations = cfg.max_steps or cfg.num_iterations
    reward_fns = common.load_reward_fns(cfg.reward_fn, cfg.reward_weights)
    common.require_checkpoint(cfg.model_name_or_path, "sft.py")
    if not reward_fns or cfg.critic_init == "reward_model":
        common.require_checkpoint(cfg.reward_model_path, "reward_model.py", "--reward_model_path")

    # 1. data, models
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
    actor, ref, reward_model, critic, tokenizer, reward_tokenizer = load_models(cfg, device)
    common.check_length(actor.config, cfg.max_prompt_length + cfg.max_new_tokens,
                        "--max_prompt_length + --max_new_tokens", cfg.model_name_or_path)
    prompt_ids, n_cut = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    eval_ids = tokenize_prompts(eval_prompts, tokenizer, cfg.max_prompt_length)[0]
    if rank == 0:
        print(f"PPO: policy {cfg.model_name_or_path} | prompts {cfg.prompts}: {len(prompts)} ({n_cut} cut to "
              f"{cfg.max_prompt_length} tokens) | reward {', '.join(reward_fns) or cfg.reward_model_path} | eval "
              f"prompts {eval_path or 'none'}{f' ({len(eval_prompts)})' if eval_prompts else ''} | eval reward "
              f"{', '.join(eval_reward_fns) or 'none'} | {num_iterations} iterations x "
              f"{cfg.rollout_batch_size * cfg.num_samples_per_prompt} episodes | world size {world_size}", flush=True)
    common.prepare_output_dir(cfg.output_dir, rank)
    resume_from = common.resume_checkpoint(cfg.output_dir, cfg.resume)
    common.check_disk_space(cfg.output_dir, common.checkpoint_bytes([actor, critic], actor, cfg.save_every),
                            "the final policy and a checkpoint of actor and critic")

    actor_params = [p for p in actor.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    if cfg.shared_optimizer:
        optimizers = [torch.optim.AdamW(actor_params + critic_params, lr=cfg.learning_rate,
                                        weight_decay=cfg.weight_decay, eps=1e-5)]
    else:
        optimizers = [torch.optim.AdamW(actor_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=1e-5),
                      torch.optim.AdamW(critic_params, lr=cfg.critic_learning_rate, weight_decay=cfg.weight_decay,
                                        eps=1e-5)]
    total_updates = num_iterations * cfg.ppo_epochs * cfg.num_minibatches
    schedulers = [common.lr_scheduler(o, cfg.lr_scheduler, total_updates, cfg.warmup_ratio) for o in optimizers]
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
    kl_coef = cfg.kl_coef
    score_moments = RunningMoments()
    batches = common.BatchOrder(len(prompts), cfg.rollout_batch_size, cfg.seed)  # same on all ranks
    minibatch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same on all ranks: the minibatch shuffles
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)  # per-rank sampling seed
    generators = {"minibatch": minibatch_gen, "sample": sample_gen}
    episodes, wall_time, start_iteration = 0, 0.0, 0
    if resume_from is not None:
        state = common.load_state(resume_from, {"actor": actor, "critic": critic}, optimizers, generators, cfg)
        start_iteration, initial_eval = state["step"], state["state"]["initial_eval"]
        batches.load_state_dict(state["state"]["batches"])
        for sched, sched_state in zip(schedulers, state["state"]["schedulers"]):
            sched.load_state_dict(sched_state)
        kl_coef, episodes, wall_time = (state["state"][k] for k in ("kl_coef", "episodes", "wall_time"))
        if kl_ctl is not None:
            kl_ctl.value = kl_coef
        score_moments.mean, score_moments.var, score_moments.count = state["state"]["score_moments"]
        if rank == 0:
            print(f"resumed from {resume_from} at iteration {start_iteration}", flush=True)
    logger = common.MetricsLogger(cfg.output_dir, rank, cfg.tensorboard, cfg.wandb_project, asdict(cfg), resume_from)

    def evaluate(iteration: int) -> dict:
        if not eval_prompts:
            return {}
        m = common.evaluate_policy(actor, tokenizer, eval_prompts, device, prompt_token_ids=eval_ids,
                                   prompt_columns=eval_columns, ref_policy=ref,
                                   reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                                   reward_fns=eval_reward_fns, samples_per_prompt=cfg.eval_samples_per_prompt,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                   top_p=cfg.top_p, seed=cfg.seed + 10_000, amp_dtype=amp_dtype)
        per_sample = m.pop("per_sample")
        logger.log(iteration, {f"eval/{k}": v for k, v in m.items()},
                   (*[f"eval/{n}_mean" for n in eval_reward_fns], "eval/proxy_reward_mean", "eval/kl_to_ref",
                    *[f"eval/{n}_proxy_agreement" for n in eval_reward_fns], "eval/eos_rate"))
        every = max(1, len(per_sample["prompt"]) // 6)  # six samples spread over the prompts
        m["samples"] = [{"prompt": common.prompt_text(per_sample["prompt"][i]),
                         **{k: per_sample[k][i] for k in ("completion", "proxy", *eval_reward_fns)}}
                        for i in range(0, len(per_sample["prompt"]), every)][:6]
        return m

    if resume_from is None:
        initial_eval = evaluate(0)
    t_start = time.time() - wall_time
    for iteration in range(start_iteration + 1, num_iterations + 1):
        # ---- 1. rollout: each rank takes its share of the global prompt batch, N samples each --------------------
        t0 = time.time()
        batch_idx = batches.next()[rank::world_size]
        batch_idx = [i for i in batch_idx for _ in range(cfg.num_samples_per_prompt)]  # groups of N per prompt
        batch_prompts = [prompts[i] for i in batch_idx]
        query, query_mask = common.left_pad([prompt_ids[i] for i in batch_idx], tokenizer.pad_token_id, device)
        actor.eval()
        with common.autocast(device, amp_dtype):
            responses, response_mask = common.generate(  # (B, R) each
                actor, query, query_mask, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                cfg.temperature, cfg.top_k, cfg.top_p, sample_gen, sync_ranks=True)
        actor.train()
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        P = query.size(1)
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)  # (B, P + R)
        response_mask = response_mask.float()  # (B, R)
        t_generate = time.time() - t0

        # ---- 2. score, rollout and reference log-probs, values (no grad) -----------------------------------------
        t0 = time.time()
        with torch.no_grad(), common.autocast(device, amp_dtype):
            logits = common.response_logits(actor, seq, seq_mask, P)  # (B, R, V)
            logprobs = common.logprobs_from_logits(logits, responses, cfg.temperature)  # (B, R): pi_old's
            sampling = common.sampling_diagnostics(logits, responses, response_mask, cfg.temperature)
            del logits
            ref_logprobs = common.sequence_logprobs(ref, seq, seq_mask, P, cfg.temperature)  # (B, R)
            values = critic_values(critic, seq, seq_mask, P).float() * response_mask  # (B, R)
            if reward_fns:
                total, per_fn = common.score_with_fns(reward_fns, batch_prompts, completions,
                                                      common.batch_columns(columns, batch_idx))
                scores = torch.tensor([math.nan if v is None else v for v in total], device=device)  # (B,)
            else:
                scores = common.score_responses(reward_model, reward_tokenizer, tokenizer, query, query_mask,
                                                responses, seq_mask[:, P:], batch_prompts, completions).float()
        # a sample no reward function could score (None) is left out of the loss: its tokens are masked
        scored = ~scores.isnan()  # (B,)
        response_mask = response_mask * scored[:, None]
        scores = torch.where(scored, scores, 0.0)
        raw_scores = scores.clone()
        ended = (responses == tokenizer.eos_token_id).any(1)  # (B,)
        scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
        if cfg.score_norm == "running":
            score_moments.update(scores[scored])
            scores = score_moments.whiten(scores)
        elif cfg.score_norm == "per_prompt":
            global_mean = common.all_reduce_sum(scores[scored].sum()) / common.all_reduce_sum(scored.sum()).clamp(min=1)
            scores = per_prompt_normalize(scores, cfg.num_samples_per_prompt, global_mean, scored)
        if cfg.score_clip > 0:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        t_score = time.time() - t0

        # ---- 3. per-token rewards, 4. advantages -------------------------------------------------------------------
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * response_mask  # (B, R)
        rewards, non_score = compute_rewards(scores, kl, response_mask, kl_coef)  # (B, R)
        advantages, returns = compute_gae(rewards, values, response_mask, cfg.gamma, cfg.lam)  # (B, R)
        if cfg.whiten_advantages:
            advantages = common.masked_whiten(advantages, response_mask, distributed=True)

        # ---- 5. PPO epochs over shuffled minibatches -------------------------------------------------------------
        t0 = time.time()
        # this rank's sums for the log (reduced over ranks once, in step 6)
        sums = dict.fromkeys(("pg_loss", "vf_loss", "approxkl", "clipped", "vf_clipped", "entropy", "trained_tokens"),
                             torch.zeros((), device=device, dtype=torch.float64))
        B = seq.size(0)
        mb_size = B // cfg.num_minibatches
        micro_size = mb_size // cfg.gradient_accumulation_steps
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=minibatch_gen).tolist()
            for start in range(0, B, mb_size):
                mb = perm[start:start + mb_size]
                # the loss is a mean over the real tokens of the global minibatch (every micro-batch, every rank);
                # none at all (every sample unscored) makes it 0, not 0 / 0
                token_count = common.all_reduce_sum(response_mask[mb].sum()).clamp(min=1)
                for mstart in range(0, mb_size, micro_size):
                    idx = torch.tensor(mb[mstart:mstart + micro_size], device=device)
                    mb_mask = response_mask[idx]  # (b, R)
                    with common.autocast(device, amp_dtype):
                        new_logprobs, entropy = common.sequence_logprobs(actor, seq[idx], seq_mask[idx], P,
                                                                         cfg.temperature, return_entropy=True)
                        new_values = critic_values(critic, seq[idx], seq_mask[idx], P).float()
                    pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[idx], advantages[idx], mb_mask,
                                                    cfg.cliprange, token_count)
                    vf_loss, vf_stats = value_loss(new_values, values[idx], returns[idx], mb_mask, cfg.cliprange_value,
                                                   token_count)
                    entropy_sum = common.masked_sum(entropy, mb_mask)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy_sum / token_count
                    (loss * world_size).backward()  # FSDP averages gradients over ranks; * world_size makes it a sum
                    for key, value in (("pg_loss", pg_loss * token_count), ("vf_loss", vf_loss * token_count),
                                       ("approxkl", pg_stats["approxkl_sum"]), ("clipped", pg_stats["clipped_tokens"]),
                                       ("vf_clipped", vf_stats["clipped_tokens"]), ("entropy", entropy_sum),
                                       ("trained_tokens", mb_mask.sum())):
                        sums[key] = sums[key] + value.detach().double()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                for opt, sched in zip(optimizers, schedulers):
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        t_train = time.time() - t0

        # ---- 6. log: one reduction of this rank's sums, one gather of the scores -----------------------------------
        episodes += cfg.rollout_batch_size * cfg.num_samples_per_prompt
        residual = returns - values
        sums.update({k: v.double() for k, v in (
            ("kl", kl.sum()), ("non_score", non_score.sum()), ("response_tokens", response_mask.sum()),
            ("ended", ended.float().sum()), ("returns", (returns * response_mask).sum()),
            ("returns_sq", (returns ** 2 * response_mask).sum()), ("residual", (residual * response_mask).sum()),
            ("residual_sq", (residual ** 2 * response_mask).sum()))})
        totals = dict(zip(sums, common.all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        gathered = common.gather_lists([{"raw": raw_scores[scored].tolist(), "scores": scores[scored].tolist(),
                                         **{name: per_fn[name] for name in reward_fns}}])
        all_raw = np.asarray([v for part in gathered for v in part["raw"]])  # the scored samples of every rank
        all_scores = np.asarray([v for part in gathered for v in part["scores"]])
        n_seq, n_tok = B * world_size, max(1.0, totals["trained_tokens"])
        n_unscored = n_seq - len(all_raw)
        if n_unscored == n_seq:  # nothing scored in this batch: its score statistics are undefined (null in the log)
            all_raw = all_scores = np.array([math.nan])

        def token_var(total: float, squares: float) -> float:  # unbiased variance over the real tokens of all ranks
            n = max(2.0, totals["response_tokens"])
            return (squares - total ** 2 / n) / (n - 1)

        metrics = {
            "objective/scores": all_raw.mean(), "objective/scores_std": all_raw.std(ddof=1),
            "objective/unscored": n_unscored,
            **{f"rewards/{name}": np.mean([v for part in gathered for v in part[name] if v is not None] or [math.nan])
               for name in reward_fns},
            **{f"objective/scores_p{q}": float(np.percentile(all_raw, q)) for q in (10, 50, 90)},
            "objective/normalized_scores": all_scores.mean(),
            "objective/kl": totals["kl"] / n_seq, "objective/non_score_reward": totals["non_score"] / n_seq,
            "objective/rlhf_reward": all_scores.mean() + totals["non_score"] / n_seq,
            "objective/entropy": totals["entropy"] / n_tok, "policy/approxkl": totals["approxkl"] / n_tok,
            "policy/clipfrac": totals["clipped"] / n_tok, "loss/policy": totals["pg_loss"] / n_tok,
            "loss/value": totals["vf_loss"] / n_tok, "val/clipfrac": totals["vf_clipped"] / n_tok,
            "val/explained_variance": 1 - token_var(totals["residual"], totals["residual_sq"]) / max(
                1e-8, token_var(totals["returns"], totals["returns_sq"])),
            **sampling,  # of rank 0's rollout batch
            "response_length": totals["response_tokens"] / n_seq, "eos_rate": totals["ended"] / n_seq,
            "beta": kl_coef, "lr": schedulers[0].get_last_lr()[0], "episodes": episodes,
            "episodes_per_s": episodes / (time.time() - t_start),
            "time/generate": t_generate, "time/score": t_score, "time/train": t_train,
        }
        logger.log(iteration, metrics, ("objective/scores", "objective/kl", "policy/clipfrac", "val/explained_variance",
                                        "eos_rate", "beta") if iteration % cfg.log_every == 0 else ())
        if iteration % cfg.sample_every == 0 and rank == 0:
            for p, c, s in list(zip(batch_prompts, completions, raw_scores.tolist()))[:3]:
                print(f"   sample [{s:+.2f}] {common.prompt_text(p)} |{c}")
        if kl_ctl is not None:
            kl_ctl.update(metrics["objective/kl"], cfg.rollout_batch_size * cfg.num_samples_per_prompt)
            kl_coef = kl_ctl.value
        if iteration % cfg.eval_every == 0 and iteration != num_iterations:
            evaluate(iteration)
        if cfg.save_every and iteration % cfg.save_every == 0 and iteration < num_iterations:
            common.save_state(cfg.output_dir, iteration, {"actor": actor, "critic": critic}, optimizers, generators, {
                "batches": batches.state_dict(), "schedulers": [sched.state_dict() for sched in schedulers],
                "kl_coef": kl_coef, "episodes": episodes, "wall_time": time.time() - t_start,
                "score_moments": [score_moments.mean, score_moments.var, score_moments.count],
                "initial_eval": initial_eval}, logger, cfg, cfg.save_total_limit)

    # ---- 7. final evaluation, save ---------------------------------------------------------------------------------
    final_eval = evaluate(num_iterations)
    result = {k: v for k, v in final_eval.items() if k != "samples"}
    result.update({"sft_" + k: v for k, v in initial_eval.items() if k != "samples"})
    result.update({"samples": final_eval.get("samples", []), "episodes": episodes,
                   "wall_time_s": time.time() - t_start, "episodes_per_s": episodes / (time.time() - t_start)})
    common.save_model(actor, tokenizer, cfg.output_dir, result, logger, merge_lora=cfg.merge_lora)
    if rank == 0:
        line = [f"saved {cfg.output_dir}"]
        if final_eval:
            line += [f"held-out {name}: SFT {initial_eval[f'{name}_mean']:.3f} (std "
                     f"{initial_eval[f'{name}_std']:.3f}) -> PPO {final_eval[f'{name}_mean']:.3f}"
                     for name in eval_reward_fns]
            if reward_model is not None:
                line.append(f"proxy reward {initial_eval['proxy_reward_mean']:.3f} -> "
                            f"{final_eval['proxy_reward_mean']:.3f}")
            line += [f"KL to SFT {final_eval['kl_to_ref']:.3f}", f"eos rate {final_eval['eos_rate']:.3f}"]
        print(" | ".join(line), flush=True)
        for s in final_eval.get("samples", []):
            scores = ", ".join(f"{s[k]:+.2f} {k}" for k in (*eval_reward_fns, "proxy")
                               if s[k] is not None and not math.isnan(s[k]))
            print(f"   [{scores}] {s['prompt']} |{s['completion']}")
    logger.close()
    common.cleanup_distributed()
    return result


if __name__ == "__main__":
    common.cli(main, Config)
