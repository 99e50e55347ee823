"""reward_model.py: losses against hand / naive computations, score read-out under padding, data formats and bad rows,
normalisation stored in the checkpoint, end-to-end runs (toy, ranking, tiny architectures, 2 processes)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import common
import harness
import reward_model as rm
import toy_task
from conftest import ARCHS, ROOT, make


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------------
# Losses and metrics
# ---------------------------------------------------------------------------------------------------------------------
def test_pairwise_loss_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0, 30.0]), torch.tensor([0.0, 0.0, 1.0, -30.0])
    expected = [-math.log(sigmoid(1.0)), math.log(2.0), -math.log(sigmoid(-3.0)), math.log1p(math.exp(-60.0))]
    torch.testing.assert_close(rm.pairwise_loss(chosen, rejected), torch.tensor(expected))
    margin = torch.tensor([0.5, 1.0, 0.0, 0.0])
    expected_m = [-math.log(sigmoid(0.5)), -math.log(sigmoid(-1.0)), -math.log(sigmoid(-3.0)),
                  math.log1p(math.exp(-60.0))]
    torch.testing.assert_close(rm.pairwise_loss(chosen, rejected, margin), torch.tensor(expected_m))
    # stable far in the tails, where log(sigmoid(x)) underflows to -inf
    assert torch.isfinite(rm.pairwise_loss(torch.tensor([-200.0]), torch.tensor([0.0]))).all()


def test_ranking_loss_is_mean_over_all_pairs():
    torch.manual_seed(0)
    scores = torch.randn(5, 4)
    naive = []
    for s in scores.tolist():
        pair_losses = [-math.log(sigmoid(s[i] - s[j])) for i in range(4) for j in range(i + 1, 4)]
        assert len(pair_losses) == 6  # K (K - 1) / 2
        naive.append(sum(pair_losses) / len(pair_losses))
    torch.testing.assert_close(rm.ranking_loss(scores), torch.tensor(naive))
    # ragged lists: a list of 3 inside a K = 4 batch averages over its own 3 pairs only
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    s = scores[:2].tolist()
    naive_3 = sum(-math.log(sigmoid(s[0][i] - s[0][j])) for i in range(3) for j in range(i + 1, 3)) / 3
    torch.testing.assert_close(rm.ranking_loss(scores[:2], mask), torch.tensor([naive_3, naive[1]]))
    # K = 2 is the pairwise loss
    torch.testing.assert_close(rm.ranking_loss(scores[:, :2]), rm.pairwise_loss(scores[:, 0], scores[:, 1]))


def test_centering_penalty_and_pair_differences():
    scores = torch.tensor([[1.0, -3.0], [0.5, 0.25]])
    torch.testing.assert_close(rm.centering_penalty(scores), torch.tensor([4.0, 0.5625]))  # (r_c + r_r)^2
    lists = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(rm.centering_penalty(lists, mask), torch.tensor([36.0, 36.0]))
    torch.testing.assert_close(rm.pair_differences(lists, mask), torch.tensor([2.0, 1.0, -1.0, -4.0]))


def test_preference_metrics_against_naive():
    diffs = [2.0, -0.1, 0.0, 0.3, 5.0, -3.0]
    scores = [1.0, -1.0, 2.0, 0.0]
    m = rm.preference_metrics(diffs, scores)
    assert m["accuracy"] == pytest.approx(3 / 6)  # the tie is a miss
    assert m["accuracy_sem"] == pytest.approx(math.sqrt(0.5 * 0.5 / 6))  # binomial standard error of the accuracy
    assert m["ties"] == pytest.approx(1 / 6)
    assert m["margin"] == pytest.approx(sum(diffs) / 6)
    assert m["reward/mean"] == pytest.approx(0.5) and m["reward/std"] == pytest.approx(np.std(scores))
    assert (m["reward/min"], m["reward/max"]) == (-1.0, 2.0)
    # confidence sigmoid(|d|): 0.88, 0.525, 0.5, 0.574, 0.993, 0.953
    assert m["pairs_by_confidence/0.5-0.6"] == pytest.approx(3 / 6)
    assert m["accuracy_by_confidence/0.5-0.6"] == pytest.approx(1 / 3)  # -0.1 and 0.0 miss, 0.3 hits
    assert m["accuracy_by_confidence/0.8-0.9"] == 1.0
    assert m["accuracy_by_confidence/0.9-1.0"] == pytest.approx(1 / 2)
    assert m["accuracy_by_confidence/0.6-0.7"] is None and m["pairs_by_confidence/0.6-0.7"] == 0.0
    assert not [k for k in m if "ceiling" in k or "gold" in k]


# ---------------------------------------------------------------------------------------------------------------------
# Score read-out: last real token, whatever the padding
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scores_at_last_real_token_any_padding(tiny_checkpoints, arch):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints[arch], num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[arch])
    pad = model.config.pad_token_id = tok.eos_token_id  # pad == eos: the worst case for reading by token id
    examples = [{"prompt_ids": tok("the movie was")["input_ids"], "completions": [
        tok(" very good .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        tok(" bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]], "margin": 0.0},
        {"prompt_ids": tok("my new phone is")["input_ids"], "completions": [
            tok(" not bad but the battery is ugly !", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            tok(" fine .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]], "margin": 0.0}]
    seqs = [ex["prompt_ids"] + c for ex in examples for c in ex["completions"]]
    with torch.no_grad():
        alone = torch.stack([model.score(getattr(model, model.base_model_prefix)(input_ids=torch.tensor([s]))
                                         .last_hidden_state)[0, -1, 0] for s in seqs])  # no padding at all
        ids_l, mask_l = common.left_pad(seqs, pad)
        torch.testing.assert_close(common.get_scores(model, ids_l, mask_l, normalize=False), alone,
                                   rtol=1e-5, atol=1e-5)
        scores, _, _ = rm.example_scores_and_losses(model, examples, make(rm.Config), torch.device("cpu"), None, pad)
    torch.testing.assert_close(scores.reshape(-1), alone, rtol=1e-5, atol=1e-5)  # right-padded, (B, K) best first


# ---------------------------------------------------------------------------------------------------------------------
# Data formats and bad rows
# ---------------------------------------------------------------------------------------------------------------------
def build(path, tokenizer, cfg):
    """reward_model.main's way from a file to examples: load_rows, parse_row (None: identical), build_dataset."""
    rows = harness.load_rows(path, "--dataset")
    return rm.build_dataset([(where, rm.parse_row(row, where, cfg.loss)) for where, row in rows], tokenizer, cfg)


def toy_rows(path):
    return [row for _, row in harness.load_rows(path, "--dataset")]


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_implicit_prompt_split():
    def split(chosen, rejected, where):  # harness.parse_preference_row: shared with dpo.py, both split a pair alike
        return harness.parse_preference_row({"chosen": chosen, "rejected": rejected}, where)

    assert split("the movie was good .", "the movie was great !", "f:1") == ("the movie was", " good .", " great !")
    assert split("the movie was good", "the movie was good indeed", "f:1") == ("the movie was", " good", " good indeed")
    assert split("the movie was  good .", "the movie was  bad .", "f:1") == ("the movie was", "  good .", "  bad .")
    assert split("good", "bad", "f:1") == ("", "good", "bad")
    user = {"role": "user", "content": "how was it"}
    a, b = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    assert split([user, a], [user, b], "f:1") == ([user], [a], [b])


def test_formats_tokenise_alike(tmp_path):
    """Explicit, implicit and (with the toy chat template) conversational rows give the expected token ids."""
    from conftest import toy_tokenizer_with_chat

    tok = toy_tokenizer_with_chat()
    rows = [{"prompt": "the movie was", "chosen": " good .", "rejected": " bad .", "margin": 1.5},
            {"chosen": "the movie was good .", "rejected": "the movie was bad ."},
            {"prompt": [{"role": "user", "content": "the movie was"}],
             "chosen": [{"role": "assistant", "content": "good ."}], "rejected": "bad ."},
            {"chosen": [{"role": "user", "content": "the movie was"}, {"role": "assistant", "content": "good ."}],
             "rejected": [{"role": "user", "content": "the movie was"}, {"role": "assistant", "content": "bad ."}]}]
    examples = []
    for i, row in enumerate(rows):  # one format per file (a file that mixes them is refused)
        built, counts = build(write_rows(tmp_path, [row], f"{i}.jsonl"), tok, make(rm.Config, max_length=64))
        assert counts == {"skipped_identical": 0, "truncated": 0, "dropped": 0}
        examples += built
    eos = tok.eos_token_id
    good = tok("good .", add_special_tokens=False)["input_ids"]
    bad = tok("bad .", add_special_tokens=False)["input_ids"]
    for ex in examples:
        assert ex["completions"] == [good + [eos], bad + [eos]]
    assert examples[0]["prompt_ids"] == examples[1]["prompt_ids"] == tok("the movie was")["input_ids"]
    assert (examples[0]["margin"], examples[1]["margin"]) == (1.5, 0.0)
    chat_prompt = tok("user : the movie was <eos> assistant :", add_special_tokens=False)["input_ids"]
    assert examples[2]["prompt_ids"] == examples[3]["prompt_ids"] == chat_prompt


@pytest.mark.parametrize("row,message", [
    ({"prompt": "the movie was", "chosen": " good ."}, "missing field 'rejected'"),
    ({"prompt": "the movie was", "chosen": "", "rejected": " bad ."}, "field 'chosen' is empty"),
    ({"prompt": "the movie was", "chosen": " good .", "rejected": "   "}, "field 'rejected' is empty"),
    ({"prompt": "the movie was", "chosen": " good .", "rejected": 3}, "field 'rejected' must be a string"),
    ({"prompt": "the movie was", "chosen": " good .", "rejected": " bad .", "margin": "big"}, "field 'margin'"),
    ({"prompt": 7, "chosen": " good .", "rejected": " bad ."}, "field 'prompt'"),
    ({"chosen": " good .", "rejected": [{"role": "assistant", "content": "x"}]}, "both be strings"),
])
def test_bad_rows_name_file_line_field(tmp_path, row, message):
    good = {"prompt": "the movie was", "chosen": " good .", "rejected": " bad ."}
    # after a good row of the same format (line 2); a row of another format alone (line 1)
    rows = [good, row] if {"prompt", "chosen", "rejected"} <= set(row) else [row]
    path = write_rows(tmp_path, rows)
    with pytest.raises(harness.InputError) as err:
        build(path, toy_task.build_tokenizer(), make(rm.Config, max_length=64))
    assert f"{path}:{len(rows)}: " in str(err.value) and message in str(err.value)
    if len(rows) == 1:  # after the good row: refused as a second format, naming both lines
        path = write_rows(tmp_path, [good, row], "mixed.jsonl")
        with pytest.raises(harness.InputError, match=rf"{path}:2: a text \{{.*\}} row, but {path}:1 is a text "
                                                    r"\{prompt, chosen, rejected\} row; one dataset must hold one"):
            build(path, toy_task.build_tokenizer(), make(rm.Config, max_length=64))


def test_identical_completions_skipped_and_counted(tmp_path):
    explicit = [{"prompt": "the movie was", "chosen": " good .", "rejected": " bad ."},
                {"prompt": "the movie was", "chosen": " good .", "rejected": " good ."}]
    implicit = [{"chosen": "the movie was good .", "rejected": "the movie was good ."},
                {"chosen": "the movie was good .", "rejected": "the movie was bad ."}]
    for name, rows in (("explicit.jsonl", explicit), ("implicit.jsonl", implicit)):
        examples, counts = build(write_rows(tmp_path, rows, name), toy_task.build_tokenizer(),
                                 make(rm.Config, max_length=64))
        assert len(examples) == 1 and counts["skipped_identical"] == 1, name
    with pytest.raises(harness.InputError, match=r"i\.jsonl: no usable example \(counts: \{'skipped_identical': 1"):
        cfg = make(rm.Config, max_length=64, dataset=write_rows(tmp_path, implicit[:1], "i.jsonl"))
        build(cfg.dataset, toy_task.build_tokenizer(), cfg)
    ranking = [{"prompt": "the movie was", "completions": [" good .", " fine .", " good ."]},
               {"prompt": "the movie was", "completions": [" good .", " fine .", " bad ."]}]
    examples, counts = build(write_rows(tmp_path, ranking, "r.jsonl"), toy_task.build_tokenizer(),
                             make(rm.Config, loss="ranking", max_length=64))
    assert len(examples) == 1 and counts["skipped_identical"] == 1 and len(examples[0]["completions"]) == 3
    with pytest.raises(ValueError, match=r"r1\.jsonl:1: field 'completions' must be a list of at least 2"):
        build(write_rows(tmp_path, [{"prompt": "x", "completions": [" good ."]}], "r1.jsonl"),
              toy_task.build_tokenizer(), make(rm.Config, loss="ranking", max_length=64))


def test_over_long_policy(tmp_path):
    tok = toy_task.build_tokenizer()
    prompt = "honestly the camera was"  # <bos> + 4 words
    rows = [{"prompt": prompt, "chosen": " good .", "rejected": " very good and the battery was bad ."},
            {"prompt": prompt, "chosen": " good .", "rejected": " bad ."}]
    path = write_rows(tmp_path, rows)
    # longest completion of row 1: 8 words + EOS = 9 tokens; 5 + 9 = 14 > 12
    examples, counts = build(path, tok, make(rm.Config, max_length=12))
    assert counts["dropped"] == 1 and len(examples) == 1
    examples, counts = build(path, tok, make(rm.Config, max_length=12, truncation="truncate_prompt"))
    assert counts["truncated"] == 1 and len(examples) == 2
    assert examples[0]["prompt_ids"] == tok(prompt)["input_ids"][-3:]  # cut from the start, completions whole
    assert max(len(examples[0]["prompt_ids"]) + len(c) for c in examples[0]["completions"]) == 12
    examples, counts = build(path, tok, make(rm.Config, max_length=9, truncation="truncate_prompt"))
    assert counts["dropped"] == 1  # the completion alone does not fit


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------
def test_toy_end_to_end_normalisation_and_plain_reload(toy_sft_checkpoint, tmp_path):
    out = str(tmp_path / "rm")
    cfg = make(rm.Config, model_name_or_path=toy_sft_checkpoint, output_dir=out, num_epochs=0.06,
               per_device_batch_size=32, learning_rate=1e-3, eval_every=10_000, log_every=5, normalize_samples=48,
               normalize_scale=True, agreement_samples_per_prompt=1, max_new_tokens=12)
    final = rm.main(cfg)
    assert final["loss"] < math.log(2)  # held-out loss below chance after ~18 steps
    n = final["num_eval_examples"]  # the toy's 1000 held-out pairs: the accuracy with its binomial standard error
    assert n == 1000 and final["accuracy_sem"] == pytest.approx(math.sqrt(final["accuracy"] * (1 - final["accuracy"])
                                                                          / n))
    assert 0 <= final["gold_reward_proxy_agreement"] <= 1 and final["agreement_num_samples"] == 36
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"loss", "accuracy", "margin", "reward/mean", "reward/std", "pairs_per_s"} <= set(lines[0])
    assert {"eval/accuracy", "eval/accuracy_sem", "eval/accuracy_by_confidence/0.5-0.6"} <= set(lines[-1])

    # plain transformers loads it; the stored statistics are those of the policy's samples and get_scores applies them
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert (model.config.reward_mean, model.config.reward_std) == (final["reward_mean"], final["reward_std"])
    policy = rm.load_policy(toy_sft_checkpoint, tok, cfg, torch.device("cpu"), torch.float32)
    prompts = sorted({tuple(tok(r["prompt"])["input_ids"]) for _, r in harness.load_rows(
        "data/toy/preferences_train.jsonl", "--dataset")})
    raw = rm.policy_sample_scores(policy, model, tok, [list(p) for p in prompts], 48, cfg, torch.device("cpu"), None)
    assert np.mean(raw) == pytest.approx(model.config.reward_mean, abs=1e-5)
    assert np.std(raw) == pytest.approx(model.config.reward_std, abs=1e-5)
    ex, _ = build(write_rows(tmp_path, [{"prompt": "the movie was", "chosen": " good .",
                                         "rejected": " not bad but the battery is ugly !"}]), tok, cfg)
    ids, mask, *_ = rm.collate(ex, tok.pad_token_id, None)  # right-padded
    with torch.no_grad():
        raw_scores = common.get_scores(model, ids, mask, normalize=False)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0], raw_scores)
        torch.testing.assert_close(common.get_scores(model, ids, mask),
                                   (raw_scores - final["reward_mean"]) / final["reward_std"])


def test_ranking_loss_end_to_end(toy_sft_checkpoint, tmp_path):
    final = rm.main(make(rm.Config, model_name_or_path=toy_sft_checkpoint, output_dir=str(tmp_path / "rm"),
                         loss="ranking", num_epochs=0.1, per_device_batch_size=16, learning_rate=1e-3,
                         eval_every=10_000, normalize_samples=16, agreement_samples_per_prompt=0))
    # 300 eval lists of 4: 6 comparisons each, every one counted in the accuracy and its standard error
    assert final["num_eval_examples"] == 300 and 0.5 < final["accuracy"] < 1
    assert final["accuracy_sem"] == pytest.approx(math.sqrt(final["accuracy"] * (1 - final["accuracy"]) / 1800))
    assert final["loss"] < math.log(2)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_tiny_architectures_conversational(tiny_checkpoints, tmp_path, arch):
    subjects = ["movie", "phone", "cafe", "book", "laptop", "pizza", "game", "watch"]
    rows, explicit = [], ARCHS.index(arch) % 2  # every other architecture: the prompt explicit, or implicit
    for s in subjects:
        user = {"role": "user", "content": f"how was the {s} ?"}
        good, bad = {"role": "assistant", "content": "very good ."}, {"role": "assistant", "content": "bad !"}
        rows.append({"prompt": [user], "chosen": [good], "rejected": [bad]} if explicit else
                    {"chosen": [user, good], "rejected": [user, bad]})
    data = write_rows(tmp_path, rows)
    out = str(tmp_path / "rm")
    # not a toy model: the length has no toy default (the pretrained 1024 exceeds the 128 positions)
    final = rm.main(make(rm.Config, model_name_or_path=tiny_checkpoints[arch], dataset=data, eval_dataset=data,
                         output_dir=out, per_device_batch_size=4, num_epochs=1, normalize_samples=4,
                         max_new_tokens=4, learning_rate=1e-3, max_length=64))
    assert final["num_train_examples"] == 8 and math.isfinite(final["loss"]) and math.isfinite(final["reward_mean"])
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id  # gpt2's BPE had no pad token
    ex, _ = build(data, tok, make(rm.Config, max_length=64))
    ids, mask, *_ = rm.collate(ex[:2], tok.pad_token_id, None)
    with torch.no_grad():  # the plain forward reads the same token as get_scores on right padding
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   common.get_scores(model, ids, mask, normalize=False))


def test_two_processes_match_one(toy_sft_checkpoint, tmp_path):
    train = write_rows(tmp_path, toy_rows("data/toy/preferences_train.jsonl")[:64], "train.jsonl")
    evals = write_rows(tmp_path, toy_rows("data/toy/preferences_eval.jsonl")[:37], "eval.jsonl")  # odd
    args = dict(model_name_or_path=toy_sft_checkpoint, dataset=train, eval_dataset=evals, num_epochs=1.0,
                learning_rate=1e-3, normalize_samples=0, agreement_samples_per_prompt=1, log_every=1)
    one = rm.main(make(rm.Config, output_dir=str(tmp_path / "one"), per_device_batch_size=16, **args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "reward_model.py",
           "--output_dir", str(tmp_path / "two"), "--per_device_batch_size", "8"]
    cmd += [x for k, v in args.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "eval.json"))
    for key in ("loss", "accuracy", "margin", "reward/mean", "reward/std", "train_loss", "train_accuracy"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)


def test_few_held_out_pairs_warn_and_deterministic_labels_report_no_ceiling(toy_sft_checkpoint, tmp_path, capsys):
    """Labels made deterministically from a function (chosen = the higher gold reward): the old label "ceiling" of
    such data is meaningless (no Bradley-Terry noise); the run reports the accuracy with its standard error and no
    ceiling. Under 200 held-out pairs a warning says that the accuracy is too uncertain to judge the model."""
    def by_gold(rows):
        out = []
        for r in rows:
            a, b = (toy_task.gold_reward_one(r["prompt"], c) for c in (r["chosen"], r["rejected"]))
            if a != b:
                out.append({**r, "chosen": r["chosen"] if a > b else r["rejected"],
                            "rejected": r["rejected"] if a > b else r["chosen"]})
        return out

    train = write_rows(tmp_path, by_gold(toy_rows("data/toy/preferences_train.jsonl")[:64]), "train.jsonl")
    pool = by_gold(toy_rows("data/toy/preferences_eval.jsonl")[:260])
    assert len(pool) >= 200
    for n, warned in ((40, True), (200, False)):
        out = str(tmp_path / f"rm{n}")
        final = rm.main(make(rm.Config, model_name_or_path=toy_sft_checkpoint, dataset=train,
                             eval_dataset=write_rows(tmp_path, pool[:n], f"eval{n}.jsonl"), output_dir=out,
                             per_device_batch_size=16, max_steps=2, normalize_samples=0,
                             agreement_samples_per_prompt=0))
        printed = capsys.readouterr().out
        assert (f"warning: {n} held-out examples measure the accuracy to about +-{1 / math.sqrt(n):.2f}" in printed) \
            == warned, printed
        with open(os.path.join(out, "eval.json")) as f:
            saved = json.load(f)
        assert saved["num_eval_examples"] == n and saved["accuracy"] == final["accuracy"]
        assert saved["accuracy_sem"] == pytest.approx(math.sqrt(saved["accuracy"] * (1 - saved["accuracy"]) / n))
        logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert not [k for k in [*saved, *(k for row in logged for k in row)] if "ceiling" in k or "gold_accuracy" in k]
        assert "ceiling" not in printed
