"""grpo.py side by side with TRL 1.16's GRPOTrainer on the same work (the peer harness ../shared/peer/trl_grpo.py and
the README beside it). Not part of the tests.

    python sft.py && python reward_model.py     # once: the toy's runs/sft and runs/reward_model (~2 minutes)
    bash ../shared/peer/setup.sh                # once: /tmp/trl-venv with trl 1.16 (~2 minutes)
    python benchmarks/grpo_vs_trl.py            # 3 pairs of 30 iterations
    python benchmarks/grpo_vs_trl.py --pairs 5 --sft runs/benchmark/sft --reward_model runs/benchmark/reward_model

How long on 2 CPU cores (an ESTIMATE from a 2-iteration smoke run on a shared machine): about 2 minutes a side for 30
iterations, so ~12 minutes for the default 3 pairs.

The work of both sides, per iteration (TRL: per generation batch): 16 prompts of data/toy/prompts_train.jsonl x 8
completions of at most 16 new tokens, scored by the reward model; 2 passes (grpo.py --update_epochs, TRL's
num_iterations) of 2 optimiser steps each; beta 0.2 times the k3 KL to the frozen SFT model in the loss; the GRPO
paper's loss aggregation (seq_mean_token_mean; TRL loss_type grpo); AdamW at 1e-4, linear decay; CPU and fp32 (CUDA is
hidden from both); no evaluation, no samples printed. Each side runs as a whole process (imports, loading, training,
saving) into a fresh output directory; the two alternate, the project first in odd pairs and TRL first in even ones,
so that a drift in the machine's load falls on both.

Printed: each pair's wall and CPU seconds of both sides (CPU: the child's user + system time, from wait4; above the
wall time when it used several cores), then the medians and the ratio of medians project / TRL (below 1: grpo.py
takes less). Written: runs/grpo_vs_trl.json; each run's output in runs/grpo_vs_trl/{project,trl}_N.log.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Config:
    pairs: int = 3
    """runs of each side (alternating)"""
    iterations: int = 30
    """grpo.py --num_iterations = TRL's --generation_batches"""
    sft: str = "runs/sft"
    """the policy to start from (python sft.py)"""
    reward_model: str = "runs/reward_model"
    """the reward (python reward_model.py)"""
    trl_python: str = "/tmp/trl-venv/bin/python"
    """the TRL side's interpreter (bash ../shared/peer/setup.sh); missing: the TRL side is skipped"""
    trl_script: str = "../shared/peer/trl_grpo.py"
    threads: int | None = None
    """--threads of both sides (default: torch's own)"""
    output_dir: str = "runs/grpo_vs_trl"


def commands(cfg: Config, out: str) -> dict:
    """The command of each side, into out/{side}_N (N filled in later)."""
    threads = ["--threads", str(cfg.threads)] if cfg.threads else []
    return {
        "project": [sys.executable, "grpo.py", "--model_name_or_path", cfg.sft, "--reward_model_path", cfg.reward_model,
                    "--prompts", "data/toy/prompts_train.jsonl", "--num_iterations", str(cfg.iterations),
                    "--rollout_batch_size", "16", "--num_samples_per_prompt", "8", "--max_new_tokens", "16",
                    "--update_epochs", "2", "--num_minibatches", "2", "--kl_coef", "0.2", "--kl_in_loss",
                    "--kl_estimator", "k3", "--loss_agg", "seq_mean_token_mean", "--learning_rate", "1e-4",
                    "--dtype", "float32", "--eval_prompts", "none", "--sample_every", "100000",
                    "--output_dir", f"{out}/project_N", "--overwrite_output_dir", *threads],
        "trl": [cfg.trl_python, cfg.trl_script, "--model", cfg.sft, "--reward_model", cfg.reward_model,
                "--train_file", "data/toy/prompts_train.jsonl", "--generation_batches", str(cfg.iterations),
                "--prompts_per_batch", "16", "--num_generations", "8", "--max_completion_length", "16",
                "--num_iterations", "2", "--steps_per_generation", "2", "--beta", "0.2", "--loss_type", "grpo",
                "--lr", "1e-4", "--output_dir", f"{out}/trl_N", *threads],
    }


def timed(command: list[str], log: str) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS of the command as a child process."""
    shutil.rmtree(command[command.index("--output_dir") + 1], ignore_errors=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - t0
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{command[1]} failed (exit status {process.returncode}); its output: {log}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(cfg: Config) -> dict:
    for path, script in ((cfg.sft, "sft.py"), (cfg.reward_model, "reward_model.py")):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"{path}: not found; run `python sft.py && python reward_model.py` first, or pass --sft / "
                             f"--reward_model (here {script} writes it)")
    sides = ["project", "trl"]
    if not os.access(cfg.trl_python, os.X_OK):
        print(f"TRL side skipped: {cfg.trl_python} not found; make it with `bash ../shared/peer/setup.sh`", flush=True)
        sides = ["project"]
    os.makedirs(cfg.output_dir, exist_ok=True)
    cmds, pairs = commands(cfg, cfg.output_dir), []
    for i in range(1, cfg.pairs + 1):
        pair = {}
        for side in sides if i % 2 else sides[::-1]:
            command = [a.replace("_N", f"_{i}") for a in cmds[side]]
            pair[side] = timed(command, f"{cfg.output_dir}/{side}_{i}.log")
        pairs.append(pair)
        print(f"pair {i}: " + " | ".join(f"{side} wall {pair[side]['wall_s']:.1f} s, CPU {pair[side]['cpu_s']:.1f} s"
                                         for side in sides), flush=True)
    medians = {side: {k: statistics.median(p[side][k] for p in pairs) for k in ("wall_s", "cpu_s")} for side in sides}
    ratios = {k: medians["project"][k] / medians["trl"][k] for k in ("wall_s", "cpu_s")} if "trl" in medians else None
    print("medians: " + " | ".join(f"{side} wall {m['wall_s']:.1f} s, CPU {m['cpu_s']:.1f} s"
                                   for side, m in medians.items()))
    if ratios:
        print(f"ratio of medians project / TRL: wall {ratios['wall_s']:.2f}, CPU {ratios['cpu_s']:.2f}")
    results = {"iterations": cfg.iterations, "cpu_count": os.cpu_count(), "commands": cmds, "pairs": pairs,
               "medians": medians, "ratio_project_over_trl": ratios}
    with open(f"{cfg.output_dir}.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {cfg.output_dir}.json")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
