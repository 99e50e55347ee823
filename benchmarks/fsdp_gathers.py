"""FSDP2 all-gathers per rollout, and the time of a GRPO iteration, with the parameters gathered once per rollout
(common.gathered, what the scripts do) or, with --per_step, at every decoding step (FSDP2's default, the code before).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_gathers.py [--per_step] GRPO_OPTIONS

Prints one RESULT line (rank 0): every rollout's all-gathers, decoding steps and seconds, and each iteration's
generate + score + train seconds (grpo.py's own time/*).
"""
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
import harness
import grpo  # noqa: E402

once = "--per_step" not in sys.argv
sys.argv = [a for a in sys.argv if a != "--per_step"]
if not once:  # what the code did before issue 18: FSDP2's own all-gather at every decoding step
    common.gathered = lambda model: contextlib.nullcontext()
gathers, depth, calls = [0], [0], []

def counted(fn):
    def wrapper(*a, **k):
        gathers[0] += depth[0] == 0
        depth[0] += 1
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
    return wrapper

for name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
    if hasattr(dist, name):
        setattr(dist, name, counted(getattr(dist, name)))
generate = common.generate

def counting(model, *a, **k):
    steps, before, t0 = [], gathers[0], time.time()
    h = model.register_forward_pre_hook(lambda m, i: steps.append(1))
    try:
        return generate(model, *a, **k)
    finally:
        h.remove()
        calls.append({"gathers": gathers[0] - before, "steps": len(steps), "s": round(time.time() - t0, 3)})

common.generate = counting
out = sys.argv[sys.argv.index("--output_dir") + 1]
grpo.main(harness.parse(grpo.Config))
if int(os.environ.get("RANK", 0)) == 0:
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    it = [r for r in rows if "time/train" in r]
    print("RESULT", json.dumps({"gather_once": once, "rollouts": calls,
          "iteration_s": [round(r["time/generate"] + r["time/score"] + r["time/train"], 2) for r in it],
          "generate_s": [round(r["time/generate"], 2) for r in it]}))
