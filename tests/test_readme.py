"""The README's commands for real chat models are run as written, with only the model, the data files and the sizes
swapped for a tiny stand-in (a 2-layer random Qwen2 with a ChatML template whose pad token is EOS, as Qwen2.5's) and
local files; so every option they use exists and the stages chain as the README says (GRPO straight from the
instruct model included)."""

import importlib
import os
import re
import shlex

from conftest import ROOT

import harness

SECTION = "## Your own model and data"
SMALL = {"sft": ["--max_length", "96", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--max_new_tokens", "4", "--num_eval_generations", "2", "--max_steps", "2"],
         "reward_model": ["--max_length", "96", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1",
                          "--max_new_tokens", "4", "--normalize_samples", "4", "--max_steps", "2"],
         "dpo": ["--max_length", "96", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--max_new_tokens", "4", "--max_steps", "2"],
         "ppo": ["--max_prompt_length", "48", "--max_new_tokens", "4", "--rollout_batch_size", "4",
                 "--num_minibatches", "1", "--gradient_accumulation_steps", "1", "--num_iterations", "2"],
         "grpo": ["--max_prompt_length", "48", "--max_new_tokens", "4", "--rollout_batch_size", "2",
                  "--num_samples_per_prompt", "2", "--num_minibatches", "1", "--gradient_accumulation_steps", "1",
                  "--num_iterations", "2"]}


def readme_commands() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split(SECTION, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def test_readme_commands_run_as_written(chatml_checkpoints, tmp_path):
    from test_data import command_line, datasets_for

    data = datasets_for("jsonl", tmp_path)
    import datasets

    datasets.Dataset.from_list([r for _, r in harness.load_rows(data["dpo"], "--dataset")]).to_parquet(
        str(tmp_path / "p.parquet"))
    swap = {"Qwen/Qwen2.5-1.5B-Instruct": chatml_checkpoints["qwen2"], "my_sft.jsonl": data["sft"],
            "my_prefs.parquet": str(tmp_path / "p.parquet"), "my_prompts.jsonl": data["prompts"],
            "rewards.py:accuracy": str(tmp_path / "rewards.py") + ":accuracy"}
    (tmp_path / "rewards.py").write_text("def accuracy(completions, answer, **kwargs):\n"
                                         "    return [float(c[0]['content'].strip() == a) for c, a in "
                                         "zip(completions, answer)]\n")
    commands = readme_commands()
    assert [c[1] for c in commands] == ["sft.py", "reward_model.py", "dpo.py", "ppo.py", "grpo.py", "grpo.py"]
    for command in commands:
        script = command[1][:-3]
        args = [swap.get(a, re.sub(r"^runs/", f"{tmp_path}/runs/", a)) for a in command[2:]] + SMALL[script]
        module = importlib.import_module(script)
        config = command_line(module, args)  # as the shell runs it
        module.main(config)
        out = config.run.output_dir
        assert os.path.exists(os.path.join(out, "eval.json")), command
        if config.model.merge_lora:  # merged for plain transformers, the adapter beside it
            assert os.path.exists(os.path.join(out, "model.safetensors"))
            assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))

