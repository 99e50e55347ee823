"""The kernel that sft.py, reward_model.py, ppo.py, dpo.py and grpo.py share: sampling with a KV cache (`generate`),
per-token log-probs and entropy a chunk of tokens at a time (`sequence_logprobs`), the reward / value head read-out
(`get_scores`), masked statistics and the one all-reduce. Pure torch, each part tested against a naive computation."""

import contextlib
import inspect
import math

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a detached copy; identity in a single process)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def rank_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# --- masks and masked statistics -------------------------------------------------------------------------------------
def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row of (B, T); T where a row has none."""
    return torch.where(bools, torch.arange(bools.size(-1), device=bools.device), bools.size(-1)).min(dim=-1).values


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int):
    """(responses with every token after the first EOS set to pad, response_mask), both (B, R); response_mask is 1 on
    real response tokens up to and including the EOS (eos_token_id: one id, or several that each end a response)."""
    eos_idx = first_true_indices(torch.isin(responses, torch.tensor(eos_token_id, device=responses.device)))  # (B,)
    response_mask = torch.arange(responses.size(1), device=responses.device)[None, :] <= eos_idx[:, None]
    return torch.where(response_mask, responses, pad_token_id), response_mask.long()


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of values where mask is 1, over everything (dim=None) or along dim."""
    return masked_sum(values, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_mean_var(values: torch.Tensor, mask: torch.Tensor, distributed: bool = False):
    """(mean, unbiased variance or None below 2 values, count) of the masked values; distributed: over all ranks."""
    total, count = masked_sum(values, mask), mask.sum().to(values.dtype)
    if distributed:
        total, count = all_reduce_sum(torch.stack([total, count]))
    mean = total / count.clamp(min=1)
    squares = masked_sum((values - mean) ** 2, mask)
    squares = all_reduce_sum(squares) if distributed else squares
    return mean, squares / (count - 1) if count >= 2 else None, count


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, distributed: bool = False):
    """(values - mean) / std over the masked entries (e.g. advantages over real response tokens); below 2 values
    (every sample unscored) there is no spread to divide by and values are only centred (the same on all ranks)."""
    mean, var, _ = masked_mean_var(values, mask, distributed)
    whitened = values - mean if var is None else (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


# --- sampling --------------------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of (B, V) logits: removed tokens get -inf; the most likely one stays."""
    if 0 < top_k < logits.size(-1):
        logits = logits.masked_fill(logits < torch.topk(logits, top_k, dim=-1).values[:, -1:], -math.inf)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        remove_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted), -math.inf)
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from (B, V) logits; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding, packed prompt + response)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def gathered(model):
    """FSDP2: all-gather the sharded parameters once for a whole rollout instead of at every decoding step (each rank
    holds the full weights, as one GPU does, until the rollout ends); nothing in a single process."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)] if dist.is_initialized() else []
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not modules[0], recurse=False)  # the root (first) keeps its default


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             eos_token_id: int | list[int], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, sync_ranks: bool = False):
    """Sample responses to a left-padded batch of prompts (B, P) with a KV cache (transformers' DynamicCache, passed
    as `cache`, or `past_key_values` before transformers 5).

    Returns (responses, response_mask), both (B, R) with R <= max_new_tokens; tokens after the first EOS are pad.
    Positions count from each row's first real token, so a left-padded row decodes exactly like the same prompt alone.
    sync_ranks: decode until every rank is done (FSDP needs all ranks in every forward)."""
    B, P = input_ids.shape
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values":
             DynamicCache(config=base.config)}
    attention = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], 1)
    ids, positions, tokens = input_ids, position_ids_from_mask(attention_mask), []
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    stop = torch.tensor(eos_token_id, device=input_ids.device)  # one id, or several (a tool call's end too)
    was_training = model.training
    model.eval()
    with gathered(model):
        for t in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=attention[:, :P + t], position_ids=positions, use_cache=True,
                           logits_to_keep=1, **cache).logits[:, -1]  # (B, V)
            next_tokens = torch.where(finished, pad_token_id, sample_next_token(logits, temperature, top_k, top_p,
                                                                                 generator))
            tokens.append(next_tokens)
            finished |= torch.isin(next_tokens, stop)
            running = (~finished).sum()
            if (all_reduce_sum(running) if sync_ranks else running) == 0:
                break
            ids, positions = next_tokens[:, None], positions[:, -1:] + 1
    model.train(was_training)
    return truncate_after_eos(torch.stack(tokens, 1), eos_token_id, pad_token_id)


# --- log-probs and entropy -------------------------------------------------------------------------------------------
# tokens x vocabulary logits computed at once: 256 MB in fp32 (a 152k vocabulary: 441 tokens)
LOGITS_PER_CHUNK = 2 ** 26


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(label | context) of softmax(logits / temperature) in fp32: logits (..., V), labels (...) -> (...), as
    log_softmax(x)_y = x_y - logsumexp(x), without materialising the log-softmax."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v of the next-token distribution, (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int, fn):
    """fn(logits (n, V), labels (n,)) -> tuple of (n,) tensors at the response tokens of [prompt | response]
    sequences (B, P + R), prompts left-padded into the first P = context_length columns: a tuple of (B, R).

    The logits predicting response tokens P ... P + R - 1 sit at positions P - 1 ... P + R - 2. They are computed here
    from the last hidden states, LOGITS_PER_CHUNK at a time (recomputed in backward, activation checkpointing), while
    the model's own output layer gets an empty input (a forward pre-hook): the (B, T, V) logits of the batch never
    exist at once, as in TRL's chunked log-prob kernel. The call still goes through the model's forward, which under
    FSDP2 gathers the output layer's weights."""
    head, B, R = model.get_output_embeddings(), input_ids.size(0), input_ids.size(1) - context_length
    labels, softcap, out = input_ids[:, context_length:].reshape(-1), getattr(model.config, "final_logit_softcapping",
                                                                              None), []

    def chunk(h, y):
        logits = head.forward(h)  # forward(): our hook stays out of it
        return fn(softcap * torch.tanh(logits / softcap) if softcap else logits, y)

    def hook(module, args):
        hidden = args[0][:, context_length - 1:-1].reshape(B * R, -1)  # (B R, H)
        size = max(1, LOGITS_PER_CHUNK // head.out_features)
        if hidden.size(0) <= size:
            out.append(chunk(hidden, labels))
        else:
            run = (lambda h, y: checkpoint(chunk, h, y, use_reentrant=False)) if torch.is_grad_enabled() else chunk
            parts = [run(hidden[i:i + size], labels[i:i + size]) for i in range(0, hidden.size(0), size)]
            out.append(tuple(torch.cat(p) for p in zip(*parts)))
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              use_cache=False)
    finally:
        handle.remove()
    return tuple(t.view(B, R) for t in out[0])


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                      temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs (B, R) of the response part of [prompt | response] sequences (B, P + R) at the sampling
    temperature, and with return_entropy the next-token entropy (B, R) too."""
    def fn(logits, labels):
        logits = logits.float() if temperature == 1.0 else logits.float() / temperature
        return (logprobs_from_logits(logits, labels), *([entropy_from_logits(logits)] if return_entropy else []))

    stats = response_token_stats(model, input_ids, attention_mask, context_length, fn)
    return stats if return_entropy else stats[0]


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for a rollout sampled by another engine (vLLM), whose log-probs differ a little from the
    trainer's (kernels, precision): the policy gradient is reweighted by w = pi_old / pi_rollout, truncated at the cap
    (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
    vllm_importance_sampling_correction, verl's rollout correction, OpenRLHF's TIS / ICEPOP):

        token_*     w_t = exp(log pi_old(y_t) - log pi_rollout(y_t))
        sequence_*  w_t = exp(sum_t' log pi_old(y_t') - log pi_rollout(y_t')), the same for every token of a response
        *_truncate  w_t = min(w_t, cap)            *_mask  w_t = w_t if w_t <= cap else 0 (the token / response dropped)

    Inputs (B, R); returns (w, capped), both (B, R): the detached weights (0 off the mask) and the real tokens whose
    ratio exceeded the cap."""
    log_w = torch.where(mask.bool(), old_logprobs - rollout_logprobs, 0.0).detach()
    if mode.startswith("sequence"):
        log_w = log_w.sum(1, keepdim=True).expand_as(log_w)
    w, capped = log_w.exp(), (log_w > math.log(cap)) & mask.bool()
    w = w.clamp(max=cap) if mode.endswith("truncate") else torch.where(capped, 0.0, w)
    return w * mask, capped


# --- reward and value heads ------------------------------------------------------------------------------------------
def head_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head of an AutoModelForSequenceClassification (num_labels=1) at every position: (B, T), the critic's
    V(s_t), and at the last real token the reward model's score. Read from the `score` head with a forward hook: the
    model's pooled output is taken at the last non-pad *token id*, wrong when pad == eos."""
    outputs = []
    handle = model.score.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
              use_cache=False)
    finally:
        handle.remove()
    return outputs[0].squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row of (B, T), for left and right padding."""
    idx = torch.arange(attention_mask.size(1), device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(dim=-1).values


def get_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Reward-model score of each sequence at its last real token (the EOS of a finished response): (B,). normalize:
    (score - reward_mean) / reward_std of the config (reward_model.py's: 0 = the mean score of the SFT samples)."""
    scores = head_outputs(model, input_ids, attention_mask).gather(1, last_token_index(attention_mask)[:, None])[:, 0]
    if normalize:
        scores = (scores - getattr(model.config, "reward_mean", 0.0)) / getattr(model.config, "reward_std", 1.0)
    return scores


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, P) ids and attention mask of token lists (prompts for generation)."""
    P = max(len(s) for s in sequences)
    return (torch.tensor([[pad_token_id] * (P - len(s)) + s for s in sequences], device=device),
            torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in sequences], device=device))


def right_pad(sequences: list[list[int]], pad_value: int, device=None) -> torch.Tensor:
    T = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_value] * (T - len(s)) for s in sequences], dtype=torch.long, device=device)
