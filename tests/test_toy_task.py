"""The toy task: reproducible data and base model, the gold reward against its documented definition, label noise."""

import collections
import hashlib
import json
import math
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import toy_task

DATA = "data/toy"
FILES = ["sft_train", "sft_eval", "preferences_train", "preferences_eval", "rankings_train", "rankings_eval",
         "prompts_train", "prompts_eval"]


def rows(name: str) -> list[dict]:
    with open(os.path.join(DATA, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------------
# reproducibility of the committed files
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    toy_task.generate_data(str(out), toy_task.SEED)
    return str(out)


def test_regenerating_with_the_seed_reproduces_the_committed_data(regenerated):
    for name in [f"{f}.jsonl" for f in FILES] + ["stats.json"]:
        with open(os.path.join(regenerated, name), "rb") as a, open(os.path.join(DATA, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from a regeneration with seed {toy_task.SEED}"
    stats = json.load(open(os.path.join(DATA, "stats.json")))
    for name, digest in stats["files_sha256"].items():
        assert hashlib.sha256(open(os.path.join(DATA, name), "rb").read()).hexdigest() == digest
    assert set(stats["files_sha256"]) == {f"{f}.jsonl" for f in FILES}


def test_committed_tokenizer_and_config_behave_like_fresh_ones(regenerated):
    # file bytes depend on the transformers version, so compare behaviour instead
    fresh = toy_task.build_tokenizer()
    for path in [toy_task.BASE_MODEL_DIR, os.path.join(regenerated, "base_model")]:
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.get_vocab() == fresh.get_vocab()
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == \
               (fresh.pad_token_id, fresh.bos_token_id, fresh.eos_token_id, fresh.unk_token_id)
        assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3  # pad != eos != bos
        for prompt, completion in [(r["prompt"], r["completion"]) for r in rows("sft_eval")[:50]]:
            ids = tok(prompt)["input_ids"]
            assert ids == fresh(prompt)["input_ids"] and ids[0] == tok.bos_token_id
            completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
            assert completion_ids == fresh(completion, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids + completion_ids  # closed vocabulary
            # round trip: words joined by single spaces (the completion's leading space is the separator)
            assert tok.decode(ids + completion_ids + [tok.eos_token_id], skip_special_tokens=True) == \
                   prompt + completion
        assert tok("the zebra was")["input_ids"][2] == tok.unk_token_id

        config = AutoConfig.from_pretrained(path)
        expected = toy_task.build_config(fresh)
        for key in ["model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id",
                    "eos_token_id", "pad_token_id", "resid_pdrop", "embd_pdrop", "attn_pdrop", "tie_word_embeddings"]:
            assert getattr(config, key) == getattr(expected, key), key
        assert config.toy_task is True  # the marker by which harness.setup gives a toy model the toy's defaults
        assert config.vocab_size == len(tok)
        assert not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))  # config + tokenizer only
        # same seed -> same random model from either config
        models = []
        for c in (config, expected):
            torch.manual_seed(0)
            models.append(AutoModelForCausalLM.from_config(c).eval())
        n_params = sum(p.numel() for p in models[0].parameters())
        assert 1e6 <= n_params <= 5e6
        ids = torch.tensor([tok("the phone was very good .")["input_ids"]])
        with torch.no_grad():
            assert torch.equal(models[0](input_ids=ids).logits, models[1](input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------------------------
# gold reward, hand-checked against the definition in the module docstring
# ---------------------------------------------------------------------------------------------------------------------
def squash(s: float) -> float:
    return 3 * math.tanh(s / 3)


PHONE, MOVIE = "the phone was", "the movie was"  # a device and a media subject


@pytest.mark.parametrize("prompt,completion,expected", [
    (PHONE, " good .", squash(1.0)),
    (PHONE, " terrible !", squash(-2.0)),
    (PHONE, " okay .", 0.0),                                           # neutral word
    # negation: "not"/"never" within the 3 words before, x -0.5
    (PHONE, " not good .", squash(-0.5)),
    (PHONE, " not bad .", squash(0.5)),
    (PHONE, " i did not like it .", squash(-0.5)),
    (PHONE, " never really liked it .", squash(-0.5 * 1.5 * 1.0)),     # intensified and negated
    (PHONE, " not the screen is good .", squash(1.0) + 0.5),           # 4 words before: out of reach
    (PHONE, " not bad but good .", squash(0.5 + 1.0)),                 # "but" ends the negation's clause
    # intensifier: the word right before, same clause
    (PHONE, " very good .", squash(1.5)),
    (PHONE, " extremely terrible .", squash(-4.0)),
    (PHONE, " slightly annoying .", squash(-0.75)),
    (PHONE, " not very good .", squash(1.0 * 1.5 * -0.5)),
    (PHONE, " very , good .", squash(1.0)),                            # a comma breaks the clause
    # squashing: 3 tanh(S / 3)
    (PHONE, " amazing and wonderful .", squash(4.0)),
    (PHONE, " amazing and wonderful and superb .", squash(6.0)),
    # relevance: +-0.5 per aspect, clipped to [-1, 1]
    (PHONE, " good but the battery is nice .", squash(2.0) + 0.5),
    (MOVIE, " good but the battery is nice .", squash(2.0) - 0.5),
    (PHONE, " the battery and the screen and the sound .", 1.0),      # 1.5 clipped
    (MOVIE, " the battery and the screen and the sound .", -1.0),
    ("what a day", " the battery is good .", squash(1.0)),              # no subject in the prompt: no relevance
    # repetition: -1 per repeated content word
    (PHONE, " good good .", squash(2.0) - 1),
    (PHONE, " amazing amazing amazing .", squash(6.0) - 2),
    (PHONE, " the screen and the screen .", 1.0 - 1),
    # ending: -2 without a final "." or "!"
    (PHONE, " good", squash(1.0) - 2),
    (PHONE, " good ,", squash(1.0) - 2),
    # length: -0.25 per word beyond 14
    (PHONE, " okay" * 15 + " .", -0.25 * 2),
    (PHONE, " okay" * 13 + " .", 0.0),
    # empty
    (PHONE, "", -3.0),
    (PHONE, "   ", -3.0),
])
def test_gold_reward_examples(prompt, completion, expected):
    assert toy_task.gold_reward([prompt], [completion]) == [pytest.approx(expected, abs=1e-6)]


def test_gold_reward_batch_checks_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        toy_task.gold_reward([PHONE, MOVIE], [" good ."])


def test_degenerate_positive_text_is_worse_than_a_plain_review():
    # the structure a naive proxy ("positive words are good") misses: repetition, no ending, rambling
    plain = toy_task.gold_reward_one(PHONE, " great and the battery is excellent .")
    rambling = " and ".join(["amazing", "wonderful", "superb", "perfect", "brilliant", "lovely", "great",
                             "nice"]) + " ."
    assert len(rambling.split()) > 14
    for hack in [" amazing amazing amazing amazing .", " amazing wonderful superb perfect brilliant", " " + rambling]:
        assert toy_task.gold_reward_one(PHONE, hack) < plain


# ---------------------------------------------------------------------------------------------------------------------
# the data files
# ---------------------------------------------------------------------------------------------------------------------
def test_file_formats():
    keys = {"sft": {"prompt", "completion"}, "preferences": {"prompt", "chosen", "rejected"},
            "rankings": {"prompt", "completions"}, "prompts": {"prompt"}}
    for name in FILES:
        for row in rows(name):
            assert set(row) == keys[name.split("_")[0]], name
            completions = [v for k, v in row.items() if k != "prompt"]
            completions = completions[0] if name.startswith("rankings") else completions
            for c in completions:  # TRL joins prompt + completion as plain strings and appends EOS itself
                assert c.startswith(" ") and "<eos>" not in c and c.rstrip()[-1] in ".!", (name, c)
            assert not row["prompt"].endswith(" ")
        if name.startswith("rankings"):
            assert all(len(r["completions"]) == 4 == len(set(r["completions"])) for r in rows(name))


def test_held_out_prompts_never_in_training_files():
    train_prompts = {r["prompt"] for r in rows("prompts_train")}
    eval_prompts = {r["prompt"] for r in rows("prompts_eval")}
    assert len(train_prompts | eval_prompts) >= 50 and len(eval_prompts) >= 10
    assert not train_prompts & eval_prompts
    assert train_prompts | eval_prompts == set(toy_task.PROMPTS)
    for split in ["train", "eval"]:
        used = {r["prompt"] for name in FILES if name.endswith(split) for r in rows(name)}
        assert used == (train_prompts if split == "train" else eval_prompts)


def test_sft_completions_are_diverse_and_mixed():
    data = rows("sft_train")
    completions = [r["completion"] for r in data]
    assert len(set(completions)) > 0.3 * len(completions)
    gold = toy_task.gold_reward([r["prompt"] for r in data], completions)
    positive, negative = sum(g > 0.5 for g in gold) / len(gold), sum(g < -0.5 for g in gold) / len(gold)
    assert positive > 0.25 and negative > 0.25


def test_preference_labels_follow_bradley_terry_and_reach_the_ceiling():
    stats = json.load(open(os.path.join(DATA, "stats.json")))
    for split in ["train", "eval"]:
        data = rows(f"preferences_{split}")
        gold = toy_task.gold_reward_one
        diffs = [gold(r["prompt"], r["chosen"]) - gold(r["prompt"], r["rejected"]) for r in data]
        n = len(diffs)
        # the ceiling: the gold reward's expected accuracy on labels drawn with P(a > b) = sigmoid(r*(a) - r*(b))
        ceiling = sum(sigmoid(abs(d)) for d in diffs) / n
        assert stats[f"preferences_{split}_ceiling_accuracy"] == pytest.approx(ceiling, abs=1e-4)
        assert stats[f"preferences_{split}_gold_accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / n, abs=1e-4)
        # the labels' empirical agreement with the gold reward (ties count 1/2) is the ceiling up to sampling noise
        agreement = sum((d > 0) + 0.5 * (d == 0) for d in diffs) / n
        assert abs(agreement - ceiling) < 4 * math.sqrt(ceiling * (1 - ceiling) / n)
        assert 0.65 < ceiling < 0.95  # noisy like human labels, but learnable
        # calibration: within bins of |r*(a) - r*(b)|, the chosen one is the gold-better one with P = sigmoid(|diff|)
        bins = collections.defaultdict(list)
        for d in diffs:
            if d != 0:
                bins[min(int(abs(d)), 3)].append((d > 0, sigmoid(abs(d))))
        for b, pairs in bins.items():
            observed, predicted = (sum(x[i] for x in pairs) / len(pairs) for i in (0, 1))
            assert abs(observed - predicted) < 4 * math.sqrt(predicted * (1 - predicted) / len(pairs)), (split, b)


def test_rankings_are_ordered_by_gold_reward_in_expectation():
    data = rows("rankings_train")
    mean_by_rank = [sum(toy_task.gold_reward_one(r["prompt"], r["completions"][k]) for r in data) / len(data)
                    for k in range(4)]
    assert mean_by_rank == sorted(mean_by_rank, reverse=True) and mean_by_rank[0] - mean_by_rank[3] > 1.0
