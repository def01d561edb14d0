"""Shared test utilities: run shardtune as a user would (a real subprocess), read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
# The tiny, fast setting every distributed test starts from; tests add what they exercise.
TINY = ["train.max_steps=6", "train.micro_batch_size=2", "checkpoint.every_steps=0", "eval.baseline=false",
        "eval.max_new_tokens=4",  # answers of a random tiny model: a few tokens show the path (2-3 s a launch less)
        "optim.warmup_steps=0", "data.max_seq_len=128", "cluster.timeout_s=120"]


def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    # wandb.setup() in this pytest process (the W&B unit tests) exports WANDB_SERVICE: children must start
    # their own service, as the launcher's ranks do (launcher/local.py worker_env).
    env.pop("WANDB_SERVICE", None)
    # One DeepSpeed op cache for the whole test session (and CI run): the comm op compiles once.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["WANDB_SILENT"] = "true"
    env.update(extra or {})
    return env


def shardtune(*args: str, timeout: int = 600, env: Optional[Dict[str, str]] = None,
              check: bool = False) -> subprocess.CompletedProcess:
    """Run `shardtune ARGS...` in a subprocess; stdout and stderr are captured together."""
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=subprocess_env(env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"shardtune {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def train(run_dir: Path, *overrides: str, tiny: bool = True, **kwargs) -> subprocess.CompletedProcess:
    args = ["train", f"run.dir={run_dir}", *(TINY if tiny else []), *overrides]
    try:
        return shardtune(*args, **kwargs)
    except subprocess.TimeoutExpired:
        kill_run(run_dir)
        raise


def run_method(root: Path, method: str, stage: int, *extra: str) -> Path:
    """A 2-step, 2-rank run of the tiny model with peft `method` under ZeRO `stage` (final checkpoint and
    live export); ZeRO-3 partitions every parameter, adapters included."""
    run_dir = root / f"{method}-zero{stage}"
    overrides = [f"peft={method}", f"deepspeed.stage={stage}", "train.max_steps=2", "optim.lr=1e-3",
                 "data.max_seq_len=64", *extra]
    if stage == 3:
        overrides.append("deepspeed.stage3_param_persistence_threshold=0")
    proc = train(run_dir, *overrides)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return run_dir


def kill_run(run_dir: Path) -> None:
    """SIGKILL what a timed-out launch left (its ranks run in a session of their own): they would
    hold CPU and ports through every later test."""
    import signal

    from trainer.control import processes_of_run

    for pid, _ in processes_of_run(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def metrics(run_dir: Path, kind: str = "train") -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def losses(run_dir: Path) -> List[float]:
    return [r["loss"] for r in metrics(run_dir)]
