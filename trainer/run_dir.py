"""The run directory: the interface between the launcher, the ranks and the offline tools.

Every file and folder of a run directory is named here and nowhere else, with the readers and
writers that more than one side uses. Torch-free: the launcher, `shardtune report` and `shardtune
stop` import it without loading the worker's dependencies.

    config.yaml        the composed, validated, fully resolved config (launcher -> ranks)
    ds_config.json     the exact DeepSpeed config the engine gets, derived from config.yaml
    env.json           versions, git revision, host, world size, device
    launches.jsonl     one line per launch into this directory (resumes append)
    metrics.jsonl      one line per logged step and evaluation (rank 0)
    checkpoints/       step-NNNNNNNN/ folders, each committed by its manifest
    heartbeats/        node-from-rank<N>.json: each node launcher's summary of its ranks' heartbeats (which
                       live on node-local storage, RunDir.node_heartbeats); rank<N>.json when no launcher
                       of ours runs on each node (hostfile over ssh): each rank's last sign of life
    control/           stop (a request), exit.json (how the ranks ended), resume.json (the launcher's
                       decision of what the ranks resume from), launch.lock
    generations.jsonl  the evaluation's generations; timing/, profile/: step-time breakdowns
    export/            the model or adapter written at the end of the run; export.json says what
    wandb/, wandb_run_id   the W&B run (offline files) and its id, kept across resumes; wandb_steps.json:
                       the last step W&B confirmed (a finished launch), so a resume logs no step twice
    tensorboard/       TensorBoard event files; mlruns/, mlflow_run_id: the default MLflow store and run id
    logs/              launcher.log (what the launcher printed), rank-<N>.log (each rank's output, bounded)
    benchmarks/        `shardtune eval`: base and tuned on lm-eval tasks, paired (results.json, scores.jsonl)
    report/, report.html, report.md   `shardtune report`
    job.sbatch, slurm_job_id, slurm_jobs.jsonl, slurm_submissions.jsonl, hostfile.node<N>,
    deepspeed_env      Slurm and multi-node launches
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional


class RunDir:
    """A run directory at `path` (nothing is created until something is written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------ what the launcher writes
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def ds_config(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def launches(self) -> Path:
        return self.path / "launches.jsonl"

    # ------------------------------------------------------------ what the ranks write
    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def table(self, name: str) -> Path:
        """A table the ranks log row by row (generations.jsonl: the evaluation's generations)."""
        return self.path / f"{name}.jsonl"

    @property
    def generations(self) -> Path:
        return self.table("generations")

    @property
    def timing(self) -> Path:
        """timing/rank<N>.json: each rank's step-time breakdown."""
        return self.path / "timing"

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    @property
    def wandb_run(self) -> Path:
        """Where the W&B run is: its URL (online), or its offline folder and the `wandb sync` command."""
        return self.path / "wandb_run.json"

    @property
    def wandb_run_id(self) -> Path:
        """The W&B run id, so that a resumed or requeued launch continues the same W&B run."""
        return self.path / "wandb_run_id"

    @property
    def wandb_steps(self) -> Path:
        """Our own record of the W&B run's steps: the last one a finished launch handed to W&B, and the
        offline folder of a launch still open (one that never finished was interrupted)."""
        return self.path / "wandb_steps.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def mlflow_store(self) -> Path:
        """The MLflow file store used when neither logger.mlflow_tracking_uri nor MLFLOW_TRACKING_URI names one."""
        return self.path / "mlruns"

    @property
    def mlflow_run_id(self) -> Path:
        """The MLflow run id, so that a resumed launch continues the same MLflow run."""
        return self.path / "mlflow_run_id"

    # ------------------------------------------------------------ logs: what was printed
    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def launcher_log(self, node_rank: int = 0) -> Path:
        """What a launcher printed, every launch appended: launcher.log, or launcher-node<N>.log for the
        launcher of node N > 0 of a run without ssh (the nodes share run.dir)."""
        return self.logs / ("launcher.log" if node_rank == 0 else f"launcher-node{node_rank}.log")

    def rank_log(self, rank: int) -> Path:
        """Rank `rank`'s stdout and stderr, every launch appended (rank-<N>.log; .1: the part before)."""
        return self.logs / f"rank-{rank}.log"

    def slurm_output(self, job_id: str) -> Path:
        """The batch job's output (sbatch --output in slurm/job.sbatch.j2); requeues append to it."""
        return self.path / f"slurm-{job_id}.out"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def heartbeats(self) -> Path:
        """Shared: the ranks' heartbeats when no launcher of ours runs on every node (a hostfile launch
        over ssh, workers started by hand), and each node launcher's summary of its own ranks."""
        return self.path / "heartbeats"

    def heartbeat(self, rank: int) -> Path:
        return self.heartbeats / f"rank{rank}.json"

    def heartbeat_files(self) -> List[Path]:
        return sorted(self.heartbeats.glob("rank*.json"))

    def node_summary(self, first_rank: int) -> Path:
        """A node launcher's copy of its ranks' last heartbeats (node-local ones), every 30 s at most."""
        return self.heartbeats / f"node-from-rank{first_rank}.json"

    def node_summaries(self) -> List[Path]:
        return sorted(self.heartbeats.glob("node-from-rank*.json"))

    @property
    def node_heartbeats(self) -> Path:
        """Node-local: where the ranks of a node launcher beat (memory-backed /dev/shm where it exists, else
        the temp folder), one folder per run directory, so the shared filesystem sees none of it."""
        shm = Path("/dev/shm")
        root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
        run_id = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return root / f"shardtune-{os.getuid()}" / f"heartbeats-{run_id}"

    @property
    def export(self) -> Path:
        return self.path / "export"

    # ------------------------------------------------------------ shardtune eval
    @property
    def benchmarks(self) -> Path:
        """`shardtune eval`: results.json (the paired table), scores.jsonl (each document's two
        scores), lm_eval-<side>.json (lm-evaluation-harness's own results for each model)."""
        return self.path / "benchmarks"

    @property
    def benchmark_results(self) -> Path:
        return self.benchmarks / "results.json"

    @property
    def benchmark_scores(self) -> Path:
        return self.benchmarks / "scores.jsonl"

    def benchmark_raw(self, side: str) -> Path:
        return self.benchmarks / f"lm_eval-{side}.json"

    @property
    def export_record(self) -> Path:
        return self.path / "export.json"

    @property
    def export_probe(self) -> Path:
        """The trainer's own logits on a fixed input, to check an offline export against."""
        return self.path / "export_probe.pt"

    # ------------------------------------------------------------ control: launcher <-> ranks
    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def stop_request(self) -> Path:
        return self.control / "stop"

    @property
    def exit_record(self) -> Path:
        return self.control / "exit.json"

    @property
    def resume_decision(self) -> Path:
        return self.control / "resume.json"

    @property
    def launch_lock(self) -> Path:
        return self.control / "launch.lock"

    # ------------------------------------------------------------ shardtune report
    @property
    def report(self) -> Path:
        """report/: plots and summary.json; report.html and report.md beside it."""
        return self.path / "report"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    # ------------------------------------------------------------ Slurm and multi-node
    @property
    def job_script(self) -> Path:
        return self.path / "job.sbatch"

    @property
    def slurm_job_id(self) -> Path:
        return self.path / "slurm_job_id"

    @property
    def slurm_jobs(self) -> Path:
        """One line per start of the job (written by the batch script)."""
        return self.path / "slurm_jobs.jsonl"

    @property
    def slurm_submissions(self) -> Path:
        return self.path / "slurm_submissions.jsonl"

    @property
    def deepspeed_env(self) -> Path:
        """The environment DeepSpeed's multi-node runner exports on every host (DS_ENV_FILE)."""
        return self.path / "deepspeed_env"

    # ------------------------------------------------------------ readers and writers
    def is_run(self) -> bool:
        """A launch wrote this directory (a trial refused by validation has none)."""
        return self.config.is_file()

    def write_json(self, path: Path, value: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2) + "\n")

    def read_json(self, path: Path) -> Optional[Any]:
        """The file's value; None when it is missing or cut short."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def read_ds_config(self) -> Dict[str, Any]:
        return json.loads(self.ds_config.read_text())

    def append_launch(self, record: Dict[str, Any]) -> None:
        with open(self.launches, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_metrics(self, problems: Optional[List[str]] = None) -> List[Dict[str, Any]]:
        """Every parseable line of metrics.jsonl, in order. A line that does not parse (the last line
        of a live run, being written) is skipped, and noted in `problems` when given."""
        return list(_jsonl(self.metrics, problems))

    def read_table(self, name: str, problems: Optional[List[str]] = None) -> List[Dict[str, Any]]:
        return list(_jsonl(self.table(name), problems))


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text`, or what it held before: never a part (written beside it, synced, renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _jsonl(path: Path, problems: Optional[List[str]]) -> Iterator[Dict[str, Any]]:
    if not path.is_file():
        if problems is not None:
            problems.append(f"{path.name}: not written (yet)")
        return
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            if problems is not None:
                problems.append(f"{path.name}:{number}: unreadable line skipped")
