"""Reward model (Bradley-Terry), in one file.

    python reward_model.py                          # toy task: from runs/sft (run `python sft.py` first), CPU, ~1 min
    python reward_model.py --loss ranking           # K-wise ranking loss on data/toy/rankings_*.jsonl
    python reward_model.py --help                   # every option, explained
    python reward_model.py --model_name_or_path my-sft --dataset prefs.jsonl --eval_dataset prefs_eval.jsonl
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
common.get_scores, so every later user (ppo.py, grpo.py, best-of-N) sees the normalised reward.

Data (TRL's formats; JSON lines, JSON, parquet, CSV, a datasets.save_to_disk folder or a hub dataset id); string
completions carry their leading space and no EOS text (the EOS token is appended here):
    {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}        explicit prompt
    {"chosen": str, "rejected": str}            implicit prompt: the shared prefix, cut at its last whitespace
    {"prompt": [messages], "chosen": [assistant message] or str, "rejected": ...}      conversational
    {"chosen": [messages], "rejected": [messages]}   conversational, implicit: the shared leading messages
    {"prompt": str or [messages], "completions": [best, ..., worst]}                   --loss ranking
Rows whose completions are identical carry no preference: they are skipped and counted.
"""

import math
import random
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import harness

# defaults of the options left None for a pretrained model (the toy's: toy_task.DEFAULTS["reward_model"])
PRETRAINED = dict(learning_rate=1e-5, max_length=1024, per_device_batch_size=8, normalize_samples=128,
                  max_new_tokens=128)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EVAL_CONSOLE_KEYS = ("eval/loss", "eval/accuracy", "eval/margin", "eval/reward/mean", "eval/reward/std")


@dataclass
class Config:
    loss: Literal["pairwise", "ranking"] = "pairwise"
    """pairwise: preference rows {"prompt"?, "chosen", "rejected"}; ranking: rows {"prompt", "completions": [best,
    ..., worst]}"""
    center_rewards_coef: float = 0.0
    """weight of the centering term (sum_k r_k)^2 (TRL uses 0.01 when enabled); 0 disables it"""
    num_epochs: float = 1.0
    """passes over the training data (fractions allowed); the toy gains little from a second one"""
    max_steps: int | None = None
    """stop after this many optimiser steps (instead of num_epochs; the learning-rate schedule spans them)"""
    per_device_batch_size: int | None = None
    """comparisons (pairs or ranked lists) per micro-batch on each process (default: 8; the toy's 64)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step; global batch = per_device_batch_size x this x world size"""
    normalize_samples: int | None = None
    """policy samples on training prompts whose scores define reward_mean (and reward_std); 0 = no normalisation
    (default: 128; the toy's 512)"""
    normalize_scale: bool = False
    """also divide by the std of those scores (std 1), not only shift them (mean 0)"""
    # the models and the data
    model_name_or_path: str = "runs/sft"
    """model to start from: the SFT policy, its LM head replaced by a new scalar head (a reward-model checkpoint keeps
    its head)"""
    policy_name_or_path: str | None = None
    """the policy whose own samples define the zero of the reward and are scored for the agreement; default:
    model_name_or_path (must share the tokenizer)"""
    dataset: str | None = None
    """training data: .jsonl / .json / .parquet / .csv, a datasets.save_to_disk folder or a hub id (formats in the
    module docstring); default: the toy's for --loss on the toy model, else required"""
    dataset_split: str = "train"
    """split of a hub dataset or save_to_disk folder"""
    max_length: int | None = None
    """longest prompt + completion + EOS in tokens (see --truncation; default: 1024; the toy's 64)"""
    truncation: Literal["drop", "truncate_prompt"] = "drop"
    """over-long examples: dropped, or tokens cut from the start of the prompt so that every completion fits whole (its
    EOS is where the score is read); an example whose completion alone does not fit is dropped. Both counted"""
    # evaluation
    eval_dataset: str | None = None
    """held-out comparisons for loss / accuracy (the toy's for --loss on the toy; "none" = none)"""
    eval_dataset_split: str = "test"
    """split of a hub eval dataset or save_to_disk folder"""
    eval_split: float = 0.0
    """hold out this fraction of the training rows (seeded) when no eval dataset is given"""
    eval_every: int = 100
    """evaluate every this many optimiser steps (and at the end)"""
    agreement_samples_per_prompt: int = 8
    """policy samples per held-out prompt for the agreement of the reward model with --eval_reward_fn (0 = off)"""
    max_new_tokens: int | None = None
    """longest policy sample (default: 128; the toy's 24)"""
    temperature: float = 1.0
    """sampling temperature of the policy samples (use the one RL will sample with)"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function, a known reward (TRL's signature; repeatable): how often the reward model orders policy
    samples like it; default: the toy's gold reward on the toy, else none; "none" for none"""
    model: harness.ModelArgs = harness.group(harness.ModelArgs)
    optim: harness.OptimArgs = harness.group(harness.OptimArgs, weight_decay=0.01, warmup_ratio=0.05)
    run: harness.RunArgs = harness.group(harness.RunArgs, output_dir="runs/reward_model", log_every=20)

    def __post_init__(self):
        harness.check_options(self, positive=("max_length", "num_epochs", "max_steps", "per_device_batch_size",
                                              "gradient_accumulation_steps", "eval_every", "max_new_tokens"),
                              nonnegative=("center_rewards_coef", "normalize_samples", "agreement_samples_per_prompt",
                                          "temperature"), fractions=("eval_split",))


# ---------------------------------------------------------------------------------------------------------------------
# Losses and metrics (pure)
# ---------------------------------------------------------------------------------------------------------------------
def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood per pair: -log sigmoid(r_c - r_r - margin), (B,), (B,) -> (B,).
    A margin m > 0 asks for r_c - r_r > m before the loss flattens out (Llama 2 uses larger margins for pairs that
    annotators found clearly different). logsigmoid is exact for large |x| where log(sigmoid(x)) underflows."""
    return -F.logsigmoid(chosen_scores - rejected_scores - (0.0 if margin is None else margin))


def _pairs(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, K, K) True at i < j (i ranked above j) where both are real entries."""
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    above = torch.ones(scores.size(1), scores.size(1), dtype=torch.bool, device=scores.device).triu(1)
    return above & mask[:, :, None] & mask[:, None, :]


def ranking_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """K-wise loss per list: mean over the pairs i < j of -log sigmoid(s_i - s_j), scores (B, K) ordered best to
    worst -> (B,). mask (B, K) marks the real entries of lists shorter than K; each list averages over its own
    K_b (K_b - 1) / 2 pairs, so every prompt weighs the same (InstructGPT). K = 2 is the pairwise loss."""
    pairs = _pairs(scores, mask)
    losses = torch.where(pairs, -F.logsigmoid(scores[:, :, None] - scores[:, None, :]), 0.0)
    return losses.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


def centering_penalty(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(sum_k r_k)^2 per example, scores (B, K) -> (B,); (r_c + r_r)^2 for a pair (Eisenstein et al. 2023)."""
    return (scores if mask is None else torch.where(mask.bool(), scores, 0.0)).sum(1) ** 2


def pair_differences(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """s_i - s_j for every pair i < j (i ranked above j) of every list, scores (B, K) -> (P,); r_c - r_r for pairs."""
    return (scores[:, :, None] - scores[:, None, :])[_pairs(scores, mask)]


def preference_metrics(diffs, scores) -> dict:
    """Held-out metrics from r_better - r_worse of every comparison (diffs) and every score: accuracy (r_better >
    r_worse strictly; `ties` says how often it is a tie) and its standard error, margin (mean difference), reward/*
    (statistics of the scores); accuracy_by_confidence/lo-hi, the accuracy of the comparisons whose Bradley-Terry
    confidence sigmoid(|diff|) lies in [lo, hi), and pairs_by_confidence/lo-hi their share: a calibrated model's
    accuracy in a bucket lies inside it, an over-confident one's below."""
    diffs, scores = np.asarray(diffs, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    accuracy = float((diffs > 0).mean())
    metrics = {"accuracy": accuracy, "accuracy_sem": math.sqrt(accuracy * (1 - accuracy) / len(diffs)),
               "ties": float((diffs == 0).mean()), "margin": float(diffs.mean()), "reward/mean": float(scores.mean()),
               "reward/std": float(scores.std()), "reward/min": float(scores.min()), "reward/max": float(scores.max())}
    confidence = 1.0 / (1.0 + np.exp(-np.abs(diffs)))
    for lo, hi in zip(CONFIDENCE_BUCKETS[:-1], CONFIDENCE_BUCKETS[1:]):
        inside = (confidence >= lo) & ((confidence < hi) | (hi == 1.0))
        metrics[f"accuracy_by_confidence/{lo:.1f}-{hi:.1f}"] = float((diffs[inside] > 0).mean()) if inside.any() \
            else None
        metrics[f"pairs_by_confidence/{lo:.1f}-{hi:.1f}"] = float(inside.mean())
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def parse_row(row: dict, where: str, loss: str):
    """(prompt, [completions, best to worst], margin) of one row, or None when its completions are identical (no
    preference; the caller counts it). Prompt and completions are strings or conversations."""
    if loss == "ranking":
        if "prompt" not in row or "completions" not in row:
            raise harness.InputError(f"{where}: expected {{prompt, completions: [best, ..., worst]}}, got keys "
                                     f"{sorted(row)}")
        prompt, completions = harness.prompt_field(row["prompt"], where), row["completions"]
        if not isinstance(completions, list) or len(completions) < 2:
            raise harness.InputError(f"{where}: field 'completions' must be a list of at least 2 completions, best "
                                     "first")
        field = harness.assistant_field if isinstance(prompt, list) else harness.text_field
        completions, margin = [field(c, where, f"completions[{k}]") for k, c in enumerate(completions)], 0.0
    else:
        prompt, chosen, rejected = harness.parse_preference_row(row, where)
        completions, margin = [chosen, rejected], row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise harness.InputError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    return None if len({repr(c) for c in completions}) < len(completions) else (prompt, completions, float(margin))


def build_dataset(parsed: list, tokenizer, cfg: Config) -> tuple[list[dict], dict]:
    """Tokenised examples {prompt_ids, completions (ids, each ending in EOS), margin, prompt} of parsed (where, row)
    pairs (None: identical completions) and the counts of the skip / over-length policies."""
    examples, counts = [], {"skipped_identical": 0, "truncated": 0, "dropped": 0}
    for where, row in parsed:
        if row is None:
            counts["skipped_identical"] += 1
            continue
        prompt, texts, margin = row
        prompt_ids = harness.render_prompt(prompt, tokenizer, where)
        completions = [harness.render_completion(prompt, t, tokenizer, where) for t in texts]
        longest = max(len(c) for c in completions)
        if len(prompt_ids) + longest > cfg.max_length:
            if cfg.truncation == "drop" or longest >= cfg.max_length:
                counts["dropped"] += 1
                continue
            prompt_ids = prompt_ids[len(prompt_ids) + longest - cfg.max_length:]
            counts["truncated"] += 1
        examples.append({"prompt_ids": prompt_ids, "completions": completions, "margin": margin, "prompt": prompt})
    if not examples:
        raise harness.InputError(f"{cfg.dataset}: no usable example (counts: {counts}, --max_length {cfg.max_length})")
    return examples, counts


def collate(batch: list[dict], pad_token_id: int, device):
    """Every completion of every example in ONE right-padded batch, so chosen and rejected share a forward pass:
    input_ids, attention_mask (N, T) with N = sum_b K_b; index (B, K) of each example's rows, best first; list_mask
    (B, K), 1 on real entries (lists may be ragged); margins (B,)."""
    seqs, index = [], []
    for ex in batch:
        index.append(list(range(len(seqs), len(seqs) + len(ex["completions"]))))
        seqs += [ex["prompt_ids"] + c for c in ex["completions"]]
    return (common.right_pad(seqs, pad_token_id, device), common.right_pad([[1] * len(s) for s in seqs], 0, device),
            common.right_pad(index, 0, device), common.right_pad([[1] * len(i) for i in index], 0, device).bool(),
            torch.tensor([ex["margin"] for ex in batch], dtype=torch.float32, device=device))


def example_scores_and_losses(model, batch: list[dict], cfg: Config, device, amp, pad_token_id: int):
    """(scores (B, K) best first, list_mask (B, K), per-example losses (B,)) of a batch, in one forward pass."""
    input_ids, attention_mask, index, list_mask, margins = collate(batch, pad_token_id, device)
    with harness.autocast(device, amp):
        scores = common.get_scores(model, input_ids, attention_mask, normalize=False)[index]  # (B, K)
    losses = pairwise_loss(scores[:, 0], scores[:, 1], margins) if cfg.loss == "pairwise" else \
        ranking_loss(scores, list_mask)
    if cfg.center_rewards_coef:
        losses = losses + cfg.center_rewards_coef * centering_penalty(scores, list_mask)
    return scores, list_mask, losses


# ---------------------------------------------------------------------------------------------------------------------
# Models, evaluation, normalisation
# ---------------------------------------------------------------------------------------------------------------------
def load_reward_model(cfg: Config, device, dtype: torch.dtype):
    trust, option = cfg.model.trust_remote_code, "--model_name_or_path"
    tokenizer = harness.from_pretrained(AutoTokenizer, cfg.model_name_or_path, option, trust_remote_code=trust)
    if tokenizer.eos_token_id is None:
        raise harness.InputError(f"{cfg.model_name_or_path}: the tokenizer has no EOS token; the score is read at the "
                                 "EOS")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # our scores use the attention mask, but plain transformers reads the score at the last token that is not
        # pad: with pad == eos it would read the token before the EOS. A pad token of its own keeps both equal
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    model = harness.from_pretrained(AutoModelForSequenceClassification, cfg.model_name_or_path, option, num_labels=1,
                                    trust_remote_code=trust, dtype=dtype,
                                    attn_implementation=cfg.model.attn_implementation)
    harness.check_length(model.config, cfg.max_length, "--max_length", cfg.model_name_or_path)
    if len(tokenizer) > model.get_input_embeddings().weight.size(0):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    new_head = not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or [])
    if new_head:
        # Stiennon et al. 2020: N(0, 1/sqrt(d_model + 1)) keeps the initial scores O(1) for unit-scale hidden states
        torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.score.in_features + 1))
        if model.score.bias is not None:
            torch.nn.init.zeros_(model.score.bias)
    # the statistics of an earlier training would be stale: the scores are raw until this run normalises them
    model.config.reward_mean, model.config.reward_std = 0.0, 1.0
    harness.disable_dropout(model)
    # with LoRA the score head is trained fully (a new head must be learnt, not adapted)
    return harness.prepare_trainable(model, cfg.model, modules_to_save=["score"]).to(device), tokenizer, new_head


def load_policy(path: str, tokenizer, cfg: Config, device, dtype: torch.dtype):
    """The SFT policy as a causal LM, for its own samples. It must share the reward model's tokenizer (up to the pad
    token added above, only ever attended to as padding)."""
    option, trust = "--policy_name_or_path", cfg.model.trust_remote_code
    policy_tokenizer = harness.from_pretrained(AutoTokenizer, path, option, trust_remote_code=trust)
    if not policy_tokenizer.get_vocab().items() <= tokenizer.get_vocab().items() or \
            policy_tokenizer.eos_token_id != tokenizer.eos_token_id:
        raise harness.InputError(f"policy {path} and reward model {cfg.model_name_or_path} have different tokenizers")
    policy = harness.from_pretrained(AutoModelForCausalLM, path, option, trust_remote_code=trust, dtype=dtype,
                                     attn_implementation=cfg.model.attn_implementation)
    harness.check_model_kind(policy, path, option, "policy")
    if len(tokenizer) > policy.get_input_embeddings().weight.size(0):
        policy.resize_token_embeddings(len(tokenizer))
    harness.disable_dropout(policy)
    return harness.shard_model(policy.to(device).eval().requires_grad_(False))


@torch.no_grad()
def evaluate(model, examples: list[dict], cfg: Config, device, amp, pad_token_id: int) -> dict:
    """Loss (of the raw scores: the training objective) and preference_metrics of the normalised scores (those later
    users see; the raw ones before normalisation) on held-out examples; each rank scores a strided share."""
    model.eval()
    losses, diffs, scores = [], [], []
    for idx in harness.rank_batches(len(examples), cfg.per_device_batch_size):
        s, mask, loss = example_scores_and_losses(model, [examples[i] for i in idx or [0]], cfg, device, amp,
                                                  pad_token_id)
        if idx:  # an empty share still runs the forward: FSDP needs every rank in it
            s = (s - model.config.reward_mean) / model.config.reward_std
            losses, diffs, scores = losses + loss.tolist(), diffs + pair_differences(s, mask).tolist(), \
                scores + s[mask].tolist()
    model.train()
    losses, diffs, scores = harness.gather_lists(losses), harness.gather_lists(diffs), harness.gather_lists(scores)
    return {"loss": float(np.mean(losses)), **preference_metrics(diffs, scores)}


@torch.no_grad()
def policy_sample_scores(policy, model, tokenizer, prompts: list[list[int]], num_samples: int, cfg: Config, device,
                         amp) -> list[float]:
    """Raw scores of num_samples responses sampled from the policy, the prompts cycled in a seeded random order."""
    prompts, rank = list(prompts), common.rank_info()[0]
    random.Random(cfg.run.seed).shuffle(prompts)
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 2000 + rank)
    scores = []
    for idx in harness.rank_batches(num_samples, cfg.per_device_batch_size):
        query, query_mask = common.left_pad([prompts[i % len(prompts)] for i in idx or [0]], tokenizer.pad_token_id,
                                            device)
        with harness.autocast(device, amp):
            responses, response_mask = common.generate(policy, query, query_mask, cfg.max_new_tokens,
                                                       tokenizer.eos_token_id, tokenizer.pad_token_id,
                                                       cfg.temperature, 0, 1.0, gen, sync_ranks=True)
            s = common.get_scores(model, torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1),
                                  normalize=False)
        scores += s.float().tolist() if idx else []
    return harness.gather_lists(scores)


def main(cfg: Config) -> dict:
    rank, world_size, device = harness.setup(cfg, "reward_model", PRETRAINED)
    amp = harness.precision(cfg.model, device)[2]
    # 1. data (parsed before any model loads), model
    rows, eval_rows = harness.train_eval_rows(cfg.dataset, "--dataset", cfg.dataset_split, cfg.eval_dataset,
                                              "--eval_dataset", cfg.eval_split, cfg.run.seed, cfg.eval_dataset_split)
    parsed = [(where, parse_row(row, where, cfg.loss)) for where, row in rows]
    eval_parsed = [(where, parse_row(row, where, cfg.loss)) for where, row in eval_rows]
    eval_fns = harness.load_reward_fns(cfg.eval_reward_fn, option="--eval_reward_fn") \
        if cfg.eval_reward_fn != ("none",) else {}
    trained_dtype, frozen_dtype, _ = harness.precision(cfg.model, device)
    model, tokenizer, new_head = load_reward_model(cfg, device, trained_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    examples, counts = build_dataset(parsed, tokenizer, cfg)
    eval_examples, eval_counts = build_dataset(eval_parsed, tokenizer, cfg) if eval_parsed else ([], {})
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise harness.InputError(f"{cfg.dataset}: {len(examples)} examples is fewer than one global batch "
                                 f"({global_batch} = --per_device_batch_size x --gradient_accumulation_steps x "
                                 f"{world_size} processes)")
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if rank == 0:
        print(f"reward model from {cfg.model_name_or_path}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, "
              f"{'new head' if new_head else 'head from the checkpoint'} | {cfg.loss} loss | {len(examples)} examples "
              f"{counts}, {len(eval_examples)} held out {eval_counts} | eval reward {', '.join(eval_fns) or 'none'} | "
              f"{total_steps} steps of {global_batch} | world size {world_size}", flush=True)
        if 0 < len(eval_examples) < 200:
            print(f"warning: {len(eval_examples)} held-out examples measure the accuracy to about +-"
                  f"{1 / math.sqrt(len(eval_examples)):.2f}: too few to tell a reward model from chance", flush=True)
    model = harness.shard_model(model, amp)
    optimizer, scheduler = harness.optimizer(model.parameters(), cfg.optim, total_steps, betas=(0.9, 0.95))
    batches = harness.BatchOrder(len(examples), global_batch, cfg.run.seed)  # the same on every rank: the global batch
    sums = harness.Sums()  # this rank's sums since the last log
    state = {"batches": batches, "scheduler": scheduler, "sums": sums, "pairs_seen": 0, "sequences_seen": 0,
             "train_time": 0.0}
    start = harness.resume(cfg, {"model": model}, [optimizer], state)
    logger = harness.MetricsLogger(cfg, start)

    # 2. training loop
    model.train()
    t_start = time.time()
    for step in range(start + 1, total_steps + 1):
        t0 = time.time()
        for mb in harness.micro_batches(batches.next(), cfg.per_device_batch_size):
            batch = [examples[j] for j in mb]
            scores, list_mask, losses = example_scores_and_losses(model, batch, cfg, device, amp,
                                                                  tokenizer.pad_token_id)
            (losses.sum() / global_batch * world_size).backward()  # FSDP averages over ranks, hence * world_size
            diffs, real = pair_differences(scores.detach(), list_mask), scores.detach()[list_mask]
            sums.add(loss=losses.sum(), examples=len(batch), correct=(diffs > 0).sum(), pairs=diffs.numel(),
                     diff=diffs.sum(), score=real.sum(), score_sq=(real ** 2).sum(), scores=real.numel())
            state["pairs_seen"] += diffs.numel() * world_size
            state["sequences_seen"] += int(list_mask.sum()) * world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["train_time"] += time.time() - t0

        if step % cfg.run.log_every == 0 or step == total_steps:
            t = sums.reduce(device)
            train = {"loss": t["loss"] / t["examples"], "accuracy": t["correct"] / t["pairs"],
                     "margin": t["diff"] / t["pairs"], "reward/mean": t["score"] / t["scores"],
                     "reward/std": math.sqrt(max(0.0, t["score_sq"] / t["scores"] - (t["score"] / t["scores"]) ** 2))}
            logger.log(step, {**train, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                              "epoch": step / steps_per_epoch,
                              "pairs_per_s": state["pairs_seen"] / max(1e-9, state["train_time"]),
                              "sequences_per_s": state["sequences_seen"] / max(1e-9, state["train_time"])},
                       ("loss", "accuracy", "margin", "lr", "epoch", "pairs_per_s"))
        if eval_examples and step % cfg.eval_every == 0 and step < total_steps:  # the last: after normalisation
            metrics = evaluate(model, eval_examples, cfg, device, amp, tokenizer.pad_token_id)
            logger.log(step, {f"eval/{k}": v for k, v in metrics.items()}, EVAL_CONSOLE_KEYS)
        harness.save_checkpoint(cfg, step, total_steps, {"model": model}, [optimizer], state)

    # 3. normalise: the policy's own samples on training prompts score mean 0 (std 1)
    policy = None
    if cfg.normalize_samples > 0 or (eval_fns and cfg.agreement_samples_per_prompt > 0):
        policy = load_policy(cfg.policy_name_or_path or cfg.model_name_or_path, tokenizer, cfg, device, frozen_dtype)
    reward_mean, reward_std, sample_std = 0.0, 1.0, None
    if cfg.normalize_samples > 0:
        prompts = sorted({tuple(ex["prompt_ids"]) for ex in examples})
        raw = policy_sample_scores(policy, model, tokenizer, [list(p) for p in prompts], cfg.normalize_samples, cfg,
                                   device, amp)
        reward_mean, sample_std = float(np.mean(raw)), float(np.std(raw))
        reward_std = sample_std if cfg.normalize_scale else 1.0
    model.config.reward_mean, model.config.reward_std = reward_mean, reward_std  # on every rank: get_scores reads it

    # 4. final evaluation with the normalised score, agreement with the eval reward functions, save
    final = {}
    if eval_examples:
        final = evaluate(model, eval_examples, cfg, device, amp, tokenizer.pad_token_id)
        logger.log(total_steps, {f"eval/{k}": v for k, v in final.items()}, EVAL_CONSOLE_KEYS)
    eval_prompts = list({repr(ex["prompt"]): ex["prompt"] for ex in eval_examples}.values())
    if eval_fns and cfg.agreement_samples_per_prompt > 0 and eval_prompts:
        # fresh policy samples of held-out prompts: does the RM order them like the known reward? (Gao et al. 2022)
        agreement = harness.evaluate_policy(policy, tokenizer, eval_prompts, device, reward_model=model,
                                            reward_fns=eval_fns, samples_per_prompt=cfg.agreement_samples_per_prompt,
                                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            batch_size=cfg.per_device_batch_size, seed=cfg.run.seed, amp=amp)
        # proxy_reward_mean / std: the normalised scores of these held-out samples, ~0 when the normalisation transfers
        final.update({k: agreement[k] for k in (*[f"{n}_proxy_agreement" for n in eval_fns], "proxy_reward_mean",
                                                 "proxy_reward_std")}, agreement_num_samples=agreement["num_samples"])
    final.update({"reward_mean": reward_mean, "reward_std": reward_std, "policy_sample_score_std": sample_std,
                  "train_loss": train["loss"], "train_accuracy": train["accuracy"], "train_steps": total_steps,
                  "pairs_per_s": state["pairs_seen"] / state["train_time"],
                  "sequences_per_s": state["sequences_seen"] / state["train_time"],
                  "wall_time_s": time.time() - t_start, "num_parameters": n_params, "num_train_examples": len(examples),
                  "num_eval_examples": len(eval_examples), **counts,
                  **{f"eval_{k}": v for k, v in eval_counts.items()}})
    harness.save_model(cfg, model, tokenizer, final, logger,
                      extra_config={"reward_mean": reward_mean, "reward_std": reward_std})
    if rank == 0:
        line = f"saved {cfg.run.output_dir}"
        if eval_examples:
            line += f" | held-out accuracy {final['accuracy']:.4f} +- {final['accuracy_sem']:.4f}"
        for name in eval_fns:
            if f"{name}_proxy_agreement" in final:
                line += f" | {name}/proxy agreement on policy samples {final[f'{name}_proxy_agreement']:.3f}"
        print(line + f" | reward_mean {reward_mean:.4f} reward_std {reward_std:.4f}", flush=True)
    return final


if __name__ == "__main__":
    harness.cli(main, Config)
