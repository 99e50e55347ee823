"""Small pieces shared by sft.py, reward_model.py, ppo.py and dpo.py.

Only what is identical across the scripts and not specific to one algorithm lives here: sampling, log-prob gathering,
masked statistics, the reward/value head read-out, data loading with clear errors, logging, distributed setup.
Every function is pure where possible and checked against a naive computation in tests/test_common.py.
"""

import base64
import ctypes
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
import warnings

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Setup: seeding, device, distributed
# ---------------------------------------------------------------------------------------------------------------------
class InputError(ValueError):
    """A bad input or option. The message names the file and line, the field or the --option, and what to do; the
    scripts print it as one line (`error: ...`, exit status 2) instead of a traceback."""


def cli(main, config_class) -> None:
    """Entry point of every script: parse the options into config_class (tyro; a bad option value is reported by
    tyro with its name), then run main(config).

    `--help` opens with the script's docstring and shows the options in the groups that the `# group` comment lines of
    the config class mark (model, data, training, ...). An InputError ends the run with its one-line message and exit
    status 2. In a multi-process run a rank that fails (any exception) prints its rank and exits at once with
    os._exit, without the interpreter's teardown: torchrun then stops the other ranks, instead of leaving them
    waiting forever in a collective for the dead one."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if distributed else ""
    try:
        main(parse_grouped(config_class))
    except InputError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        if distributed:
            os._exit(2)
        sys.exit(2)
    except BaseException as e:
        if not distributed or isinstance(e, SystemExit) and e.code in (0, None):
            raise
        traceback.print_exc()
        print(f"{prefix}failed; ending this process so that torchrun stops the other ranks", file=sys.stderr,
              flush=True)
        os._exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)


def parse_grouped(config_class, args: list[str] | None = None):
    """tyro.cli for a flat config dataclass, with the options shown in groups: each `# name` comment line in the
    class body starts a group. The groups exist only for --help (tyro groups nested dataclasses; their prefixes are
    omitted), so the options keep their names and the script keeps one flat config."""
    import dataclasses
    import inspect
    import re
    from typing import Annotated

    import tyro

    group, group_of = "options", {}
    for line in inspect.getsource(config_class).splitlines():
        if m := re.match(r"    # (\w[\w ]*)$", line):
            group = m.group(1)
        elif m := re.match(r"    (\w+): ", line):
            group_of[m.group(1)] = group
    fields = dataclasses.fields(config_class)
    nested = []
    for name in dict.fromkeys(group_of.get(f.name, "options") for f in fields):
        members = [f for f in fields if group_of.get(f.name, "options") == name]
        specs = [(f.name, Annotated[f.type, tyro.conf.arg(help=" ".join(tyro._docstrings.get_field_docstring(
            config_class, f.name, ()).split()))], dataclasses.field(default=f.default)) for f in members]
        group_class = dataclasses.make_dataclass(name.replace(" ", "_"), specs)
        nested.append((name.replace(" ", "_"), group_class, dataclasses.field(default_factory=group_class)))
    parsed = tyro.cli(dataclasses.make_dataclass(config_class.__name__, nested), args=args,
                      description=inspect.cleandoc(sys.modules[config_class.__module__].__doc__ or ""),
                      config=(tyro.conf.OmitArgPrefixes,))
    return config_class(**{k: v for name, *_ in nested for k, v in vars(getattr(parsed, name)).items()})


def check_options(config, positive=(), nonnegative=(), fractions=(), probabilities=()) -> None:
    """Refuse option values that make no sense, naming the option: positive (> 0), nonnegative (>= 0), fractions
    (in [0, 1]) and probabilities (in (0, 1]). NaN fails every check."""
    def bad(name, need):
        raise InputError(f"--{name} must be {need}, got {getattr(config, name)!r}")

    for name in positive:
        if not getattr(config, name) > 0:
            bad(name, "> 0")
    for name in nonnegative:
        if not getattr(config, name) >= 0:
            bad(name, ">= 0")
    for name in fractions:
        if not 0 <= getattr(config, name) <= 1:
            bad(name, "between 0 and 1")
    for name in probabilities:
        if not 0 < getattr(config, name) <= 1:
            bad(name, "in (0, 1]")


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


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    """Tear the process group down once every rank is done with it. Without the barrier a rank that finishes first
    destroys the group while rank 0 is still saving, and the other rank aborts (`terminate called without an active
    exception`): a run that trained correctly would exit non-zero."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def autocast_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA when asked (and supported); full fp32 on CPU, where bf16 matmuls are slow."""
    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def weight_dtypes(dtype: str, device: torch.device, frozen_dtype: str = "auto") -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the trained models' weights, dtype of the frozen models) for --dtype and --frozen_dtype.

    dtype auto: trained weights in fp32 (the optimiser's master weights; the compute runs in bf16 through autocast or
    FSDP2's mixed precision), frozen models (reference, reward model) in bf16 on a GPU that supports it, which halves
    their memory at no cost to training; everything fp32 on CPU. bfloat16: every weight in bf16, AdamW states too
    (half the memory, less precise updates). float32: everything in fp32. frozen_dtype, unless auto, sets the frozen
    models' dtype alone (e.g. bf16 frozen models on CPU)."""
    names = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    trained = names.get(dtype, torch.float32)
    if frozen_dtype != "auto":
        return trained, names[frozen_dtype]
    if dtype != "auto":
        return trained, trained
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return trained, torch.bfloat16 if bf16_gpu else torch.float32


def check_attn_implementation(name: str) -> None:
    """flash_attention_2 needs the flash-attn package; say so before any model loads."""
    import importlib.util

    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InputError("--attn_implementation flash_attention_2 needs the `flash-attn` package (pip install "
                         "flash-attn, on CUDA); or use sdpa")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in a single process). Returns a new tensor, differentiable-free."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def rank_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def micro_batches(global_batch: list[int], per_device_batch_size: int) -> list[list[int]]:
    """This rank's strided share of a global batch of indices, in micro-batches of per_device_batch_size (a global
    batch is per_device_batch_size x accumulation steps x world size, so every rank gets the same number)."""
    rank, world = rank_info()
    local = global_batch[rank::world]
    return [local[i:i + per_device_batch_size] for i in range(0, len(local), per_device_batch_size)]


def rank_batches(n: int, batch_size: int) -> list[list[int]]:
    """This rank's strided share of the items 0 ... n - 1 (an evaluation), in batches of at most batch_size, with the
    same number of batches on every rank: FSDP needs every rank in every forward pass, so a rank whose share runs out
    gets empty batches, for which it runs the forward on any item and discards the result."""
    rank, world = rank_info()
    share = list(range(n))[rank::world]
    n_batches = math.ceil(math.ceil(n / world) / batch_size)
    return [share[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: shard every transformer block, then the root, across all ranks. No-op in a single process.

    Parameters become DTensors; forward/backward all-gather them block by block. Gradients are averaged over ranks
    by the reduce-scatter, so scripts scale their per-rank loss by world_size where they want a global sum.
    compute_dtype (bf16 for fp32 trained weights on CUDA): FSDP2's MixedPrecisionPolicy gathers the parameters in
    that dtype for the forward and backward (half the all-gather traffic) and reduces gradients in fp32, while the
    sharded fp32 parameters stay the optimiser's master weights."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if compute_dtype is not None and any(p.dtype == torch.float32 for p in model.parameters()):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):  # the list of decoder blocks in every HF causal LM
            for block in module:
                fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF needs deterministic forward passes: rollout log-probs must equal the training forward's (ratio = 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Optimisation: the learning-rate schedule, mixed-precision compute
# ---------------------------------------------------------------------------------------------------------------------
def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """The factor on the peak learning rate at optimiser step `step` of `total`: linear warmup over `warmup` steps,
    then cosine or linear decay to 0 over the rest, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(optimizer, kind: str, total_steps: int, warmup_ratio: float):
    """LambdaLR of lr_multiplier over total_steps, the first warmup_ratio of them in warmup."""
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, warmup, kind))


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision compute in dtype (autocast_dtype), or nothing when None (CPU, --no-bf16)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def load_jsonl(path: str, required: tuple[str, ...] = (), alternatives: tuple[tuple[str, ...], ...] = (),
               optional: tuple[str, ...] = ()) -> list:
    """Rows of a JSON-lines file. Errors name the file, the line and the field.

    required: fields every row must have. alternatives: groups of fields of which a row must hold all of at least one
    group (e.g. (("prompt", "completion"), ("messages",))). optional: fields a row may have; a field that looks like a
    misspelling of any of these is an error. Blank lines at the end are ignored; a blank line between
    rows is an error (JSON Lines allows none), so that row i is always line i + 1 of the file in every later error."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    rows, blank_line = [], None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1});"
                                 " save the file as UTF-8") from None
            if not line.strip():
                blank_line = blank_line or line_no
                continue
            if blank_line is not None:
                raise InputError(f"{path}:{blank_line}: blank line between JSON rows")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            check_field_names(row, {*required, *optional, *(k for group in alternatives for k in group)},
                              f"{path}:{line_no}")
            for field in required:
                if field not in row:
                    raise InputError(f"{path}:{line_no}: missing field '{field}'")
            if alternatives and not any(all(k in row for k in group) for group in alternatives):
                wanted = " or ".join("{" + ", ".join(repr(k) for k in g) + "}" for g in alternatives)
                raise InputError(f"{path}:{line_no}: missing fields: expected {wanted}, got keys {sorted(row)}")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: file is empty (no JSON lines)")
    return rows


def check_field_names(row: dict, known: set[str], where: str) -> None:
    """Refuse a field that looks like a misspelt expected one ('promt' next to 'chosen' and 'rejected'): the row would
    otherwise be read as another format or with that field empty. Other extra fields (ids, metadata) are fine."""
    for key in row:
        if key not in known:
            close = difflib.get_close_matches(key, [k for k in known if k not in row], n=1, cutoff=0.75)
            if close:
                raise InputError(f"{where}: unknown field '{key}'; did you mean '{close[0]}'?")


def check_messages(messages, where: str, field: str) -> None:
    """A conversation must be a non-empty list of {"role": str, "content": str} objects."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InputError(f"{where}: field '{field}' must be a non-empty list of {{\"role\": str, \"content\": str}} "
                         f"messages, got {json.dumps(messages)[:120]}")


def require_checkpoint(path: str, script: str, option: str = "--model_name_or_path") -> None:
    """Clear error when a default input of a later stage is missing (e.g. runs/sft before reward_model.py)."""
    if path.startswith("runs/") and not os.path.isdir(path):
        raise InputError(f"{option} {path}: not found; run `python {script}` first (or pass another path)")


def is_toy_data(path: str | None) -> bool:
    """Whether a data path is one of the toy task's files (data/toy/): only then are toy evaluation files, the toy's
    gold reward and toy reward models used by default."""
    toy_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy")
    return path is not None and os.path.abspath(path).startswith(toy_dir + os.sep)


def _import_datasets(path: str, option: str):
    try:
        import datasets  # optional dependency: parquet, CSV, save_to_disk folders and hub datasets
    except ImportError:
        raise InputError(f"{option} {path}: reading this needs the `datasets` package (pip install datasets); JSON "
                         "lines files need nothing") from None
    return datasets


def load_rows(path: str, option: str = "--dataset", split: str = "train") -> list[tuple[str, dict]]:
    """(where, row) of every example of a dataset, where names the example in errors.

    JSON lines (.jsonl; where = file:line) and JSON (.json: an array of objects, or JSON lines) are read directly;
    parquet, CSV and Arrow files, folders written by `datasets.save_to_disk` and hub dataset ids (with `split`) go
    through the `datasets` library (where = path[index])."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and ext in (".jsonl", ".json"):
        if ext == ".json":
            with open(path, "rb") as f:
                head = f.read(1 << 16).lstrip()
            if head.startswith(b"["):
                try:
                    with open(path, encoding="utf-8") as f:
                        data = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise InputError(f"{path}: not a valid JSON array ({e})") from None
                if not data:
                    raise InputError(f"{path}: empty JSON array")
                for i, row in enumerate(data):
                    if not isinstance(row, dict):
                        raise InputError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
                return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
        return [(f"{path}:{i + 1}", row) for i, row in enumerate(load_jsonl(path))]
    if os.path.isfile(path) and ext in (".parquet", ".csv", ".arrow"):
        datasets = _import_datasets(path, option)
        data = datasets.load_dataset({".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}[ext],
                                     data_files=path, split="train")
    elif os.path.isdir(path):
        datasets = _import_datasets(path, option)
        try:
            data = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise InputError(f"{option} {path}: a directory, but not one written by datasets' save_to_disk") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise InputError(f"{option} {path}: no split '{split}' (it has {sorted(data)}); choose one with the "
                                 "split option")
            data = data[split]
    elif os.path.exists(path):
        raise InputError(f"{option} {path}: unknown file type '{ext}'; use .jsonl, .json, .parquet, .csv or .arrow")
    elif path.startswith(("/", ".", "~")) or ext or path.count("/") != 1:
        raise InputError(f"{option} {path}: no such file or directory")
    else:
        datasets = _import_datasets(path, option)
        try:
            data = datasets.load_dataset(path, split=split)
        except Exception as e:  # offline, unknown id, unknown split: the library's message says which
            raise InputError(f"{option} {path}: not a local file and cannot be loaded from the Hugging Face hub "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})"
                             ) from None
    if len(data) == 0:
        raise InputError(f"{option} {path}: no rows")
    # columns that a row does not have come back as None from Arrow: drop them, so they read as absent
    return [(f"{path}[{i}]", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(data)]


def eval_data_path(option_value: str, train_path: str, toy_default: str) -> str | None:
    """Evaluation data follows the training data: "auto" is the toy's file only when training on the toy, otherwise
    nothing (a real run never evaluates on toy data by accident); "none" disables it."""
    if option_value == "auto":
        return toy_default if is_toy_data(train_path) else None
    return None if option_value == "none" else option_value


def eval_reward_fns(specs, data_path: str, training_fns: dict | None = None) -> dict:
    """The reward functions that score evaluation samples: those given, else the training ones, else the toy's gold
    reward when training on the toy; ("none",) disables them."""
    if tuple(specs) == ("none",):
        return {}
    if specs:
        return load_reward_fns(specs, option="--eval_reward_fn")
    if training_fns:
        return training_fns
    return load_reward_fns(["toy_task:gold_reward"]) if is_toy_data(data_path) else {}


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the rows held out for evaluation (at least one)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise InputError(f"--eval_split {fraction}: would leave no training rows out of {len(rows)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# The formats of TRL's datasets (https://huggingface.co/docs/trl/dataset_formats), standard (strings) or
# conversational (lists of {"role", "content"} messages). A prompt is a string or a list of messages.
FORMATS = {
    "prompt-only": "{prompt: str | messages} or {messages: [...]}",
    "language modeling": "{text: str} or {messages: [...]}",
    "prompt-completion": "{prompt: str | messages, completion: str | [assistant message]}",
    "preference": "{prompt?: str | messages, chosen: str | messages, rejected: str | messages}",
    "ranking": "{prompt: str | messages, completions: [best, ..., worst]}",
}


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}' must be a string or a list of messages, got "
                         f"{type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: field '{field}' is empty")
    return value


def _assistant(value, where: str, field: str) -> list:
    """A conversational completion: one or more messages, the last from the assistant."""
    check_messages(value, where, field)
    if value[-1]["role"] != "assistant" or not value[-1]["content"].strip():
        raise InputError(f"{where}: field '{field}' must end with a non-empty assistant message")
    return value


def _check_known(row: dict, known: set, where: str) -> None:
    check_field_names(row, known | {"prompt", "completion", "chosen", "rejected", "messages", "text",
                                    "completions"}, where)


def parse_prompt(row: dict, where: str):
    """Prompt-only rows: {"prompt": str | messages}, or {"messages": [...]} (the conversation up to, not including,
    a final assistant message). Returns the prompt (a string or a list of messages)."""
    _check_known(row, set(), where)
    if "prompt" in row:
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], where, "prompt")
            return row["prompt"]
        return _text(row["prompt"], where, "prompt")
    if "messages" in row:
        check_messages(row["messages"], where, "messages")
        messages = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
        if not messages:
            raise InputError(f"{where}: field 'messages' holds no prompt before its assistant message")
        return messages
    raise InputError(f"{where}: expected a prompt-only row {FORMATS['prompt-only']}, got keys {sorted(row)}")


def parse_completion_row(row: dict, where: str):
    """SFT rows: (prompt or None, completion). {"text"}: language modeling, no prompt; {"prompt", "completion"} with
    strings, or conversational (prompt messages, completion ending with an assistant message); {"messages"}: a whole
    conversation (prompt None, completion the message list)."""
    _check_known(row, set(), where)
    if "messages" in row:
        check_messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise InputError(f"{where}: field 'messages' holds no assistant message to train on")
        return None, row["messages"]
    if "text" in row:
        return None, _text(row["text"], where, "text")
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], where, "prompt")
            return row["prompt"], _assistant(row["completion"], where, "completion")
        return _text(row["prompt"], where, "prompt") if row["prompt"] else "", _text(row["completion"], where,
                                                                                      "completion")
    raise InputError(f"{where}: expected {FORMATS['prompt-completion']} or {FORMATS['language modeling']}, got keys "
                     f"{sorted(row)}")


def split_implicit_prompt(chosen, rejected, where: str):
    """(prompt, chosen, rejected) of an implicit-prompt pair: two full texts or two full conversations.

    Texts: the longest common prefix, cut back to its last whitespace so that no word is split, and without trailing
    whitespace; the responses keep their leading space ("the movie was  good ." -> "the movie was", "  good ."). Message
    lists: the shared leading messages; each side's remaining messages are its completion (ending with an assistant
    message)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        cut = max((i for i in range(n) if chosen[i].isspace()), default=0)
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1
        return chosen[:cut], chosen[cut:], rejected[cut:]
    n = min(n, len(chosen) - 1, len(rejected) - 1)
    if n == 0:
        raise InputError(f"{where}: 'chosen' and 'rejected' share no leading (prompt) messages")
    return chosen[:n], chosen[n:], rejected[n:]


def parse_preference_row(row: dict, where: str):
    """Preference rows: (prompt, chosen, rejected), with an explicit prompt or an implicit one (the shared beginning
    of chosen and rejected). Strings, or conversational (the completions then end with an assistant message; a
    string completion next to a conversational prompt is taken as the assistant message's content)."""
    _check_known(row, {"margin"}, where)
    for field in ("chosen", "rejected"):
        if field not in row:
            raise InputError(f"{where}: missing field '{field}' (expected {FORMATS['preference']})")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:
        if isinstance(chosen, list) and isinstance(rejected, list):
            check_messages(chosen, where, "chosen")
            check_messages(rejected, where, "rejected")
        elif not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise InputError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
    else:
        prompt = row["prompt"]
    if isinstance(prompt, list):
        check_messages(prompt, where, "prompt")
        as_messages = lambda v: [{"role": "assistant", "content": v}] if isinstance(v, str) else v  # noqa: E731
        return prompt, _assistant(as_messages(chosen), where, "chosen"), _assistant(as_messages(rejected), where,
                                                                                    "rejected")
    if not isinstance(prompt, str):
        raise InputError(f"{where}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    return prompt, _text(chosen, where, "chosen"), _text(rejected, where, "rejected")


def parse_ranking_row(row: dict, where: str):
    """Ranking rows {"prompt", "completions": [best, ..., worst]}: (prompt, completions)."""
    _check_known(row, set(), where)
    if "prompt" not in row or "completions" not in row:
        raise InputError(f"{where}: expected {FORMATS['ranking']}, got keys {sorted(row)}")
    prompt, completions = row["prompt"], row["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise InputError(f"{where}: field 'completions' must be a list of at least 2 completions, best first")
    if isinstance(prompt, list):
        check_messages(prompt, where, "prompt")
        return prompt, [_assistant([{"role": "assistant", "content": c}] if isinstance(c, str) else c, where,
                                   f"completions[{k}]") for k, c in enumerate(completions)]
    return _text(prompt, where, "prompt"), [_text(c, where, f"completions[{k}]") for k, c in enumerate(completions)]


def _require_template(tokenizer, where: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(f"{where}: conversational row, but the tokenizer has no chat template (set one, or use "
                         "string fields)")


def render_prompt(prompt, tokenizer, where: str = "") -> tuple[str, list[int]]:
    """(text, token ids) of a prompt. A string gets the tokenizer's special tokens (e.g. BOS); a conversation is
    rendered by the chat template with the generation prompt (which already holds any special tokens)."""
    if isinstance(prompt, str):
        return prompt, tokenizer(prompt)["input_ids"]
    _require_template(tokenizer, where)
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def render_completion(prompt, completion, tokenizer, where: str = "") -> list[int]:
    """Token ids of a completion after its prompt, ending with EOS. A string completion is tokenised without special
    tokens and EOS appended. A conversational one is what the chat template renders after the prompt (the assistant
    message with the template's own end-of-turn text, as TRL does), EOS appended unless the rendering ends with it.
    Prompt and completion are tokenised separately, so the completion mask is exact."""
    if isinstance(completion, str):
        return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    _require_template(tokenizer, where)
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise InputError(f"{where}: the chat template does not render the conversation as prompt + completion")
    ids = tokenizer(full[len(prompt_text):].rstrip(), add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def render_conversation(messages: list, tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a whole conversation: the mask is 1 on the tokens of every assistant turn (its
    content and end-of-turn text, as the chat template renders them after the generation prompt), 0 elsewhere.
    Each turn is rendered as the template renders the conversation up to it, so the pieces add up to the template's
    rendering of the whole conversation; the last assistant turn ends with EOS."""
    _require_template(tokenizer, where)
    ids, mask, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False) \
                if i else tokenizer.apply_chat_template([], add_generation_prompt=True, tokenize=False)
            upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise InputError(f"{where}: the chat template does not render the conversation turn by turn")
            prefix = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
            turn = tokenizer(upto[len(before):].rstrip(), add_special_tokens=False)["input_ids"]
            if i == max(j for j, m in enumerate(messages) if m["role"] == "assistant") and \
                    (not turn or turn[-1] != tokenizer.eos_token_id):
                turn = turn + [tokenizer.eos_token_id]
            ids += prefix + turn
            mask += [0] * len(prefix) + [1] * len(turn)
            done = upto[:len(before)] + upto[len(before):].rstrip()
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Saving: the final model (Hugging Face format), training checkpoints (torch.distributed.checkpoint) and exact resume
#
# output_dir/                       the final model: config.json, model.safetensors, tokenizer files, eval.json
#   metrics.jsonl                   one JSON object per logged step
#   checkpoints/step_N/             for --resume: model(s) and optimiser(s) as torch.distributed.checkpoint shards
#                                   (every rank writes its own), trainer_state.json (step, data position, scheduler,
#                                   counters ...), rank{r}.json (every random generator of rank r), metrics.jsonl
#                                   (the log up to step N, so that a resumed run's log has each step exactly once)
# Everything is written under a temporary name and renamed into place, so a kill at any moment leaves the previous
# state complete; the next run removes what an interrupted save left behind (prepare_output_dir).
# ---------------------------------------------------------------------------------------------------------------------
RUN_FILES = ("metrics.jsonl", ".metrics.jsonl.incoming", "checkpoints", "tensorboard")  # kept across model saves


def write_json_atomic(path: str, obj) -> None:
    """Strict JSON (NaN and infinity become null), written to a temporary file, flushed to disk, then renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def strict_json(obj):
    """obj with every NaN / infinity replaced by None (JSON has no NaN; strict parsers reject it) and tensors and
    numpy scalars turned into Python numbers."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if torch.is_tensor(obj) or isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _saving_paths(out_dir: str) -> tuple[str, str]:
    """The sibling directories a save of out_dir writes into (named after it, so runs sharing a parent never touch
    each other's): the new model while it is written, and (without an atomic exchange) the old one while swapped."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.saving"), os.path.join(parent, f".{name}.old")


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE): there is no moment at which b is missing.
    False where the system cannot (then the caller falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _carry_run_files(src: str, dst: str) -> None:
    """Move the run's own files (log, checkpoints) from the directory holding the previous model into the new one."""
    for name in os.listdir(src):
        ours = name in RUN_FILES or name.startswith("events.out.tfevents")
        if ours and not os.path.exists(os.path.join(dst, name)):
            os.rename(os.path.join(src, name), os.path.join(dst, name))


def prepare_output_dir(output_dir: str, rank: int = 0) -> None:
    """Before any work: finish or undo what an interrupted save left (the new model is kept only if it was complete),
    remove half-written checkpoints, and make sure output_dir can be written, so that a run never discovers after
    hours of training that it cannot save."""
    if rank == 0:
        saving, old = _saving_paths(output_dir)
        if os.path.isdir(old):  # killed between the two renames of the fallback swap
            if not os.path.exists(output_dir):
                os.rename(old, output_dir)
            else:
                _carry_run_files(old, output_dir)
                shutil.rmtree(old)
        if os.path.isdir(saving):  # killed while writing the new model, or just after the swap
            if os.path.isdir(output_dir):
                _carry_run_files(saving, output_dir)
            shutil.rmtree(saving)
        ckpt_root = os.path.join(output_dir, "checkpoints")
        if os.path.isdir(ckpt_root):
            for name in os.listdir(ckpt_root):
                if name.startswith(".tmp_"):
                    shutil.rmtree(os.path.join(ckpt_root, name))
        try:
            os.makedirs(output_dir, exist_ok=True)
            probe = os.path.join(output_dir, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise InputError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e}); choose another "
                             "directory") from None
    barrier()


def check_disk_space(output_dir: str, bytes_needed: int, what: str) -> None:
    """Refuse to start when the disk holding output_dir has less free space than the run will write."""
    free = shutil.disk_usage(output_dir).free
    if free < bytes_needed:
        raise InputError(f"--output_dir {output_dir}: {free / 2**30:.2f} GiB free on its disk, but {what} need "
                         f"about {bytes_needed / 2**30:.2f} GiB; free space, choose another directory, or save less")


def checkpoint_bytes(trained: list[torch.nn.Module], saved: torch.nn.Module, save_every: int) -> int:
    """Bytes a run writes: the final model (fp32 safetensors), plus one training checkpoint (weights and AdamW's two
    moments of every trained model) when checkpointing. DTensor.numel() is the full size under FSDP."""
    final = sum(p.numel() * p.element_size() for p in saved.parameters())
    ckpt = sum(3 * p.numel() * 4 for m in trained for p in m.parameters() if p.requires_grad) if save_every else 0
    return final + ckpt


def _save_adapter(model, out_dir: str, state_dict: dict | None, merge_lora: bool) -> None:
    """A LoRA model: its adapter (adapter_config.json + adapter_model.safetensors, with the embeddings when the run
    added a token), which later stages and peft load onto the base model; with merge_lora, the merged full model in
    out_dir (loads with plain transformers) and the adapter in out_dir/adapter. Built from the (gathered) state dict
    on a CPU copy, so it works the same under FSDP."""
    import peft

    base = model.get_base_model()
    skeleton = peft.get_peft_model(type(base)(base.config), model.peft_config["default"])
    skeleton.load_state_dict(state_dict if state_dict is not None else model.state_dict())
    adapter_dir = os.path.join(out_dir, "adapter") if merge_lora else out_dir
    skeleton.save_pretrained(adapter_dir, safe_serialization=True)
    base.config.save_pretrained(adapter_dir)  # keeps keys such as the reward normalisation beside the adapter
    if merge_lora:
        skeleton.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)


def save_model(model, tokenizer, out_dir: str, eval_results: dict | None = None, logger=None,
               extra_config: dict | None = None, merge_lora: bool = False) -> None:
    """Save the final model as a Hugging Face checkpoint (safetensors) with eval.json beside it, atomically.

    The new model is written into a sibling directory, which is then exchanged with out_dir in one atomic rename, so
    that at every moment out_dir holds a complete model (the previous one or the new one) and an eval.json that
    describes those very weights; the run's log and checkpoints are then moved over. Under FSDP2 the full state dict is
    gathered to rank 0 first (every rank must call this). extra_config: keys added to config.json (e.g. the reward
    normalisation)."""
    state_dict = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for k, v in (extra_config or {}).items():
            setattr(model.config, k, v)
        saving, old = _saving_paths(out_dir)
        shutil.rmtree(saving, ignore_errors=True)
        if is_peft(model):
            _save_adapter(model, saving, state_dict, merge_lora)
        else:
            model.save_pretrained(saving, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(saving)
            if is_peft(model) and merge_lora:
                tokenizer.save_pretrained(os.path.join(saving, "adapter"))
        if eval_results is not None:
            write_json_atomic(os.path.join(saving, "eval.json"), eval_results)
        if logger is not None:
            logger.promote()  # a fresh run's log now replaces the previous run's (before it moves with the run files)
        if not os.path.exists(out_dir):
            os.rename(saving, out_dir)
        elif _exchange(saving, out_dir):
            _carry_run_files(saving, out_dir)
            shutil.rmtree(saving)
        else:  # no atomic exchange here: a kill between these renames is repaired by the next run
            os.rename(out_dir, old)
            os.rename(saving, out_dir)
            _carry_run_files(old, out_dir)
            shutil.rmtree(old)
        if logger is not None:
            logger.path = os.path.join(out_dir, "metrics.jsonl")
            prune_checkpoints(out_dir, logger.run_id, keep=None)
    barrier()


def _encode_state(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _decode_state(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def random_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random generator of this process as JSON: Python's, numpy's, torch's (CPU and CUDA) and the script's."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x)
                                                             for x in np_state[2:]]],
            "torch": _encode_state(torch.get_rng_state()),
            "cuda": [_encode_state(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "generators": {name: _encode_state(g.get_state()) for name, g in generators.items()}}


def set_random_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.asarray(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(_decode_state(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_state(s) for s in state["cuda"]])
    for name, g in generators.items():
        g.set_state(_decode_state(state["generators"][name]))


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir/checkpoints (by the time it was saved, so that a newer run's
    checkpoints win over an older run's higher steps), or None. A step_N directory is complete by construction: it is
    renamed into place only after everything in it was written."""
    root = os.path.join(output_dir, "checkpoints")
    newest, newest_time = None, -1.0
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        state_file = os.path.join(root, name, "trainer_state.json")
        if name.startswith("step_") and os.path.isfile(state_file):
            with open(state_file) as f:
                saved_at = json.load(f)["saved_at"]
            if saved_at > newest_time:
                newest, newest_time = os.path.join(root, name), saved_at
    return newest


def prune_checkpoints(output_dir: str, run_id: str, keep: int | None) -> None:
    """Delete the checkpoints of earlier runs into the same output_dir, and all but the newest `keep` of this run."""
    root = os.path.join(output_dir, "checkpoints")
    ours = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        state_file = os.path.join(root, name, "trainer_state.json")
        if not (name.startswith("step_") and os.path.isfile(state_file)):
            continue
        with open(state_file) as f:
            state = json.load(f)
        if state["run_id"] != run_id:
            shutil.rmtree(os.path.join(root, name))
        else:
            ours.append((state["step"], name))
    for _, name in sorted(ours)[:-keep] if keep else []:
        shutil.rmtree(os.path.join(root, name))


def _model_and_optimizer_state(models: dict, optimizers: list):
    """State dicts of every trained model and optimiser, keyed by module path, sharded under FSDP2 (each rank holds its
    shards): what torch.distributed.checkpoint saves and loads without gathering anything to one rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    modules = torch.nn.ModuleDict(models)
    # frozen weights (a LoRA model's base) never change: they are reloaded from their path, not checkpointed
    model_state, optim_state = get_state_dict(modules, optimizers, options=StateDictOptions(ignore_frozen_params=True))
    return modules, {"model": model_state, "optim": optim_state}


def save_state(output_dir: str, step: int, models: dict, optimizers: list, generators: dict, state: dict, logger,
               config, save_total_limit: int, rank_state: dict | None = None) -> str:
    """Write output_dir/checkpoints/step_{step}: everything a resumed run needs to continue exactly (every rank must
    call this). models: the trained models by name; generators: the script's own random generators of this rank;
    state: the script's JSON-able state, the same on every rank (data position, scheduler, counters, ...); rank_state:
    what differs between ranks (e.g. partial sums of metrics not yet reduced). Keeps the newest save_total_limit
    checkpoints of this run; removes those of earlier runs."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank() if dist.is_initialized() else 0
    root = os.path.join(output_dir, "checkpoints")
    tmp, final = os.path.join(root, f".tmp_step_{step}"), os.path.join(root, f"step_{step}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    _, sharded = _model_and_optimizer_state(models, optimizers)
    with warnings.catch_warnings():  # a single process is a fine use of torch.distributed.checkpoint
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(sharded, checkpoint_id=tmp, no_dist=not dist.is_initialized())  # each rank writes its own shards
    write_json_atomic(os.path.join(tmp, f"rank{rank}.json"), {"random": random_state(generators),
                                                               "state": rank_state or {}})
    barrier()
    if rank == 0:
        logger.snapshot(os.path.join(tmp, "metrics.jsonl"))
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), {
            "step": step, "saved_at": time.time(), "run_id": logger.run_id,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "config": {k: v for k, v in vars(config).items()}, "state": state})
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again by a resumed run
        os.rename(tmp, final)
        logger.promote()
        prune_checkpoints(output_dir, logger.run_id, save_total_limit)
    barrier()
    return final


def load_state(path: str, models: dict, optimizers: list, generators: dict, config) -> dict:
    """Load a checkpoint written by save_state into the (already built and sharded) models and optimisers and the
    random generators of this rank; returns its trainer_state.json with this rank's rank_state under "rank_state".
    Options that differ from the checkpoint's are printed: a resumed run is exact only with the same options."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    if trainer_state["world_size"] != world_size:
        raise InputError(f"--resume: {path} was written by {trainer_state['world_size']} processes but this run has "
                         f"{world_size}; resume with the same number (each rank's random state is restored)")
    changed = {k: (v, getattr(config, k)) for k, v in trainer_state["config"].items()
               if k != "resume" and hasattr(config, k) and strict_json(getattr(config, k)) != v}
    if rank == 0 and changed:
        print("resume: options changed since the checkpoint: " +
              ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), flush=True)
    modules, sharded = _model_and_optimizer_state(models, optimizers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(sharded, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(modules, optimizers, model_state_dict=sharded["model"], optim_state_dict=sharded["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen weights: not saved
    with open(os.path.join(path, f"rank{rank}.json")) as f:
        per_rank = json.load(f)
    set_random_state(per_rank["random"], generators)
    trainer_state["rank_state"] = per_rank["state"]
    return trainer_state


def resume_checkpoint(output_dir: str, resume: bool) -> str | None:
    """The checkpoint --resume continues from (the newest complete one), None without --resume; a clear error when
    there is none."""
    if not resume:
        return None
    path = latest_checkpoint(output_dir)
    if path is None:
        raise InputError(f"--resume: no complete checkpoint in {output_dir}/checkpoints (save them with --save_every "
                         "N); run without --resume to start from the beginning")
    return path


class BatchOrder:
    """The indices of successive global batches: a seeded random permutation of the n examples, drawn afresh when
    fewer than one batch is left (the tail of an epoch is dropped; fewer examples than a batch are repeated). Every
    rank builds the same order, so all agree on the global batch. state_dict() / load_state_dict() let a resumed run
    draw exactly the batches the interrupted one would have."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.pos, self.order_state = [], 0, None  # order_state: the generator before drawing `order`

    def _draw(self) -> None:
        self.order_state = self.generator.get_state()
        self.order = torch.randperm(self.n, generator=self.generator).tolist() * max(1, -(-self.batch_size // self.n))
        self.pos = 0

    def next(self) -> list[int]:
        if self.pos + self.batch_size > len(self.order):
            self._draw()
        batch = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"pos": self.pos, "generator": _encode_state(self.generator.get_state()),
                "order_state": None if self.order_state is None else _encode_state(self.order_state)}

    def load_state_dict(self, state: dict) -> None:
        if state["order_state"] is not None:
            self.generator.set_state(_decode_state(state["order_state"]))
            self._draw()
        self.pos = state["pos"]
        self.generator.set_state(_decode_state(state["generator"]))


# ---------------------------------------------------------------------------------------------------------------------
# Loading models with errors that name the option
# ---------------------------------------------------------------------------------------------------------------------
def from_pretrained(model_class, path: str, option: str, **kwargs):
    """model_class.from_pretrained(path) with a clear error naming the option when path is neither a local checkpoint
    nor a hub id that can be loaded (transformers would report a missing directory as a malformed repo id).

    A directory holding a LoRA adapter (adapter_config.json, written by these scripts without --merge_lora) is loaded
    onto its base model (itself possibly an adapter directory) and merged, so a later stage takes either output."""
    if path.startswith("runs/") and not os.path.isdir(path):
        raise InputError(f"{option} {path}: not found; run the stage that writes it first (or pass another path)")
    adapter = os.path.join(path, "adapter_config.json")
    if model_class is not AutoTokenizer and os.path.isfile(adapter) and not any(
            f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(path)):
        return _load_adapter(model_class, path, option, **kwargs)
    try:
        return model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        where = "no such local directory, and it" if not os.path.exists(path) else "it"
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InputError(f"{option} {path}: cannot load ({where} is not a loadable Hugging Face checkpoint or hub "
                         f"id: {reason})") from None


def _import_peft(option: str):
    try:
        import peft  # optional dependency: LoRA
    except ImportError:
        raise InputError(f"{option}: LoRA needs the `peft` package (pip install peft)") from None
    return peft


def _load_adapter(model_class, path: str, option: str, **kwargs):
    """The base model of a LoRA adapter directory with the adapter merged into it (a plain model). The config.json
    saved beside the adapter gives what the base's own config lacks: the vocabulary size after a token was added,
    the number of labels of a score head, the reward normalisation."""
    peft = _import_peft(option)
    with open(os.path.join(path, "adapter_config.json")) as f:
        base_path = json.load(f)["base_model_name_or_path"]
    saved = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
    output_loading_info = kwargs.pop("output_loading_info", False)
    if "id2label" in saved and "ForSequenceClassification" in model_class.__name__:
        kwargs.setdefault("num_labels", len(saved["id2label"]))
    base = from_pretrained(model_class, base_path, f"{option} (the base of the adapter {path})", **kwargs)
    if saved.get("vocab_size", 0) > base.get_input_embeddings().weight.size(0):  # the adapter's run added a token
        base.resize_token_embeddings(saved["vocab_size"])
    model = peft.PeftModel.from_pretrained(base, path).merge_and_unload()
    for key in ("reward_mean", "reward_std", "pad_token_id"):
        if key in saved:
            setattr(model.config, key, saved[key])
    model.config._name_or_path = path
    return (model, {"missing_keys": []}) if output_loading_info else model


def add_lora(model, cfg, option_prefix: str = "--lora", modules_to_save: list[str] | None = None):
    """Wrap model with a LoRA adapter (peft) when cfg.lora_r > 0: only the adapter (and modules_to_save, e.g. a
    reward model's score head, trained fully) is trained; the base weights stay frozen. Default targets: every linear
    layer of the transformer blocks (peft's "all-linear", which leaves the LM head out)."""
    if not cfg.lora_r:
        return model
    peft = _import_peft(f"{option_prefix}_r")
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.lora_target_modules) or "all-linear",
                             modules_to_save=modules_to_save)
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need inputs with grad
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise InputError(f"--lora_target_modules {list(cfg.lora_target_modules)}: {e}") from None
    return model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


class WithoutAdapter:
    """The policy with its LoRA adapter switched off: the frozen reference of PPO / DPO / GRPO without a second copy
    of the backbone in memory. Its outputs are the base model's, exactly (the adapter's layers add nothing)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, name):  # .training, .eval(), .config ...: the policy's
        return getattr(self.model, name)


def check_lora_options(config) -> None:
    check_options(config, nonnegative=("lora_r",), positive=("lora_alpha",), fractions=("lora_dropout",))
    if config.merge_lora and not config.lora_r:
        raise InputError("--merge_lora needs --lora_r > 0")


def check_model_kind(model, path: str, option: str, kind: str) -> None:
    """Refuse a checkpoint of the wrong kind instead of silently using a random head: a reward model (or critic) needs
    a trained score head; a policy must be a causal language model, not a reward model."""
    architectures = getattr(model.config, "architectures", None) or []
    if kind == "reward" and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"{option} {path}: not a reward model (its architectures are {architectures}, so the score "
                         "head would be random); train one with reward_model.py, or pass a "
                         "...ForSequenceClassification checkpoint with num_labels=1")
    if kind == "reward" and model.config.num_labels != 1:
        raise InputError(f"{option} {path}: a reward model needs one output (num_labels=1), this one has "
                         f"{model.config.num_labels}")
    if kind == "policy" and any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"{option} {path}: a reward / classification model ({architectures}), not a causal "
                         "language model; pass the SFT policy")


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None when unbounded, e.g. some rotary models)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def check_length(config, length: int, what: str, path: str) -> None:
    """Sequences longer than the model's positions would crash deep inside it (IndexError) or silently misbehave."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise InputError(f"{what} = {length} tokens exceeds the {limit} positions of {path}; lower it")


# ---------------------------------------------------------------------------------------------------------------------
# Masks and masked statistics
# ---------------------------------------------------------------------------------------------------------------------
def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row of (B, T); T where a row has none."""
    T = bools.size(-1)
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, T).min(dim=-1).values


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int,
                       pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    sq = masked_sum((values - mean) ** 2, mask)
    sq = all_reduce_sum(sq) if distributed else sq
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
    mean, count = masked_mean_count(values, mask, distributed)
    if count < 2:  # no spread to divide by (e.g. every sample of a batch unscored): centre only; the same on all ranks
        whitened = values - mean
    else:
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


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int):
    """The logits that predict the response part of [prompt | response] sequences: (B, P + R) -> (B, R, V).

    The prompts are left-padded into the first context_length = P columns. The logits at position t predict token
    t + 1, so the response tokens P ... P + R - 1 are predicted at positions P - 1 ... P + R - 2."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    return out.logits[:, context_length - 1:-1]


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                      temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs (B, R) of the response part of [prompt | response] sequences (B, P + R), at the sampling
    temperature; and the next-token entropy (B, R) if asked."""
    logits = response_logits(model, input_ids, attention_mask, context_length)
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
    """Console + out_dir/metrics.jsonl (one strict-JSON object per logged step), optional TensorBoard / W&B (imported
    lazily, only when asked for). Only rank 0 writes.

    resume_from: a checkpoint whose copy of the log replaces metrics.jsonl before appending, so that the steps a killed
    run logged after its last checkpoint appear once, not twice. A new run into a directory that already holds a log
    writes to .metrics.jsonl.incoming until its first save (promote), so a run that fails early leaves the previous
    run's log in place. run_id names the run (kept across resumes) whose checkpoints belong together."""

    def __init__(self, out_dir: str, rank: int = 0, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None, resume_from: str | None = None):
        self.rank, self.start = rank, time.time()
        self.tb = self.wandb = None
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"  # urandom: no seeded generator used
        if resume_from is not None:
            with open(os.path.join(resume_from, "trainer_state.json")) as f:
                saved = json.load(f)
            self.run_id = saved["run_id"]
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_from is not None:
            shutil.copyfile(os.path.join(resume_from, "metrics.jsonl"), self.path + ".tmp")
            os.replace(self.path + ".tmp", self.path)
        elif os.path.exists(self.path):
            self.path = os.path.join(out_dir, ".metrics.jsonl.incoming")
        self.file = open(self.path, "a" if resume_from is not None else "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

            # purge_step: a resumed run drops the events the killed run wrote after its checkpoint
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=saved["step"] + 1 if resume_from is not None else None)
        if wandb_project:
            import wandb  # optional dependency

            self.wandb = wandb.init(project=wandb_project, config=config, id=self.run_id, resume="allow")

    def log(self, step: int, metrics: dict, console_keys: tuple[str, ...] | None = None) -> None:
        if self.rank != 0:
            return
        metrics = strict_json(metrics)
        self.file.write(json.dumps({"step": step, **metrics}, allow_nan=False) + "\n")
        self.file.flush()
        keys = tuple(metrics) if console_keys is None else console_keys  # () logs to the file only
        if keys:
            shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
            print(f"[{time.time() - self.start:6.0f}s] step {step} {shown}", flush=True)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def snapshot(self, dst: str) -> None:
        """Copy the log so far to dst (into a checkpoint)."""
        self.file.flush()
        shutil.copyfile(self.path, dst)

    def promote(self) -> None:
        """This run has saved something: its log replaces the previous run's (the open file follows the rename)."""
        if self.rank == 0 and os.path.basename(self.path) == ".metrics.jsonl.incoming":
            final = os.path.join(os.path.dirname(self.path), "metrics.jsonl")
            os.replace(self.path, final)
            self.path = final

    def close(self) -> None:
        if self.rank == 0:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "nan" if v is None else str(v)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling-space diagnostics and reward functions given as module:function
# ---------------------------------------------------------------------------------------------------------------------
def sampling_diagnostics(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                         mass: float = 0.95) -> dict:
    """Measures of the size of the sampling space, averaged over real response tokens: RL fine-tuning can only
    re-weight what the policy samples, and it narrows that space (Kirk et al. 2023, "Understanding the effects of RLHF
    on LLM generalisation and diversity").

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


def load_function(spec: str, option: str = "--reward_fn"):
    """'package.module:function' or 'path/to/file.py:function' -> the function (e.g. 'toy_task:gold_reward')."""
    import importlib
    import importlib.util

    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise InputError(f"{option} {spec}: expected module:function or path/to/file.py:function "
                         "(e.g. toy_task:gold_reward)")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.isfile(module_name):
            raise InputError(f"{option} {spec}: no such file {module_name}")
        module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise InputError(f"{option} {spec}: cannot import {module_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"{option} {spec}: {module_name} has no function {fn_name}")
    return fn


def call_reward_fn(fn, prompts: list, completions: list, **columns) -> list[float | None]:
    """Scores of a reward function, checked: one real number (or None, 'cannot score') per completion.

    Called like TRL's reward functions, fn(prompts=..., completions=..., **dataset columns), when it takes keywords
    (**kwargs, or parameters named prompts / completions); otherwise fn(prompts, completions). A wrong number of
    values, a non-number, NaN or infinity is refused with the function's name and what it returned."""
    import inspect

    name = getattr(fn, "__qualname__", repr(fn))
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        values = fn(prompts=prompts, completions=completions, **columns)
    elif "completions" in params:
        values = fn(prompts=prompts, completions=completions,
                    **{k: v for k, v in columns.items() if k in params and k not in ("prompts", "completions")})
    else:
        values = fn(prompts, completions)
    if torch.is_tensor(values) or isinstance(values, np.ndarray):
        values = values.tolist()
    shown = repr(values)[:200]
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        raise InputError(f"reward function {name} returned {shown} for {len(completions)} completions; it must "
                         f"return a list of {len(completions)} numbers (None for a completion it cannot score)")
    out = []
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                              or not math.isfinite(v)):
            raise InputError(f"reward function {name} returned {v!r} among {shown}; every value must be a finite "
                             "number or None")
        out.append(None if v is None else float(v))
    return out


def load_reward_fns(specs, weights=(), option: str = "--reward_fn") -> dict:
    """{name: (function, weight)} of the reward functions given as module:function or file.py:function specs, named
    by their function names (made unique); weights default to 1."""
    specs = list(specs)
    if weights and len(weights) != len(specs):
        raise InputError(f"--reward_weights: {len(weights)} weights for {len(specs)} reward functions")
    fns = {}
    for spec, weight in zip(specs, weights or [1.0] * len(specs)):
        fn = load_function(spec, option)
        name = getattr(fn, "__name__", "reward")
        name = name if name not in fns else f"{name}_{len(fns)}"
        fns[name] = (fn, float(weight))
    return fns


def as_completions(prompts: list, texts: list[str]) -> list:
    """Completions as reward functions get them (as in TRL): strings after string prompts, [{"role": "assistant",
    "content": text}] after conversational ones."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def batch_columns(columns: list[dict] | None, idx: list[int]) -> dict:
    """The other fields of the prompt rows idx (e.g. a reference answer) as reward functions get them, like TRL:
    {field: [the value of each row]}, for the fields that every one of these rows has."""
    if not columns or not idx:
        return {}
    return {k: [columns[i][k] for i in idx] for k in columns[idx[0]] if all(k in columns[i] for i in idx)}


def score_with_fns(fns: dict, prompts: list, texts: list[str], columns: dict | None = None):
    """(total, per_function) scores of completions: per_function[name] is each function's list (None where it cannot
    score); total is the weighted sum over the functions that scored a completion, None where none did."""
    completions = as_completions(prompts, texts)
    per_fn = {name: call_reward_fn(fn, prompts, completions, **(columns or {})) for name, (fn, _) in fns.items()}
    total = []
    for i in range(len(texts)):
        scored = [(per_fn[name][i], w) for name, (_, w) in fns.items() if per_fn[name][i] is not None]
        total.append(sum(v * w for v, w in scored) if scored else None)
    return total, per_fn


def distinct_fraction(texts: list[str]) -> float:
    return len(set(texts)) / max(1, len(texts))


# ---------------------------------------------------------------------------------------------------------------------
# Scoring responses and evaluating a policy (shared by ppo.py, dpo.py and the toy report, so they compare)
# ---------------------------------------------------------------------------------------------------------------------
def same_tokenizer(a, b) -> bool:
    return a is b or (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)


@torch.no_grad()
def score_responses(reward_model, reward_tokenizer, policy_tokenizer, prompt_ids, prompt_mask, responses,
                    response_mask, prompts: list, completions: list[str]) -> torch.Tensor:
    """Normalised reward-model scores (B,) of [prompt | response], read at the last real token (the EOS).

    When the reward model's tokenizer differs from the policy's, the decoded texts are re-rendered for it: a
    conversational prompt with its own chat template (prompt + the response as an assistant message) when it has
    one, else the policy's rendering of the prompt as text; a string prompt with its special tokens and the
    completion without, plus its EOS if the response ended with one."""
    device = prompt_ids.device
    if same_tokenizer(reward_tokenizer, policy_tokenizer):
        ids = torch.cat([prompt_ids, responses], 1)
        mask = torch.cat([prompt_mask, response_mask], 1)
    else:
        ended = (responses == policy_tokenizer.eos_token_id).any(1).tolist()
        seqs = []
        for p, c, e in zip(prompts, completions, ended):
            if isinstance(p, list) and getattr(reward_tokenizer, "chat_template", None) is not None:
                p_ids = render_prompt(p, reward_tokenizer)[1]
                c_ids = render_completion(p, [{"role": "assistant", "content": c}], reward_tokenizer)
                seqs.append(p_ids + (c_ids if e else c_ids[:-1]))
            else:
                text = p if isinstance(p, str) else render_prompt(p, policy_tokenizer)[0]
                seqs.append(reward_tokenizer(text)["input_ids"] + reward_tokenizer(c, add_special_tokens=False)[
                    "input_ids"] + ([reward_tokenizer.eos_token_id] if e else []))
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


def prompt_text(prompt) -> str:
    """A prompt for printing: the string, or a conversation's last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts: list, device, *, prompt_token_ids: list[list[int]] | None = None,
                    prompt_columns: list[dict] | None = None, ref_policy=None, reward_model=None,
                    reward_tokenizer=None, reward_fns: dict | None = None,
                    samples_per_prompt: int = 4, max_new_tokens: int = 24, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, batch_size: int = 64, seed: int = 0, amp_dtype=None) -> dict:
    """Sample `samples_per_prompt` completions of every prompt (a string or a conversation) from the policy and
    measure them.

    prompt_token_ids: the token ids of each prompt (default: render_prompt). prompt_columns: the other fields of each
    prompt's row, passed to the reward functions (batch_columns). reward_fns: {name: (function, weight)}
    (load_reward_fns). Returns flat metrics: for each reward function f, f_mean / f_std / f_sem over the samples it
    scored and f_unscored (those it returned None for), and with a reward model f_proxy_agreement (the fraction of
    sample pairs the reward model orders like f: the over-optimisation signal of Gao et al. 2022); reward_mean /
    reward_std (the weighted total) when there are several; proxy_reward_mean / std (the reward model, normalised);
    kl_to_ref (mean over samples of sum_t log pi(y_t) - log pi_ref(y_t): the k1 estimate of KL(pi || pi_ref) per
    sequence, at the sampling temperature); eos_rate, response_length, distinct_completions, num_samples; plus the
    per-sample lists under "per_sample" (prompt, completion, proxy, kl, eos, length, each function's scores and the
    total as "reward").
    Each rank evaluates a strided share of the (prompt, sample) pairs; all ranks return the same metrics."""
    rank, _ = rank_info()
    reward_fns = reward_fns or {}
    was_training = policy.training
    policy.eval()
    if prompt_token_ids is None:
        prompt_token_ids = [render_prompt(p, tokenizer)[1] for p in prompts]
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    rows = {k: [] for k in ("prompt", "completion", "proxy", "kl", "eos", "length", "reward", *reward_fns)}
    for work in rank_batches(len(prompts) * samples_per_prompt, batch_size):  # (prompt, sample) pairs
        idx = [w // samples_per_prompt for w in work or [0]]  # an empty share runs on a dummy prompt, discarded
        real = bool(work)
        batch = [prompts[i] for i in idx]
        prompt_ids, prompt_mask = left_pad([prompt_token_ids[i] for i in idx], tokenizer.pad_token_id, device)
        with autocast(device, amp_dtype):
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
        if reward_fns:
            total, per_fn = score_with_fns(reward_fns, batch, completions, batch_columns(prompt_columns, idx))
            rows["reward"] += total
            for name, values in per_fn.items():
                rows[name] += values
        rows["proxy"] += proxy.float().tolist()
        rows["kl"] += kl.float().tolist()
        rows["eos"] += (responses == tokenizer.eos_token_id).any(1).float().tolist()
        rows["length"] += response_mask.sum(1).float().tolist()
    rows = {k: gather_lists(v) for k, v in rows.items()}
    policy.train(was_training)
    proxy = np.asarray(rows["proxy"], dtype=np.float64)
    metrics = {}
    for name in [*reward_fns, *(["reward"] if len(reward_fns) > 1 else [])]:
        scored = [(v, p) for v, p in zip(rows[name], proxy) if v is not None]
        values = np.asarray([v for v, _ in scored], dtype=np.float64)
        metrics.update({f"{name}_mean": float(values.mean()) if len(values) else math.nan,
                        f"{name}_std": float(values.std()) if len(values) else math.nan,
                        f"{name}_sem": float(values.std() / math.sqrt(len(values))) if len(values) else math.nan,
                        f"{name}_unscored": len(rows[name]) - len(values)})
        if reward_model is not None and name != "reward":
            metrics[f"{name}_proxy_agreement"] = ordering_agreement([p for _, p in scored], values)
    metrics.update({
        "proxy_reward_mean": float(proxy.mean()), "proxy_reward_std": float(proxy.std()),
        "kl_to_ref": float(np.mean(rows["kl"])) if ref_policy is not None else math.nan,
        "eos_rate": float(np.mean(rows["eos"])), "response_length": float(np.mean(rows["length"])),
        "distinct_completions": distinct_fraction(rows["completion"]), "num_samples": len(rows["completion"]),
    })
    metrics["per_sample"] = rows
    return metrics
