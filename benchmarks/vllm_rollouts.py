"""Rollouts with and without a vLLM engine: sampling throughput, and where one grpo.py iteration spends its time.

    LD_PRELOAD=.venv-vllm/lib/libiomp5.so .venv-vllm/bin/python benchmarks/vllm_rollouts.py --model smollm2 \
        --toy runs/sft

Run with the interpreter of the vLLM environment (README, "Fast rollouts"). Prints two tables:
  1. sampling: G samples of one chat prompt, max_new_tokens new tokens, temperature 1; tokens per second (the tokens
     generated up to each response's EOS) of common.generate (the training model, KV-cached) and of the engine, after
     one warm-up call of each. Each configuration once, in this process.
  2. one grpo.py iteration (the second of two, after warm-up) on --model: time/generate, time/score, time/train from
     its metrics.jsonl, without and with --use_vllm (train includes pushing the weights into the engine).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import harness  # noqa: E402

PROMPTS = ["What is photosynthesis?", "Why is the sky blue?", "How do airplanes fly?", "What is a black hole?"]


def sampling(path: str, samples: list[int], new_tokens: list[int], max_model_len: int) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(path)
    harness.check_eos(tok, path, "--model", tok.chat_template is not None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = types.SimpleNamespace(model_name_or_path=path, vllm_enable_sleep_mode=False, vllm_gpu_memory_utilization=None,
                                model=harness.ModelArgs(), run=harness.RunArgs(seed=0))
    llm = harness.vllm_engine(cfg, torch.device("cpu"), max_model_len)
    prompt = [{"role": "user", "content": PROMPTS[0]}] if tok.chat_template else "the phone was"
    ids = harness.render_prompt(prompt, tok)
    rows = []
    for G in samples:
        for T in new_tokens:
            gen = torch.Generator().manual_seed(0)
            query, query_mask = common.left_pad([ids] * G, tok.pad_token_id)
            times = {}
            for name in ("plain", "vllm"):
                for warm in (True, False):
                    t0 = time.time()
                    if name == "plain":
                        _, mask = common.generate(model, query, query_mask, T if not warm else 2, tok.eos_token_id,
                                                  tok.pad_token_id, 1.0, 0, 1.0, gen)
                    else:
                        _, mask, _ = harness.vllm_generate(llm, [ids] * G, T if not warm else 2, tok.eos_token_id,
                                                           tok.pad_token_id, 1.0, 0, 1.0, gen, "cpu")
                    times[name] = (time.time() - t0, int(mask.sum()))
            row = {"model": os.path.basename(path.rstrip("/")), "G": G, "max_new_tokens": T,
                   **{f"{n}_tokens_per_s": round(k / s, 1) for n, (s, k) in times.items()},
                   **{f"{n}_s": round(s, 2) for n, (s, _) in times.items()}}
            row["speedup"] = round(row["vllm_tokens_per_s"] / row["plain_tokens_per_s"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def grpo_iteration(path: str, prompts: str, use_vllm: bool) -> dict:
    out = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model_name_or_path", path, "--prompts", prompts,
           "--reward_fn", f"{os.path.join(ROOT, 'benchmarks', 'vllm_rollouts.py')}:length_reward",
           "--eval_prompts", "none", "--num_iterations", "2", "--rollout_batch_size", "2",
           "--num_samples_per_prompt", "8", "--max_new_tokens", "64", "--max_prompt_length", "64",
           "--overwrite_output_dir", "--output_dir", out] + (["--use_vllm"] if use_vllm else [])
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    row = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    return {"use_vllm": use_vllm, **{k: round(row[f"time/{k}"], 2) for k in ("generate", "score", "train")}}


def length_reward(completions, **kwargs):
    """A reward to run with: the response's length in words (any reward would do for timing)."""
    return [float(len((c[0]["content"] if isinstance(c, list) else c).split())) for c in completions]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a chat model's folder (e.g. SmolLM2-135M-Instruct, converted "
                        "as docs/data.md says)")
    parser.add_argument("--toy", help="the toy SFT model (runs/sft) for a row of its own")
    args = parser.parse_args()
    if args.toy:  # the toy's 64 positions: 48 new tokens at most
        sampling(args.toy, [8, 32], [48], 64)
    sampling(args.model, [8, 32], [64, 256], 512)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS)
    for use_vllm in (False, True):
        print(json.dumps(grpo_iteration(args.model, f.name, use_vllm)), flush=True)
