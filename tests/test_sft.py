"""sft.py end to end (toy, tiny random architectures with chat data, torchrun) and its pieces against naive versions."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make, ARCHS, ROOT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import harness
import sft
import toy_task

TOY_ROWS = [json.loads(line) for line in open("data/toy/sft_train.jsonl").readlines()[:96]]
# 17 = 9 + 8 across 2 ranks: uneven shares
TOY_EVAL_ROWS = [json.loads(line) for line in open("data/toy/sft_eval.jsonl").readlines()[:17]]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def as_chat(rows):
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"].strip()}]} for r in rows]


def small_config(tmp_path, name: str, **kw) -> sft.Config:
    """A run of a few optimiser steps on 64 toy rows."""
    defaults = dict(output_dir=str(tmp_path / name), dataset=write_jsonl(tmp_path / "train.jsonl", TOY_ROWS[:64]),
                    eval_dataset=write_jsonl(tmp_path / "eval.jsonl", TOY_EVAL_ROWS), per_device_batch_size=16,
                    num_epochs=1.0, log_every=1, eval_every=1000, num_eval_generations=4, max_new_tokens=8,
                    eval_reward_fn=("toy_task:gold_reward",))
    return make(sft.Config, **{**defaults, **kw})


def parsed_rows(path: str) -> list:
    """(where, sft.parse_row(row)) of every row of a data file, as sft.main passes them to build_dataset."""
    return [(where, sft.parse_row(row, where)) for where, row in harness.load_rows(path, "--dataset")]


def logged(out_dir: str, key: str) -> list[float]:
    return [row[key] for row in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if key in row]


# ---------------------------------------------------------------------------------------------------------------------
# end to end on the toy task
# ---------------------------------------------------------------------------------------------------------------------
def test_toy_sft_end_to_end(toy_sft_checkpoint):
    out = toy_sft_checkpoint  # conftest: the toy defaults for 0.05 epochs (15 steps), logged every 5
    losses = logged(out, "loss")
    assert len(losses) == 3 and losses[-1] < losses[0] < math.log(132) + 0.5  # from ~ln(vocab) downwards
    rows = list(map(json.loads, open(os.path.join(out, "metrics.jsonl"))))
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15]
    for key in ["grad_norm", "lr", "epoch", "tokens_per_s"]:
        assert all(key in r for r in rows if "loss" in r)
    final = json.load(open(os.path.join(out, "eval.json")))
    for key in ["eval/loss", "eval/perplexity", "sampling/entropy", "sampling/max_prob", "sampling/sampled_token_prob",
                "sampling/nucleus_size", "eos_rate", "gold_reward_mean", "gold_reward_std", "distinct_completions",
                "num_samples", "train_loss", "train_steps", "tokens_per_s", "truncated", "dropped"]:
        assert key in final, key
    assert final["train_steps"] == 15 and final["truncated"] == final["dropped"] == 0
    assert final["eval/perplexity"] == pytest.approx(math.exp(final["eval/loss"]), rel=1e-5)
    assert final["train_loss"] == pytest.approx(losses[-1])

    # the checkpoint loads with plain transformers; its eval loss, recomputed naively, is the logged one:
    # mean over all completion tokens (+ EOS) of sft_eval.jsonl of -log p
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == toy_task.build_tokenizer().get_vocab()
    eval_rows = [json.loads(line) for line in open("data/toy/sft_eval.jsonl")]
    nll, count = 0.0, 0
    for i in range(0, len(eval_rows), 250):
        seqs, labels = [], []
        for r in eval_rows[i:i + 250]:
            p = tok(r["prompt"])["input_ids"]
            c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(torch.tensor(p + c))
            labels.append(torch.tensor([-100] * len(p) + c))
        pad = torch.nn.utils.rnn.pad_sequence
        ids = pad(seqs, batch_first=True, padding_value=tok.pad_token_id)
        lab = pad(labels, batch_first=True, padding_value=-100)
        mask = pad([torch.ones(len(x), dtype=torch.long) for x in seqs], batch_first=True)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), reduction="sum").item()
        count += (lab[:, 1:] != -100).sum().item()
    assert final["eval/loss"] == pytest.approx(nll / count, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# data: masking, truncation, loss
# ---------------------------------------------------------------------------------------------------------------------
def check_masking(examples, rows, tok, prompt_ids_of):
    """labels = -100 exactly on the prompt; the completion's labels are its ids and end with EOS."""
    for (ids, labels), row in zip(examples, rows):
        P = len(prompt_ids_of(row))
        assert ids[:P] == prompt_ids_of(row)
        assert labels[:P] == [-100] * P and labels[P:] == ids[P:] and len(ids) > P
        assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id and tok.pad_token_id not in ids


def test_completion_only_masking_and_padding(tmp_path):
    tok = toy_task.build_tokenizer()
    cfg = make(sft.Config, dataset=write_jsonl(tmp_path / "d.jsonl", TOY_ROWS[:8]), max_length=64)
    examples, counts = sft.build_dataset(parsed_rows(cfg.dataset), tok, cfg)
    assert counts == {"truncated": 0, "dropped": 0}
    check_masking(examples, TOY_ROWS[:8], tok, lambda r: tok(r["prompt"])["input_ids"])
    for (ids, _), row in zip(examples, TOY_ROWS[:8]):  # the completion is the row's text (with its leading space)
        assert tok.decode(ids, skip_special_tokens=True) == row["prompt"] + row["completion"]
    input_ids, attention_mask, labels = sft.collate(examples, tok.pad_token_id, "cpu")
    for b, (ids, lab) in enumerate(examples):
        n = len(ids)
        assert input_ids[b, :n].tolist() == ids and labels[b, :n].tolist() == lab
        assert (input_ids[b, n:] == tok.pad_token_id).all() and (labels[b, n:] == -100).all()
        assert attention_mask[b].tolist() == [1] * n + [0] * (input_ids.size(1) - n)
    # whole-sequence loss: every real token is a label
    cfg = make(sft.Config, dataset=cfg.dataset, completion_only_loss=False, max_length=64)
    for ids, labels in sft.build_dataset(parsed_rows(cfg.dataset), tok, cfg)[0]:
        assert labels == ids


def test_token_nll_sum_matches_cross_entropy():
    torch.manual_seed(0)
    tok = toy_task.build_tokenizer()
    model = AutoModelForCausalLM.from_config(toy_task.build_config(tok)).eval()
    examples = [sft.tokenize(sft.parse_row(r, "row"), tok, make(sft.Config), "row") for r in TOY_ROWS[:5]]
    with torch.no_grad():
        nll, count = sft.token_nll_sum(model, *sft.collate(examples, tok.pad_token_id, "cpu"))
        expected, n = 0.0, 0
        for ids, labels in examples:  # one unpadded sequence at a time
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            expected += F.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum", ignore_index=-100).item()
            n += sum(x != -100 for x in labels[1:])
    assert count == n and nll.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_truncation_policy_counts(tmp_path, policy):
    tok = toy_task.build_tokenizer()
    long_prompt = "the phone was good and the battery was fine and"  # 11 tokens with <bos>: longer than max_length
    rows = TOY_ROWS[:30] + [{"prompt": long_prompt, "completion": " good ."}]
    cfg = make(sft.Config, dataset=write_jsonl(tmp_path / "d.jsonl", rows), max_length=10, truncation=policy)
    examples, counts = sft.build_dataset(parsed_rows(cfg.dataset), tok, cfg)
    lengths = [(len(tok(r["prompt"])["input_ids"]),
                len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1) for r in rows]
    over = [P + C > 10 for P, C in lengths]
    prompt_too_long = [P >= 10 for P, _ in lengths]
    assert 0 < sum(over) < len(rows) - 1 and sum(prompt_too_long) == 1
    if policy == "truncate":  # cut the completion (no EOS then); a prompt that alone is too long is dropped
        assert counts == {"truncated": sum(over) - 1, "dropped": 1}
        kept = [(r, o) for r, o, pl in zip(rows, over, prompt_too_long) if not pl]
        assert len(examples) == len(kept)
        for (ids, labels), (row, cut) in zip(examples, kept):
            assert len(labels) == len(ids) <= 10
            if cut:
                assert len(ids) == 10 and tok.eos_token_id not in ids
            else:
                assert ids[-1] == tok.eos_token_id
    else:
        assert counts == {"truncated": 0, "dropped": sum(over)}
        assert len(examples) == len(rows) - sum(over) and all(len(ids) <= 10 for ids, _ in examples)
    cfg = make(sft.Config, dataset=write_jsonl(tmp_path / "long.jsonl", rows[-1:]), max_length=10, truncation=policy)
    with pytest.raises(ValueError, match="every example was dropped"):
        sft.build_dataset(parsed_rows(cfg.dataset), tok, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# tiny random architectures with chat data
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_with_chat_data(tmp_path, tiny_checkpoints, arch):
    ckpt = tiny_checkpoints[arch]
    chat = as_chat(TOY_ROWS[:32])
    # not a toy model: no toy defaults, so the length (128 positions) and the learning rate are given
    cfg = small_config(tmp_path, arch, model_name_or_path=ckpt, from_scratch=False, per_device_batch_size=8,
                       num_epochs=2.0, max_length=64, learning_rate=2e-3,
                       dataset=write_jsonl(tmp_path / "chat.jsonl", chat),
                       eval_dataset=write_jsonl(tmp_path / "chat_eval.jsonl", as_chat(TOY_EVAL_ROWS)))
    if arch == "gpt2":  # prompt-completion eval data: also samples from the model (left padding, the new pad token)
        cfg.eval_dataset = write_jsonl(tmp_path / "eval.jsonl", TOY_EVAL_ROWS)
    final = sft.main(cfg)
    losses = logged(cfg.run.output_dir, "loss")
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert math.isfinite(final["eval/loss"])

    tok = AutoTokenizer.from_pretrained(cfg.run.output_dir)
    model = AutoModelForCausalLM.from_pretrained(cfg.run.output_dir)
    original = AutoTokenizer.from_pretrained(ckpt)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.size(0) >= len(tok)
    if arch == "gpt2":  # the BPE tokenizer had no pad token: one was added (and the embeddings grew)
        assert original.pad_token_id is None and tok.pad_token == "<|pad|>" and len(tok) == len(original) + 1
        assert final["num_samples"] == 4 and 0 <= final["eos_rate"] <= 1
    else:
        assert tok.pad_token_id == original.pad_token_id

    # chat masking: the prompt is the chat template of the user turn with the generation prompt
    def prompt_ids_of(row):
        text = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    examples, _ = sft.build_dataset(parsed_rows(cfg.dataset), tok, cfg)
    check_masking(examples, chat, tok, prompt_ids_of)
    assert "assistant" in tok.decode(prompt_ids_of(chat[0]))


def test_chat_row_must_end_with_assistant(tmp_path, tiny_checkpoints):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    rows = as_chat(TOY_ROWS[:2])
    rows[1]["messages"] = rows[1]["messages"][:1]
    cfg = make(sft.Config, dataset=write_jsonl(tmp_path / "chat.jsonl", rows))
    with pytest.raises(ValueError, match=rf"{cfg.dataset}:2: field 'messages' holds no assistant message to train on"):
        sft.build_dataset(parsed_rows(cfg.dataset), tok, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# guards and bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_from_scratch_guard(tmp_path, tiny_checkpoints):
    # a directory with weights + --from_scratch would silently throw the weights away
    with pytest.raises(harness.InputError, match="would discard the weights.*--from_scratch False"):
        sft.main(small_config(tmp_path, "x", model_name_or_path=tiny_checkpoints["llama"], from_scratch=True))
    # and the toy base model holds no weights: fine-tuning it is an error, not a silent random start
    with pytest.raises(harness.InputError, match=r"--model_name_or_path data/toy/base_model: holds \[.*\] but no "
                                                "weights"):
        sft.main(small_config(tmp_path, "y", from_scratch=False))
    # output_dir is claimed (locked) before anything loads; nothing else is written
    assert set(os.listdir(tmp_path / "x")) <= {".lock"} and set(os.listdir(tmp_path / "y")) <= {".lock"}


@pytest.mark.parametrize("content,line,message", [
    ('{"prompt": "the phone was", "completion": " good ."}\n{"prompt": "the phone was", "completion": \n', 2,
     "not valid JSON"),
    ('{"prompt": "the phone was", "completion": " good ."}\n{"prompt": "the phone was"}\n', 2,
     r"a text \{prompt\} row, but .*:1 is a text \{prompt, completion\} row; one dataset must hold one format"),
    ('{"prompt": "the phone was"}\n', 1,
     r"expected \{prompt, completion\} \(strings or messages\), \{messages\} or \{text\}, got keys \['prompt'\]"),
    ('{"prompt": "the phone was", "completion": " good ."}\n\n{"prompt": "the phone was", "completion": " ok ."}\n',
     2, "blank line between JSON rows"),
    ('{"prompt": "the phone was", "completion": ""}\n', 1, "field 'completion' is empty"),
    ('{"prompt": "the phone was", "completion": 3}\n', 1, "field 'completion' must be a string or a list of messages"),
    ("\n", None, "no rows"),
])
@pytest.mark.parametrize("which", ["dataset", "eval_dataset"])
def test_bad_input_names_file_and_line(tmp_path, content, line, message, which):
    bad = write_jsonl(tmp_path / "bad.jsonl", [])
    with open(bad, "w") as f:
        f.write(content)
    where = f"{bad}:{line}: " if line else f"{bad}: "
    with pytest.raises(ValueError, match=where + message):
        sft.main(small_config(tmp_path, "out", **{which: bad}))


# ---------------------------------------------------------------------------------------------------------------------
# distributed and reproducibility
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    cfg = small_config(tmp, "run", max_length=12)  # some truncation, counted in eval.json
    return cfg, sft.main(cfg)


def test_truncation_counts_reported(one_process_run):
    cfg, final = one_process_run
    tok = toy_task.build_tokenizer()
    n_over = sum(len(tok(r["prompt"])["input_ids"]) + len(tok(r["completion"], add_special_tokens=False)["input_ids"])
                 + 1 > 12 for r in TOY_ROWS[:64])
    assert n_over > 0 and final["truncated"] == n_over and final["dropped"] == 0
    assert json.load(open(os.path.join(cfg.run.output_dir, "eval.json")))["truncated"] == n_over


def test_same_seed_same_result(tmp_path, one_process_run):
    cfg, final = one_process_run
    again = sft.main(small_config(tmp_path, "again", max_length=12))
    other_seed = sft.main(small_config(tmp_path, "seed2", max_length=12, seed=2))
    assert logged(cfg.run.output_dir, "loss") == logged(str(tmp_path / "again"), "loss")
    assert again["eval/loss"] == final["eval/loss"] and again["gold_reward_mean"] == final["gold_reward_mean"]
    a = load_file(os.path.join(cfg.run.output_dir, "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged(str(tmp_path / "seed2"), "loss") != logged(cfg.run.output_dir, "loss")
    assert other_seed["eval/loss"] != final["eval/loss"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, one_process_run):
    cfg, final = one_process_run
    accumulated = sft.main(small_config(tmp_path, "accum", max_length=12, per_device_batch_size=8,
                                        gradient_accumulation_steps=2))
    assert logged(str(tmp_path / "accum"), "loss") == pytest.approx(logged(cfg.run.output_dir, "loss"), rel=1e-5)
    assert accumulated["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)


def test_torchrun_two_processes_match_one_process(tmp_path, one_process_run):
    cfg, final = one_process_run
    out = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
           "--output_dir", out, "--dataset", cfg.dataset, "--eval_dataset", cfg.eval_dataset, "--max_length", "12",
           "--per_device_batch_size", "8", "--num_epochs", "1", "--log_every", "1", "--eval_every", "1000",
           "--num_eval_generations", "4", "--max_new_tokens", "8",
           "--eval_reward_fn", "toy_task:gold_reward"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
    # same global batch (2 x 8 = 16) -> the same losses, the same eval loss and the same weights, up to float error
    one_losses = logged(cfg.run.output_dir, "loss")
    assert len(one_losses) == 4 and logged(out, "loss") == pytest.approx(one_losses, rel=1e-5)
    two = json.load(open(os.path.join(out, "eval.json")))
    assert two["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert two["truncated"] == final["truncated"] and two["num_samples"] == 4
    one_model = AutoModelForCausalLM.from_pretrained(cfg.run.output_dir)
    two_model = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), (_, q) in zip(one_model.state_dict().items(), two_model.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-3), name
    ids = torch.tensor([toy_task.build_tokenizer()("the phone was good .")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(one_model(input_ids=ids).logits, two_model(input_ids=ids).logits, atol=1e-3)
