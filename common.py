"""Small pieces shared by sft.py, reward_model.py, ppo.py and dpo.py.

Only what is identical across the scripts and not specific to one algorithm lives here: sampling, log-prob gathering,
masked statistics, the reward/value head read-out, data loading with clear errors, logging, distributed setup.
Every function is pure where possible and checked against a naive computation in tests/test_common.py.
"""

import json
import math
import os
import random
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------------
# Setup: seeding, device, distributed
# ---------------------------------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under `torchrun` (WORLD_SIZE > 1) initialises the process group: NCCL on CUDA,
    gloo on CPU. A plain `python script.py` is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA when asked (and supported); full fp32 on CPU, where bf16 matmuls are slow."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in a single process). Returns a new tensor, differentiable-free."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard every transformer block, then the root, across all ranks. No-op in a single process.

    Parameters become DTensors; forward/backward all-gather them block by block. Gradients are averaged over ranks
    by the reduce-scatter, so scripts scale their per-rank loss by world_size where they want a global sum."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):  # the list of decoder blocks in every HF causal LM
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF needs deterministic forward passes: rollout log-probs must equal the training forward's (ratio = 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def load_jsonl(path: str, required: tuple[str, ...] = (), alternatives: tuple[tuple[str, ...], ...] = ()) -> list:
    """Rows of a JSON-lines file. Errors name the file, the line and the field.

    required: fields every row must have. alternatives: groups of fields of which a row must hold all of at least one
    group (e.g. (("prompt", "completion"), ("messages",))). Blank lines at the end are ignored; a blank line between
    rows is an error (JSON Lines allows none), so that row i is always line i + 1 of the file in every later error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    rows, blank_line = [], None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                blank_line = blank_line or line_no
                continue
            if blank_line is not None:
                raise ValueError(f"{path}:{blank_line}: blank line between JSON rows")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            for field in required:
                if field not in row:
                    raise ValueError(f"{path}:{line_no}: missing field '{field}'")
            if alternatives and not any(all(k in row for k in group) for group in alternatives):
                wanted = " or ".join("{" + ", ".join(repr(k) for k in g) + "}" for g in alternatives)
                raise ValueError(f"{path}:{line_no}: missing fields: expected {wanted}, got keys {sorted(row)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: file is empty (no JSON lines)")
    return rows


def require_checkpoint(path: str, script: str) -> None:
    """Clear error when a default input of a later stage is missing (e.g. runs/sft before reward_model.py)."""
    if path.startswith("runs/") and not os.path.isdir(path):
        raise SystemExit(f"error: {path} not found; run `python {script}` first (or pass another path)")


def save_checkpoint(model, tokenizer, out_dir: str, extra_config: dict | None = None) -> None:
    """Save a Hugging Face checkpoint (safetensors) from rank 0, atomically: written into a temporary sibling
    directory, then swapped in with renames, so that a crash never leaves a half-written out_dir behind.

    Under FSDP2 the full state dict is gathered first (every rank must call this). extra_config: keys added to
    config.json (e.g. the reward normalisation)."""
    state_dict = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return
    for k, v in (extra_config or {}).items():
        setattr(model.config, k, v)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=".old_", dir=parent)
        os.rename(out_dir, os.path.join(old, "ckpt"))
        # the run's logs live next to the checkpoint (MetricsLogger keeps metrics.jsonl open): carry them over; a
        # rename keeps the inode, so the open file goes on receiving lines
        for name in os.listdir(os.path.join(old, "ckpt")):
            if name in ("metrics.jsonl", "eval.json") or name.startswith("events.out.tfevents"):
                os.rename(os.path.join(old, "ckpt", name), os.path.join(tmp, name))
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Masks and masked statistics
# ---------------------------------------------------------------------------------------------------------------------
def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row of (B, T); T where a row has none."""
    T = bools.size(-1)
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, T).min(dim=-1).values


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(responses with every token after the first EOS set to pad, response_mask) for responses (B, R).

    response_mask is 1 on real response tokens up to and including the EOS, 0 after it."""
    eos_idx = first_true_indices(responses == eos_token_id)  # (B,)
    positions = torch.arange(responses.size(1), device=responses.device)[None, :]
    response_mask = positions <= eos_idx[:, None]
    return torch.where(response_mask, responses, pad_token_id), response_mask.long()


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (values * mask).sum(dim) if dim is not None else (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of values where mask is 1. Over everything (dim=None) or along dim."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1) if dim is not None \
        else masked_sum(values, mask) / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, distributed: bool = False):
    """Variance of the masked values; with distributed=True the statistics are over the tokens of all ranks."""
    mean, count = masked_mean_count(values, mask, distributed)
    sq = all_reduce_sum(masked_sum((values - mean) ** 2, mask)) if distributed else masked_sum((values - mean) ** 2, mask)
    if unbiased:
        if count < 2:
            raise ValueError("masked_var: unbiased variance of fewer than 2 elements")
        return sq / (count - 1)
    return sq / count.clamp(min=1)


def masked_mean_count(values: torch.Tensor, mask: torch.Tensor, distributed: bool = False):
    total, count = masked_sum(values, mask), mask.sum().to(values.dtype)
    if distributed:
        stats = all_reduce_sum(torch.stack([total.detach(), count]))
        total, count = stats[0], stats[1]
    return total / count.clamp(min=1), count


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, distributed: bool = False):
    """(values - mean) / std over the masked entries (e.g. PPO advantages over real response tokens)."""
    mean, _ = masked_mean_count(values, mask, distributed)
    var = masked_var(values, mask, unbiased=True, distributed=distributed)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs, entropy, sampling
# ---------------------------------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label | context) for logits (B, T, V) and labels (B, T) -> (B, T), from softmax(logits / temperature).

    Uses log_softmax(x)_y = x_y - logsumexp(x) without materialising the (B, T, V) log-softmax, and float32 math."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v of the next-token distribution, (B, T, V) -> (B, T)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of (B, V) logits: removed tokens get -inf. The most likely token is
    always kept."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from (B, V) logits; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
             pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, sync_ranks: bool = False):
    """Sample responses for a left-padded batch of prompts with a KV cache.

    input_ids, attention_mask: (B, P), left-padded (real tokens at the right end).
    Returns (responses (B, R), response_mask (B, R)); R <= max_new_tokens; tokens after the first EOS are pad.
    Positions are counted from each row's first real token, so a left-padded row decodes exactly like the same
    prompt alone. sync_ranks: keep decoding until every rank is done (FSDP needs all ranks in every forward).
    """
    B = input_ids.size(0)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    past, cur_ids, cur_pos, attn = None, input_ids, position_ids, attention_mask
    tokens = []
    for _ in range(max_new_tokens):
        out = model(input_ids=cur_ids, attention_mask=attn, position_ids=cur_pos, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_tokens = sample_next_token(out.logits[:, -1], temperature, top_k, top_p, generator)
        next_tokens = torch.where(finished, pad_token_id, next_tokens)
        tokens.append(next_tokens)
        finished |= next_tokens == eos_token_id
        done = finished.all()
        if sync_ranks and dist.is_initialized():
            done = all_reduce_sum((~finished).sum()) == 0
        if done:
            break
        cur_ids, cur_pos = next_tokens[:, None], cur_pos[:, -1:] + 1
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
    responses = torch.stack(tokens, dim=1)
    return truncate_after_eos(responses, eos_token_id, pad_token_id)


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to (B, P) ids and attention mask (prompts for generation)."""
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), P), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, P - len(s):] = torch.tensor(s)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: list[list[int]], pad_value: int, device=None) -> torch.Tensor:
    T = max(len(s) for s in sequences)
    out = torch.full((len(sequences), T), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (needed for left padding and packed prompt+response)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                      temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs of the response part of [prompt | response] sequences.

    input_ids, attention_mask: (B, P + R) with left-padded prompts in the first context_length=P columns.
    Returns logprobs (B, R) of input_ids[:, P:] (and the next-token entropy (B, R) if asked)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    logits = out.logits[:, context_length - 1:-1]  # logits at t predict token t + 1
    logprobs = logprobs_from_logits(logits, input_ids[:, context_length:], temperature)
    if return_entropy:
        return logprobs, entropy_from_logits(logits.float() / temperature)
    return logprobs


# ---------------------------------------------------------------------------------------------------------------------
# Reward / value heads on a transformers backbone
# ---------------------------------------------------------------------------------------------------------------------
def head_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head on every position of an AutoModelForSequenceClassification (num_labels=1): (B, T).

    The per-token output is the critic's value V(s_t); the output at the last real token is the reward model's
    score. We read the `score` head's per-token output with a forward hook instead of the model's pooled output,
    because that is taken at the last non-pad *token id*, which is wrong when pad == eos or a response ends in padding.
    The call must still go through the model's own forward: under FSDP2 only the root forward gathers the parameters
    outside the blocks (embeddings, final norm, score head) and reduces their gradients."""
    outputs = []
    handle = model.score.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              use_cache=False)
    finally:
        handle.remove()
    return outputs[0].squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row of (B, T); works for left and right padding."""
    T = attention_mask.size(1)
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(dim=-1).values


def get_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Reward-model score of each sequence, read at its last real token (the EOS of a finished response): (B,).

    With normalize, applies the shift/scale that reward_model.py stores in the config (reward_mean, reward_std), so
    a score of 0 is the average score of SFT samples."""
    values = head_outputs(model, input_ids, attention_mask)
    scores = values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
    if normalize:
        scores = (scores - getattr(model.config, "reward_mean", 0.0)) / getattr(model.config, "reward_std", 1.0)
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """Console + out_dir/metrics.jsonl (one JSON object per logged step), optional TensorBoard / W&B (imported
    lazily, only when asked for). Only rank 0 writes."""

    def __init__(self, out_dir: str, rank: int = 0, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None):
        self.rank, self.start = rank, time.time()
        self.tb = self.wandb = None
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

            self.tb = SummaryWriter(out_dir)
        if wandb_project:
            import wandb  # optional dependency

            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, step: int, metrics: dict, console_keys: tuple[str, ...] | None = None) -> None:
        if self.rank != 0:
            return
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        keys = tuple(metrics) if console_keys is None else console_keys  # () logs to the file only
        if keys:
            shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
            print(f"[{time.time() - self.start:6.0f}s] step {step} {shown}", flush=True)
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.rank == 0:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling-space diagnostics (seed 002) and reward functions given as module:function
# ---------------------------------------------------------------------------------------------------------------------
def sampling_diagnostics(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                         mass: float = 0.95) -> dict:
    """Seed 002's measures of the size of the sampling space, averaged over real response tokens.

    logits (B, R, V) of the policy at each response position, tokens (B, R) the sampled tokens, mask (B, R).
    nucleus_size: the number of most likely tokens needed to cover `mass` of the probability."""
    logits = logits.float() / temperature
    probs = logits.softmax(-1)
    sorted_probs = probs.sort(-1, descending=True).values
    nucleus = ((sorted_probs.cumsum(-1) - sorted_probs) < mass).sum(-1).float()
    m = mask.float()
    return {
        "sampling/entropy": masked_mean(entropy_from_logits(logits), m).item(),
        "sampling/max_prob": masked_mean(sorted_probs[..., 0], m).item(),
        "sampling/sampled_token_prob": masked_mean(probs.gather(-1, tokens[..., None]).squeeze(-1), m).item(),
        "sampling/nucleus_size": masked_mean(nucleus, m).item(),
    }


def load_function(spec: str):
    """'package.module:function' -> the function (e.g. 'toy_task:gold_reward')."""
    import importlib

    if ":" not in spec:
        raise ValueError(f"reward function '{spec}' must look like module:function (e.g. toy_task:gold_reward)")
    module_name, fn_name = spec.split(":", 1)
    module = importlib.import_module(module_name)
    if not hasattr(module, fn_name):
        raise ValueError(f"reward function '{spec}': module {module_name} has no attribute {fn_name}")
    return getattr(module, fn_name)


def distinct_fraction(texts: list[str]) -> float:
    return len(set(texts)) / max(1, len(texts))


def mean_std(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=np.float64)
    return float(xs.mean()), float(xs.std())


def cosine_schedule(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """LR multiplier: linear warmup, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------------------------
# Scoring responses and evaluating a policy (shared by ppo.py, dpo.py and the toy report, so they compare)
# ---------------------------------------------------------------------------------------------------------------------
def same_tokenizer(a, b) -> bool:
    return a is b or (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)


@torch.no_grad()
def score_responses(reward_model, reward_tokenizer, policy_tokenizer, prompt_ids, prompt_mask, responses,
                    response_mask, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Normalised reward-model scores (B,) of [prompt | response], read at the last real token (the EOS).

    When the reward model's tokenizer differs from the policy's, the decoded texts are re-tokenised for it (prompt
    with its special tokens, completion without, plus its EOS if the response ended with one)."""
    device = prompt_ids.device
    if same_tokenizer(reward_tokenizer, policy_tokenizer):
        ids = torch.cat([prompt_ids, responses], 1)
        mask = torch.cat([prompt_mask, response_mask], 1)
    else:
        ended = (responses == policy_tokenizer.eos_token_id).any(1).tolist()
        seqs = [reward_tokenizer(p)["input_ids"] + reward_tokenizer(c, add_special_tokens=False)["input_ids"]
                + ([reward_tokenizer.eos_token_id] if e else []) for p, c, e in zip(prompts, completions, ended)]
        ids = right_pad(seqs, reward_tokenizer.pad_token_id, device)
        mask = right_pad([[1] * len(s) for s in seqs], 0, device)
    return get_scores(reward_model, ids, mask)


def ordering_agreement(a, b) -> float:
    """Fraction of pairs (i, j) with b_i != b_j on which a orders them like b (ties in a count as 1/2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    pairs = np.triu(db != 0, k=1)
    if not pairs.any():
        return float("nan")
    agree = (da == db) + 0.5 * (da == 0)
    return float(agree[pairs].mean())


def gather_lists(local: list) -> list:
    """Concatenate a Python list across ranks (evaluation sizes only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return [x for part in out for x in part]


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts: list[str], device, *, ref_policy=None, reward_model=None,
                    reward_tokenizer=None, reward_fn=None, samples_per_prompt: int = 4, max_new_tokens: int = 24,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
                    amp_dtype=None, prompt_token_ids: list[list[int]] | None = None) -> dict:
    """Sample `samples_per_prompt` completions of every prompt from the policy and measure them.

    prompt_token_ids: the token ids of each prompt, when they are not `tokenizer(prompt)` with its special tokens
    (e.g. prompts rendered by a chat template, which already hold them).

    Returns flat metrics: gold_reward_mean/std (reward_fn, e.g. the toy gold reward), proxy_reward_mean/std (the
    reward model, normalised), kl_to_ref (mean over samples of sum_t log pi(y_t) - log pi_ref(y_t): the k1 estimate
    of KL(pi || pi_ref) per sequence, at the sampling temperature), gold_proxy_agreement (pairwise ordering
    agreement: the over-optimisation signal of seed 002), eos_rate, response_length, num_samples; plus
    per-sample lists under "per_sample" (prompt, completion, gold, proxy, kl) for reports.
    Each rank evaluates a strided share of the (prompt, sample) pairs; all ranks return the same metrics."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    was_training = policy.training
    policy.eval()
    if prompt_token_ids is None:
        prompt_token_ids = [tokenizer(p)["input_ids"] for p in prompts]
    ids_of = dict(zip(prompts, prompt_token_ids))
    work = [p for p in prompts for _ in range(samples_per_prompt)][rank::world]
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    n_batches = math.ceil(len(work) / batch_size)
    if world > 1:  # every rank must run the same number of (FSDP) forward passes
        n_batches = max(gather_lists([n_batches]))
    rows = {"prompt": [], "completion": [], "gold": [], "proxy": [], "kl": [], "eos": [], "length": []}
    for b in range(n_batches):
        batch = work[b * batch_size:(b + 1) * batch_size] or work[:1] or prompts[:1]  # dummy batch keeps ranks in step
        real = b * batch_size < len(work)
        prompt_ids, prompt_mask = left_pad([ids_of[p] for p in batch], tokenizer.pad_token_id, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            responses, response_mask = generate(policy, prompt_ids, prompt_mask, max_new_tokens, tokenizer.eos_token_id,
                                                tokenizer.pad_token_id, temperature, top_k, top_p, gen,
                                                sync_ranks=True)
            completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
            seq, seq_mask = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, response_mask], 1)
            kl = torch.zeros(len(batch), device=device)
            if ref_policy is not None:
                logprobs = sequence_logprobs(policy, seq, seq_mask, prompt_ids.size(1), temperature)
                ref_logprobs = sequence_logprobs(ref_policy, seq, seq_mask, prompt_ids.size(1), temperature)
                kl = ((logprobs - ref_logprobs) * response_mask).sum(1)
            proxy = torch.full((len(batch),), float("nan"), device=device)
            if reward_model is not None:
                proxy = score_responses(reward_model, reward_tokenizer or tokenizer, tokenizer, prompt_ids, prompt_mask,
                                        responses, response_mask, batch, completions)
        if not real:
            continue
        rows["prompt"] += batch
        rows["completion"] += completions
        rows["gold"] += list(reward_fn(batch, completions)) if reward_fn is not None else [float("nan")] * len(batch)
        rows["proxy"] += proxy.float().tolist()
        rows["kl"] += kl.float().tolist()
        rows["eos"] += (responses == tokenizer.eos_token_id).any(1).float().tolist()
        rows["length"] += response_mask.sum(1).float().tolist()
    rows = {k: gather_lists(v) for k, v in rows.items()}
    policy.train(was_training)
    gold, proxy = np.asarray(rows["gold"], dtype=np.float64), np.asarray(rows["proxy"], dtype=np.float64)
    metrics = {
        "gold_reward_mean": float(gold.mean()), "gold_reward_std": float(gold.std()),
        "gold_reward_sem": float(gold.std() / math.sqrt(len(gold))),
        "proxy_reward_mean": float(proxy.mean()), "proxy_reward_std": float(proxy.std()),
        "kl_to_ref": float(np.mean(rows["kl"])) if ref_policy is not None else float("nan"),
        "gold_proxy_agreement": ordering_agreement(proxy, gold) if reward_fn is not None and reward_model is not None
        else float("nan"),
        "eos_rate": float(np.mean(rows["eos"])), "response_length": float(np.mean(rows["length"])),
        "distinct_completions": distinct_fraction(rows["completion"]), "num_samples": len(rows["completion"]),
    }
    metrics["per_sample"] = rows
    return metrics
