"""Hydra sweeps end to end: a grid, a broken trial, an Optuna search, and the summary that ranks them.

Trials are single-rank tiny runs (4 steps) so that the whole file stays near two minutes of CPU.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from helpers import TINY, shardtune
from launcher.sweep_cmd import parse_overrides, rank, swept_keys

TRIAL = [*TINY, "train.max_steps=4", "cluster.nproc_per_node=1", "eval.prompts_file=null",
         "eval.general_files=[]", "eval.max_batches=2", "checkpoint.export_final=false"]


def _trials(sweep_dir):
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("trial-*/trial.json"))]


def test_rank_puts_completed_trials_first_by_metric():
    rows = [{"trial": "trial-0", "status": "completed", "eval_loss": 2.0, "params": {"a": "1"}},
            {"trial": "trial-1", "status": "failed", "eval_loss": None, "params": {"a": "2"}},
            {"trial": "trial-2", "status": "completed", "eval_loss": 1.5, "params": {"a": "3"}}]
    rank(rows, "eval_loss")
    assert [(r["trial"], r["rank"], r["best"]) for r in rows] == [
        ("trial-2", 1, True), ("trial-0", 2, False), ("trial-1", None, False)]
    assert swept_keys(rows) == ["a"]
    assert parse_overrides(["+x.y=3", "optim.lr=1e-3"]) == {"x.y": "3", "optim.lr": "1e-3"}


@pytest.mark.distributed
def test_grid_sweep_summary_ranks_by_eval_loss(tmp_path):
    sweep = tmp_path / "grid"
    proc = shardtune("train", "-m", f"hydra.sweep.dir={sweep}", *TRIAL, "optim.lr=1e-3,3e-3",
                     "train.micro_batch_size=1,2")
    assert proc.returncode == 0, proc.stdout[-4000:]
    trials = _trials(sweep)
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials)
    # Trials are grouped under the sweep's name (W&B group) and each has its own run directory.
    config = yaml.safe_load((sweep / "trial-3" / "config.yaml").read_text())
    assert config["logger"]["group"] == "grid" and config["run"]["name"] == "grid-3"

    proc = shardtune("sweep", "summary", str(sweep))
    assert proc.returncode == 0, proc.stdout
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["optim.lr"] for r in rows} == {"0.001", "0.003"}
    assert {r["train.micro_batch_size"] for r in rows} == {"1", "2"}
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses == sorted(losses) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["best"] for r in rows] == ["1", "0", "0", "0"]
    best = min(trials, key=lambda t: t["value"])
    assert rows[0]["trial"] == f"trial-{best['num']}"
    assert "| * 1 |" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").stat().st_size > 5000


@pytest.mark.distributed
def test_broken_trial_is_reported_failed_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "broken"
    # Trial 0 passes validation but its worker cannot build the model; trial 1 must still run.
    proc = shardtune("train", "-m", f"hydra.sweep.dir={sweep}", *TRIAL,
                     "model.name_or_path=builtin:no-such-model,builtin:tiny-llama")
    assert proc.returncode == 0, proc.stdout[-4000:]  # some trial completed
    trials = _trials(sweep)
    assert [t["status"] for t in trials] == ["failed", "completed"]
    assert trials[0]["code"] != 0 and trials[0]["value"] is None
    proc = shardtune("sweep", "summary", str(sweep))
    table = (sweep / "summary.md").read_text()
    assert "| * 1 | trial-1 |" in table and "| - | trial-0 | builtin:no-such-model | failed |" in table, table


@pytest.mark.distributed
def test_optuna_search_runs_its_trial_budget(tmp_path):
    sweep = tmp_path / "search"
    proc = shardtune("train", "-m", "hydra/sweeper=search", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}",
                     *TRIAL, "optim.lr=tag(log, interval(1e-4, 1e-2))")
    assert proc.returncode == 0, proc.stdout[-4000:]
    trials = _trials(sweep)
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    lrs = [float(parse_overrides(t["overrides"])["optim.lr"]) for t in trials]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # Optuna minimised what the trials returned: their final eval loss.
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert math.isclose(result["best_value"], min(t["value"] for t in trials))
