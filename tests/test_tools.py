"""grpo.py's multi-turn rollouts with tools, tested as a specification: token in, token out (the ids the policy sampled
are the ids trained on, across turns, on four architectures), only sampled tokens in the loss and the KL, the tool
message as the chat template renders it, a tool's error as the message the model reads, the turn limit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, ROOT, chatml_tokenizer, head_jsonl, make, tiny_config

import common
import harness
import grpo

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>' + m['content'] + '</tool_response><|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS_PY = '''
def weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name
    """
    if city == "Nowhere":
        raise ValueError("no such city")
    return "sunny in " + city
'''


@pytest.fixture(scope="module")
def tool_models(tmp_path_factory):
    """{arch: path} of tiny random models whose ChatML template renders tools and tool messages (Qwen-style)."""
    from transformers import AutoModelForCausalLM

    root, paths = tmp_path_factory.mktemp("tools"), {}
    for arch in ARCHS:
        tok = chatml_tokenizer("missing")
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        tok.chat_template = TOOLS_TEMPLATE
        config = tiny_config(arch, len(tok), tok)
        setattr(config, "n_positions" if arch == "gpt2" else "max_position_embeddings", 512)  # room for the turns
        torch.manual_seed(0)
        paths[arch] = str(root / arch)
        AutoModelForCausalLM.from_config(config).save_pretrained(paths[arch])
        tok.save_pretrained(paths[arch])
    return paths


def char_ids(tok, text: str) -> list[int]:
    """text as one token per character: not the tokenizer's own encoding, so that any re-tokenisation would show."""
    return [tok.convert_tokens_to_ids(t) for c in text for t in tok.tokenize(c)]


class ScriptedGenerate:
    """Stands in for common.generate: each row's turn is chosen from its context (how many tool messages it holds),
    so every turn's sampled ids are known exactly; records the turns it returned."""

    def __init__(self, tok, turns: list[list[int]]):
        self.tok, self.turns, self.returned = tok, turns, []
        self.marker = tok("<tool_response>", add_special_tokens=False)["input_ids"]

    def __call__(self, model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, *args, **kw):
        rows = []
        for ids in input_ids.tolist():
            n = sum(ids[i:i + len(self.marker)] == self.marker for i in range(len(ids)))  # tool messages so far
            rows.append(self.turns[min(n, len(self.turns) - 1)][:max_new_tokens])
        self.returned.append(rows)
        responses = common.right_pad(rows, pad_token_id)
        return responses, common.right_pad([[1] * len(r) for r in rows], 0)


def grpo_config(tmp_path, policy, **kw):
    (tmp_path / "tools.py").write_text(TOOLS_PY)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for city in ("Paris", "Rome"):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Weather in {city}?"}]}) + "\n")
    (tmp_path / "reward.py").write_text("def sunny(completions, **kwargs):\n"
                                        "    return [float('sunny' in c[0]['content']) for c in completions]\n")
    options = dict(model_name_or_path=policy, prompts=str(prompts), reward_fn=(f"{tmp_path}/reward.py:sunny",),
                   tools=(f"{tmp_path}/tools.py:weather",), rollout_batch_size=2, num_samples_per_prompt=2,
                   num_minibatches=1, num_iterations=1, max_new_tokens=240, max_prompt_length=60, eval_prompts="none",
                   kl_coef=0.1, output_dir=str(tmp_path / "out"))
    return make(grpo.Config, **{**options, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_ids_are_the_trained_ids_across_turns_and_only_they_train(arch, tool_models, tmp_path, monkeypatch):
    tok = harness.from_pretrained(__import__("transformers").AutoTokenizer, tool_models[arch], "x")
    call, answer = char_ids(tok, CALL) + [tok.eos_token_id], char_ids(tok, "It is sunny.") + [tok.eos_token_id]
    script = ScriptedGenerate(tok, [call, answer])
    monkeypatch.setattr(common, "generate", script)
    seen, masks = [], []
    logprobs = common.sequence_logprobs
    monkeypatch.setattr(common, "sequence_logprobs", lambda model, ids, mask, P, *a, **k: (
        seen.append((ids.clone(), mask.clone(), P)), logprobs(model, ids, mask, P, *a, **k))[1])
    aggregate = grpo.aggregate_loss
    monkeypatch.setattr(grpo, "aggregate_loss", lambda losses, mask, *a, **k: (masks.append(mask.clone()),
                                                                                aggregate(losses, mask, *a, **k))[1])
    grpo.main(grpo_config(tmp_path, tool_models[arch]))

    # the tool message: what the template renders after the assistant's turn, tokenised on its own
    schema = grpo.load_tools([f"{tmp_path}/tools.py:weather"], set())[1]
    convo = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": CALL}]
    before = tok.apply_chat_template(convo, tools=schema, tokenize=False).rstrip()
    after = tok.apply_chat_template(convo + [{"role": "tool", "content": "sunny in Paris"}], tools=schema,
                                    add_generation_prompt=True, tokenize=False)
    inserted = tok(after[len(before):], add_special_tokens=False)["input_ids"]
    assert tok.decode(inserted).startswith("\n<|im_start|>user\n<tool_response>sunny in Paris")
    assert len(script.returned) == 2  # two turns: the call, then the answer after the tool's message
    ids, mask, P = seen[0]  # the rollout policy's log-probs; the reference's and the training's follow
    rows = {(tuple(i), tuple(m)) for i, m in zip(ids.tolist(), mask.tolist())}
    assert len(seen) >= 3 and all(s[2] == P and {(tuple(i), tuple(m)) for i, m in zip(s[0].tolist(), s[1].tolist())}
                                  <= rows for s in seen)  # old, reference and new log-probs: the same ids
    train_ids, train_mask, _ = seen[2]  # the first training forward: the rows of the first minibatch, shuffled
    for row in range(train_ids.size(0)):
        response = train_ids[row, P:][train_mask[row, P:].bool()].tolist()
        tool_ids = inserted  # every row's script calls for Paris
        assert response == call + tool_ids + answer  # token in, token out: no re-encoding of the conversation
        loss_mask = masks[0][row].tolist()  # the loss of that same forward
        assert loss_mask == [1] * len(call) + [0] * len(tool_ids) + [1] * len(answer) + \
            [0] * (len(loss_mask) - len(response))  # the tool message is context, not loss
    assert json.load(open(tmp_path / "out" / "eval.json"))["script"] == "grpo.py"
    log = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert log[-1]["tools/calls"] == 1.0 and log[-1]["reward"] == 1.0  # every response called once, saw "sunny"


def test_tool_errors_and_the_turn_limit(tool_models, tmp_path, monkeypatch):
    tok = harness.from_pretrained(__import__("transformers").AutoTokenizer, tool_models["qwen2"], "x")
    nowhere = char_ids(tok, CALL.replace("Paris", "Nowhere")) + [tok.eos_token_id]
    script = ScriptedGenerate(tok, [nowhere])  # calls on every turn
    monkeypatch.setattr(common, "generate", script)
    cfg = grpo_config(tmp_path, tool_models["qwen2"], max_tool_calls=2, tool_format="chat", max_new_tokens=440)
    tools, schemas = grpo.load_tools(cfg.tools, set())
    prompt = [{"role": "user", "content": "Weather in Nowhere?"}]
    ids = [harness.render_prompt(prompt, tok, tools=schemas)]
    responses, response_mask, sampled_mask, calls = grpo.tool_rollout(
        None, tok, [prompt], ids, [{}], tools, schemas, cfg, None, torch.device("cpu"), None)
    text = tok.decode(responses[0][response_mask[0].bool()])
    assert calls == [2] and len(script.returned) == 3  # two calls answered, the third turn's call is not run
    assert text.count("<tool_response>error: ValueError: no such city</tool_response>") == 2
    assert sampled_mask[0].sum().item() == 3 * len(nowhere)  # the three sampled turns; the rest is tool messages
    assert text.endswith("</tool_call><|im_end|>")


def test_run_tool_call_formats_and_bad_calls():
    tools = {"lookup": lambda product, rating: f"{product}: {rating}"}
    assert grpo.run_tool_call("a review", tools, "simple", {}) is None
    assert grpo.run_tool_call(" <call> lookup phone </call>", tools, "simple", {"rating": "good"}) == "phone: good"
    assert grpo.run_tool_call('<tool_call>{"name": "lookup", "arguments": {"product": "pen"}}</tool_call>', tools,
                              "chat", {"rating": "bad", "other": 1}) == "pen: bad"  # hidden column from the row
    assert grpo.run_tool_call("<tool_call>{not json}</tool_call>", tools, "chat", {}).startswith(
        'error: a tool call is {"name": ..., "arguments": {...}} in JSON')
    assert grpo.run_tool_call('<tool_call>{"name": "shop", "arguments": {}}</tool_call>', tools, "chat", {}) == \
        "error: no tool 'shop' (the tools: lookup)"
    assert grpo.run_tool_call(" <call> lookup </call>", tools, "simple", {}).startswith("error: TypeError")


def test_tools_are_checked_at_start(tool_models, tmp_path):
    with pytest.raises(harness.InputError, match="--tools nope.py:f: no such file nope.py"):
        grpo.main(grpo_config(tmp_path, tool_models["qwen2"], tools=("nope.py:f",)))
    (tmp_path / "bare.py").write_text("def f(x):\n    return x\n")
    with pytest.raises(harness.InputError, match="--tools f: "):  # no type hints, no docstring: no schema
        grpo.main(grpo_config(tmp_path, tool_models["qwen2"], tools=(f"{tmp_path}/bare.py:f",),
                              output_dir=str(tmp_path / "o2")))


def test_two_processes_match_one_process_on_the_tools_toy(toy_tools_sft_checkpoint, tmp_path):
    """torchrun (FSDP2, gloo) with tools equals one process on the same global batch. top_k=1 samples the argmax, so
    both roll out the same calls and results although each rank has its own seed; REINFORCE++ (no group baseline:
    the identical responses of a group do not cancel) whitens over both ranks."""
    from transformers import AutoModelForCausalLM

    options = dict(model_name_or_path=toy_tools_sft_checkpoint, advantage_estimator="reinforce_pp", top_k=1,
                   rollout_batch_size=4, num_samples_per_prompt=2, num_iterations=2, num_minibatches=1, kl_coef=0.1,
                   eval_samples_per_prompt=1, eval_every=100, log_every=1,
                   eval_prompts=head_jsonl("data/toy/tools/prompts_eval.jsonl", tmp_path / "prompts.jsonl", 4))
    grpo.main(make(grpo.Config, **options, output_dir=str(tmp_path / "one")))
    args = [f"--{k}={v}" for k, v in options.items()] + [f"--output_dir={tmp_path / 'two'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "grpo.py", *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {n: [json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two")}
    train = {n: [r for r in rs if "reward" in r] for n, rs in rows.items()}
    assert len(train["one"]) == len(train["two"]) == 2 and train["one"][0]["tools/calls"] > 0  # calls were made
    for a, b in zip(train["one"], train["two"]):
        for key in ("reward", "tools/calls", "kl_seq", "loss/policy", "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    w0, w1, w2 = (AutoModelForCausalLM.from_pretrained(d).state_dict()
                  for d in (toy_tools_sft_checkpoint, tmp_path / "one", tmp_path / "two"))
    update = max((w1[n] - w0[n]).abs().max().item() for n in w0)
    assert update > 0 and max((w2[n] - w1[n]).abs().max().item() for n in w0) < 0.01 * update
