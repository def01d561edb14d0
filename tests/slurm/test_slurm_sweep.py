"""A sweep with cluster=slurm is one job array (at most cluster.slurm.sweep_parallelism trials at once),
each task running its trial's own job script, so each trial keeps its requeue and resume."""
from __future__ import annotations

import json
import time

import pytest

from helpers import TINY, losses, shardtune
from trainer.control import recorded_exit
from trainer.run_dir import RunDir

pytestmark = pytest.mark.slurm


def _wait_for_exit_records(trial_dirs, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(RunDir(d).exit_record.exists() for d in trial_dirs):
            return True
        time.sleep(1)
    return False


def test_a_sweep_of_three_trials_is_one_array_job_and_every_trial_finishes(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    proc = shardtune("train", "-m", f"hydra.sweep.dir={sweep}", *TINY, "train.max_steps=2", "cluster=slurm",
                     "cluster.nproc_per_node=1", "checkpoint.export_final=false", "eval.baseline=false",
                     "cluster.slurm.sweep_parallelism=2", "optim.lr=1e-3,2e-3,3e-3",
                     env=slurm_cluster.client_env, timeout=180)
    returned_after = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:]
    trial_dirs = [sweep / f"trial-{n}" for n in range(3)]
    records = [json.loads((d / "trial.json").read_text()) for d in trial_dirs]
    array_id = records[0]["job_id"].split("_")[0]
    assert [r["job_id"] for r in records] == [f"{array_id}_{n}" for n in range(3)]
    assert [r["status"] for r in records] == ["submitted"] * 3
    assert proc.stdout.count("submitted Slurm array job") == 1 and "3 trials, at most 2 at once" in proc.stdout
    info = slurm_cluster.scontrol_show_job(array_id)
    assert info.get("ArrayTaskThrottle") == "2", info
    try:
        assert _wait_for_exit_records(trial_dirs, timeout_s=420), \
            "\n".join(f"{d}: {[p.read_text()[-1500:] for p in d.glob('slurm-*.out')]}" for d in trial_dirs)
    finally:
        slurm_cluster.run(["scancel", array_id])
    for d in trial_dirs:
        assert recorded_exit(d) == 0, RunDir(d).exit_record.read_text()
        assert len(losses(d)) == 2
        assert list(d.glob("slurm-*.out")), f"{d}: no output of its array task"
    summary = shardtune("sweep", "summary", str(sweep), check=True).stdout
    assert summary.count("completed") >= 3, summary
    slurm_cluster.timings["slurm sweep: 3 trials as one array submitted in"] = returned_after
    slurm_cluster.timings["slurm sweep: 3 trials, 2 at once, all finished in"] = time.monotonic() - started
