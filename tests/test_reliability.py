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
from conftest import make, ROOT, head_jsonl
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import common
import dpo
import grpo
import ppo
import reward_model
import sft

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
                    num_samples_per_prompt=4, max_new_tokens=6, max_steps=8, eval_every=5, eval_samples_per_prompt=1,
                    eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                    save_every=2, dynamic_sampling=True, max_sampling_rounds=2)
    return dict(model_name_or_path=sft_ckpt, reward_model_path=rm_ckpt,
                eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                rollout_batch_size=8, num_samples_per_prompt=2, max_new_tokens=6, max_steps=8, eval_every=5,
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


# ---------------------------------------------------------------------------------------------------------------------
# bad options: refused when the config is built (tyro reports them with the option's name before anything loads)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,option,value,message", [
    ("sft", "per_device_batch_size", 0, "--per_device_batch_size must be > 0, got 0"),
    ("sft", "num_epochs", 0.0, "--num_epochs must be > 0"),
    ("sft", "max_length", -5, "--max_length must be > 0"),
    ("sft", "max_new_tokens", 0, "--max_new_tokens must be > 0"),
    ("sft", "num_eval_generations", -1, "--num_eval_generations must be >= 0"),
    ("sft", "warmup_ratio", 1.5, "--warmup_ratio must be between 0 and 1"),
    ("sft", "top_p", 0.0, r"--top_p must be in \(0, 1\]"),
    ("sft", "learning_rate", float("nan"), "--learning_rate must be > 0, got nan"),
    ("sft", "max_steps", 0, "--max_steps must be >= 1"),
    ("sft", "save_total_limit", 0, "--save_total_limit must be > 0"),
    ("reward_model", "per_device_batch_size", 0, "--per_device_batch_size must be > 0"),
    ("reward_model", "normalize_samples", -1, "--normalize_samples must be >= 0"),
    ("reward_model", "save_every", -2, "--save_every must be >= 0"),
    ("dpo", "beta", 0.0, "--beta must be > 0"),
    ("dpo", "label_smoothing", 0.5, r"--label_smoothing must be in \[0, 0.5\)"),
    ("dpo", "temperature", 0.0, "--temperature must be > 0"),
    ("dpo", "num_epochs", 0.0, "--num_epochs must be > 0"),
    ("ppo", "rollout_batch_size", 0, "--rollout_batch_size must be > 0"),
    ("ppo", "num_iterations", 0, "--num_iterations must be > 0"),
    ("ppo", "temperature", 0.0, "--temperature must be > 0"),  # the log-probs divide by it
    ("ppo", "num_samples_per_prompt", -1, "--num_samples_per_prompt must be > 0"),
    ("ppo", "gamma", 1.2, "--gamma must be between 0 and 1"),
    ("ppo", "kl_coef", -0.1, "--kl_coef must be >= 0"),
    ("ppo", "update_epochs", 0, "--update_epochs must be > 0"),
    ("ppo", "top_k", -1, "--top_k must be >= 0"),
    ("grpo", "num_samples_per_prompt", 1, "--advantage_estimator grpo needs --num_samples_per_prompt >= 2"),
    ("grpo", "clip_range", 1.0, "--clip_range must be < 1"),
    ("grpo", "temperature", 0.0, "--temperature must be > 0"),
    ("grpo", "max_sampling_rounds", 0, "--max_sampling_rounds must be > 0"),
    ("grpo", "overlong_buffer", 100, "--overlong_buffer 100 exceeds --max_new_tokens 16"),
    ("grpo", "lora_dropout", 0.1, "--lora_dropout must be 0"),
])
def test_bad_options_are_refused_with_their_name(script, option, value, message):
    with pytest.raises(common.InputError, match=message):
        SCRIPTS[script].Config(**{option: value})


def test_bad_option_on_the_command_line_is_one_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "sft.py", "--per_device_batch_size", "0", "--output_dir",
                           str(tmp_path / "x")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--per_device_batch_size must be > 0, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs: an error naming the file and line, the field or the option, before any training
# ---------------------------------------------------------------------------------------------------------------------
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
    with pytest.raises(common.InputError, match=rf"{bad}:2: not UTF-8 text \(byte 0xe9 at column 20\)"):
        sft.main(sft_config(tmp_path, dataset=bad))
    assert not os.path.exists(tmp_path / "out")


def test_messages_holding_strings_name_the_field(tmp_path, tiny_checkpoints):
    bad = write(tmp_path / "chat.jsonl", json.dumps({"messages": ["hello", "hi there"]}) + "\n")
    with pytest.raises(common.InputError, match=rf"{bad}:1: field 'messages' must be a non-empty list of "
                                                r"\{\"role\": str, \"content\": str\} messages"):
        sft.main(sft_config(tmp_path, model_name_or_path=tiny_checkpoints["llama"], from_scratch=False, dataset=bad))


def test_misspelt_field_is_refused_not_read_as_another_format(tmp_path, toy_sft_checkpoint):
    # without the check, {"promt", "chosen", "rejected"} would be read as an implicit-prompt pair with the prompt lost
    row = {"promt": "the movie was", "chosen": " good .", "rejected": " bad ."}
    bad = write(tmp_path / "typo.jsonl", json.dumps(row) + "\n")
    with pytest.raises(common.InputError, match=rf"{bad}:1: unknown field 'promt'; did you mean 'prompt'\?"):
        dpo.main(make(dpo.Config, model_name_or_path=toy_sft_checkpoint, dataset=bad, output_dir=str(tmp_path / "o")))
    fine = write(tmp_path / "extra.jsonl", json.dumps({"prompt": "a", "chosen": " b", "rejected": " c",
                                                       "source": "x", "id": 7}) + "\n")
    assert len(common.load_jsonl(fine, alternatives=(("prompt", "chosen", "rejected"),))) == 1  # extra fields: fine


def test_missing_model_directory_names_the_option(tmp_path):
    with pytest.raises(common.InputError, match=r"--model_name_or_path /nonexistent/model: cannot load \(no such "
                                                r"local directory"):
        sft.main(sft_config(tmp_path, model_name_or_path="/nonexistent/model", from_scratch=False))
    with pytest.raises(common.InputError,
                       match="--model_name_or_path runs/none_such_sft: not found; run `python sft.py` first"):
        reward_model.main(make(reward_model.Config, model_name_or_path="runs/none_such_sft", output_dir=str(tmp_path / "r")))


def test_max_length_beyond_the_models_positions(tmp_path):
    with pytest.raises(common.InputError, match="--max_length = 100 tokens exceeds the 64 positions of "
                                                "data/toy/base_model"):
        sft.main(sft_config(tmp_path, max_length=100))


def test_model_of_the_wrong_kind_is_refused(tmp_path, toy_sft_checkpoint, toy_reward_model):
    # a causal LM as reward model: its score head would be random
    with pytest.raises(common.InputError, match=rf"--reward_model_path {toy_sft_checkpoint}: not a reward model"):
        ppo.main(make(ppo.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_sft_checkpoint,
                            output_dir=str(tmp_path / "p")))
    # a reward model as the policy
    with pytest.raises(common.InputError, match=rf"--model_name_or_path {toy_reward_model}: a reward / classification"):
        dpo.main(make(dpo.Config, model_name_or_path=toy_reward_model, output_dir=str(tmp_path / "d")))
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "d")


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
    with pytest.raises(common.InputError, match="reward function bad_reward " + message):
        ppo.main(make(ppo.Config, model_name_or_path=toy_sft_checkpoint, reward_fn=("test_reliability:bad_reward",),
                            critic_init="sft", rollout_batch_size=4, max_steps=1, max_new_tokens=4,
                            eval_samples_per_prompt=1, eval_reward_fn=("none",), output_dir=str(tmp_path / "p")))


def test_reward_function_spec_errors(tmp_path):
    with pytest.raises(common.InputError, match="--reward_fn nocolon: expected module:function"):
        common.load_function("nocolon")
    with pytest.raises(common.InputError, match="--reward_fn no_such_module_xyz:f: cannot import no_such_module_xyz"):
        common.load_function("no_such_module_xyz:f")
    with pytest.raises(common.InputError, match="--reward_fn toy_task:nope: toy_task has no function nope"):
        common.load_function("toy_task:nope")
    with pytest.raises(common.InputError, match="no such file /nowhere/rewards.py"):
        common.load_function("/nowhere/rewards.py:f")
    path = write(tmp_path / "rewards.py",
                 "def length(completions, **kwargs):\n    return [len(c) for c in completions]\n")
    fn = common.load_function(f"{path}:length")
    assert common.call_reward_fn(fn, ["a", "b"], [" xy", " z"]) == [3.0, 2.0]


def test_output_dir_that_cannot_be_written_or_disk_too_full_is_found_before_training(tmp_path, monkeypatch):
    blocker = write(tmp_path / "a_file", "not a directory")
    with pytest.raises(common.InputError, match=rf"--output_dir {blocker}/out: cannot write there"):
        sft.main(sft_config(tmp_path, output_dir=f"{blocker}/out"))
    usage = common.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(common.InputError, match=r"GiB free on its disk, but the final model and a checkpoint need"):
        sft.main(sft_config(tmp_path, save_every=1))
    assert not os.path.exists(os.path.join(tmp_path, "out", "metrics.jsonl"))  # nothing trained, nothing logged


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(common.InputError, match=r"--resume: no complete checkpoint in .*/out/checkpoints"):
        sft.main(sft_config(tmp_path, resume=True))


def test_runtime_input_error_on_the_command_line_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "sft.py", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir",
                           str(tmp_path / "x")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: --dataset {tmp_path}/missing.jsonl: no such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# a new run into an existing output_dir, and the log on resume
# ---------------------------------------------------------------------------------------------------------------------
def failing_reward(prompts, completions):
    raise RuntimeError("the reward service is down")


def test_a_failed_rerun_keeps_the_previous_runs_files_until_it_saves(tmp_path):
    first = sft_config(tmp_path, max_steps=4, save_every=2, log_every=1, eval_every=100)
    sft.main(first)
    out = first.output_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        log = f.read()
    with open(os.path.join(out, "eval.json")) as f:
        evaluation = f.read()
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_2"]

    # a re-run that crashes at its first evaluation (step 2), before any save of its own
    with pytest.raises(RuntimeError, match="the reward service is down"):
        sft.main(sft_config(tmp_path, max_steps=4, log_every=1, eval_every=2, seed=2,
                            eval_reward_fn=("test_reliability:failing_reward",)))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert f.read() == log
    with open(os.path.join(out, "eval.json")) as f:
        assert f.read() == evaluation
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_2"]
    assert common.latest_checkpoint(out).endswith("step_2")  # --resume would still continue the first run

    # a re-run that saves: its first checkpoint replaces the previous run's checkpoints and log
    third = sft_config(tmp_path, max_steps=6, save_every=3, log_every=1, eval_every=100, seed=3)
    sft.main(third)
    assert sorted(os.listdir(out)) == sorted(["checkpoints", "config.json", "eval.json", "generation_config.json",
                                              "metrics.jsonl", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_3"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6, 6]
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["train_steps"] == 6


def test_resume_appends_to_the_log_and_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    config = sft_config(tmp_path, max_steps=6, save_every=2, log_every=1, eval_every=100)
    sft.main(config)
    out = config.output_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        complete = f.read()
    # as if killed after logging step 5, with checkpoints at 2 and 4
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write("".join(complete.splitlines(keepends=True)[:5]))
    sft.main(sft_config(tmp_path, max_steps=6, save_every=2, log_every=1, eval_every=100, resume=True))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]  # each step once; rows 1-4 kept from the first run
    assert [without_timing(r) for r in rows] == [without_timing(json.loads(line)) for line in complete.splitlines()]
    with open(os.path.join(out, "checkpoints", "step_4", "trainer_state.json")) as f:
        assert json.load(f)["config"]["max_steps"] == 6


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
