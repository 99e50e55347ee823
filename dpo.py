"""Direct Preference Optimization (DPO) and its common variants, in one file.

    python dpo.py                                   # toy task: starts from runs/sft, CPU, ~1 minute
    python dpo.py --help                            # every option, explained
    python dpo.py --model_name_or_path my-sft-model --dataset prefs.jsonl --beta 0.1
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
"rejected": [...]} full conversations that share their leading messages; the chat template renders the prompt, and a
response is what it renders after the prompt (the assistant message and its end-of-turn text).
"""

import math
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import harness

# defaults of the options left None for a pretrained model (the toy's: toy_task.DEFAULTS["dpo"]); TRL's DPO values
PRETRAINED = dict(learning_rate=1e-6, max_length=1024, per_device_batch_size=8, max_new_tokens=128)


@dataclass
class Config:
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid: DPO; ipo: (h - 1/(2 beta))^2; hinge: max(0, 1 - beta h); robust: unbiased under label flips"""
    beta: float = 0.1
    """strength of the implicit KL penalty: larger keeps the policy closer to the reference (ipo: the target margin is
    1/(2 beta))"""
    label_smoothing: float = 0.0
    """eps, the assumed probability that a label is flipped (sigmoid: conservative DPO; robust: robust DPO); 0 = DPO"""
    rpo_alpha: float = 0.0
    """weight of an SFT term, the length-normalised NLL of the chosen response (0 = off)"""
    precompute_ref_log_probs: bool = False
    """compute the reference log-probs of every training pair once before training and free the reference model (its
    memory and a forward pass per step; it is reloaded at the end for the KL of the final evaluation)"""
    num_epochs: float = 1.0
    """passes over the training pairs (fractions allowed)"""
    max_steps: int | None = None
    """stop after this many optimiser steps (instead of num_epochs; the learning-rate schedule spans them)"""
    per_device_batch_size: int | None = None
    """pairs per micro-batch on each process, 2x as many sequences (default: 8; the toy's 64)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step; global batch = per_device_batch_size x this x world size"""
    # the models and the data
    model_name_or_path: str = "runs/sft"
    """policy to start from (Hugging Face checkpoint: hub id or local directory); `python sft.py` makes the toy's"""
    ref_model_name_or_path: str | None = None
    """frozen reference pi_ref (default: model_name_or_path, the usual choice); must share the policy's tokenizer"""
    dataset: str | None = None
    """training preference pairs: .jsonl / .json / .parquet / .csv, a datasets.save_to_disk folder or a hub id (formats
    in the module docstring); default: the toy's on the toy model, else required"""
    dataset_split: str = "train"
    """split of a hub dataset or save_to_disk folder"""
    max_length: int | None = None
    """longest prompt + response in tokens (see --truncation; default: 1024; the toy's 64)"""
    truncation: Literal["truncate", "drop"] = "truncate"
    """over-long pairs: the responses cut at max_length (then without EOS) or the pair dropped; either is counted. A
    pair whose prompt alone fills max_length is always dropped"""
    # evaluation
    eval_dataset: str | None = None
    """held-out pairs for the eval loss and implicit-reward accuracy (the toy's on the toy; "none" = none)"""
    eval_dataset_split: str = "test"
    """split of a hub eval dataset or save_to_disk folder"""
    eval_split: float = 0.0
    """hold out this fraction of the training pairs (seeded) when no eval dataset is given"""
    eval_every: int = 50
    """evaluate the held-out pairs every this many optimiser steps (and at the end)"""
    eval_prompts: str | None = None
    """held-out prompts sampled from at the start and the end to measure rewards and the KL to the reference, as
    ppo.py does (default: the toy's on the toy, else the prompts of the held-out pairs; "none" = none)"""
    eval_samples_per_prompt: int = 16
    """completions sampled per held-out prompt in the start / end evaluation"""
    max_new_tokens: int | None = None
    """longest sampled completion (default: 128; the toy's 24)"""
    temperature: float = 1.0
    """sampling temperature of the evaluation (the KL to the reference is measured at it)"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function scoring the eval samples (TRL's reward-function signature; repeatable); default: the toy's gold
    reward on the toy, else none; "none" for none"""
    reward_model_path: str | None = None
    """a reward model that also scores the eval samples (the proxy reward; the toy's on the toy; "none" = none); DPO
    never trains on it"""
    model: harness.ModelArgs = harness.group(harness.ModelArgs)
    optim: harness.OptimArgs = harness.group(harness.OptimArgs, warmup_ratio=0.1)
    run: harness.RunArgs = harness.group(harness.RunArgs, output_dir="runs/dpo")

    def __post_init__(self):
        harness.check_options(self, positive=("beta", "max_length", "num_epochs", "max_steps", "per_device_batch_size",
                                              "gradient_accumulation_steps", "eval_every", "eval_samples_per_prompt",
                                              "max_new_tokens", "temperature"), nonnegative=("rpo_alpha",),
                              fractions=("eval_split",))
        harness.check_deterministic(self.model)
        if not 0 <= self.label_smoothing < 0.5:
            raise harness.InputError(f"--label_smoothing must be in [0, 0.5) (the assumed rate of flipped labels), got "
                                     f"{self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise harness.InputError(f"--label_smoothing applies to --loss_type sigmoid and robust, not "
                                     f"{self.loss_type}")


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
    """Robust DPO (Chowdhury et al. 2024): ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) /
    (1 - 2 eps), an unbiased estimate of the clean-label DPO loss when labels are flipped with probability eps < 1/2."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) \
        / (1 - 2 * label_smoothing)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2, a regression of the log-ratio margin onto a finite target, so that
    deterministic preferences cannot drive the policy infinitely far from the reference (DPO's failure mode). h uses
    summed sequence log-probs as in the paper (TRL averages them over tokens instead)."""
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
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not to {loss_type}")
    if loss_type == "ipo":
        return ipo_loss(h, beta)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    raise ValueError(f"unknown loss_type {loss_type!r}")


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
def build_dataset(parsed: list, tokenizer, cfg: Config) -> tuple[list, dict]:
    """Tokenised pairs (prompt_ids, chosen_ids, rejected_ids) of parsed (where, (prompt, chosen, rejected)) rows and
    the counts of the skip / truncation policy. Prompt and responses are tokenised apart (responses ending with EOS),
    so the response mask is exact where the tokenizer would merge tokens across the boundary."""
    examples, counts = [], {"truncated": 0, "dropped": 0, "identical": 0}
    for where, (prompt, chosen, rejected) in parsed:
        prompt_ids = harness.render_prompt(prompt, tokenizer, where)
        if not prompt_ids:  # the first response token must be conditioned on something
            raise harness.InputError(f"{where}: empty prompt (and the tokenizer adds no BOS token)")
        chosen_ids = harness.render_completion(prompt, chosen, tokenizer, where)
        rejected_ids = harness.render_completion(prompt, rejected, tokenizer, where)
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
        raise harness.InputError(f"{cfg.dataset}: no usable pair (--max_length {cfg.max_length}, counts {counts})")
    return examples, counts


def collate_pairs(examples, pad_token_id: int, device):
    """One batch of 2B rows: the chosen responses (rows :B), then the rejected ones (rows B:) of the same prompts, so
    that one forward pass scores both (and FSDP gathers each block once, not twice). Prompts are left-padded to P
    columns and responses right-padded after them, the layout of common.sequence_logprobs (shared with ppo.py);
    positions count from each row's first real token. Returns input_ids, attention_mask (2B, P + R), response_mask
    (2B, R) (1 on real response tokens, incl. EOS) and P."""
    prompt_ids, prompt_mask = common.left_pad([p for p, _, _ in examples] * 2, pad_token_id, device)
    responses = [c for _, c, _ in examples] + [r for _, _, r in examples]
    response_mask = common.right_pad([[1] * len(r) for r in responses], 0, device)
    return (torch.cat([prompt_ids, common.right_pad(responses, pad_token_id, device)], 1),
            torch.cat([prompt_mask, response_mask], 1), response_mask, prompt_ids.size(1))


def concatenated_logps(model, input_ids, attention_mask, response_mask, context_length):
    """Sequence log-probs log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the response tokens only, of a collate_pairs
    batch: (chosen_logps (B,), rejected_logps (B,))."""
    logps = common.masked_sum(common.sequence_logprobs(model, input_ids, attention_mask, context_length),
                              response_mask, dim=1)  # (2B,)
    return logps[:logps.size(0) // 2], logps[logps.size(0) // 2:]


@torch.no_grad()
def all_pair_logps(model, examples, batch_size: int, pad_token_id: int, device, amp) -> torch.Tensor:
    """(N, 2) [chosen, rejected] sequence log-probs of every pair, on every rank; each rank scores a strided share in
    the same number of forward passes (FSDP needs every rank in each)."""
    local = []
    for idx in harness.rank_batches(len(examples), batch_size):
        with harness.autocast(device, amp):
            c, r = concatenated_logps(model, *collate_pairs([examples[i] for i in idx or [0]], pad_token_id, device))
        local += list(zip(idx, c.float().tolist(), r.float().tolist()))
    out = torch.empty(len(examples), 2)
    for i, c, r in harness.gather_lists(local):
        out[i, 0], out[i, 1] = c, r
    return out.to(device)


def pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, losses, beta) -> dict:
    """Sums over the pairs (the caller divides by the global pair count), TRL's names."""
    chosen_rewards = implicit_rewards(chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_rewards(rejected_logps, ref_rejected_logps, beta).detach()
    return {"loss": losses.detach().sum(), "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),  # strict: a tie is no success
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(), "logps/chosen": chosen_logps.detach().sum(),
            "logps/rejected": rejected_logps.detach().sum()}


def evaluate_preferences(policy, examples, ref_logps, cfg: Config, pad_token_id, device, amp) -> dict:
    """Held-out loss and implicit-reward accuracy / margin over all held-out pairs (prefix eval_), the accuracy with
    its standard error."""
    logps = all_pair_logps(policy, examples, cfg.per_device_batch_size, pad_token_id, device, amp)
    c, r, rc, rr = logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1]
    losses = preference_loss(logratio_margin(c, r, rc, rr), cfg.loss_type, cfg.beta, cfg.label_smoothing)
    m = {f"eval_{k}": v.item() / len(examples) for k, v in pair_metrics(c, r, rc, rr, losses, cfg.beta).items()}
    acc = m["eval_rewards/accuracies"]
    return {**m, "eval_rewards/accuracies_sem": math.sqrt(acc * (1 - acc) / len(examples))}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def load_causal_lm(path: str, cfg: Config, tokenizer, device, trainable: bool, dtype: torch.dtype):
    option = "--model_name_or_path" if trainable else "--ref_model_name_or_path"
    model = harness.from_pretrained(AutoModelForCausalLM, path, option, trust_remote_code=cfg.model.trust_remote_code,
                                    dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    harness.check_model_kind(model, path, option, "policy")
    harness.check_length(model.config, cfg.max_length, "--max_length", path)
    if model.get_input_embeddings().weight.size(0) < len(tokenizer):
        raise harness.InputError(f"{path}: {model.get_input_embeddings().weight.size(0)} token embeddings but the "
                                 f"tokenizer of {cfg.model_name_or_path} has {len(tokenizer)} tokens; policy and "
                                 "reference must share it")
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    harness.disable_dropout(model)  # the implicit reward compares two forward passes: they must be deterministic
    if trainable:
        model = harness.prepare_trainable(model, cfg.model).train()
    else:
        model.eval().requires_grad_(False)
    return harness.shard_model(model.to(device), harness.precision(cfg.model, device)[2])


def load_reference(ref_path: str, policy, cfg: Config, tokenizer, device, dtype: torch.dtype):
    """The frozen reference: with LoRA and the policy's own starting point the policy with its adapter off (no second
    copy of the backbone); otherwise a frozen copy loaded from ref_path."""
    if cfg.model.lora_r and ref_path == cfg.model_name_or_path:
        return harness.WithoutAdapter(policy)
    return load_causal_lm(ref_path, cfg, tokenizer, device, trainable=False, dtype=dtype)


def main(cfg: Config) -> dict:
    rank, world_size, device = harness.setup(cfg, "dpo", PRETRAINED)
    amp = harness.precision(cfg.model, device)[2]
    ref_path = cfg.ref_model_name_or_path or cfg.model_name_or_path
    # 1. data: training and held-out pairs (parsed before any model loads), held-out prompts, the eval rewards
    rows, eval_rows = harness.train_eval_rows(cfg.dataset, "--dataset", cfg.dataset_split, cfg.eval_dataset,
                                              "--eval_dataset", cfg.eval_split, cfg.run.seed, cfg.eval_dataset_split)
    parsed = [(where, harness.parse_preference_row(row, where)) for where, row in rows]
    eval_parsed = [(where, harness.parse_preference_row(row, where)) for where, row in eval_rows]
    if cfg.eval_prompts not in (None, "none"):
        eval_prompts = harness.prompts_and_columns(harness.load_rows(cfg.eval_prompts, "--eval_prompts"))[0]
    else:  # the prompts of the held-out pairs
        eval_prompts = [] if cfg.eval_prompts == "none" else list({repr(p): p for _, (p, _, _) in eval_parsed}.values())
    eval_fns = harness.load_reward_fns(cfg.eval_reward_fn, option="--eval_reward_fn") \
        if cfg.eval_reward_fn != ("none",) else {}
    harness.require_checkpoint(ref_path, "--ref_model_name_or_path")

    # 2. models: the policy (trained), the frozen reference pi_ref (both usually the SFT model), the proxy reward model
    tokenizer = harness.from_pretrained(AutoTokenizer, cfg.model_name_or_path, "--model_name_or_path",
                                        trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise harness.InputError(f"{cfg.model_name_or_path}: the tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:  # padding is always masked (by lengths, never by token id): EOS can serve
        tokenizer.pad_token = tokenizer.eos_token
    trained_dtype, frozen_dtype, _ = harness.precision(cfg.model, device)
    policy = load_causal_lm(cfg.model_name_or_path, cfg, tokenizer, device, True, trained_dtype)
    ref_model = load_reference(ref_path, policy, cfg, tokenizer, device, frozen_dtype)
    reward_model = reward_tokenizer = None
    if cfg.reward_model_path not in (None, "none"):
        kw = dict(trust_remote_code=cfg.model.trust_remote_code)
        reward_model = harness.from_pretrained(AutoModelForSequenceClassification, cfg.reward_model_path,
                                               "--reward_model_path", dtype=frozen_dtype, **kw)
        harness.check_model_kind(reward_model, cfg.reward_model_path, "--reward_model_path", "reward")
        harness.disable_dropout(reward_model)
        reward_model = harness.shard_model(reward_model.eval().requires_grad_(False).to(device))
        reward_tokenizer = harness.from_pretrained(AutoTokenizer, cfg.reward_model_path, "--reward_model_path", **kw)
    n_params = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the full size under FSDP
    examples, counts = build_dataset(parsed, tokenizer, cfg)
    eval_examples = build_dataset(eval_parsed, tokenizer, cfg)[0] if eval_parsed else None
    eval_prompt_ids = [harness.render_prompt(p, tokenizer) for p in eval_prompts]
    if eval_prompts:
        harness.check_length(policy.config, max(map(len, eval_prompt_ids)) + cfg.max_new_tokens,
                             "the longest eval prompt + --max_new_tokens", cfg.model_name_or_path)

    def evaluate_samples(ref) -> dict:
        """Samples from the policy on held-out prompts: rewards, proxy reward and KL to the reference (as ppo.py)."""
        return harness.evaluate_policy(
            policy, tokenizer, eval_prompts, device, prompt_ids=eval_prompt_ids, ref=ref, reward_model=reward_model,
            reward_tokenizer=reward_tokenizer, reward_fns=eval_fns, samples_per_prompt=cfg.eval_samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.per_device_batch_size,
            seed=cfg.run.seed, amp=amp)

    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise harness.InputError(f"{cfg.dataset}: {len(examples)} pairs is fewer than one global batch ({global_batch} "
                                 f"= --per_device_batch_size x --gradient_accumulation_steps x {world_size} processes)")
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if rank == 0:
        print(f"policy {cfg.model_name_or_path}, reference {ref_path} | {len(examples)} pairs ({counts}), "
              f"{len(eval_examples or [])} held out, {len(eval_prompts)} eval prompts | eval reward "
              f"{', '.join(eval_fns) or 'none'}, proxy {cfg.reward_model_path or 'none'} | loss {cfg.loss_type}, beta "
              f"{cfg.beta} | {total_steps} steps of {global_batch} pairs | world size {world_size}", flush=True)
    # the optimiser must hold FSDP2's sharded parameters: built before any forward pass, since after a forward that
    # no backward follows (the evaluation) the root module's parameters() are its temporary gathered copies
    optimizer, scheduler = harness.optimizer(policy.parameters(), cfg.optim, total_steps)
    batches = harness.BatchOrder(len(examples), global_batch, cfg.run.seed)  # the same on every rank: the global batch
    sums = harness.Sums()
    state = {"batches": batches, "scheduler": scheduler, "sums": sums, "n_summed": 0, "pairs_seen": 0,
             "train_time": 0.0, "wall_time": 0.0, "start": None}
    start = harness.resume(cfg, {"policy": policy}, [optimizer], state)
    logger = harness.MetricsLogger(cfg, start)
    t_start = time.time() - state["wall_time"]

    # the starting policy, measured exactly like the final one (same prompts and sampling seed), so they compare
    state["start"] = state["start"] if start else evaluate_samples(ref_model) if eval_prompts else {}
    # reference log-probs never change: computed once for the held-out pairs, and for the training pairs if asked
    eval_ref_logps = None if eval_examples is None else \
        all_pair_logps(ref_model, eval_examples, cfg.per_device_batch_size, tokenizer.pad_token_id, device, amp)
    train_ref_logps = None
    if cfg.precompute_ref_log_probs:
        train_ref_logps = all_pair_logps(ref_model, examples, cfg.per_device_batch_size, tokenizer.pad_token_id,
                                         device, amp)
        ref_model = ref_model if isinstance(ref_model, harness.WithoutAdapter) else None

    # 3. training loop
    for step in range(start + 1, total_steps + 1):
        t0 = time.time()
        for mb in harness.micro_batches(batches.next(), cfg.per_device_batch_size):
            batch = collate_pairs([examples[j] for j in mb], tokenizer.pad_token_id, device)
            with harness.autocast(device, amp):
                chosen_logps, rejected_logps = concatenated_logps(policy, *batch)
                if train_ref_logps is not None:
                    ref_chosen_logps, ref_rejected_logps = train_ref_logps[mb, 0], train_ref_logps[mb, 1]
                else:
                    with torch.no_grad():
                        ref_chosen_logps, ref_rejected_logps = concatenated_logps(ref_model, *batch)
            h = logratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
            losses = preference_loss(h, cfg.loss_type, cfg.beta, cfg.label_smoothing)  # (B,)
            if cfg.rpo_alpha:
                losses = losses + cfg.rpo_alpha * sft_loss(chosen_logps, batch[2][:len(mb)].sum(1))
            # a mean over the global batch; FSDP averages gradients over ranks, hence * world_size
            (losses.sum() / global_batch * world_size).backward()
            sums.add(**pair_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, losses,
                                    cfg.beta))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["train_time"] += time.time() - t0
        state["pairs_seen"] += global_batch
        state["n_summed"] += global_batch

        if step % cfg.run.log_every == 0 or step == total_steps:
            metrics = {k: v / state["n_summed"] for k, v in sums.reduce(device).items()}
            metrics.update(grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0], epoch=step / steps_per_epoch,
                           pairs_per_s=state["pairs_seen"] / max(1e-9, state["train_time"]))
            logger.log(step, metrics, ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                       "logps/rejected", "pairs_per_s"))
            state["n_summed"] = 0
        if eval_examples is not None and (step % cfg.eval_every == 0 or step == total_steps):
            eval_metrics = evaluate_preferences(policy, eval_examples, eval_ref_logps, cfg, tokenizer.pad_token_id,
                                                device, amp)
            logger.log(step, eval_metrics, ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"))
        state["wall_time"] = time.time() - t_start
        harness.save_checkpoint(cfg, step, total_steps, {"policy": policy}, [optimizer], state)

    # 4. evaluate the trained policy like the starting one, save
    final, initial = {}, state["start"]
    if eval_examples is not None:
        final.update(eval_metrics, accuracy=eval_metrics["eval_rewards/accuracies"])
    if eval_prompts:
        if ref_model is None:  # freed after precomputing; the KL of the final evaluation needs it back
            ref_model = load_reference(ref_path, policy, cfg, tokenizer, device, frozen_dtype)
        end = evaluate_samples(ref_model)
        final.update({k: v for k, v in end.items() if k != "per_sample"})
        final.update({f"start_{k}": v for k, v in initial.items() if k not in ("samples", "per_sample")})
        for name in eval_fns:  # the gain in standard deviations of the starting policy's reward
            std = initial.get(f"{name}_std")
            final[f"{name}_gain_in_sft_std"] = (end[f"{name}_mean"] - initial[f"{name}_mean"]) / std if std else None
    final.update(train_loss=metrics["loss"], train_steps=total_steps,
                 pairs_per_s=state["pairs_seen"] / max(1e-9, state["train_time"]), wall_time_s=time.time() - t_start,
                 num_parameters=n_params, **counts)
    harness.save_model(cfg, policy, tokenizer, final, logger)
    if rank == 0:
        if eval_examples is not None:
            print(f"held-out preference accuracy {final['accuracy']:.3f} +- "
                  f"{final['eval_rewards/accuracies_sem']:.3f} ({len(eval_examples)} pairs)", flush=True)
        if eval_prompts:
            print(harness.summary("DPO", cfg.model_name_or_path, initial, end, eval_fns), flush=True)
        print(f"saved {cfg.run.output_dir}", flush=True)
    return final


if __name__ == "__main__":
    harness.cli(main, Config)
