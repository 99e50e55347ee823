"""Reward model (Bradley-Terry), in one file.

    python reward_model.py                          # toy task: from runs/sft (run `python sft.py` first), CPU, ~2 min
    python reward_model.py --loss ranking           # K-wise ranking loss on data/toy/rankings_*.jsonl
    python reward_model.py --help                   # every option, explained
    python reward_model.py --model_name_or_path my-sft --dataset prefs.jsonl --eval_dataset prefs_eval.jsonl \\
        --learning_rate 1e-5 --max_length 1024
    torchrun --nproc_per_node 8 reward_model.py ...   # many GPUs (FSDP2)

Stage two of RLHF (Stiennon et al. 2020; Ouyang et al. 2022): an outcome reward model r(x, y) scores a whole response.
It is the SFT model with a scalar head (AutoModelForSequenceClassification, num_labels=1) read at the last real token of
[prompt | response <eos>], trained on comparisons that follow Bradley-Terry: P(y_w > y_l | x) = sigmoid(r_w - r_l).

Math (r_k = r(x, y_k); each example of the global batch weighs the same, over all micro-batches and ranks):
    pairwise    loss = -log sigmoid(r_chosen - r_rejected - m)     m: optional per-row "margin" (Llama 2), default 0
    ranking     loss = -1 / C(K, 2) * sum_{i < j} log sigmoid(r_i - r_j)   for a list y_1 > y_2 > ... > y_K
                (InstructGPT: the K(K-1)/2 comparisons of one prompt count as one example; the log matters: a plain
                sum of sigmoids saturates instead of pushing wrong orderings apart)
    centering   + center_rewards_coef * (sum_k r_k)^2, i.e. (r_chosen + r_rejected)^2 for a pair (Eisenstein et al.
                2023): the loss above only sees differences, this pins the free offset near 0
After training the score is shifted (and optionally scaled) so that the SFT policy's own samples on training prompts
score mean 0 (std 1): reward = (r - reward_mean) / reward_std, both stored in config.json and applied by
common.get_scores, so every later user (ppo.py, best-of-N) sees the normalised reward.

Data (TRL's formats; JSON lines, JSON, parquet, CSV, a datasets.save_to_disk folder or a hub dataset id); string
completions carry their leading space and no EOS text (the EOS token is appended here):
    {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}        explicit prompt
    {"chosen": str, "rejected": str}            implicit prompt: the shared prefix, cut at its last whitespace
    {"prompt": [messages], "chosen": [assistant message] or str, "rejected": ...}      conversational
    {"chosen": [messages], "rejected": [messages]}   conversational, implicit: the shared leading messages
    {"prompt": str or [messages], "completions": [best, ..., worst]}                   --loss ranking
Conversational prompts are rendered by the tokenizer's chat template (with the generation prompt); a conversational
completion is what the template renders after the prompt (the assistant message with its end-of-turn text). Rows
whose completions are identical carry no preference: they are skipped and counted. Malformed rows (missing field,
empty completion, wrong type) stop the run with file:line and the field.
"""

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common

TOY_DATA = {"pairwise": ("data/toy/preferences_train.jsonl", "data/toy/preferences_eval.jsonl"),
            "ranking": ("data/toy/rankings_train.jsonl", "data/toy/rankings_eval.jsonl")}
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EVAL_CONSOLE_KEYS = ("eval/loss", "eval/accuracy", "eval/ceiling_accuracy", "eval/margin", "eval/reward/mean",
                     "eval/reward/std")


@dataclass
class Config:
    # model
    model_name_or_path: str = "runs/sft"
    """model to start from (Hugging Face hub id or local directory): the SFT policy, its LM head is replaced by a
    freshly initialised scalar head (an existing reward-model checkpoint keeps its head)"""
    policy_name_or_path: str | None = None
    """the policy whose own samples define the zero of the reward and are used for the reward/proxy agreement;
    default: model_name_or_path (must share the tokenizer)"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """weights' dtype. auto: trained weights in fp32 (master weights; bf16 compute on CUDA with --bf16), frozen
    models in bf16 on CUDA, fp32 on CPU; bfloat16: every weight in bf16 (AdamW states too); float32: all fp32
    (float16 training would need loss scaling, which these scripts do not do)"""
    frozen_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the frozen policy sampled for the normalisation and the agreement; auto follows --dtype"""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """attention kernel: sdpa (PyTorch's fused attention), flash_attention_2 (needs the flash-attn package), eager"""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA only the adapter is trained and saved (see merge_lora)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is lora_alpha / lora_r * B A"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch"""
    lora_target_modules: tuple[str, ...] = ()
    """module names to adapt (e.g. q_proj v_proj); default: every linear layer of the transformer blocks"""
    merge_lora: bool = False
    """also write the adapter merged into the base model: a full checkpoint that plain transformers loads (the
    adapter goes to output_dir/adapter)"""
    # data
    loss: Literal["pairwise", "ranking"] = "pairwise"
    """pairwise: preference rows {"prompt"?, "chosen", "rejected"}; ranking: rows {"prompt", "completions": [best,
    ..., worst]}"""
    dataset: str | None = None
    """training data: a .jsonl / .json / .parquet / .csv file, a datasets.save_to_disk folder or a hub dataset id
    (formats in the module docstring); default: the toy file for --loss"""
    dataset_split: str = "train"
    """split of a hub dataset or save_to_disk folder with several splits"""
    eval_dataset: str = "auto"
    """held-out comparisons for loss / accuracy (same sources and formats); "auto" = the toy's file for --loss when
    training on the toy, else none (see --eval_split); "none" to skip"""
    eval_dataset_split: str = "test"
    """split of a hub eval dataset or save_to_disk folder with several splits"""
    eval_split: float = 0.0
    """hold out this fraction of the training rows (seeded) as eval data when no eval dataset is given"""
    max_length: int = 64
    """longest prompt + completion + EOS (tokens); see `truncation`"""
    truncation: Literal["drop", "truncate_prompt"] = "drop"
    """over-long examples: drop them, or cut tokens from the start of the prompt so that every completion fits whole
    (its EOS is where the score is read); an example whose completion alone does not fit is dropped. Both counted"""
    # training
    center_rewards_coef: float = 0.0
    """weight of the centering term (sum_k r_k)^2 (TRL uses 0.01 when enabled); 0 disables it"""
    num_epochs: float = 1.0
    """passes over the training data (fractions allowed); the toy gains little from a second one"""
    max_steps: int | None = None
    """stop after this many optimiser steps (overrides num_epochs; the LR schedule spans them)"""
    per_device_batch_size: int = 64
    """comparisons (pairs or ranked lists) per micro-batch on each process; a pair is 2 sequences, a list K"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step; global batch = per_device_batch_size * this * world size"""
    learning_rate: float = 1e-3
    """peak AdamW learning rate (the toy's SFT model is tiny; use ~1e-5 for pretrained models)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after the warmup"""
    warmup_ratio: float = 0.05
    """fraction of the optimiser steps spent in linear warmup"""
    max_grad_norm: float = 1.0
    """gradient clipping (global L2 norm)"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    seed: int = 1
    """seed of the head initialisation, data order and sampling"""
    # evaluation
    eval_every: int = 100
    """evaluate every this many optimiser steps (and at the end)"""
    normalize_samples: int = 512
    """policy samples on training prompts whose scores define reward_mean (and reward_std); 0 disables normalisation
    (reward_mean 0, reward_std 1)"""
    normalize_scale: bool = False
    """also divide by the std of those scores (std 1), not only shift them (mean 0)"""
    agreement_samples_per_prompt: int = 8
    """policy samples per held-out prompt for the reward/proxy agreement (needs an eval reward function); 0 = off"""
    max_new_tokens: int = 24
    """maximum response length when sampling from the policy (tokens)"""
    temperature: float = 1.0
    """sampling temperature of the policy samples (use the one PPO will sample with)"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function, a known reward (TRL's reward-function signature; repeat for
    several): gives the accuracy it would reach on labels drawn from it (the ceiling) and the agreement of the reward
    model with it on policy samples; default: the toy's gold reward when training on the toy; "none" to disable"""
    # checkpoints
    output_dir: str = "runs/reward_model"
    """where the model (Hugging Face format), eval.json, metrics.jsonl and checkpoints/ are written"""
    save_every: int = 0
    """write a checkpoint for --resume every this many optimiser steps into output_dir/checkpoints (0 = never)"""
    save_total_limit: int = 2
    """checkpoints kept (the newest); older ones are deleted after each save"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir, exactly as if the run had not stopped"""
    # logging
    log_every: int = 20
    """log training metrics (averaged since the last log) every this many optimiser steps"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the `tensorboard` package)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (needs `wandb`)"""

    def __post_init__(self):
        common.check_lora_options(self)
        common.check_options(self, positive=("max_length", "num_epochs", "per_device_batch_size",
                                             "gradient_accumulation_steps", "learning_rate", "max_grad_norm",
                                             "eval_every", "log_every", "max_new_tokens", "save_total_limit"),
                             nonnegative=("center_rewards_coef", "weight_decay", "normalize_samples",
                                          "agreement_samples_per_prompt", "temperature", "save_every"),
                             fractions=("warmup_ratio", "eval_split"))
        if self.max_steps is not None and self.max_steps < 1:
            raise common.InputError(f"--max_steps must be >= 1, got {self.max_steps}")


# ---------------------------------------------------------------------------------------------------------------------
# Losses and metrics (pure)
# ---------------------------------------------------------------------------------------------------------------------
def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood per pair: -log sigmoid(r_c - r_r - margin), (B,), (B,) -> (B,).

    A margin m > 0 asks for r_c - r_r > m before the loss flattens out (Llama 2 uses larger margins for pairs that
    annotators found clearly different). logsigmoid is exact for large |x| where log(sigmoid(x)) underflows."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def ranking_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """K-wise loss per list: mean over the pairs i < j of -log sigmoid(s_i - s_j), scores (B, K) ordered best to
    worst -> (B,). mask (B, K) marks real entries of lists shorter than K; each list averages over its own
    K_b (K_b - 1) / 2 pairs, so every prompt weighs the same (InstructGPT). K = 2 is the pairwise loss."""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    K = scores.size(1)
    diff = scores[:, :, None] - scores[:, None, :]  # (B, K, K): s_i - s_j
    above = torch.ones(K, K, dtype=torch.bool, device=scores.device).triu(1)  # i < j: i is ranked above j
    pairs = above & mask[:, :, None] & mask[:, None, :]  # (B, K, K)
    losses = torch.where(pairs, -F.logsigmoid(diff), 0.0)
    return losses.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


def centering_penalty(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(sum_k r_k)^2 per example, scores (B, K) -> (B,); (r_c + r_r)^2 for a pair (Eisenstein et al. 2023)."""
    if mask is not None:
        scores = torch.where(mask.bool(), scores, 0.0)
    return scores.sum(1) ** 2


def pair_differences(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """s_i - s_j for every pair i < j (i ranked above j) of every list, scores (B, K) -> (P,); r_c - r_r for pairs."""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    K = scores.size(1)
    above = torch.ones(K, K, dtype=torch.bool, device=scores.device).triu(1)
    pairs = above & mask[:, :, None] & mask[:, None, :]
    return (scores[:, :, None] - scores[:, None, :])[pairs]


def preference_metrics(diffs, scores) -> dict:
    """Held-out metrics from r_better - r_worse of every comparison (diffs) and every score.

    accuracy: fraction with r_better > r_worse strictly (a tie is a miss; `ties` says how often); margin: mean
    difference; reward/*: statistics of the scores; accuracy_by_confidence/lo-hi: accuracy of the comparisons whose
    Bradley-Terry confidence sigmoid(|diff|) lies in [lo, hi), and pairs_by_confidence/lo-hi their share. A calibrated
    model's accuracy in a bucket lies inside the bucket; an over-confident one's lies below it."""
    diffs, scores = np.asarray(diffs, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    metrics = {"accuracy": float((diffs > 0).mean()), "ties": float((diffs == 0).mean()), "margin": float(diffs.mean()),
               "reward/mean": float(scores.mean()), "reward/std": float(scores.std()),
               "reward/min": float(scores.min()), "reward/max": float(scores.max())}
    confidence = 1.0 / (1.0 + np.exp(-np.abs(diffs)))
    for lo, hi in zip(CONFIDENCE_BUCKETS[:-1], CONFIDENCE_BUCKETS[1:]):
        inside = (confidence >= lo) & ((confidence < hi) | (hi == 1.0))
        name = f"{lo:.1f}-{hi:.1f}"
        metrics[f"accuracy_by_confidence/{name}"] = float((diffs[inside] > 0).mean()) if inside.any() else float("nan")
        metrics[f"pairs_by_confidence/{name}"] = float(inside.mean())
    return metrics


def gold_label_stats(gold_lists: list[list[float]]) -> dict:
    """What a perfect reward model could reach on labels drawn from the gold reward r* (toy task).

    The toy labels follow Bradley-Terry / Plackett-Luce with r*, under which item i is ranked above item j with
    probability sigmoid(r*_i - r*_j) (for Plackett-Luce too: Luce's choice axiom). Ordering by r* is then right with
    probability sigmoid(|r*_i - r*_j|) (1/2 on a tie): its mean over the comparisons is ceiling_accuracy, the
    expected accuracy of the gold reward itself. gold_accuracy is its realised accuracy on these labels.
    gold_lists: r* of each example's completions, best to worst as labelled."""
    diffs = np.asarray([g[i] - g[j] for g in gold_lists for i in range(len(g)) for j in range(i + 1, len(g))])
    return {"ceiling_accuracy": float((1.0 / (1.0 + np.exp(-np.abs(diffs)))).mean()),
            "gold_accuracy": float((diffs > 0).mean())}


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def parse_row(row: dict, where: str, loss: str):
    """(prompt, [completions, best to worst], margin) of one row, or None when its completions are identical (no
    preference; the caller counts it). Prompt and completions are strings or conversations (common.parse_*)."""
    if loss == "ranking":
        prompt, completions = common.parse_ranking_row(row, where)
        margin = 0.0
    else:
        prompt, chosen, rejected = common.parse_preference_row(row, where)
        completions, margin = [chosen, rejected], row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise common.InputError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    if len({repr(c) for c in completions}) < len(completions):
        return None
    return prompt, completions, float(margin)


def build_dataset(rows: list[tuple[str, dict]], tokenizer, cfg: Config, reward_fns=None) -> tuple[list[dict], dict]:
    """Tokenised examples {prompt_ids, completions (ids, each ending in EOS), margin, prompt, gold} and the counts of
    the skip / over-length policies. gold: the reward functions' total of each completion (None if one is unscored)."""
    examples, counts = [], {"skipped_identical": 0, "truncated": 0, "dropped": 0}
    for where, row in rows:
        parsed = parse_row(row, where, cfg.loss)
        if parsed is None:
            counts["skipped_identical"] += 1
            continue
        prompt, texts, margin = parsed
        prompt_ids = common.render_prompt(prompt, tokenizer, where)[1]  # with BOS etc. (string) or the template's
        completions = [common.render_completion(prompt, t, tokenizer, where) for t in texts]
        longest = max(len(c) for c in completions)
        if len(prompt_ids) + longest > cfg.max_length:
            if cfg.truncation == "drop" or longest >= cfg.max_length:
                counts["dropped"] += 1
                continue
            prompt_ids = prompt_ids[len(prompt_ids) + longest - cfg.max_length:]
            counts["truncated"] += 1
        gold = None
        if reward_fns:
            contents = [t if isinstance(t, str) else t[-1]["content"] for t in texts]
            gold = common.score_with_fns(reward_fns, [prompt] * len(texts), contents)[0]
            gold = None if None in gold else gold
        examples.append({"prompt_ids": prompt_ids, "completions": completions, "margin": margin, "prompt": prompt,
                         "gold": gold})
    if not examples:
        raise common.InputError(f"{rows[0][0].rsplit(':', 1)[0]}: no usable example (counts: {counts}, --max_length "
                                f"{cfg.max_length})")
    return examples, counts


def collate(batch: list[dict], pad_token_id: int, device):
    """Every completion of every example in ONE right-padded batch, so chosen and rejected share a forward pass.

    Returns input_ids, attention_mask (N, T) with N = sum_b K_b; index (B, K) of each example's rows in them, best
    first; list_mask (B, K), 1 on real entries (lists may be ragged); margins (B,)."""
    seqs, index = [], []
    for ex in batch:
        index.append(list(range(len(seqs), len(seqs) + len(ex["completions"]))))
        seqs += [ex["prompt_ids"] + c for c in ex["completions"]]
    input_ids = common.right_pad(seqs, pad_token_id, device)
    attention_mask = common.right_pad([[1] * len(s) for s in seqs], 0, device)
    list_mask = common.right_pad([[1] * len(i) for i in index], 0, device).bool()
    index = common.right_pad(index, 0, device)
    margins = torch.tensor([ex["margin"] for ex in batch], dtype=torch.float32, device=device)
    return input_ids, attention_mask, index, list_mask, margins


def example_scores_and_losses(model, batch: list[dict], cfg: Config, device, amp_dtype, pad_token_id: int):
    """(scores (B, K) best first, list_mask (B, K), per-example losses (B,)) of a batch, in one forward pass."""
    input_ids, attention_mask, index, list_mask, margins = collate(batch, pad_token_id, device)
    with common.autocast(device, amp_dtype):
        flat_scores = common.get_scores(model, input_ids, attention_mask, normalize=False)  # (N,) at the last token
    scores = flat_scores[index]  # (B, K)
    if cfg.loss == "pairwise":
        losses = pairwise_loss(scores[:, 0], scores[:, 1], margins)
    else:
        losses = ranking_loss(scores, list_mask)
    if cfg.center_rewards_coef:
        losses = losses + cfg.center_rewards_coef * centering_penalty(scores, list_mask)
    return scores, list_mask, losses


# ---------------------------------------------------------------------------------------------------------------------
# Models, evaluation, normalisation
# ---------------------------------------------------------------------------------------------------------------------
def load_reward_model(cfg: Config, device, dtype: torch.dtype):
    tokenizer = common.from_pretrained(AutoTokenizer, cfg.model_name_or_path, "--model_name_or_path",
                                       trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise common.InputError(f"{cfg.model_name_or_path}: tokenizer has no EOS token; the score is read at the EOS")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # our scores use the attention mask, but plain transformers reads the score at the last token that is not
        # pad: with pad == eos it would read the token before the EOS. A dedicated pad keeps both readings equal.
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    model, info = common.from_pretrained(
        AutoModelForSequenceClassification, cfg.model_name_or_path, "--model_name_or_path", num_labels=1,
        trust_remote_code=cfg.trust_remote_code, dtype=dtype, attn_implementation=cfg.attn_implementation,
        output_loading_info=True)
    common.check_length(model.config, cfg.max_length, "--max_length", cfg.model_name_or_path)
    if len(tokenizer) > model.get_input_embeddings().weight.size(0):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    new_head = any(k.startswith("score.") for k in info["missing_keys"])
    if new_head:
        # Stiennon et al. 2020: N(0, 1/sqrt(d_model + 1)) keeps the initial scores O(1) for unit-scale hidden states
        torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.score.in_features + 1))
        if model.score.bias is not None:
            torch.nn.init.zeros_(model.score.bias)
    # statistics of an earlier training would be stale: the scores are raw until this run normalises them
    model.config.reward_mean, model.config.reward_std = 0.0, 1.0
    common.disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # with LoRA the score head is trained fully (a new head must be learnt, not adapted)
    return common.add_lora(model, cfg, modules_to_save=["score"]).to(device), tokenizer, new_head


def load_policy(path: str, tokenizer, cfg: Config, device, dtype: torch.dtype):
    """The SFT policy as a causal LM, for its own samples. It must share the reward model's tokenizer (up to the pad
    token added above, which is only ever attended to as padding)."""
    policy_tokenizer = common.from_pretrained(AutoTokenizer, path, "--policy_name_or_path",
                                              trust_remote_code=cfg.trust_remote_code)
    if not policy_tokenizer.get_vocab().items() <= tokenizer.get_vocab().items() or \
            policy_tokenizer.eos_token_id != tokenizer.eos_token_id:
        raise common.InputError(f"policy {path} and reward model {cfg.model_name_or_path} have different tokenizers")
    policy = common.from_pretrained(AutoModelForCausalLM, path, "--policy_name_or_path",
                                    trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                    attn_implementation=cfg.attn_implementation)
    common.check_model_kind(policy, path, "--policy_name_or_path", "policy")
    if len(tokenizer) > policy.get_input_embeddings().weight.size(0):
        policy.resize_token_embeddings(len(tokenizer))
    common.disable_dropout(policy)
    return common.shard_model(policy.to(device).eval().requires_grad_(False))


@torch.no_grad()
def evaluate(model, examples: list[dict], cfg: Config, device, amp_dtype, pad_token_id: int, rank: int,
             world_size: int) -> dict:
    """Loss (of the raw scores: the training objective) and preference_metrics of the normalised scores (those later
    users see; identical to the raw ones before normalisation) on held-out examples; each rank scores a strided share,
    all get the result."""
    model.eval()
    losses, diffs, scores = [], [], []
    for idx in common.rank_batches(len(examples), cfg.per_device_batch_size):
        batch = [examples[i] for i in idx or [0]]
        s, mask, loss = example_scores_and_losses(model, batch, cfg, device, amp_dtype, pad_token_id)
        if idx:  # an empty share still runs the forward: FSDP needs every rank in it
            s = (s - model.config.reward_mean) / model.config.reward_std
            losses += loss.tolist()
            diffs += pair_differences(s, mask).tolist()
            scores += s[mask].tolist()
    model.train()
    losses, diffs, scores = common.gather_lists(losses), common.gather_lists(diffs), common.gather_lists(scores)
    return {"loss": float(np.mean(losses)), **preference_metrics(diffs, scores)}


@torch.no_grad()
def policy_sample_scores(policy, model, tokenizer, prompts: list[list[int]], num_samples: int, cfg: Config, device,
                         amp_dtype, rank: int, world_size: int) -> list[float]:
    """Raw scores of num_samples responses sampled from the policy, prompts cycled in a seeded random order."""
    prompts = list(prompts)
    random.Random(cfg.seed).shuffle(prompts)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2000 + rank)
    scores = []
    for idx in common.rank_batches(num_samples, cfg.per_device_batch_size):  # prompts cycled
        prompt_ids, prompt_mask = common.left_pad([prompts[i % len(prompts)] for i in idx or [0]],
                                                  tokenizer.pad_token_id, device)
        with common.autocast(device, amp_dtype):
            responses, response_mask = common.generate(policy, prompt_ids, prompt_mask, cfg.max_new_tokens,
                                                       tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                       cfg.temperature, 0, 1.0, gen, sync_ranks=True)
            s = common.get_scores(model, torch.cat([prompt_ids, responses], 1),
                                  torch.cat([prompt_mask, response_mask], 1), normalize=False)
        if idx:
            scores += s.float().tolist()
    return common.gather_lists(scores)


def main(cfg: Config) -> dict:
    rank, world_size, device = common.setup_distributed()
    common.set_seed(cfg.seed)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    dataset = cfg.dataset or TOY_DATA[cfg.loss][0]
    common.require_checkpoint(cfg.model_name_or_path, "sft.py")

    # 1. model and data
    rows = common.load_rows(dataset, "--dataset", cfg.dataset_split)
    eval_path = common.eval_data_path(cfg.eval_dataset, dataset, TOY_DATA[cfg.loss][1])
    eval_rows = common.load_rows(eval_path, "--eval_dataset", cfg.eval_dataset_split) if eval_path else []
    if not eval_rows and cfg.eval_split > 0:
        rows, eval_rows = common.split_rows(rows, cfg.eval_split, cfg.seed)
        eval_path = f"{cfg.eval_split:.0%} of {dataset}"
    reward_fns = common.eval_reward_fns(cfg.eval_reward_fn, dataset)
    common.check_attn_implementation(cfg.attn_implementation)
    trained_dtype, frozen_dtype = common.weight_dtypes(cfg.dtype, device, cfg.frozen_dtype)
    model, tokenizer, new_head = load_reward_model(cfg, device, trained_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    examples, counts = build_dataset(rows, tokenizer, cfg)
    eval_examples, eval_counts = build_dataset(eval_rows, tokenizer, cfg, reward_fns) if eval_rows else ([], {})
    gold_lists = [ex["gold"] for ex in eval_examples if ex["gold"] is not None]
    gold_stats = gold_label_stats(gold_lists) if gold_lists else {}
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise common.InputError(f"{dataset}: {len(examples)} examples is fewer than one global batch ({global_batch} ="
                                f" --per_device_batch_size x --gradient_accumulation_steps x {world_size} processes)")
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if rank == 0:
        print(f"reward model from {cfg.model_name_or_path}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, "
              f"{'new head' if new_head else 'head from the checkpoint'} | {cfg.loss} loss | data {dataset}: "
              f"{len(examples)} examples {counts} | eval {eval_path or 'none'}: {len(eval_examples)} {eval_counts} | "
              f"eval reward {', '.join(reward_fns) or 'none'} | {total_steps} steps of {global_batch} | world size "
              f"{world_size}", flush=True)
        if gold_stats:
            print(f"{'+'.join(reward_fns)} on the eval labels: ceiling accuracy {gold_stats['ceiling_accuracy']:.4f},"
                  f" realised {gold_stats['gold_accuracy']:.4f}", flush=True)
    common.prepare_output_dir(cfg.output_dir, rank)
    resume_from = common.resume_checkpoint(cfg.output_dir, cfg.resume)
    common.check_disk_space(cfg.output_dir, common.checkpoint_bytes([model], model, cfg.save_every),
                            "the final model and a checkpoint")
    model = common.shard_model(model, amp_dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = common.lr_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.warmup_ratio)
    batches = common.BatchOrder(len(examples), global_batch, cfg.seed)  # same on every rank: the global batch
    # this rank's sums since the last log: loss, examples, correct pairs, pairs, r_better - r_worse, scores,
    # scores^2, number of scores
    window = torch.zeros(8, device=device, dtype=torch.float64)
    pairs_seen, sequences_seen, train_time, start_step = 0, 0, 0.0, 0
    if resume_from is not None:
        state = common.load_state(resume_from, {"model": model}, [optimizer], {}, cfg)
        start_step = state["step"]
        batches.load_state_dict(state["state"]["batches"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        pairs_seen, sequences_seen, train_time = (state["state"][k] for k in ("pairs_seen", "sequences_seen",
                                                                              "train_time"))
        window = torch.tensor(state["rank_state"]["window"], device=device, dtype=torch.float64)
        if rank == 0:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    logger = common.MetricsLogger(cfg.output_dir, rank, cfg.tensorboard, cfg.wandb_project, asdict(cfg), resume_from)

    # 2. training loop
    model.train()
    t_start = time.time()
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        for mb in common.micro_batches(batches.next(), cfg.per_device_batch_size):
            batch = [examples[j] for j in mb]
            scores, list_mask, losses = example_scores_and_losses(model, batch, cfg, device, amp_dtype,
                                                                  tokenizer.pad_token_id)
            # mean over the global batch; FSDP averages gradients over ranks, hence * world_size
            (losses.sum() / global_batch * world_size).backward()
            diffs = pair_differences(scores.detach(), list_mask)
            real = scores.detach()[list_mask].double()
            window += torch.stack([losses.detach().sum().double(), torch.tensor(len(batch), device=device).double(),
                                   (diffs > 0).sum().double(), torch.tensor(diffs.numel(), device=device).double(),
                                   diffs.sum().double(), real.sum(), (real ** 2).sum(),
                                   torch.tensor(real.numel(), device=device).double()])
            pairs_seen += diffs.numel() * world_size
            sequences_seen += int(list_mask.sum()) * world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - t0

        if step % cfg.log_every == 0 or step == total_steps:
            loss_sum, n_ex, correct, n_pairs, diff_sum, s_sum, s_sq, n_scores = common.all_reduce_sum(window).tolist()
            train = {"loss": loss_sum / n_ex, "accuracy": correct / n_pairs, "margin": diff_sum / n_pairs,
                     "reward/mean": s_sum / n_scores,
                     "reward/std": math.sqrt(max(0.0, s_sq / n_scores - (s_sum / n_scores) ** 2))}
            window.zero_()
            logger.log(step, {**train, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                              "epoch": step / steps_per_epoch, "pairs_per_s": pairs_seen / max(1e-9, train_time),
                              "sequences_per_s": sequences_seen / max(1e-9, train_time)},
                       ("loss", "accuracy", "margin", "lr", "epoch", "pairs_per_s"))
        if eval_examples and step % cfg.eval_every == 0 and step < total_steps:  # the last: after normalisation
            metrics = evaluate(model, eval_examples, cfg, device, amp_dtype, tokenizer.pad_token_id, rank, world_size)
            logger.log(step, {f"eval/{k}": v for k, v in {**metrics, **gold_stats}.items()}, EVAL_CONSOLE_KEYS)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            common.save_state(cfg.output_dir, step, {"model": model}, [optimizer], {}, {
                "batches": batches.state_dict(), "scheduler": scheduler.state_dict(), "pairs_seen": pairs_seen,
                "sequences_seen": sequences_seen, "train_time": train_time}, logger, cfg, cfg.save_total_limit,
                rank_state={"window": window.tolist()})

    # 3. normalise: the policy's own samples on training prompts score mean 0 (std 1)
    policy = None
    if cfg.normalize_samples > 0 or (reward_fns and cfg.agreement_samples_per_prompt > 0):
        policy = load_policy(cfg.policy_name_or_path or cfg.model_name_or_path, tokenizer, cfg, device, frozen_dtype)
    reward_mean, reward_std, sample_std = 0.0, 1.0, float("nan")
    if cfg.normalize_samples > 0:
        prompts = sorted({tuple(ex["prompt_ids"]) for ex in examples})
        raw = policy_sample_scores(policy, model, tokenizer, [list(p) for p in prompts], cfg.normalize_samples, cfg,
                                   device, amp_dtype, rank, world_size)
        reward_mean, sample_std = float(np.mean(raw)), float(np.std(raw))
        reward_std = sample_std if cfg.normalize_scale else 1.0
    model.config.reward_mean, model.config.reward_std = reward_mean, reward_std  # on every rank: get_scores reads it

    # 4. final evaluation with the normalised score, agreement with the eval reward functions, save
    final = {}
    if eval_examples:
        final = evaluate(model, eval_examples, cfg, device, amp_dtype, tokenizer.pad_token_id, rank, world_size)
        final.update(gold_stats)
        logger.log(total_steps, {f"eval/{k}": v for k, v in final.items()}, EVAL_CONSOLE_KEYS)
    if gold_stats:
        final["accuracy_over_ceiling"] = final["accuracy"] / gold_stats["ceiling_accuracy"]
    eval_prompts = list({repr(ex["prompt"]): ex["prompt"] for ex in eval_examples}.values())
    if reward_fns and cfg.agreement_samples_per_prompt > 0 and eval_prompts:
        # fresh policy samples of held-out prompts: does the RM order them like the known reward? (Gao et al. 2022)
        agreement = common.evaluate_policy(policy, tokenizer, eval_prompts, device, reward_model=model,
                                           reward_fns=reward_fns, samples_per_prompt=cfg.agreement_samples_per_prompt,
                                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                           batch_size=cfg.per_device_batch_size, seed=cfg.seed, amp_dtype=amp_dtype)
        # proxy_reward_mean/std: normalised scores of these held-out samples, ~0 when the normalisation transfers
        final.update({k: agreement[k] for k in (*[f"{n}_proxy_agreement" for n in reward_fns], "proxy_reward_mean",
                                                 "proxy_reward_std")})
        final["agreement_num_samples"] = agreement["num_samples"]
    final.update({"reward_mean": reward_mean, "reward_std": reward_std, "policy_sample_score_std": sample_std,
                  "train_loss": train["loss"], "train_accuracy": train["accuracy"], "train_steps": total_steps,
                  "pairs_per_s": pairs_seen / train_time, "sequences_per_s": sequences_seen / train_time,
                  "wall_time_s": time.time() - t_start, "num_parameters": n_params, "num_train_examples": len(examples),
                  "num_eval_examples": len(eval_examples), **counts,
                  **{f"eval_{k}": v for k, v in eval_counts.items()}})
    common.save_model(model, tokenizer, cfg.output_dir, final, logger, merge_lora=cfg.merge_lora,
                      extra_config={"reward_mean": reward_mean, "reward_std": reward_std})
    if rank == 0:
        line = f"saved {cfg.output_dir}"
        if eval_examples:
            line += f" | held-out accuracy {final['accuracy']:.4f}"
        if gold_stats:
            line += (f" | ceiling of labels drawn from {'+'.join(reward_fns)} {final['ceiling_accuracy']:.4f} "
                     f"(accuracy / ceiling {final['accuracy_over_ceiling']:.3f})")
        for name in reward_fns:
            if f"{name}_proxy_agreement" in final:
                line += f" | {name}/proxy agreement on policy samples {final[f'{name}_proxy_agreement']:.3f}"
        print(line + f" | reward_mean {reward_mean:.4f} reward_std {reward_std:.4f}", flush=True)
    logger.close()
    common.cleanup_distributed()
    return final


if __name__ == "__main__":
    common.cli(main, Config)
