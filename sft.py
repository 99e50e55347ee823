"""Supervised fine-tuning (SFT) of a causal language model, in one file.

    python sft.py                                   # toy task: trains the toy GPT-2 from scratch, CPU, ~1 minute
    python sft.py --help                            # every option, explained
    python sft.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset my.jsonl --output_dir runs/sft_qwen
    torchrun --nproc_per_node 8 sft.py ...          # many GPUs (FSDP2)

Stage one of RLHF (InstructGPT, Ouyang et al. 2022): teach the policy the format of good answers. The RL that
follows can only re-weight what this model samples, so the script also reports how large its sampling space is.

Math: loss = -(1 / N) * sum_{i, t in completion} log pi(y_{i,t} | x_i, y_{i,<t}), N = number of trained tokens in
the global batch (all micro-batches and all ranks), so N processes reproduce one process with the same global batch.

Data (TRL's formats; JSON lines, JSON, parquet, CSV, a datasets.save_to_disk folder or a hub dataset id):
    {"prompt": str, "completion": str}             completions carry their leading space; EOS is appended here
    {"prompt": [messages], "completion": [assistant message]}      rendered by the tokenizer's chat template
    {"messages": [messages]}                       every assistant turn is trained (--assistant_only_loss)
    {"text": str}                                  language modelling: every token is trained
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import tyro
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import common
import harness

# defaults of the options left None for a pretrained model (the toy's: toy_task.DEFAULTS["sft"]); TRL's SFT values
PRETRAINED = dict(learning_rate=2e-5, max_length=1024, per_device_batch_size=8, max_new_tokens=128, from_scratch=False)


@dataclass
class Config:
    dataset: str | None = None
    """training data: .jsonl / .json / .parquet / .csv, a datasets.save_to_disk folder or a hub dataset id (formats in
    the module docstring); default: the toy's on the toy model, else required"""
    dataset_split: str = "train"
    """split of a hub dataset or save_to_disk folder"""
    max_length: int | None = None
    """longest sequence, prompt + completion, in tokens (see --truncation; default: 1024; the toy's 64)"""
    truncation: Literal["truncate", "drop"] = "truncate"
    """over-long samples: cut at max_length (the completion then has no EOS) or dropped; either is counted"""
    completion_only_loss: bool = True
    """prompt-completion rows: train on the completion only (prompt tokens masked); False trains on everything"""
    assistant_only_loss: bool = True
    """conversations ({"messages"}): train on every assistant turn only; False trains on the whole conversation"""
    num_epochs: float = 2.0
    """passes over the training data (fractions allowed)"""
    max_steps: int | None = None
    """stop after this many optimiser steps (instead of num_epochs; the learning-rate schedule spans them)"""
    per_device_batch_size: int | None = None
    """sequences per micro-batch on each process (default: 8; the toy's 64)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step; global batch = per_device_batch_size x this x world size"""
    # the model
    model_name_or_path: str = "data/toy/base_model"
    """model to start from: a Hugging Face hub id or local directory (the toy's holds a config and tokenizer only)"""
    from_scratch: bool | None = None
    """initialise the weights randomly from the model's config (the default on the toy model, whose base holds no
    weights; a folder that holds weights is refused, so a real checkpoint never silently turns into a random model)"""
    # evaluation
    eval_dataset: str | None = None
    """held-out data for eval loss / perplexity and the prompts of sample generations (the toy's on the toy; "none")"""
    eval_dataset_split: str = "test"
    """split of a hub eval dataset or save_to_disk folder"""
    eval_split: float = 0.0
    """hold out this fraction of the training rows (seeded) when no eval dataset is given"""
    eval_every: int = 100
    """evaluate every this many optimiser steps (and at the end)"""
    num_eval_generations: int = 128
    """completions sampled from eval prompts at each evaluation (the sampling space; 0 = none; a multiple of the
    number of processes)"""
    max_new_tokens: int | None = None
    """longest sampled completion (default: 128; the toy's 24)"""
    temperature: float = 1.0
    """sampling temperature of the evaluation generations"""
    top_p: float = 1.0
    """nucleus sampling of the evaluation generations"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function scoring the eval samples (TRL's reward-function signature; repeatable); default: the toy's gold
    reward on the toy, else none; "none" for none"""
    model: harness.ModelArgs = harness.group(harness.ModelArgs)
    optim: harness.OptimArgs = harness.group(harness.OptimArgs, weight_decay=0.01, warmup_ratio=0.05)
    run: harness.RunArgs = harness.group(harness.RunArgs, output_dir="runs/sft", log_every=20)

    def __post_init__(self):
        harness.check_options(self, positive=("max_length", "num_epochs", "max_steps", "per_device_batch_size",
                                              "gradient_accumulation_steps", "eval_every", "max_new_tokens"),
                              nonnegative=("num_eval_generations", "temperature"), fractions=("eval_split",),
                              probabilities=("top_p",))


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def parse_row(row: dict, where: str):
    """(prompt or None, completion) of a row: {"text"} (no prompt), {"prompt", "completion"} as strings or a
    conversation (prompt messages, completion ending with an assistant message), {"messages"} (prompt None, the
    completion the whole conversation)."""
    if "messages" in row:
        messages = harness.check_messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise harness.InputError(f"{where}: field 'messages' holds no assistant message to train on (roles: "
                                     f"{', '.join(m['role'] for m in messages)})")
        return None, messages
    if "text" in row:
        return None, harness.text_field(row["text"], where, "text")
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list):
            return harness.prompt_field(row["prompt"], where), harness.assistant_field(row["completion"], where,
                                                                                       "completion")
        return row["prompt"] and harness.text_field(row["prompt"], where, "prompt"), harness.text_field(
            row["completion"], where, "completion")
    raise harness.InputError(f"{where}: expected {{prompt, completion}} (strings or messages), {{messages}} or "
                             f"{{text}}, got keys {sorted(row)}")


def render_conversation(messages: list, tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a whole conversation: the mask is 1 on every assistant turn (its content and
    end-of-turn text as the chat template renders them after the generation prompt). Each turn is rendered as the
    template renders the conversation up to it, so the pieces add up to the whole; the last assistant turn ends with
    EOS."""
    ids, mask, done = [], [], ""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = harness.chat_text(tokenizer, messages[:i], where, add_generation_prompt=True)
        upto = harness.chat_text(tokenizer, messages[:i + 1], where)
        if not (before.startswith(done) and upto.startswith(before)):
            raise harness.InputError(f"{where}: the chat template does not render the conversation turn by turn")
        prefix = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
        turn = tokenizer(upto[len(before):].rstrip(), add_special_tokens=False)["input_ids"]
        if i == last and (not turn or turn[-1] != tokenizer.eos_token_id):
            turn = turn + [tokenizer.eos_token_id]
        ids, mask = ids + prefix + turn, mask + [0] * len(prefix) + [1] * len(turn)
        done = upto[:len(before)] + upto[len(before):].rstrip()
    return ids, mask


def tokenize(parsed, tokenizer, cfg: Config, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a parsed row, labels -100 where no loss is taken. Prompt and completion are tokenised
    apart (a conversation turn by turn), so the loss mask is exact where the tokenizer would merge across the
    boundary; completions end with EOS (a conversation's with the template's end of turn)."""
    prompt, completion = parsed
    if prompt is None and isinstance(completion, list):  # a whole conversation
        ids, assistant = render_conversation(completion, tokenizer, where)
        return ids, [t if m or not cfg.assistant_only_loss else -100 for t, m in zip(ids, assistant)]
    if prompt is None:  # language modelling: every token
        ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    prompt_ids = harness.render_prompt(prompt, tokenizer, where)
    completion_ids = harness.render_completion(prompt, completion, tokenizer, where)
    return prompt_ids + completion_ids, ([-100] * len(prompt_ids) if cfg.completion_only_loss else prompt_ids) + \
        completion_ids


def build_dataset(parsed: list, tokenizer, cfg: Config) -> tuple[list, dict]:
    """Tokenised (input_ids, labels) pairs of parsed (where, row) pairs, and the counts of the truncation policy."""
    examples, counts = [], {"truncated": 0, "dropped": 0}
    for where, row in parsed:
        ids, labels = tokenize(row, tokenizer, cfg, where)
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop" or all(label == -100 for label in labels[1:cfg.max_length]):
                counts["dropped"] += 1
                continue
            ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
            counts["truncated"] += 1
        examples.append((ids, labels))
    if not examples:
        raise harness.InputError(f"{cfg.dataset}: every example was dropped (--max_length {cfg.max_length})")
    return examples, counts


def collate(batch, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 where masked and on padding."""
    return (common.right_pad([ids for ids, _ in batch], pad_token_id, device),
            common.right_pad([[1] * len(ids) for ids, _ in batch], 0, device),
            common.right_pad([lab for _, lab in batch], -100, device))


def token_nll_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over the label tokens, their number) of a right-padded batch."""
    logprobs = common.sequence_logprobs(model, input_ids, attention_mask, 1)  # (B, T - 1): tokens 1 ... T - 1
    mask = labels[:, 1:] != -100
    return -(logprobs * mask).sum(), mask.sum()


def sampling_diagnostics(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, mass: float = 0.95):
    """The size of the sampling space at each sampled token (RL can only re-weight what the policy samples, and it
    narrows that space: Kirk et al. 2023): logits (n, V), tokens (n,) -> entropy, the largest probability, the sampled
    token's probability and nucleus_size, the number of most likely tokens needed to cover `mass` of the probability."""
    logits = logits.float() / temperature
    probs = logits.softmax(-1)
    sorted_probs = probs.sort(-1, descending=True).values
    return (common.entropy_from_logits(logits), sorted_probs[:, 0], probs.gather(-1, tokens[:, None]).squeeze(-1),
            ((sorted_probs.cumsum(-1) - sorted_probs) < mass).sum(-1).float())


# ---------------------------------------------------------------------------------------------------------------------
# Model and evaluation
# ---------------------------------------------------------------------------------------------------------------------
def load_model(cfg: Config, device):
    trust = cfg.model.trust_remote_code
    tokenizer = harness.from_pretrained(AutoTokenizer, cfg.model_name_or_path, "--model_name_or_path",
                                        trust_remote_code=trust)
    if tokenizer.eos_token_id is None:
        raise harness.InputError(f"{cfg.model_name_or_path}: the tokenizer has no EOS token; the model could never "
                                 "learn to stop")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos would mask the EOS labels out with the padding, and the model would never learn to stop; a pad
        # token of its own keeps them apart (its embedding is never trained, it is always masked)
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    dtype = harness.precision(cfg.model, device)[0]
    if cfg.from_scratch:
        if not os.path.isdir(cfg.model_name_or_path) or any(f.endswith((".safetensors", ".bin"))
                                                            for f in os.listdir(cfg.model_name_or_path)):
            raise harness.InputError(f"--from_scratch would discard the weights of {cfg.model_name_or_path}; pass "
                                     "--from_scratch False to fine-tune them")
        if cfg.model.lora_r:
            raise harness.InputError("--lora_r with --from_scratch would adapt random weights; LoRA fine-tunes a "
                                     "pretrained model")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_name_or_path,
                                                                            trust_remote_code=trust),
                                                 trust_remote_code=trust,
                                                 attn_implementation=cfg.model.attn_implementation).to(dtype)
        print(f"initialising {type(model).__name__} from random weights (--from_scratch) with the config of "
              f"{cfg.model_name_or_path}", flush=True)
    else:
        model = harness.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, "--model_name_or_path",
                                        trust_remote_code=trust, dtype=dtype,
                                        attn_implementation=cfg.model.attn_implementation)
        harness.check_model_kind(model, cfg.model_name_or_path, "--model_name_or_path", "policy")
    harness.check_length(model.config, cfg.max_length, "--max_length", cfg.model_name_or_path)
    if len(tokenizer) > model.get_input_embeddings().weight.size(0):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return harness.prepare_trainable(model, cfg.model).to(device), tokenizer


@torch.no_grad()
def evaluate(model, tokenizer, eval_examples, prompts, prompt_ids, cfg: Config, device, amp, reward_fns) -> dict:
    """Eval loss / perplexity on the held-out examples, and the sampling space of completions of held-out prompts."""
    rank, world_size = common.rank_info()
    model.eval()
    sums = harness.Sums()
    for idx in harness.rank_batches(len(eval_examples), cfg.per_device_batch_size):
        with harness.autocast(device, amp):  # an empty share runs on a dummy example, counted as nothing
            nll, n = token_nll_sum(model, *collate([eval_examples[i] for i in idx or [0]], tokenizer.pad_token_id,
                                                   device))
        sums.add(nll=nll * bool(idx), tokens=n * bool(idx))
    n = cfg.num_eval_generations // world_size  # samples per rank; every rank decodes the same number of steps
    if prompts and n > 0:
        picked = [(rank * n + i) % len(prompts) for i in range(n)]
        query, query_mask = common.left_pad([prompt_ids[j] for j in picked], tokenizer.pad_token_id, device)
        with harness.autocast(device, amp):
            responses, response_mask = common.generate(
                model, query, query_mask, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                cfg.temperature, 0, cfg.top_p, torch.Generator(device=device).manual_seed(cfg.run.seed + 1000 + rank),
                sync_ranks=True)
            diagnostics = common.response_token_stats(
                model, torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1), query.size(1),
                lambda logits, labels: sampling_diagnostics(logits, labels, cfg.temperature))
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        for name, values in zip(("entropy", "max_prob", "sampled_token_prob", "nucleus_size"), diagnostics):
            sums.add(**{name: common.masked_mean(values, response_mask) * n})  # this rank's token mean, per sample
        sums.add(eos=(responses == tokenizer.eos_token_id).any(1).sum(), length=response_mask.sum(), samples=n)
        for name, values in harness.score_with_fns(reward_fns, [prompts[j] for j in picked], completions)[1].items():
            scored = [v for v in values if v is not None]
            sums.add(**{f"{name}_sum": sum(scored), f"{name}_sq": sum(v * v for v in scored), f"{name}_n": len(scored)})
    t = sums.reduce(device)
    model.train()
    metrics = {"eval/loss": t["nll"] / t["tokens"], "eval/perplexity": math.exp(min(20.0, t["nll"] / t["tokens"]))}
    if t.get("samples"):
        metrics.update({f"sampling/{k}": t[k] / t["samples"] for k in ("entropy", "max_prob", "sampled_token_prob",
                                                                        "nucleus_size")})
        metrics.update({"eos_rate": t["eos"] / t["samples"], "eval/response_length": t["length"] / t["samples"],
                        "num_samples": t["samples"], "distinct_completions":  # of rank 0's samples
                        len(set(completions)) / len(completions),
                        "samples": [harness.prompt_text(prompts[j]) + " |" + c
                                    for j, c in zip(picked[:4], completions)]})
        for name in reward_fns:
            k = t[f"{name}_n"]
            mean = t[f"{name}_sum"] / k if k else None
            metrics.update({f"{name}_mean": mean, f"{name}_unscored": int(t["samples"] - k),
                            f"{name}_std": math.sqrt(max(0.0, t[f"{name}_sq"] / k - mean ** 2)) if k else None})
    return metrics


def main(cfg: Config) -> dict:
    rank, world_size, device = harness.setup(cfg, "sft", PRETRAINED)
    amp = harness.precision(cfg.model, device)[2]
    # 1. data (parsed before the model loads: a bad row costs no loading time), model
    rows, eval_rows = harness.train_eval_rows(cfg.dataset, "--dataset", cfg.dataset_split, cfg.eval_dataset,
                                              "--eval_dataset", cfg.eval_split, cfg.run.seed, cfg.eval_dataset_split)
    parsed = [(where, parse_row(row, where)) for where, row in rows]
    eval_parsed = [(where, parse_row(row, where)) for where, row in eval_rows]
    prompts = {repr(p): p for p in (harness.parse_prompt(row, where) for where, row in eval_rows
                                    if "prompt" in row or "messages" in row)}  # the prompts of sample generations
    prompts = [prompts[k] for k in sorted(prompts)]
    eval_fns = harness.load_reward_fns(cfg.eval_reward_fn, option="--eval_reward_fn") \
        if cfg.eval_reward_fn != ("none",) else {}
    model, tokenizer = load_model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples, counts = build_dataset(parsed, tokenizer, cfg)
    eval_examples = build_dataset(eval_parsed, tokenizer, cfg)[0] if eval_parsed else []
    prompt_ids = [harness.render_prompt(p, tokenizer) for p in prompts]
    if prompts:
        harness.check_length(model.config, max(map(len, prompt_ids)) + cfg.max_new_tokens,
                             "the longest eval prompt + --max_new_tokens", cfg.model_name_or_path)
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise harness.InputError(f"{cfg.dataset}: {len(examples)} examples is fewer than one global batch "
                                 f"({global_batch} = --per_device_batch_size x --gradient_accumulation_steps x "
                                 f"{world_size} processes)")
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if rank == 0:
        print(f"model {cfg.model_name_or_path} ({n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained, "
              f"{next(model.parameters()).dtype}) | {len(examples)} examples (truncated {counts['truncated']}, dropped "
              f"{counts['dropped']}), {len(eval_examples)} held out, {len(prompts)} eval prompts | eval reward "
              f"{', '.join(eval_fns) or 'none'} | {total_steps} steps of {global_batch} | world size {world_size}",
              flush=True)
    model = harness.shard_model(model, amp)
    optimizer, scheduler = harness.optimizer(model.parameters(), cfg.optim, total_steps, betas=(0.9, 0.95))
    batches = harness.BatchOrder(len(examples), global_batch, cfg.run.seed)  # the same on every rank: the global batch
    state = {"batches": batches, "scheduler": scheduler, "tokens_seen": 0, "train_time": 0.0, "wall_time": 0.0}
    start = harness.resume(cfg, {"model": model}, [optimizer], state)
    logger, metrics = harness.MetricsLogger(cfg, start), {}

    # 2. training loop
    model.train()
    t_start = time.time() - state["wall_time"]
    for step in range(start + 1, total_steps + 1):
        # this rank's micro-batches; the loss is normalised by the label tokens of the whole global batch
        micro_batches = [collate([examples[j] for j in mb], tokenizer.pad_token_id, device)
                         for mb in harness.micro_batches(batches.next(), cfg.per_device_batch_size)]
        global_tokens = common.all_reduce_sum(sum((lab[:, 1:] != -100).sum() for *_, lab in micro_batches).float())
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for input_ids, attention_mask, labels in micro_batches:
            with harness.autocast(device, amp):
                nll, _ = token_nll_sum(model, input_ids, attention_mask, labels)
            (nll / global_tokens * world_size).backward()  # FSDP averages gradients over ranks: * world_size = sum
            loss_sum += nll.detach().float()
            state["tokens_seen"] += int(attention_mask.sum()) * world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["train_time"] += time.time() - t0

        if step % cfg.run.log_every == 0 or step == total_steps:
            loss = (common.all_reduce_sum(loss_sum) / global_tokens).item()
            logger.log(step, {"loss": loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                              "epoch": step / steps_per_epoch,
                              "tokens_per_s": state["tokens_seen"] / max(1e-9, state["train_time"])},
                       ("loss", "lr", "epoch", "tokens_per_s"))
        if eval_examples and (step % cfg.eval_every == 0 or step == total_steps):
            metrics = evaluate(model, tokenizer, eval_examples, prompts, prompt_ids, cfg, device, amp, eval_fns)
            samples = metrics.pop("samples", [])
            logger.log(step, metrics, ("eval/loss", "eos_rate", *[f"{n}_mean" for n in eval_fns], "sampling/entropy",
                                       "distinct_completions"))
            if rank == 0:
                for s in samples:
                    print("   sample:", s)
        state["wall_time"] = time.time() - t_start
        harness.save_checkpoint(cfg, step, total_steps, {"model": model}, [optimizer], state)

    # 3. save the model with its evaluation beside it
    final = {**metrics, "train_loss": loss, "train_steps": total_steps,
             "tokens_per_s": state["tokens_seen"] / state["train_time"], "wall_time_s": time.time() - t_start,
             "num_parameters": n_params, **counts}
    harness.save_model(cfg, model, tokenizer, final, logger)
    if rank == 0:
        shown = [f"{k} {final[k]:.4f}" for k in ("eval/loss", "eos_rate", *[f"{n}_mean" for n in eval_fns])
                 if isinstance(final.get(k), float)]
        print(f"saved {cfg.run.output_dir} | " + " | ".join(shown or [f"train loss {loss:.4f}"]), flush=True)
    return final


if __name__ == "__main__":
    harness.cli(main, Config)
