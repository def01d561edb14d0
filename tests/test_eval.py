"""`shardtune eval`: base against tuned on lm-eval tasks, paired, with bootstrap intervals.

The statistics and the shipped tasks are checked alone; the command itself runs lm-evaluation-harness
on two real tiny runs (a LoRA one and a full fine-tuning one, 1 rank, a few steps).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, shardtune
from launcher.eval_tasks import GENERAL_FILE, heldout_docs
from trainer.paired_stats import paired_bootstrap, verdict

GENERAL_CHAT = REPO / "samples" / "chat" / "eval.jsonl"
PAIRS = REPO / "samples" / "preference" / "train.jsonl"
TEXT = REPO / "samples" / "text" / "eval.jsonl"


# ------------------------------------------------------------------------------ statistics
def test_identical_scores_give_a_zero_difference_and_an_interval_at_zero():
    scores = np.random.default_rng(0).integers(0, 2, 200).astype(float)
    stats = paired_bootstrap(scores, scores)
    assert stats["diff"] == 0 and stats["ci_low"] == 0 and stats["ci_high"] == 0
    assert verdict(stats["ci_low"], stats["ci_high"], True) == "no clear change"


def test_the_interval_matches_the_normal_approximation_and_is_reproducible():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 2000).astype(float)
    flips = rng.random(2000) < 0.1  # the tuned model changes 10% of the answers, mostly to right
    tuned = np.where(flips, (rng.random(2000) < 0.7).astype(float), base)
    stats = paired_bootstrap(base, tuned, iters=4000, seed=3)
    d = tuned - base
    half_width = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert stats["diff"] == pytest.approx(d.mean())
    assert (stats["ci_high"] - stats["ci_low"]) / 2 == pytest.approx(half_width, rel=0.1)
    assert paired_bootstrap(base, tuned, iters=4000, seed=3) == stats
    # Paired is tighter than two independent standard errors: most answers do not change.
    independent = 1.96 * math.sqrt(base.var(ddof=1) / 2000 + tuned.var(ddof=1) / 2000)
    assert half_width < independent / 2


def test_a_change_is_called_only_when_the_interval_excludes_zero():
    assert verdict(0.01, 0.05, higher_is_better=True) == "better"
    assert verdict(-0.05, -0.01, higher_is_better=True) == "worse"
    assert verdict(-0.05, -0.01, higher_is_better=False) == "better"  # e.g. bits per byte went down
    assert verdict(-0.01, 0.02, higher_is_better=True) == "no clear change"
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1.0, 0.0], [1.0])


# ------------------------------------------------------------------------------ the shipped tasks
def test_the_general_set_is_well_formed_and_regenerates_byte_for_byte(tmp_path):
    rows = [json.loads(line) for line in GENERAL_FILE.read_text().splitlines()]
    assert len(rows) >= 300
    assert len({r["question"] for r in rows}) == len(rows)
    for row in rows:
        assert len(set(row["choices"])) == 4 and 0 <= row["answer"] < 4, row
    assert len({r["answer"] for r in rows}) == 4  # the right answer is not always in one place
    out = tmp_path / "mc.jsonl"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, 'scripts'); import make_general_mc; "
                    f"make_general_mc.main(__import__('pathlib').Path({str(out)!r}))"], cwd=REPO, check=True,
                   capture_output=True)
    assert out.read_bytes() == GENERAL_FILE.read_bytes()


def test_heldout_data_of_every_format_becomes_a_task(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "trainer" / "builtin" / "tiny-llama"))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "user", "content": "no answer yet"}]},
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
        {"unknown": 1},
    ]) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "Some plain text."}) + "\n")
    kinds, skipped = heldout_docs([str(mixed), str(text)], tokenizer, {})
    assert kinds["answer"][0]["answer"] == "Hello." and kinds["answer"][0]["prompt"].rstrip().endswith(
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                      add_generation_prompt=True).rstrip())
    assert kinds["answer"][1] == {"prompt": "2+2=", "answer": "4"}
    assert kinds["pair"][0]["choices"] == ["Hi!", "No."] and kinds["pair"][0]["answer"] == 0
    assert kinds["text"] == [{"text": "Some plain text."}]
    assert skipped == {"no final assistant answer": 1, "missing_field": 1}


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def runs(method_runs):
    """A LoRA run and a full fine-tuning run of the tiny model (ZeRO-3, 2 ranks), each with a committed
    checkpoint: the session's shared method runs (tests/conftest.py)."""
    return {"lora": method_runs("lora", 3), "full": method_runs("none", 3)}


def _results(run_dir):
    return json.loads((run_dir / "benchmarks" / "results.json").read_text())


@pytest.mark.distributed
def test_eval_pairs_a_lora_run_with_its_base_and_the_report_shows_it(runs):
    proc = shardtune("eval", str(runs["lora"]), "--limit", "60", "--bootstrap", "500", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = _results(runs["lora"])
    rows = {(r["task"], r["metric"]): r for r in summary["rows"]}
    assert set(rows) == {("shardtune_general", "acc"), ("shardtune_general", "acc_norm"),
                         ("heldout", "acc"), ("heldout", "logprob")}
    for row in rows.values():
        assert row["n"] == 60 and row["ci_low"] <= row["diff"] <= row["ci_high"]
        assert row["verdict"] in ("better", "worse", "no clear change")
    # Tiny random-init model on four choices: chance level, for the base and the tuned model alike.
    assert 0.1 < rows[("shardtune_general", "acc")]["base"] < 0.45
    # Two steps of LoRA (lr 1e-3) on the chat data make its own held-out answers more likely.
    assert rows[("heldout", "logprob")]["diff"] > 0
    assert summary["retention"]["verdict"] in ("kept", "dropped") and summary["baseline"].startswith("base")
    scores = [json.loads(line) for line in (runs["lora"] / "benchmarks" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 60 * 4
    assert "shardtune_general" in proc.stdout and "retention:" in proc.stdout
    report = shardtune("report", str(runs["lora"]))
    assert report.returncode == 0, report.stdout
    markdown = (runs["lora"] / "report.md").read_text()
    assert "## Benchmarks (shardtune eval)" in markdown and "| shardtune_general | acc |" in markdown
    assert (runs["lora"] / "report" / "benchmarks.png").is_file()


@pytest.mark.distributed
def test_a_model_against_itself_differs_by_zero_on_every_kind_of_task(runs):
    """Full fine-tuning, compared with its own checkpoint: MC, answers, preference pairs, raw text."""
    run = runs["full"]
    proc = shardtune("eval", str(run), "--baseline", str(run), "--limit", "12", "--heldout", str(GENERAL_CHAT),
                     str(PAIRS), str(TEXT), "--bootstrap", "200", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = _results(run)
    assert {r["task"] for r in summary["rows"]} == {"shardtune_general", "heldout", "heldout_pairs", "heldout_text"}
    for row in summary["rows"]:
        assert row["diff"] == 0 and row["ci_low"] <= 0 <= row["ci_high"], row
        assert row["verdict"] == "no clear change"
    assert summary["retention"]["verdict"] == "kept"
    text = next(r for r in summary["rows"] if r["task"] == "heldout_text")
    assert text["metric"] == "bits_per_byte" and not text["higher_is_better"] and text["base"] > 0


def test_eval_refuses_what_is_not_a_run_and_a_bad_baseline(tmp_path):
    proc = shardtune("eval", str(tmp_path))
    assert proc.returncode == 2 and "not a shardtune run directory" in proc.stdout
    (tmp_path / "config.yaml").write_text("{}\n")
    proc = shardtune("eval", str(tmp_path), "--confidence", "95")
    assert proc.returncode == 2 and "between 0 and 1" in proc.stdout
    proc = shardtune("eval", str(tmp_path), "--baseline", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "give `base`, RUN_DIR or RUN_DIR@STEP" in proc.stdout
