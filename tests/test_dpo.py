"""dpo.py: each loss against its formula, the response-only log-prob masking against a naive per-example computation,
precomputed vs on-the-fly reference, data formats, end-to-end runs (toy, tiny architectures) and 2 processes vs 1."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make
import dpo
import harness
import toy_task

BETAS = [0.1, 0.5, 2.0]


def naive_logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 30) for _ in range(4)]


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------
def test_sigmoid_loss_is_ln2_when_policy_equals_reference():
    c, r, _, _ = random_logps()
    h = dpo.logratio_margin(c, r, c.clone(), r.clone())
    for beta in BETAS:
        for eps in [0.0, 0.1, 0.3]:
            torch.testing.assert_close(dpo.sigmoid_loss(h, beta, eps), torch.full_like(h, math.log(2)))
            torch.testing.assert_close(dpo.robust_loss(h, beta, eps), torch.full_like(h, math.log(2)))


def test_each_loss_matches_its_formula():
    c, r, rc, rr = random_logps()
    h = dpo.logratio_margin(c, r, rc, rr)
    for i in range(len(h)):
        assert h[i].item() == pytest.approx((c[i] - rc[i]).item() - (r[i] - rr[i]).item(), abs=1e-12)
    for beta in BETAS:
        for eps in [0.0, 0.2]:
            want = [-(1 - eps) * naive_logsigmoid(beta * x) - eps * naive_logsigmoid(-beta * x) for x in h.tolist()]
            assert dpo.preference_loss(h, "sigmoid", beta, eps).tolist() == pytest.approx(want, rel=1e-9)
            want = [((1 - eps) * -naive_logsigmoid(beta * x) - eps * -naive_logsigmoid(-beta * x)) / (1 - 2 * eps)
                    for x in h.tolist()]
            assert dpo.preference_loss(h, "robust", beta, eps).tolist() == pytest.approx(want, rel=1e-9)
        want = [(x - 1 / (2 * beta)) ** 2 for x in h.tolist()]
        assert dpo.preference_loss(h, "ipo", beta).tolist() == pytest.approx(want, rel=1e-9)
        want = [max(0.0, 1 - beta * x) for x in h.tolist()]
        assert dpo.preference_loss(h, "hinge", beta).tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    lengths = torch.tensor([3.0] * len(c))
    assert dpo.sft_loss(c, lengths).tolist() == pytest.approx([-x / 3 for x in c.tolist()])
    assert dpo.implicit_rewards(c, rc, 0.5).tolist() == pytest.approx([0.5 * (a - b) for a, b in zip(c.tolist(),
                                                                                                       rc.tolist())])


def test_label_smoothing_zero_reduces_to_dpo_and_robust_is_unbiased():
    h = torch.linspace(-20, 20, 41, dtype=torch.float64)
    dpo_loss = -torch.nn.functional.logsigmoid(0.3 * h)
    torch.testing.assert_close(dpo.sigmoid_loss(h, 0.3, 0.0), dpo_loss)
    torch.testing.assert_close(dpo.robust_loss(h, 0.3, 0.0), dpo_loss)
    # robust DPO: averaged over a label flipped with probability eps (h -> -h), it equals the clean DPO loss
    eps = 0.25
    noisy = (1 - eps) * dpo.robust_loss(h, 0.3, eps) + eps * dpo.robust_loss(-h, 0.3, eps)
    torch.testing.assert_close(noisy, dpo_loss)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.preference_loss(h, "ipo", 0.3, 0.1)
    with pytest.raises(ValueError, match="< 0.5"):
        dpo.robust_loss(h, 0.3, 0.5)


def grads(loss_type, beta, eps, c, r, rc, rr):
    leaves = [x.clone().requires_grad_(True) for x in (c, r, rc, rr)]
    dpo.preference_loss(dpo.logratio_margin(*leaves), loss_type, beta, eps).sum().backward()
    return [x.grad for x in leaves]


def test_gradient_signs_and_values():
    c, r, _, _ = random_logps()
    g = torch.Generator().manual_seed(1)
    # references near the policy, so that |beta h| < 1: inside the hinge's active region
    rc, rr = c + 2 * torch.rand(len(c), generator=g) - 1, r + 2 * torch.rand(len(r), generator=g) - 1
    h = dpo.logratio_margin(c, r, rc, rr)
    beta = 0.1
    assert (beta * h).abs().max() < 1
    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0)]:
        gc, gr, grc, grr = grads(loss_type, beta, eps, c, r, rc, rr)
        assert (gc < 0).all() and (gr > 0).all(), loss_type  # raise chosen, lower rejected
        assert (grc > 0).all() and (grr < 0).all(), loss_type
        torch.testing.assert_close(gc, -gr)
    # DPO's gradient weight is sigmoid(-beta h): largest where the implicit reward orders the pair wrongly
    gc, _, _, _ = grads("sigmoid", beta, 0.0, c, r, rc, rr)
    torch.testing.assert_close(gc, torch.tensor([-beta / (1 + math.exp(beta * x)) for x in h.tolist()],
                                                dtype=torch.float64))
    # conservative DPO stops at the finite margin beta h = log((1 - eps) / eps), DPO never does
    eps = 0.1
    h_star = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    gc, *_ = grads("sigmoid", beta, eps, h_star, zero, zero, zero)
    assert gc.abs().item() < 1e-12
    gc, *_ = grads("sigmoid", beta, 0.0, h_star, zero, zero, zero)
    assert gc.item() < -1e-3
    # IPO regresses h onto 1/(2 beta): pushes up below the target, down above it; hinge is flat beyond 1/beta
    for target_offset, sign in [(-1.0, -1), (1.0, 1)]:
        h0 = torch.tensor([1 / (2 * beta) + target_offset], dtype=torch.float64)
        gc, *_ = grads("ipo", beta, 0.0, h0, zero, zero, zero)
        assert gc.item() * sign > 0
    gc, *_ = grads("hinge", beta, 0.0, torch.tensor([1 / beta + 1], dtype=torch.float64), zero, zero, zero)
    assert gc.item() == 0


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def test_dpo_and_reward_model_read_pairs_alike(tmp_path):
    """One parser per format (harness.py): dpo.py and reward_model.py split and tokenise the same rows identically,
    including an implicit prompt with a double space before the responses."""
    import reward_model as rm

    tok = toy_task.build_tokenizer()
    implicit = [{"chosen": "the movie was  good .", "rejected": "the movie was  bad ."},
                {"chosen": "honestly the cafe was great !", "rejected": "honestly the cafe was not great ."}]
    explicit = [{"prompt": "the phone was", "chosen": " very good .", "rejected": " bad ."}]
    for name, rows in (("implicit.jsonl", implicit), ("explicit.jsonl", explicit)):  # one format per file
        loaded = harness.load_rows(write_jsonl(tmp_path / name, rows), "--dataset")
        pairs = dpo.build_dataset(parsed_pairs(loaded), tok, make(dpo.Config, max_length=64))[0]
        ranked = rm.build_dataset([(where, rm.parse_row(row, where, "pairwise")) for where, row in loaded], tok,
                                  make(rm.Config, max_length=64))[0]
        assert len(pairs) == len(ranked) == len(rows)
        for (prompt_ids, chosen_ids, rejected_ids), ex in zip(pairs, ranked):
            assert ex["prompt_ids"] == prompt_ids and ex["completions"] == [chosen_ids, rejected_ids]
        if rows is implicit:
            assert tok.decode(pairs[0][0]) == "<bos> the movie was" and tok.decode(pairs[0][1]) == "good . <eos>"


def parsed_pairs(loaded):
    """(where, (prompt, chosen, rejected)) of load_rows' rows, as dpo.main passes them to build_dataset."""
    return [(where, harness.parse_preference_row(row, where)) for where, row in loaded]


def pairs_of(path, tok, cfg):
    return dpo.build_dataset(parsed_pairs(harness.load_rows(path, "--dataset")), tok, cfg)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_formats_tokenise_alike_and_bad_rows_name_file_line_field(tmp_path):
    from conftest import toy_tokenizer_with_chat

    tok = toy_tokenizer_with_chat()
    cfg = make(dpo.Config, max_length=64)
    explicit = {"prompt": "the phone was", "chosen": " very good .", "rejected": " bad ."}
    implicit = {"chosen": "the phone was very good .", "rejected": "the phone was bad ."}
    examples, counts = pairs_of(write_jsonl(tmp_path / "p.jsonl", [explicit, {**explicit, "rejected": " very good ."}]),
                                tok, cfg)
    assert counts == {"truncated": 0, "dropped": 0, "identical": 1} and len(examples) == 1
    assert pairs_of(write_jsonl(tmp_path / "i.jsonl", [implicit]), tok, cfg)[0] == examples  # one format per file
    prompt_ids, chosen_ids, rejected_ids = examples[0]
    assert tok.decode(prompt_ids) == "<bos> the phone was" and chosen_ids[-1] == tok.eos_token_id
    assert tok.decode(chosen_ids[:-1]) == "very good ." and tok.decode(rejected_ids[:-1]) == "bad ."
    # conversational, explicit and implicit prompt: the chat template renders the prompt
    user = [{"role": "user", "content": "the phone was"}]
    conv = {"prompt": user, "chosen": [{"role": "assistant", "content": "very good ."}],
            "rejected": [{"role": "assistant", "content": "bad ."}]}
    conv_implicit = {"chosen": user + conv["chosen"], "rejected": user + conv["rejected"]}
    examples = pairs_of(write_jsonl(tmp_path / "c.jsonl", [conv]), tok, cfg)[0]
    assert pairs_of(write_jsonl(tmp_path / "ci.jsonl", [conv_implicit]), tok, cfg)[0] == examples
    assert tok.decode(examples[0][0]) == "user : the phone was <eos> assistant :"
    assert examples[0][1][:-1] == chosen_ids[:-1]
    # truncation policy
    examples, counts = pairs_of(write_jsonl(tmp_path / "t.jsonl", [explicit]), tok, make(dpo.Config, max_length=6))
    assert counts["truncated"] == 1 and all(len(examples[0][0]) + len(x) <= 6 for x in examples[0][1:])
    with pytest.raises(ValueError, match="no usable pair"):
        pairs_of(write_jsonl(tmp_path / "d.jsonl", [explicit]), tok, make(dpo.Config, max_length=6, truncation="drop"))
    # each bad row after a good row of its format (a file holds one format), or alone where none has its keys
    bad = [([], {"prompt": "a", "chosen": " good ."}, r"b.jsonl:1: missing field 'rejected'"),
           ([explicit], {**explicit, "chosen": " "}, r"b.jsonl:2: field 'chosen' is empty"),
           ([explicit], {**explicit, "prompt": 3}, r"b.jsonl:2: field 'prompt' must be a string or a list of messages"),
           ([explicit], {**explicit, "rejected": 3}, r"b.jsonl:2: field 'rejected' must be a string or a list of"),
           ([conv], {**conv, "chosen": user}, r"b.jsonl:2: field 'chosen' must end with a non-empty assistant message"),
           ([conv], {**conv, "rejected": ["bad ."]}, r"b.jsonl:2: field 'rejected' must be a non-empty list of \{"),
           ([explicit], conv, r"b.jsonl:2: a conversational \{prompt, chosen, rejected\} row, but .*b.jsonl:1 is a "
                              r"text \{prompt, chosen, rejected\} row")]
    for before, row, message in bad:
        with pytest.raises(harness.InputError, match=message):
            pairs_of(write_jsonl(tmp_path / "b.jsonl", before + [row]), tok, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs: response tokens only, one concatenated forward pass
# ---------------------------------------------------------------------------------------------------------------------
def naive_sequence_logp(model, prompt_ids, response_ids) -> float:
    """sum_t log p(response_t | prompt, response_<t) from one unpadded sequence, with an explicit loop."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(prompt_ids) + t - 1, tok].item() for t, tok in enumerate(response_ids))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # absolute positions (gpt2) and rotary (llama)
def test_concatenated_logps_mask_prompt_and_padding(tiny_checkpoints, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]).eval()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size

    def ids(n):
        return torch.randint(5, V, (n,), generator=g).tolist()

    examples = [(ids(1), ids(2), ids(6)), (ids(5), ids(4), ids(1)), (ids(3), ids(7), ids(3))]
    with torch.no_grad():
        results = []
        for pad in [0, 3]:  # the pad id must not matter: padding is masked by length
            batch = dpo.collate_pairs(examples, pad, "cpu")
            results.append(dpo.concatenated_logps(model, *batch))
        want_c = [naive_sequence_logp(model, p, c) for p, c, _ in examples]
        want_r = [naive_sequence_logp(model, p, r) for p, _, r in examples]
    for chosen_logps, rejected_logps in results:
        assert chosen_logps.tolist() == pytest.approx(want_c, abs=1e-4)
        assert rejected_logps.tolist() == pytest.approx(want_r, abs=1e-4)
    # the prompt contributes nothing: changing a response token changes the sum, the mask counts only responses
    input_ids, attention_mask, response_mask, P = dpo.collate_pairs(examples, 0, "cpu")
    assert response_mask.sum().item() == sum(len(c) + len(r) for _, c, r in examples)
    assert (attention_mask[:, P:] == response_mask).all()


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------
def toy_subsets(tmp_path, n_train=64, n_eval=32, n_prompts=4):
    def head(name, n):
        with open(os.path.join("data/toy", name)) as f:
            return write_jsonl(tmp_path / name, [json.loads(next(f)) for _ in range(n)])

    return head("preferences_train.jsonl", n_train), head("preferences_eval.jsonl", n_eval), \
        head("prompts_eval.jsonl", n_prompts)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_toy_end_to_end_learns_and_precomputed_reference_matches(toy_sft_checkpoint, tmp_path):
    train, evals, prompts = toy_subsets(tmp_path)
    runs = {}
    for precompute in [False, True]:
        out = str(tmp_path / f"dpo_{precompute}")
        cfg = make(dpo.Config, model_name_or_path=toy_sft_checkpoint, dataset=train, eval_dataset=evals,
                   eval_prompts=prompts, output_dir=out, per_device_batch_size=16, num_epochs=4, learning_rate=1e-3,
                   warmup_ratio=0, lr_scheduler="constant", log_every=1, eval_every=8, eval_samples_per_prompt=2,
                   eval_reward_fn=("toy_task:gold_reward",), reward_model_path="none",
                   precompute_ref_log_probs=precompute)
        runs[precompute] = (dpo.main(cfg), read_metrics(out))
    final, metrics = runs[False]
    train_logs = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_logs] == list(range(1, 17))
    assert train_logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert train_logs[-1]["loss"] < 0.5 and train_logs[-1]["rewards/accuracies"] > 0.8  # it fits the training pairs
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "pairs_per_s"]:
        assert math.isfinite(train_logs[-1][key])
    for key in ["gold_reward_mean", "gold_reward_std", "kl_to_ref", "eos_rate", "num_samples", "accuracy",
                "start_gold_reward_mean", "start_gold_reward_std", "start_kl_to_ref", "eval_loss"]:
        assert math.isfinite(final[key]), key
    assert final["num_samples"] == 8 and final["start_kl_to_ref"] == pytest.approx(0, abs=1e-4)
    assert final["kl_to_ref"] > 0.01
    assert final["eval_rewards/accuracies_sem"] == pytest.approx(math.sqrt(final["accuracy"] * (1 - final["accuracy"])
                                                                            / 32))  # 32 held-out pairs
    with open(os.path.join(tmp_path, "dpo_False", "eval.json")) as f:
        saved = json.load(f)
    assert saved["accuracy"] == final["accuracy"]
    assert "proxy_reward_mean" in saved and saved["proxy_reward_mean"] is None  # no reward model: kept, as null
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "dpo_False"))
    AutoTokenizer.from_pretrained(str(tmp_path / "dpo_False"))
    # the reference log-probs computed once before training give the same run as computing them at every step
    final_pre, metrics_pre = runs[True]
    for a, b in zip(metrics, metrics_pre):
        for k in ["loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"]:
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a["step"], k)
    assert final_pre["kl_to_ref"] == pytest.approx(final["kl_to_ref"], abs=1e-3)


def test_missing_sft_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(harness.InputError, match="--model_name_or_path runs/nope: not found; "
                                                 "run `python sft.py` first"):
        dpo.main(make(dpo.Config, model_name_or_path="runs/nope", output_dir=str(tmp_path / "x")))


def test_tiny_architectures_and_formats(tiny_checkpoints, tmp_path):
    """Each architecture with one data format: plain text (gpt2: BPE, no pad token, bos == eos), conversational with
    and without explicit prompt, implicit-prompt text; each loss variant once."""
    with open("data/toy/preferences_train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    user = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    assistant = lambda c: [{"role": "assistant", "content": c.strip()}]  # noqa: E731
    formats = {
        "text": rows,
        "conversational": [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                            "rejected": assistant(r["rejected"])} for r in rows],
        "conversational_implicit": [{"chosen": user(r["prompt"]) + assistant(r["chosen"]),
                                     "rejected": user(r["prompt"]) + assistant(r["rejected"])} for r in rows],
        "text_implicit": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows],
    }
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": toy_task.PROMPTS[0]}])
    plan = [("gpt2", "text", "sigmoid", 0.1, 0.0), ("llama", "conversational", "ipo", 0.0, 1.0),
            ("qwen2", "conversational_implicit", "hinge", 0.0, 0.0), ("gpt_neox", "text_implicit", "robust", 0.1, 0.0)]
    # at step 1 the policy is the reference, h = 0: each variant's loss is known (beta = 0.1)
    at_zero = {"sigmoid": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "hinge": 1.0, "robust": math.log(2)}
    for arch, fmt, loss_type, eps, rpo_alpha in plan:
        data = write_jsonl(tmp_path / f"{fmt}.jsonl", formats[fmt])
        out = str(tmp_path / arch)
        final = dpo.main(make(  # not toy models: max_length within their 128 positions
            dpo.Config, model_name_or_path=tiny_checkpoints[arch], dataset=data, eval_dataset=data,
            eval_prompts=prompts, output_dir=out, per_device_batch_size=4, num_epochs=1, learning_rate=1e-3,
            log_every=1, max_length=64,
            loss_type=loss_type, label_smoothing=eps, rpo_alpha=rpo_alpha, eval_samples_per_prompt=2, max_new_tokens=6,
            eval_reward_fn=("toy_task:gold_reward",), reward_model_path="none"))
        logs = read_metrics(out)
        assert [m["step"] for m in logs if "loss" in m] == [1, 2], arch
        assert all(math.isfinite(v) for m in logs for v in m.values() if isinstance(v, float)), arch
        first = logs[0]
        assert first["rewards/margins"] == pytest.approx(0, abs=1e-6) and first["rewards/accuracies"] == 0, arch
        if rpo_alpha:  # plus the chosen responses' NLL per token, between its sum / longest and sum / shortest
            tok = AutoTokenizer.from_pretrained(tiny_checkpoints[arch])
            lengths = [len(c) for _, c, _ in pairs_of(data, tok, make(dpo.Config, max_length=64))[0]]
            nll = -first["logps/chosen"]
            assert nll / max(lengths) <= (first["loss"] - at_zero[loss_type]) / rpo_alpha <= nll / min(lengths)
        else:
            assert first["loss"] == pytest.approx(at_zero[loss_type], rel=1e-5), arch
        assert math.isfinite(final["kl_to_ref"]) and 0 <= final["accuracy"] <= 1, arch
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert reloaded.config.model_type == arch


def test_two_processes_match_one(toy_sft_checkpoint, tmp_path):
    """2 processes (FSDP2, gloo) with precomputed reference log-probs, a sampling evaluation before training and a
    held-out evaluation between steps (no-grad forwards of the policy; 17 pairs: ranks get unequal shares), against 1
    process computing the reference on the fly, on the same global batch of 16 pairs."""
    train, evals, prompts = toy_subsets(tmp_path, n_train=32, n_eval=17, n_prompts=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out2 = str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dpo.py",
                    "--model_name_or_path", toy_sft_checkpoint, "--dataset", train, "--eval_dataset", evals,
                    "--eval_prompts", prompts, "--eval_samples_per_prompt", "1", "--max_new_tokens", "8",
                    "--num_epochs", "2", "--learning_rate", "1e-3", "--log_every", "1", "--eval_every", "2",
                    "--reward_model_path", "none", "--rpo_alpha", "0.5", "--precompute_ref_log_probs",
                    "--per_device_batch_size", "8", "--output_dir", out2], check=True, env=env, timeout=240)
    with open(os.path.join(out2, "eval.json")) as f:
        final2 = json.load(f)
    assert final2["num_samples"] == 3 and math.isfinite(final2["kl_to_ref"]) and final2["start_kl_to_ref"] == 0
    # one process, the same global batch of 16 pairs: in one micro-batch, and in two accumulated ones
    outs = {"one": str(tmp_path / "one"), "accumulated": str(tmp_path / "accumulated")}
    for name, (batch_size, accumulation) in {"one": (16, 1), "accumulated": (8, 2)}.items():
        dpo.main(make(dpo.Config, model_name_or_path=toy_sft_checkpoint, dataset=train, eval_dataset=evals,
                            eval_prompts="none", num_epochs=2, learning_rate=1e-3, log_every=1, eval_every=2,
                            reward_model_path="none", rpo_alpha=0.5, per_device_batch_size=batch_size,
                            gradient_accumulation_steps=accumulation, output_dir=outs[name]))
    one = read_metrics(outs["one"])
    w1 = AutoModelForCausalLM.from_pretrained(outs["one"]).state_dict()
    for other in [out2, outs["accumulated"]]:
        two = read_metrics(other)
        assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 2, 3, 4, 4]
        for a, b in zip(one, two):
            for k, v in a.items():
                # at step 1 policy == reference: every implicit reward is 0 up to rounding, which the strict
                # comparison of rewards/accuracies counts (precomputed log-probs round differently)
                if k in ("pairs_per_s", "step", "epoch", "lr") or (k == "rewards/accuracies" and a["step"] == 1):
                    continue
                assert b[k] == pytest.approx(v, rel=1e-3, abs=1e-4), (other, a["step"], k)
        w2 = AutoModelForCausalLM.from_pretrained(other).state_dict()
        for k in w1:
            torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
