"""LoRA (peft) and weight dtypes, on the tiny random GPT-2, Llama, Qwen2 and GPT-NeoX configs: a LoRA model starts as
its base, the adapter-disabled reference is the base exactly, training changes only the adapter (and a trained score
head), the merged checkpoint computes what the adapter model computes, later stages take adapter outputs, bf16
weights train, and LoRA under torchrun matches one process."""

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
import ppo
import reward_model
import sft

LORA = dict(lora_r=4, lora_alpha=8.0)


def lora_config(**kw):
    return make(sft.Config, **{**LORA, **kw})


def batch_of(tok, texts=("the phone was very good .", "honestly the movie was bad", "this book is")):
    ids = [tok(t)["input_ids"] for t in texts]
    input_ids = common.right_pad(ids, tok.pad_token_id or 0)
    mask = common.right_pad([[1] * len(i) for i in ids], 0)
    return input_ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_starts_as_the_base_and_the_disabled_adapter_is_the_base_exactly(arch, tiny_checkpoints):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[arch])
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]).eval()
    lora = common.add_lora(AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]), lora_config()).eval()
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
        ref = common.WithoutAdapter(lora)
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
                        max_steps=3, learning_rate=1e-2, output_dir=out, merge_lora=True, **LORA))
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
    base = load_file(os.path.join(ckpt, "model.safetensors"))
    merged_model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    merged = merged_model.state_dict()
    moved = changed(base, merged)
    assert moved and all(k.endswith(("proj.weight",)) for k in moved)  # only adapted linear layers changed
    assert "model.embed_tokens.weight" not in moved and "lm_head.weight" not in moved
    # the adapter on its base computes what the merged checkpoint computes
    from_adapter = common.from_pretrained(AutoModelForCausalLM, os.path.join(out, "adapter"), "--x").eval()
    tok = AutoTokenizer.from_pretrained(out)
    input_ids, mask = batch_of(tok)
    with torch.no_grad():
        torch.testing.assert_close(from_adapter(input_ids=input_ids, attention_mask=mask).logits,
                                   merged_model(input_ids=input_ids, attention_mask=mask).logits, rtol=1e-5,
                                   atol=1e-5)


def test_reward_model_lora_trains_adapter_and_score_head_and_keeps_normalisation(toy_sft_checkpoint, tmp_path):
    out = str(tmp_path / "rm")
    reward_model.main(make(reward_model.Config, 
        model_name_or_path=toy_sft_checkpoint, output_dir=out, max_steps=3, per_device_batch_size=8,
        dataset=head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 32),
        eval_dataset=head_jsonl("data/toy/preferences_eval.jsonl", tmp_path / "e.jsonl", 8), normalize_samples=8,
        agreement_samples_per_prompt=0, eval_reward_fn=("none",), **LORA))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= files
    assert "model.safetensors" not in files
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("score" in k for k in adapter) and any("lora_A" in k for k in adapter)
    loaded = common.from_pretrained(AutoModelForSequenceClassification, out, "--reward_model_path")
    saved = json.load(open(os.path.join(out, "eval.json")))
    assert loaded.config.reward_mean == pytest.approx(saved["reward_mean"]) and saved["reward_mean"] != 0
    sft_weights = AutoModelForCausalLM.from_pretrained(toy_sft_checkpoint).state_dict()
    for name, p in loaded.state_dict().items():  # the backbone moved only through the merged adapter
        if name.startswith("transformer.wpe") or name.endswith("ln_f.weight"):
            assert torch.equal(p, sft_weights[name]), name


def test_dpo_and_ppo_with_lora_hold_no_reference_copy_and_start_from_a_lora_sft(toy_sft_checkpoint, toy_reward_model,
                                                                               tmp_path, tiny_checkpoints):
    # a LoRA SFT output (an adapter directory) is a valid starting point of the later stages
    sft_out = str(tmp_path / "sft")
    sft.main(make(sft.Config, model_name_or_path=tiny_checkpoints["qwen2"], from_scratch=False, per_device_batch_size=8,
                        dataset=head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 16), max_steps=1,
                        output_dir=sft_out, **LORA))
    assert not os.path.exists(os.path.join(sft_out, "model.safetensors"))
    prefs = head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 16)
    final = dpo.main(make(dpo.Config, model_name_or_path=sft_out, dataset=prefs, per_device_batch_size=8, max_steps=2,
                                log_every=1,
                                eval_prompts="none", eval_dataset="none", output_dir=str(tmp_path / "dpo"), **LORA))
    assert math.isfinite(final["train_loss"])
    # at the first step the adapter is zero: policy == reference, so every implicit reward is exactly 0
    first = json.loads(open(os.path.join(tmp_path / "dpo", "metrics.jsonl")).readline())
    assert first["step"] == 1 and first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0

    prompts = head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "q.jsonl", 2)
    cfg = make(ppo.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model, rollout_batch_size=4,
                     max_steps=2, max_new_tokens=5, eval_prompts=prompts, eval_samples_per_prompt=1,
                     output_dir=str(tmp_path / "ppo"), merge_lora=True, **LORA)
    actor, ref, rm, critic, _, _ = ppo.load_models(cfg, torch.device("cpu"))
    assert isinstance(ref, common.WithoutAdapter) and ref.model is actor  # one backbone fewer
    assert [n for n, p in critic.named_parameters() if p.requires_grad and "lora_" not in n] == \
        ["base_model.model.score.modules_to_save.default.weight"]
    result = ppo.main(cfg)
    assert result["sft_kl_to_ref"] == 0 and math.isfinite(result["kl_to_ref"])
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "ppo", "metrics.jsonl"))]
    assert [r["objective/kl"] for r in rows if "objective/kl" in r][0] == 0  # the adapter starts at zero
    merged = load_file(os.path.join(tmp_path / "ppo", "model.safetensors"))
    start = load_file(os.path.join(toy_sft_checkpoint, "model.safetensors"))
    assert changed(start, merged) and not any("wte" in k or "wpe" in k for k in changed(start, merged))


def test_lora_resume_is_exact(toy_sft_checkpoint, tmp_path):
    """Checkpoints of a LoRA run hold the adapter and its optimiser (the frozen base is reloaded): resuming is exact."""
    options = dict(model_name_or_path=toy_sft_checkpoint, per_device_batch_size=8, max_steps=6, save_every=2,
                   log_every=1, eval_prompts="none", eval_dataset="none", learning_rate=1e-2,
                   dataset=head_jsonl("data/toy/preferences_train.jsonl", tmp_path / "p.jsonl", 32), **LORA)
    dpo.main(make(dpo.Config, **options, output_dir=str(tmp_path / "a")))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpt = common.latest_checkpoint(str(tmp_path / "b"))
    assert ckpt.endswith("step_4")
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
                                dataset=head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 16),
                                per_device_batch_size=8, max_steps=2, log_every=1, output_dir=out))
    assert math.isfinite(final["train_loss"])
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert common.weight_dtypes("auto", torch.device("cpu")) == (torch.float32, torch.float32)  # CPU: fp32 unless
    assert common.weight_dtypes("bfloat16", torch.device("cpu")) == (torch.bfloat16, torch.bfloat16)  # asked
    assert common.weight_dtypes("auto", torch.device("cpu"), "bfloat16") == (torch.float32, torch.bfloat16)


def test_lora_and_dtype_options_are_checked(tmp_path):
    with pytest.raises(common.InputError, match="--merge_lora needs --lora_r > 0"):
        make(sft.Config, merge_lora=True)
    with pytest.raises(common.InputError, match="--lora_dropout must be 0"):
        make(dpo.Config, lora_r=4, lora_dropout=0.1)
    with pytest.raises(common.InputError, match="--lora_r with --from_scratch would adapt random weights"):
        sft.main(make(sft.Config, lora_r=4, output_dir=str(tmp_path / "x")))
    with pytest.raises(common.InputError, match="flash_attention_2 needs the `flash-attn` package"):
        common.check_attn_implementation("flash_attention_2")


def test_torchrun_two_processes_with_lora_match_one_process(tiny_checkpoints, tmp_path):
    data = head_jsonl("data/toy/sft_train.jsonl", tmp_path / "t.jsonl", 32)
    options = dict(model_name_or_path=tiny_checkpoints["llama"], from_scratch=False, dataset=data,
                   per_device_batch_size=8, max_steps=3, log_every=1, learning_rate=1e-2, **LORA)
    sft.main(make(sft.Config, **options, output_dir=str(tmp_path / "one"), gradient_accumulation_steps=2))
    args = [f"--{k}={v}" for k, v in options.items() if k != "from_scratch"] + ["--no-from_scratch"]
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

    cfg = make(grpo.Config, model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model, rollout_batch_size=2,
                      num_samples_per_prompt=2, num_minibatches=1, max_steps=2, max_new_tokens=5, log_every=1,
                      eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "q.jsonl", 2),
                      eval_samples_per_prompt=1, output_dir=str(tmp_path / "grpo"), **LORA)
    policy, ref, _, _, _ = grpo.load_models(cfg, torch.device("cpu"))
    assert isinstance(ref, common.WithoutAdapter) and ref.model is policy
    result = grpo.main(cfg)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "grpo", "metrics.jsonl"))]
    assert [r["kl"] for r in rows if "kl" in r][0] == 0 and result["sft_kl_to_ref"] == 0  # the adapter starts at 0
    assert os.path.exists(os.path.join(tmp_path / "grpo", "adapter_model.safetensors"))
