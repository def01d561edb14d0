"""cluster=slurm: write the batch script into the run directory and submit it, or, inside an
allocation, start one node launcher per node with srun.

    <run.dir>/job.sbatch        the rendered script (from slurm/job.sbatch.j2 by default)
    <run.dir>/slurm_job_id      the id sbatch gave it
    <run.dir>/slurm-<id>.out    the job's output; requeued runs append to it
    <run.dir>/slurm_jobs.jsonl  one line per start of the job (restart count, nodes, time)
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from launcher.resources import CODE_ROOT, bundled_path
from trainer.config import RootConfig
from trainer.run_dir import RunDir



# Set by a sweep (launcher/app.py) while Hydra runs its trials: the trials' run directories, in order,
# whose scripts were written but not submitted. None: not collecting (a single run submits its own).
sweep_trials: Optional[List[Path]] = None


def template_path(cfg: RootConfig) -> Path:
    return bundled_path(cfg.cluster.slurm.template)


def node_request(cfg: RootConfig) -> tuple[int | None, str | None]:
    """(--cpus-per-task, --mem) of each node's one launcher task, which starts all that node's ranks.

    Unset values: on a node of its own (exclusive) all its memory (--mem=0) and all its CPUs (None
    here: the template passes the allocation's, $SLURM_CPUS_ON_NODE, to srun); on a shared node
    cpus_per_rank CPUs per rank (else Slurm gives the task, and so every rank, one CPU) and the
    cluster's default memory (often per CPU).
    """
    slurm = cfg.cluster.slurm
    cpus = slurm.cpus_per_task
    if cpus is None and not slurm.exclusive:
        cpus = slurm.cpus_per_rank * cfg.cluster.nproc_per_node
    mem = slurm.mem if slurm.mem is not None else ("0" if slurm.exclusive else None)
    return cpus, mem


def render_script(cfg: RootConfig, run_dir: Path) -> str:
    """The batch script for this run, from the template and cluster.slurm.*."""
    import jinja2

    slurm = cfg.cluster.slurm
    cpus_per_task, mem = node_request(cfg)
    source = template_path(cfg)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = lambda value: shlex.quote(str(value))
    template = env.from_string(source.read_text())
    return template.render(
        template=source, run_dir=run_dir, logs_dir=RunDir(run_dir).logs, repo=CODE_ROOT, python=slurm.python or sys.executable,
        job_name=slurm.job_name or cfg.run.name, nnodes=cfg.cluster.nnodes, time=slurm.time,
        signal_seconds=slurm.signal_seconds, max_requeues=slurm.max_requeues, cpus_per_task=cpus_per_task,
        gpus_per_node=slurm.gpus_per_node, mem=mem, partition=slurm.partition, account=slurm.account,
        qos=slurm.qos, constraint=slurm.constraint, exclusive=slurm.exclusive,
        extra_sbatch=list(slurm.extra_sbatch), setup=list(slurm.setup))


def in_allocation(env=os.environ) -> bool:
    """Inside salloc or an interactive srun, but not in a batch script shardtune wrote itself."""
    job = env.get("SLURM_JOB_ID")
    return bool(job) and env.get("SHARDTUNE_BATCH_JOB") != job


def sbatch(script: Path, cwd: Path) -> str:
    """sbatch the script; returns the job id (raises SystemExit with sbatch's own words on failure)."""
    if not shutil.which("sbatch"):
        raise SystemExit("cluster=slurm: `sbatch` is not on PATH; run on a Slurm login node, or write the "
                         "script without submitting: cluster.slurm.submit=false")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().splitlines()[-1].split(";")[0]


def submit(script: Path, run_dir: Path) -> str:
    """sbatch a run's script and record the job id in its run directory."""
    job_id = sbatch(script, run_dir)
    RunDir(run_dir).slurm_job_id.write_text(job_id + "\n")
    with open(RunDir(run_dir).slurm_submissions, "a") as handle:
        handle.write(json.dumps({"job_id": job_id, "time": time.time(), "script": str(script)}) + "\n")
    return job_id


def follow_hint(job_id: str, run_dir: Path) -> str:
    return (f"[shardtune] submitted Slurm job {job_id} for {run_dir}\n"
            f"  follow:  squeue -j {job_id}    tail -f {RunDir(run_dir).slurm_output(job_id)}    "
            f"(metrics: {run_dir}/metrics.jsonl)\n"
            f"  stop:    scancel --signal=USR1 --batch {job_id}   (checkpoints, then requeues itself)\n"
            f"           shardtune stop {run_dir}   (checkpoints and ends)    scancel {job_id}   (no checkpoint)")


def launch_in_allocation(cfg: RootConfig, run_dir: Path) -> int:
    """srun one node launcher per node of the current allocation, and wait for them."""
    from launcher.local import run_workers

    have = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    if have < cfg.cluster.nnodes:
        raise SystemExit(f"this allocation (job {os.environ['SLURM_JOB_ID']}) has {have} node(s) but "
                         f"cluster.nnodes={cfg.cluster.nnodes}")
    python = cfg.cluster.slurm.python or sys.executable
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")  # srun of Slurm 22.05-23.02 does not inherit it
    argv = ["srun", f"--nodes={cfg.cluster.nnodes}", "--ntasks-per-node=1",
            *([f"--cpus-per-task={cpus}"] if cpus else []), python, "-m", "launcher.node", "--run-dir", str(run_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")])))
    print(f"[shardtune] inside Slurm allocation {os.environ['SLURM_JOB_ID']}: {shlex.join(argv)}",
          file=sys.stderr, flush=True)
    # The node launchers srun starts watch their own ranks (node-local heartbeats); this one only waits.
    return run_workers(argv, env, run_dir, node_local=False)


def derive_for_compute_nodes(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> None:
    """The login node may have no GPU while the job asks for some: derive ds_config.json for the job."""
    gpu_job = cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and cfg.cluster.slurm.gpus_per_node > 0)
    if gpu_job != on_gpu:
        from launcher.rundir import world_size
        from trainer.ds_config import build_ds_config

        RunDir(run_dir).write_json(RunDir(run_dir).ds_config, build_ds_config(cfg, world_size(cfg), gpu_job))


ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


def active_job(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of the Slurm job last submitted for `run_dir` while it is still queued or
    running; None when there is none, it has ended, or Slurm cannot be asked."""
    id_file = RunDir(run_dir).slurm_job_id
    if not id_file.is_file() or not shutil.which("squeue"):
        return None
    job_id = id_file.read_text().strip()
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
    active = sorted(states & ACTIVE_STATES)
    return (job_id, active[0]) if proc.returncode == 0 and active else None


def launch_slurm(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> int:
    if in_allocation() and cfg.run.launch == "spawn":
        return launch_in_allocation(cfg, run_dir)
    derive_for_compute_nodes(cfg, run_dir, on_gpu)
    script = RunDir(run_dir).job_script
    script.write_text(render_script(cfg, run_dir))
    script.chmod(0o755)
    if cfg.run.launch != "spawn" or not cfg.cluster.slurm.submit:
        print(f"{script.read_text()}\n[shardtune] wrote {script}; submit it with: sbatch {script}")
        return 0
    if cfg.cluster.slurm.preflight and not preflight_fits(cfg, on_gpu):
        return 3
    if sweep_trials is not None:  # a sweep: submitted with the other trials as one array (launcher/slurm_array.py)
        sweep_trials.append(run_dir)
        print(f"[shardtune] wrote {script}; the sweep submits it with the other trials as one job array", flush=True)
        return 0
    job_id = submit(script, run_dir)
    print(follow_hint(job_id, run_dir), flush=True)
    return 0


def preflight_fits(cfg: RootConfig, on_gpu: bool) -> bool:
    """Estimate memory before queueing: a job that cannot fit should fail now, not after hours in the queue.
    From a login node without the job's GPUs it is estimated for GPUs of cluster.slurm.gpu_memory."""
    from argparse import ArgumentTypeError

    from launcher.preflight_cmd import parse_size, report

    gpu_job = cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and cfg.cluster.slurm.gpus_per_node > 0)
    gpu_memory = None
    if gpu_job != on_gpu:
        given = cfg.cluster.slurm.gpu_memory
        if not gpu_job or not given:
            print("[shardtune] preflight skipped: this node's devices differ from the job's (set "
                  "cluster.slurm.gpu_memory=80GB, the memory of one of the job's GPUs, to estimate the job "
                  "here; or run `shardtune preflight --device cuda --gpu-memory 80GB <overrides>`)", flush=True)
            return True
        try:
            gpu_memory = parse_size(given)
        except ArgumentTypeError as err:
            print(f"[shardtune] not submitted: cluster.slurm.gpu_memory={given!r}: {err}", flush=True)
            return False
    fits, text, _ = report(cfg, gpu_job, gpu_memory)
    print(text, flush=True)
    if not fits:
        print("[shardtune] not submitted: the job would not fit (cluster.slurm.preflight=false submits anyway)",
              flush=True)
    return fits
