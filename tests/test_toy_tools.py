"""The tools toy (data/toy/tools): its data, tokenizer, tool, gold tool reward, defaults, regeneration, report table."""

import hashlib
import itertools
import json
import math
import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import harness
import toy_task

DATA, TOOLS = "data/toy", "data/toy/tools"
TOOL_FILES = ["sft_train", "sft_eval", "prompts_train", "prompts_eval"]
PHONE, MOVIE = "the phone was", "the movie was"


def rows(name: str, folder: str = TOOLS) -> list[dict]:
    with open(os.path.join(folder, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def squash(s: float) -> float:
    return 3 * math.tanh(s / 3)


def demo(product: str, result: str, review: str) -> str:
    """A completion that calls the tool, as the rollout leaves it (written out here, not with toy_task's helper)."""
    return f" <call> lookup {product} </call> <result> {result} </result>{review}"


# ---------------------------------------------------------------------------------------------------------------------
# gold_reward stays what it was: the refactoring into parts (sentiment_of, score_words) changes no value
# ---------------------------------------------------------------------------------------------------------------------
def reference_gold_reward_one(prompt: str, completion: str) -> float:
    """gold_reward_one as it was before the tools toy, verbatim."""
    words = toy_task.words_of(completion)
    if not words:
        return -3.0
    sentiment, clause_start = 0.0, 0
    for i, w in enumerate(words):
        if w in toy_task.CLAUSE_BREAKS:
            clause_start = i + 1
        elif w in toy_task.POLARITY:
            value = toy_task.POLARITY[w]
            if i - 1 >= clause_start and words[i - 1] in toy_task.INTENSIFIERS:
                value *= toy_task.INTENSIFIERS[words[i - 1]]
            if any(words[k] in toy_task.NEGATIONS for k in range(max(clause_start, i - 3), i)):
                value *= -0.5
            sentiment += value
    reward = 3.0 * math.tanh(sentiment / 3.0)
    subject = toy_task.prompt_subject(prompt)
    relevance = 0.0
    for w in words:
        if w in toy_task.ASPECT_CATEGORIES and subject is not None:
            relevance += 0.5 if toy_task.ASPECT_CATEGORIES[w] == toy_task.SUBJECT_CATEGORY[subject] else -0.5
    reward += max(-1.0, min(1.0, relevance))
    content = [w for w in words if w in toy_task.CONTENT_WORDS]
    reward -= 1.0 * (len(content) - len(set(content)))
    if words[-1] not in toy_task.ENDINGS:
        reward -= 2.0
    reward -= 0.25 * max(0, len(words) - 14)
    return round(reward, 6)


def test_gold_reward_values_are_unchanged_on_the_sft_eval_file():
    data = rows("sft_eval", DATA)
    values = toy_task.gold_reward([r["prompt"] for r in data], [r["completion"] for r in data])
    assert values == [reference_gold_reward_one(r["prompt"], r["completion"]) for r in data]  # exactly, not approx
    # and the digest of the values computed before the refactoring
    assert hashlib.sha256(json.dumps(values).encode()).hexdigest() == \
        "6795835f055524bbdb31424e9988759ce44c2011db5dcfcb8c604a55e50a03c8"
    for r in rows("preferences_eval", DATA)[:300]:
        for c in (r["chosen"], r["rejected"]):
            assert toy_task.gold_reward_one(r["prompt"], c) == reference_gold_reward_one(r["prompt"], c)


# ---------------------------------------------------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("product", ["phone", "movie", "bakery", " phone "])
@pytest.mark.parametrize("rating", ["good", "bad"])
def test_lookup_returns_the_hidden_rating_of_a_known_product(product, rating):
    assert toy_task.lookup(product, rating) == rating


@pytest.mark.parametrize("product", ["zebra", "battery", "", "lookup"])  # not a subject (an aspect, nothing, the tool)
def test_lookup_of_an_unknown_product_raises(product):
    with pytest.raises(ValueError, match="unknown product"):
        toy_task.lookup(product, "good")


def test_lookup_refuses_a_rating_that_is_not_good_or_bad():
    with pytest.raises(ValueError, match="rating"):
        toy_task.lookup("phone", "excellent")


def test_lookup_has_the_schema_grpo_reads():
    # TRL's tools: type hints and a Google-style docstring with Args:, turned into a JSON schema
    from transformers.utils import get_json_schema

    schema = get_json_schema(toy_task.lookup)["function"]
    assert schema["name"] == "lookup"
    assert set(schema["parameters"]["properties"]) == {"product", "rating"}
    assert all(p["type"] == "string" and p["description"] for p in schema["parameters"]["properties"].values())


# ---------------------------------------------------------------------------------------------------------------------
# the gold tool reward, by hand
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,completion,rating,expected", [
    # the sentiment term's sign follows the rating; the call and result are not scored
    (PHONE, demo("phone", "good", " very good ."), "good", squash(1.5)),
    (PHONE, demo("phone", "bad", " very good ."), "bad", -squash(1.5)),
    (PHONE, demo("phone", "bad", " terrible !"), "bad", squash(2.0)),
    (PHONE, demo("phone", "good", " terrible !"), "good", squash(-2.0)),
    (PHONE, demo("phone", "bad", " not bad ."), "bad", -squash(0.5)),
    # relevance, repetition, ending, length: unchanged, and never flipped
    (PHONE, demo("phone", "bad", " good but the battery is nice ."), "bad", -squash(2.0) + 0.5),
    (MOVIE, demo("movie", "bad", " bad but the battery is awful ."), "bad", squash(3.0) - 0.5),
    (PHONE, demo("phone", "bad", " awful awful ."), "bad", squash(4.0) - 1),
    (PHONE, demo("phone", "good", " good"), "good", squash(1.0) - 2),
    (PHONE, demo("phone", "good", " okay" * 15 + " ."), "good", -0.25 * 2),
    # the call's words count for nothing, not even length: only the 15 review words are over 14
    (PHONE, demo("phone", "good", " okay" * 14 + " ."), "good", -0.25 * 1),
    # no call: the same score (the rating is hidden, not absent)
    (PHONE, " terrible !", "bad", squash(2.0)),
    (PHONE, " terrible !", "good", squash(-2.0)),
    # nothing but the call: empty
    (PHONE, demo("phone", "good", ""), "good", -3.0),
    (PHONE, "", "bad", -3.0),
    # an error message as the result, several calls, no space around the segments: all cut out
    (PHONE, " <call> lookup zebra </call> <result> error: ValueError: unknown product 'zebra' </result> good .",
     "good", squash(1.0)),
    (PHONE, demo("phone", "bad", "") + demo("camera", "bad", " ugly ."), "bad", squash(1.5)),
    (PHONE, " <call>lookup phone</call><result>good</result>nice .", "good", squash(1.0)),
])
def test_gold_tool_reward_examples(prompt, completion, rating, expected):
    assert toy_task.gold_tool_reward([prompt], [completion], [rating]) == [pytest.approx(expected, abs=1e-6)]


def test_gold_tool_reward_is_the_gold_reward_of_the_review_for_good():
    for r in rows("sft_eval", DATA)[:200]:
        with_call = demo(toy_task.prompt_subject(r["prompt"]), "good", r["completion"])
        assert toy_task.gold_tool_reward([r["prompt"]], [with_call], ["good"]) == \
               [reference_gold_reward_one(r["prompt"], r["completion"])]


def test_gold_tool_reward_flips_only_the_sentiment_for_bad():
    # r(bad) = r(good) - 2 * sentiment term, the sentiment term computed here by hand for a few reviews
    for review, s in [(" very good .", 1.5), (" not very good .", -0.75), (" awful but the screen is great .", -0.5),
                      (" i did not like it .", -0.5), (" okay .", 0.0)]:
        good, bad = toy_task.gold_tool_reward([PHONE] * 2, [demo("phone", "x", review)] * 2, ["good", "bad"])
        assert bad == pytest.approx(good - 2 * squash(s), abs=2e-6)


def test_a_review_agreeing_with_the_rating_scores_higher():
    for rating, agree, disagree in [("good", " really great .", " really awful ."),
                                    ("bad", " really awful .", " really great .")]:
        a, d = toy_task.gold_tool_reward([PHONE] * 2, [demo("phone", rating, agree), demo("phone", rating, disagree)],
                                         [rating] * 2)
        assert a > 1 and d < -1


def test_gold_tool_reward_signature_and_checks():
    # TRL's signature: prompts, completions, the column "rating" (which the tool prompt rows hold), other columns
    fns = harness.load_reward_fns(toy_task.TOOLS_DEFAULTS["grpo"]["reward_fn"], columns={"rating"})
    assert list(fns) == ["gold_tool_reward"]
    assert toy_task.gold_tool_reward([PHONE], [" good ."], rating=["good"], other=[1]) == [pytest.approx(squash(1.0))]
    conversation = [{"role": "user", "content": PHONE}]
    assert toy_task.gold_tool_reward([conversation], [[{"role": "assistant", "content": " good ."}]], ["bad"]) == \
           [pytest.approx(-squash(1.0))]
    with pytest.raises(ValueError, match="rating 'great'"):
        toy_task.gold_tool_reward([PHONE], [" good ."], ["great"])
    with pytest.raises(ValueError, match="2 prompts, 1 completions and 2 ratings"):
        toy_task.gold_tool_reward([PHONE, MOVIE], [" good ."], ["good", "bad"])


@pytest.mark.parametrize("completion,n", [
    (" good .", 0), (demo("phone", "good", " good ."), 1), (demo("phone", "bad", "") + demo("phone", "bad", " ."), 2),
    (" <call> lookup phone", 0),                     # cut off before </call>: never ran
    (" <result> good </result> good .", 0),          # a result the policy wrote itself is no call
])
def test_tool_calls_counts_complete_calls(completion, n):
    assert toy_task.tool_calls([completion]) == [n]


# ---------------------------------------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------------------------------------
def test_tool_prompt_rows_hold_every_prompt_of_the_main_split_with_both_ratings():
    for split in ("train", "eval"):
        data = rows(f"prompts_{split}")
        assert all(set(r) == {"prompt", "rating"} for r in data)
        main = {r["prompt"] for r in rows(f"prompts_{split}", DATA)}
        assert sorted((r["prompt"], r["rating"]) for r in data) == sorted(itertools.product(main, ["good", "bad"]))


def test_sft_rows_format_split_and_lengths():
    tok = toy_task.build_tool_tokenizer()
    for split in ("train", "eval"):
        main = {r["prompt"] for r in rows(f"prompts_{split}", DATA)}
        data = rows(f"sft_{split}")
        assert len(data) == {"train": 6000, "eval": 500}[split]
        assert {r["prompt"] for r in data} <= main and len({r["prompt"] for r in data}) > 0.9 * len(main)
        for r in data:
            assert set(r) == {"prompt", "completion", "rating"} and r["rating"] in ("good", "bad")
            assert r["completion"].startswith(" ") and r["completion"][-1] in ".!" and "<eos>" not in r["completion"]
            ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            # prompt + response + EOS fit the 64 positions with grpo's budget of 24 new tokens
            assert len(ids) + 1 <= toy_task.TOOLS_DEFAULTS["grpo"]["max_new_tokens"]
        ratings = [r["rating"] for r in data]
        assert 0.4 < ratings.count("good") / len(ratings) < 0.6


def split_demonstration(completion: str):
    """(product, result, review) of a completion that calls the tool, else None (parsed here, independently)."""
    words = completion.split()
    if words[:2] != ["<call>", "lookup"]:
        assert "<call>" not in words and "<result>" not in words and "lookup" not in words, completion
        return None
    assert words[3:5] == ["</call>", "<result>"] and words[6] == "</result>", completion
    return words[2], words[5], " " + " ".join(words[7:])


def test_demonstrations_call_the_prompt_subject_and_agree_with_the_result():
    data = rows("sft_train")
    agree_blind = []
    for r in data:
        parts = split_demonstration(r["completion"])
        gold_good = toy_task.gold_tool_reward([r["prompt"]], [r["completion"]], ["good"])[0]
        gold_bad = toy_task.gold_tool_reward([r["prompt"]], [r["completion"]], ["bad"])[0]
        sentiment = (gold_good - gold_bad) / 2  # the sentiment term, from the flip
        if parts is None:
            agree_blind.append((sentiment > 0) == (r["rating"] == "good"))
            continue
        product, result, review = parts
        assert product == toy_task.prompt_subject(r["prompt"]) and result == r["rating"]
        assert sentiment > 0.5 if result == "good" else sentiment < -0.5, r
        assert toy_task.gold_reward_one(r["prompt"], review) == gold_good  # the review is all that is scored
    # without a call the review is blind: it agrees with the hidden rating about as often as chance
    assert 0.35 < sum(agree_blind) / len(agree_blind) < 0.65


def test_call_rate_is_about_half_and_stats_say_so():
    stats = json.load(open(os.path.join(TOOLS, "stats.json")))
    for split in ("train", "eval"):
        called = [split_demonstration(r["completion"]) is not None for r in rows(f"sft_{split}")]
        rate = sum(called) / len(called)
        assert 0.4 < rate < 0.6
        assert stats[f"sft_{split}_call_rate"] == pytest.approx(rate, abs=1e-4)
    assert stats["num_rows"] == {f"{name}.jsonl": len(rows(name)) for name in TOOL_FILES}
    assert stats["num_prompts_train"] == 108 and stats["num_prompts_eval"] == 36
    # the call is worth something: the SFT demonstrations that call score far more than the blind ones
    assert stats["sft_eval_gold_tool_reward_mean_with_call"] > stats["sft_eval_gold_tool_reward_mean_without_call"] + 1
    for name, digest in stats["files_sha256"].items():
        assert hashlib.sha256(open(os.path.join(TOOLS, name), "rb").read()).hexdigest() == digest
    assert set(stats["files_sha256"]) == {f"{f}.jsonl" for f in TOOL_FILES}


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer and base model
# ---------------------------------------------------------------------------------------------------------------------
ROUND_TRIP = " <call> lookup phone </call> <result> good </result> very nice ."


@pytest.mark.parametrize("path", [None, os.path.join(TOOLS, "base_model")])
def test_tool_tokenizer_splits_the_call_tokens_and_round_trips(path):
    tok = toy_task.build_tool_tokenizer() if path is None else AutoTokenizer.from_pretrained(path)
    ids = tok(ROUND_TRIP, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ROUND_TRIP.split()  # every markup token one token
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == ROUND_TRIP.strip()  # joined with single spaces
    prompt = tok(PHONE)["input_ids"]
    assert tok.decode(prompt + ids + [tok.eos_token_id], skip_special_tokens=True) == PHONE + ROUND_TRIP
    # the main toy's ids stay: a superset of its vocabulary, the tools' tokens appended
    main = toy_task.build_tokenizer()
    vocab = tok.get_vocab()
    assert {w: vocab[w] for w in main.get_vocab()} == main.get_vocab()
    assert sorted(vocab[t] for t in toy_task.TOOL_TOKENS) == list(range(len(main), len(main) + 5))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == \
           (main.pad_token_id, main.bos_token_id, main.eos_token_id, main.unk_token_id)


def test_tool_base_model_config():
    path = os.path.join(TOOLS, "base_model")
    config, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert config.toy_task == "tools" and json.load(open(os.path.join(path, "config.json")))["toy_task"] == "tools"
    assert AutoConfig.from_pretrained(toy_task.BASE_MODEL_DIR).toy_task is True  # the review toy's is unchanged
    assert config.vocab_size == len(tok) == len(toy_task.build_tokenizer()) + 5
    expected = toy_task.build_config(toy_task.build_tool_tokenizer(), "tools")
    for key in ["model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id",
                "eos_token_id", "pad_token_id", "resid_pdrop", "embd_pdrop", "attn_pdrop", "tie_word_embeddings"]:
        assert getattr(config, key) == getattr(expected, key), key
    assert not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))  # sft.py trains from scratch


# ---------------------------------------------------------------------------------------------------------------------
# regeneration
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    toy_task.generate_data(str(out), toy_task.SEED)  # what `python toy_task.py generate` runs
    return str(out)


def test_generate_reproduces_the_tools_files_byte_for_byte(regenerated):
    for name in [f"{f}.jsonl" for f in TOOL_FILES] + ["stats.json", "defaults.json"]:
        with open(os.path.join(regenerated, "tools", name), "rb") as a, open(os.path.join(TOOLS, name), "rb") as b:
            assert a.read() == b.read(), f"tools/{name} differs from a regeneration with seed {toy_task.SEED}"
    # the main toy's files do not move (the tools toy draws from a stream of its own)
    for name in os.listdir(DATA):
        if name.endswith((".jsonl", ".json")):
            with open(os.path.join(regenerated, name), "rb") as a, open(os.path.join(DATA, name), "rb") as b:
                assert a.read() == b.read(), name


def test_regenerated_tool_tokenizer_and_config_behave_like_the_committed_ones(regenerated):
    # file bytes depend on the transformers version, so compare behaviour
    committed, fresh = (os.path.join(d, "base_model") for d in (TOOLS, os.path.join(regenerated, "tools")))
    a, b = AutoTokenizer.from_pretrained(committed), AutoTokenizer.from_pretrained(fresh)
    assert a.get_vocab() == b.get_vocab()
    for r in rows("sft_eval")[:50]:
        for text, special in ((r["prompt"], True), (r["completion"], False)):
            assert a(text, add_special_tokens=special)["input_ids"] == b(text, add_special_tokens=special)["input_ids"]
    config = [json.load(open(os.path.join(d, "config.json"))) | {"transformers_version": None}
              for d in (committed, fresh)]
    assert config[0] == config[1] and config[0]["toy_task"] == "tools"


# ---------------------------------------------------------------------------------------------------------------------
# defaults by marker
# ---------------------------------------------------------------------------------------------------------------------
def test_defaults_for_the_tools_marker():
    sft = harness.toy_defaults("sft", "tools")
    assert sft == dict(dataset="data/toy/tools/sft_train.jsonl", eval_dataset="data/toy/tools/sft_eval.jsonl",
                       eval_reward_fn=["none"], from_scratch=True, learning_rate=2e-3, max_length=64,
                       per_device_batch_size=64, max_new_tokens=24, num_epochs=16.0)
    grpo = harness.toy_defaults("grpo", "tools")  # JSON: tuples read as lists (setup makes them tuples)
    assert grpo == dict(prompts="data/toy/tools/prompts_train.jsonl", eval_prompts="data/toy/tools/prompts_eval.jsonl",
                        reward_fn=["toy_task:gold_tool_reward"], eval_reward_fn=["toy_task:gold_tool_reward"],
                        tools=["toy_task:lookup"], reward_model_path="none", learning_rate=1e-4, max_new_tokens=24,
                        max_prompt_length=40, missing_eos_penalty=1.0)
    for path in (sft["dataset"], sft["eval_dataset"], grpo["prompts"], grpo["eval_prompts"]):
        assert os.path.isfile(path)
    # grpo.py checks prompt + response against the model's positions
    assert grpo["max_prompt_length"] + grpo["max_new_tokens"] <= AutoConfig.from_pretrained(
        os.path.join(TOOLS, "base_model")).n_positions


def test_the_defaults_files_are_toy_tasks_and_other_markers_fail_by_name():
    # the harness reads what toy_task.py writes (data/toy/defaults.json, data/toy/tools/defaults.json), never imports it
    for marker, defaults in ((True, toy_task.DEFAULTS), ("tools", toy_task.TOOLS_DEFAULTS)):
        for script in defaults:
            assert harness.toy_defaults(script, marker) == json.loads(json.dumps(defaults[script]))
    for script in ("reward_model", "ppo", "dpo"):
        with pytest.raises(harness.InputError, match=f'{script}.py has no defaults on the tools toy.*"tools"'):
            harness.toy_defaults(script, "tools")
    with pytest.raises(harness.InputError, match='"toy_task": "chess"'):
        harness.toy_defaults("sft", "chess")


# ---------------------------------------------------------------------------------------------------------------------
# the report's tools table, with a stubbed rollout
# ---------------------------------------------------------------------------------------------------------------------
REVIEWS = {" very good .": 1.5, " very bad .": -1.5, " okay .": 0.0, " nice !": 1.0}  # review: S (by hand)


class StubRollout:
    """Stands in for grpo.tool_rollout (the interface the report is written against). By the run it samples:
    sft_tools calls half of the time (sometimes an unknown product) and writes a random review; grpo_tools always
    calls and agrees with the result; grpo_no_tools never calls. Records what it wrote, by run."""

    def __init__(self):
        self.written = {}

    def __call__(self, policy, tokenizer, prompts, prompt_ids, columns, tools, cfg, generator, device, amp):
        assert cfg.max_new_tokens == 24 and cfg.tool_format == "simple" and cfg.max_tool_calls >= 1
        assert len(prompts) == len(prompt_ids) == len(columns) and all(i[0] == tokenizer.bos_token_id
                                                                       for i in prompt_ids)
        run = os.path.basename(policy.name_or_path)
        seqs, sampled, calls = [], [], []
        for prompt, row in zip(prompts, columns):
            u, v = torch.rand(2, generator=generator).tolist()
            call = run == "grpo_tools" or (run == "sft_tools" and u < 0.5)
            review = list(REVIEWS)[int(v * len(REVIEWS))]
            if run == "grpo_tools":
                review = " very good ." if row["rating"] == "good" else " very bad ."
            ids, mask, text = [], [], ""
            if call:
                product = "zebra" if v > 0.9 else toy_task.prompt_subject(prompt)
                try:
                    result = tools["lookup"](product, row["rating"])
                except ValueError as e:
                    result = f"error: {e}"
                head = tokenizer(f" <call> lookup {product} </call>", add_special_tokens=False)["input_ids"]
                inserted = tokenizer(f" <result> {result} </result>", add_special_tokens=False)["input_ids"]
                ids, mask = head + inserted, [1] * len(head) + [0] * len(inserted)
                text = f" <call> lookup {product} </call> <result> {result} </result>"
            tail = tokenizer(review, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(ids + tail)
            sampled.append(mask + [1] * len(tail))
            calls.append([product] if call else [])
            self.written.setdefault(run, []).append((prompt, row["rating"], text + review, call))
        R = max(map(len, seqs))
        pad = lambda s, v: s + [v] * (R - len(s))  # noqa: E731
        return (torch.tensor([pad(s, tokenizer.pad_token_id) for s in seqs]),
                torch.tensor([pad([1] * len(s), 0) for s in seqs]), torch.tensor([pad(m, 0) for m in sampled]), calls)


def expected_gold(prompt: str, rating: str, review_with_call: str) -> float:
    """The stub's reviews scored by hand: the sentiment term, flipped for bad (nothing else applies to them)."""
    review = review_with_call.split("</result>")[-1]
    return (1 if rating == "good" else -1) * squash(REVIEWS[review])


def save_tiny_tools_model(path, marker="tools"):
    tok = toy_task.build_tool_tokenizer() if marker == "tools" else toy_task.build_tokenizer()
    config = toy_task.build_config(tok, marker)
    config.n_embd, config.n_layer, config.n_head = 16, 1, 2  # the stub never runs it: as small as can be
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("tool_runs")
    for name in ("sft_tools", "grpo_tools"):
        save_tiny_tools_model(runs / name)
    (runs / "grpo_tools" / "eval.json").write_text(json.dumps({"script": "grpo.py", "advantage_estimator": "grpo"}))
    return runs


def test_tools_table_with_a_stubbed_rollout(tool_runs):
    stub = StubRollout()
    result = toy_task.tool_report(str(tool_runs), best_of=(1, 4, 16), samples_per_prompt=4, num_prompts=6, rollout=stub)
    table = {r["method"]: r for r in result["rows"]}
    assert list(table) == ["SFT-tools", "best-of-4 (oracle)", "best-of-16 (oracle)", "GRPO-tools"]

    # SFT-tools: the mean over its pool of 16 samples per prompt row, scored by hand
    pool = stub.written["sft_tools"]
    assert len(pool) == 6 * 16 and len({(p, r) for p, r, _, _ in pool}) == 6  # 3 prompts x both ratings
    gold = [expected_gold(*w[:3]) for w in pool]
    assert table["SFT-tools"]["gold_tool_reward_mean"] == pytest.approx(sum(gold) / len(gold))
    assert table["SFT-tools"]["tool_call_rate"] == pytest.approx(sum(w[3] for w in pool) / len(pool))
    assert table["SFT-tools"]["num_values"] == 96
    assert any("error:" in w[2] for w in pool)  # an unknown product's error message was cut out of the score

    # best-of-N ranked by the gold tool reward itself: brute force over every subset of each row's pool
    by_row = {}
    for w, g in zip(pool, gold):
        by_row.setdefault(w[:2], []).append(g)
    for n in (4, 16):
        per_row = [sum(max(s) for s in itertools.combinations(g, n)) / math.comb(16, n) for g in by_row.values()]
        assert table[f"best-of-{n} (oracle)"]["gold_tool_reward_mean"] == pytest.approx(sum(per_row) / 6)
        assert table[f"best-of-{n} (oracle)"]["num_values"] == 6
    assert table["SFT-tools"]["gold_tool_reward_mean"] < table["best-of-4 (oracle)"]["gold_tool_reward_mean"] < \
        table["best-of-16 (oracle)"]["gold_tool_reward_mean"]

    # GRPO-tools: always calls and agrees with the result, on 4 samples per row
    assert len(stub.written["grpo_tools"]) == 24
    assert table["GRPO-tools"]["tool_call_rate"] == 1.0
    assert table["GRPO-tools"]["gold_tool_reward_mean"] == pytest.approx(squash(1.5))
    assert table["GRPO-tools"]["gold_tool_reward_sem"] == pytest.approx(0.0, abs=1e-6)

    lines = "\n".join(result["lines"])
    assert "## Tool use (the tools toy)" in lines
    assert f"| GRPO-tools | {squash(1.5):.3f} +- 0.000 | 1.000 | 24 |" in lines
    assert "Missing: " in lines and "--tools none" in lines  # runs/grpo_no_tools absent
    assert set(result["samples"]) == {"SFT-tools", "GRPO-tools"}


def test_tools_table_adds_grpo_no_tools_when_present(tool_runs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tool_runs, runs)
    save_tiny_tools_model(runs / "grpo_no_tools")
    stub = StubRollout()
    result = toy_task.tool_report(str(runs), best_of=(1, 4), samples_per_prompt=2, num_prompts=2, rollout=stub)
    table = {r["method"]: r for r in result["rows"]}
    assert table["GRPO-no-tools"]["tool_call_rate"] == 0.0 and not result["missing"]
    expected = [expected_gold(*w[:3]) for w in stub.written["grpo_no_tools"]]
    assert table["GRPO-no-tools"]["gold_tool_reward_mean"] == pytest.approx(sum(expected) / len(expected))


def test_tools_table_is_skipped_without_a_rollout(tool_runs, monkeypatch):
    monkeypatch.setattr(toy_task, "load_tool_rollout", lambda: None)
    result = toy_task.tool_report(str(tool_runs))
    assert result["rows"] == [] and "skipped: grpo.py has no tool_rollout yet" in "\n".join(result["lines"])


def test_a_rollout_that_takes_the_chat_schemas_gets_none(tool_runs):
    # grpo.tool_rollout may also take the tools' JSON schemas (the chat format's); the simple format needs none
    seen = {}
    stub = StubRollout()

    def with_schemas(policy, tokenizer, prompts, prompt_ids, columns, tools, schemas, cfg, generator, device, amp):
        seen["schemas"] = schemas
        return stub(policy, tokenizer, prompts, prompt_ids, columns, tools, cfg, generator, device, amp)

    result = toy_task.tool_report(str(tool_runs), best_of=(1,), samples_per_prompt=1, num_prompts=1,
                                  rollout=with_schemas)
    assert seen["schemas"] == [] and [r["method"] for r in result["rows"]] == ["SFT-tools", "GRPO-tools"]


def test_report_adds_the_tools_table_and_keeps_tools_runs_out_of_the_main_table(tool_runs, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(tool_runs, runs)
    save_tiny_tools_model(runs / "sft", marker=True)  # a review-toy SFT model: the main table's required stage
    monkeypatch.setattr(toy_task, "load_tool_rollout", StubRollout)
    result = toy_task.report(str(runs), best_of=(1,), samples_per_prompt=2, num_prompts=2)
    assert [r["method"] for r in result["rows"]] == ["SFT"]  # grpo_tools (a grpo.py run) is not in the main table
    assert [r["method"] for r in result["tools"]["rows"]] == ["SFT-tools", "best-of-4 (oracle)",
                                                              "best-of-16 (oracle)", "GRPO-tools"]
    report_md = (runs / "report.md").read_text()
    assert report_md.index("| method | gold reward") < report_md.index("## Tool use (the tools toy)") < \
        report_md.index("## Samples")
    assert "- GRPO-tools: `" in report_md


@pytest.mark.skipif(toy_task.load_tool_rollout() is None, reason="grpo.py has no tool_rollout yet")
def test_tools_table_with_grpos_own_rollout(tool_runs):
    # the real multi-turn sampler on a tiny random model: the interface holds and every sample is scored
    result = toy_task.tool_report(str(tool_runs), best_of=(1, 2), samples_per_prompt=2, num_prompts=2)
    table = {r["method"]: r for r in result["rows"]}
    assert list(table) == ["SFT-tools", "best-of-2 (oracle)", "GRPO-tools"]
    assert table["SFT-tools"]["num_values"] == 4 and all(math.isfinite(r["gold_tool_reward_mean"])
                                                         for r in table.values())
