"""common.py against naive computations: plain loops, full forwards without cache, manual softmax, numpy."""

import json
import math
import os
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import harness
import toy_task

GOLD = {"gold_reward": (toy_task.gold_reward, 1.0)}
TOK = toy_task.build_tokenizer()
PROMPTS = ["the phone was", "honestly the movie was", "i think the pizza is", "my new laptop is",
           "overall the concert was not"]


def tiny_lm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(arch, len(TOK), TOK)
    # large untied random weights: spread-out logits keep greedy argmaxes far from ties and the greedy path varied
    # (a tied tiny GPT-2 just repeats its input token)
    config.initializer_range, config.tie_word_embeddings = 0.5, False
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_reward_model(arch: str):
    torch.manual_seed(0)
    config = tiny_config(arch, len(TOK), TOK)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config).eval()


def prompt_ids(prompts=PROMPTS):
    return [TOK(p)["input_ids"] for p in prompts]


@torch.no_grad()
def naive_greedy(model, ids: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """One sequence, no padding, no KV cache: a full forward over the whole sequence for every new token."""
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos_token_id:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_greedy_left_padded_matches_unpadded_loop(arch):
    model = tiny_lm(arch)
    seqs = prompt_ids()
    assert len({len(s) for s in seqs}) > 1  # really exercises left padding
    R = 12
    # EOS = a token that the naive decoding of prompt 0 emits at its 4th step (no earlier): row 0 then stops early
    # while other rows go on, which exercises the pad-after-EOS path of the batch
    first_run = naive_greedy(model, seqs[0], R, eos_token_id=-1)
    eos = next(t for t in first_run[3:] if t not in first_run[:3])
    expected = [naive_greedy(model, s, R, eos) for s in seqs]
    assert len(expected[0]) < R and any(len(e) == R for e in expected)

    ids, mask = common.left_pad(seqs, TOK.pad_token_id)
    calls = []  # (tokens fed, the cache passed, tokens it already holds) of every forward
    model.register_forward_pre_hook(lambda module, args, kw: calls.append(
        (kw["input_ids"].size(1), kw.get("cache"), kw["cache"].get_seq_length() if "cache" in kw else None)),
        with_kwargs=True)
    with warnings.catch_warnings():  # the KV cache through transformers' current API: no deprecated argument
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        responses, response_mask = common.generate(model, ids, mask, R, eos, TOK.pad_token_id, temperature=0.0)
    # the real cache: the prompt once, then one token per step into the same DynamicCache, which holds all before it
    P = ids.size(1)
    assert len(calls) == responses.shape[1] and all(type(c).__name__ == "DynamicCache" for _, c, _ in calls)
    assert [(n, held) for n, _, held in calls] == [(P, 0)] + [(1, P + t) for t in range(len(calls) - 1)]
    assert all(c is calls[0][1] for _, c, _ in calls)
    assert responses.shape[1] <= R
    for i, exp in enumerate(expected):
        n = len(exp)
        assert responses[i, :n].tolist() == exp
        assert (responses[i, n:] == TOK.pad_token_id).all()
        assert response_mask[i].tolist() == [1] * n + [0] * (responses.shape[1] - n)


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM: row i puts all its mass on EOS when its sequence reaches length eos_len[i], before that
    it is uniform over the non-special tokens. It keeps 'generating' after EOS, so the test sees whether generate
    pads. Counts its forward calls to check early stopping."""

    def __init__(self, eos_len: list[int], vocab: int, eos: int, n_special: int = 4):
        super().__init__()
        self.eos_len, self.vocab, self.eos, self.n_special, self.calls = eos_len, vocab, eos, n_special, 0
        self.config = None  # (a DynamicCache is built from it)

    def forward(self, input_ids, attention_mask, past_key_values=None, **kwargs):
        self.calls += 1
        B, T = attention_mask.shape  # the mask covers the whole sequence so far (left padding included)
        logits = torch.full((B, input_ids.size(1), self.vocab), -1e9)
        logits[:, -1, self.n_special:] = 0.0
        for i in range(B):
            if T == self.eos_len[i]:
                logits[i, -1] = -1e9
                logits[i, -1, self.eos] = 0.0
        return type("Out", (), {"logits": logits, "past_key_values": None})()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_generate_sampling_stops_at_eos_and_pads_after(pad_is_eos):
    # pad == EOS (a tokenizer without a pad token pads with EOS): the same masks, found by position
    P, eos = 3, TOK.eos_token_id
    pad = eos if pad_is_eos else TOK.pad_token_id
    steps_to_eos = [2, 5, 1, 100]  # EOS is the 2nd, 5th, 1st token; row 3 never ends
    model = ScriptedLM([P + s - 1 for s in steps_to_eos], len(TOK), eos)
    ids, mask = common.left_pad([[5, 6, 7]] * 4, pad)
    gen = torch.Generator().manual_seed(0)
    responses, response_mask = common.generate(model, ids, mask, 8, eos, pad, temperature=1.0, generator=gen)
    assert responses.shape == (4, 8)
    for i, s in enumerate(steps_to_eos):
        n = min(s, 8)
        assert response_mask[i].tolist() == [1] * n + [0] * (8 - n)  # 1 up to and including EOS
        assert (responses[i, : n - 1] >= 4).all()  # sampled real tokens before the EOS
        if s <= 8:
            assert responses[i, s - 1] == eos and (responses[i, s:] == pad).all()
    # decoding stops as soon as every row has finished
    model = ScriptedLM([P + s - 1 for s in [2, 3, 1, 2]], len(TOK), eos)
    responses, _ = common.generate(model, ids, mask, 8, eos, pad, temperature=1.0, generator=gen)
    assert responses.shape == (4, 3) and model.calls == 3


def naive_filter(logits_row: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """Kept token ids: the k largest, then the smallest most-likely-first prefix whose renormalised mass >= top_p."""
    order = sorted(range(len(logits_row)), key=lambda v: -logits_row[v])
    kept = order[:top_k] if top_k > 0 else order
    probs = np.exp(logits_row[kept] - logits_row[kept].max())
    probs /= probs.sum()
    out, mass = [], 0.0
    for v, p in zip(kept, probs):
        out.append(v)
        mass += p
        if mass >= top_p:
            break
    return set(out)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (1, 0.3), (0, 1e-6)])
def test_filter_logits_matches_naive(top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(6, 20, dtype=torch.float64) * 2
    filtered = common.filter_logits(logits, top_k, top_p)
    for b in range(6):
        kept = set(torch.nonzero(torch.isfinite(filtered[b])).flatten().tolist())
        assert kept == naive_filter(logits[b].numpy(), top_k, top_p)
        assert torch.equal(filtered[b][list(kept)], logits[b][list(kept)])  # kept logits unchanged


def test_sample_next_token_follows_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = common.sample_next_token(logits, temperature=2.0, top_k=3, generator=gen)
    counts = torch.bincount(tokens, minlength=5).double() / len(tokens)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 2.0, -1).double()
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], expected, atol=0.015)
    assert common.sample_next_token(logits[:2], temperature=0.0).tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# log-probs, entropy
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_from_logits_is_manual_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 3
    labels = torch.randint(0, 11, (3, 4))
    out = common.logprobs_from_logits(logits, labels, temperature)
    for b in range(3):
        for t in range(4):
            z = logits[b, t].double().numpy() / temperature
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            assert out[b, t].item() == pytest.approx(math.log(p[labels[b, t]]), abs=1e-5)


def test_entropy_from_logits_matches_naive():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 9) * 4
    logits[0, 0] = torch.tensor([50.0] + [0.0] * 8)  # near-deterministic: no NaN from 0 * log 0
    out = common.entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].double().numpy()
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            assert out[b, t].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p if pi > 0), abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequence_logprobs_left_padded_equals_unpadded(arch):
    model = tiny_lm(arch)
    torch.manual_seed(1)
    seqs = prompt_ids()
    responses_list = [torch.randint(4, len(TOK), (n,)).tolist() for n in [5, 2, 5, 3, 1]]
    R = 5
    ids, mask = common.left_pad(seqs, TOK.pad_token_id)
    responses = common.right_pad(responses_list, TOK.pad_token_id)
    response_mask = common.right_pad([[1] * len(r) for r in responses_list], 0)
    seq, seq_mask = torch.cat([ids, responses], 1), torch.cat([mask, response_mask], 1)
    with torch.no_grad():
        logprobs, entropy = common.sequence_logprobs(model, seq, seq_mask, ids.size(1), temperature=0.8,
                                                     return_entropy=True)
    assert logprobs.shape == (5, R)
    for i, (p, r) in enumerate(zip(seqs, responses_list)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double() / 0.8
        for t, token in enumerate(r):
            logp = torch.log_softmax(logits[len(p) - 1 + t], -1)
            assert logprobs[i, t].item() == pytest.approx(logp[token].item(), abs=1e-4)
            assert entropy[i, t].item() == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk_tokens", [None, 3])  # one chunk; many chunks with activation checkpointing
def test_chunked_logprobs_equal_the_full_logits_values_and_gradients(arch, chunk_tokens, monkeypatch):
    """sequence_logprobs never holds the (B, T, V) logits: against the plain forward's full logits, log_softmax."""
    if chunk_tokens:
        monkeypatch.setattr(common, "LOGITS_PER_CHUNK", chunk_tokens * len(TOK))
    checkpointed = []  # the chunks recomputed in backward (activation checkpointing)
    real_checkpoint = common.checkpoint  # torch.utils.checkpoint's
    monkeypatch.setattr(common, "checkpoint", lambda fn, hidden, *args, **kw: checkpointed.append(
        hidden.size(0)) or real_checkpoint(fn, hidden, *args, **kw))
    model = tiny_lm(arch)
    torch.manual_seed(2)
    ids, mask = common.left_pad(prompt_ids(), TOK.pad_token_id)
    responses = torch.randint(4, len(TOK), (ids.size(0), 4))
    seq, seq_mask = torch.cat([ids, responses], 1), torch.cat([mask, torch.ones_like(responses)], 1)
    P, weights = ids.size(1), torch.randn(ids.size(0), 4)

    def loss_and_grads(logprobs, entropy):
        model.zero_grad()
        ((logprobs + 0.3 * entropy) * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    logprobs, entropy = common.sequence_logprobs(model, seq, seq_mask, P, temperature=0.7, return_entropy=True)
    n = responses.numel()  # response tokens: one chunk of all of them, or chunks of chunk_tokens, each checkpointed
    assert checkpointed == ([] if not chunk_tokens else [min(chunk_tokens, n - i) for i in range(0, n, chunk_tokens)])
    grads = loss_and_grads(logprobs, entropy)
    logits = model(input_ids=seq, attention_mask=seq_mask, position_ids=common.position_ids_from_mask(seq_mask),
                   use_cache=False).logits[:, P - 1:-1] / 0.7
    logp = torch.log_softmax(logits, -1)
    full = logp.gather(-1, responses[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    full_grads = loss_and_grads(*full)
    torch.testing.assert_close(logprobs, full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, full[1], rtol=1e-5, atol=1e-5)
    for g, h in zip(grads, full_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5 * h.abs().max().item())  # float32 round-off


# ---------------------------------------------------------------------------------------------------------------------
# masks and masked statistics
# ---------------------------------------------------------------------------------------------------------------------
def random_values_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(4, 7, generator=g) < 0.6).long()
    mask[0] = 0  # an all-masked row
    return values, mask


def test_masked_mean_var_whiten_match_numpy():
    values, mask = random_values_and_mask()
    sel = values.numpy()[mask.numpy().astype(bool)]
    assert common.masked_mean(values, mask).item() == pytest.approx(sel.mean())
    mean, var, count = common.masked_mean_var(values, mask)
    assert (mean.item(), var.item(), count.item()) == (pytest.approx(sel.mean()), pytest.approx(sel.var(ddof=1)),
                                                       len(sel))
    # along a dim: row means; an all-masked row gives 0, not NaN
    rows = common.masked_mean(values, mask, dim=1)
    for b in range(4):
        m = mask[b].bool().numpy()
        assert rows[b].item() == pytest.approx(values[b].numpy()[m].mean() if m.any() else 0.0)
    whitened = common.masked_whiten(values, mask)
    expected = (sel - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(whitened.numpy()[mask.numpy().astype(bool)], expected, rtol=1e-6)
    assert (whitened[mask == 0] == 0).all()
    # shift_mean=False keeps the mean, only the scale changes
    kept = common.masked_whiten(values, mask, shift_mean=False).numpy()[mask.numpy().astype(bool)]
    np.testing.assert_allclose(kept, expected + sel.mean(), rtol=1e-6)
    assert common.masked_mean_var(values, torch.zeros_like(mask))[1] is None  # no variance below 2 values
    # fewer than 2 masked values have no spread: nothing masked gives zeros, one value is centred on itself (0)
    assert (common.masked_whiten(values, torch.zeros_like(mask)) == 0).all()
    one = torch.zeros_like(mask)
    one[2, 3] = 1
    assert (common.masked_whiten(values, one) == 0).all()
    assert common.masked_whiten(values, one, shift_mean=False)[2, 3].item() == pytest.approx(values[2, 3].item())


def test_first_true_indices_and_truncate_after_eos_match_loops():
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 6, (50, 9), generator=g)
    eos, pad = 3, 0
    first = common.first_true_indices(responses == eos)
    out, response_mask = common.truncate_after_eos(responses, eos, pad)
    for b in range(50):
        row = responses[b].tolist()
        idx = row.index(eos) if eos in row else len(row)
        assert first[b] == idx
        exp_tokens = [t if i <= idx else pad for i, t in enumerate(row)]
        assert out[b].tolist() == exp_tokens
        assert response_mask[b].tolist() == [1 if i <= idx else 0 for i in range(len(row))]


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    for mask in (right, left):
        expected = [max(i for i, m in enumerate(row) if m) for row in mask.tolist()]
        assert common.last_token_index(mask).tolist() == expected
    # a left-padded prompt followed by a response that ends in padding
    both = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert common.last_token_index(both).tolist() == [3, 4]


# ---------------------------------------------------------------------------------------------------------------------
# reward / value heads
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scores_read_last_real_token_for_any_padding(arch):
    model = tiny_reward_model(arch)
    seqs = prompt_ids() + [TOK(" good .")["input_ids"] + [TOK.eos_token_id]]
    with torch.no_grad():
        expected = []
        for s in seqs:  # unpadded, one at a time: score head on the backbone's last hidden state
            backbone = getattr(model, model.base_model_prefix)
            hidden = backbone(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
            expected.append((hidden @ model.score.weight[0]).item())
        left_ids, left_mask = common.left_pad(seqs, TOK.pad_token_id)
        right_ids = common.right_pad(seqs, TOK.pad_token_id)
        right_mask = common.right_pad([[1] * len(s) for s in seqs], 0)
        for ids, mask in [(left_ids, left_mask), (right_ids, right_mask)]:
            np.testing.assert_allclose(common.get_scores(model, ids, mask, normalize=False).numpy(), expected,
                                       atol=1e-4)
            # per-token values: the value at each real token equals the score of the prefix ending there
            values = common.head_outputs(model, ids, mask)
            assert values.shape == ids.shape
        model.config.reward_mean, model.config.reward_std = 0.3, 2.0
        np.testing.assert_allclose(common.get_scores(model, right_ids, right_mask).numpy(),
                                   (np.array(expected) - 0.3) / 2.0, atol=1e-4)


def test_head_outputs_value_of_each_prefix():
    model = tiny_reward_model("llama")
    s = prompt_ids()[1]
    ids, mask = common.left_pad([s, s[:3]], TOK.pad_token_id)
    with torch.no_grad():
        values = common.head_outputs(model, ids, mask)
        for t in range(1, len(s) + 1):  # V at position t = score of the prefix s[:t] alone
            backbone = getattr(model, model.base_model_prefix)
            hidden = backbone(input_ids=torch.tensor([s[:t]])).last_hidden_state[0, -1]
            assert values[0, t - 1].item() == pytest.approx((hidden @ model.score.weight[0]).item(), abs=1e-4)


def test_ordering_agreement_matches_pair_loop():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 30).astype(float), rng.integers(0, 5, 30).astype(float)  # many ties on both sides
    agree, pairs = 0.0, 0
    for i in range(30):
        for j in range(i + 1, 30):
            if b[i] == b[j]:
                continue
            pairs += 1
            if a[i] == a[j]:
                agree += 0.5
            elif (a[i] > a[j]) == (b[i] > b[j]):
                agree += 1
    assert harness.ordering_agreement(a, b) == pytest.approx(agree / pairs)
    assert harness.ordering_agreement(b, b) == 1.0 and harness.ordering_agreement(-b, b) == 0.0
    assert math.isnan(harness.ordering_agreement([1.0, 2.0], [3.0, 3.0]))


# ---------------------------------------------------------------------------------------------------------------------
# data, checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_load_rows_reads_jsonl_and_rejects_interior_blank_lines(tmp_path):
    path = write(tmp_path / "ok.jsonl",
                 '{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d"}\n\n  \n')
    assert harness.load_rows(path, "--dataset") == [(f"{path}:1", {"prompt": "a", "completion": " b"}),
                                                    (f"{path}:2", {"prompt": "c", "completion": " d"})]
    gap = write(tmp_path / "gap.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=rf"{gap}:2: blank line between JSON rows"):
        harness.load_rows(gap, "--dataset")


def test_load_rows_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b", \n')
    with pytest.raises(ValueError, match=rf"{bad}:2: not valid JSON"):
        harness.load_rows(bad, "--prompts")
    empty = write(tmp_path / "empty.jsonl", "\n  \n")
    with pytest.raises(ValueError, match=rf"--prompts {empty}: no rows"):
        harness.load_rows(empty, "--prompts")
    not_object = write(tmp_path / "list.jsonl", '{"prompt": "a"}\n["prompt", "b"]\n')
    with pytest.raises(ValueError, match=rf"{not_object}:2: expected a JSON object, got list"):
        harness.load_rows(not_object, "--prompts")
    with pytest.raises(harness.InputError, match="nope.jsonl: no such file"):
        harness.load_rows(str(tmp_path / "nope.jsonl"), "--prompts")
    with pytest.raises(harness.InputError, match=rf"{bad}:1: missing field 'chosen'"):
        harness.parse_preference_row({"prompt": "a", "rejected": " b"}, f"{bad}:1")


def test_save_model_round_trip_writes_into_output_dir(tmp_path):
    model = tiny_lm("gpt2")
    out = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(out, "checkpoints", "step_2"))
    write(os.path.join(out, "metrics.jsonl"), '{"step": 1}\n')  # this run's log, written before the save
    cfg = types.SimpleNamespace(run=harness.RunArgs(output_dir=out), model=harness.ModelArgs())
    harness.save_model(cfg, model, TOK, {"loss": 0.5, "nan": float("nan")}, extra_config={"reward_mean": 0.25})
    files = set(os.listdir(out))
    assert {"model.safetensors", "tokenizer.json", "config.json", "eval.json"} <= files and ".saving" not in files
    assert open(os.path.join(out, "metrics.jsonl")).read() == '{"step": 1}\n'  # the run's files stay
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_2"))
    assert json.load(open(os.path.join(out, "eval.json"))) == {"loss": 0.5, "nan": None}  # strict JSON, no NaN
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing written beside output_dir
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.reward_mean == 0.25
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.tensor([prompt_ids()[0]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------------------------
# diagnostics, schedule, policy evaluation
# ---------------------------------------------------------------------------------------------------------------------
def test_sampling_diagnostics_on_hand_made_distribution():
    import sft

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    logits, tokens = probs.log(), torch.tensor([1, 3])
    entropy, max_prob, sampled, nucleus = sft.sampling_diagnostics(logits, tokens, mass=0.9)
    h = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    assert entropy.tolist() == pytest.approx([h([0.5, 0.3, 0.15, 0.05]), math.log(4)], abs=1e-5)
    assert max_prob.tolist() == pytest.approx([0.5, 0.25]) and sampled.tolist() == pytest.approx([0.3, 0.25])
    assert nucleus.tolist() == [3, 4]  # 0.9 of the mass: 0.5 + 0.3 + 0.15 in the first row, all 4 in the uniform one
    # temperature -> infinity flattens: at T=1e6 every row is uniform
    assert sft.sampling_diagnostics(logits, tokens, temperature=1e6)[0].tolist() == pytest.approx([math.log(4)] * 2,
                                                                                                   abs=1e-4)


def test_lr_multiplier_shape():
    total, warmup = 100, 10
    lrs = [harness.lr_multiplier(s, total, warmup) for s in range(total + 1)]
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(x >= y for x, y in zip(lrs[warmup:], lrs[warmup + 1:]))  # monotone decay
    assert harness.lr_multiplier(55, total, warmup, "linear") == pytest.approx(1 - 45 / 90)
    assert harness.lr_multiplier(99, total, warmup, "constant") == 1.0


def test_evaluate_policy_metrics(tmp_path):
    policy = tiny_lm("gpt2")
    reward_model = tiny_reward_model("gpt2")
    prompts = PROMPTS[:3]
    m = harness.evaluate_policy(policy, TOK, prompts, torch.device("cpu"), ref=policy,
                                reward_model=reward_model, reward_fns=GOLD, samples_per_prompt=3,
                                max_new_tokens=6, batch_size=4, seed=0)
    for key in ["gold_reward_mean", "gold_reward_std", "proxy_reward_mean", "proxy_reward_std", "kl_to_ref",
                "gold_reward_proxy_agreement", "eos_rate", "response_length", "distinct_completions", "num_samples"]:
        assert key in m and isinstance(m[key], (int, float)), key
    rows = m["per_sample"]
    assert m["num_samples"] == 9 and sorted(rows["prompt"]) == sorted(p for p in prompts for _ in range(3))
    assert m["kl_to_ref"] == 0.0  # the policy is its own reference
    assert m["gold_reward_mean"] == pytest.approx(np.mean(toy_task.gold_reward(rows["prompt"], rows["completion"])))
    agreement = harness.ordering_agreement(rows["proxy"], rows["gold_reward"])
    assert m["gold_reward_proxy_agreement"] == pytest.approx(agreement)
    assert 1 <= m["response_length"] <= 6 and 0 <= m["eos_rate"] <= 1
    # same seed -> same samples; the training flag of the policy is restored
    policy.train()
    again = harness.evaluate_policy(policy, TOK, prompts, torch.device("cpu"), reward_fns=GOLD,
                                    samples_per_prompt=3, max_new_tokens=6, batch_size=4, seed=0)
    assert again["per_sample"]["completion"] == rows["completion"] and policy.training
    # prompts given as token ids (e.g. rendered by a chat template) decode the same way
    given = harness.evaluate_policy(policy, TOK, prompts, torch.device("cpu"), samples_per_prompt=3, max_new_tokens=6,
                                    batch_size=4, seed=0, prompt_ids=[TOK(p)["input_ids"] for p in prompts])
    assert given["per_sample"]["completion"] == rows["completion"]
    assert again["kl_to_ref"] is None and again["proxy_reward_mean"] is None  # no reference, no reward model


def test_metrics_logger_writes_jsonl(tmp_path, capsys):
    logger = harness.MetricsLogger(types.SimpleNamespace(run=harness.RunArgs(output_dir=str(tmp_path))))
    logger.log(3, {"loss": torch.tensor(1.5), "lr": 0.1})
    logger.log(4, {"loss": 1.25}, console_keys=())  # file only
    logger.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines == [{"step": 3, "loss": 1.5, "lr": 0.1}, {"step": 4, "loss": 1.25}]
    out = capsys.readouterr().out
    assert "step 3 loss=1.5" in out and "step 4" not in out


# ---------------------------------------------------------------------------------------------------------------------
# the layout: the kernel imports nothing of the project, the harness only the kernel, no circle
# ---------------------------------------------------------------------------------------------------------------------
OPTIONAL_EXTRAS = {"peft", "datasets", "wandb", "torch.utils.tensorboard", "matplotlib", "matplotlib.pyplot", "vllm"}


def test_the_layers_import_downwards_only_at_the_top_of_each_file():
    """common.py (the kernel) imports no module of the project, harness.py only common.py, neither the toy nor a
    script; the project's import graph has no circle; imports sit at the top of each file except the optional extras,
    and no file imports through __import__."""
    import ast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = {"common", "harness", "sft", "reward_model", "ppo", "dpo", "grpo", "toy_task"}
    graph = {}
    for name in project:
        tree = ast.parse(open(os.path.join(root, f"{name}.py")).read())
        top = {id(node) for node in tree.body}
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                imported |= {n.split(".")[0] for n in names}
                assert id(node) in top or set(names) <= OPTIONAL_EXTRAS, f"{name}.py:{node.lineno}: import {names}"
            assert not (isinstance(node, ast.Name) and node.id == "__import__"), f"{name}.py:{node.lineno}"
        graph[name] = imported & project
    assert graph["common"] == set() and graph["harness"] == {"common"}

    def reach(start, seen=()):  # every module imported from start, directly or not
        return set().union(*[{m} | (reach(m, seen + (m,)) if m not in seen else set()) for m in graph[start]])

    assert all(name not in reach(name) for name in project), graph


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_rollout_correction_against_a_loop(mode):
    """The importance weight pi_old / pi_rollout of a vLLM rollout, per token or per response, truncated or masked at
    the cap, against a plain loop over the real tokens; where engine and trainer agree it is 1 and nothing is capped."""
    torch.manual_seed(0)
    lengths, R, cap = [6, 3, 1, 0], 6, 1.3
    old = -torch.rand(len(lengths), R) * 3
    rollout = old + torch.randn(len(lengths), R) * 0.6
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    w, capped = common.rollout_correction(old, rollout, mask, mode, cap)
    for i, n in enumerate(lengths):
        seq_ratio = math.exp(sum(old[i, t].item() - rollout[i, t].item() for t in range(n)))
        for t in range(R):
            if t >= n:
                assert w[i, t] == 0 and not capped[i, t]
                continue
            ratio = seq_ratio if mode.startswith("sequence") else math.exp(old[i, t].item() - rollout[i, t].item())
            expected = min(ratio, cap) if mode.endswith("truncate") else (ratio if ratio <= cap else 0.0)
            assert w[i, t].item() == pytest.approx(expected, rel=1e-5) and bool(capped[i, t]) == (ratio > cap)
    assert capped.any() and (~capped & mask.bool()).any()  # the example has both
    same, none = common.rollout_correction(old, old.clone(), mask, mode, cap)
    assert torch.equal(same, mask) and not none.any()
