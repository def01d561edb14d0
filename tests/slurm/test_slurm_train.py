"""`shardtune train cluster=slurm` against the real local cluster (two emulated nodes n1, n2).

One local 2-rank run is the reference: a 2 nodes x 1 rank Slurm job must reproduce its losses,
and so must a job that is signalled mid-run, checkpoints, requeues itself and resumes, and a run
started by hand inside `salloc`.
Measured times go to the terminal summary (conftest.py prints cluster.timings).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, losses, metrics, subprocess_env, train
from launcher.slurm_env import derive_port
from trainer.run_dir import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

STEPS = 30
COMMON = [*TINY, f"train.max_steps={STEPS}", "eval.prompts_file=null", "eval.general_files=[]",
          "eval.max_batches=2", "checkpoint.export_final=false"]
SLURM = ["cluster=slurm", "cluster.nnodes=2", "cluster.nproc_per_node=1", "cluster.threads_per_rank=1"]


def _wait_for(predicate, timeout, what, cluster):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{cluster.log_tails(10)}")
        time.sleep(0.2)


def _train_steps(run_dir: Path) -> list:
    try:
        return metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return []


def _beat(run_dir: Path, rank: int) -> dict:
    try:
        # The local cluster's nodes share this machine's /dev/shm, where node launchers' ranks beat.
        return json.loads((RunDir(run_dir).node_heartbeats / f"rank{rank}.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _submit(cluster, run_dir: Path, *overrides: str) -> tuple[str, float]:
    submitted_at = time.time()
    proc = train(run_dir, *COMMON, *SLURM, *overrides, env=cluster.client_env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    job_id = (run_dir / "slurm_job_id").read_text().strip()
    assert f"submitted Slurm job {job_id}" in proc.stdout and f"tail -f {run_dir}/slurm-{job_id}.out" in proc.stdout
    return job_id, submitted_at


def _job_output(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "<no output>"


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    proc = train(run_dir, *COMMON)
    assert proc.returncode == 0, proc.stdout[-3000:]
    values = losses(run_dir)
    assert len(values) == STEPS
    return values


def test_two_node_job_matches_local_run(slurm_cluster, local_losses, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 0 pauses 15 s in step 2 (same losses): the job is surely queued or running when a second
    # submission into its run directory comes, and is refused before anything is written.
    pause = ["+train.fault_injection.pause_at_step=2", "+train.fault_injection.pause_seconds=15"]
    job_id, submitted_at = _submit(slurm_cluster, run_dir, *pause)
    config_before = (run_dir / "config.yaml").read_text()
    again = train(run_dir, *COMMON, *SLURM, "optim.lr=0.5", env=slurm_cluster.client_env, timeout=120)
    assert again.returncode == 2 and f"belongs to Slurm job {job_id}, which is" in again.stdout, again.stdout
    assert (run_dir / "config.yaml").read_text() == config_before
    script = (run_dir / "job.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@"):
        assert line in script
    try:
        slurm_cluster.wait_job(job_id, "COMPLETED", timeout=420)
    except Exception:
        raise AssertionError(_job_output(run_dir, job_id)[-4000:])
    out = _job_output(run_dir, job_id)
    port = derive_port(job_id)
    # One launcher per node; n1 does not resolve, so the rendezvous address is its NodeAddr.
    assert "node 0/2" in out and "node 1/2" in out, out[-3000:]
    assert f"rendezvous 127.0.0.1:{port}" in out, out[-3000:]
    steps = _train_steps(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    got = [r["loss"] for r in steps]
    diff = max(abs(a - b) for a, b in zip(got, local_losses))
    assert diff < 1e-5, (got, local_losses)
    slurm_cluster.timings["slurm job: submit -> first step"] = steps[0]["time"] - submitted_at
    slurm_cluster.timings["slurm job: max |loss - local loss|"] = diff


def test_signalled_job_requeues_and_resumes(slurm_cluster, local_losses, tmp_path):
    run_dir = tmp_path / "run"
    # Rank 0 pauses at the start of step 4 until the stop request arrives (at most 90 s): the
    # signal lands in a known step however slow the machine (steps take ~0.1 s).
    pause = ["+train.fault_injection.pause_at_step=4", "+train.fault_injection.pause_seconds=90"]
    job_id, submitted_at = _submit(slurm_cluster, run_dir, "logger=wandb", "logger.mode=offline", *pause)
    _wait_for(lambda: _beat(run_dir, 0).get("phase") == "paused", 420, "rank 0 to pause in step 4", slurm_cluster)
    first = _train_steps(run_dir)
    signalled_at = time.time()
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])

    def restarted_step():
        if slurm_cluster.scontrol_show_job(job_id).get("Restarts") != "1":
            return None
        starts = [json.loads(l) for l in (run_dir / "slurm_jobs.jsonl").read_text().splitlines()]
        return starts[-1] if starts[-1]["restart"] == 1 else None

    restart = _wait_for(restarted_step, 180, "the job to restart", slurm_cluster)
    try:
        slurm_cluster.wait_job(job_id, "COMPLETED", timeout=420)
    except Exception:
        raise AssertionError(_job_output(run_dir, job_id)[-5000:])
    out = _job_output(run_dir, job_id)
    assert "SIGUSR1" in out and "requeueing (restart 1" in out, out[-4000:]
    starts = [json.loads(l)["restart"] for l in (run_dir / "slurm_jobs.jsonl").read_text().splitlines()]
    assert starts == [0, 1]
    stopped_at = int(next(l for l in out.splitlines() if "resumed from" in l).split("at step")[1].split()[0])
    assert stopped_at == 4, out[-3000:]

    # The resumed curve is the uninterrupted one: every step once, in order, same losses.
    steps = _train_steps(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    diff = max(abs(r["loss"] - ref) for r, ref in zip(steps, local_losses))
    assert diff < 1e-5, ([r["loss"] for r in steps], local_losses)

    # One W&B run: both starts logged offline under the id kept in the run directory.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline), offline

    resumed_first = next(r for r in steps if r["step"] == stopped_at + 1)
    slurm_cluster.timings.update({
        "requeue job: submit -> first step": first[0]["time"] - submitted_at,
        "requeue job: USR1 -> requeued job started": restart["time"] - signalled_at,
        "requeue job: USR1 -> first step after resume": resumed_first["time"] - signalled_at,
        "requeue job: max |loss - local loss|": diff,
    })


def test_inside_salloc_the_launcher_sruns_one_node_launcher_per_node(slurm_cluster, local_losses, tmp_path):
    """`salloc -N2` then `shardtune train cluster=slurm ...`: no sbatch; the launcher, inside the
    allocation, starts one node launcher per node with srun and waits for them."""
    run_dir = tmp_path / "run"
    command = ["salloc", "--nodes=2", "--time=10", sys.executable, "-m", "launcher.cli", "train", f"run.dir={run_dir}",
               *COMMON, *SLURM]
    started = time.time()
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(slurm_cluster.client_env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "inside Slurm allocation" in proc.stdout and "submitted Slurm job" not in proc.stdout, proc.stdout[-3000:]
    assert not (run_dir / "slurm_job_id").exists()  # nothing was sbatch'ed
    steps = _train_steps(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    diff = max(abs(r["loss"] - ref) for r, ref in zip(steps, local_losses))
    assert diff < 1e-5, ([r["loss"] for r in steps], local_losses)
    slurm_cluster.timings["salloc run: wall time"] = time.time() - started
    slurm_cluster.timings["salloc run: max |loss - local loss|"] = diff
