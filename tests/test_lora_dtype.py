"""LoRA (peft) and weight dtypes, on the tiny random GPT-2, Llama, Qwen2 and GPT-NeoX configs: a LoRA model starts as
its base, the adapter-disabled reference is the base exactly, training changes only the adapter (and a trained score
head), the merged checkpoint computes what the adapter model computes, later stages take adapter outputs, bf16
weights train, and LoRA under torchrun matches one process."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make, ARCHS, ROOT, head_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import dpo
import harness
import ppo
import reward_model
import sft

LORA = dict(lora_r=4, lora_alpha=8.0)


def lora_config(**kw) -> harness.ModelArgs:
    return harness.ModelArgs(**{**LORA, **kw})


def batch_of(tok, texts=("the phone was very good .", "honestly the movie was bad", "this book is")):
    ids = [tok(t)["input_ids"] for t in texts]
    input_ids = common.right_pad(ids, tok.pad_token_id or 0)
    mask = common.right_pad([[1] * len(i) for i in ids], 0)
    return input_ids, mask


@pytest.mark.parametrize("lora_r", [0, 4])
def test_activation_checkpointing_gives_the_same_gradients(lora_r, tiny_checkpoints):
    """--gradient_checkpointing recomputes the blocks in the backward: the same gradients, through a frozen base too."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])
    input_ids, mask = batch_of(tok)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = harness.prepare_trainable(AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]),
                                          lora_config(lora_r=lora_r, gradient_checkpointing=checkpointing)).train()
        common.sequence_logprobs(model, input_ids, mask, 2).sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1]) and len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_starts_as_the_base_and_the_disabled_adapter_is_the_base_exactly(arch, tiny_checkpoints):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[arch])
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]).eval()
    lora = harness.prepare_trainable(AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]), lora_config()).eval()
    input_ids, mask = batch_of(tok)
    labels = torch.where(mask.bool(), input_ids, -100)
    with torch.no_grad():
        assert lora(input_ids=input_ids, attention_mask=mask, labels=labels).loss == \
            base(input_ids=input_ids, attention_mask=mask, labels=labels).loss  # B = 0: the same function
        trained = [n for n, p in lora.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n in trained)
        for p in lora.parameters():  # move the adapter away from zero: the disabled view must not see it
            if p.requires_grad:
                p.add_(0.1)
        assert not torch.equal(lora(input_ids=input_ids, attention_mask=mask).logits,
                               base(input_ids=input_ids, attention_mask=mask).logits)
        ref = harness.WithoutAdapter(lora)
        P = 2
        assert torch.equal(common.sequence_logprobs(ref, input_ids, mask, P),
                           common.sequence_logprobs(base, input_ids, mask, P))


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_sft_lora_trains_only_the_adapter_and_merged_equals_adapter(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["llama"]
    out = str(tmp_path / "sft")
    data = head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 32)
    sft.main(make(sft.Config, model_name_or_path=ckpt, from_scratch=False, dataset=data, per_device_batch_size=8,
                  max_length=64, max_steps=3, learning_rate=1e-2, output_dir=out, merge_lora=True, **LORA))
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
    base = load_file(os.path.join(ckpt, "model.safetensors"))
    merged_model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    merged = merged_model.state_dict()
    moved = changed(base, merged)
    assert moved and all(k.endswith(("proj.weight",)) for k in moved)  # only adapted linear layers changed
    assert "model.embed_tokens.weight" not in moved and "lm_head.weight" not in moved
    # the adapter on its base computes what the merged checkpoint computes
    from_adapter = harness.from_pretrained(AutoModelForCausalLM, os.path.join(out, "adapter"), "--x").eval()
    tok = AutoTokenizer.from_pretrained(out)
    input_ids, mask = batch_of(tok)
    with torch.no_grad():
        torch.testing.assert_close(from_adapter(input_ids=input_ids, attention_mask=mask).logits,
                                   merged_model(input_ids=input_ids, attention_mask=mask).logits, rtol=1e-5,
                                   atol=1e-5)


@pytest.fixture(scope="module")
def lora_reward_model(toy_sft_checkpoint, tmp_path_factory):
    """reward_model.py with --lora_r on the toy SFT backbone: an adapter folder (adapter + score head, no weights)."""
    root = tmp_path_factory.mktemp("lora_rm")
    out = str(root / "rm")
    reward_model.main(make(
        reward_model.Config, model_name_or_path=toy_sft_checkpoint, output_dir=out, max_steps=3,
        per_device_batch_size=8, dataset=head_jsonl("data/toy/preferences_train.jsonl", root / "p.jsonl", 32),
        eval_dataset=head_jsonl("data/toy/preferences_eval.jsonl", root / "e.jsonl", 8), normalize_samples=8,
        agreement_samples_per_prompt=0, eval_reward_fn=("none",), **LORA))
    return out


@pytest.fixture(scope="module")
def lora_sft(tiny_checkpoints, tmp_path_factory):
    """sft.py with --lora_r and without --merge_lora on the tiny Qwen2: an adapter folder, no merged weights."""
    root = tmp_path_factory.mktemp("lora_sft")
    out = str(root / "sft")
    sft.main(make(sft.Config, model_name_or_path=tiny_checkpoints["qwen2"], from_scratch=False, per_device_batch_size=8,
                  max_length=64, dataset=head_jsonl("data/toy/sft_train.jsonl", root / "t.jsonl", 16), max_steps=1,
                  learning_rate=1e-2, output_dir=out, **LORA))
    return out


def test_reward_model_lora_trains_adapter_and_score_head_and_keeps_normalisation(toy_sft_checkpoint,
                                                                                 lora_reward_model):
    out = lora_reward_model
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= files
    assert "model.safetensors" not in files
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("score" in k for k in adapter) and any("lora_A" in k for k in adapter)
    loaded = harness.from_pretrained(AutoModelForSequenceClassification, out, "--reward_model_path")
    saved = json.load(open(os.path.join(out, "eval.json")))
    assert loaded.config.reward_mean == pytest.approx(saved["reward_mean"]) and saved["reward_mean"] != 0
    sft_weights = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).state_dict()
    for name, p in loaded.state_dict().items():  # the backbone moved only through the merged adapter
        if name.startswith("transformer.wpe") or name.endswith("ln_f.weight"):
            assert torch.equal(p, sft_weights[name]), name


def test_dpo_and_ppo_with_lora_hold_no_reference_copy_and_start_from_a_lora_sft(toy_sft_checkpoint, toy_reward_model,
                                                                               tmp_path, lora_sft):
    # a LoRA SFT output (an adapter directory) is a valid starting point of the later stages
    assert not os.path.exists(os.path.join(lora_sft, "model.safetensors"))
    prefs = head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 16)
    final = dpo.main(make(dpo.Config, model_name_or_path=lora_sft, dataset=prefs, per_device_batch_size=8, max_steps=2,
                          max_length=64, log_every=1, eval_prompts="none", eval_dataset="none",
                          output_dir=str(tmp_path / "dpo"), **LORA))
    assert math.isfinite(final["train_loss"])
    # at the first step the adapter is zero: policy == reference, so every implicit reward is exactly 0
    first = json.loads(open(os.path.join(tmp_path / "dpo", "metrics.jsonl")).readline())
    assert first["step"] == 1 and first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0

    prompts = head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "q.jsonl", 2)
    cfg = make(ppo.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model,
               critic_init="reward_model", rollout_batch_size=4, num_iterations=2, max_new_tokens=5,
               eval_prompts=prompts, eval_samples_per_prompt=1, output_dir=str(tmp_path / "ppo"), merge_lora=True,
               **LORA)
    actor, ref, critic, rm, _, _ = ppo.load_models(cfg, torch.device("cpu"), False)
    assert isinstance(ref, harness.WithoutAdapter) and ref.model is actor  # one backbone fewer
    assert [n for n, p in critic.named_parameters() if p.requires_grad and "lora_" not in n] == \
        ["base_model.model.score.modules_to_save.default.weight"]
    assert not any(p.requires_grad for p in rm.parameters())
    result = ppo.main(cfg)
    assert result["start_kl_to_ref"] == 0 and math.isfinite(result["kl_to_ref"])
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "ppo", "metrics.jsonl"))]
    assert [r["objective/kl"] for r in rows if "objective/kl" in r][0] == 0  # the adapter starts at zero
    merged = load_file(os.path.join(tmp_path / "ppo", "model.safetensors"))
    start = load_file(os.path.join(toy_sft_checkpoint, "model.safetensors"))
    assert changed(start, merged) and not any("wte" in k or "wpe" in k for k in changed(start, merged))


def counting_optimised(monkeypatch) -> list:
    """The number of weights of every optimiser the scripts create (harness.optimizer), in order."""
    counts, original = [], harness.optimizer

    def recording(params, *args, **kwargs):
        opt, scheduler = original(params, *args, **kwargs)
        counts.append(sum(p.numel() for group in opt.param_groups for p in group["params"]))
        return opt, scheduler

    monkeypatch.setattr(harness, "optimizer", recording)
    return counts


@pytest.mark.parametrize("script", ["ppo", "grpo", "dpo"])
def test_a_lora_sft_output_without_lora_r_trains_every_weight(script, lora_sft, tmp_path, monkeypatch):
    """The adapter folder of a LoRA SFT as --model_name_or_path of a later stage without --lora_r: the adapter is merged
    into its base and the whole model trains (the optimiser holds every weight, not an empty list; the weights that
    LoRA never adapts move too) and is saved whole."""
    start = harness.from_pretrained(AutoModelForCausalLM, lora_sft, "--model_name_or_path")
    base = AutoModelForCausalLM.from_pretrained(json.load(open(os.path.join(lora_sft, "adapter_config.json")))[
        "base_model_name_or_path"])
    assert changed(base.state_dict(), start.state_dict())  # the SFT adapter is in the starting weights
    counts, out = counting_optimised(monkeypatch), str(tmp_path / script)
    prompts = head_jsonl("data/toy/prompts_train.jsonl", tmp_path / "q.jsonl", 4)
    (tmp_path / "length.py").write_text("def length(completions, **kwargs):\n"
                                        "    return [float(len(c)) for c in completions]\n")
    # a reward that tells the random model's responses apart: GRPO's group advantages are not all 0
    rl = dict(model_name_or_path=lora_sft, prompts=prompts, reward_fn=(f"{tmp_path / 'length.py'}:length",),
              reward_model_path="none", rollout_batch_size=2, num_iterations=1, max_new_tokens=5, max_prompt_length=32,
              num_minibatches=1, update_epochs=1, learning_rate=1e-3, output_dir=out)
    if script == "ppo":
        ppo.main(make(ppo.Config, **rl))
    elif script == "grpo":
        import grpo

        grpo.main(make(grpo.Config, **rl, num_samples_per_prompt=2))
    else:
        dpo.main(make(dpo.Config, model_name_or_path=lora_sft, per_device_batch_size=8, max_steps=1, max_length=64,
                      dataset=head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 8),
                      learning_rate=1e-3, output_dir=out))
    assert counts[0] == sum(p.numel() for p in start.parameters())  # the policy's optimiser: every weight
    assert "adapter_config.json" not in os.listdir(out)
    saved = load_file(os.path.join(out, "model.safetensors"))
    moved = changed(start.state_dict(), saved)
    assert {"model.embed_tokens.weight", "model.norm.weight"} & moved  # beyond LoRA's linear layers of the blocks


@pytest.mark.parametrize("script", ["ppo", "grpo"])
def test_a_lora_reward_model_is_accepted_as_reward_model_path(script, lora_reward_model, toy_sft_checkpoint, tmp_path):
    import grpo

    module = {"ppo": ppo, "grpo": grpo}[script]
    prompts = head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "q.jsonl", 2)
    result = module.main(make(module.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=lora_reward_model,
                              rollout_batch_size=2, num_iterations=1, max_new_tokens=5, num_minibatches=1,
                              update_epochs=1, eval_prompts=prompts, eval_samples_per_prompt=1, eval_every=100,
                              output_dir=str(tmp_path / script), **({"num_samples_per_prompt": 2} if script == "grpo"
                                                                     else {})))
    train = [json.loads(line) for line in open(tmp_path / script / "metrics.jsonl")]
    score = "objective/scores" if script == "ppo" else "rewards/reward_model/mean"
    assert [r for r in train if score in r] and all(math.isfinite(r[score]) for r in train if score in r)
    assert math.isfinite(result["proxy_reward_mean"]) and math.isfinite(result["start_proxy_reward_mean"])
    # the reward model the script loads is the adapter on its base (peft's own, unmerged), with its normalisation
    import peft

    cfg = make(module.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=lora_reward_model)
    models = module.load_models(cfg, torch.device("cpu"), *([False] if script == "grpo" else []), False)
    rm = models[3 if script == "ppo" else 2]
    unmerged = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        toy_sft_checkpoint, num_labels=1), lora_reward_model).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(lora_reward_model)("the phone was very good .")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(rm(input_ids=ids).logits, unmerged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    saved = json.load(open(os.path.join(lora_reward_model, "eval.json")))
    assert (rm.config.reward_mean, rm.config.reward_std) == pytest.approx((saved["reward_mean"], saved["reward_std"]))


def test_lora_resume_is_exact(toy_sft_checkpoint, tmp_path):
    """Checkpoints of a LoRA run hold the adapter and its optimiser (the frozen base is reloaded): resuming is exact."""
    options = dict(model_name_or_path=toy_sft_checkpoint, per_device_batch_size=8, max_steps=6, save_every=2,
                   log_every=1, eval_prompts="none", eval_dataset="none", reward_model_path="none", learning_rate=1e-2,
                   dataset=head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 32), **LORA)
    dpo.main(make(dpo.Config, **options, output_dir=str(tmp_path / "a")))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    saved = harness.checkpoints(str(tmp_path / "b"))
    assert sorted(saved) == [2, 4]  # every 2 steps before the last, the newest save_total_limit kept
    ckpt = saved[4]
    shards = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".distcp"))
    base_bytes = os.path.getsize(os.path.join(toy_sft_checkpoint, "model.safetensors"))
    assert shards < base_bytes / 4  # adapter + its AdamW moments, not the base model
    dpo.main(make(dpo.Config, **options, output_dir=str(tmp_path / "b"), resume=True))
    a = load_file(os.path.join(tmp_path / "a", "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path / "b", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_bfloat16_weights_train_with_finite_losses(arch, tiny_checkpoints, tmp_path):
    out = str(tmp_path / arch)
    final = sft.main(make(sft.Config, model_name_or_path=tiny_checkpoints[arch], from_scratch=False, dtype="bfloat16",
                          dataset=head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 16), max_length=64,
                          per_device_batch_size=8, max_steps=2, log_every=1, output_dir=out))
    assert math.isfinite(final["train_loss"])
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}



def test_precision_follows_the_dtype_options(monkeypatch):
    """(trained, frozen, autocast) of --dtype / --frozen_dtype: fp32 on CPU unless asked, no autocast on CPU; on a GPU
    with bf16 auto = fp32 master weights, bf16 frozen models and bf16 autocast; float32 = no autocast anywhere."""
    cpu, cuda, f32, bf16 = torch.device("cpu"), torch.device("cuda"), torch.float32, torch.bfloat16
    expected = {  # (dtype, frozen_dtype): (on CPU, on a bf16 GPU)
        ("auto", "auto"): ((f32, f32, None), (f32, bf16, bf16)),
        ("bfloat16", "auto"): ((bf16, bf16, None), (bf16, bf16, None)),
        ("float32", "auto"): ((f32, f32, None), (f32, f32, None)),
        ("auto", "bfloat16"): ((f32, bf16, None), (f32, bf16, bf16)),
        ("auto", "float32"): ((f32, f32, None), (f32, f32, bf16)),
        ("bfloat16", "float32"): ((bf16, f32, None), (bf16, f32, None)),
    }
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # no GPU needed: no tensor is made
    for (dtype, frozen), (on_cpu, on_gpu) in expected.items():
        args = harness.ModelArgs(dtype=dtype, frozen_dtype=frozen)
        assert harness.precision(args, cpu) == on_cpu and harness.precision(args, cuda) == on_gpu, (dtype, frozen)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an old GPU: fp32, no autocast
    assert harness.precision(harness.ModelArgs(), cuda) == (f32, f32, None)


def test_lora_and_dtype_options_are_checked(tmp_path, tiny_checkpoints):
    with pytest.raises(harness.InputError, match="--merge_lora needs --lora_r > 0"):
        make(sft.Config, merge_lora=True)
    with pytest.raises(harness.InputError, match="--lora_dropout must be 0"):
        make(dpo.Config, lora_r=4, lora_dropout=0.1)
    with pytest.raises(harness.InputError, match="--lora_r with --from_scratch would adapt random weights"):
        sft.main(make(sft.Config, lora_r=4, output_dir=str(tmp_path / "x")))
    if importlib.util.find_spec("flash_attn") is None:  # refused before any model loads or output_dir is claimed
        with pytest.raises(harness.InputError, match="flash_attention_2 needs the `flash-attn` package"):
            sft.main(make(sft.Config, model_name_or_path=tiny_checkpoints["llama"],
                          attn_implementation="flash_attention_2", output_dir=str(tmp_path / "fa")))
        assert not os.path.exists(tmp_path / "fa")


def test_torchrun_two_processes_with_lora_match_one_process(tiny_checkpoints, tmp_path):
    data = head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 32)
    options = dict(model_name_or_path=tiny_checkpoints["llama"], from_scratch=False, dataset=data, max_length=64,
                   per_device_batch_size=8, max_steps=3, log_every=1, learning_rate=1e-2, **LORA)
    sft.main(make(sft.Config, **options, output_dir=str(tmp_path / "one"), gradient_accumulation_steps=2))
    args = [f"--{k}={v}" for k, v in options.items()]  # --from_scratch=False: bool | None takes a value
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "sft.py", *args, "--per_device_batch_size=8", "--output_dir", str(tmp_path / "two")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(line)["loss"] for line in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert two == pytest.approx(one, rel=1e-4)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_grpo_with_lora_uses_the_policy_without_its_adapter_as_reference(toy_sft_checkpoint, toy_reward_model,
                                                                          tmp_path):
    import grpo

    cfg = make(grpo.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model,
               rollout_batch_size=2, num_samples_per_prompt=2, num_minibatches=1, num_iterations=2, max_new_tokens=5,
               log_every=1, eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "q.jsonl", 2),
               eval_samples_per_prompt=1, output_dir=str(tmp_path / "grpo"), **LORA)
    for with_ref in (False, True):  # with LoRA the reference is always there, and never a copy
        policy, ref, _, _, _ = grpo.load_models(cfg, torch.device("cpu"), with_ref, False)
        assert isinstance(ref, harness.WithoutAdapter) and ref.model is policy
    result = grpo.main(cfg)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "grpo", "metrics.jsonl"))]
    assert [r["kl"] for r in rows if "kl" in r][0] == 0 and result["start_kl_to_ref"] == 0  # the adapter starts at 0
    assert os.path.exists(os.path.join(tmp_path / "grpo", "adapter_model.safetensors"))
