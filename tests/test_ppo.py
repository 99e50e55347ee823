"""ppo.py against naive computations: per-sequence Python loops over real tokens, hand-worked clipped losses,
Monte-Carlo KL, numpy statistics, unpadded single-sequence forwards, and a 1-process run vs a 2-process gloo run."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import head_jsonl, make, ROOT, with_pad
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import harness
import ppo
import toy_task

PPO_KEYS = ["objective/scores", "objective/kl", "objective/non_score_reward", "objective/entropy", "policy/approxkl",
            "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "val/explained_variance", "time/generate",
            "time/score", "time/train", "episodes_per_s"]
EVAL_KEYS = ["gold_reward_mean", "proxy_reward_mean", "kl_to_ref", "eos_rate", "num_samples"]


# ---------------------------------------------------------------------------------------------------------------------
# naive references
# ---------------------------------------------------------------------------------------------------------------------
def naive_gae(r: list, v: list, gamma: float, lam: float) -> list:
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l} over one sequence of real tokens, V = 0 after its end."""
    L = len(r)
    deltas = [r[k] + gamma * (v[k + 1] if k + 1 < L else 0.0) - v[k] for k in range(L)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t)) for t in range(L)]


def batch_with_padding(lengths, R, seed=0):
    """Random (B, R) float64 tensors whose padding (after each length) holds large garbage, and the mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths], dtype=torch.float64)
    garbage = lambda: (torch.rand(len(lengths), R, generator=g, dtype=torch.float64) - 0.5) * 2e3  # noqa: E731
    real = lambda scale: torch.randn(len(lengths), R, generator=g, dtype=torch.float64) * scale  # noqa: E731
    return mask, real, garbage


# ---------------------------------------------------------------------------------------------------------------------
# GAE, KL estimators, rewards
# ---------------------------------------------------------------------------------------------------------------------
def test_compute_gae_matches_naive_loop_over_real_tokens():
    lengths, R, gamma, lam = [7, 3, 1, 5], 7, 0.9, 0.8
    mask, real, garbage = batch_with_padding(lengths, R)
    rewards, values = real(1.0), real(2.0)
    # what follows EOS must not matter: fill padding with garbage
    rewards, values = torch.where(mask.bool(), rewards, garbage()), torch.where(mask.bool(), values, garbage())
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for i, L in enumerate(lengths):
        expected = naive_gae(rewards[i, :L].tolist(), values[i, :L].tolist(), gamma, lam)
        np.testing.assert_allclose(advantages[i, :L].numpy(), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(returns[i, :L].numpy(), np.array(expected) + values[i, :L].numpy(), rtol=1e-12)
        assert (advantages[i, L:] == 0).all() and (returns[i, L:] == 0).all()
    # gamma = lam = 1: the advantage of the first token is the return-to-go minus V_0 (a second, closed-form check)
    adv1, _ = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    for i, L in enumerate(lengths):
        assert adv1[i, 0].item() == pytest.approx(rewards[i, :L].sum().item() - values[i, 0].item(), rel=1e-12)


def test_kl_penalty_matches_definitions():
    g = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(3, 6, generator=g) * 5, -torch.rand(3, 6, generator=g) * 5
    lp, ref = logprobs.double().numpy(), ref_logprobs.double().numpy()
    np.testing.assert_allclose(ppo.kl_penalty(logprobs, ref_logprobs, "k1").numpy(), lp - ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ppo.kl_penalty(logprobs, ref_logprobs, "k2").numpy(), 0.5 * (lp - ref) ** 2, rtol=1e-5,
                               atol=1e-6)
    r = np.exp(ref - lp)  # pi_ref / pi
    k3 = ppo.kl_penalty(logprobs, ref_logprobs, "k3")
    np.testing.assert_allclose(k3.numpy(), r - 1 - np.log(r), rtol=1e-4, atol=1e-5)
    assert (k3 >= 0).all() and (ppo.kl_penalty(logprobs, logprobs, "k3") == 0).all()
    with pytest.raises(ValueError, match="k4"):
        ppo.kl_penalty(logprobs, ref_logprobs, "k4")


def test_k1_and_k3_are_unbiased_monte_carlo_estimates_of_kl():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)  # pi
    q = torch.tensor([0.1, 0.3, 0.2, 0.3, 0.1], dtype=torch.float64)  # pi_ref
    exact = (p * (p / q).log()).sum().item()
    reverse = (q * (q / p).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logprobs, ref_logprobs = p.log()[samples], q.log()[samples]  # y ~ pi
    for estimator in ("k1", "k3"):
        est = ppo.kl_penalty(logprobs, ref_logprobs, estimator)
        stderr = est.std().item() / math.sqrt(len(est))
        assert abs(est.mean().item() - exact) < 4 * stderr, estimator
        assert abs(reverse - exact) > 20 * stderr  # a swapped KL direction would fail the check above
    k3 = ppo.kl_penalty(logprobs, ref_logprobs, "k3")
    assert (k3 >= 0).all()
    k2 = ppo.kl_penalty(logprobs, ref_logprobs, "k2")
    assert k2.mean().item() == pytest.approx((p * 0.5 * (p / q).log() ** 2).sum().item(), rel=0.02)  # E[k2], biased


def test_compute_rewards_score_on_last_real_token():
    eos, pad = 2, 0
    raw = torch.tensor([[5, 6, eos, 7, 8],   # EOS at 2, then tokens that truncate_after_eos turns into padding
                        [5, 6, 7, 8, 9],     # never ended: the score goes on its last token
                        [eos, 5, 5, 5, 5],   # EOS first
                        [5, 6, 7, eos, 9]])
    responses, response_mask = common.truncate_after_eos(raw, eos, pad)
    mask = response_mask.double()
    scores = torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=torch.float64)
    kl = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kl = torch.where(mask.bool(), kl, 1e6)  # garbage on padding
    beta = 0.1
    rewards, non_score = ppo.compute_rewards(scores, kl, mask, beta)
    for i in range(4):
        tokens = raw[i].tolist()
        last = tokens.index(eos) if eos in tokens else len(tokens) - 1  # the EOS itself, or the last token
        for t in range(5):
            expected_ns = -beta * kl[i, t].item() if t <= last else 0.0
            expected = expected_ns + (scores[i].item() if t == last else 0.0)
            assert rewards[i, t].item() == pytest.approx(expected, abs=1e-12), (i, t)
            assert non_score[i, t].item() == pytest.approx(expected_ns, abs=1e-12), (i, t)


# ---------------------------------------------------------------------------------------------------------------------
# clipped losses
# ---------------------------------------------------------------------------------------------------------------------
def test_policy_loss_hand_example_and_zero_gradient_where_clipped():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 1.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 1e6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -2.0]], dtype=torch.float64)
    logprobs = (old_logprobs + ratio.log()).clone()
    logprobs[0, 5] = 40.0  # garbage on padding: ratio e^42
    logprobs.requires_grad_(True)
    loss, stats = ppo.policy_loss(logprobs, old_logprobs, advantages, mask, eps, mask.sum())
    # by hand, per token max(-A r, -A clip(r)):
    #   A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2 clipped  |  A=+1 r=0.5 -> max(-0.5, -0.8) = -0.5
    #   A=-1 r=0.5 -> max(0.5, 0.8) = 0.8 clipped     |  A=-1 r=1.5 -> max(1.5, 1.2) = 1.5
    #   A=+2 r=1.1 -> -2.2 (inside the clip range)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5, abs=1e-12)
    assert stats["clipped"].item() == 2  # a count of real tokens; main divides by the token count
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in [1.5, 0.5, 0.5, 1.5, 1.1]))
    loss.backward()
    # d(-A r)/d logprob = -A r where unclipped; exactly 0 where clipped and on padding
    expected_grad = [0.0, -0.5 / 5, 0.0, 1.5 / 5, -2.2 / 5, 0.0]
    np.testing.assert_allclose(logprobs.grad[0].numpy(), expected_grad, atol=1e-12)
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 2] == 0 and logprobs.grad[0, 5] == 0
    # the mean is over the given token count (the global minibatch's in multi-process runs)
    loss10, _ = ppo.policy_loss(logprobs.detach(), old_logprobs, advantages, mask, eps, 10.0)
    assert loss10.item() == pytest.approx(loss.item() * 5 / 10)


def test_value_loss_hand_example_and_zero_gradient_where_clipped():
    eps = 0.2
    old_values = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.1, -0.5, 1e6]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.0, -1.0, -1e6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.float64)
    loss, stats = ppo.value_loss(values, old_values, returns, mask, eps, mask.sum())
    # by hand, max((V - R)^2, (V_old + clip(V - V_old, -0.2, 0.2) - R)^2):
    #   V=.5 R=1 -> max(.25, .64) clipped | V=.5 R=0 -> max(.25, .04) | V=.1 R=1 -> .81 (inside)
    #   V=-.5 R=-1 -> max(.25, .64) clipped
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4, abs=1e-12)
    assert stats["vf_clipped"].item() == 2
    loss.backward()
    np.testing.assert_allclose(values.grad[0].numpy(), [0.0, 0.5 / 4, -0.9 / 4, 0.0, 0.0], atol=1e-12)


def test_masking_padding_changes_no_advantage_loss_or_statistic():
    """The whole per-token pipeline (KL -> rewards -> GAE -> whitening -> losses) on a batch whose post-EOS slots
    hold garbage equals the same batch with different garbage, and equals a naive computation over real tokens."""
    lengths, R, beta, gamma, lam, eps = [6, 2, 4, 1], 6, 0.1, 0.95, 0.9, 0.2
    mask, real, garbage = batch_with_padding(lengths, R, seed=1)
    logprobs, ref_logprobs = -real(1.0).abs(), -real(1.0).abs()
    new_logprobs = logprobs + real(0.3)
    values, new_values = real(1.0), real(1.0)
    scores = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)

    def pipeline(fill):
        # padding slots: finite garbage (ratios stay finite; the code masks by multiplication)
        lp, ref, new_lp = (torch.where(mask.bool(), x, fill() / 100) for x in (logprobs, ref_logprobs, new_logprobs))
        v, new_v = (torch.where(mask.bool(), x, fill()) for x in (values, new_values))
        kl = ppo.kl_penalty(lp, ref, "k1") * mask
        rewards, _ = ppo.compute_rewards(scores, kl, mask, beta)
        adv, ret = ppo.compute_gae(rewards, v * mask, mask, gamma, lam)
        adv = common.masked_whiten(adv, mask)
        pg, pg_stats = ppo.policy_loss(new_lp, lp, adv, mask, eps, mask.sum())
        vf, vf_stats = ppo.value_loss(new_v, v * mask, ret, mask, eps, mask.sum())
        return [adv, ret, pg, vf, pg_stats["approxkl"], pg_stats["clipped"], vf_stats["vf_clipped"]]

    for a, b in zip(pipeline(garbage), pipeline(garbage)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    adv, ret, pg, vf, approxkl, clipfrac, vf_clipfrac = pipeline(garbage)

    # naive: per-sequence loops over real tokens, then numpy statistics over their concatenation
    flat_adv, flat_ret, flat = [], [], {k: [] for k in ("lp", "new_lp", "v", "new_v")}
    for i, L in enumerate(lengths):
        r = [-beta * (logprobs[i, t] - ref_logprobs[i, t]).item() for t in range(L)]
        r[-1] += scores[i].item()
        a = naive_gae(r, values[i, :L].tolist(), gamma, lam)
        flat_adv += a
        flat_ret += [x + y for x, y in zip(a, values[i, :L].tolist())]
        for k, x in zip(flat, (logprobs, new_logprobs, values, new_values)):
            flat[k] += x[i, :L].tolist()
    A = np.array(flat_adv)
    A = (A - A.mean()) / np.sqrt(A.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(adv[mask.bool()].numpy(), A, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ret[mask.bool()].numpy(), flat_ret, rtol=1e-9, atol=1e-9)
    ratio = np.exp(np.array(flat["new_lp"]) - np.array(flat["lp"]))
    pg_terms = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - eps, 1 + eps))
    assert pg.item() == pytest.approx(pg_terms.mean(), rel=1e-9)
    assert clipfrac.item() == ((-A * np.clip(ratio, 1 - eps, 1 + eps)) > -A * ratio).sum()
    assert approxkl.item() == pytest.approx((0.5 * np.log(ratio) ** 2).sum(), rel=1e-9)
    v_old, v_new, G = np.array(flat["v"]), np.array(flat["new_v"]), np.array(flat_ret)
    v_clip = v_old + np.clip(v_new - v_old, -eps, eps)
    assert vf.item() == pytest.approx(0.5 * np.maximum((v_new - G) ** 2, (v_clip - G) ** 2).mean(), rel=1e-9)
    assert vf_clipfrac.item() == ((v_clip - G) ** 2 > (v_new - G) ** 2).sum()


# ---------------------------------------------------------------------------------------------------------------------
# controller, normalisations
# ---------------------------------------------------------------------------------------------------------------------
def test_adaptive_kl_controller_follows_formula():
    target, horizon, n = 4.0, 1000, 64
    ctl = ppo.KLController(0.1, True, target, horizon)
    beta = 0.1
    for kl in [10.0, 100.0, 4.4, 4.0, 3.0, 0.5, 0.0]:
        before = ctl.value
        ctl.update(kl, n)
        error = min(max(kl / target - 1, -0.2), 0.2)  # clipped at +-20%
        beta *= 1 + error * n / horizon
        assert ctl.value == pytest.approx(beta, rel=1e-12)
        assert (ctl.value > before) == (kl > target) and (ctl.value < before) == (kl < target)
    # the clip: KL 10x or 100x above target give the same step
    a, b = ppo.KLController(0.1, True, target, horizon), ppo.KLController(0.1, True, target, horizon)
    a.update(40.0, n), b.update(400.0, n)
    assert a.value == b.value == pytest.approx(0.1 * (1 + 0.2 * n / horizon))
    # not adaptive: beta stays where it started whatever the KL; the value survives a state_dict round trip
    fixed = ppo.KLController(0.1, False, target, horizon)
    for kl in [100.0, 0.0]:
        fixed.update(kl, n)
    assert fixed.value == 0.1
    restored = ppo.KLController(0.3, True, target, horizon)
    restored.load_state_dict(a.state_dict())
    assert restored.value == a.value


def test_per_prompt_normalize_matches_loop():
    g = torch.Generator().manual_seed(0)
    scores, N = torch.randn(12, generator=g, dtype=torch.float64) * 2 + 1, 3
    s = scores.tolist()
    global_mean = sum(s) / len(s)
    out = ppo.per_prompt_normalize(scores, N, torch.tensor(global_mean, dtype=torch.float64),
                                   torch.ones(len(s), dtype=torch.bool))
    for i in range(len(s)):
        group = s[(i // N) * N:(i // N + 1) * N]
        assert out[i].item() == pytest.approx(s[i] - sum(group) / N + global_mean, rel=1e-12)
    # unscored samples (their score is 0 in ppo.py) do not count in their prompt's mean; a prompt with none scored
    # keeps mean 0
    scored = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    zeroed = torch.where(scored, scores, 0.0)
    out = ppo.per_prompt_normalize(zeroed, N, torch.tensor(0.5, dtype=torch.float64), scored)
    for i in range(len(s)):
        members = [j for j in range((i // N) * N, (i // N + 1) * N) if scored[j]]
        group_mean = sum(s[j] for j in members) / len(members) if members else 0.0
        assert out[i].item() == pytest.approx(zeroed[i].item() - group_mean + 0.5, rel=1e-12)


def test_running_moments_match_numpy_over_concatenation():
    g = torch.Generator().manual_seed(0)
    moments, seen = ppo.RunningMoments(), []
    for n in [5, 17, 1, 40]:
        x = torch.randn(n, generator=g, dtype=torch.float64) * 2.5 + 3.0
        moments.update(x)
        seen += x.tolist()
        assert moments.mean == pytest.approx(np.mean(seen), rel=1e-7)
        assert moments.var == pytest.approx(np.var(seen), rel=1e-7)  # population variance of everything seen
        np.testing.assert_allclose(moments.whiten(x).numpy(), (x.numpy() - np.mean(seen)) / np.std(seen), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# rollout log-probs
# ---------------------------------------------------------------------------------------------------------------------
def test_rollout_logprobs_equal_fresh_unpadded_forward_at_temperature(toy_sft_checkpoint):
    tok = AutoTokenizer.from_pretrained(toy_sft_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).eval()
    prompts = ["the phone was", "honestly the movie was", "i think the pizza is", "my new laptop is not"]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    assert len({len(p) for p in prompt_ids}) > 1  # really left-padded
    query, query_mask = common.left_pad(prompt_ids, tok.pad_token_id)
    T = 0.7
    responses, response_mask = common.generate(model, query, query_mask, 10, tok.eos_token_id, tok.pad_token_id, T,
                                               generator=torch.Generator().manual_seed(0))
    seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        logprobs = common.sequence_logprobs(model, seq, seq_mask, query.size(1), T)
        logprobs_t1 = common.sequence_logprobs(model, seq, seq_mask, query.size(1), 1.0)
    for i, p in enumerate(prompt_ids):
        r = responses[i, :int(response_mask[i].sum())].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double()
        naive = torch.log_softmax(logits[len(p) - 1:-1] / T, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
        np.testing.assert_allclose(logprobs[i, :len(r)].double().numpy(), naive.numpy(), atol=1e-5)
    assert not torch.allclose(logprobs[response_mask.bool()], logprobs_t1[response_mask.bool()])  # T is used


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
    kw = dict(output_dir=str(out), num_iterations=2, rollout_batch_size=4, max_new_tokens=8, update_epochs=1,
              num_minibatches=1, eval_samples_per_prompt=2, eval_every=100, sample_every=100, log_every=100,
              eval_reward_fn=("toy_task:gold_reward",))
    kw.update(overrides)
    return kw


def small_config(out, **overrides) -> ppo.Config:
    return make(ppo.Config, **small_options(out, **overrides))


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
    train = [r for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/gold_reward_mean" in r]
    with open(os.path.join(out, "eval.json")) as f:
        return train, evals, json.load(f)


def test_end_to_end_reward_model(toy_sft_checkpoint, toy_reward_model, eval_prompts, tmp_path):
    out = tmp_path / "ppo"
    # one epoch of one minibatch: every update starts from the weights that sampled the batch, so the ratio is 1
    # (at a temperature other than 1, which rollout and training log-probs must share)
    cfg = small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model,
                       eval_prompts=eval_prompts, temperature=0.7)
    result = ppo.main(cfg)
    train, evals, eval_json = read_outputs(out)
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    for r in train:
        for key in PPO_KEYS:
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["policy/approxkl"] < 1e-12 and r["policy/clipfrac"] == 0  # rollout log-probs = training forward
        # with ratio 1 the loss is -mean(whitened advantages) = 0
        assert r["loss/policy"] == pytest.approx(0.0, abs=1e-6)
    assert train[0]["objective/kl"] == 0 and train[0]["objective/non_score_reward"] == 0  # actor == reference
    assert train[1]["objective/kl"] != 0  # the update moved the policy
    for key in EVAL_KEYS:
        assert key in eval_json and "start_" + key in eval_json, key
    assert eval_json["start_kl_to_ref"] == 0 and eval_json["num_samples"] == 4
    assert eval_json["gold_reward_mean"] == result["gold_reward_mean"]
    assert math.isfinite(eval_json["proxy_reward_mean"]) and math.isfinite(eval_json["gold_reward_mean"])
    # the saved policy loads, with its pad token, and differs from the SFT weights
    saved = AutoModelForCausalLM.from_pretrained(out)
    sft_model = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint)
    pad_ids = {AutoTokenizer.from_pretrained(d).pad_token_id for d in (out, toy_sft_checkpoint)}
    assert len(pad_ids) == 1 and None not in pad_ids
    assert any(not torch.equal(p, q) for p, q in zip(saved.state_dict().values(), sft_model.state_dict().values()))


def test_unscored_samples_are_counted_and_left_out_of_the_loss(toy_sft_checkpoint, eval_prompts, tmp_path):
    (tmp_path / "unscoring.py").write_text("def nothing(completions, **kwargs):\n    return [None] * len(completions)\n"
                                           "def every_other(completions, **kwargs):\n"
                                           "    return [None if i % 2 else float(len(c)) for i, c in "
                                           "enumerate(completions)]\n")
    fns = str(tmp_path / "unscoring.py")
    for name, unscored, trains in (("nothing", 4, False), ("every_other", 2, True)):
        out = tmp_path / name
        # critic from SFT with a fresh head: its weights are saved beside the policy's only in checkpoints, so the
        # policy shows what the loss saw
        ppo.main(small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path="none",
                              reward_fn=(f"{fns}:{name}",), critic_init="sft", eval_prompts="none"))
        train, _, _ = read_outputs(out)
        assert [r["objective/unscored"] for r in train] == [unscored, unscored]
        saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
        sft_weights = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).state_dict()
        changed = any(not torch.equal(saved[n], p) for n, p in sft_weights.items())
        assert changed == trains  # nothing scored: no token in the loss, the policy stays the SFT model exactly


def test_end_to_end_reward_fn_critic_sft_k3_adaptive_per_prompt(toy_sft_checkpoint, eval_prompts, tmp_path):
    out = tmp_path / "ppo"
    penalty, beta0, target, horizon = 1.0, 0.05, 0.5, 40
    cfg = small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path="none",
                       reward_fn=("toy_task:gold_reward",), critic_init="sft", kl_estimator="k3", adaptive_kl=True,
                       kl_coef=beta0, target_kl=target, kl_horizon=horizon, score_norm="per_prompt",
                       num_samples_per_prompt=2, num_iterations=3, missing_eos_penalty=penalty,
                       eval_prompts=eval_prompts)
    result = ppo.main(cfg)
    train, _, eval_json = read_outputs(out)
    assert result["proxy_reward_mean"] is None and math.isfinite(eval_json["gold_reward_mean"])
    beta = beta0
    for r in train:
        assert r["beta"] == pytest.approx(beta, rel=1e-9)  # the controller's value is used in the next iteration
        beta *= 1 + min(max(r["objective/kl"] / target - 1, -0.2), 0.2) * 8 / horizon  # 8 episodes per iteration
        assert r["objective/kl"] >= 0  # k3 is non-negative
        # per-prompt normalisation keeps the batch mean: normalised = scores - penalty for responses without EOS
        expected = r["objective/scores"] - penalty * (1 - r["eos_rate"])
        assert r["objective/normalized_scores"] == pytest.approx(expected, abs=1e-5)
        assert r["episodes"] == 8 * r["step"]
    assert train[0]["objective/kl"] == 0 and train[1]["beta"] < beta0


def test_end_to_end_k2_running_norm_and_more_options(toy_sft_checkpoint, toy_reward_model, eval_prompts, tmp_path):
    out = tmp_path / "ppo"
    cfg = small_config(out, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model,
                       kl_estimator="k2", score_norm="running", score_clip=3.0, rollout_batch_size=8, update_epochs=2,
                       num_minibatches=2, gradient_accumulation_steps=2, shared_optimizer=True, entropy_coef=0.01,
                       top_k=20, top_p=0.9, whiten_advantages=False, lr_scheduler="cosine", warmup_ratio=0.5,
                       eval_prompts=eval_prompts)
    ppo.main(cfg)
    train, _, _ = read_outputs(out)
    # the first batch is whitened with its own statistics: mean 0
    assert train[0]["objective/normalized_scores"] == pytest.approx(0.0, abs=1e-6)
    for r in train:
        assert r["objective/kl"] >= 0 and all(math.isfinite(r[k]) for k in PPO_KEYS)
    assert train[0]["policy/approxkl"] > 0  # 2 epochs x 2 minibatches: later minibatches see a moved policy
    # 2 iterations x 2 epochs x 2 minibatches = 8 updates, the first 4 in warmup, then cosine decay to 0
    assert [r["lr"] for r in train] == pytest.approx([cfg.optim.learning_rate, 0.0], abs=1e-12)
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_clear_errors(toy_sft_checkpoint, toy_reward_model, tmp_path):
    with pytest.raises(harness.InputError,
                       match=r"--model_name_or_path runs/missing_sft_for_test: not found; run `python sft.py` first"):
        ppo.main(small_config(tmp_path / "a", model_name_or_path="runs/missing_sft_for_test"))
    with pytest.raises(harness.InputError, match=r"--reward_model_path runs/missing_rm_for_test: not found; "
                                                r"run `python reward_model.py` first"):
        ppo.main(small_config(tmp_path / "b", model_name_or_path=toy_sft_checkpoint,
                              reward_model_path="runs/missing_rm_for_test"))
    with pytest.raises(ValueError, match="per_prompt needs --num_samples_per_prompt >= 2"):
        ppo.main(small_config(tmp_path / "c", model_name_or_path=toy_sft_checkpoint,
                              reward_model_path=toy_reward_model, score_norm="per_prompt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the phone was"}\n{"text": "oops"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a prompt-only row"):
        ppo.main(small_config(tmp_path / "d", model_name_or_path=toy_sft_checkpoint,
                              reward_model_path=toy_reward_model, prompts=str(bad)))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "the phone was"}\n{"text": "oops"}\n')
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: a text \{text\} row, but .*mixed.jsonl:1 is a text "
                                         r"\{prompt\} row; one dataset must hold one format"):
        ppo.main(small_config(tmp_path / "e", model_name_or_path=toy_sft_checkpoint,
                              reward_model_path=toy_reward_model, prompts=str(mixed)))
    # a missing policy is refused before output_dir is claimed; a later error leaves at most the lock file (its lock
    # released when the process ends): no model, log or eval.json
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")
    assert all(set(os.listdir(tmp_path / d)) <= {".lock"} for d in "bde")


# ---------------------------------------------------------------------------------------------------------------------
# tiny random configs of several architectures, chat prompts, a reward model with another tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def test_score_responses_retokenises_for_a_different_reward_tokenizer(tiny_checkpoints, toy_reward_model):
    policy_tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])  # toy words + chat tokens: other ids
    rm_tok = AutoTokenizer.from_pretrained(toy_reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(toy_reward_model).eval()
    assert not harness.same_tokenizer(rm_tok, policy_tok)
    prompts = ["the phone was", "honestly the movie was", "my new laptop is"]
    completions = [" very good .", " not bad but the plot is dull", " excellent !"]
    ended = [True, False, True]
    query, query_mask = common.left_pad([policy_tok(p)["input_ids"] for p in prompts], policy_tok.pad_token_id)
    resp = [policy_tok(c, add_special_tokens=False)["input_ids"] + ([policy_tok.eos_token_id] if e else [])
            for c, e in zip(completions, ended)]
    responses = common.right_pad(resp, policy_tok.pad_token_id)
    response_mask = common.right_pad([[1] * len(r) for r in resp], 0)
    decoded = policy_tok.batch_decode(responses, skip_special_tokens=True)
    scores = harness.score_responses(rm, rm_tok, policy_tok, query, query_mask, responses, response_mask, prompts,
                                     decoded)
    for i, (p, c, e) in enumerate(zip(prompts, completions, ended)):
        ids = rm_tok(p + c)["input_ids"] + ([rm_tok.eos_token_id] if e else [])  # one unpadded sequence
        with torch.no_grad():
            expected = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()  # HF's own read-out at the last token
        assert scores[i].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_end_to_end_tiny_architectures_chat_prompts(arch, tiny_checkpoints, toy_reward_model, tmp_path):
    # a tiny random checkpoint is no toy model: the prompts and lengths that fit its 128 positions are given
    policy = tiny_checkpoints[arch]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n"
                               for p in ["the phone was", "honestly the movie was", "this book is"]))
    fits = dict(prompts=str(prompts), max_prompt_length=48, max_new_tokens=5)  # gpt2's tokenizer: no pad, bos == eos
    tok = AutoTokenizer.from_pretrained(policy)
    rows = harness.load_rows(str(prompts), "--prompts")
    ids, _ = harness.tokenize_prompts([harness.parse_prompt(row, where) for where, row in rows], tok, 48)
    text = tok.apply_chat_template([{"role": "user", "content": "the phone was"}], add_generation_prompt=True,
                                   tokenize=False)
    assert ids[0] == tok(text, add_special_tokens=False)["input_ids"] and text.endswith("assistant :")
    out = tmp_path / "ppo"
    cfg = small_config(out, model_name_or_path=policy, reward_model_path=toy_reward_model, critic_init="sft",
                       eval_prompts=str(prompts), eval_reward_fn=("none",), eval_samples_per_prompt=1, **fits)
    ppo.main(cfg)
    train, _, eval_json = read_outputs(out)
    assert len(train) == 2 and all(math.isfinite(r[k]) for r in train for k in PPO_KEYS)
    assert train[0]["objective/kl"] == 0 and eval_json["start_kl_to_ref"] == 0
    assert math.isfinite(eval_json["proxy_reward_mean"]) and eval_json["num_samples"] == 3
    trained = AutoModelForCausalLM.from_pretrained(out).config
    assert trained.model_type == arch and trained.vocab_size == AutoConfig.from_pretrained(policy).vocab_size
    if arch == "llama":  # the critic needs the policy's tokenizer when it starts from the reward model
        with pytest.raises(ValueError, match="critic_init reward_model needs the reward model to share"):
            ppo.main(small_config(tmp_path / "y", model_name_or_path=policy, reward_model_path=toy_reward_model,
                                  **fits))


# ---------------------------------------------------------------------------------------------------------------------
# two processes (gloo, FSDP2) against one process on the same global batch
# ---------------------------------------------------------------------------------------------------------------------
def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "episodes_per_s", "wall_time", "config"))}
            for r in rows]


@pytest.mark.parametrize("pad", ["missing", "eos"])
def test_a_tokenizer_without_pad_or_with_pad_eos_changes_nothing(pad, toy_sft_checkpoint, toy_reward_model,
                                                                  eval_prompts, tmp_path):
    """As grpo.py's: with no pad token or pad == EOS, ppo.py (reward model, critic, missing-EOS penalty, some responses
    cut off) logs exactly the run with the toy's own pad token; no token is added to the model."""
    policy = with_pad(toy_sft_checkpoint, str(tmp_path / f"sft_{pad}"), pad)
    settings = dict(reward_model_path=toy_reward_model, eval_prompts=eval_prompts, max_new_tokens=7)
    for name, path in (("own", toy_sft_checkpoint), (pad, policy)):
        ppo.main(small_config(tmp_path / name, model_name_or_path=path, **settings))
    own, other = read_outputs(tmp_path / "own"), read_outputs(tmp_path / pad)
    assert 0 < own[0][0]["eos_rate"] < 1  # responses that ended and responses cut off
    for rows, rows_pad in zip(own, other):  # training rows, evaluation rows, eval.json
        assert without_timing(rows_pad if isinstance(rows, list) else [rows_pad]) == \
            without_timing(rows if isinstance(rows, list) else [rows])
    assert AutoConfig.from_pretrained(tmp_path / pad).vocab_size == AutoConfig.from_pretrained(policy).vocab_size


def test_two_processes_match_one_process(toy_sft_checkpoint, toy_reward_model, eval_prompts, tmp_path):
    # top_k=1 samples the argmax (log-probs stay those of the full distribution, so nothing is degenerate): both runs
    # roll out the same responses although each rank has its own sampling seed. The tokenizer has no pad token (as
    # Llama's): it pads with EOS, masks by position on both ranks.
    policy = with_pad(toy_sft_checkpoint, str(tmp_path / "sft_no_pad"), "missing")
    settings = dict(model_name_or_path=policy, reward_model_path=toy_reward_model,
                    eval_prompts=eval_prompts, top_k=1, eval_samples_per_prompt=1, max_new_tokens=6)
    one = tmp_path / "one"
    ppo.main(small_config(one, **settings))
    two = tmp_path / "two"
    args = command_line(small_options(two, **settings))
    assert harness.parse(ppo.Config, args) == small_config(two, **settings)  # the command line says the same
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "ppo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train1, _, eval1 = read_outputs(one)
    train2, _, eval2 = read_outputs(two)
    assert train2[0]["objective/kl"] == 0 and eval2["start_kl_to_ref"] == 0
    # iteration 1: same rollouts; losses and statistics reduced over both ranks' tokens equal the 1-process ones
    for key in ["objective/scores", "objective/scores_std", "objective/entropy", "loss/policy", "loss/value",
                "val/clipfrac", "val/explained_variance", "response_length", "eos_rate"]:
        assert train2[0][key] == pytest.approx(train1[0][key], rel=1e-4, abs=1e-6), key
    # iteration 2 rolls out from the updated policy: the same update was made from the gradients of both ranks
    for key in ["objective/scores", "objective/kl", "loss/value"]:
        assert train2[1][key] == pytest.approx(train1[1][key], rel=1e-3, abs=1e-5), key
    for key in ["gold_reward_mean", "kl_to_ref", "num_samples"]:
        assert eval2[key] == pytest.approx(eval1[key], rel=1e-3, abs=1e-5), key
    # the two updates of the weights agree to 1% of their size (Adam hides a uniform gradient scale, not a mix-up)
    w0, w1, w2 = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (toy_sft_checkpoint, one, two))
    update = max((w1[n] - w0[n]).abs().max().item() for n in w0)
    assert update > 0 and max((w2[n] - w1[n]).abs().max().item() for n in w0) < 0.01 * update

# ---------------------------------------------------------------------------------------------------------------------
# the reward and the defaults follow the model: the toy's on the toy model, ppo.PRETRAINED on any other
# ---------------------------------------------------------------------------------------------------------------------
def test_no_reward_off_the_toy_is_refused_naming_both_options(tiny_checkpoints, toy_sft_checkpoint, toy_reward_model,
                                                             tmp_path, monkeypatch):
    # a reward model at runs/reward_model in the current directory: the toy's default, never another model's
    shutil.copytree(toy_reward_model, tmp_path / "runs" / "reward_model")
    prompts = head_jsonl("data/toy/prompts_train.jsonl", tmp_path / "prompts.jsonl", 4)
    monkeypatch.chdir(tmp_path)
    cfg = small_config(tmp_path / "out", model_name_or_path=tiny_checkpoints["llama"], prompts=prompts,
                       max_prompt_length=48)
    with pytest.raises(harness.InputError, match=r"no reward: give --reward_model_path \(.*\) or --reward_fn "):
        ppo.main(cfg)
    assert cfg.reward_model_path is None and set(os.listdir(tmp_path / "out")) <= {".lock"}  # not picked up
    # the toy model takes it (setup fills the defaults that follow the model)
    toy = small_config(tmp_path / "toy", model_name_or_path=toy_sft_checkpoint, prompts=prompts)
    harness.setup(toy, "ppo", ppo.PRETRAINED)
    assert toy.reward_model_path == toy_task.DEFAULTS["ppo"]["reward_model_path"] == "runs/reward_model"
