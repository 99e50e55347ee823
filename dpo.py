"""Direct Preference Optimization (DPO) and its common variants, in one file.

    python dpo.py                                   # toy task: starts from runs/sft, CPU, ~2 minutes
    python dpo.py --help                            # every option, explained
    python dpo.py --model_name_or_path my-sft-model --dataset prefs.jsonl --eval_dataset none --eval_prompts none \
        --beta 0.1 --learning_rate 5e-7
    torchrun --nproc_per_node 8 dpo.py ...          # many GPUs (FSDP2)

The reward-model-free alternative to PPO (Rafailov et al. 2023, section 4). The KL-regularised objective
max_pi E[r(x, y)] - beta * KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x).
Put into the Bradley-Terry likelihood of a preference y_w > y_l, Z(x) cancels and the policy is trained directly on
the pairs:

    h    = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x))
    loss = -log sigmoid(beta * h)                                   (sigmoid, Rafailov et al. 2023)

log pi(y|x) is the sum of the token log-probs of the response only. Variants: ipo (h - 1/(2 beta))^2 (Azar et al.
2023), hinge max(0, 1 - beta h) (SLiC, Zhao et al. 2023), label smoothing eps (conservative DPO, Mitchell 2023) and
robust DPO (Chowdhury et al. 2024), both for labels flipped with probability eps; plus an optional SFT term
rpo_alpha * (-log pi(y_w|x) / |y_w|) (RPO, Pang et al. 2024). The implicit reward beta * log(pi / pi_ref) is logged.

Data (TRL's preference formats; JSON lines, JSON, parquet, CSV, a datasets.save_to_disk folder or a hub dataset id):
{"prompt", "chosen", "rejected"} strings (responses carry their leading space; the EOS token is appended here),
implicit-prompt {"chosen", "rejected"} full texts (the shared beginning, cut at a word boundary, is the prompt), or
conversational message lists: {"prompt": [...], "chosen": [assistant message], "rejected": [...]} or {"chosen": [...],
"rejected": [...]} full conversations that share their leading messages; the tokenizer's chat template renders the
prompt, and a response is what it renders after the prompt (the assistant message and its end-of-turn text).
"""

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common


@dataclass
class Config:
    # model
    model_name_or_path: str = "runs/sft"
    """policy to start from (Hugging Face checkpoint: hub id or local directory); `python sft.py` makes the toy's"""
    ref_model_name_or_path: str | None = None
    """frozen reference pi_ref (default: model_name_or_path, the usual choice); must share the policy's tokenizer"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
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
    dataset: str = "data/toy/preferences_train.jsonl"
    """training preference pairs: a .jsonl / .json / .parquet / .csv file, a datasets.save_to_disk folder or a hub
    dataset id (formats in the module docstring)"""
    dataset_split: str = "train"
    """split of a hub dataset or save_to_disk folder with several splits"""
    eval_dataset: str = "auto"
    """held-out preference pairs for eval loss and implicit-reward accuracy (same sources and formats); "auto" = the
    toy's file when training on the toy, else none (see --eval_split); "none" to skip"""
    eval_dataset_split: str = "test"
    """split of a hub eval dataset or save_to_disk folder with several splits"""
    eval_split: float = 0.0
    """hold out this fraction of the training pairs (seeded) as eval pairs when no eval dataset is given"""
    eval_prompts: str = "auto"
    """held-out prompts (prompt-only rows, any source) sampled from at the start and the end to measure rewards and
    the KL to the reference, as ppo.py does; "auto" = the toy's held-out prompts when training on the toy, else the
    prompts of the eval pairs; "none" to skip"""
    max_length: int = 64
    """longest prompt + response (tokens); see `truncation`"""
    truncation: Literal["truncate", "drop"] = "truncate"
    """over-long pairs: cut the responses at max_length (they then have no EOS) or drop the pair; either is counted.
    A pair whose prompt alone is max_length or longer is always dropped"""
    # algorithm
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: DPO; ipo: (h - 1/(2 beta))^2; hinge: max(0, 1 - beta h); robust: unbiased under label flips"""
    beta: float = 0.1
    """strength of the implicit KL penalty: larger keeps the policy closer to the reference (ipo: target margin
    1/(2 beta))"""
    label_smoothing: float = 0.0
    """eps, the assumed probability that a label is flipped (sigmoid: conservative DPO; robust: robust DPO); 0 = DPO"""
    rpo_alpha: float = 0.0
    """weight of an SFT term, the length-normalised NLL of the chosen response (0 disables it)"""
    precompute_ref_log_probs: bool = False
    """compute the reference log-probs of every training pair once before training and free the reference model
    (saves its memory and a forward pass per step; it is reloaded at the end for the KL of the final evaluation)"""
    # training
    num_epochs: float = 1.0
    """passes over the training pairs (fractions allowed)"""
    max_steps: int | None = None
    """stop after this many optimiser steps (overrides num_epochs; the LR schedule spans them)"""
    per_device_batch_size: int = 64
    """pairs per micro-batch on each process (one forward pass holds 2x as many sequences)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step; global batch = per_device_batch_size * this * world size"""
    learning_rate: float = 3e-4
    """peak AdamW learning rate, tuned for the tiny toy model (on the toy, 1e-4 moves the policy too little in one
    epoch and 5e-4 drifts further from the reference); use ~5e-7 to 1e-6 for pretrained LLMs"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after the warmup"""
    warmup_ratio: float = 0.1
    """fraction of the optimiser steps spent in linear warmup"""
    max_grad_norm: float = 1.0
    """gradient clipping (global L2 norm)"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    seed: int = 1
    """seed of data order and evaluation sampling"""
    # evaluation
    eval_every: int = 50
    """evaluate held-out preferences every this many optimiser steps (and at the end)"""
    eval_samples_per_prompt: int = 16
    """completions sampled per held-out prompt in the start / end evaluation"""
    max_new_tokens: int = 24
    """maximum completion length when sampling (tokens)"""
    temperature: float = 1.0
    """sampling temperature of the evaluation (the KL to the reference is measured at it)"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function scoring eval samples (TRL's reward-function signature; repeat for
    several); default: the toy's gold reward when training on the toy, else none; "none" to disable"""
    reward_model_path: str = "auto"
    """reward model (from reward_model.py) also scoring the eval samples (proxy reward); "auto" = runs/reward_model
    when training on the toy and it exists, else none; "none" to disable. DPO never trains on it"""
    # checkpoints
    output_dir: str = "runs/dpo"
    """where the policy (Hugging Face format), eval.json, metrics.jsonl and checkpoints/ are written"""
    save_every: int = 0
    """write a checkpoint for --resume every this many optimiser steps into output_dir/checkpoints (0 = never)"""
    save_total_limit: int = 2
    """checkpoints kept (the newest); older ones are deleted after each save"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir, exactly as if the run had not stopped"""
    # logging
    log_every: int = 10
    """log training metrics (averaged over the steps since the last log) every this many optimiser steps"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the `tensorboard` package)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (needs `wandb`)"""

    def __post_init__(self):
        common.check_lora_options(self)
        if self.lora_dropout:
            raise common.InputError("--lora_dropout must be 0: the forward passes that are compared must be "
                                    "deterministic (dropout is disabled everywhere for the same reason)")
        common.check_options(self, positive=("beta", "max_length", "num_epochs", "per_device_batch_size",
                                             "gradient_accumulation_steps", "learning_rate", "max_grad_norm",
                                             "eval_every", "log_every", "eval_samples_per_prompt", "max_new_tokens",
                                             "temperature", "save_total_limit"),
                             nonnegative=("rpo_alpha", "weight_decay", "save_every"),
                             fractions=("warmup_ratio", "eval_split"))
        if not 0 <= self.label_smoothing < 0.5:
            raise common.InputError(f"--label_smoothing must be in [0, 0.5) (the assumed rate of flipped labels), "
                                    f"got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise common.InputError(f"--label_smoothing applies to --loss_type sigmoid and robust, not "
                                    f"{self.loss_type}")
        if self.max_steps is not None and self.max_steps < 1:
            raise common.InputError(f"--max_steps must be >= 1, got {self.max_steps}")


# ---------------------------------------------------------------------------------------------------------------------
# Losses: pure functions of the sequence log-probs, (B,) -> (B,) per-pair losses
# ---------------------------------------------------------------------------------------------------------------------
def logratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)), (B,): how much more the policy
    prefers the chosen response than the reference does. beta * h is the implicit-reward margin."""
    return (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: -log sigmoid(beta h). With label smoothing eps (conservative DPO): the expected loss when each label is
    flipped with probability eps, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); its optimum is a finite
    margin, so the policy stops pushing once beta h = log((1 - eps) / eps)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024):
    ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps), an unbiased estimate of the
    clean-label DPO loss when labels are flipped with probability eps (< 1/2)."""
    if not 0 <= label_smoothing < 0.5:
        raise common.InputError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) \
        / (1 - 2 * label_smoothing)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2, a regression of the log-ratio margin onto a finite target, so that
    deterministic preferences cannot drive the policy infinitely far from the reference (DPO's failure mode).
    h uses summed sequence log-probs as in the paper (TRL averages them over tokens instead)."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF style hinge (Zhao et al. 2023): max(0, 1 - beta h); no gradient once the margin exceeds 1 / beta."""
    return torch.relu(1 - beta * h)


def preference_loss(h: torch.Tensor, loss_type: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss (B,) of the chosen variant."""
    if loss_type == "sigmoid":
        return sigmoid_loss(h, beta, label_smoothing)
    if loss_type == "robust":
        return robust_loss(h, beta, label_smoothing)
    if label_smoothing:
        raise common.InputError(f"label_smoothing applies to the sigmoid and robust losses, not to {loss_type}")
    if loss_type == "ipo":
        return ipo_loss(h, beta)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    raise common.InputError(f"unknown loss_type {loss_type!r}")


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """-log pi(y_w|x) / |y_w|, (B,): the NLL per token of the chosen response (RPO's SFT term). DPO alone can lower
    the likelihood of both responses as long as the rejected one falls faster; this keeps the chosen one likely."""
    return -chosen_logps / chosen_lengths.clamp(min=1)


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)): the reward the policy is optimal for, up to beta log Z(x)."""
    return beta * (logps - ref_logps)


# ---------------------------------------------------------------------------------------------------------------------
# Data: preference rows -> (prompt_ids, chosen_ids, rejected_ids)
# ---------------------------------------------------------------------------------------------------------------------
def tokenize_pair(row: dict, tokenizer, where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one preference row (common.parse_preference_row: explicit or implicit
    prompt, strings or conversations); the responses end with EOS. Prompt and responses are tokenised separately, so
    the response mask is exact even where the tokenizer would merge tokens across the boundary."""
    prompt, chosen, rejected = common.parse_preference_row(row, where)
    prompt_ids = common.render_prompt(prompt, tokenizer, where)[1]
    if not prompt_ids:  # the first response token must be conditioned on something
        raise common.InputError(f"{where}: empty prompt (and the tokenizer adds no BOS token)")
    return (prompt_ids, common.render_completion(prompt, chosen, tokenizer, where),
            common.render_completion(prompt, rejected, tokenizer, where))


def build_dataset(rows: list[tuple[str, dict]], tokenizer, cfg: Config) -> tuple[list, dict]:
    """Tokenised pairs (prompt_ids, chosen_ids, rejected_ids) and the counts of the skip / truncation policy."""
    examples, counts = [], {"truncated": 0, "dropped": 0, "identical": 0}
    for where, row in rows:
        prompt_ids, chosen_ids, rejected_ids = tokenize_pair(row, tokenizer, where)
        if chosen_ids == rejected_ids:  # no preference to learn (zero gradient); counted, not an error
            counts["identical"] += 1
            continue
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > cfg.max_length:
            if cfg.truncation == "drop" or len(prompt_ids) >= cfg.max_length:
                counts["dropped"] += 1
                continue
            keep = cfg.max_length - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:keep], rejected_ids[:keep]
            counts["truncated"] += 1
        examples.append((prompt_ids, chosen_ids, rejected_ids))
    if not examples:
        raise common.InputError(f"{rows[0][0].rsplit(':', 1)[0]}: no usable pair (--max_length {cfg.max_length}, "
                                f"counts {counts})")
    return examples, counts


def collate_pairs(examples, pad_token_id: int, device):
    """One batch of 2B rows: the chosen responses (rows :B), then the rejected ones (rows B:) of the same prompts, so
    that a single forward pass scores both (and FSDP gathers each block once, not twice).

    Prompts are left-padded to P columns and responses right-padded after them: every response starts at column P,
    which is the layout of common.sequence_logprobs (shared with ppo.py); positions count from each row's first real
    token, so the padding changes nothing. Returns input_ids (2B, P + R), attention_mask (2B, P + R),
    response_mask (2B, R) (1 on real response tokens, incl. EOS) and P."""
    prompts = [p for p, _, _ in examples] * 2
    responses = [c for _, c, _ in examples] + [r for _, _, r in examples]
    prompt_ids, prompt_mask = common.left_pad(prompts, pad_token_id, device)
    response_ids = common.right_pad(responses, pad_token_id, device)
    response_mask = common.right_pad([[1] * len(r) for r in responses], 0, device)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    return input_ids, attention_mask, response_mask, prompt_ids.size(1)


def concatenated_logps(model, input_ids, attention_mask, response_mask, context_length):
    """Sequence log-probs log pi(y|x) = sum_t log pi(y_t | x, y_<t) over response tokens only (prompt and padding
    masked), for a collate_pairs batch. Returns (chosen_logps (B,), rejected_logps (B,))."""
    token_logprobs = common.sequence_logprobs(model, input_ids, attention_mask, context_length)  # (2B, R)
    logps = common.masked_sum(token_logprobs, response_mask, dim=1)  # (2B,)
    B = logps.size(0) // 2
    return logps[:B], logps[B:]


@torch.no_grad()
def all_pair_logps(model, examples, batch_size: int, pad_token_id: int, device, amp_dtype) -> torch.Tensor:
    """(N, 2) [chosen, rejected] sequence log-probs of every pair, on every rank. Each rank scores a strided share;
    all ranks run the same number of forward passes (FSDP needs every rank in every forward)."""
    was_training = model.training
    model.eval()
    local = []
    for idx in common.rank_batches(len(examples), batch_size):
        with common.autocast(device, amp_dtype):
            c, r = concatenated_logps(model, *collate_pairs([examples[i] for i in idx or [0]], pad_token_id, device))
        local += [(i, float(lc), float(lr)) for i, lc, lr in zip(idx, c.float().tolist(), r.float().tolist())]
    model.train(was_training)
    out = torch.empty(len(examples), 2)
    for i, c, r in common.gather_lists(local):
        out[i, 0], out[i, 1] = c, r
    return out.to(device)


def pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, losses, beta) -> dict:
    """Sums over the pairs (divided by the global pair count by the caller), TRL's names."""
    chosen_rewards = implicit_rewards(chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_rewards(rejected_logps, ref_rejected_logps, beta).detach()
    return {
        "loss": losses.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),  # strict: a tie is not a success
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


def evaluate_preferences(policy, examples, ref_logps, cfg: Config, pad_token_id, device, amp_dtype) -> dict:
    """Held-out loss and implicit-reward accuracy / margin over all held-out pairs (prefix eval_)."""
    logps = all_pair_logps(policy, examples, cfg.per_device_batch_size, pad_token_id, device, amp_dtype)
    c, r, rc, rr = logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1]
    losses = preference_loss(logratio_margin(c, r, rc, rr), cfg.loss_type, cfg.beta, cfg.label_smoothing)
    return {f"eval_{k}": v.item() / len(examples) for k, v in pair_metrics(c, r, rc, rr, losses, cfg.beta).items()}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def load_tokenizer(cfg: Config):
    tokenizer = common.from_pretrained(AutoTokenizer, cfg.model_name_or_path, "--model_name_or_path",
                                       trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise common.InputError(f"{cfg.model_name_or_path}: tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        # padding is always masked (attention and response masks come from lengths, never from token ids), so
        # reusing EOS as pad is safe here and avoids growing the vocabulary away from the reference's
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, cfg: Config, tokenizer, device, trainable: bool, dtype: torch.dtype):
    option = "--model_name_or_path" if trainable else "--ref_model_name_or_path"
    model = common.from_pretrained(AutoModelForCausalLM, path, option, trust_remote_code=cfg.trust_remote_code,
                                   dtype=dtype, attn_implementation=cfg.attn_implementation)
    common.check_model_kind(model, path, option, "policy")
    common.check_length(model.config, cfg.max_length, "--max_length", path)
    if model.get_input_embeddings().weight.size(0) < len(tokenizer):
        raise common.InputError(f"{path}: {model.get_input_embeddings().weight.size(0)} token embeddings but the "
                                f"tokenizer of {cfg.model_name_or_path} has {len(tokenizer)} tokens; policy and "
                                "reference must share it")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    common.disable_dropout(model)  # the implicit reward compares two forward passes: they must be deterministic
    if trainable:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = common.add_lora(model, cfg).train()
    else:
        model.eval().requires_grad_(False)
    return common.shard_model(model.to(device), common.autocast_dtype(device, cfg.bf16))


def load_reference(ref_path: str, policy, cfg: Config, tokenizer, device, dtype: torch.dtype):
    """The frozen reference: with LoRA and the policy's own starting point, the policy with its adapter switched off
    (no second copy of the backbone); otherwise a frozen copy loaded from ref_path."""
    if cfg.lora_r and ref_path == cfg.model_name_or_path:
        return common.WithoutAdapter(policy)
    return load_causal_lm(ref_path, cfg, tokenizer, device, trainable=False, dtype=dtype)


def load_reward_model(cfg: Config, device, dtype: torch.dtype):
    path = cfg.reward_model_path
    if path == "auto":  # never guessed for real data: a leftover toy reward model would score with another tokenizer
        path = "runs/reward_model" if common.is_toy_data(cfg.dataset) and os.path.isdir("runs/reward_model") else "none"
    if path == "none":
        return None, None
    reward_model = common.from_pretrained(AutoModelForSequenceClassification, path, "--reward_model_path",
                                          trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                          attn_implementation=cfg.attn_implementation)
    common.check_model_kind(reward_model, path, "--reward_model_path", "reward")
    common.disable_dropout(reward_model)
    reward_tokenizer = common.from_pretrained(AutoTokenizer, path, "--reward_model_path",
                                              trust_remote_code=cfg.trust_remote_code)
    return common.shard_model(reward_model.eval().requires_grad_(False).to(device)), reward_tokenizer


def toy_ceiling(eval_dataset: str | None) -> float | None:
    """The accuracy that the gold reward itself reaches on the toy's noisy held-out labels (data/toy/stats.json)."""
    if not common.is_toy_data(eval_dataset) or os.path.basename(eval_dataset) != "preferences_eval.jsonl":
        return None
    stats = os.path.join(os.path.dirname(os.path.abspath(eval_dataset)), "stats.json")
    if not os.path.exists(stats):
        return None
    with open(stats) as f:
        return json.load(f).get("preferences_eval_ceiling_accuracy")


def main(cfg: Config) -> dict:
    rank, world_size, device = common.setup_distributed()
    common.set_seed(cfg.seed)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    ref_path = cfg.ref_model_name_or_path or cfg.model_name_or_path
    common.require_checkpoint(cfg.model_name_or_path, "sft.py")
    common.require_checkpoint(ref_path, "sft.py", "--ref_model_name_or_path")

    # 1. data: training and held-out pairs, held-out prompts, the functions scoring the samples
    rows = common.load_rows(cfg.dataset, "--dataset", cfg.dataset_split)
    eval_path = common.eval_data_path(cfg.eval_dataset, cfg.dataset, "data/toy/preferences_eval.jsonl")
    eval_rows = common.load_rows(eval_path, "--eval_dataset", cfg.eval_dataset_split) if eval_path else []
    if not eval_rows and cfg.eval_split > 0:
        rows, eval_rows = common.split_rows(rows, cfg.eval_split, cfg.seed)
        eval_path = f"{cfg.eval_split:.0%} of {cfg.dataset}"
    prompts_path = common.eval_data_path(cfg.eval_prompts, cfg.dataset, "data/toy/prompts_eval.jsonl")
    if prompts_path:
        eval_prompts = [common.parse_prompt(row, where) for where, row in common.load_rows(prompts_path,
                                                                                          "--eval_prompts")]
    else:  # "auto" off the toy: the prompts of the held-out pairs
        eval_prompts = [] if cfg.eval_prompts == "none" else list(
            {repr(p): p for p in (common.parse_preference_row(row, where)[0] for where, row in eval_rows)}.values())
        prompts_path = f"the prompts of {eval_path}" if eval_prompts else None
    reward_fns = common.eval_reward_fns(cfg.eval_reward_fn, cfg.dataset)

    # 2. models: the policy (trained) and the frozen reference pi_ref, both usually the SFT model
    tokenizer = load_tokenizer(cfg)
    common.check_attn_implementation(cfg.attn_implementation)
    trained_dtype, frozen_dtype = common.weight_dtypes(cfg.dtype, device, cfg.frozen_dtype)
    policy = load_causal_lm(cfg.model_name_or_path, cfg, tokenizer, device, True, trained_dtype)
    ref_model = load_reference(ref_path, policy, cfg, tokenizer, device, frozen_dtype)
    reward_model, reward_tokenizer = load_reward_model(cfg, device, frozen_dtype)
    n_params = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the full size under FSDP
    examples, counts = build_dataset(rows, tokenizer, cfg)
    eval_examples = build_dataset(eval_rows, tokenizer, cfg)[0] if eval_rows else None
    eval_prompt_ids = [common.render_prompt(p, tokenizer)[1] for p in eval_prompts]
    if eval_prompts:
        common.check_length(policy.config, max(map(len, eval_prompt_ids)) + cfg.max_new_tokens,
                            "the longest eval prompt + --max_new_tokens", cfg.model_name_or_path)

    def evaluate_samples(ref):
        """Samples from the policy on held-out prompts: rewards, proxy reward and KL to the reference (as ppo.py)."""
        metrics = common.evaluate_policy(
            policy, tokenizer, eval_prompts, device, prompt_token_ids=eval_prompt_ids, ref_policy=ref,
            reward_model=reward_model, reward_tokenizer=reward_tokenizer, reward_fns=reward_fns,
            samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, batch_size=cfg.per_device_batch_size, seed=cfg.seed, amp_dtype=amp_dtype)
        rows = metrics.pop("per_sample")
        samples = [common.prompt_text(p) + " |" + c for p, c in zip(rows["prompt"], rows["completion"])]
        return metrics, samples[::cfg.eval_samples_per_prompt][:4]

    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise common.InputError(f"{cfg.dataset}: {len(examples)} pairs is fewer than one global batch ({global_batch} "
                                f"= --per_device_batch_size x --gradient_accumulation_steps x {world_size} processes)")
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if rank == 0:
        print(f"policy {cfg.model_name_or_path}, reference {ref_path} | data {cfg.dataset}: {len(examples)} pairs "
              f"({counts}, max_length {cfg.max_length}) | eval pairs {eval_path or 'none'}"
              f"{f' ({len(eval_examples)})' if eval_examples else ''} | eval prompts {prompts_path or 'none'}"
              f"{f' ({len(eval_prompts)})' if eval_prompts else ''} | eval reward {', '.join(reward_fns) or 'none'}"
              f" | proxy reward model {cfg.reward_model_path if reward_model is not None else 'none'} | loss "
              f"{cfg.loss_type}, beta {cfg.beta} | {total_steps} steps of {global_batch} pairs | world size "
              f"{world_size}", flush=True)
    common.prepare_output_dir(cfg.output_dir, rank)
    resume_from = common.resume_checkpoint(cfg.output_dir, cfg.resume)
    common.check_disk_space(cfg.output_dir, common.checkpoint_bytes([policy], policy, cfg.save_every),
                            "the final model and a checkpoint")
    # the optimiser must hold FSDP2's sharded parameters: built before any forward pass, since after a forward that no
    # backward follows (the evaluation below) the root module's parameters() are its temporary gathered copies
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = common.lr_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.warmup_ratio)
    batches = common.BatchOrder(len(examples), global_batch, cfg.seed)  # same on every rank: the global batch
    sums, n_summed, pairs_seen, train_time, wall_time, start_step = {}, 0, 0, 0.0, 0.0, 0
    if resume_from is not None:
        state = common.load_state(resume_from, {"policy": policy}, [optimizer], {}, cfg)
        start_step, start = state["step"], state["state"]["start"]
        batches.load_state_dict(state["state"]["batches"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        n_summed, pairs_seen, train_time, wall_time = (state["state"][k] for k in ("n_summed", "pairs_seen",
                                                                                   "train_time", "wall_time"))
        sums = {k: torch.tensor(v, device=device) for k, v in state["rank_state"]["sums"].items()}
        if rank == 0:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    logger = common.MetricsLogger(cfg.output_dir, rank, cfg.tensorboard, cfg.wandb_project, asdict(cfg), resume_from)
    t_start = time.time() - wall_time

    # the starting policy, measured exactly like the final one (same prompts and sampling seed), so they compare
    if resume_from is None:
        start = evaluate_samples(ref_model)[0] if eval_prompts else {}
    # reference log-probs never change: computed once for the held-out pairs, and for the training pairs if asked
    eval_ref_logps = None if eval_examples is None else \
        all_pair_logps(ref_model, eval_examples, cfg.per_device_batch_size, tokenizer.pad_token_id, device, amp_dtype)
    train_ref_logps = None
    if cfg.precompute_ref_log_probs:
        train_ref_logps = all_pair_logps(ref_model, examples, cfg.per_device_batch_size, tokenizer.pad_token_id,
                                         device, amp_dtype)
        if not isinstance(ref_model, common.WithoutAdapter):
            ref_model = None
            gc.collect()

    # 3. training loop
    console = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "pairs_per_s")
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        for mb in common.micro_batches(batches.next(), cfg.per_device_batch_size):
            batch = collate_pairs([examples[j] for j in mb], tokenizer.pad_token_id, device)
            with common.autocast(device, amp_dtype):
                chosen_logps, rejected_logps = concatenated_logps(policy, *batch)
                if train_ref_logps is not None:
                    ref_chosen_logps, ref_rejected_logps = train_ref_logps[mb, 0], train_ref_logps[mb, 1]
                else:
                    with torch.no_grad():
                        ref_chosen_logps, ref_rejected_logps = concatenated_logps(ref_model, *batch)
            h = logratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
            losses = preference_loss(h, cfg.loss_type, cfg.beta, cfg.label_smoothing)  # (B,)
            if cfg.rpo_alpha:
                chosen_lengths = batch[2][:len(mb)].sum(1)
                losses = losses + cfg.rpo_alpha * sft_loss(chosen_logps, chosen_lengths)
            # mean over the global batch; FSDP averages gradients over ranks, hence * world_size
            (losses.sum() / global_batch * world_size).backward()
            for k, v in pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, losses,
                                     cfg.beta).items():
                sums[k] = sums.get(k, 0.0) + v.float()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - t0
        pairs_seen += global_batch
        n_summed += global_batch

        if step % cfg.log_every == 0 or step == total_steps:
            metrics = {k: common.all_reduce_sum(v).item() / n_summed for k, v in sums.items()}
            metrics.update(grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0], epoch=step / steps_per_epoch,
                           pairs_per_s=pairs_seen / max(1e-9, train_time))
            logger.log(step, metrics, console)
            sums, n_summed = {}, 0
        if eval_examples is not None and (step % cfg.eval_every == 0 or step == total_steps):
            eval_metrics = evaluate_preferences(policy, eval_examples, eval_ref_logps, cfg, tokenizer.pad_token_id,
                                                device, amp_dtype)
            logger.log(step, eval_metrics, ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"))
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            common.save_state(cfg.output_dir, step, {"policy": policy}, [optimizer], {}, {
                "batches": batches.state_dict(), "scheduler": scheduler.state_dict(), "start": start,
                "n_summed": n_summed, "pairs_seen": pairs_seen, "train_time": train_time,
                "wall_time": time.time() - t_start}, logger, cfg, cfg.save_total_limit,
                rank_state={"sums": {k: v.item() for k, v in sums.items()}})

    # 4. evaluate the trained policy like the starting one, save
    final = {}
    if eval_examples is not None:
        final.update(eval_metrics, accuracy=eval_metrics["eval_rewards/accuracies"])
        ceiling = toy_ceiling(eval_path)
        if ceiling is not None:
            final["accuracy_ceiling"] = ceiling
    if eval_prompts:
        if ref_model is None:  # freed after precomputing; the KL of the final evaluation needs it back
            ref_model = load_reference(ref_path, policy, cfg, tokenizer, device, frozen_dtype)
        end, samples = evaluate_samples(ref_model)
        final.update(end)
        final.update({f"sft_{k}": v for k, v in start.items()})
        for name in reward_fns:  # the gain in standard deviations of the starting policy's reward
            gain, std = end[f"{name}_mean"] - start[f"{name}_mean"], start[f"{name}_std"]
            final[f"{name}_gain_in_sft_std"] = gain / std if std else math.nan
    final.update(train_loss=metrics["loss"], train_steps=total_steps, pairs_per_s=pairs_seen / max(1e-9, train_time),
                 wall_time_s=time.time() - t_start, num_parameters=n_params, **counts)
    # what does not apply (NaN in this run, null when read back from a checkpoint) is left out
    final = {k: v for k, v in final.items() if not (v is None or isinstance(v, float) and math.isnan(v))}
    common.save_model(policy, tokenizer, cfg.output_dir, final, logger, merge_lora=cfg.merge_lora)
    if rank == 0:
        if eval_examples is not None:
            ceiling = f" (ceiling of the toy's labels {final['accuracy_ceiling']:.3f})" if "accuracy_ceiling" in final \
                else ""
            print(f"held-out preference accuracy {final['accuracy']:.3f}{ceiling}", flush=True)
        if eval_prompts:
            for s in samples:
                print("   sample:", s)
            parts = [f"{name} SFT {start[f'{name}_mean']:.3f} -> DPO {end[f'{name}_mean']:.3f} (std of SFT "
                     f"{start[f'{name}_std']:.3f}; gain {final.get(f'{name}_gain_in_sft_std', math.nan):.2f} std)"
                     for name in reward_fns]
            parts.append(f"KL to SFT {end['kl_to_ref']:.3f}")
            if reward_model is not None:
                parts.append(f"proxy reward SFT {start['proxy_reward_mean']:.3f} -> DPO {end['proxy_reward_mean']:.3f}")
            parts.append(f"eos rate {end['eos_rate']:.3f} ({end['num_samples']} samples)")
            print(", ".join(parts), flush=True)
        print(f"saved {cfg.output_dir}", flush=True)
    logger.close()
    common.cleanup_distributed()
    return final


if __name__ == "__main__":
    common.cli(main, Config)
