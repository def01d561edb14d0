"""A sweep on Slurm as one job array: `shardtune train -m ... cluster=slurm`.

Each trial still gets its own run directory and its own batch script (`<trial>/job.sbatch`, the same
one a single run submits), so a trial keeps its requeue and resume. What changes is the submission:
instead of one `sbatch` per trial, Hydra's sweep only writes the trials, and when it is done the
trials are submitted as one array, `--array=0-(N-1)%K`, whose task i runs trial i's script. Slurm
then runs at most K trials at once (cluster.slurm.sweep_parallelism) and the queue holds one entry.

Trials whose scripts ask for different resources (a sweep over cluster.nproc_per_node, say) cannot
share an array's #SBATCH lines: each set of identical requests becomes an array of its own.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Dict, List, Tuple

from launcher.slurm import sbatch
from trainer.run_dir import RunDir

# #SBATCH options that are the trial's own, not a resource request shared by the array.
PER_TRIAL = ("--job-name=", "--output=")


def requests(script: Path) -> Tuple[str, ...]:
    """The #SBATCH lines of a trial's script that the array must share (resources, time, signal)."""
    lines = [line.strip() for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    return tuple(line for line in lines if not line.split(None, 1)[1].startswith(PER_TRIAL))


def array_script(sweep_dir: Path, name: str, trials: List[Path], shared: Tuple[str, ...], parallelism: int) -> str:
    """Task i runs trial i's own job.sbatch, its output appended to that trial's slurm-<job id>.out."""
    limit = f"%{parallelism}" if parallelism else ""
    listed = "\n".join(f"    {shlex.quote(str(RunDir(t).job_script))}" for t in trials)
    return "\n".join([
        "#!/bin/bash",
        f"# Written by shardtune for the sweep in {sweep_dir}: one array task per trial.",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{len(trials) - 1}{limit}",
        f"#SBATCH --output={sweep_dir}/slurm-%A_%a.out",
        *shared,
        "",
        "TRIALS=(",
        listed,
        ")",
        'SCRIPT="${TRIALS[$SLURM_ARRAY_TASK_ID]}"',
        # exec: Slurm's USR1 before the time limit (--signal=B:...) reaches the trial script's trap,
        # and its requeue (scontrol requeue $SLURM_JOB_ID) requeues this task alone.
        'exec bash "$SCRIPT" >> "$(dirname "$SCRIPT")/slurm-$SLURM_JOB_ID.out" 2>&1',
        "",
    ])


def groups(trials: List[Path]) -> Dict[Tuple[str, ...], List[Path]]:
    """Trials by the resources their scripts request, in trial order."""
    found: Dict[Tuple[str, ...], List[Path]] = {}
    for trial in trials:
        found.setdefault(requests(RunDir(trial).job_script), []).append(trial)
    return found


def submit_sweep(trials: List[Path], parallelism: int) -> List[str]:
    """Submit the sweep's trials as job arrays; record each trial's task id (`<array>_<i>`) in its run
    directory and trial record. Returns the arrays' job ids."""
    sweep_dir = trials[0].parent
    array_ids = []
    for number, (shared, members) in enumerate(groups(trials).items()):
        suffix = f"-{number}" if number else ""
        script = sweep_dir / f"array{suffix}.sbatch"
        script.write_text(array_script(sweep_dir, f"{sweep_dir.name}{suffix}", members, shared, parallelism))
        array_id = sbatch(script, sweep_dir)
        array_ids.append(array_id)
        for index, trial in enumerate(members):
            record_task(trial, f"{array_id}_{index}")
        print(f"[shardtune] submitted Slurm array job {array_id}: {len(members)} trials, "
              f"{f'at most {parallelism}' if parallelism else 'all'} at once\n"
              f"  follow:  squeue -j {array_id}    shardtune sweep summary {sweep_dir}\n"
              f"  stop:    scancel --signal=USR1 --batch {array_id}   (every trial checkpoints, then requeues)",
              flush=True)
    return array_ids


def record_task(trial: Path, task_id: str) -> None:
    """The trial's Slurm id, where a single run's would be (`active_job`, `shardtune stop`, the summary)."""
    from launcher.sweep_cmd import TRIAL_FILE

    run = RunDir(trial)
    run.slurm_job_id.write_text(task_id + "\n")
    record_file = trial / TRIAL_FILE
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        record.update(status="submitted", job_id=task_id)
        record_file.write_text(json.dumps(record) + "\n")
