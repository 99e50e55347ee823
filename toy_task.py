"""The built-in toy task: a tiny review language with a known gold reward.

    python toy_task.py generate        # (re)write data/toy/ deterministically from the seed
    python toy_task.py report          # compare runs/sft, best-of-N, runs/ppo, runs/dpo, runs/grpo* on held-out prompts

No weights or datasets can be downloaded on the first machine of a user (or in CI), and RLHF should be seen working in
minutes on a laptop. So, in the spirit of the positive-sentiment continuation task of Ziegler et al. 2019 ("this
movie was ..." continued by the policy and scored for sentiment), the project ships a closed-vocabulary review
language:

    prompt      "honestly the camera was"
    completion  " not very good but the battery is excellent ."

and a deterministic **gold reward** r*(prompt, completion) that plays the role of the human. Everything an RLHF run
produces can be measured against it; the learned reward model is only a proxy of it.

Gold reward (`gold_reward`), on the words of the completion:
    sentiment   S = sum over polarity words w of  polarity(w) * intensifier * (-0.5 if negated)
                (intensifier: the word right before it, e.g. "very" x1.5; negated: "not"/"never" within the 3 words
                before it in the same clause), squashed as 3 * tanh(S / 3): two strong positives are nearly as good
                as five.
    relevance   +0.5 per aspect that fits the subject ("the battery" of a phone), -0.5 per one that does not
                (a movie's battery), clipped to [-1, 1]
    repetition  -1 for every repeated content word (polarity or aspect word)
    ending      -2 if the completion does not end with "." or "!" (cut off, never finished)
    length      -0.25 per word beyond 14
    empty       -3 for an empty completion
The squashing, the repetition, relevance and length terms are structure that the SFT data rarely shows off (it never
repeats or rambles), so a learned reward model that only picked up "positive words are good" can be exploited:
"amazing amazing amazing ..." scores high under a naive proxy and low under the gold reward. That is the
over-optimisation that the KL penalty of PPO / DPO is there to hold back (Gao et al. 2022).

Preferences are labelled like humans would, with Bradley-Terry noise: P(a preferred over b) = sigmoid(r*(a) - r*(b)).
The gold reward itself only reaches a certain accuracy on such labels (the *ceiling*, reported in data/toy/stats.json).

The tools toy (data/toy/tools/): a tool call worth something the policy cannot know without it. Every prompt row holds
a hidden rating, "good" or "bad" (each prompt appears with both, so nothing in a prompt tells it); the tool
`lookup(product, rating)` returns it; the gold tool reward (`gold_tool_reward`) is the gold reward of the review with
the sentiment term's sign flipped for "bad" (the review must agree with the rating), the call and its result left out:

    prompt      "the phone was"                                     (rating "bad", hidden)
    completion  " <call> lookup phone </call> <result> bad </result> really slow ."

The policy writes the call, generation stops at </call>, grpo.py's rollout runs the tool and inserts the result (not
the policy's tokens: out of the loss), the policy finishes. Half of the SFT demonstrations call and follow the result,
half write a review of random sentiment without a call; RL should learn to always call:

    python sft.py --model_name_or_path data/toy/tools/base_model --output_dir runs/sft_tools
    python grpo.py --model_name_or_path runs/sft_tools --output_dir runs/grpo_tools
    python grpo.py --model_name_or_path runs/sft_tools --tools none --output_dir runs/grpo_no_tools
    python toy_task.py report              # adds the table "Tool use (the tools toy)"
"""

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
import types

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config,
                          PreTrainedTokenizerFast)

import grpo
import harness

SEED = 1234
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "toy")
BASE_MODEL_DIR = os.path.join(DATA_DIR, "base_model")
TOOLS_DIR = os.path.join(DATA_DIR, "tools")

# ---------------------------------------------------------------------------------------------------------------------
# The language
# ---------------------------------------------------------------------------------------------------------------------
CATEGORIES = {
    "media": (["movie", "film", "book", "album", "show", "concert", "game", "podcast"],
              ["plot", "ending", "story", "acting", "music", "characters"]),
    "device": (["phone", "laptop", "camera", "headphones", "tablet", "watch", "keyboard", "speaker"],
               ["battery", "screen", "sound", "design", "keys", "charger"]),
    "place": (["hotel", "restaurant", "cafe", "pizza", "coffee", "burger", "salad", "bakery"],
              ["staff", "taste", "location", "menu", "portions", "room"]),
}
SUBJECT_CATEGORY = {n: c for c, (nouns, _) in CATEGORIES.items() for n in nouns}
ASPECT_CATEGORIES = {a: c for c, (_, aspects) in CATEGORIES.items() for a in aspects}
PROMPT_TEMPLATES = ["the {} was", "this {} is", "honestly the {} was", "i think the {} is", "my new {} is",
                    "overall the {} was"]
POLARITY = {
    # positive
    "good": 1.0, "great": 1.5, "excellent": 2.0, "amazing": 2.0, "wonderful": 2.0, "nice": 1.0, "fine": 0.5,
    "decent": 0.5, "solid": 1.0, "fantastic": 2.0, "perfect": 2.0, "lovely": 1.5, "fun": 1.0, "enjoyable": 1.0,
    "impressive": 1.5, "pleasant": 1.0, "brilliant": 2.0, "superb": 2.0, "charming": 1.0,
    # negative
    "bad": -1.0, "terrible": -2.0, "awful": -2.0, "poor": -1.0, "boring": -1.0, "disappointing": -1.5,
    "horrible": -2.0, "mediocre": -0.5, "dull": -1.0, "annoying": -1.5, "broken": -2.0, "cheap": -0.5, "slow": -1.0,
    "noisy": -1.0, "bland": -1.0, "weak": -1.0, "ugly": -1.5, "useless": -2.0, "overpriced": -1.0,
    # opinion verbs
    "loved": 2.0, "liked": 1.0, "enjoyed": 1.0, "like": 1.0, "enjoy": 1.0, "hated": -2.0, "disliked": -1.0,
    "regret": -1.5,
}
NEUTRAL = ["okay", "average", "ordinary", "different", "small", "big", "expensive", "simple", "new", "long"]
ADJECTIVES = [w for w in POLARITY if w not in {"loved", "liked", "enjoyed", "like", "enjoy", "hated", "disliked",
                                               "regret"}]
INTENSIFIERS = {"very": 1.5, "really": 1.5, "extremely": 2.0, "incredibly": 2.0, "quite": 1.2, "pretty": 1.2,
                "somewhat": 0.5, "slightly": 0.5, "fairly": 0.8}
NEGATIONS = {"not", "never"}
CONNECTIVES = ["and", "but", "so", "because", "although"]
OPINIONS = ["loved", "liked", "enjoyed", "hated", "disliked", "regret", "did not like", "did not enjoy",
            "really loved", "really hated", "never liked"]
CLAUSE_BREAKS = set(CONNECTIVES) | {".", "!", ","}
ENDINGS = {".", "!"}
CONTENT_WORDS = set(POLARITY) | set(ASPECT_CATEGORIES)

PROMPTS = [t.format(n) for t in PROMPT_TEMPLATES for n in SUBJECT_CATEGORY]  # 6 * 24 = 144 distinct prompts
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def vocabulary() -> list[str]:
    """Every word the toy language can produce (sorted, so the token ids are deterministic)."""
    words = set()
    for text in PROMPTS + ADJECTIVES + NEUTRAL + list(INTENSIFIERS) + list(NEGATIONS) + CONNECTIVES + OPINIONS:
        words.update(text.split())
    words.update(ASPECT_CATEGORIES)
    words.update(["the", "i", "it", "is", "was", "did", ".", "!", ","])
    return SPECIAL_TOKENS + sorted(words)


# ---------------------------------------------------------------------------------------------------------------------
# The gold reward
# ---------------------------------------------------------------------------------------------------------------------
def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z']+|[.!?,]", text.lower())


def prompt_subject(prompt: str) -> str | None:
    for w in words_of(prompt):
        if w in SUBJECT_CATEGORY:
            return w
    return None


def sentiment_of(words: list[str]) -> float:
    """S, the sentiment of a completion's words before squashing (intensified and negated clause by clause)."""
    sentiment, clause_start = 0.0, 0
    for i, w in enumerate(words):
        if w in CLAUSE_BREAKS:
            clause_start = i + 1
        elif w in POLARITY:
            value = POLARITY[w]
            if i - 1 >= clause_start and words[i - 1] in INTENSIFIERS:
                value *= INTENSIFIERS[words[i - 1]]
            if any(words[k] in NEGATIONS for k in range(max(clause_start, i - 3), i)):
                value *= -0.5
            sentiment += value
    return sentiment


def sentiment_term(words: list[str]) -> float:
    """The gold reward's sentiment term, 3 tanh(S / 3)."""
    return 3.0 * math.tanh(sentiment_of(words) / 3.0)


def score_words(prompt: str, words: list[str], sentiment_sign: float = 1.0) -> float:
    """The gold reward of a completion's words, its sentiment term times sentiment_sign (-1: the tools toy's review
    of a product rated bad); the other terms as in the module docstring."""
    if not words:
        return -3.0
    # x * 1.0 == x exactly: gold_reward's values are those from before the sign existed
    reward = sentiment_sign * sentiment_term(words)

    subject = prompt_subject(prompt)
    relevance = 0.0
    for w in words:
        if w in ASPECT_CATEGORIES and subject is not None:
            relevance += 0.5 if ASPECT_CATEGORIES[w] == SUBJECT_CATEGORY[subject] else -0.5
    reward += max(-1.0, min(1.0, relevance))

    content = [w for w in words if w in CONTENT_WORDS]
    reward -= 1.0 * (len(content) - len(set(content)))
    if words[-1] not in ENDINGS:
        reward -= 2.0
    reward -= 0.25 * max(0, len(words) - 14)
    return round(reward, 6)


def gold_reward_one(prompt: str, completion: str) -> float:
    """r*(prompt, completion); see the module docstring for the definition of each term."""
    return score_words(prompt, words_of(completion))


def gold_reward(prompts: list, completions: list) -> list[float]:
    """The toy task's gold reward for a batch; usable as `--reward_fn toy_task:gold_reward` / `--eval_reward_fn`.

    Takes strings or, as TRL passes them for conversational data, message lists (the prompt's last message and the
    completion's assistant message are scored)."""
    if len(prompts) != len(completions):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(completions)} completions")
    text = lambda x: x if isinstance(x, str) else x[-1]["content"]  # noqa: E731
    return [gold_reward_one(text(p), text(c)) for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------------------------------------------------------------
# The tools toy: the tool, its gold reward
# ---------------------------------------------------------------------------------------------------------------------
RATINGS = ("good", "bad")
TOOL_TOKENS = ["<call>", "</call>", "<result>", "</result>", "lookup"]  # single tokens of the tools toy's tokenizer
CALL_SEGMENT = re.compile(r"<call>.*?</call>", re.S)
RESULT_SEGMENT = re.compile(r"<result>.*?</result>", re.S)


def lookup(product: str, rating: str) -> str:
    """Looks up how a product was rated: the one tool of the tools toy.

    Args:
        product: The product asked about, a subject of the toy language (e.g. "phone"); the policy writes it.
        rating: The prompt row's hidden rating, "good" or "bad"; the rollout fills it in from the row, the policy
            never sees it.

    Returns:
        The rating, "good" or "bad".

    Raises:
        ValueError: product is not a subject of the toy language (the rollout shows the policy "error: ...").
    """
    if rating not in RATINGS:
        raise ValueError(f"rating {rating!r} is not one of {RATINGS}")
    if product.strip() not in SUBJECT_CATEGORY:
        raise ValueError(f"unknown product {product.strip()!r}")
    return rating


def strip_tool_segments(text: str) -> str:
    """The review alone: the calls and the inserted results cut out (a space each, so no two words are glued)."""
    return RESULT_SEGMENT.sub(" ", CALL_SEGMENT.sub(" ", text))


def gold_tool_reward_one(prompt: str, completion: str, rating: str) -> float:
    """The gold tool reward: the gold reward of the review without its calls and results, the sentiment term's sign
    flipped when the hidden rating is "bad" (the review must agree with what the tool returns)."""
    if rating not in RATINGS:
        raise ValueError(f"gold_tool_reward: rating {rating!r} is not one of {RATINGS}")
    return score_words(prompt, words_of(strip_tool_segments(completion)), 1.0 if rating == "good" else -1.0)


def message_text(x) -> str:
    """A string, or the content of the last message of a conversation (as TRL passes conversational data)."""
    return x if isinstance(x, str) else x[-1]["content"]


def gold_tool_reward(prompts: list, completions: list, rating: list, **kwargs) -> list[float]:
    """The tools toy's gold reward for a batch (TRL's signature; `rating` is the prompt rows' column, the other
    columns are ignored); usable as `--reward_fn toy_task:gold_tool_reward`."""
    if not len(prompts) == len(completions) == len(rating):
        raise ValueError(f"gold_tool_reward: {len(prompts)} prompts, {len(completions)} completions and "
                         f"{len(rating)} ratings")
    return [gold_tool_reward_one(message_text(p), message_text(c), r) for p, c, r in zip(prompts, completions, rating)]


def tool_calls(completions: list) -> list[int]:
    """The number of complete calls (<call> ... </call>) in each completion (for the tool-call rate)."""
    return [len(CALL_SEGMENT.findall(message_text(c))) for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# The generator of data (the "human demonstrations" and "human labels")
# ---------------------------------------------------------------------------------------------------------------------
def split_prompts(rng: random.Random) -> tuple[list[str], list[str]]:
    """A quarter of the prompts are held out: never used in any training file."""
    prompts = list(PROMPTS)
    rng.shuffle(prompts)
    n_eval = len(prompts) // 4
    return sorted(prompts[n_eval:]), sorted(prompts[:n_eval])


def sample_adjective_phrase(rng: random.Random) -> str:
    adj = rng.choice(ADJECTIVES) if rng.random() < 0.85 else rng.choice(NEUTRAL)
    parts = []
    if rng.random() < 0.15:
        parts.append("not")
    if rng.random() < 0.4:
        parts.append(rng.choice(list(INTENSIFIERS)))
    return " ".join(parts + [adj])


def sample_completion(rng: random.Random, prompt: str) -> str:
    """A human-like continuation: mixed sentiment, many distinct forms (PPO can only re-weight what SFT samples)."""
    subject = prompt_subject(prompt)
    text = [sample_adjective_phrase(rng)]
    u = rng.random()
    if u < 0.45:
        category = SUBJECT_CATEGORY[subject] if rng.random() < 0.8 else rng.choice(list(CATEGORIES))
        aspect = rng.choice(CATEGORIES[category][1])
        text += [rng.choice(CONNECTIVES), "the", aspect, rng.choice(["is", "was"]), sample_adjective_phrase(rng)]
    elif u < 0.65:
        text += [rng.choice(CONNECTIVES), "i", rng.choice(OPINIONS), "it"]
    text.append("!" if rng.random() < 0.2 else ".")
    return " " + " ".join(text)  # leading space: trainers join prompt + completion as plain strings


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sample_preference(rng: random.Random, prompt: str) -> tuple[dict, float]:
    """One labelled pair, P(a > b) = sigmoid(r*(a) - r*(b)); returns the row and the gold reward's P(correct)."""
    a = sample_completion(rng, prompt)
    b = sample_completion(rng, prompt)
    while b == a:
        b = sample_completion(rng, prompt)
    ra, rb = gold_reward_one(prompt, a), gold_reward_one(prompt, b)
    p_a = sigmoid(ra - rb)
    chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
    # the gold reward agrees with the label with probability sigmoid(|ra - rb|); 1/2 on a tie
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, sigmoid(abs(ra - rb))


def sample_ranking(rng: random.Random, prompt: str, k: int) -> dict:
    """K completions ordered best..worst by Plackett-Luce sampling with the gold reward (Bradley-Terry for K = 2)."""
    pool = set()
    while len(pool) < k:
        pool.add(sample_completion(rng, prompt))
    pool = sorted(pool)
    ranked = []
    while pool:
        weights = [math.exp(gold_reward_one(prompt, c)) for c in pool]
        pick = rng.choices(range(len(pool)), weights=weights)[0]
        ranked.append(pool.pop(pick))
    return {"prompt": prompt, "completions": ranked}


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate_data(out_dir: str = DATA_DIR, seed: int = SEED) -> dict:
    """Writes every toy file into out_dir; deterministic given the seed. Returns the statistics (stats.json)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    train_prompts, eval_prompts = split_prompts(rng)
    files = {
        "sft_train": [{"prompt": p, "completion": sample_completion(rng, p)}
                      for p in (rng.choice(train_prompts) for _ in range(20000))],
        "sft_eval": [{"prompt": p, "completion": sample_completion(rng, p)}
                     for p in (rng.choice(eval_prompts) for _ in range(1000))],
        "prompts_train": [{"prompt": p} for p in train_prompts],
        "prompts_eval": [{"prompt": p} for p in eval_prompts],
    }
    stats = {"seed": seed, "num_prompts_train": len(train_prompts), "num_prompts_eval": len(eval_prompts)}
    for split, n, pool in [("train", 10000, train_prompts), ("eval", 1000, eval_prompts)]:
        rows, p_correct = [], []
        for _ in range(n):
            row, p = sample_preference(rng, rng.choice(pool))
            rows.append(row)
            p_correct.append(p)
        files[f"preferences_{split}"] = rows
        labels_agree = [gold_reward_one(r["prompt"], r["chosen"]) > gold_reward_one(r["prompt"], r["rejected"])
                        for r in rows]
        # ceiling: the accuracy that the gold reward itself is expected to reach on these noisy labels
        stats[f"preferences_{split}_ceiling_accuracy"] = round(sum(p_correct) / n, 4)
        stats[f"preferences_{split}_gold_accuracy"] = round(sum(labels_agree) / n, 4)
    files["rankings_train"] = [sample_ranking(rng, rng.choice(train_prompts), 4) for _ in range(3000)]
    files["rankings_eval"] = [sample_ranking(rng, rng.choice(eval_prompts), 4) for _ in range(300)]
    for name, rows in files.items():
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)
    sft_gold = [gold_reward_one(r["prompt"], r["completion"]) for r in files["sft_eval"]]
    mean = sum(sft_gold) / len(sft_gold)
    stats["sft_eval_gold_reward_mean"] = round(mean, 4)
    stats["sft_eval_gold_reward_std"] = round((sum((g - mean) ** 2 for g in sft_gold) / len(sft_gold)) ** 0.5, 4)
    stats["files_sha256"] = {f"{name}.jsonl": hashlib.sha256(open(os.path.join(out_dir, f"{name}.jsonl"), "rb").read())
                             .hexdigest() for name in sorted(files)}
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")
    write_base_model(os.path.join(out_dir, "base_model"))
    write_defaults(os.path.join(out_dir, "defaults.json"), DEFAULTS)
    generate_tool_data(os.path.join(out_dir, "tools"), seed)
    return stats


def agreeing_review(rng: random.Random, prompt: str, rating: str) -> str:
    """A review that clearly follows the rating (sentiment term > 0.5 for good, < -0.5 for bad): sample_completion
    resampled until it does, so the demonstrations keep the main toy's variety of forms."""
    sign = 1.0 if rating == "good" else -1.0
    while True:
        review = sample_completion(rng, prompt)
        if sign * sentiment_term(words_of(review)) > 0.5:
            return review


def call_text(product: str, result: str) -> str:
    """A call of the tool and its result as they stand in a completion (the result inserted by the rollout)."""
    return f" <call> lookup {product} </call> <result> {result} </result>"


def sample_tool_row(rng: random.Random, prompt: str) -> dict:
    """One SFT row of the tools toy: half look the rating up and follow it, half review blindly (random sentiment),
    so SFT learns the format and calls sometimes, and RL has the call rate to raise."""
    rating = rng.choice(RATINGS)
    if rng.random() < 0.5:
        completion = call_text(prompt_subject(prompt), lookup(prompt_subject(prompt), rating)) + \
            agreeing_review(rng, prompt, rating)
    else:
        completion = sample_completion(rng, prompt)
    return {"prompt": prompt, "completion": completion, "rating": rating}


def tool_prompt_rows(prompts: list[str]) -> list[dict]:
    """Every prompt with both ratings: nothing about a prompt tells its rating (memorising one is useless)."""
    return [{"prompt": p, "rating": r} for p in prompts for r in RATINGS]


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def generate_tool_data(out_dir: str = TOOLS_DIR, seed: int = SEED) -> dict:
    """Writes the tools toy's files into out_dir (data/toy/tools); deterministic given the seed. Returns the
    statistics (stats.json): counts, the SFT data's call rate and gold tool reward with and without a call."""
    os.makedirs(out_dir, exist_ok=True)
    train_prompts, eval_prompts = split_prompts(random.Random(seed))  # the main toy's split: its stream's first use
    rng = random.Random(f"{seed}/tools")  # a stream of its own, so that the main toy's files stay as they were
    files = {
        "sft_train": [sample_tool_row(rng, rng.choice(train_prompts)) for _ in range(6000)],
        "sft_eval": [sample_tool_row(rng, rng.choice(eval_prompts)) for _ in range(500)],
        "prompts_train": tool_prompt_rows(train_prompts),
        "prompts_eval": tool_prompt_rows(eval_prompts),
    }
    for name, rows in files.items():
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)
    stats = {"seed": seed, "num_prompts_train": len(train_prompts), "num_prompts_eval": len(eval_prompts),
             "num_rows": {f"{name}.jsonl": len(rows) for name, rows in sorted(files.items())}}
    for split in ("train", "eval"):
        rows = files[f"sft_{split}"]
        stats[f"sft_{split}_call_rate"] = round(mean([n > 0 for n in tool_calls([r["completion"] for r in rows])]), 4)
    rows = files["sft_eval"]
    gold = gold_tool_reward([r["prompt"] for r in rows], [r["completion"] for r in rows], [r["rating"] for r in rows])
    called = tool_calls([r["completion"] for r in rows])
    stats["sft_eval_gold_tool_reward_mean_with_call"] = round(mean([g for g, n in zip(gold, called) if n]), 4)
    stats["sft_eval_gold_tool_reward_mean_without_call"] = round(mean([g for g, n in zip(gold, called) if not n]), 4)
    stats["files_sha256"] = {f"{name}.jsonl": file_sha256(os.path.join(out_dir, f"{name}.jsonl"))
                             for name in sorted(files)}
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")
    write_tool_base_model(os.path.join(out_dir, "base_model"))
    write_defaults(os.path.join(out_dir, "defaults.json"), TOOLS_DEFAULTS)
    return stats


def build_tokenizer():
    """Word-level tokenizer of the toy vocabulary as a standard PreTrainedTokenizerFast (pad != eos != bos)."""

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False, model_max_length=64)


def build_tool_tokenizer():
    """The toy tokenizer plus the tools toy's call and result tokens as added tokens (appended: every other id stays;
    not special, so that decoding with skip_special_tokens keeps them for gold_tool_reward)."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(TOOL_TOKENS)
    return tokenizer


def build_config(tokenizer, marker=True):
    """A small GPT-2 (about 1.3 M parameters) sized for 2 CPU cores; its weights are trained from scratch by sft.py.
    marker: its config.json's "toy_task", true for the review toy, "tools" for the tools toy (see defaults)."""

    return GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=160, n_layer=4, n_head=5,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      toy_task=marker)  # the marker harness.setup reads: models trained from it carry it


def write_base_model(out_dir: str) -> None:
    """Tokenizer + config only, no weights: `sft.py --from_scratch` (its default) initialises the weights."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out_dir)
    build_config(tokenizer).save_pretrained(out_dir)


def write_tool_base_model(out_dir: str) -> None:
    """The tools toy's tokenizer + config ("toy_task": "tools"), no weights, as write_base_model."""
    tokenizer = build_tool_tokenizer()
    tokenizer.save_pretrained(out_dir)
    build_config(tokenizer, "tools").save_pretrained(out_dir)


# What each script takes on the toy model for the options left unset (harness.setup fills them and prints them): the
# toy's files, its gold reward and reward model, and hyperparameters sized for a tiny model trained from scratch.
# Other models get the script's PRETRAINED values instead. `generate` writes them to data/toy/defaults.json (and the
# tools toy's to data/toy/tools/defaults.json), which the harness reads by the marker in the model's config.json; a
# value {option: {its value: default}} depends on another option.
GOLD = ("toy_task:gold_reward",)
TOY_PROMPTS = dict(prompts="data/toy/prompts_train.jsonl", eval_prompts="data/toy/prompts_eval.jsonl",
                   eval_reward_fn=GOLD, reward_model_path="runs/reward_model", max_new_tokens=16, max_prompt_length=48)
RM_DATA = (("pairwise", "preferences"), ("ranking", "rankings"))  # reward_model.py --loss: its data
DEFAULTS = {
    "sft": dict(dataset="data/toy/sft_train.jsonl", eval_dataset="data/toy/sft_eval.jsonl", eval_reward_fn=GOLD,
                from_scratch=True, learning_rate=2e-3, max_length=64, per_device_batch_size=64, max_new_tokens=24),
    "reward_model": dict(dataset={"loss": {loss: f"data/toy/{name}_train.jsonl" for loss, name in RM_DATA}},
                         eval_dataset={"loss": {loss: f"data/toy/{name}_eval.jsonl" for loss, name in RM_DATA}},
                         eval_reward_fn=GOLD, learning_rate=1e-3, max_length=64, per_device_batch_size=64,
                         normalize_samples=512, max_new_tokens=24),
    "ppo": dict(TOY_PROMPTS, learning_rate=1e-4, critic_learning_rate=2e-4),
    "dpo": dict(dataset="data/toy/preferences_train.jsonl", eval_dataset="data/toy/preferences_eval.jsonl",
                eval_prompts="data/toy/prompts_eval.jsonl", eval_reward_fn=GOLD, reward_model_path="runs/reward_model",
                learning_rate=3e-4, max_length=64, per_device_batch_size=64, max_new_tokens=24),
    "grpo": dict(TOY_PROMPTS, learning_rate=1e-4, missing_eos_penalty=1.0),
}


# The tools toy's ("toy_task": "tools"): its own files, the gold tool reward (no reward model), the tool; SFT's
# evaluation passes no row columns, so no reward there (the rating is a column).
TOOLS = "data/toy/tools"
GOLD_TOOL = ("toy_task:gold_tool_reward",)
TOOLS_DEFAULTS = {
    # 16 epochs: after 2 the model writes the call but barely reads its result (its reviews' mean sentiment after
    # "good" and after "bad" differs by 0.24; by 2.65 after 16), and GRPO then has no policy that follows the tool
    "sft": dict(dataset=f"{TOOLS}/sft_train.jsonl", eval_dataset=f"{TOOLS}/sft_eval.jsonl", eval_reward_fn=("none",),
                from_scratch=True, learning_rate=2e-3, max_length=64, per_device_batch_size=64, max_new_tokens=24,
                num_epochs=16.0),
    "grpo": dict(prompts=f"{TOOLS}/prompts_train.jsonl", eval_prompts=f"{TOOLS}/prompts_eval.jsonl",
                 reward_fn=GOLD_TOOL, eval_reward_fn=GOLD_TOOL, tools=("toy_task:lookup",), reward_model_path="none",
                 learning_rate=1e-4, max_new_tokens=24, max_prompt_length=40,  # 40 + 24: the model's 64 positions
                 missing_eos_penalty=1.0),
}


def write_defaults(path: str, defaults: dict) -> None:
    with open(path, "w") as f:
        json.dump(defaults, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------------
# The report: every stage of the pipeline on the same held-out prompts
# ---------------------------------------------------------------------------------------------------------------------
def best_of_n_weights(num: int, pool: int):
    """Probability that the i-th smallest of `pool` items is the maximum of a uniformly random subset of size num:
    C(i, num - 1) / C(pool, num). Averaging gold rewards with these weights gives the exact expected gold reward of
    best-of-num sampling from the pool (an unbiased estimate for best-of-num from the policy)."""
    return [math.comb(i, num - 1) / math.comb(pool, num) for i in range(pool)]


def best_of_n(proxy: list[float], values: list[float], num: int) -> float:
    """Expected `values` of the sample with the highest proxy among num drawn without replacement from the pool."""
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])
    return sum(w * values[i] for w, i in zip(best_of_n_weights(num, len(proxy)), order))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def report(runs_dir: str = "runs", best_of: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
           samples_per_prompt: int = 8, num_prompts: int = 0, seed: int = 0, out_dir: str | None = None) -> dict:
    """Evaluates SFT, best-of-N from SFT ranked by the reward model, PPO, DPO, GRPO and every other grpo.py run in
    runs_dir (a directory whose eval.json says "script": "grpo.py", e.g. runs/rloo) on the held-out prompts, prints a
    table and writes runs/report.md (+ runs/report.png when matplotlib is installed). Every trained method is placed
    against the best-of-N curve at its own KL (best-of-N's gold reward interpolated linearly in KL between the
    best-of-N points). Missing stages are reported as missing; the SFT checkpoint is required (everything is
    measured relative to it). With runs/sft_tools and runs/grpo_tools, also the tools toy's table (tool_report); its
    runs stay out of the main table (another task, other prompts)."""

    out_dir = out_dir or runs_dir
    paths = {name: os.path.join(runs_dir, name) for name in ("sft", "reward_model", "ppo", "dpo", "grpo")}
    missing = {name: f"{path} not found: run `python {name}.py`" for name, path in paths.items()
               if not os.path.isdir(path)}
    if "sft" in missing:
        print(f"report: {missing['sft']} first (every stage is compared with SFT)")
        return {"missing": missing}
    for name, msg in missing.items():
        print(f"report: {msg} (skipped)")
    torch.manual_seed(seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    device = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(paths["sft"])
    load = lambda cls, path: harness.from_pretrained(cls, path, "report").eval()  # noqa: E731 (adapter outputs too)
    sft = load(AutoModelForCausalLM, paths["sft"])
    reward_model = None
    if "reward_model" not in missing:
        reward_model = load(AutoModelForSequenceClassification, paths["reward_model"])
    prompts = [r["prompt"] for r in (json.loads(l) for l in open(os.path.join(DATA_DIR, "prompts_eval.jsonl")))]
    prompts = prompts[:num_prompts] if num_prompts else prompts
    kw = dict(ref=sft, reward_model=reward_model, reward_fns={"gold": (gold_reward, 1.0)}, max_new_tokens=16,
              seed=seed)
    rows, samples, stats = [], {}, {}

    # SFT and best-of-N: one pool of max(N) samples per prompt; best-of-N is computed exactly from the pool
    pool_size = max(max(best_of), samples_per_prompt)
    t0 = time.time()
    pool = harness.evaluate_policy(sft, tokenizer, prompts, device, samples_per_prompt=pool_size, **kw)
    pool["gold_reward_std"], pool["gold_reward_sem"] = pool["gold_std"], pool["gold_sem"]
    per = pool["per_sample"]
    samples["SFT"] = list(zip(per["prompt"], per["completion"], per["gold"]))[::pool_size][:3]
    for n in best_of if reward_model is not None else (1,):
        golds, proxies, eos = [], [], []
        for j in range(len(prompts)):
            sl = slice(j * pool_size, (j + 1) * pool_size)
            golds.append(best_of_n(per["proxy"][sl], per["gold"][sl], n) if reward_model is not None
                         else float(np.mean(per["gold"][sl])))
            proxies.append(best_of_n(per["proxy"][sl], per["proxy"][sl], n) if reward_model is not None
                           else float("nan"))
            eos.append(best_of_n(per["proxy"][sl], per["eos"][sl], n) if reward_model is not None
                       else float(np.mean(per["eos"][sl])))
        name = "SFT" if n == 1 else f"best-of-{n}"
        # KL(best-of-N || SFT) = log N - (N - 1) / N (Stiennon et al. 2020), exact for distinct samples
        rows.append({"method": name, "gold_reward_mean": float(np.mean(golds)),
                     "gold_reward_sem": (float(np.std(golds) / math.sqrt(len(golds))) if n > 1
                                         else pool["gold_reward_sem"]),
                     "proxy_reward_mean": float(np.mean(proxies)), "kl_to_sft": math.log(n) - (n - 1) / n,
                     "eos_rate": float(np.mean(eos)), "num_samples": len(per["gold"])})
    stats["sft_gold_reward_std"] = pool["gold_reward_std"]
    print(f"report: SFT pool of {pool_size} samples x {len(prompts)} held-out prompts ({time.time() - t0:.0f}s)",
          flush=True)

    # trained policies: PPO, DPO, GRPO, then every other grpo.py output (any estimator, any setting) by name
    methods = [(name.upper(), name) for name in ("ppo", "dpo", "grpo") if name not in missing]
    for name in sorted(os.listdir(runs_dir)):
        marker = os.path.join(runs_dir, name, "eval.json")
        if name not in paths and os.path.exists(marker) and read_json(marker).get("script") == "grpo.py" and \
                toy_marker(os.path.join(runs_dir, name)) != "tools":  # the tools toy has its own table and prompts
            estimator = read_json(marker).get("advantage_estimator", "?")
            teacher = (read_json(marker).get("config") or {}).get("teacher_model_path")  # on-policy distillation
            methods.append((f"{name} (distilled from {teacher})" if teacher else name if name == estimator
                            else f"{name} ({estimator})", name))
            paths[name] = os.path.join(runs_dir, name)
    for method, name in methods:
        policy = load(AutoModelForCausalLM, paths[name])
        m = harness.evaluate_policy(policy, tokenizer, prompts, device, samples_per_prompt=samples_per_prompt, **kw)
        per = m["per_sample"]
        samples[method] = list(zip(per["prompt"], per["completion"], per["gold"]))[::samples_per_prompt][:3]
        rows.append({"method": method, "gold_reward_mean": m["gold_mean"],
                     "gold_reward_sem": m["gold_sem"], "proxy_reward_mean": m["proxy_reward_mean"],
                     "kl_to_sft": m["kl_to_ref"], "eos_rate": m["eos_rate"], "num_samples": m["num_samples"],
                     "distinct_completions": m["distinct_completions"], "run": name})
        print(f"report: evaluated {paths[name]}", flush=True)

    rm_eval = os.path.join(paths["reward_model"], "eval.json")
    if os.path.exists(rm_eval):
        e = read_json(rm_eval)
        stats["rm_accuracy"] = e.get("accuracy")
        stats["rm_ceiling_accuracy"] = read_json(
            os.path.join(DATA_DIR, "stats.json"))["preferences_eval_ceiling_accuracy"]
    sft_row = rows[0]
    for r in rows:
        r["gain_in_sft_std"] = (r["gold_reward_mean"] - sft_row["gold_reward_mean"]) / stats["sft_gold_reward_std"]
    # every trained method against the best-of-N curve at its own KL (Gao et al. 2022's frontier): best-of-N's gold
    # reward interpolated linearly in KL between the neighbouring best-of-N points (SFT is the point at KL 0)
    curve = sorted((r for r in rows if r["method"] == "SFT" or r["method"].startswith("best-of")),
                   key=lambda r: r["kl_to_sft"])
    last = curve[-1]
    for r in rows[len(curve):]:
        kl, gold = r["kl_to_sft"], r["gold_reward_mean"]
        r["best_of_n_gold_at_kl"] = None
        if len(curve) < 2:
            r["vs_best_of_n"] = "no best-of-N curve (no reward model)"
        elif kl <= last["kl_to_sft"]:
            k = next(i for i in range(1, len(curve)) if kl <= curve[i]["kl_to_sft"])
            lo, hi = curve[k - 1], curve[k]
            # the sampled KL estimate can come out slightly negative near 0: the curve starts at SFT's point
            w = max(0.0, (kl - lo["kl_to_sft"]) / (hi["kl_to_sft"] - lo["kl_to_sft"]))
            r["best_of_n_gold_at_kl"] = lo["gold_reward_mean"] + w * (hi["gold_reward_mean"] - lo["gold_reward_mean"])
            side = "above" if gold > r["best_of_n_gold_at_kl"] else "below"
            r["vs_best_of_n"] = f"{side} ({gold - r['best_of_n_gold_at_kl']:+.2f})"
        else:
            side = "more" if gold > last["gold_reward_mean"] else "less"
            r["vs_best_of_n"] = (f"beyond the curve's range (KL > {last['method']}'s {last['kl_to_sft']:.2f}; "
                                 f"{side} gold than it)")

    lines = ["| method | gold reward (mean +- s.e.) | gain (SFT std) | proxy reward | KL to SFT | EOS rate | samples "
             "| vs best-of-N at its KL |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['gold_reward_mean']:.3f} +- {r['gold_reward_sem']:.3f} | "
                     f"{r['gain_in_sft_std']:+.2f} | {r['proxy_reward_mean']:.3f} | {r['kl_to_sft']:.2f} | "
                     f"{r['eos_rate']:.3f} | {r['num_samples']} | {r.get('vs_best_of_n', '')} |")
    text = [f"# Toy RLHF report ({len(prompts)} held-out prompts)", "", *lines, ""]
    text.append(f"SFT gold reward std: {stats['sft_gold_reward_std']:.3f}. Best-of-N: N samples from SFT, the one the "
                "reward model ranks highest; its KL to SFT is the analytic log N - (N-1)/N. \"vs best-of-N\": the "
                "method's gold reward minus best-of-N's at the same KL (linear in KL between the best-of-N points); "
                "above the curve means more KL-efficient than best-of-N.")
    if "rm_accuracy" in stats:
        text.append(f"Reward model held-out accuracy: {stats['rm_accuracy']:.3f} (gold-label ceiling "
                    f"{stats['rm_ceiling_accuracy']:.3f}).")
    for msg in missing.values():
        text.append(f"Missing: {msg}.")
    tools = None
    if all(os.path.isdir(os.path.join(runs_dir, name)) for name in ("sft_tools", "grpo_tools")):
        tools = tool_report(runs_dir, samples_per_prompt=samples_per_prompt, num_prompts=num_prompts, seed=seed)
        text += ["", *tools["lines"]]
    text += ["", "## Samples (prompt | completion, gold reward)", ""]
    for name, ss in [*samples.items(), *(tools or {}).get("samples", {}).items()]:
        for p, c, g in ss:
            text.append(f"- {name}: `{p} |{c}` ({g:+.2f})")
    figure = plot_report(rows, paths, os.path.join(out_dir, "report.png"))
    text += ["", f"![reward vs KL]({os.path.basename(figure)})" if figure else
             "(no figure: matplotlib is not installed; `pip install matplotlib` to get runs/report.png)"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"\nwritten: {os.path.join(out_dir, 'report.md')}" + (f", {figure}" if figure else ""))
    return {"rows": rows, "stats": stats, "missing": missing, "figure": figure, "tools": tools}


def toy_marker(path: str):
    """The "toy_task" marker of a checkpoint's config.json (true: the review toy, "tools": the tools toy), else None."""
    config = os.path.join(path, "config.json")
    return read_json(config).get("toy_task") if os.path.isfile(config) else None


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# The report's sampling of the tools toy, the same for every method so that they compare: grpo.py's default of 2
# calls at most (the task needs one), the tools toy's response budget, plain sampling at temperature 1.
TOOL_SAMPLING = dict(max_new_tokens=24, max_tool_calls=2, temperature=1.0, top_k=0, top_p=1.0, tool_format="simple")
TOOL_RUNS = (("GRPO-tools", "grpo_tools", "python grpo.py --model_name_or_path runs/sft_tools --output_dir "
              "runs/grpo_tools"),
             ("GRPO-no-tools", "grpo_no_tools", "python grpo.py --model_name_or_path runs/sft_tools --tools none "
              "--output_dir runs/grpo_no_tools"))


def load_tool_rollout():
    """grpo.tool_rollout, the multi-turn sampler that runs the tool calls, or None while grpo.py has none. The seam
    of the tools table: the tests stub it."""

    return getattr(grpo, "tool_rollout", None)


def call_tool_rollout(rollout, policy, tokenizer, prompts: list, prompt_ids: list, columns: list[dict], tools: dict,
                      cfg, generator, device) -> list[str]:
    """The decoded responses of one rollout(policy, tokenizer, prompts, prompt_ids, columns, tools, cfg, generator,
    device, amp) -> (responses (B, R), response_mask, sampled_mask, calls): the tokens under response_mask (the
    inserted results among them), special tokens (EOS, padding) dropped. A rollout that also takes the tools' chat
    schemas gets none: the simple format does not render them."""

    extra = {"schemas": []} if "schemas" in inspect.signature(rollout).parameters else {}
    responses, response_mask, _, _ = rollout(policy=policy, tokenizer=tokenizer, prompts=prompts,
                                             prompt_ids=prompt_ids, columns=columns, tools=tools, cfg=cfg,
                                             generator=generator, device=device, amp=None, **extra)
    return [tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            for ids, mask in zip(responses.tolist(), response_mask.tolist())]


def sample_with_tools(rollout, policy, tokenizer, rows: list[dict], samples_per_row: int, seed: int,
                      batch_size: int = 64) -> dict:
    """samples_per_row responses to each tool prompt row (its samples contiguous), the tool executed with the row's
    hidden rating: {"prompt", "rating", "completion", "gold" (gold tool reward), "calls"}, one entry per sample."""

    device, cfg = torch.device("cpu"), types.SimpleNamespace(**TOOL_SAMPLING)
    generator = torch.Generator(device=device).manual_seed(seed)
    work = [j for j in range(len(rows)) for _ in range(samples_per_row)]
    prompts = [rows[j]["prompt"] for j in work]
    completions = []
    for start in range(0, len(work), batch_size):
        idx = work[start:start + batch_size]
        batch = [rows[j]["prompt"] for j in idx]
        with torch.no_grad():  # sampling only: no graph over the turns
            completions += call_tool_rollout(rollout, policy, tokenizer, batch,
                                             [harness.render_prompt(p, tokenizer) for p in batch],
                                             [{k: v for k, v in rows[j].items() if k != "prompt"} for j in idx],
                                             {"lookup": lookup}, cfg, generator, device)
    ratings = [rows[j]["rating"] for j in work]
    return {"prompt": prompts, "rating": ratings, "completion": completions,
            "gold": gold_tool_reward(prompts, completions, ratings), "calls": tool_calls(completions)}


def tool_row(method: str, gold: list[float], called: list[float], per_row: bool = False) -> dict:
    """A line of the tools table: mean and standard error of the gold tool reward (over samples, or over prompt
    rows for best-of-N, whose values are per-row expectations), the tool-call rate, the number of values."""

    return {"method": method, "gold_tool_reward_mean": float(np.mean(gold)),
            "gold_tool_reward_sem": float(np.std(gold) / math.sqrt(len(gold))),
            "tool_call_rate": float(np.mean(called)), "num_values": len(gold),
            "sem_over": "prompt rows" if per_row else "samples"}


def best_of_n_tool_rows(pool: dict, pool_size: int, best_of: tuple[int, ...]) -> list[dict]:
    """SFT-tools (N = 1) and best-of-N from its pool ranked by the gold tool reward itself (an oracle: the most that
    re-ranking SFT's samples can reach), each computed exactly from the pool by best_of_n's order statistics."""
    gold, called = pool["gold"], [float(n > 0) for n in pool["calls"]]
    rows = []
    for n in best_of:
        if n == 1:
            rows.append(tool_row("SFT-tools", gold, called))
            continue
        slices = [slice(j, j + pool_size) for j in range(0, len(gold), pool_size)]
        rows.append(tool_row(f"best-of-{n} (oracle)", [best_of_n(gold[s], gold[s], n) for s in slices],
                             [best_of_n(gold[s], called[s], n) for s in slices], per_row=True))
    return rows


def tool_table_lines(rows: list[dict], num_rows: int, missing: list[str]) -> list[str]:
    """The markdown of the tools table and its notes."""
    lines = ["## Tool use (the tools toy)", "",
             "| method | gold tool reward (mean +- s.e.) | tool-call rate | values |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['gold_tool_reward_mean']:.3f} +- {r['gold_tool_reward_sem']:.3f} | "
                     f"{r['tool_call_rate']:.3f} | {r['num_values']} |")
    lines += ["", f"{num_rows} held-out tool prompt rows (each held-out prompt with both hidden ratings), sampled with "
              f"the tool executed (grpo.tool_rollout: at most {TOOL_SAMPLING['max_tool_calls']} calls, "
              f"{TOOL_SAMPLING['max_new_tokens']} tokens, temperature {TOOL_SAMPLING['temperature']:g}). Gold tool "
              "reward: the gold reward of the review with its sentiment's sign flipped for a \"bad\" rating (the "
              "review must agree with what the tool returns). Tool-call rate: responses with a complete call. "
              "Best-of-N (oracle): N samples of SFT-tools, the one the gold tool reward itself ranks highest (values "
              "are per prompt row, exact from a pool)."]
    lines += [f"Missing: {m}." for m in missing]
    return lines


def tool_report(runs_dir: str = "runs", best_of: tuple[int, ...] = (1, 4, 16), samples_per_prompt: int = 8,
                num_prompts: int = 0, seed: int = 0, rollout=None) -> dict:
    """The tools table: SFT-tools (runs/sft_tools), best-of-N from it ranked by the gold tool reward, runs/grpo_tools
    and runs/grpo_no_tools when present, on the held-out tool prompt rows, sampled with the tool executed by
    rollout (default grpo.tool_rollout). Returns {"rows", "lines" (markdown), "samples", "missing"}; without a
    rollout (grpo.py has none yet) only lines saying so."""

    rollout = rollout or load_tool_rollout()
    if rollout is None:
        msg = "skipped: grpo.py has no tool_rollout yet (the multi-turn sampler that runs the tool)"
        print(f"report: tools table {msg}")
        return {"rows": [], "lines": ["## Tool use (the tools toy)", "", f"Tools table {msg}."], "samples": {},
                "missing": []}
    rows_in = read_jsonl(os.path.join(TOOLS_DIR, "prompts_eval.jsonl"))
    rows_in = rows_in[:num_prompts] if num_prompts else rows_in
    load = lambda path: harness.from_pretrained(AutoModelForCausalLM, path, "report").eval()  # noqa: E731
    sft_path = os.path.join(runs_dir, "sft_tools")
    tokenizer = AutoTokenizer.from_pretrained(sft_path)
    pool_size = max(max(best_of), samples_per_prompt)
    t0 = time.time()
    pool = sample_with_tools(rollout, load(sft_path), tokenizer, rows_in, pool_size, seed)
    print(f"report: SFT-tools pool of {pool_size} samples x {len(rows_in)} tool prompt rows ({time.time() - t0:.0f}s)",
          flush=True)
    rows, samples, missing = best_of_n_tool_rows(pool, pool_size, best_of), {}, []
    samples["SFT-tools"] = [(p, " " + c, g) for p, c, g in zip(pool["prompt"], pool["completion"], pool["gold"])][
        ::pool_size][:3]
    for method, name, command in TOOL_RUNS:
        path = os.path.join(runs_dir, name)
        if not os.path.isdir(path):
            missing.append(f"{path} not found: run `{command}`")
            continue
        m = sample_with_tools(rollout, load(path), tokenizer, rows_in, samples_per_prompt, seed)
        rows.append(dict(tool_row(method, m["gold"], [float(n > 0) for n in m["calls"]]), run=name))
        samples[method] = [(p, " " + c, g) for p, c, g in zip(m["prompt"], m["completion"], m["gold"])][
            ::samples_per_prompt][:3]
        print(f"report: evaluated {path} with the tool", flush=True)
    return {"rows": rows, "lines": tool_table_lines(rows, len(rows_in), missing), "samples": samples,
            "missing": missing}


def plot_report(rows: list[dict], paths: dict, out_path: str) -> str | None:
    """Gold reward vs KL to SFT for every method (the reward/KL frontier of Gao et al. 2022; the PPO and GRPO
    trajectories during training dotted), and PPO's and GRPO's proxy vs gold reward over training
    (over-optimisation shows as the curves parting). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bon = [r for r in rows if r["method"] == "SFT" or r["method"].startswith("best-of")]
    ax1.errorbar([r["kl_to_sft"] for r in bon], [r["gold_reward_mean"] for r in bon],
                 yerr=[r["gold_reward_sem"] for r in bon], marker="o", label="SFT / best-of-N (RM-ranked)")
    for r in rows:
        if r not in bon:
            ax1.errorbar([r["kl_to_sft"]], [r["gold_reward_mean"]], yerr=[r["gold_reward_sem"]],
                         marker="s" if r["method"] in ("PPO", "DPO") else "^", linestyle="", label=r["method"])
    for name, style in (("ppo", "o"), ("grpo", "^")):
        metrics = os.path.join(paths.get(name, ""), "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        evals = [m for m in (json.loads(l) for l in open(metrics)) if "eval/gold_reward_mean" in m]
        ax1.plot([m["eval/kl_to_ref"] for m in evals], [m["eval/gold_reward_mean"] for m in evals], ":",
                 color="gray", label=f"{name.upper()} during training")
        ax2.plot([m["step"] for m in evals], [m["eval/gold_reward_mean"] for m in evals], marker=style,
                 label=f"{name.upper()} gold")
        ax2.plot([m["step"] for m in evals], [m["eval/proxy_reward_mean"] for m in evals], marker=style,
                 linestyle="--", label=f"{name.upper()} proxy (reward model)")
    ax1.set_xlabel("KL to SFT (nats per response)")
    ax1.set_ylabel("gold reward (held-out prompts)")
    ax1.set_title("reward / KL frontier")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("reward (held-out prompts)")
    ax2.set_title("proxy vs gold reward during training")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write data/toy/ from the seed")
    g.add_argument("--out_dir", default=DATA_DIR)
    g.add_argument("--seed", type=int, default=SEED)
    r = sub.add_parser("report", help="compare the pipeline's stages on held-out prompts")
    r.add_argument("--runs_dir", default="runs")
    r.add_argument("--best_of_n", default="1,2,4,8,16,32,64,128",
                   help="comma-separated N for best-of-N sampling from SFT")
    r.add_argument("--num_prompts", type=int, default=0, help="held-out prompts to use (0 = all)")
    r.add_argument("--samples_per_prompt", type=int, default=8, help="samples per prompt for PPO and DPO")
    args = parser.parse_args()
    if args.command == "generate":
        print(json.dumps(generate_data(args.out_dir, args.seed), indent=2))
        print("tools toy:", json.dumps(read_json(os.path.join(args.out_dir, "tools", "stats.json")), indent=2))
    else:
        result = report(args.runs_dir, tuple(int(n) for n in args.best_of_n.split(",")), args.samples_per_prompt,
                        args.num_prompts)
        sys.exit(1 if "sft" in result["missing"] else 0)
