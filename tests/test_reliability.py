"""Reliability: exact resume after kill -9, saves that a kill at any moment cannot break, the output directory (lock,
refusal of an earlier run's directory), and a clear error for every kind of bad input or option. Each script runs for
real (in-process for the references, in a subprocess where it must be killed)."""

import builtins
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import transformers.modeling_utils
from conftest import ROOT, head_jsonl, make
from safetensors.torch import load_file

import dpo
import grpo
import harness
import ppo
import reward_model
import sft
import toy_task

SCRIPTS = {"sft": sft, "reward_model": reward_model, "dpo": dpo, "ppo": ppo, "grpo": grpo}
TIMING = ("_per_s", "time/", "wall_time_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # in-process tests run with 1 thread too


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
    if script == "grpo":  # dynamic sampling draws extra rounds from the prompt order: resumed too
        return dict(model_name_or_path=sft_ckpt, reward_model_path=rm_ckpt, rollout_batch_size=4,
                    num_samples_per_prompt=4, max_new_tokens=6, num_iterations=8, eval_every=5,
                    eval_samples_per_prompt=1,
                    eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                    save_every=2, dynamic_sampling=True, max_sampling_rounds=2)
    return dict(model_name_or_path=sft_ckpt, reward_model_path=rm_ckpt,
                eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                rollout_batch_size=8, num_samples_per_prompt=2, max_new_tokens=6, num_iterations=8, eval_every=5,
                eval_samples_per_prompt=1, save_every=2, adaptive_kl=True, kl_horizon=100, score_norm="running",
                update_epochs=2)


def cli_args(options: dict) -> list[str]:
    args = []
    for k, v in options.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no_{k}")
        else:
            args += [f"--{k}", str(v)]
    return args


def kill_after_first_checkpoint(cmd: list[str], out: str, delay: float, timeout: float = 240) -> bool:
    """Start cmd in its own process group, wait for its first checkpoint, sleep `delay`, then SIGKILL the whole group.
    Returns whether the process was still running when killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not harness.checkpoints(out):
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
    a = load_file(os.path.join(reference, "model.safetensors"))
    b = load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: weight {k} differs"
    assert read_rows(resumed) == read_rows(reference), f"{where}: metrics.jsonl differs"
    with open(os.path.join(reference, "eval.json")) as f, open(os.path.join(resumed, "eval.json")) as g:
        resumed_eval, reference_eval = json.load(g), json.load(f)
        for e in (resumed_eval, reference_eval):
            e.pop("config", None)  # grpo.py records its options (resume, output_dir differ)
        assert without_timing(resumed_eval) == without_timing(reference_eval), f"{where}: eval.json differs"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_kill_9_at_a_random_moment_then_resume_is_exact(script, tmp_path, toy_sft_checkpoint, toy_reward_model):
    """The bar of exact resume: a run killed by SIGKILL at a random moment after its first checkpoint and resumed with
    --resume ends with bit-identical weights and the same metrics.jsonl rows as the run that was never interrupted."""
    module = SCRIPTS[script]
    options = short_run(script, tmp_path, toy_sft_checkpoint, toy_reward_model)
    reference = str(tmp_path / "reference")
    t0 = time.time()
    module.main(make(module.Config, **options, output_dir=reference))
    # any moment must do (the message says which one failed); up to the reference's duration, so that most kills land
    # in training, some in an evaluation or a save, and a few after the end
    delay = random.Random().uniform(0.0, time.time() - t0)
    killed = str(tmp_path / "killed")
    running = kill_after_first_checkpoint([sys.executable, f"{script}.py", *cli_args(options), "--output_dir", killed],
                                          killed, delay)
    module.main(make(module.Config, **options, output_dir=killed, resume=True))
    assert_same_run(reference, killed, f"{script} killed {delay:.2f}s after its first checkpoint (running: {running})")
    assert_clean(killed)


def test_kill_9_then_resume_with_tools_is_exact(tmp_path, toy_tools_sft_checkpoint):
    """The same bar for grpo.py's multi-turn rollouts on the tools toy (the tool run between turns, its result in the
    context): killed at a random moment after its first checkpoint, the resumed run ends bit-identical."""
    options = dict(model_name_or_path=toy_tools_sft_checkpoint, rollout_batch_size=4, num_samples_per_prompt=4,
                   num_iterations=8, eval_every=5, eval_samples_per_prompt=1, save_every=2,
                   eval_prompts=head_jsonl("data/toy/tools/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2))
    reference = str(tmp_path / "reference")
    t0 = time.time()
    grpo.main(make(grpo.Config, **options, output_dir=reference))
    assert sum(r["tools/calls"] for r in read_rows(reference) if "tools/calls" in r) > 0  # the tool path ran
    delay = random.Random().uniform(0.0, time.time() - t0)
    killed = str(tmp_path / "killed")
    running = kill_after_first_checkpoint([sys.executable, "grpo.py", *cli_args(options), "--output_dir", killed],
                                          killed, delay)
    grpo.main(make(grpo.Config, **options, output_dir=killed, resume=True))
    assert_same_run(reference, killed, f"grpo --tools killed {delay:.2f}s after its first checkpoint ({running=})")
    assert_clean(killed)


def assert_clean(out: str) -> None:
    """A run that ended left no lock and nothing of an interrupted save (.saving, checkpoints/.tmp_*)."""
    assert not {".lock", ".saving"} & set(os.listdir(out)), os.listdir(out)
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".")]


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
    # shorter than short_run's (2 processes on gloo are slow): checkpoint at 2, evaluation at 3, the end at 4
    options = {**short_run("ppo", tmp_path, toy_sft_checkpoint, toy_reward_model), "num_iterations": 4,
               "update_epochs": 1, "eval_every": 3}
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
    while not harness.checkpoints(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert harness.checkpoints(killed), "no checkpoint written"
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
    found = harness.checkpoints(killed)
    shards = os.listdir(found[max(found)])
    assert {"rank0.json", "rank1.json"} <= set(shards) and sum(n.endswith(".distcp") for n in shards) == 2
    assert_clean(killed)


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a save: nothing after it runs, no cleanup either."""


def crash_at(monkeypatch, k: int) -> list:
    """Make the k-th file-system step from now on raise Killed instead of happening: creating, renaming or removing a
    file or folder (also each one inside shutil.rmtree), opening a file for writing (json files, checkpoint shards),
    writing a safetensors file. Returns the steps that ran."""
    done = []

    def wrap(name, fn):
        def step(*args, **kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if name == "open" and not any(c in mode for c in "wax+"):
                return fn(*args, **kwargs)  # reading changes nothing
            if len(done) == k:
                raise Killed(f"{name} {args[0]}")
            done.append(f"{name} {args[0]}")
            return fn(*args, **kwargs)
        return step

    for module, name in [(os, "rename"), (os, "replace"), (os, "remove"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
                         (shutil, "rmtree"), (builtins, "open"), (io, "open"),
                         (transformers.modeling_utils, "safe_save_file")]:
        monkeypatch.setattr(module, name, wrap(name, getattr(module, name)))
    return done


def tiny_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2))


def train_step(model, optimizer) -> None:
    ids = torch.randint(0, 40, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model, optimizer) -> list[tuple[str, torch.Tensor]]:
    """Every weight and every tensor of the optimiser's state (AdamW's step and moments), copied."""
    weights = [(k, v.clone()) for k, v in model.state_dict().items()]
    moments = [(f"{i}.{k}", v.clone()) for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()]
    return weights + moments


def same(a: list, b: list) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


def test_checkpoint_save_killed_at_every_step_leaves_the_previous_one_to_resume(tmp_path, monkeypatch):
    """Kill the save of a second checkpoint at each of its file-system steps in turn: the next run (--resume) removes
    the half-written one and resumes from the newest complete checkpoint, the previous one or, once renamed into
    place, the new one, with that step's weights, optimiser moments and state."""
    for k in range(200):
        out = str(tmp_path / f"run{k}")
        cfg = make(sft.Config, output_dir=out, save_every=2, save_total_limit=1)
        harness.prepare_output_dir(cfg.run, 0)
        model = tiny_model(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        saved = {}
        for step in (2, 4):
            train_step(model, optimizer)
            saved[step] = snapshot(model, optimizer)
            state = {"x": step, "generator": torch.Generator().manual_seed(step)}
            if step == 2:
                harness.save_checkpoint(cfg, step, 10, {"model": model}, [optimizer], state)
                continue
            with monkeypatch.context() as m:
                done = crash_at(m, k)
                try:
                    harness.save_checkpoint(cfg, step, 10, {"model": model}, [optimizer], state)
                    finished = True
                except (Killed, dcp.CheckpointException):  # DCP wraps what its writer raised
                    finished = False
        resumed = make(sft.Config, output_dir=out, save_every=2, save_total_limit=1, resume=True)
        harness.prepare_output_dir(resumed.run, 0)  # the next run
        assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".")], (k, done)
        fresh = tiny_model(1)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        state = {"x": 0, "generator": torch.Generator()}
        step = harness.resume(resumed, {"model": fresh}, [fresh_optimizer], state)
        assert step in (2, 4) and state["x"] == step, (k, done)
        assert same(snapshot(fresh, fresh_optimizer), saved[step]), (k, done)
        assert torch.equal(state["generator"].get_state(), torch.Generator().manual_seed(step).get_state())
        harness.release_lock()
        if finished:
            assert sorted(harness.checkpoints(out)) == [4]  # save_total_limit=1
            break
    assert finished and k > 5


def files_of(folder: str) -> dict:
    """{path under folder: sha256} of every file below folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def check_model_dir(out: str, model) -> None:
    """out holds the complete model (it loads with plain transformers, the weights are model's) and eval.json."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items()), "not the saved weights"
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == {"model": "final"}


def test_final_save_killed_at_every_step_leaves_the_checkpoints_and_no_wrong_eval_json(tmp_path, monkeypatch):
    """Kill the final save at each of its file-system steps in turn: the checkpoints and the log stay as they were and
    --resume loads them, the next run removes what the save left (.saving), and an eval.json in output_dir always sits
    beside the complete model it describes (it is moved in last)."""
    tok, model = toy_task.build_tokenizer(), tiny_model(1)
    for k in range(300):
        out = str(tmp_path / f"run{k}")
        cfg = make(sft.Config, output_dir=out, save_every=2)
        harness.prepare_output_dir(cfg.run, 0)
        harness.save_checkpoint(cfg, 2, 4, {"model": model}, [torch.optim.AdamW(model.parameters())], {"x": 2})
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write('{"step": 2}\n')
        kept = lambda: {p: h for p, h in files_of(out).items() if p.startswith("checkpoints") or  # noqa: E731
                        p == "metrics.jsonl"}
        before = kept()
        with monkeypatch.context() as m:
            done = crash_at(m, k)
            try:
                harness.save_model(cfg, model, tok, {"model": "final"})
                finished = True
            except Killed:
                finished = False
        assert kept() == before, f"checkpoints or log changed by a kill at step {k}: {done}"
        if os.path.exists(os.path.join(out, "eval.json")):
            check_model_dir(out, model)
        resumed = make(sft.Config, output_dir=out, save_every=2, resume=True)
        harness.prepare_output_dir(resumed.run, 0)  # the next run
        assert ".saving" not in os.listdir(out), (k, done)
        state = {"x": 0}
        fresh = tiny_model(2)
        assert harness.resume(resumed, {"model": fresh}, [torch.optim.AdamW(fresh.parameters())], state) == 2, (k, done)
        assert state["x"] == 2
        harness.release_lock()
        if finished:
            check_model_dir(out, model)
            break
    assert finished and k > 5


@pytest.mark.parametrize("moved", [0, 3])
def test_run_killed_in_its_final_save_resumes_to_the_complete_model(tmp_path, monkeypatch, moved):
    """sft.py killed in its final save, all of it written to output_dir/.saving and `moved` files moved into
    output_dir (3: a config and weights there, no tokenizer, no eval.json): the checkpoints are intact, and a rerun
    with --resume ends with the model, eval.json and log of a run that was never interrupted."""
    options = dict(max_steps=4, save_every=2, log_every=1, eval_every=3)
    reference = str(tmp_path / "reference")
    sft.main(sft_config(tmp_path, output_dir=reference, **options))
    save_model, replace, replaced = harness.save_model, os.replace, []

    def kill_in_save(*args, **kwargs):
        def counted(src, dst):
            if len(replaced) == moved:
                raise Killed(dst)
            replaced.append(dst)
            replace(src, dst)

        with monkeypatch.context() as m:
            m.setattr(os, "replace", counted)
            save_model(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(harness, "save_model", kill_in_save)
        with pytest.raises(Killed):
            sft.main(sft_config(tmp_path, **options))
    out = str(tmp_path / "out")
    assert len(replaced) == moved and not os.path.exists(os.path.join(out, "eval.json"))
    assert sorted(harness.checkpoints(out)) == [2] and os.path.isdir(os.path.join(out, ".saving"))
    sft.main(sft_config(tmp_path, **options, resume=True))
    assert_same_run(reference, out, f"killed in the final save after {moved} files")
    assert_clean(out)


@pytest.mark.parametrize("where", ["open", "write"])
def test_full_disk_in_a_checkpoint_save_is_one_clear_error_and_the_previous_checkpoint_resumes(tmp_path, monkeypatch,
                                                                                              where):
    """The disk fills up while the checkpoint of step 4 is written, when a file is opened or in the middle of a write
    (torch's zip writer then raises RuntimeError "unexpected pos", from the OSError; seen on a 20 MiB tmpfs): one
    InputError naming output_dir and the space the checkpoint needs; the half-written checkpoint is gone, that of step
    2 is kept, and --resume from it ends like a run that was never interrupted."""
    options = dict(max_steps=6, save_every=2, log_every=1, eval_every=3)
    reference = str(tmp_path / "reference")
    sft.main(sft_config(tmp_path, output_dir=reference, **options))
    real_open, real_write_item = io.open, dcp_filesystem._write_item

    def full_disk(file, mode="r", *args, **kwargs):
        if ".tmp_step_4" in str(file) and any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    def full_disk_in_write(transforms, stream, *args, **kwargs):
        if ".tmp_step_4" in str(stream.name):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_write_item(transforms, stream, *args, **kwargs)

    out = str(tmp_path / "out")
    with monkeypatch.context() as m:
        if where == "open":
            m.setattr(builtins, "open", full_disk)
            m.setattr(io, "open", full_disk)
        else:
            m.setattr(dcp_filesystem, "_write_item", full_disk_in_write)
        with pytest.raises(harness.InputError) as error:
            sft.main(sft_config(tmp_path, **options))
    assert re.fullmatch(rf"--output_dir {re.escape(out)}: saving the checkpoint of step 4 failed \(No space left on "
                        r"device\); it needs about \d+\.\d\d GiB, \d+\.\d\d GiB are free; the earlier checkpoints are "
                        "intact", str(error.value)), str(error.value)
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step_2"]
    sft.main(sft_config(tmp_path, **options, resume=True))
    assert_same_run(reference, out, "resumed after a full disk")
    assert_clean(out)


# ---------------------------------------------------------------------------------------------------------------------
# the output directory: a mount point, a lock, an earlier run, the options and checkpoints a resume finds
# ---------------------------------------------------------------------------------------------------------------------
def test_output_dir_that_cannot_be_renamed_a_mount_point(tmp_path, monkeypatch):
    """output_dir is a mount point: renaming it, or anything onto it, fails with EBUSY. A run trains, checkpoints and
    saves its final model there, and a resumed run too (output_dir itself is never renamed)."""
    out = str(tmp_path / "out")
    real = {name: getattr(os, name) for name in ("rename", "replace")}

    def busy(name):
        def rename(src, dst, *args, **kwargs):
            if os.path.realpath(out) in (os.path.realpath(src), os.path.realpath(dst)):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src)
            return real[name](src, dst, *args, **kwargs)
        return rename

    for name in real:
        monkeypatch.setattr(os, name, busy(name))
    os.makedirs(out)
    with pytest.raises(OSError, match="busy"):  # the simulation is in place
        os.rename(out, out + ".old")
    options = dict(max_steps=4, save_every=2, log_every=1, eval_every=3)
    final = sft.main(sft_config(tmp_path, **options))
    weights, rows = load_file(os.path.join(out, "model.safetensors")), read_rows(out)
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["train_steps"] == final["train_steps"] == 4
    assert sorted(harness.checkpoints(out)) == [2] and len(rows) > 4
    sft.main(sft_config(tmp_path, **options, resume=True))  # from step 2: the same run again
    again = load_file(os.path.join(out, "model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert read_rows(out) == rows
    assert_clean(out)


def test_a_second_run_into_a_locked_output_dir_is_refused_and_the_lock_freed_by_a_kill(tmp_path):
    """output_dir/.lock is flock-ed by the run using it: a second run is refused while that process holds it, and
    takes it once the holder is gone, killed with -9 (the kernel releases the lock; the file stays behind)."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(harness.InputError, match=rf"^--output_dir {out}: in use by another run; wait for it to end "
                                                    "or choose another directory$"):
            sft.main(sft_config(tmp_path))
        assert os.listdir(out) == [".lock"]  # untouched
    finally:
        holder.kill()
        holder.wait()
    sft.main(sft_config(tmp_path))  # the killed holder's lock file is still there, its lock is not
    assert "model.safetensors" in os.listdir(out) and ".lock" not in os.listdir(out)  # released at the end


def test_non_empty_output_dir_is_refused_without_resume_or_overwrite(tmp_path):
    """A run into a directory that holds an earlier run is refused before it touches anything (and releases the lock
    it took); --overwrite_output_dir empties the directory first, so nothing of the earlier run (checkpoints, log)
    is left to mix with the new one."""
    sft.main(sft_config(tmp_path, max_steps=4, save_every=2, log_every=1, eval_every=100))
    out = str(tmp_path / "out")
    before = files_of(out)
    with pytest.raises(harness.InputError, match=rf"^--output_dir {out}: holds an earlier run \(checkpoints, "
                                                r"config.json, eval.json, generation_config.json\); "
                                                r"--resume continues it, "
                                                "--overwrite_output_dir starts over, or choose another directory$"):
        sft.main(sft_config(tmp_path, max_steps=3, seed=2))
    assert files_of(out) == before and ".lock" not in before  # untouched, and not locked by the refused run
    sft.main(sft_config(tmp_path, max_steps=3, seed=3, log_every=1, eval_every=100, overwrite_output_dir=True))
    assert sorted(os.listdir(out)) == ["config.json", "eval.json", "generation_config.json", "metrics.jsonl",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 3]  # the new run's rows only
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["train_steps"] == 3


def test_resume_cuts_the_log_back_to_the_checkpoint_so_it_equals_an_uninterrupted_runs(tmp_path):
    config = sft_config(tmp_path, max_steps=6, save_every=2, log_every=1, eval_every=3)
    sft.main(config)
    out = config.run.output_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        complete = f.read().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in complete] == [1, 2, 3, 3, 4, 5, 6, 6]
    # as if killed after logging step 5 (and a stray row of a later step), with checkpoints at 2 and 4
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write("".join(complete[:6]) + json.dumps({"step": 7, "loss": 0.0}) + "\n")
    sft.main(sft_config(tmp_path, max_steps=6, save_every=2, log_every=1, eval_every=3, resume=True))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 6]  # each step once: rows up to 4 kept from the first run
    assert [without_timing(r) for r in rows] == [without_timing(json.loads(line)) for line in complete]
    with open(os.path.join(out, "checkpoints", "step_4", "trainer_state.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 4 and saved["config"]["max_steps"] == 6 and saved["config"]["run"]["save_every"] == 2


def test_resume_with_another_lora_setup_is_refused(tmp_path, toy_sft_checkpoint):
    """Adding or removing --lora_r between a run and its resume: the checkpoint holds other weights (the whole model,
    or an adapter): refused, naming the option and the checkpoint's value."""
    options = dict(model_name_or_path=toy_sft_checkpoint, from_scratch=False, max_steps=3, save_every=2,
                   eval_every=100)
    for trained, resumed in ((0, 4), (4, 0)):
        out = str(tmp_path / f"lora{trained}")
        sft.main(sft_config(tmp_path, output_dir=out, lora_r=trained, **options))
        step_2 = harness.checkpoints(out)[2]
        with pytest.raises(harness.InputError, match=rf"^--resume: {step_2} was trained with --lora_r {trained}; "
                                                    r"resume with the same \(the checkpoint holds other weights\)$"):
            sft.main(sft_config(tmp_path, output_dir=out, lora_r=resumed, resume=True, **options))


def test_truncated_checkpoint_shard_is_one_error_naming_the_checkpoint(tmp_path):
    """A checkpoint whose shard was cut short (a disk that filled up, a copy that stopped): one InputError naming it,
    saying to delete it to resume from the older one, which then works (or, with no older one, to start over)."""
    options = dict(max_steps=6, save_every=2, save_total_limit=2, log_every=1, eval_every=3)
    sft.main(sft_config(tmp_path, **options))
    out = str(tmp_path / "out")
    weights, rows = load_file(os.path.join(out, "model.safetensors")), read_rows(out)

    def truncate(checkpoint: str) -> None:
        shard = next(os.path.join(checkpoint, n) for n in sorted(os.listdir(checkpoint)) if n.endswith(".distcp"))
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)

    found = harness.checkpoints(out)
    assert sorted(found) == [2, 4]
    truncate(found[4])
    with pytest.raises(harness.InputError) as error:
        sft.main(sft_config(tmp_path, **options, resume=True))
    assert re.fullmatch(rf"--resume: {re.escape(found[4])} cannot be read \(.+\); delete it to resume from "
                        rf"{re.escape(found[2])}", str(error.value)), str(error.value)
    shutil.rmtree(found[4])  # as the message says
    sft.main(sft_config(tmp_path, **options, resume=True))
    again = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights) and read_rows(out) == rows
    found = harness.checkpoints(out)
    shutil.rmtree(found[2])
    truncate(found[4])
    with pytest.raises(harness.InputError, match=rf"^--resume: {found[4]} cannot be read \(.+\); run without --resume "
                                                "to start over$"):
        sft.main(sft_config(tmp_path, **options, resume=True))


def test_threads_option_sets_torchs_thread_count(tmp_path):
    try:
        for threads, before in ((1, 2), (2, 1)):
            torch.set_num_threads(before)
            cfg = harness.parse(sft.Config, ["--threads", str(threads), "--output_dir", str(tmp_path / str(threads))])
            assert cfg.run.threads == threads
            harness.setup(cfg, "sft", sft.PRETRAINED)
            assert torch.get_num_threads() == threads
            harness.release_lock()
    finally:
        torch.set_num_threads(1)  # conftest's


# ---------------------------------------------------------------------------------------------------------------------
# bad options: refused when the config is built (tyro reports them with the option's name before anything loads)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,options,message", [
    ("sft", dict(per_device_batch_size=0), "--per_device_batch_size must be > 0, got 0"),
    ("sft", dict(num_epochs=0.0), "--num_epochs must be > 0"),
    ("sft", dict(max_length=-5), "--max_length must be > 0"),
    ("sft", dict(max_new_tokens=0), "--max_new_tokens must be > 0"),
    ("sft", dict(num_eval_generations=-1), "--num_eval_generations must be >= 0"),
    ("sft", dict(warmup_ratio=1.5), "--warmup_ratio must be between 0 and 1"),
    ("sft", dict(top_p=0.0), r"--top_p must be in \(0, 1\]"),
    ("sft", dict(learning_rate=float("nan")), "--learning_rate must be > 0, got nan"),
    ("sft", dict(max_steps=0), "--max_steps must be > 0"),
    ("sft", dict(save_total_limit=0), "--save_total_limit must be > 0"),
    ("sft", dict(threads=0), "--threads must be > 0"),
    ("sft", dict(resume=True, overwrite_output_dir=True), "--resume continues the run in output_dir, "
                                                          "--overwrite_output_dir deletes it: pick one"),
    ("sft", dict(merge_lora=True), r"--merge_lora needs --lora_r > 0"),
    ("reward_model", dict(per_device_batch_size=0), "--per_device_batch_size must be > 0"),
    ("reward_model", dict(normalize_samples=-1), "--normalize_samples must be >= 0"),
    ("reward_model", dict(save_every=-2), "--save_every must be >= 0"),
    ("dpo", dict(beta=0.0), "--beta must be > 0"),
    ("dpo", dict(label_smoothing=0.5), r"--label_smoothing must be in \[0, 0.5\)"),
    ("dpo", dict(temperature=0.0), "--temperature must be > 0"),
    ("dpo", dict(num_epochs=0.0), "--num_epochs must be > 0"),
    ("ppo", dict(rollout_batch_size=0), "--rollout_batch_size must be > 0"),
    ("ppo", dict(num_iterations=0), "--num_iterations must be > 0"),
    ("ppo", dict(temperature=0.0), "--temperature must be > 0"),  # the log-probs divide by it
    ("ppo", dict(num_samples_per_prompt=-1), "--num_samples_per_prompt must be > 0"),
    ("ppo", dict(gamma=1.2), "--gamma must be between 0 and 1"),
    ("ppo", dict(kl_coef=-0.1), "--kl_coef must be >= 0"),
    ("ppo", dict(update_epochs=0), "--update_epochs must be > 0"),
    ("ppo", dict(top_k=-1), "--top_k must be >= 0"),
    ("grpo", dict(num_samples_per_prompt=1), "--advantage_estimator grpo needs --num_samples_per_prompt >= 2"),
    ("grpo", dict(clip_range=1.0), "--clip_range must be < 1"),
    ("grpo", dict(clip_range=0.2, clip_range_high=0.1), r"--clip_range_high 0.1 < --clip_range 0.2: clip-higher "
                                                        "widens the upper range"),
    ("grpo", dict(temperature=0.0), "--temperature must be > 0"),
    ("grpo", dict(max_sampling_rounds=0), "--max_sampling_rounds must be > 0"),
    ("grpo", dict(overlong_buffer=100, max_new_tokens=16), "--overlong_buffer 100 exceeds --max_new_tokens 16"),
    ("grpo", dict(lora_dropout=0.1), "--lora_dropout must be 0"),
])
def test_bad_options_are_refused_with_their_name(script, options, message):
    with pytest.raises(harness.InputError, match=message) as error:
        make(SCRIPTS[script].Config, **options)
    assert "\n" not in str(error.value)  # one line


def test_bad_option_against_a_default_that_follows_the_model_is_refused_before_anything_runs(tmp_path,
                                                                                          toy_sft_checkpoint):
    """--max_new_tokens is filled in by setup (the toy's): the check between the two options runs on it too."""
    out, n = tmp_path / "g", toy_task.DEFAULTS["grpo"]["max_new_tokens"]
    refused(f"^--overlong_buffer {n + 1} exceeds --max_new_tokens {n}$", grpo.main,
            make(grpo.Config, model_name_or_path=toy_sft_checkpoint, overlong_buffer=n + 1, output_dir=str(out)))
    assert not out.exists()


def test_bad_option_on_the_command_line_is_one_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "sft.py", "--per_device_batch_size", "0", "--output_dir",
                           str(tmp_path / "x")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--per_device_batch_size must be > 0, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs: an error naming the file and line, the field or the option, before any training
# ---------------------------------------------------------------------------------------------------------------------
def refused(match: str, run, config) -> None:
    """run(config) ends with one InputError of one line that matches."""
    with pytest.raises(harness.InputError, match=match) as error:
        run(config)
    assert "\n" not in str(error.value), str(error.value)


def nothing_written(out) -> bool:
    """output_dir is claimed (its lock) before any input is read; a refused input leaves nothing else there."""
    return not os.path.exists(out) or set(os.listdir(out)) <= {".lock"}


def write(path, text: str | bytes) -> str:
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    return str(path)


def sft_config(tmp_path, **kw):
    defaults = dict(dataset=head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 16),
                    eval_dataset=head_jsonl("data/toy/sft_eval.jsonl", tmp_path / "e.jsonl", 4),
                    per_device_batch_size=8, max_steps=1, num_eval_generations=2, max_new_tokens=4,
                    output_dir=str(tmp_path / "out"))
    return make(sft.Config, **{**defaults, **kw})


def test_data_file_that_is_not_utf8_names_file_and_line(tmp_path):
    bad = write(tmp_path / "latin1.jsonl", '{"prompt": "the movie was", "completion": " good ."}\n'.encode()
                + '{"prompt": "the café was", "completion": " good ."}\n'.encode("latin-1"))
    refused(rf"{bad}:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8", sft.main,
            sft_config(tmp_path, dataset=bad))
    assert nothing_written(tmp_path / "out")


def test_messages_holding_strings_name_the_field(tmp_path, tiny_checkpoints):
    bad = write(tmp_path / "chat.jsonl", json.dumps({"messages": ["hello", "hi there"]}) + "\n")
    refused(rf"{bad}:1: field 'messages' must be a non-empty list of \{{\"role\": str, \"content\": str\}} messages",
            sft.main, sft_config(tmp_path, model_name_or_path=tiny_checkpoints["llama"], from_scratch=False,
                                 dataset=bad))
    bad = write(tmp_path / "roles.jsonl", json.dumps({"messages": [{"role": "human", "content": "hello"},
                                                                   {"role": "bot", "content": "hi"}]}) + "\n")
    refused(rf"{bad}:1: field 'messages' has the roles \['bot', 'human'\]; expected system / user / assistant / tool",
            sft.main, sft_config(tmp_path, model_name_or_path=tiny_checkpoints["llama"], from_scratch=False,
                                 dataset=bad))


def test_misspelt_field_is_refused_not_read_as_another_format(tmp_path, toy_sft_checkpoint):
    # without the check, {"promt", "chosen", "rejected"} would be read as an implicit-prompt pair with the prompt lost
    row = {"promt": "the movie was", "chosen": " good .", "rejected": " bad ."}
    bad = write(tmp_path / "typo.jsonl", json.dumps(row) + "\n")
    refused(rf"{bad}:1: unknown field 'promt'; did you mean 'prompt'\?", dpo.main,
            make(dpo.Config, model_name_or_path=toy_sft_checkpoint, dataset=bad, output_dir=str(tmp_path / "o")))
    fine = write(tmp_path / "extra.jsonl", json.dumps({"prompt": "a", "chosen": " b", "rejected": " c",
                                                       "source": "x", "id": 7}) + "\n")
    assert len(harness.load_rows(fine, "--dataset")) == 1  # extra fields: fine


def test_missing_model_directory_names_the_option(tmp_path):
    refused(r"--model_name_or_path /nonexistent/model: cannot load \(no such local directory", sft.main,
            sft_config(tmp_path, model_name_or_path="/nonexistent/model", from_scratch=False))
    refused("--model_name_or_path runs/none_such_sft: not found; run `python sft.py` first", reward_model.main,
            make(reward_model.Config, model_name_or_path="runs/none_such_sft", output_dir=str(tmp_path / "r")))


def test_max_length_beyond_the_models_positions(tmp_path):
    refused("--max_length = 100 tokens exceeds the 64 positions of data/toy/base_model; lower it", sft.main,
            sft_config(tmp_path, max_length=100))


def test_model_of_the_wrong_kind_is_refused(tmp_path, toy_sft_checkpoint, toy_reward_model):
    # a causal LM as reward model: its score head would be random
    refused(rf"--reward_model_path {toy_sft_checkpoint}: not a reward model", ppo.main,
            make(ppo.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_sft_checkpoint,
                 output_dir=str(tmp_path / "p")))
    # a reward model as the policy
    refused(rf"--model_name_or_path {toy_reward_model}: a reward / classification", dpo.main,
            make(dpo.Config, model_name_or_path=toy_reward_model, output_dir=str(tmp_path / "d")))
    assert nothing_written(tmp_path / "p") and nothing_written(tmp_path / "d")


def bad_reward(prompts, completions):
    return BAD_REWARD(completions)


@pytest.mark.parametrize("returned,message", [
    (lambda c: [1.0] * (len(c) - 1), r"returned \[1.0, .*\] for \d+ completions; it must return a list of \d+ numbers"),
    (lambda c: ["good"] * len(c), r"returned 'good' among .*; every value must be a finite number or None"),
    (lambda c: [float("nan")] * len(c), "returned nan among"),
    (lambda c: [float("inf")] + [0.0] * (len(c) - 1), "returned inf among"),
    (lambda c: 3.0, r"returned 3.0 for \d+ completions"),
])
def test_reward_function_returning_garbage_is_refused_with_its_name(returned, message, tmp_path,
                                                                    toy_sft_checkpoint):
    global BAD_REWARD
    BAD_REWARD = returned
    refused("reward function bad_reward " + message, ppo.main,
            make(ppo.Config, model_name_or_path=toy_sft_checkpoint, reward_fn=("test_reliability:bad_reward",),
                 reward_model_path="none", critic_init="sft", rollout_batch_size=4, num_iterations=1, max_new_tokens=4,
                 eval_samples_per_prompt=1, eval_reward_fn=("none",), output_dir=str(tmp_path / "p")))


def test_reward_function_spec_errors(tmp_path):
    for spec, message in [("nocolon", "--reward_fn nocolon: expected module:function"),
                          ("no_such_module_xyz:f", "--reward_fn no_such_module_xyz:f: cannot import "
                                                   "no_such_module_xyz"),
                          ("toy_task:nope", "--reward_fn toy_task:nope: toy_task has no function nope"),
                          ("/nowhere/rewards.py:f", "--reward_fn /nowhere/rewards.py:f: no such file "
                                                    "/nowhere/rewards.py")]:
        refused(message, lambda s: harness.load_function(s, "--reward_fn"), spec)
    path = write(tmp_path / "rewards.py",
                 "def length(completions, **kwargs):\n    return [len(c) for c in completions]\n")
    fn = harness.load_function(f"{path}:length", "--reward_fn")
    assert harness.call_reward_fn("length", fn, ["a", "b"], [" xy", " z"]) == [3.0, 2.0]


def test_output_dir_that_cannot_be_written_or_disk_too_full_is_found_before_training(tmp_path, monkeypatch):
    blocker = write(tmp_path / "a_file", "not a directory")
    refused(rf"--output_dir {blocker}/out: cannot write there", sft.main,
            sft_config(tmp_path, output_dir=f"{blocker}/out"))
    usage = harness.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(harness.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    refused(rf"--output_dir {tmp_path}/out: 0.00 GiB free, but the final model and a checkpoint need about", sft.main,
            sft_config(tmp_path, save_every=1))
    assert nothing_written(tmp_path / "out")  # nothing trained, nothing logged


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    refused(rf"--resume: no complete checkpoint in {tmp_path}/out/checkpoints", sft.main,
            sft_config(tmp_path, resume=True))


def test_runtime_input_error_on_the_command_line_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "sft.py", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir",
                           str(tmp_path / "x")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: --dataset {tmp_path}/missing.jsonl: no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: one rank failing ends the job, with the cause
# ---------------------------------------------------------------------------------------------------------------------
def test_a_failure_on_one_rank_ends_the_other_with_a_clear_message(tmp_path):
    """Rank 1's evaluation reward function raises while rank 0 waits for it in a collective: the job must end (not
    hang until a timeout), non-zero, with rank 1's error in the output."""
    rewards = write(tmp_path / "rewards.py", "import os\n\ndef flaky(prompts, completions):\n"
                    "    if os.environ['RANK'] == '1':\n        raise RuntimeError('rank 1 cannot reach its grader')\n"
                    "    return [0.0] * len(completions)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
           "--dataset", head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 32),
           "--eval_dataset", head_jsonl("data/toy/sft_eval.jsonl", tmp_path / "e.jsonl", 4),
           "--per_device_batch_size", "8", "--max_steps", "4", "--eval_every", "2", "--num_eval_generations", "4",
           "--max_new_tokens", "4", "--eval_reward_fn", f"{rewards}:flaky", "--output_dir", str(tmp_path / "out")]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "rank 1 cannot reach its grader" in proc.stderr and "[rank 1] failed" in proc.stderr
    assert time.time() - t0 < 120
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
