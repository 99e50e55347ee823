"""Shared fixtures: tiny random checkpoints of several architectures (built here, never downloaded) and a tiny SFT
checkpoint of the toy task. Tests call each script's main(Config(...)) in-process to keep the suite fast."""

import dataclasses
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # scripts default to data/toy/... relative paths
torch.set_num_threads(1)  # small models: threads only add overhead, and CI has 2 cores

import toy_task  # noqa: E402


def make(config_class, **options):
    """A script's Config from flat options, as on the command line (--lora_r, not model.lora_r): each option goes to
    the Config itself or to the option group (model, optim, run) that holds it; the script's own group defaults stay."""
    cfg = config_class()
    groups = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if dataclasses.is_dataclass(getattr(cfg, f.name))}
    own, nested = {}, {name: {} for name in groups}
    for key, value in options.items():
        holder = next((name for name, g in groups.items() if key in {f.name for f in dataclasses.fields(g)}), None)
        (nested[holder] if holder else own)[key] = value
    return config_class(**own, **{name: dataclasses.replace(g, **nested[name]) for name, g in groups.items()})

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def head_jsonl(src: str, dst, n: int) -> str:
    """The first n lines of a file of the repository (e.g. data/toy/sft_train.jsonl) written to dst."""
    with open(os.path.join(ROOT, src)) as f:
        lines = [next(f) for _ in range(n)]
    with open(dst, "w") as f:
        f.writelines(lines)
    return str(dst)


def toy_tokenizer_with_chat():
    tok = toy_task.build_tokenizer()
    tok.add_tokens(["user", "assistant", "system", ":"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained on the toy text: no pad token, bos == eos, sub-word merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p + c for p in toy_task.PROMPTS[:20] for c in [" very good .", " not bad but the battery is ugly !"]]
    texts += toy_task.vocabulary()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE.replace("<eos>", "<|endoftext|>")
    return fast


def tiny_config(arch: str, vocab_size: int, tok):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128, **ids)
    raise ValueError(arch)


ARCHS = ["gpt2", "llama", "qwen2", "gpt_neox"]


def make_tiny_checkpoint(path: str, arch: str, tokenizer=None) -> str:
    """A randomly initialised causal LM of `arch` + tokenizer saved as a normal HF checkpoint (safetensors).
    gpt2 gets the GPT-2-style BPE tokenizer (no pad, bos == eos); the others the toy word tokenizer + chat tokens."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer or (bpe_tokenizer() if arch == "gpt2" else toy_tokenizer_with_chat())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{arch: path} of tiny random causal LMs, one per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def toy_sft_checkpoint(tmp_path_factory):
    """A toy SFT checkpoint after a few steps of sft.py (seconds): the starting point of later stages in tests."""
    import sft

    out = str(tmp_path_factory.mktemp("runs") / "sft")
    sft.main(make(sft.Config, output_dir=out, num_epochs=0.05, eval_every=10_000, num_eval_generations=8, log_every=5))
    return out


@pytest.fixture(scope="session")
def toy_tools_sft_checkpoint(tmp_path_factory):
    """A tools-toy SFT checkpoint after a few steps of sft.py (seconds): it writes calls, some of them well formed."""
    import sft

    out = str(tmp_path_factory.mktemp("runs") / "sft_tools")
    sft.main(make(sft.Config, model_name_or_path="data/toy/tools/base_model", output_dir=out, max_steps=40,
                  eval_every=10_000, num_eval_generations=4, log_every=10))
    return out


@pytest.fixture(scope="session")
def toy_reward_model(toy_sft_checkpoint, tmp_path_factory):
    """A reward model checkpoint: the toy SFT backbone with a fresh scalar head (no training needed here)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = str(tmp_path_factory.mktemp("rm") / "reward_model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(toy_sft_checkpoint, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(std=0.5)  # scores that vary between responses
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(toy_sft_checkpoint).save_pretrained(out)
    return out


def with_pad(path: str, out: str, pad: str) -> str:
    """The checkpoint at path with its tokenizer's pad token "missing" (None, as Llama's) or "eos" (pad == EOS, as
    Qwen2's and SmolLM2's chat models); the model and every other token unchanged."""
    from transformers import AutoTokenizer

    shutil.copytree(path, out)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token if pad == "eos" else None
    tok.save_pretrained(out)
    assert (AutoTokenizer.from_pretrained(out).pad_token_id is None) == (pad == "missing")
    return out


CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer(pad: str):
    """A Qwen2-style tokenizer built here: byte-level BPE, ChatML chat template, EOS = <|im_end|>; pad "missing" (no pad
    token, as many Llama checkpoints) or "eos" (pad == EOS, as Qwen2's chat models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["What is two plus two? Four.", "Name a colour. Blue is a colour.", "Say hello. Hello there!",
             "user\nassistant\nsystem\n", "Write a haiku about rain. Soft rain on the roof."]
    tok.train_from_iterator(texts * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kw = {"pad_token": "<|im_end|>"} if pad == "eos" else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", **kw)
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def chatml_checkpoints(tmp_path_factory):
    """Tiny random stand-ins for real chat models: {"qwen2": pad == EOS, "llama": no pad token}, ChatML template."""
    root = tmp_path_factory.mktemp("chatml")
    return {arch: make_tiny_checkpoint(str(root / arch), arch, chatml_tokenizer(pad))
            for arch, pad in (("qwen2", "eos"), ("llama", "missing"))}
