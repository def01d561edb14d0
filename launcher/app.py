"""`shardtune train`: the only place Hydra runs.

Compose once, bind to the typed schema, validate, write the run directory, hand it to the
cluster backend. In a sweep (`-m`) Hydra calls `_task` once per trial; a failed trial is
recorded in its run directory and the sweep goes on.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launcher.compose import CONFIG_DIR, PRIMARY, has_cuda, register
from launcher.rundir import world_size, write_run_dir
from trainer.config import RootConfig, to_config
from trainer.output_log import tee_output
from trainer.run_dir import RunDir
from trainer.validate import ConfigError, validate

_exit_codes: List[int] = []


def launch(cfg: RootConfig, on_gpu: bool, overrides: List[str]) -> int:
    """Write the run directory and start the workers with the configured backend."""
    # Every mode writes the run directory (config.yaml, control/): none may while a launch uses it.
    node = this_node(cfg)
    # First the live processes (ranks that outlived a killed launcher hold no lock; the message
    # lists them), then the lock (a launch started in the same second has no ranks yet).
    refuse_if_in_use(Path(cfg.run.dir).expanduser(), slurm=cfg.cluster.backend == "slurm", node=node)
    with launch_lock(Path(cfg.run.dir).expanduser(), shared_by_nodes=node is not None):
        return _launch(cfg, on_gpu, overrides, node)


def _launch(cfg: RootConfig, on_gpu: bool, overrides: List[str], node: Optional[str]) -> int:
    from launcher.resume import decide_resume
    from trainer.control import record_resume_decision

    # What the ranks resume from, decided here once (a checkpoint saved on another world size or
    # ZeRO stage is converted, keeping the global batch). No-ssh nodes share run.dir: node 0
    # converts, the others wait for its result.
    decision = decide_resume(cfg, world_size(cfg), convert=cfg.run.launch != "dry_run",
                             converts_here=node is None or cfg.cluster.node_rank == 0)
    run_dir = write_run_dir(cfg, on_gpu, overrides)
    if cfg.run.launch != "dry_run":
        record_resume_decision(run_dir, decision.resume_from, decision.universal, decision.reason)
    if cfg.run.launch != "spawn":
        return _start(cfg, run_dir, on_gpu)
    logs = RunDir(run_dir)
    # What this launcher prints, its ranks' output included, also goes to logs/ (each no-ssh node its own file).
    with tee_output(logs.launcher_log(cfg.cluster.node_rank if node else 0)):
        try:
            print(f"[shardtune] run directory: {run_dir}", file=sys.stderr, flush=True)
            from launcher.local import prepare_model_source

            prepare_model_source(cfg, convert=cfg.cluster.backend != "slurm")
            return _start(cfg, run_dir, on_gpu)
        finally:
            print(f"[shardtune] logs: {logs.logs}/", file=sys.stderr, flush=True)


def _start(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> int:
    """Hand the written run directory to the configured backend."""
    if cfg.cluster.backend == "slurm":
        from launcher.slurm import launch_slurm

        return launch_slurm(cfg, run_dir, on_gpu)
    if cfg.cluster.backend == "hostfile":
        from launcher.hostfile import launch_hostfile

        return launch_hostfile(cfg, run_dir, on_gpu)
    from launcher.local import launch_local

    return launch_local(cfg, run_dir, on_gpu)


@contextlib.contextmanager
def launch_lock(run_dir: Path, shared_by_nodes: bool = False):
    """Hold an exclusive lock on <run.dir>/control/launch.lock while this launcher runs: two launches
    started in the same second both pass the process check, but only one gets the lock (the
    kernel drops it when the launcher dies, however it dies). No-ssh node launchers share run.dir and
    take none; on a file system without locks the process check (refuse_if_in_use) is what remains."""
    from trainer.control import launcher_identity

    if shared_by_nodes:
        yield
        return
    path = RunDir(run_dir).launch_lock
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError:
        yield  # run_dir_problem has already said whether run.dir can be written at all
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another launcher"
            raise ConfigError([f"run.dir={run_dir} is in use by the launch of {holder} (it holds {path}): "
                               f"wait for it, or stop it with a checkpoint (shardtune stop {run_dir}), then run "
                               "the same command to resume"]) from None
        except OSError:
            pass  # no flock on this file system (some Lustre mounts): the process check still runs
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(launcher_identity() + "\n")
            handle.flush()
        yield


def this_node(cfg: RootConfig) -> Optional[str]:
    """"ADDR:PORT/RANK" for a no-ssh node launcher (whose peers may share this host), else None."""
    if cfg.cluster.backend == "hostfile" and cfg.cluster.no_ssh:
        from trainer.control import node_identity

        return node_identity(cfg.cluster.master_addr, cfg.cluster.master_port, cfg.cluster.node_rank)
    return None


def refuse_if_in_use(run_dir: Path, slurm: bool = False, node: Optional[str] = None) -> None:
    """Two launches writing one run directory would interleave checkpoints and metrics: refuse
    while processes of an earlier launch (on this host) are alive, or its Slurm job is queued or
    running (a requeued job would also read the rewritten config). A no-ssh node launcher (`node`)
    does not count the other node ranks of its own rendezvous started on this host."""
    from trainer.control import processes_of_run

    if slurm and os.environ.get("SHARDTUNE_BATCH_JOB") is None:  # not from inside our own job script
        from launcher.slurm import active_job

        job = active_job(run_dir)
        if job:
            raise ConfigError([f"run.dir={run_dir} belongs to Slurm job {job[0]}, which is {job[1]}: a second job "
                               f"would write the same directory. Wait for it (squeue -j {job[0]}), stop it with a "
                               f"checkpoint (shardtune stop {run_dir}) or cancel it (scancel {job[0]}), then "
                               "submit again: it resumes from the last checkpoint"])
    alive = processes_of_run(run_dir, node)
    if alive:
        listed = "\n".join(f"    pid {pid}: {command[:160]}" for pid, command in alive[:6])
        raise ConfigError([f"run.dir={run_dir} is in use by {len(alive)} process(es) of an earlier launch:\n{listed}\n"
                           f"  stop them first (`shardtune stop {run_dir}` checkpoints and ends them; or kill "
                           f"{' '.join(str(pid) for pid, _ in alive[:6])}), then run the same command to resume"])


def _task(node: DictConfig) -> int:
    from trainer.checkpoint_catalog import CheckpointError
    from trainer.pretrained import ModelSourceError

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:  # each trial is a run of its own inside the sweep directory
        node.run.dir = hydra_cfg.runtime.output_dir
        node.run.name = f"{Path(hydra_cfg.sweep.dir).name}-{hydra_cfg.job.num}"
        if node.logger.get("group") is None:  # W&B: the trials of a sweep side by side
            node.logger.group = Path(hydra_cfg.sweep.dir).name
    overrides = list(hydra_cfg.overrides.task)
    started = time.time()
    cfg = None
    try:
        cfg = to_config(node)
        on_gpu = has_cuda(cfg)
        validate(cfg, has_cuda=on_gpu)
        code = launch(cfg, on_gpu, overrides)
    except ConfigError as err:
        print(f"shardtune: {err}", file=sys.stderr)
        code = 2
    except ModelSourceError as err:  # a hub id not cached and not downloadable, an unwritable cache
        print(f"shardtune: {err}", file=sys.stderr)
        code = 2
    except CheckpointError as err:  # a resume's conversion failed, or node 0's never came: said, not a traceback
        print(f"shardtune: {err}", file=sys.stderr)
        code = 1
    except (Exception, SystemExit) as err:
        if not multirun:
            raise
        print(f"shardtune: trial {hydra_cfg.job.num} failed: {err}", file=sys.stderr)  # the sweep goes on
        code = 1
    _exit_codes.append(code)
    if not multirun:
        return code
    from launcher.sweep_cmd import record_trial

    metric = record_trial(Path(hydra_cfg.runtime.output_dir), cfg, code, overrides, time.time() - started)
    # Optuna needs a number to minimise; a failed trial scores +inf and the search goes on.
    return metric if "optuna" in str(hydra_cfg.sweeper.get("_target_", "")).lower() else code


def run_dir_problem(argv: List[str]) -> str | None:
    """A run.dir given on the command line that cannot be created: said plainly, before Hydra
    (which creates it first) fails with a traceback."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")]
    inspecting = {"-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}
    if not given or "${" in given[-1] or inspecting & set(argv):
        return None  # a sweep makes its own directories; --cfg/--help make none
    try:
        Path(given[-1]).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return (f"run.dir={given[-1]} cannot be created ({err.strerror or err}); give a writable directory "
                "(relative paths are from the current directory)")
    return None


# Hydra flags that take a value (`-cd DIR`); --info takes one of its topics, or none.
_VALUE_FLAGS = {"-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path", "-c", "--cfg", "-p",
                "--package", "-sc", "--shell-completion"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def override_problem(argv: List[str]) -> str | None:
    """A bad override (an unknown key, a wrong group) said in our words before Hydra's main would print
    its own traceback-style advice. Sweeps (-m) and --help are left to Hydra."""
    if {"-m", "--multirun", "-h", "--help", "--hydra-help", "-sc", "--shell-completion"} & set(argv):
        return None
    overrides, config_dirs, config_name, rest = [], [], PRIMARY, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-cd", "--config-dir") and rest:
            config_dirs.append(rest.pop(0))
        elif arg.startswith("--config-dir="):
            config_dirs.append(arg.split("=", 1)[1])
        elif arg in ("-cn", "--config-name") and rest:
            config_name = rest.pop(0)
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in _VALUE_FLAGS and rest:
            rest.pop(0)
        elif arg in ("-i", "--info") and rest and rest[0] in _INFO_TOPICS:
            rest.pop(0)
        elif not arg.startswith("-"):
            overrides.append(arg)
    from launcher.compose import compose_node

    try:
        compose_node(overrides, config_dirs, config_name)
    except ConfigError as err:
        return "\n".join(err.problems)
    return None


def _submit_array(trials: List[Path]) -> int:
    """The sweep's Slurm trials, written by Hydra's sweep, submitted as one job array."""
    from launcher.slurm_array import submit_sweep
    from trainer.config import load_run_config

    try:
        submit_sweep(trials, load_run_config(trials[0]).cluster.slurm.sweep_parallelism)
    except SystemExit as err:  # sbatch refused: its own words
        print(f"shardtune: {err}", file=sys.stderr)
        return 1
    return 0


def train_main(argv: List[str]) -> int:
    """Run Hydra on `argv` (overrides and Hydra flags such as --cfg job, --help, -m)."""
    register()
    _exit_codes.clear()
    if {"-V", "--version"} & set(argv):  # ours, not Hydra's
        from launcher.cli import version_text

        print(version_text())
        return 0
    keys = [a for a in argv if not a.startswith("-") and "=" not in a]
    if {"-h", "--help"} & set(argv) and keys:  # `--help KEY`: what the key does, from the schema
        from launcher.config_cmd import main as describe_keys

        return describe_keys([a for a in argv if a not in ("-h", "--help")])
    problem = run_dir_problem(argv) or override_problem(argv)
    if problem:
        print(f"shardtune: {problem}", file=sys.stderr)
        return 2
    sys.argv = ["shardtune train", *argv]
    app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(_task)
    from launcher import slurm

    slurm.sweep_trials = [] if {"-m", "--multirun"} & set(argv) else None  # Slurm trials: one array
    try:
        app()
        if slurm.sweep_trials and _submit_array(slurm.sweep_trials) != 0:
            return 1
    finally:
        slurm.sweep_trials = None
    if not _exit_codes:
        return 0  # --cfg, --help and friends
    return 0 if len(_exit_codes) > 1 and any(c == 0 for c in _exit_codes) else max(_exit_codes, key=abs)
