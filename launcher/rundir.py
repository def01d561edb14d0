"""Write the run directory for a launch: everything a worker needs, resolved, so workers never run
Hydra: the config, the DeepSpeed config derived from it, the environment's facts, a launch record.
(The names of the files are trainer/run_dir.py's.)
"""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from launcher.resources import CODE_ROOT
from trainer.config import RootConfig, save_run_config
from trainer.ds_config import build_ds_config
from trainer.run_dir import RunDir

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "datasets", "hydra-core", "wandb", "shardtune")


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(CODE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(CODE_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def world_size(cfg: RootConfig) -> int:
    return cfg.cluster.world_size


def rewrite_for_launch(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> None:
    """config.yaml and the ds_config.json derived from it: what the ranks of a launch read."""
    save_run_config(cfg, run_dir)
    RunDir(run_dir).write_json(RunDir(run_dir).ds_config, build_ds_config(cfg, world_size(cfg), on_gpu))


def write_run_dir(cfg: RootConfig, on_gpu: bool, overrides: list[str]) -> Path:
    """Create or refresh `cfg.run.dir` for a launch; returns its absolute path."""
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run.dir = str(run_dir)
    rewrite_for_launch(cfg, run_dir, on_gpu)
    facts = {"versions": package_versions(), "python": sys.version.split()[0], "platform": platform.platform(),
             "git_revision": git_revision(), "host": socket.gethostname(), "world_size": world_size(cfg),
             "device": "cuda" if on_gpu else "cpu", "overrides": overrides, "time": time.time()}
    paths = RunDir(run_dir)
    paths.write_json(paths.env, facts)
    paths.append_launch({"time": facts["time"], "overrides": overrides, "world_size": facts["world_size"]})
    # A stop request or exit status from an earlier launch must not leak into this one.
    for stale in (paths.stop_request, paths.exit_record):
        stale.unlink(missing_ok=True)
    return run_dir
