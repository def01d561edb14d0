"""A sweep with cluster=slurm submits one job per trial and returns without waiting for them."""
from __future__ import annotations

import json
import time

import pytest

from helpers import TINY, shardtune

pytestmark = pytest.mark.slurm


def test_sweep_submits_one_job_per_trial(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    proc = shardtune("train", "-m", f"hydra.sweep.dir={sweep}", *TINY, "train.max_steps=2", "cluster=slurm",
                     "optim.lr=1e-3,3e-3",
                     # Held jobs never start: a trial cancelled mid-start could leave DeepSpeed's op
                     # build lock behind and stall every later test.
                     "cluster.slurm.extra_sbatch=['--hold']", env=slurm_cluster.client_env, timeout=120)
    returned_after = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:]
    trials = [json.loads((sweep / f"trial-{n}" / "trial.json").read_text()) for n in (0, 1)]
    assert [t["status"] for t in trials] == ["submitted", "submitted"]
    job_ids = [t["job_id"] for t in trials]
    assert len(set(job_ids)) == 2
    for n, job_id in enumerate(job_ids):
        assert f"submitted Slurm job {job_id}" in proc.stdout
        info = slurm_cluster.scontrol_show_job(job_id)
        assert info["JobName"] == f"sweep-{n}" and info["JobState"] == "PENDING"
        assert info["Command"] == str(sweep / f"trial-{n}" / "job.sbatch")
    # The summary lists the submitted trials by their job's progress; then free the cluster.
    summary = shardtune("sweep", "summary", str(sweep))
    assert summary.returncode == 0 and job_ids[0] in summary.stdout and job_ids[1] in summary.stdout
    slurm_cluster.run(["scancel", *job_ids])
    slurm_cluster.timings["slurm sweep: 2 trials submitted in"] = returned_after
