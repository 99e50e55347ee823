"""Real data: every source (JSON lines, JSON, parquet, CSV, save_to_disk, hub id), every TRL format through the one
parser per format in harness.py, the assistant-turn mask, reward functions as TRL calls them, defaults that follow the
data, strict JSON outputs and the grouped --help."""

import dataclasses
import json
import os
import re
import sys

import pytest
from conftest import make, chatml_tokenizer, toy_tokenizer_with_chat

import harness
import sft

USER = {"role": "user", "content": "What is two plus two?"}
ANSWER = {"role": "assistant", "content": "Four."}
ROWS = [{"prompt": "What is two plus two?", "completion": " Four.", "source": "math"},
        {"prompt": "Name a colour.", "completion": " Blue.", "source": "trivia"},
        {"prompt": "Say hello.", "completion": " Hello there!", "source": "chat"}]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def strict_load(path: str):
    """json.load that refuses NaN and infinity, as strict JSON parsers (and other languages) do."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line, parse_constant=refuse) for line in f]
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------------
def test_every_source_gives_the_same_rows(tmp_path):
    import datasets

    expected = ROWS
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", expected),
             "json array": str(tmp_path / "array.json"), "json lines": write_jsonl(tmp_path / "lines.json", expected),
             "parquet": str(tmp_path / "d.parquet"), "csv": str(tmp_path / "d.csv"),
             "save_to_disk": str(tmp_path / "saved"), "save_to_disk splits": str(tmp_path / "splits")}
    with open(paths["json array"], "w") as f:
        json.dump(expected, f)
    data = datasets.Dataset.from_list(expected)
    data.to_parquet(paths["parquet"])
    data.to_csv(paths["csv"], index=False)
    data.save_to_disk(paths["save_to_disk"])
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(paths["save_to_disk splits"])
    for name, path in paths.items():
        rows = harness.load_rows(path, "--dataset")
        assert [row for _, row in rows] == expected, name
    assert [w for w, _ in harness.load_rows(paths["jsonl"], "--dataset")] == \
        [f"{paths['jsonl']}:{i}" for i in (1, 2, 3)]
    assert [w for w, _ in harness.load_rows(paths["parquet"], "--dataset")] == \
        [f"{paths['parquet']}[{i}]" for i in (0, 1, 2)]
    assert [r for _, r in harness.load_rows(paths["save_to_disk splits"], "--dataset", "test")] == expected[:1]
    with pytest.raises(harness.InputError, match=r"--dataset .*splits: no split 'dev' \(it has \['test', 'train'\]\)"):
        harness.load_rows(paths["save_to_disk splits"], "--dataset", "dev")


def test_conversational_rows_survive_parquet_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "Five."}]}] * 2
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "c"))
    for path in (str(tmp_path / "c.parquet"), str(tmp_path / "c")):
        assert [harness.parse_preference_row(r, w) for w, r in harness.load_rows(path, "--dataset")] == \
            [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_source_errors_name_the_option(tmp_path, monkeypatch):
    with pytest.raises(harness.InputError, match="--dataset /nowhere/x.parquet: no such file or directory"):
        harness.load_rows("/nowhere/x.parquet", "--dataset")
    with pytest.raises(harness.InputError, match=r"--eval_dataset .*\.txt: unknown file type '.txt'"):
        harness.load_rows(write_jsonl(tmp_path / "d.txt", ROWS), "--eval_dataset")
    os.makedirs(tmp_path / "plain")
    with pytest.raises(harness.InputError, match="--dataset .*plain: cannot be read as a dataset"):
        harness.load_rows(str(tmp_path / "plain"), "--dataset")
    import datasets

    def offline(*args, **kwargs):  # what the hub answers here: no network
        raise ConnectionError("Couldn't reach 'someone/no-such-dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(harness.InputError, match="--dataset someone/no-such-dataset: cannot be read as a dataset "
                                                "\\(ConnectionError: Couldn't reach"):
        harness.load_rows("someone/no-such-dataset", "--dataset")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the optional package were not installed
    with pytest.raises(harness.InputError, match=r"needs the `datasets` package \(pip install datasets\)"):
        harness.load_rows(str(tmp_path / "plain"), "--dataset")
    assert len(harness.load_rows(write_jsonl(tmp_path / "ok.jsonl", ROWS), "--dataset")) == 3  # JSON lines need nothing


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": str(i)} for i in range(20)])
    split = lambda fraction, seed: harness.train_eval_rows(path, "--prompts", "train", None, "", fraction, seed)  # noqa
    train, held = split(0.25, 3)
    assert len(held) == 5 and len(train) == 15 and not {w for w, _ in train} & {w for w, _ in held}
    assert split(0.25, 3) == (train, held) and split(0.25, 4) != (train, held)
    with pytest.raises(harness.InputError, match="--eval_split 1.0: would leave no training rows"):
        split(1.0, 3)
    assert harness.train_eval_rows(path, "--prompts", "train", path, "--eval_prompts", 0.25, 3)[1] == \
        harness.load_rows(path, "")  # an eval file wins over the split
    with pytest.raises(harness.InputError, match="--prompts is required"):
        harness.train_eval_rows(None, "--prompts", "train", None, "", 0.0, 3)


# ---------------------------------------------------------------------------------------------------------------------
# formats: one parser each
# ---------------------------------------------------------------------------------------------------------------------
def test_prompt_only_formats():
    assert harness.parse_prompt({"prompt": "Say hello."}, "f:1") == "Say hello."
    assert harness.parse_prompt({"prompt": [USER]}, "f:1") == [USER]
    assert harness.parse_prompt({"messages": [USER]}, "f:1") == [USER]
    assert harness.parse_prompt({"messages": [USER, ANSWER]}, "f:1") == [USER]  # the answer is not part of the prompt
    with pytest.raises(harness.InputError, match="f:2: expected a prompt-only row"):
        harness.parse_prompt({"question": "x"}, "f:2")
    with pytest.raises(harness.InputError, match="f:2: unknown field 'promtp'; did you mean 'prompt'"):
        harness.check_one_format([("f:1", {"messages": [USER]}), ("f:2", {"promtp": "x", "messages": [USER]})])


def test_completion_formats():
    assert sft.parse_row({"prompt": "a", "completion": " b"}, "f") == ("a", " b")
    assert sft.parse_row({"prompt": [USER], "completion": [ANSWER]}, "f") == ([USER], [ANSWER])
    assert sft.parse_row({"messages": [USER, ANSWER]}, "f") == (None, [USER, ANSWER])
    assert sft.parse_row({"text": "free text"}, "f") == (None, "free text")
    with pytest.raises(harness.InputError, match="f: field 'completion' must end with a non-empty assistant message"):
        sft.parse_row({"prompt": [USER], "completion": [USER]}, "f")
    with pytest.raises(harness.InputError, match=r"f: field 'messages' holds no assistant message .*\(roles: user\)"):
        sft.parse_row({"messages": [USER]}, "f")


def test_preference_and_ranking_formats():
    five = {"role": "assistant", "content": "Five."}
    assert harness.parse_preference_row({"prompt": "a", "chosen": " b", "rejected": " c"}, "f") == ("a", " b", " c")
    assert harness.parse_preference_row({"chosen": "a b", "rejected": "a c"}, "f") == ("a", " b", " c")
    assert harness.parse_preference_row({"prompt": [USER], "chosen": [ANSWER], "rejected": [five]}, "f") == \
        ([USER], [ANSWER], [five])
    assert harness.parse_preference_row({"chosen": [USER, ANSWER], "rejected": [USER, five]}, "f") == \
        ([USER], [ANSWER], [five])
    assert harness.parse_preference_row({"prompt": [USER], "chosen": "Four.", "rejected": "Five."}, "f") == \
        ([USER], [ANSWER], [five])  # a string response after a conversational prompt is the assistant's message
    import reward_model

    assert reward_model.parse_row({"prompt": [USER], "completions": ["Four.", "Five."]}, "f", "ranking") == \
        ([USER], [[ANSWER], [five]], 0.0)


def test_chat_rendering_of_prompt_and_completion():
    tok = chatml_tokenizer("eos")
    ids = harness.render_prompt([USER], tok)
    assert ids == tok("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
                      add_special_tokens=False)["input_ids"]
    completion = harness.render_completion([USER], [ANSWER], tok)  # the template's own end of turn is the EOS
    assert tok.decode(completion) == "Four.<|im_end|>" and completion.count(tok.eos_token_id) == 1
    assert harness.render_completion("Say hello.", " Hello there!", tok)[-1] == tok.eos_token_id


@pytest.mark.parametrize("template", ["chatml", "toy"])
def test_assistant_only_mask_matches_a_naive_scan_of_the_rendering(template):
    """Every assistant turn of a multi-turn conversation is trained, nothing else: against a naive computation that
    tokenises the template's rendering of the whole conversation in one piece and marks, token by token, the spans
    between each assistant header and the end-of-turn token that closes it."""
    tok = chatml_tokenizer("missing") if template == "chatml" else toy_tokenizer_with_chat()
    words = ["Be brief.", "What is two plus two?", "Four.", "Name a colour.", "Blue.", "Say hello.", "Hello there!"]
    if template == "toy":  # the toy tokenizer knows only the toy's words
        words = ["the phone was", "the movie was", "good .", "this book is", "very bad !", "my new pizza is", "fine ."]
    conversation = [{"role": role, "content": w} for role, w in zip(
        ["system", "user", "assistant", "user", "assistant", "user", "assistant"], words)]
    ids, mask = sft.render_conversation(conversation, tok, "f:1")
    full = tok(tok.apply_chat_template(conversation, tokenize=False).rstrip(), add_special_tokens=False)["input_ids"]
    header = tok("<|im_start|>assistant\n" if template == "chatml" else "assistant :",
                 add_special_tokens=False)["input_ids"]
    naive, inside = [], False
    for i, t in enumerate(full):
        if full[i - len(header):i] == header and i >= len(header):
            inside = True
        naive.append(int(inside))
        if inside and t == tok.eos_token_id:
            inside = False
    assert ids == full and mask == naive and sum(mask) > 0
    assert tok.decode([t for t, m in zip(ids, mask) if m]).count(words[4].rstrip(".! ")) == 1
    parsed = [("f:1", (None, conversation))]
    examples = sft.build_dataset(parsed, tok, make(sft.Config, max_length=512))[0]
    assert [label != -100 for label in examples[0][1]] == [bool(m) for m in mask]
    whole = sft.build_dataset(parsed, tok,
                              make(sft.Config, max_length=512, assistant_only_loss=False))[0]
    assert whole[0][1] == ids


# ---------------------------------------------------------------------------------------------------------------------
# reward functions, as TRL calls them
# ---------------------------------------------------------------------------------------------------------------------
def test_reward_functions_keywords_columns_none_and_weights(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(
        "def exact(completions, answer, **kwargs):\n"  # TRL's signature, with a dataset column
        "    return [1.0 if c[0]['content'] == a else 0.0 for c, a in zip(completions, answer)]\n"
        "def length(prompts, completions):\n"  # named like TRL's keywords: called with them
        "    return [float(len(c)) for c in completions]\n"
        "def picky(prompts=None, completions=None, **kwargs):\n"
        "    return [None if kwargs['source'][i] == 'skip' else 2.0 for i in range(len(completions))]\n")
    fns = harness.load_reward_fns([f"{path}:exact", f"{path}:picky"], (1.0, 0.5), columns={"answer", "source"})
    assert list(fns) == ["exact", "picky"]
    prompts = [[USER], [USER], [USER]]
    total, per_fn = harness.score_with_fns(fns, prompts, ["Four.", "Five.", "Four."],
                                           {"answer": ["Four.", "Four.", "Four."], "source": ["a", "a", "skip"]})
    assert per_fn == {"exact": [1.0, 0.0, 1.0], "picky": [2.0, 2.0, None]}
    assert total == [1.0 + 0.5 * 2.0, 0.5 * 2.0, 1.0]  # a function that cannot score is left out of the sum
    length = harness.load_reward_fns([f"{path}:length"])["length"][0]
    assert harness.call_reward_fn("length", length, ["a"], [" bcd"]) == [4.0]
    nobody = {"picky": fns["picky"]}
    assert harness.score_with_fns(nobody, ["a"], ["b"], {"source": ["skip"]})[0] == [None]
    with pytest.raises(harness.InputError, match="--reward_weights: 1 weights for 2 reward functions"):
        harness.load_reward_fns([f"{path}:exact", f"{path}:picky"], (1.0,), columns={"answer"})


def test_evaluation_reports_each_function_by_its_name_and_counts_unscored(tiny_checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path / "rewards.py"
    path.write_text("def brevity(completions, **kwargs):\n    return [-float(len(c.split())) for c in completions]\n"
                    "def unsure(prompts, completions):\n    return [None] * len(completions)\n")
    policy = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    tok = toy_tokenizer_with_chat()
    m = harness.evaluate_policy(policy, tok, ["the phone was", "this book is"], torch.device("cpu"),
                                reward_fns=harness.load_reward_fns([f"{path}:brevity", f"{path}:unsure"]),
                                samples_per_prompt=2, max_new_tokens=4)
    rows = m["per_sample"]
    assert m["brevity_mean"] == pytest.approx(-sum(len(c.split()) for c in rows["completion"]) / 4)
    assert m["brevity_unscored"] == 0 and m["unsure_unscored"] == 4 and m["unsure_mean"] is None
    assert not any(k.startswith("gold") for k in m)


# ---------------------------------------------------------------------------------------------------------------------
# defaults follow the data; strict JSON; help
# ---------------------------------------------------------------------------------------------------------------------
def test_defaults_follow_the_model(tmp_path, tiny_checkpoints, capsys):
    """Options left None take the toy's values on the toy model, the script's PRETRAINED ones on any other."""
    cfg = make(sft.Config, output_dir=str(tmp_path / "a"))
    harness.setup(cfg, "sft", sft.PRETRAINED)
    assert (cfg.dataset, cfg.optim.learning_rate, cfg.max_length, cfg.from_scratch) == \
        ("data/toy/sft_train.jsonl", 2e-3, 64, True)
    assert "defaults for the toy model: " in capsys.readouterr().out
    cfg = make(sft.Config, model_name_or_path=tiny_checkpoints["llama"], output_dir=str(tmp_path / "b"),
               max_length=96)
    harness.setup(cfg, "sft", sft.PRETRAINED)
    assert (cfg.dataset, cfg.eval_dataset, cfg.eval_reward_fn, cfg.optim.learning_rate, cfg.max_length,
            cfg.from_scratch) == (None, None, (), 2e-5, 96, False)  # nothing of the toy; given values stay
    assert "defaults for a pretrained model: " in capsys.readouterr().out
    with pytest.raises(harness.InputError, match="--dataset is required"):
        sft.main(make(sft.Config, model_name_or_path=tiny_checkpoints["llama"], output_dir=str(tmp_path / "c")))


@pytest.mark.parametrize("script", ["sft", "reward_model", "dpo", "ppo", "grpo"])
def test_every_pretrained_default_is_filled_in(script, tmp_path, tiny_checkpoints, capsys):
    """On a model that is not the toy, every option the script's PRETRAINED names (left at its None default) takes
    exactly that value, and the printed line names each."""
    import importlib

    module = importlib.import_module(script)
    cfg = make(module.Config, model_name_or_path=tiny_checkpoints["llama"], output_dir=str(tmp_path / "out"))
    harness.setup(cfg, script, module.PRETRAINED)
    harness.release_lock()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("defaults for a pretrained model: "))
    for key, value in module.PRETRAINED.items():
        got = getattr(cfg.optim if key == "learning_rate" else cfg, key)
        assert got == value and f"--{key} {value}" in line, (key, got, value)


def test_strict_json_everywhere(tmp_path):
    harness.write_json(str(tmp_path / "e.json"), {"a": float("nan"), "b": [float("inf"), 1.5],
                                                         "c": {"d": float("-inf")}})
    assert strict_load(str(tmp_path / "e.json")) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    logger = harness.MetricsLogger(make(sft.Config, output_dir=str(tmp_path)))
    logger.log(1, {"loss": float("nan"), "ok": 2.0}, ())
    logger.close()
    assert strict_load(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": None, "ok": 2.0}]


def command_line(module, args: list[str]):
    """The config that `python script.py args` runs: the scripts' own entry point (harness.cli), main swapped."""
    parsed, argv = [], sys.argv
    sys.argv = [module.__name__ + ".py", *args]
    try:
        harness.cli(parsed.append, module.Config)
    finally:
        sys.argv = argv
    return parsed[0]


@pytest.mark.parametrize("script", ["sft", "reward_model", "dpo", "ppo", "grpo"])
def test_help_opens_with_the_script_and_groups_options(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit):
        command_line(module, ["--help"])
    out = capsys.readouterr().out
    assert module.__doc__.splitlines()[0] in out
    groups = re.findall(r"^[ ─╭]*([\w-]+) options[ ─╮]*$", out, flags=re.M)  # boxes on a terminal, plain here
    assert groups == ["model", "optim", "run"] and out.index("--help") < out.index("model options")  # own first
    assert "--learning_rate" in out and "--lora_r" in out and "--output_dir" in out and "(default: " in out
    assert out.index(f"--{[f.name for f in dataclasses.fields(module.Config)][0]}") < out.index("--lora_r")
    cfg = command_line(module, ["--lora_r", "8", "--output_dir", "x", "--learning_rate", "0.5"])
    assert (cfg.model.lora_r, cfg.run.output_dir, cfg.optim.learning_rate) == (8, "x", 0.5)  # flat names, groups


# ---------------------------------------------------------------------------------------------------------------------
# the whole pipeline on chat-model stand-ins, in every source type, with every format somewhere
# ---------------------------------------------------------------------------------------------------------------------
QUESTIONS = [("What is two plus two?", "Four.", "Five."), ("Name a colour.", "Blue.", "Rain."),
             ("Say hello.", "Hello there!", "Soft rain."),
             ("Write a haiku about rain.", "Soft rain on the roof.", "Two.")]
REWARDS = '''
def exact(completions, answer, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [1.0 if t.strip() == a else 0.0 for t, a in zip(texts, answer)]

def brevity(prompts, completions):
    return [-0.1 * len(c if isinstance(c, str) else c[0]["content"]) for c in completions]
'''


def chat(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def datasets_for(source: str, tmp_path) -> dict:
    """Training files of every stage in one source type; each source holds other formats."""
    import datasets

    n = 4  # repeats of the four questions
    if source == "jsonl":
        sets = {"sft": [{"messages": chat(q, a)[:1] + [{"role": "assistant", "content": a},
                                                       {"role": "user", "content": "Say hello."},
                                                       {"role": "assistant", "content": "Hello there!"}]}
                        for q, a, _ in QUESTIONS * n],
                "prefs": [{"chosen": chat(q, a), "rejected": chat(q, b)} for q, a, b in QUESTIONS * n],
                "dpo": [{"prompt": chat(q, a)[:1], "chosen": chat(q, a)[1:], "rejected": chat(q, b)[1:]}
                        for q, a, b in QUESTIONS * n],
                "prompts": [{"prompt": chat(q, a)[:1], "answer": a} for q, a, _ in QUESTIONS * 2]}
    elif source == "parquet":
        sets = {"sft": [{"prompt": chat(q, a)[:1], "completion": chat(q, a)[1:]} for q, a, _ in QUESTIONS * n],
                "prefs": [{"prompt": chat(q, a)[:1], "chosen": chat(q, a)[1:], "rejected": chat(q, b)[1:],
                           "margin": 0.5} for q, a, b in QUESTIONS * n],
                "dpo": [{"chosen": chat(q, a), "rejected": chat(q, b)} for q, a, b in QUESTIONS * n],
                "prompts": [{"messages": chat(q, a), "answer": a} for q, a, _ in QUESTIONS * 2]}
    else:
        sets = {"sft": [{"prompt": q, "completion": " " + a} for q, a, _ in QUESTIONS * n],
                "prefs": [{"prompt": q, "completions": [" " + a, " " + b, " ..."]} for q, a, b in QUESTIONS * n],
                "dpo": [{"chosen": f"{q} {a}", "rejected": f"{q} {b}"} for q, a, b in QUESTIONS * n],
                "prompts": [{"prompt": q, "answer": a} for q, a, _ in QUESTIONS * 2]}
    paths = {}
    for name, rows in sets.items():
        if source == "jsonl":
            paths[name] = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        elif source == "parquet":
            paths[name] = str(tmp_path / f"{name}.parquet")
            datasets.Dataset.from_list(rows).to_parquet(paths[name])
        else:
            paths[name] = str(tmp_path / name)
            data = datasets.Dataset.from_list(rows)
            datasets.DatasetDict({"train": data, "test": data.select(range(4))}).save_to_disk(paths[name])
    return paths


@pytest.mark.parametrize("source,arch", [("jsonl", "qwen2"), ("parquet", "llama"), ("save_to_disk", "qwen2")])
def test_pipeline_on_chat_models_in_every_source(source, arch, chatml_checkpoints, tmp_path, capsys):
    import dpo
    import grpo
    import ppo
    import reward_model

    data = datasets_for(source, tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    fns = str(tmp_path / "rewards.py")
    small = dict(max_steps=2, log_every=1, max_new_tokens=6)
    rl = dict(small, max_steps=None, num_iterations=2, max_prompt_length=48)
    rl.pop("max_steps")
    held_out = dict(eval_dataset=data["sft"], eval_dataset_split="test") if source == "save_to_disk" \
        else dict(eval_split=0.25)
    runs = tmp_path / "runs"
    sft.main(make(sft.Config, model_name_or_path=chatml_checkpoints[arch], from_scratch=False, dataset=data["sft"],
                        per_device_batch_size=4, max_length=96, eval_every=2, num_eval_generations=2,
                        output_dir=str(runs / "sft"), **held_out, **small))
    policy = str(runs / "sft")
    reward_model.main(make(reward_model.Config, 
        model_name_or_path=policy, dataset=data["prefs"], loss="ranking" if source == "save_to_disk" else "pairwise",
        per_device_batch_size=4, max_length=96, normalize_samples=4, output_dir=str(runs / "rm"),
        **{k: v.replace(data["sft"], data["prefs"]) if isinstance(v, str) else v for k, v in held_out.items()},
        **small))
    dpo.main(make(dpo.Config, model_name_or_path=policy, dataset=data["dpo"], per_device_batch_size=4, max_length=96,
                        eval_samples_per_prompt=1, output_dir=str(runs / "dpo"), eval_split=0.25,
                        eval_reward_fn=(f"{fns}:brevity",), **small))
    reward = dict(reward_model_path=str(runs / "rm")) if source == "parquet" else \
        dict(reward_fn=(f"{fns}:exact", f"{fns}:brevity"), reward_weights=(1.0, 0.5), critic_init="sft")
    ppo.main(make(ppo.Config, model_name_or_path=policy, prompts=data["prompts"], rollout_batch_size=4,
                        num_samples_per_prompt=2, eval_split=0.25, eval_samples_per_prompt=1,
                        output_dir=str(runs / "ppo"), **reward, **rl))

    grpo.main(make(grpo.Config, model_name_or_path=policy, prompts=data["prompts"], rollout_batch_size=2,
                          num_samples_per_prompt=2, num_minibatches=1, eval_split=0.25, eval_samples_per_prompt=1,
                          output_dir=str(runs / "grpo"), **{k: v for k, v in reward.items() if k != "critic_init"},
                          **rl))

    printed = capsys.readouterr()
    for stage in ("sft", "rm", "dpo", "ppo", "grpo"):
        out = runs / stage
        assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "eval.json"), stage
        outputs = json.dumps([strict_load(str(out / "eval.json")), strict_load(str(out / "metrics.jsonl"))])
        for toy in ("data/toy", "gold", "honestly the", "ceiling"):  # nothing of the toy task in a real run
            assert toy not in outputs and toy not in printed.out, (stage, toy)
    ppo_eval = strict_load(str(runs / "ppo" / "eval.json"))
    if source == "parquet":
        assert "proxy_reward_mean" in ppo_eval and "exact_mean" not in ppo_eval
    else:  # the evaluation uses the training reward functions, under their own names
        assert {"exact_mean", "brevity_mean", "reward_mean", "start_exact_mean"} <= set(ppo_eval)
        ppo_rows = strict_load(str(runs / "ppo" / "metrics.jsonl"))
        assert all("rewards/exact" in r for r in ppo_rows if "objective/scores" in r)
        assert {"exact_mean", "brevity_mean"} <= set(strict_load(str(runs / "grpo" / "eval.json")))
    assert "brevity_mean" in strict_load(str(runs / "dpo" / "eval.json"))


# ---------------------------------------------------------------------------------------------------------------------
# mistakes a new user makes, each one clear error before any model loads
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_sources_say_what_shape_is_expected(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one_object = tmp_path / "data.json"
    one_object.write_text(json.dumps({"version": 1, "data": ROWS}))
    with pytest.raises(harness.InputError, match=rf"{one_object}: one JSON object \(keys \['data', 'version'\]\); "
                                                "expected an array of row objects or JSON lines"):
        harness.load_rows(str(one_object), "--dataset")
    config_only = tmp_path / "model"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    with pytest.raises(harness.InputError, match=r"--model_name_or_path .*model: holds \['config.json'\] but no "
                                                "weights; a Hugging Face checkpoint folder holds config.json, "
                                                "model.safetensors"):
        harness.from_pretrained(AutoModelForCausalLM, str(config_only), "--model_name_or_path")
    with pytest.raises(harness.InputError, match=r"model: holds \['config.json'\] but no tokenizer; a Hugging Face"):
        harness.from_pretrained(AutoTokenizer, str(config_only), "--model_name_or_path")  # loaded first by every script
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    for cls in (AutoModelForCausalLM, AutoTokenizer):  # the tokenizer is the first thing a script loads
        with pytest.raises(harness.InputError, match="a GGUF file, not a Hugging Face checkpoint; convert it once"):
            harness.from_pretrained(cls, str(gguf), "--model_name_or_path")


def test_prompts_without_a_user_turn_and_mixed_formats_are_refused(tmp_path):
    system_only = write_jsonl(tmp_path / "p.jsonl", [{"messages": [USER]}, {"messages": [{"role": "system",
                                                                                        "content": "Be brief."}]}])
    with pytest.raises(harness.InputError, match=rf"{system_only}:2: field 'messages' holds no user message \(roles: "
                                                "system\\); a prompt needs one"):
        harness.prompts_and_columns(harness.load_rows(system_only, "--prompts"))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ROWS[0], ROWS[1], {"prompt": [USER], "completion": [ANSWER]}])
    with pytest.raises(harness.InputError, match=rf"{mixed}:3: a conversational \{{prompt, completion\}} row, but "
                                                rf"{mixed}:1 is a text \{{prompt, completion\}} row; one dataset must "
                                                "hold one format"):
        harness.load_rows(mixed, "--dataset")
    explicit_and_implicit = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"},
                                                                   {"chosen": "a b", "rejected": "a c"}])
    with pytest.raises(harness.InputError, match=r"prefs.jsonl:2: a text \{chosen, rejected\} row, but .*prefs.jsonl:1 "
                                                r"is a text \{prompt, chosen, rejected\} row"):
        harness.load_rows(explicit_and_implicit, "--dataset")


def test_wrong_chat_roles_are_named_before_any_model_loads(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "human", "content": "hi"},
                                                               {"role": "bot", "content": "hello"}]}] * 4)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(harness, "from_pretrained", no_model)
    with pytest.raises(harness.InputError, match=rf"{data}:1: field 'messages' has the roles \['bot', 'human'\]; "
                                                "expected system / user / assistant / tool"):
        sft.main(make(sft.Config, dataset=data, output_dir=str(tmp_path / "out")))


def test_reward_function_signatures_and_columns_are_checked_at_load(tmp_path):
    (tmp_path / "helpers.py").write_text("def bonus(text):\n    return 0.5 if text.endswith('.') else 0.0\n")
    (tmp_path / "rewards.py").write_text(
        "from helpers import bonus\n"  # a module beside the file: importable while it loads
        "def one(completion):\n    return [1.0]\n"
        "def pair(p, c):\n    return [1.0] * len(c)\n"
        "def accuracy(completions, answer, **kwargs):\n"
        "    return [float(c == a) for c, a in zip(completions, answer)]\n"
        "def polished(completions, **kwargs):\n    return [bonus(c) for c in completions]\n")
    path = tmp_path / "rewards.py"
    for name in ("one", "pair"):
        with pytest.raises(harness.InputError, match=rf"--reward_fn {path}:{name}: {name}\(.*\) cannot be called as "
                                                    r"f\(prompts, completions, \*\*kwargs\)"):
            harness.load_reward_fns([f"{path}:{name}"], columns={"answer"})
    with pytest.raises(harness.InputError, match=rf"{path}:accuracy: accuracy needs the dataset column\(s\) "
                                                r"\['answer'\], which the prompt rows lack "
                                                r"\(their columns: \['source'\]\)"):
        harness.load_reward_fns([f"{path}:accuracy"], columns={"source"})
    fns = harness.load_reward_fns([f"{path}:accuracy", f"{path}:polished"], columns={"answer"})
    assert harness.score_with_fns(fns, ["q", "q"], ["yes.", "no"], {"answer": ["yes.", "yes."]})[1] == \
        {"accuracy": [1.0, 0.0], "polished": [0.5, 0.0]}
    assert str(tmp_path) not in sys.path  # the file's directory is on the path only while it loads


def test_check_eos_pads_with_eos_and_refuses_a_tokenizer_that_cannot_end(tmp_path):
    """A sampling tokenizer: without a pad token it pads with EOS (nothing else changes); with no EOS token, or a chat
    template whose assistant turn does not end with EOS, one error naming the model and what to set."""
    tok = chatml_tokenizer("missing")
    vocab = tok.get_vocab()
    harness.check_eos(tok, "m", "--model_name_or_path", conversational=True)
    assert tok.pad_token_id == tok.eos_token_id and tok.get_vocab() == vocab
    own = toy_tokenizer_with_chat()
    harness.check_eos(own, "m", "--model_name_or_path", conversational=False)
    assert own.pad_token_id != own.eos_token_id  # a pad token of its own is kept
    no_eos = chatml_tokenizer("missing")
    no_eos.eos_token = None
    with pytest.raises(harness.InputError, match=r"^--model_name_or_path m: the tokenizer has no EOS token, so no "
                                                 r"response could end; set eos_token in its tokenizer_config.json"):
        harness.check_eos(no_eos, "m", "--model_name_or_path", conversational=False)
    other_end = chatml_tokenizer("missing")
    other_end.eos_token = "<|endoftext|>"  # the template ends a turn with <|im_end|>
    harness.check_eos(other_end, "m", "--model_name_or_path", conversational=False)  # string prompts: no template
    with pytest.raises(harness.InputError, match=r"^--model_name_or_path m: the chat template ends the assistant's "
                                                 r"turn without the EOS token '<\|endoftext\|>', so sampling would "
                                                 r"not stop there; set eos_token"):
        harness.check_eos(other_end, "m", "--model_name_or_path", conversational=True)
