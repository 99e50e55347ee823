"""Benchmark of sft.py, reward_model.py, ppo.py and dpo.py on the toy defaults: throughput, peak memory, and how much
time each script spends on top of the bare compute it needs.

    python benchmarks/benchmark.py --quick              # a tenth of every run: ~3 minutes on 2 CPU cores
    python benchmarks/benchmark.py                      # the full default runs (training loops 10x longer)
    python benchmarks/benchmark.py --fraction 0.3 --stages sft dpo
    python benchmarks/benchmark.py --memory             # peak memory of a ~110M Llama: ~15 minutes on 2 CPU cores

Not part of the tests. The stages run in pipeline order, each on its own Config defaults (read from the script, so the
benchmark follows them) shortened by --fraction (epochs, or PPO iterations), reading the earlier stages' outputs
under runs/benchmark/ and never touching runs/sft etc. Each stage runs twice, each time in a fresh process:

  script   the script's own main(Config) (PPO: with eval_every = num_iterations, so that no evaluation falls inside
           its training loop; the evaluations before and after it are kept)
  bare     the same forward / backward / generate calls and optimizer steps on the same models, batches (the script's
           own sequence of batches; for PPO its prompts and number of decoding steps per rollout) and number of steps,
           in a tight loop: batches collated beforehand, no logging, metrics, evaluation or saving

Columns of the table:
  throughput   as the script reports it: SFT tokens/s (every non-pad token), reward model and DPO pairs/s, PPO
               episodes/s; "bare" is the same work divided by the bare loop's time
  loop s       the script's training loop time as the script itself measures it (its work / its throughput)
  bare s       the bare loop's time;  loop/bare: the overhead the script adds to each training step
  total s      the whole main() call: loading models, tokenising data, training, evaluating, saving;  total/bare
  peak RSS     the highest resident memory of each process (ru_maxrss); on CUDA also torch.cuda.max_memory_allocated
  PPO phases   time/generate, time/score, time/train of metrics.jsonl summed over the iterations, and the bare loop's
Output: the table on stdout and runs/benchmark.json. Wall-clock times include whatever else the machine is doing.

--memory: what fp32 weights, bf16 frozen models and LoRA cost in memory. A random Llama-style model of 109.5M
parameters (MEMORY_MODEL) is saved with the toy tokenizer to runs/benchmark_memory/base, a reward model made from it
to runs/benchmark_memory/reward_model; then sft.py, dpo.py and ppo.py each run their own main(Config) from it, every
run in a fresh process, for --memory_steps optimiser steps of 16 toy sequences (PPO: iterations of 8 rollouts and one
update on them), without evaluation, under each setting of MEMORY_RUNS: fp32 everything (--dtype float32), bf16
frozen models (--frozen_dtype bfloat16), LoRA (--lora_r 16 on the fp32 model; and on a bf16 base, --dtype bfloat16),
SFT also with --gradient_checkpointing. Columns: the models each process holds (counted where the script hands each
one to common.shard_model: PPO holds actor, reference, reward model and critic, with LoRA one backbone fewer),
parameters total / trained, their weights and the gradients + AdamW moments of the trained ones (computed from the held
parameters), the peak RSS up to the final save (and torch.cuda.max_memory_allocated on CUDA), and the steady-state
throughput in the script's unit (steps 2 to N). Output: the table on stdout and runs/benchmark_memory.json.
"""

import dataclasses
import importlib
import json
import multiprocessing
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Literal

import tyro

# torch and the scripts are imported in the child processes only: on Linux a child's ru_maxrss starts at its
# parent's high-water mark (exec keeps the peak of the memory image it replaces), so the parent must stay small
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts' defaults are relative paths (data/toy/..., runs/...)

STAGES = ("sft", "reward_model", "ppo", "dpo")
UNIT = {"sft": "tokens/s", "reward_model": "pairs/s", "ppo": "episodes/s", "dpo": "pairs/s"}
NEEDS = {"sft": (), "reward_model": ("sft",), "ppo": ("sft", "reward_model"), "dpo": ("sft",)}  # earlier outputs
PPO_PHASES = ("generate", "score", "train")
SCRIPT_LOOP = {  # what the script's own training-loop timer covers, read from the scripts
    "sft": "forward, backward, optimizer step (batch collation happens before its timer)",
    "reward_model": "batch collation, forward, backward, metric sums, optimizer step",
    "ppo": "whole iterations: rollout, scoring, advantages, PPO epochs, logging (no evaluation inside)",
    "dpo": "batch collation, policy and reference forwards, backward, metric sums, optimizer step",
}
BARE_LOOP = {
    "sft": "forward, token NLL, backward, grad clip, AdamW step",
    "reward_model": "one forward over chosen + rejected, Bradley-Terry loss, backward, grad clip, AdamW step",
    "ppo": "generate (KV cache), actor / reference / critic / reward-model forwards, PPO epochs of actor + critic "
           "forward / backward, grad clips, AdamW steps",
    "dpo": "policy forward over chosen + rejected, reference forward (no grad), DPO loss, backward, grad clip, "
           "AdamW step",
}


@dataclass
class Config:
    quick: bool = False
    """shorthand for --fraction 0.1 (each stage a tenth of its default length)"""
    fraction: float = 1.0
    """scale every run: SFT / reward model / DPO epochs and PPO iterations are multiplied by this"""
    stages: tuple[Literal["sft", "reward_model", "ppo", "dpo"], ...] = STAGES
    """which scripts to benchmark, run in pipeline order; a later stage reads the earlier ones' outputs under
    output_dir (from this or an earlier benchmark run)"""
    output_dir: str = "runs/benchmark"
    """checkpoints and logs of the benchmark's own runs (relative to the repository root); the results go to
    <output_dir>.json"""
    num_threads: int = 0
    """torch CPU threads in each process (0: torch's default, as when the scripts run on their own)"""
    memory: bool = False
    """the memory benchmark instead (module docstring): a random ~110M-parameter Llama trained by sft.py, dpo.py and
    ppo.py (those of --stages) in fp32, with bf16 frozen models and with LoRA; written to <output_dir>_memory/ and
    <output_dir>_memory.json"""
    memory_steps: int = 3
    """--memory: optimiser steps (PPO: iterations) of each run; the first is left out of the steady-state throughput"""


# ---------------------------------------------------------------------------------------------------------------------
# The configuration of each stage, shared by its two processes
# ---------------------------------------------------------------------------------------------------------------------
def stage_config(stage: str, fraction: float, out_root: str):
    """(module, Config): the script's defaults, shortened by fraction, wired to the benchmark's earlier stages."""
    module = importlib.import_module(stage)
    defaults = module.Config()
    paths = {"output_dir": os.path.join(out_root, stage)}
    if stage != "sft":
        paths["model_name_or_path"] = os.path.join(out_root, "sft")
    reward_model_dir = os.path.join(out_root, "reward_model")
    if stage == "dpo":  # for the proxy reward of its evaluation only: optional
        paths["reward_model_path"] = reward_model_dir if os.path.isdir(reward_model_dir) else "none"
    if stage == "ppo":
        paths["reward_model_path"] = reward_model_dir
        n = max(1, round(defaults.num_iterations * fraction))
        length = {"num_iterations": n, "eval_every": n}  # evaluation only before and after the loop
    else:
        length = {"num_epochs": defaults.num_epochs * fraction}
    return module, dataclasses.replace(defaults, **paths, **length)


def global_batches(n_examples: int, cfg):
    """The index lists of the global batches that sft.py, reward_model.py and dpo.py train on, in their order: the
    same generator, seed, step count and reshuffle rule as their loops (one process)."""
    import torch

    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    total_steps = max(1, int(cfg.num_epochs * (n_examples // global_batch)))
    generator = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(n_examples, generator=generator).tolist(), 0
    for _ in range(total_steps):
        if pos + global_batch > len(order):
            order, pos = torch.randperm(n_examples, generator=generator).tolist(), 0
        batch = order[pos:pos + global_batch]
        pos += global_batch
        yield [batch[i:i + cfg.per_device_batch_size] for i in range(0, global_batch, cfg.per_device_batch_size)]


# ---------------------------------------------------------------------------------------------------------------------
# Child process 1: the script itself
# ---------------------------------------------------------------------------------------------------------------------
def record_rollouts(module, common) -> list:
    """Wrap common.generate so that the script's own calls (its rollouts; not those of the evaluation, which come from
    inside common) record their prompts and number of decoding steps, for the bare loop to replay."""
    rollouts, generate = [], common.generate

    def recording_generate(model, input_ids, attention_mask, *args, **kwargs):
        responses, response_mask = generate(model, input_ids, attention_mask, *args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == module.__name__:
            rollouts.append((input_ids.cpu(), attention_mask.cpu(), responses.size(1)))
        return responses, response_mask

    common.generate = recording_generate
    return rollouts


def run_script(stage: str, module, cfg) -> dict:
    import torch

    import common

    rollouts = record_rollouts(module, common) if stage == "ppo" else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    final = module.main(cfg)
    result = {"total_s": time.perf_counter() - t0, "total_cpu_s": time.process_time() - cpu0}
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    if stage == "ppo":
        iterations = [line for line in lines if "episodes_per_s" in line]  # one per iteration; evaluation lines lack it
        # episodes_per_s of the last iteration = episodes / (time since the loop started): the loop's throughput
        result.update(throughput=iterations[-1]["episodes_per_s"], steps=len(iterations),
                      phases={k: sum(line[f"time/{k}"] for line in iterations) for k in PPO_PHASES})
        torch.save(rollouts, os.path.join(cfg.output_dir, "benchmark_rollouts.pt"))
    else:
        result.update(throughput=final["pairs_per_s" if stage != "sft" else "tokens_per_s"],
                      steps=final["train_steps"])
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Child process 2: the bare loops. Each returns work (in the unit of the script's throughput), steps and seconds.
# ---------------------------------------------------------------------------------------------------------------------
def bare_sft(cfg, device, timer) -> dict:
    import torch

    import common
    import sft

    common.set_seed(cfg.seed)
    model, tokenizer = sft.load_model(cfg, device, common.weight_dtypes(cfg.dtype, device)[0])
    examples, _ = sft.build_dataset(common.load_rows(cfg.dataset, "--dataset", cfg.dataset_split), tokenizer, cfg)
    steps = [[sft.collate([examples[j] for j in micro], tokenizer.pad_token_id, device) for micro in batch]
             for batch in global_batches(len(examples), cfg)]
    label_tokens = [sum((labels[:, 1:] != -100).sum() for _, _, labels in step) for step in steps]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    model.train()
    timer.start()
    for step, n_labels in zip(steps, label_tokens):
        for input_ids, attention_mask, labels in step:
            with common.autocast(device, amp_dtype):
                nll, _ = sft.token_nll_sum(model, input_ids, attention_mask, labels)
            (nll / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = timer.stop()
    tokens = sum(int(attention_mask.sum()) for step in steps for _, attention_mask, _ in step)  # as sft.py counts
    return {"work": tokens, "steps": len(steps), "seconds": seconds}


def bare_reward_model(cfg, device, timer) -> dict:
    import torch

    import common
    import reward_model

    common.set_seed(cfg.seed)
    trained_dtype = common.weight_dtypes(cfg.dtype, device, cfg.frozen_dtype)[0]
    model, tokenizer, _ = reward_model.load_reward_model(cfg, device, trained_dtype)
    dataset = cfg.dataset or reward_model.TOY_DATA[cfg.loss][0]
    examples, _ = reward_model.build_dataset(common.load_rows(dataset, "--dataset", cfg.dataset_split), tokenizer, cfg)
    batches = list(global_batches(len(examples), cfg))
    steps = [[reward_model.collate([examples[j] for j in micro], tokenizer.pad_token_id, device) for micro in batch]
             for batch in batches]
    pairs = sum(len(examples[j]["completions"]) * (len(examples[j]["completions"]) - 1) // 2
                for batch in batches for micro in batch for j in micro)  # as the script counts them
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    model.train()
    timer.start()
    for step in steps:
        for input_ids, attention_mask, index, list_mask, _ in step:
            with common.autocast(device, amp_dtype):
                flat_scores = common.get_scores(model, input_ids, attention_mask, normalize=False)
            # K = 2 is the pairwise loss; the loss itself costs nothing next to the forward pass
            losses = reward_model.ranking_loss(flat_scores[index], list_mask)
            (losses.sum() / global_batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"work": pairs, "steps": len(steps), "seconds": timer.stop()}


def bare_dpo(cfg, device, timer) -> dict:
    import torch

    import common
    import dpo

    common.set_seed(cfg.seed)
    tokenizer = dpo.load_tokenizer(cfg)
    trained_dtype, frozen_dtype = common.weight_dtypes(cfg.dtype, device, cfg.frozen_dtype)
    policy = dpo.load_causal_lm(cfg.model_name_or_path, cfg, tokenizer, device, True, trained_dtype)
    # with precomputed reference log-probs the script's loop runs no reference forward, so neither does this one
    ref_model = None if cfg.precompute_ref_log_probs else dpo.load_reference(
        cfg.ref_model_name_or_path or cfg.model_name_or_path, policy, cfg, tokenizer, device, frozen_dtype)
    examples, _ = dpo.build_dataset(common.load_rows(cfg.dataset, "--dataset", cfg.dataset_split), tokenizer, cfg)
    steps = [[dpo.collate_pairs([examples[j] for j in micro], tokenizer.pad_token_id, device) for micro in batch]
             for batch in global_batches(len(examples), cfg)]
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    timer.start()
    for step in steps:
        for batch in step:
            with common.autocast(device, amp_dtype):
                chosen_logps, rejected_logps = dpo.concatenated_logps(policy, *batch)
                if ref_model is not None:
                    with torch.no_grad():
                        ref_chosen_logps, ref_rejected_logps = dpo.concatenated_logps(ref_model, *batch)
                else:
                    ref_chosen_logps = ref_rejected_logps = torch.zeros_like(chosen_logps)
            h = dpo.logratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
            losses = dpo.preference_loss(h, cfg.loss_type, cfg.beta, cfg.label_smoothing)
            (losses.sum() / global_batch).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"work": len(steps) * global_batch, "steps": len(steps), "seconds": timer.stop()}


def bare_ppo(cfg, device, timer) -> dict:
    import torch

    import common
    import ppo

    common.set_seed(cfg.seed)
    actor, ref, reward_model, critic, tokenizer, _ = ppo.load_models(cfg, device)
    rollouts = torch.load(os.path.join(cfg.output_dir, "benchmark_rollouts.pt"))
    if cfg.shared_optimizer:
        optimizers = [torch.optim.AdamW(list(actor.parameters()) + list(critic.parameters()), lr=cfg.learning_rate,
                                        weight_decay=cfg.weight_decay, eps=1e-5)]
    else:
        optimizers = [torch.optim.AdamW(actor.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                        eps=1e-5),
                      torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate,
                                        weight_decay=cfg.weight_decay, eps=1e-5)]
    amp_dtype = common.autocast_dtype(device, cfg.bf16)
    autocast = lambda: common.autocast(device, amp_dtype)  # noqa: E731
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    phases = dict.fromkeys(PPO_PHASES, 0.0)
    episodes = 0
    for query, query_mask, n_decode in rollouts:
        query, query_mask = query.to(device), query_mask.to(device)
        timer.start()
        actor.eval()
        with autocast():
            # eos_token_id -1 never matches: exactly the script's number of decoding steps for this batch
            responses, response_mask = common.generate(actor, query, query_mask, n_decode, -1, tokenizer.pad_token_id,
                                                       cfg.temperature, cfg.top_k, cfg.top_p, generator)
        actor.train()
        phases["generate"] += timer.stop()

        timer.start()
        P = query.size(1)
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
        mask = response_mask.float()
        with torch.no_grad(), autocast():
            logprobs = common.sequence_logprobs(actor, seq, seq_mask, P, cfg.temperature)
            common.sequence_logprobs(ref, seq, seq_mask, P, cfg.temperature)
            values = ppo.critic_values(critic, seq, seq_mask, P).float() * mask
            common.get_scores(reward_model, seq, seq_mask)
        phases["score"] += timer.stop()

        timer.start()
        # stand-ins of the right shape: the cost of the update does not depend on the values of the advantages
        advantages, returns = torch.randn_like(mask) * mask, values
        B = seq.size(0)
        mb_size = B // cfg.num_minibatches
        micro_size = mb_size // cfg.gradient_accumulation_steps
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, device=device)
            for start in range(0, B, mb_size):
                mb = perm[start:start + mb_size]
                token_count = mask[mb].sum()
                for idx in mb.split(micro_size):
                    with autocast():
                        new_logprobs = common.sequence_logprobs(actor, seq[idx], seq_mask[idx], P, cfg.temperature)
                        new_values = ppo.critic_values(critic, seq[idx], seq_mask[idx], P).float()
                    pg_loss, _ = ppo.policy_loss(new_logprobs, logprobs[idx], advantages[idx], mask[idx],
                                                 cfg.cliprange, token_count)
                    vf_loss, _ = ppo.value_loss(new_values, values[idx], returns[idx], mask[idx],
                                                cfg.cliprange_value, token_count)
                    (pg_loss + cfg.vf_coef * vf_loss).backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        phases["train"] += timer.stop()
        episodes += B
    return {"work": episodes, "steps": len(rollouts), "seconds": sum(phases.values()), "phases": phases}


BARE = {"sft": bare_sft, "reward_model": bare_reward_model, "ppo": bare_ppo, "dpo": bare_dpo}


class Timer:
    """Wall-clock seconds between start() and stop(); waits for the GPU so that queued kernels are counted. Also sums
    the process's CPU time over all start/stop intervals (cpu_s): on CPU, cpu_s / wall seconds below the thread count
    means the loop waited for CPUs that other processes held."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.cpu_s = 0.0

    def start(self) -> None:
        self.sync()
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> float:
        self.sync()
        self.cpu_s += time.process_time() - self.cpu0
        return time.perf_counter() - self.t0


def child(kind: str, stage: str, fraction: float, num_threads: int, out_root: str, result_path: str,
          memory_run: tuple | None = None) -> None:
    """Entry point of a child process: kind "imports" (the libraries alone, the floor of every peak RSS), "script"
    or "bare"; for --memory "build" (the random checkpoints) or "memory" (one run of memory_run = (setting, options,
    steps)). Writes its result, or the error that stopped it, with its peak memory to result_path."""
    import torch
    import transformers  # noqa: F401  (every script imports it: part of the floor)

    import common

    if num_threads:
        torch.set_num_threads(num_threads)
    result = {}
    try:
        if kind == "script":
            result = run_script(stage, *stage_config(stage, fraction, out_root))
        elif kind == "bare":
            _, _, device = common.setup_distributed()
            timer = Timer(device)
            result = BARE[stage](stage_config(stage, fraction, out_root)[1], device, timer)
            result["cpu_s"] = timer.cpu_s
        elif kind == "build":
            result = build_memory_models(out_root)
        elif kind == "memory":
            result = run_memory(stage, *memory_run, out_root)
    except BaseException as e:  # also SystemExit: a missing earlier stage ends a script with one
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    result["torch_threads"] = torch.get_num_threads()
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)


def run_child(kind: str, stage: str, fraction: float, cfg: Config, out_root: str | None = None,
              memory_run: tuple | None = None, name: str | None = None) -> dict:
    """Run child() in a fresh interpreter (spawn: nothing inherited from this process) and read its result."""
    out_root = out_root or cfg.output_dir
    result_path = os.path.join(out_root, f"{name or f'{stage}_{kind}'}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    load_before = os.getloadavg()[0]
    process = multiprocessing.get_context("spawn").Process(
        target=child, args=(kind, stage, fraction, cfg.num_threads, out_root, result_path, memory_run))
    process.start()
    process.join()
    if not os.path.exists(result_path):
        return {"error": f"the process ended with exit code {process.exitcode} before writing its result"}
    with open(result_path) as f:
        result = json.load(f)
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def summarise(stage: str, script: dict, bare: dict) -> dict:
    row = {"unit": UNIT[stage], "script_loop_covers": SCRIPT_LOOP[stage], "bare_loop_covers": BARE_LOOP[stage],
           "script": script, "bare": bare}
    if "error" in script or "error" in bare:
        return row
    if script["steps"] != bare["steps"]:
        row["warning"] = f"the script ran {script['steps']} steps, the bare loop {bare['steps']}"
    loop_s = bare["work"] / script["throughput"]  # the same work: throughput ratio = time ratio
    row.update(throughput=script["throughput"], bare_throughput=bare["work"] / bare["seconds"], loop_s=loop_s,
               bare_s=bare["seconds"], loop_over_bare=loop_s / bare["seconds"], total_s=script["total_s"],
               total_over_bare=script["total_s"] / bare["seconds"])
    if stage == "ppo":
        row["phases"] = {k: {"script_s": script["phases"][k], "bare_s": bare["phases"][k],
                             "script_over_bare": script["phases"][k] / bare["phases"][k]} for k in PPO_PHASES}
    return row


def print_report(results: dict, fraction: float, path: str) -> None:
    header = (f"{'stage':<13}{'throughput':>20}{'bare':>11}{'loop s':>9}{'bare s':>9}{'loop/bare':>11}"
              f"{'total s':>9}{'total/bare':>12}{'peak RSS MB script/bare':>25}")
    cuda = any("cuda_peak_mb" in r.get("script", {}) for r in results["stages"].values())
    print(f"\n=== benchmark: toy defaults x {fraction:g} (details in {path}) ===")
    print(header + (f"{'CUDA MB script/bare':>21}" if cuda else ""))
    for stage, row in results["stages"].items():
        if "loop_s" not in row:
            print(f"{stage:<13}failed: {row['script'].get('error') or row['bare'].get('error')}")
            continue
        rss = f"{row['script']['peak_rss_mb']:.0f} / {row['bare']['peak_rss_mb']:.0f}"
        line = (f"{stage:<13}{row['throughput']:>9.1f} {row['unit']:<10}{row['bare_throughput']:>11.1f}"
                f"{row['loop_s']:>9.1f}{row['bare_s']:>9.1f}{row['loop_over_bare']:>11.2f}{row['total_s']:>9.1f}"
                f"{row['total_over_bare']:>12.2f}{rss:>25}")
        if cuda:
            line += f"{row['script']['cuda_peak_mb']:>10.0f} / {row['bare']['cuda_peak_mb']:<8.0f}"
        print(line + (f"   WARNING: {row['warning']}" if "warning" in row else ""))
    if "phases" in results["stages"].get("ppo", {}):
        phases = results["stages"]["ppo"]["phases"]
        script_total = sum(p["script_s"] for p in phases.values())
        print("\nPPO time split, summed over iterations (script = time/* of metrics.jsonl):")
        print(f"{'phase':<13}{'script s':>10}{'share':>8}{'bare s':>10}{'script/bare':>13}")
        for k, p in phases.items():
            print(f"{k:<13}{p['script_s']:>10.2f}{p['script_s'] / script_total:>8.0%}{p['bare_s']:>10.2f}"
                  f"{p['script_over_bare']:>13.2f}")
    print(f"\nimports alone (python + torch + transformers + common.py): peak RSS "
          f"{results['imports'].get('peak_rss_mb', float('nan')):.0f} MB, the floor of every process above")
    print("what each time covers:")
    print("  loop s: the training loop as the script times it, evaluation and saving excluded; total s: the whole "
          "main() call")
    for stage, row in results["stages"].items():
        print(f"  {stage:<13}script loop: {row['script_loop_covers']}")
        print(f"  {'':<13}bare loop:   {row['bare_loop_covers']}")
    loads = [x for row in results["stages"].values() for r in (row["script"], row["bare"])
             for x in r.get("load_average_1min", [])]
    if loads:
        print(f"machine: {os.cpu_count()} CPUs, 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the "
              f"runs (a load above the CPU count means other processes shared them: times are inflated)")
    shares = [f"{stage} {row['bare']['cpu_s'] / row['bare_s']:.2f}" for stage, row in results["stages"].items()
              if "loop_s" in row]
    if shares:
        threads = next(row["bare"]["torch_threads"] for row in results["stages"].values() if "loop_s" in row)
        print(f"CPU time / wall time of the bare loops, {threads} torch thread(s) each: {', '.join(shares)}")


# ---------------------------------------------------------------------------------------------------------------------
# --memory: a ~110M-parameter Llama in fp32, with bf16 frozen models and with LoRA
# ---------------------------------------------------------------------------------------------------------------------
MEMORY_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                    tie_word_embeddings=True)
"""Llama-style (RMSNorm, rotary positions, SwiGLU MLP), 109.5M parameters: 24.6M in the embedding (tied with the LM
head, as small Llamas do) and 7.08M in each of the 12 blocks. Llama 2's vocabulary size, 32000: the toy tokenizer uses
the first 132 rows and the rest are unused rows (real models pad their embeddings too), which cost what a real
vocabulary costs in the embedding, the LM head and the logits."""
FP32 = {"dtype": "float32"}
MEMORY_RUNS = (  # (stage, setting, options): every run starts from the same random checkpoint
    ("sft", "fp32", FP32),
    ("sft", "fp32 + grad ckpt", {**FP32, "gradient_checkpointing": True}),
    ("sft", "LoRA r16", {**FP32, "lora_r": 16}),
    ("sft", "LoRA r16 + grad ckpt", {**FP32, "lora_r": 16, "gradient_checkpointing": True}),
    ("dpo", "fp32", FP32),
    ("dpo", "bf16 frozen", {**FP32, "frozen_dtype": "bfloat16"}),
    ("dpo", "LoRA r16", {**FP32, "lora_r": 16}),
    ("dpo", "LoRA r16, bf16 base", {"dtype": "bfloat16", "lora_r": 16}),
    ("ppo", "fp32", FP32),
    ("ppo", "bf16 frozen", {**FP32, "frozen_dtype": "bfloat16"}),
    ("ppo", "LoRA r16", {**FP32, "lora_r": 16}),
    ("ppo", "LoRA r16, bf16 base", {"dtype": "bfloat16", "lora_r": 16}),
)
MEMORY_STAGE = {  # each step: forward + backward over 16 toy sequences (PPO: 8 rollouts); no evaluation, no samples
    "sft": {"from_scratch": False, "eval_dataset": "none", "num_eval_generations": 0, "per_device_batch_size": 16,
            "log_every": 1},
    "dpo": {"eval_dataset": "none", "eval_prompts": "none", "reward_model_path": "none", "per_device_batch_size": 8,
            "log_every": 1},
    "ppo": {"eval_prompts": "none", "rollout_batch_size": 8, "ppo_epochs": 1, "num_minibatches": 1},
}
WORK = {"sft": "tokens", "dpo": "pairs", "ppo": "episodes"}


def run_name(stage: str, setting: str) -> str:
    """'ppo_bf16_frozen': the run's output directory (and result file) under <output_dir>_memory/."""
    return f"{stage}_" + "".join(c if c.isalnum() else "_" for c in setting)


def build_memory_models(out_root: str) -> dict:
    """The random Llama of MEMORY_MODEL with the toy tokenizer, saved to out_root/base, and a reward model made from it
    (out_root/reward_model: the same backbone with a random score head, num_labels=1, as reward_model.py starts one)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import common

    common.set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained("data/toy/base_model")
    config = LlamaConfig(**MEMORY_MODEL, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    base, rm = os.path.join(out_root, "base"), os.path.join(out_root, "reward_model")
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding / LM head counted once
    del model
    reward_model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    reward_model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    print(f"random {type(reward_model).__name__.replace('ForSequenceClassification', '')}: {n_params:,} parameters "
          f"-> {base}; reward model {sum(p.numel() for p in reward_model.parameters()):,} parameters -> {rm}",
          flush=True)
    return {"parameters": n_params, "reward_model_parameters": sum(p.numel() for p in reward_model.parameters())}


def memory_config(stage: str, options: dict, steps: int, out_root: str, name: str):
    """(module, Config) of one --memory run: the script's defaults with MEMORY_STAGE, the setting's options and
    max_steps, on the random checkpoints of out_root."""
    module = importlib.import_module(stage)
    kw = {"model_name_or_path": os.path.join(out_root, "base"), "max_steps": steps,
          "output_dir": os.path.join(out_root, name), **MEMORY_STAGE[stage], **options}
    if stage == "ppo":
        kw["reward_model_path"] = os.path.join(out_root, "reward_model")
    return module, module.Config(**kw)


def record_models(common) -> list:
    """Wrap common.shard_model, which every script calls once on each model it holds, trained or frozen (not on the
    reference of a LoRA run, which is the policy with its adapter switched off): each model's role, weights' dtype,
    parameters and trained parameters, as the process really holds them."""
    held, shard_model = [], common.shard_model

    def recording_shard_model(model, *args, **kwargs):
        params = list(model.parameters())  # each tensor once: the tied embedding / LM head is one parameter
        base = model.get_base_model() if common.is_peft(model) else model
        trained = sum(p.numel() for p in params if p.requires_grad)
        scorer = type(base).__name__.endswith("ForSequenceClassification")
        biggest = max(params, key=lambda p: p.numel())
        held.append({"role": {(False, True): "policy", (False, False): "reference", (True, True): "critic",
                              (True, False): "reward model"}[scorer, trained > 0],
                     "dtype": str(biggest.dtype).replace("torch.", ""), "lora": common.is_peft(model),
                     "parameters": sum(p.numel() for p in params), "trained": trained,
                     "weight_bytes": sum(p.numel() * p.element_size() for p in params),
                     # AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype, the gradient has it too
                     "grad_adam_bytes": 3 * sum(p.numel() * p.element_size() for p in params if p.requires_grad)})
        return shard_model(model, *args, **kwargs)

    common.shard_model = recording_shard_model
    return held


def record_peak_before_save(common, torch) -> dict:
    """Wrap common.save_model: the peak memory of loading + training, before the final save adds its own buffers."""
    peak, save_model = {}, common.save_model

    def recording_save_model(*args, **kwargs):
        peak["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return save_model(*args, **kwargs)

    common.save_model = recording_save_model
    return peak


def record_sft_tokens(sft) -> list:
    """Wrap sft.collate: the tokens of each micro-batch as sft.py counts them (one micro-batch per step here)."""
    tokens, collate = [], sft.collate

    def recording_collate(batch, pad_token_id, device):
        input_ids, attention_mask, labels = collate(batch, pad_token_id, device)
        tokens.append(int(attention_mask.sum()))
        return input_ids, attention_mask, labels

    sft.collate = recording_collate
    return tokens


def run_memory(stage: str, setting: str, options: dict, steps: int, out_root: str) -> dict:
    """One --memory run: the script's main() on the random checkpoint, with what it holds and its throughput. The
    steady-state throughput leaves out the first step (first-call allocations): the script's own cumulative
    throughput of metrics.jsonl after each step gives that step's training time = work so far / throughput."""
    import torch

    import common

    module, cfg = memory_config(stage, options, steps, out_root, run_name(stage, setting))
    held, before_save = record_models(common), record_peak_before_save(common, torch)
    sft_tokens = record_sft_tokens(module) if stage == "sft" else None
    t0 = time.perf_counter()
    final = module.main(cfg)
    total_s = time.perf_counter() - t0
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    key = f"{WORK[stage]}_per_s"
    rows = [line for line in lines if key in line]  # one per step (log_every 1; PPO logs every iteration)
    if stage == "sft":
        work = [sum(sft_tokens[:i + 1]) for i in range(len(rows))]
    elif stage == "dpo":
        work = [line["step"] * cfg.per_device_batch_size * cfg.gradient_accumulation_steps for line in rows]
    else:
        work = [line["episodes"] for line in rows]
    seconds = [w / line[key] for w, line in zip(work, rows)]
    steady = (work[-1] - work[0]) / (seconds[-1] - seconds[0]) if len(rows) > 1 else None
    return {"stage": stage, "setting": setting, "options": options, "steps": len(rows), "models": held,
            "throughput": final[key], "steady_throughput": steady, "unit": UNIT[stage], "step_s": seconds,
            "total_s": total_s, "before_save": before_save}


def memory_main(cfg: Config) -> dict:
    out_root = cfg.output_dir.rstrip("/") + "_memory"
    path = out_root + ".json"
    os.makedirs(out_root, exist_ok=True)
    runs = [run for run in MEMORY_RUNS if run[0] in cfg.stages]
    print(f"=== memory benchmark: {len(runs)} runs of {cfg.memory_steps} steps, each in its own process ===",
          flush=True)
    results = {"model": MEMORY_MODEL, "steps": cfg.memory_steps, "cpu_count": os.cpu_count(),
               "stage_options": MEMORY_STAGE, "imports": run_child("imports", "none", 0, cfg, out_root),
               "build": run_child("build", "none", 0, cfg, out_root), "runs": []}
    if "error" in results["build"]:
        raise SystemExit(f"building the random checkpoints failed: {results['build']['error']}")
    for stage, setting, options in runs:
        print(f"\n=== {stage}, {setting}: {options} ===", flush=True)
        result = run_child("memory", stage, 0, cfg, out_root, (setting, options, cfg.memory_steps),
                           run_name(stage, setting) + "_result")
        results["runs"].append({"stage": stage, "setting": setting, "options": options, **result})
    print_memory_report(results, path)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    return results


def held_models(stage: str, models: list) -> str:
    """'policy fp32 + LoRA (also the reference, adapter off), reward model fp32, critic fp32 + LoRA'"""
    short = {"float32": "fp32", "bfloat16": "bf16"}
    parts = [f"{m['role']} {short.get(m['dtype'], m['dtype'])}{' + LoRA' if m['lora'] else ''}" for m in models]
    if stage != "sft" and not any(m["role"] == "reference" for m in models):
        parts[0] += " (also the reference, adapter off)"
    return ", ".join(parts)


def print_memory_report(results: dict, path: str) -> None:
    floor = results["imports"].get("peak_rss_mb", float("nan"))
    m = results["model"]
    print(f"\n=== memory: random Llama, {results['build']['parameters'] / 1e6:.1f}M parameters (hidden "
          f"{m['hidden_size']}, {m['num_hidden_layers']} layers, MLP {m['intermediate_size']}, vocab {m['vocab_size']} "
          f"tied), {results['steps']} steps of 16 toy sequences (PPO: 8 rollouts) each (details in {path}) ===")
    cuda = any("cuda_peak_mb" in r.get("before_save", {}) for r in results["runs"])
    print(f"{'stage':<6}{'setting':<21}{'backbones':>10}{'params M total / trained':>26}{'weights MB':>12}"
          f"{'grad+Adam MB':>14}{'peak RSS MB':>13}" + (f"{'CUDA MB':>10}" if cuda else "")
          + f"{'throughput':>23}   models held")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['stage']:<6}{r['setting']:<21}failed: {r['error']}")
            continue
        models = r["models"]
        params = f"{sum(x['parameters'] for x in models) / 1e6:.1f} / {sum(x['trained'] for x in models) / 1e6:.1f}"
        steady = r["steady_throughput"] if r["steady_throughput"] is not None else r["throughput"]
        line = (f"{r['stage']:<6}{r['setting']:<21}{len(models):>10}{params:>26}"
                f"{sum(x['weight_bytes'] for x in models) / 2 ** 20:>12.0f}"
                f"{sum(x['grad_adam_bytes'] for x in models) / 2 ** 20:>14.0f}{r['before_save']['peak_rss_mb']:>13.0f}")
        if cuda:
            line += f"{r['before_save'].get('cuda_peak_mb', float('nan')):>10.0f}"
        print(line + f"{steady:>12.3g} {r['unit']:<10}   {held_models(r['stage'], models)}")
        if r["stage"] == "sft" and r["setting"] == "fp32":
            print(f"{'sft':<6}{'bf16 frozen':<21}{'n/a: SFT holds no frozen model (= fp32)':>50}")
    print("\nbackbones: the models the process holds (each as the script hands it to common.shard_model); a LoRA "
          "reference is the policy with its adapter off, no copy. weights: their parameters (MB = 2^20 bytes); "
          "grad+Adam: computed, gradient + AdamW's two moments of each trained parameter in its dtype")
    print(f"peak RSS: ru_maxrss of the run's process up to the script's final save (loading, tokenising, training); "
          f"importing torch + transformers alone takes {floor:.0f} MB; the whole run's peak, save included, in {path}. "
          f"Not the sum of the columns: the backward frees activations while it fills the gradients, and frozen "
          f"fp32 weights are memory-mapped from the checkpoint, resident only where touched")
    print("throughput: the script's own unit and timer over steps 2 to N (the first step's allocations left out)")
    loads = [x for r in results["runs"] for x in r.get("load_average_1min", [])]
    if loads:
        print(f"machine: {os.cpu_count()} CPUs, 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the "
              f"runs (above the CPU count, other processes shared them: throughputs are lower and noisier than on a "
              f"quiet machine; the memory figures do not depend on it)")


def main(cfg: Config) -> dict:
    if cfg.memory:
        return memory_main(cfg)
    fraction = 0.1 if cfg.quick else cfg.fraction
    os.makedirs(cfg.output_dir, exist_ok=True)
    results = {"fraction": fraction, "cpu_count": os.cpu_count(), "stages": {},
               "imports": run_child("imports", "none", fraction, cfg)}
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        missing = [os.path.join(cfg.output_dir, s) for s in NEEDS[stage]
                   if not os.path.isdir(os.path.join(cfg.output_dir, s))]
        if missing:
            error = {"error": f"needs {' and '.join(missing)}: benchmark the earlier stages first"}
            results["stages"][stage] = summarise(stage, error, error)
            continue
        print(f"\n=== {stage}: script run (x {fraction:g} of its default length) ===", flush=True)
        script = run_child("script", stage, fraction, cfg)
        print(f"\n=== {stage}: bare loop ===", flush=True)
        bare = run_child("bare", stage, fraction, cfg)
        results["stages"][stage] = summarise(stage, script, bare)
    path = cfg.output_dir.rstrip("/") + ".json"
    print_report(results, fraction, path)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
