"""`python toy_task.py report` on tiny runs: the table, best-of-N, and missing stages."""

import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import toy_task
from conftest import ROOT


def test_best_of_n_equals_enumeration_of_all_subsets():
    """The order-statistics weights give exactly the mean, over every subset of size N of the pool, of the value of
    the subset's highest-proxy sample."""
    rng = random.Random(0)
    pool = 7
    proxy = [rng.random() for _ in range(pool)]
    values = [rng.gauss(0, 1) for _ in range(pool)]
    for n in range(1, pool + 1):
        subsets = list(itertools.combinations(range(pool), n))
        naive = sum(values[max(s, key=lambda i: proxy[i])] for s in subsets) / len(subsets)
        assert toy_task.best_of_n(proxy, values, n) == pytest.approx(naive, abs=1e-12)
        assert sum(toy_task.best_of_n_weights(n, pool)) == pytest.approx(1.0)
    assert toy_task.best_of_n(proxy, values, 1) == pytest.approx(sum(values) / pool)
    assert toy_task.best_of_n(proxy, values, pool) == values[max(range(pool), key=lambda i: proxy[i])]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, toy_sft_checkpoint):
    """runs/ with sft and a reward model made from it (an untrained head: enough to exercise the report)."""
    runs = tmp_path_factory.mktemp("report_runs")
    shutil.copytree(toy_sft_checkpoint, runs / "sft")
    rm = AutoModelForSequenceClassification.from_pretrained(toy_sft_checkpoint, num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(toy_sft_checkpoint).pad_token_id
    rm.save_pretrained(runs / "reward_model")
    AutoTokenizer.from_pretrained(toy_sft_checkpoint).save_pretrained(runs / "reward_model")
    return runs


def test_report_table_with_missing_stages(tiny_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    shutil.copytree(runs / "sft", runs / "ppo")  # a "PPO policy" identical to SFT: its KL to SFT must be 0
    # the reward model's eval.json holds its accuracy only; the gold-label ceiling is the data's (stats.json)
    (runs / "reward_model" / "eval.json").write_text(json.dumps({"accuracy": 0.7123, "ceiling_accuracy": 0.01}))
    result = toy_task.report(str(runs), best_of=(1, 2, 4), samples_per_prompt=2, num_prompts=3)
    out = capsys.readouterr().out
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["SFT", "best-of-2", "best-of-4", "PPO"]
    assert set(result["missing"]) == {"dpo", "grpo"}
    assert "dpo not found: run `python dpo.py`" in out
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["PPO"]["kl_to_sft"] == 0.0
    assert rows["best-of-4"]["kl_to_sft"] == pytest.approx(math.log(4) - 3 / 4)
    assert rows["SFT"]["gain_in_sft_std"] == 0.0
    for r in result["rows"]:
        assert math.isfinite(r["gold_reward_mean"]) and 0.0 <= r["eos_rate"] <= 1.0
    report_md = (runs / "report.md").read_text()
    assert "| method | gold reward" in report_md and "| best-of-4 |" in report_md and "| PPO |" in report_md
    assert "Missing: " in report_md and "dpo.py" in report_md
    ceiling = json.load(open(os.path.join(ROOT, "data", "toy", "stats.json")))["preferences_eval_ceiling_accuracy"]
    assert f"Reward model held-out accuracy: 0.712 (gold-label ceiling {ceiling:.3f})." in report_md
    try:
        import matplotlib  # noqa: F401  (optional: the figure is made when it is installed, else a note says so)

        assert result["figure"] and os.path.getsize(result["figure"]) > 0
    except ImportError:
        assert result["figure"] is None and "no figure: matplotlib is not installed" in report_md


def test_report_without_sft_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "toy_task.py"), "report", "--runs_dir",
                           str(tmp_path / "empty")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "sft not found: run `python sft.py`" in proc.stdout
