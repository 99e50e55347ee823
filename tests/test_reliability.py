"""Reliability: exact resume after kill -9, atomic saves, clean teardown, and a clear error for every kind of bad input
or option. Each script runs for real (in-process for the references, in a subprocess where it must be killed)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import common
import dpo
import ppo
import reward_model
import sft

SCRIPTS = {"sft": sft, "reward_model": reward_model, "dpo": dpo, "ppo": ppo}
TIMING = ("_per_s", "time/", "wall_time_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # in-process tests run with 1 thread too


def head_jsonl(src: str, dst, n: int) -> str:
    with open(os.path.join(ROOT, src)) as f:
        lines = [next(f) for _ in range(n)]
    with open(dst, "w") as f:
        f.writelines(lines)
    return str(dst)


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(t in k for t in TIMING)}


def read_rows(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [without_timing(json.loads(line)) for line in f]


def short_run(script: str, tmp_path, sft_ckpt: str, rm_ckpt: str) -> dict:
    """Options of a run of a few seconds that logs, evaluates and checkpoints at steps that do not line up."""
    if script == "sft":
        return dict(dataset=head_jsonl("data/toy/sft_train.jsonl", tmp_path / "sft.jsonl", 64),
                    eval_dataset=head_jsonl("data/toy/sft_eval.jsonl", tmp_path / "sft_eval.jsonl", 8),
                    per_device_batch_size=8, max_steps=14, log_every=3, eval_every=5, num_eval_generations=4,
                    max_new_tokens=6, save_every=2)
    if script == "reward_model":
        return dict(model_name_or_path=sft_ckpt,
                    dataset=head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 64),
                    eval_dataset=head_jsonl("data/toy/preferences_eval.jsonl", tmp_path / "p_eval.jsonl", 8),
                    per_device_batch_size=8, max_steps=14, log_every=3, eval_every=5, normalize_samples=8,
                    agreement_samples_per_prompt=1, max_new_tokens=6, save_every=2)
    if script == "dpo":
        return dict(model_name_or_path=sft_ckpt,
                    dataset=head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 64),
                    eval_dataset=head_jsonl("data/toy/preferences_eval.jsonl", tmp_path / "p_eval.jsonl", 8),
                    eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                    reward_model_path=rm_ckpt, per_device_batch_size=8, max_steps=14, log_every=3, eval_every=5,
                    eval_samples_per_prompt=2, max_new_tokens=6, save_every=2)
    return dict(model_name_or_path=sft_ckpt, reward_model_path=rm_ckpt,
                eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                rollout_batch_size=8, num_samples_per_prompt=2, max_new_tokens=6, max_steps=12, eval_every=5,
                eval_samples_per_prompt=1, save_every=2, adaptive_kl=True, kl_horizon=100, score_norm="running")


def cli_args(options: dict) -> list[str]:
    args = []
    for k, v in options.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no-{k}")
        else:
            args += [f"--{k}", str(v)]
    return args


def kill_after_first_checkpoint(cmd: list[str], out: str, delay: float, timeout: float = 240) -> bool:
    """Start cmd in its own process group, wait for its first checkpoint, sleep `delay`, then SIGKILL the whole group.
    Returns whether the process was still running when killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while common.latest_checkpoint(out) is None:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    time.sleep(delay)
    running = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had already finished
        pass
    proc.wait()
    proc.stderr.close()
    return running


def assert_same_run(reference: str, resumed: str, where: str) -> None:
    a, b = load_file(os.path.join(reference, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: weight {k} differs"
    assert read_rows(resumed) == read_rows(reference), f"{where}: metrics.jsonl differs"
    with open(os.path.join(reference, "eval.json")) as f, open(os.path.join(resumed, "eval.json")) as g:
        assert without_timing(json.load(g)) == without_timing(json.load(f)), f"{where}: eval.json differs"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_kill_9_at_a_random_moment_then_resume_is_exact(script, tmp_path, toy_sft_checkpoint, toy_reward_model):
    """The bar of exact resume: a run killed by SIGKILL at a random moment after its first checkpoint and resumed with
    --resume ends with bit-identical weights and the same metrics.jsonl rows as the run that was never interrupted."""
    module = SCRIPTS[script]
    options = short_run(script, tmp_path, toy_sft_checkpoint, toy_reward_model)
    reference = str(tmp_path / "reference")
    t0 = time.time()
    module.main(module.Config(**options, output_dir=reference))
    # any moment must do (the message says which one failed); up to the reference's duration, so that most kills land
    # in training, some in an evaluation or a save, and a few after the end
    delay = random.Random().uniform(0.0, time.time() - t0)
    killed = str(tmp_path / "killed")
    running = kill_after_first_checkpoint([sys.executable, f"{script}.py", *cli_args(options), "--output_dir", killed],
                                          killed, delay)
    module.main(module.Config(**options, output_dir=killed, resume=True))
    assert_same_run(reference, killed, f"{script} killed {delay:.2f}s after its first checkpoint (running: {running})")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary directories left behind"


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts each worker in its own session, so killing its group misses them)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def test_torchrun_two_processes_kill_9_then_resume_is_exact(tmp_path, toy_sft_checkpoint, toy_reward_model):
    """The same bar under torchrun (FSDP2, gloo): every process of a 2-process PPO run (per-rank sampling generators,
    actor and critic with their own optimisers, sharded torch.distributed.checkpoint shards) is SIGKILLed at a random
    moment after the first checkpoint; the resumed 2-process run ends exactly like the uninterrupted one."""
    options = short_run("ppo", tmp_path, toy_sft_checkpoint, toy_reward_model)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "ppo.py",
                *cli_args(options)]
    reference = str(tmp_path / "reference")
    t0 = time.time()
    subprocess.run(torchrun + ["--output_dir", reference], cwd=ROOT, env=ENV, check=True, capture_output=True,
                   timeout=300)
    delay = random.Random().uniform(0.0, (time.time() - t0) / 2)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(torchrun + ["--output_dir", killed], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while common.latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert common.latest_checkpoint(killed) is not None, "no checkpoint written"
    time.sleep(delay)
    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    resumed = subprocess.run(torchrun + ["--output_dir", killed, "--resume"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_run(reference, killed, f"2-process ppo killed {delay:.2f}s after its first checkpoint")
    shards = os.listdir(common.latest_checkpoint(killed))
    assert {"rank0.json", "rank1.json"} <= set(shards) and sum(n.endswith(".distcp") for n in shards) == 2


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a save: nothing after it runs, no cleanup either."""


def crash_at(monkeypatch, k: int) -> list:
    """Make the k-th file-system mutation of a save (rename, replace, remove, rmtree, atomic exchange, JSON write,
    checkpoint shard write) raise Killed instead of happening. Returns the list of the mutations that ran."""
    done = []

    def wrap(name, fn):
        def step(*args, **kwargs):
            if len(done) == k:
                raise Killed(name)
            done.append(name)
            return fn(*args, **kwargs)
        return step

    import torch.distributed.checkpoint as dcp

    for mod, name in [(os, "rename"), (os, "replace"), (os, "remove"), (common.shutil, "rmtree"),
                      (common.shutil, "copyfile"), (common, "_exchange"), (common, "write_json_atomic"),
                      (dcp, "save")]:
        monkeypatch.setattr(mod, name, wrap(name, getattr(mod, name)))
    return done


def tiny_model(seed: int):
    from conftest import make_tiny_checkpoint  # noqa: F401  (the same tiny config the other tests use)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2))


def check_model_dir(out: str, models: dict) -> str:
    """out holds a complete model that loads with plain transformers, and eval.json (if there) describes it."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    which = [name for name, m in models.items() if all(torch.equal(v, loaded[k]) for k, v in m.state_dict().items())]
    assert len(which) == 1, "weights are neither the old nor the new model"
    if os.path.exists(os.path.join(out, "eval.json")):
        with open(os.path.join(out, "eval.json")) as f:
            assert json.load(f)["model"] == which[0], "eval.json describes other weights"
    return which[0]


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_final_save_killed_at_every_step_leaves_a_loadable_model(tmp_path, monkeypatch, atomic_exchange):
    """Kill the save of a new model over an old one at each of its file-system steps in turn: the directory always
    holds one complete model that loads with transformers, with the eval.json of those weights beside it, and the run's
    log and checkpoints; the next run removes what the save left. Without an atomic exchange (not Linux) the
    directory is briefly missing between two renames, and the next run puts it back."""
    if not atomic_exchange:
        monkeypatch.setattr(common, "_exchange", lambda a, b: False)
    models = {"old": tiny_model(0), "new": tiny_model(1)}
    seen_new = False
    for k in range(100):
        out = str(tmp_path / f"run{k}" / "out")
        common.save_model(models["old"], None, out, {"model": "old"})
        os.makedirs(os.path.join(out, "checkpoints", "step_4"))
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write('{"step": 4}\n')
        with monkeypatch.context() as m:
            done = crash_at(m, k)
            try:
                common.save_model(models["new"], None, out, {"model": "new"})
                finished = True
            except Killed:
                finished = False
        if atomic_exchange or os.path.isdir(out):
            check_model_dir(out, models)
        common.prepare_output_dir(out)  # the next run
        seen_new |= check_model_dir(out, models) == "new"
        assert sorted(os.listdir(tmp_path / f"run{k}")) == ["out"], f"left behind after a kill at step {k}: {done}"
        assert os.path.isdir(os.path.join(out, "checkpoints", "step_4")), f"checkpoints lost at step {k}"
        with open(os.path.join(out, "metrics.jsonl")) as f:
            assert f.read() == '{"step": 4}\n', f"log lost at step {k}"
        if finished:
            break
    assert finished and seen_new and k > 3


def test_checkpoint_save_killed_at_every_step_leaves_the_previous_one(tmp_path, monkeypatch):
    """Kill a checkpoint save at each of its steps: the newest complete checkpoint is always loadable (the previous
    one, or the new one once it is renamed into place), and the next run removes the half-written one."""
    from types import SimpleNamespace

    model = tiny_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    config = SimpleNamespace(seed=1)
    for k in range(100):
        out = str(tmp_path / f"run{k}")
        logger = common.MetricsLogger(out)
        common.save_state(out, 2, {"model": model}, [optimizer], {}, {"x": 2}, logger, config, save_total_limit=1)
        with monkeypatch.context() as m:
            done = crash_at(m, k)
            try:
                common.save_state(out, 4, {"model": model}, [optimizer], {}, {"x": 4}, logger, config,
                                  save_total_limit=1)
                finished = True
            except (Killed, CheckpointException):  # torch.distributed.checkpoint wraps what its writer raised
                finished = False
        logger.close()
        common.prepare_output_dir(out)
        latest = common.latest_checkpoint(out)
        state = common.load_state(latest, {"model": model}, [optimizer], {}, config)
        assert state["state"]["x"] == state["step"] in (2, 4), (k, done)
        assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".")]
        if finished:
            assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_4"]  # save_total_limit=1
            break
    assert finished and k > 3
