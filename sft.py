"""Supervised fine-tuning (SFT) of a causal language model, in one file.

    python sft.py                                   # toy task: trains the toy GPT-2 from scratch, CPU, ~1 minute
    python sft.py --help                            # every option, explained
    python sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --no-from_scratch --dataset my.jsonl --learning_rate 2e-5
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
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import tyro
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import common


@dataclass
class Config:
    # model
    model_name_or_path: str = "data/toy/base_model"
    """model to start from: Hugging Face hub id or local directory (the toy default holds a config and tokenizer
    only)"""
    from_scratch: bool = True
    """initialise the weights randomly from the config of model_name_or_path (the toy). It is an error to combine it
    with a checkpoint that holds weights: pass --no-from_scratch to fine-tune a real model"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
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
    """dropout on the LoRA branch"""
    lora_target_modules: tuple[str, ...] = ()
    """module names to adapt (e.g. q_proj v_proj); default: every linear layer of the transformer blocks"""
    merge_lora: bool = False
    """also write the adapter merged into the base model: a full checkpoint that plain transformers loads (the
    adapter goes to output_dir/adapter)"""
    # data
    dataset: str = "data/toy/sft_train.jsonl"
    """training data: a .jsonl / .json / .parquet / .csv file, a datasets.save_to_disk folder or a hub dataset id
    (formats in the module docstring)"""
    dataset_split: str = "train"
    """split of a hub dataset or save_to_disk folder with several splits"""
    eval_dataset: str = "auto"
    """held-out data for eval loss / perplexity and the prompts of sample generations (same sources and formats);
    "auto" = the toy's sft_eval.jsonl when training on the toy, else none (see --eval_split); "none" to skip"""
    eval_dataset_split: str = "test"
    """split of a hub eval dataset or save_to_disk folder with several splits"""
    eval_split: float = 0.0
    """hold out this fraction of the training rows (seeded) as eval data when no eval dataset is given"""
    max_length: int = 64
    """longest sequence, prompt + completion (tokens); see `truncation`"""
    truncation: Literal["truncate", "drop"] = "truncate"
    """over-long samples: cut them at max_length (the completion then has no EOS) or drop them; either is counted"""
    completion_only_loss: bool = True
    """prompt-completion rows: train on the completion only (prompt tokens masked); False trains on everything"""
    assistant_only_loss: bool = True
    """conversations ({"messages"}): train on every assistant turn only; False trains on the whole conversation"""
    # training
    num_epochs: float = 2.0
    """passes over the training data (fractions allowed)"""
    max_steps: int | None = None
    """stop after this many optimiser steps (overrides num_epochs; the LR schedule spans them)"""
    per_device_batch_size: int = 64
    """sequences per micro-batch on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimiser step; global batch = per_device_batch_size * this * world size"""
    learning_rate: float = 2e-3
    """peak AdamW learning rate (the toy trains from scratch; use ~1e-5 to 2e-5 for pretrained models)"""
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
    """seed of initialisation, data order and sampling"""
    # evaluation
    eval_every: int = 100
    """evaluate every this many optimiser steps (and at the end)"""
    num_eval_generations: int = 128
    """completions sampled from eval prompts at each evaluation (diagnostics of the sampling space; 0 = none; a
    multiple of the number of processes)"""
    max_new_tokens: int = 24
    """maximum completion length when sampling (tokens)"""
    temperature: float = 1.0
    """sampling temperature of the evaluation generations"""
    top_p: float = 1.0
    """nucleus sampling threshold of the evaluation generations"""
    eval_reward_fn: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """module:function or path/to/file.py:function scoring eval samples (TRL's reward-function signature; repeat the
    option for several); default: the toy's gold reward when training on the toy, else none; "none" to disable"""
    # checkpoints
    output_dir: str = "runs/sft"
    """where the model (Hugging Face format), eval.json, metrics.jsonl and checkpoints/ are written"""
    save_every: int = 0
    """write a checkpoint for --resume every this many optimiser steps into output_dir/checkpoints (0 = never)"""
    save_total_limit: int = 2
    """checkpoints kept (the newest); older ones are deleted after each save"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir, exactly as if the run had not stopped"""
    # logging
    log_every: int = 20
    """log training metrics every this many optimiser steps"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the `tensorboard` package)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (needs `wandb`)"""

    def __post_init__(self):
        common.check_lora_options(self)
        common.check_options(self, positive=("max_length", "num_epochs", "per_device_batch_size",
                                             "gradient_accumulation_steps", "learning_rate", "max_grad_norm",
                                             "eval_every", "log_every", "max_new_tokens", "save_total_limit"),
                             nonnegative=("weight_decay", "num_eval_generations", "save_every", "temperature"),
                             fractions=("warmup_ratio", "eval_split"), probabilities=("top_p",))
        if self.max_steps is not None and self.max_steps < 1:
            raise common.InputError(f"--max_steps must be >= 1, got {self.max_steps}")


def tokenize_example(row: dict, tokenizer, cfg: Config, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row; labels are -100 where no loss is taken. Prompt and completion are tokenised
    separately (a conversation turn by turn), so the loss mask is exact even where the tokenizer would merge tokens
    across the boundary. Completions end with EOS (the chat template's end of turn for conversations)."""
    prompt, completion = common.parse_completion_row(row, where)
    if prompt is None and isinstance(completion, list):  # a whole conversation
        ids, assistant = common.render_conversation(completion, tokenizer, where)
        trained = assistant if cfg.assistant_only_loss else [1] * len(ids)
        return ids, [t if m else -100 for t, m in zip(ids, trained)]
    if prompt is None:  # language modelling: every token
        ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    prompt_ids = common.render_prompt(prompt, tokenizer, where)[1]
    completion_ids = common.render_completion(prompt, completion, tokenizer, where)
    labels = ([-100] * len(prompt_ids) if cfg.completion_only_loss else prompt_ids) + completion_ids
    return prompt_ids + completion_ids, labels


def build_dataset(rows: list[tuple[str, dict]], tokenizer, cfg: Config) -> tuple[list[tuple[list[int], list[int]]],
                                                                              dict]:
    """Tokenised (input_ids, labels) pairs and counts of the truncation policy."""
    examples, counts = [], {"truncated": 0, "dropped": 0}
    for where, row in rows:
        ids, labels = tokenize_example(row, tokenizer, cfg, where)
        if len(ids) > cfg.max_length:
            if cfg.truncation == "drop" or all(label == -100 for label in labels[1:cfg.max_length]):
                counts["dropped"] += 1
                continue
            ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
            counts["truncated"] += 1
        examples.append((ids, labels))
    if not examples:
        raise common.InputError(f"{rows[0][0].rsplit(':', 1)[0]}: every example was dropped (--max_length "
                                f"{cfg.max_length})")
    return examples, counts


def eval_prompts(rows: list[tuple[str, dict]]) -> list:
    """The distinct prompts of held-out rows (strings or conversations), for sample generations; language-modelling
    rows have none."""
    prompts = {}
    for where, row in rows:
        if "prompt" in row or "messages" in row:
            prompt = common.parse_prompt(row, where)
            prompts[repr(prompt)] = prompt
    return [prompts[k] for k in sorted(prompts)]


def collate(batch, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 where masked and on padding."""
    input_ids = common.right_pad([ids for ids, _ in batch], pad_token_id, device)
    labels = common.right_pad([lab for _, lab in batch], -100, device)
    attention_mask = common.right_pad([[1] * len(ids) for ids, _ in batch], 0, device)
    return input_ids, attention_mask, labels


def token_nll_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over label tokens, number of label tokens) for a right-padded batch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    logprobs = common.logprobs_from_logits(logits, targets.clamp(min=0))
    return -(logprobs * mask).sum(), mask.sum()


def load_model(cfg: Config, device, dtype: torch.dtype):
    tokenizer = common.from_pretrained(AutoTokenizer, cfg.model_name_or_path, "--model_name_or_path",
                                       trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise common.InputError(f"{cfg.model_name_or_path}: tokenizer has no EOS token; the model could never learn "
                                "to stop")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos would mask the EOS labels out of the loss together with the padding, so the model never learns
        # to stop; a dedicated pad token keeps them apart (its embedding is never trained, it is always masked)
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    has_weights = os.path.isdir(cfg.model_name_or_path) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(cfg.model_name_or_path))
    if cfg.from_scratch:
        if not os.path.isdir(cfg.model_name_or_path) or has_weights:
            raise common.InputError(f"--from_scratch would discard the weights of {cfg.model_name_or_path}; "
                                    "pass --no-from_scratch to fine-tune them")
        if cfg.lora_r:
            raise common.InputError("--lora_r with --from_scratch would adapt random weights; LoRA fine-tunes a "
                                    "pretrained model (--no-from_scratch)")
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                 attn_implementation=cfg.attn_implementation).to(dtype)
        print(f"initialising {type(model).__name__} from random weights (--from_scratch) with the config of "
              f"{cfg.model_name_or_path}", flush=True)
    else:
        model = common.from_pretrained(AutoModelForCausalLM, cfg.model_name_or_path, "--model_name_or_path",
                                       trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                       attn_implementation=cfg.attn_implementation)
        common.check_model_kind(model, cfg.model_name_or_path, "--model_name_or_path", "policy")
    common.check_length(model.config, cfg.max_length, "--max_length", cfg.model_name_or_path)
    if len(tokenizer) > model.get_input_embeddings().weight.size(0):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return common.add_lora(model, cfg).to(device), tokenizer


@torch.no_grad()
def evaluate(model, tokenizer, eval_examples, prompts, prompt_ids, cfg: Config, device, amp_dtype, reward_fns, rank,
             world_size):
    """Eval loss / perplexity on held-out data, and the sampling space of completions of held-out prompts."""
    model.eval()
    nll, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for idx in common.rank_batches(len(eval_examples), cfg.per_device_batch_size):
        with common.autocast(device, amp_dtype):  # an empty share runs on a dummy example, counted as nothing
            s, n = token_nll_sum(model, *collate([eval_examples[i] for i in idx or [0]], tokenizer.pad_token_id,
                                                 device))
        if idx:
            nll, count = nll + s.float(), count + n
    nll, count = common.all_reduce_sum(nll), common.all_reduce_sum(count)
    metrics = {"eval/loss": (nll / count).item(), "eval/perplexity": math.exp(min(20.0, (nll / count).item()))}

    # completions of held-out prompts: each rank samples its share; all ranks decode the same number of steps
    n = cfg.num_eval_generations // world_size  # per rank
    if prompts and n > 0:
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 + rank)
        picked = [(rank * n + i) % len(prompts) for i in range(n)]
        batch_prompts = [prompts[j] for j in picked]
        query, query_mask = common.left_pad([prompt_ids[j] for j in picked], tokenizer.pad_token_id, device)
        with common.autocast(device, amp_dtype):
            responses, response_mask = common.generate(
                model, query, query_mask, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                cfg.temperature, 0, cfg.top_p, gen, sync_ranks=True)
            seq = torch.cat([query, responses], 1)
            seq_mask = torch.cat([query_mask, response_mask], 1)
            logits = common.response_logits(model, seq, seq_mask, query.size(1))  # (B, R, V)
        diag = common.sampling_diagnostics(logits, responses, response_mask, cfg.temperature)
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        sums = {f"eval/{k}".replace("eval/sampling/", "sampling/"): v * n for k, v in diag.items()}  # over samples
        sums["eos_rate"] = (responses == tokenizer.eos_token_id).any(1).float().sum().item()
        sums["eval/response_length"] = response_mask.sum().item()
        if reward_fns:
            _, per_fn = common.score_with_fns(reward_fns, batch_prompts, completions)
            for name, values in per_fn.items():
                scored = [v for v in values if v is not None]
                sums.update({f"{name}_sum": sum(scored), f"{name}_sq": sum(v * v for v in scored),
                             f"{name}_count": len(scored)})
        names = sorted(sums)
        totals = dict(zip(names, common.all_reduce_sum(torch.tensor([sums[k] for k in names], device=device,
                                                                    dtype=torch.float64)).tolist()))
        total = n * world_size
        for k in names:
            if not k.endswith(("_sum", "_sq", "_count")):
                metrics[k] = totals[k] / total
        for name in reward_fns or {}:
            scored = totals[f"{name}_count"]
            mean = totals[f"{name}_sum"] / scored if scored else math.nan
            metrics[f"{name}_mean"] = mean
            metrics[f"{name}_std"] = math.sqrt(max(0.0, totals[f"{name}_sq"] / scored - mean ** 2)) if scored \
                else math.nan
            metrics[f"{name}_unscored"] = int(total - scored)
        metrics["distinct_completions"] = common.distinct_fraction(completions)  # of rank 0's samples
        metrics["num_samples"] = total
        metrics["samples"] = [common.prompt_text(p) + " |" + c for p, c in zip(batch_prompts[:4], completions[:4])]
    model.train()
    return metrics


def main(cfg: Config) -> dict:
    rank, world_size, device = common.setup_distributed()
    common.set_seed(cfg.seed)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)

    # 1. model and data
    rows = common.load_rows(cfg.dataset, "--dataset", cfg.dataset_split)
    eval_path = common.eval_data_path(cfg.eval_dataset, cfg.dataset, "data/toy/sft_eval.jsonl")
    eval_rows = common.load_rows(eval_path, "--eval_dataset", cfg.eval_dataset_split) if eval_path else []
    if not eval_rows and cfg.eval_split > 0:
        rows, eval_rows = common.split_rows(rows, cfg.eval_split, cfg.seed)
        eval_path = f"{cfg.eval_split:.0%} of {cfg.dataset}"
    reward_fns = common.eval_reward_fns(cfg.eval_reward_fn, cfg.dataset)
    common.check_attn_implementation(cfg.attn_implementation)
    model, tokenizer = load_model(cfg, device, common.weight_dtypes(cfg.dtype, device)[0])
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples, counts = build_dataset(rows, tokenizer, cfg)
    eval_examples = build_dataset(eval_rows, tokenizer, cfg)[0] if eval_rows else []
    prompts = eval_prompts(eval_rows)
    prompt_ids = [common.render_prompt(p, tokenizer)[1] for p in prompts]
    if prompts:
        common.check_length(model.config, max(map(len, prompt_ids)) + cfg.max_new_tokens,
                            "the longest eval prompt + --max_new_tokens", cfg.model_name_or_path)
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise common.InputError(f"{cfg.dataset}: {len(examples)} examples is fewer than one global batch "
                                f"({global_batch} = --per_device_batch_size x --gradient_accumulation_steps x "
                                f"{world_size} processes)")
    total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * steps_per_epoch))
    if rank == 0:
        print(f"model {cfg.model_name_or_path} ({n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained, "
              f"{next(model.parameters()).dtype}) | data {cfg.dataset}: "
              f"{len(examples)} examples (truncated {counts['truncated']}, dropped {counts['dropped']}, max_length "
              f"{cfg.max_length}) | eval {eval_path or 'none'}: {len(eval_examples)} examples, {len(prompts)} prompts "
              f"| eval reward {', '.join(reward_fns) or 'none'} | {total_steps} steps of {global_batch} | world size "
              f"{world_size}", flush=True)
    common.prepare_output_dir(cfg.output_dir, rank)
    resume_from = common.resume_checkpoint(cfg.output_dir, cfg.resume)
    common.check_disk_space(cfg.output_dir, common.checkpoint_bytes([model], model, cfg.save_every),
                            "the final model and a checkpoint")
    model = common.shard_model(model, amp_dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = common.lr_scheduler(optimizer, cfg.lr_scheduler, total_steps, cfg.warmup_ratio)
    batches = common.BatchOrder(len(examples), global_batch, cfg.seed)  # same on every rank: the global batch
    tokens_seen, train_time, wall_time, start_step = 0, 0.0, 0.0, 0
    if resume_from is not None:
        state = common.load_state(resume_from, {"model": model}, [optimizer], {}, cfg)
        start_step = state["step"]
        batches.load_state_dict(state["state"]["batches"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        tokens_seen, train_time, wall_time = (state["state"][k] for k in ("tokens_seen", "train_time", "wall_time"))
        if rank == 0:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    logger = common.MetricsLogger(cfg.output_dir, rank, cfg.tensorboard, cfg.wandb_project, asdict(cfg), resume_from)

    # 2. training loop
    model.train()
    t_start, metrics = time.time() - wall_time, {}
    for step in range(start_step + 1, total_steps + 1):
        # this rank's micro-batches; the loss is normalised by the label tokens of the whole global batch
        micro_batches = [collate([examples[j] for j in mb], tokenizer.pad_token_id, device)
                         for mb in common.micro_batches(batches.next(), cfg.per_device_batch_size)]
        local_tokens = sum((lab[:, 1:] != -100).sum() for _, _, lab in micro_batches)
        global_tokens = common.all_reduce_sum(torch.as_tensor(local_tokens, device=device).float())
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for input_ids, attention_mask, labels in micro_batches:
            with common.autocast(device, amp_dtype):
                nll, _ = token_nll_sum(model, input_ids, attention_mask, labels)
            # FSDP averages gradients over ranks, hence * world_size: the result is d(sum nll / global_tokens)
            (nll / global_tokens * world_size).backward()
            loss_sum += nll.detach().float()
            tokens_seen += int(attention_mask.sum()) * world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - t0

        if step % cfg.log_every == 0 or step == total_steps:
            loss = (common.all_reduce_sum(loss_sum) / global_tokens).item()
            logger.log(step, {"loss": loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                              "epoch": step / steps_per_epoch, "tokens_per_s": tokens_seen / max(1e-9, train_time)},
                       ("loss", "lr", "epoch", "tokens_per_s"))
        if eval_examples and (step % cfg.eval_every == 0 or step == total_steps):
            metrics = evaluate(model, tokenizer, eval_examples, prompts, prompt_ids, cfg, device, amp_dtype,
                               reward_fns, rank, world_size)
            samples = metrics.pop("samples", [])
            logger.log(step, metrics, ("eval/loss", "eos_rate", *[f"{n}_mean" for n in reward_fns],
                                       "sampling/entropy", "distinct_completions"))
            if rank == 0:
                for s in samples:
                    print("   sample:", s)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            common.save_state(cfg.output_dir, step, {"model": model}, [optimizer], {}, {
                "batches": batches.state_dict(), "scheduler": scheduler.state_dict(), "tokens_seen": tokens_seen,
                "train_time": train_time, "wall_time": time.time() - t_start}, logger, cfg, cfg.save_total_limit)

    # 3. save the model with its evaluation beside it
    final = {**metrics, "train_loss": loss, "train_steps": total_steps, "tokens_per_s": tokens_seen / train_time,
             "wall_time_s": time.time() - t_start, "num_parameters": n_params, **counts}
    common.save_model(model, tokenizer, cfg.output_dir, final, logger, merge_lora=cfg.merge_lora)
    if rank == 0:
        shown = [f"{k} {final[k]:.4f}" for k in ("eval/loss", "eos_rate", *[f"{n}_mean" for n in reward_fns])
                 if isinstance(final.get(k), float)]
        print(f"saved {cfg.output_dir} | " + " | ".join(shown or [f"train loss {loss:.4f}"]), flush=True)
    logger.close()
    common.cleanup_distributed()
    return final


if __name__ == "__main__":
    common.cli(main, Config)
