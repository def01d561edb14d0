"""cluster=local: N ranks on this machine through DeepSpeed's per-node launcher (one plain process for N=1)."""
from __future__ import annotations

import contextlib
import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from launcher.deepspeed_launch import launch_command
from launcher.devices import gpu_count, local_gpu_args, local_world
from launcher.resources import CODE_ROOT
from trainer.allocator import preload_env
from trainer.config import RootConfig
from trainer.run_dir import RunDir
from trainer.control import (EXIT_HUNG, EXIT_OK, EXIT_RESUME_ME, HEARTBEAT_DIR_ENV, LAUNCHER_ENV, describe_rank,
                             describe_stragglers, known_heartbeats, launcher_identity, likely_stuck, rank_heartbeat,
                             read_heartbeats, record_exit, recorded_exit, request_stop, stale_ranks,
                             write_node_summary)

WATCH_EVERY_S = 1.0  # how often the launcher looks at the heartbeats
# How often a node launcher copies its ranks' (node-local) heartbeats into the shared run directory,
# for `shardtune report` and for ranks on other nodes naming a straggler: one small file per node.
SUMMARY_EVERY_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def usable_cpus() -> int:
    """The CPUs this process may run on: Slurm's share of a node (its cgroup/affinity), not the whole
    machine, so that the ranks of a job on a shared node do not oversubscribe it."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def worker_env(cfg: RootConfig, on_gpu: bool, ranks_on_node: int) -> Dict[str, str]:
    """Environment every rank inherits: device choice, threads, NCCL/gloo settings from config."""
    env = dict(os.environ)
    # A W&B service of the shell that launched us (wandb.setup() in a notebook or script exports
    # WANDB_SERVICE) must not serve the ranks: a killed launch's run would stay "in use" there, and
    # its requeue could not resume it. Rank 0 starts its own, which ends with it.
    env.pop("WANDB_SERVICE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    threads = cfg.cluster.threads_per_rank or max(1, usable_cpus() // ranks_on_node)
    env["OMP_NUM_THREADS"] = str(threads)
    env.update({k: str(v) for k, v in cfg.cluster.env.items()})
    return preload_env(cfg.cluster.allocator, on_gpu, env)


def local_command(cfg: RootConfig, run_dir: Path, port: int, on_gpu: bool = False,
                  environ: Mapping[str, str] = os.environ) -> Tuple[List[str], Dict[str, str]]:
    """The exact command and extra environment for a local launch: one plain process for one rank, else
    DeepSpeed's per-node launcher on the devices the user chose (CUDA_VISIBLE_DEVICES or
    cluster.include/exclude from `environ`/`cfg`: launcher/devices.py)."""
    nproc = cfg.cluster.nproc_per_node
    chosen_by_config = on_gpu and (cfg.cluster.include or cfg.cluster.exclude)
    if nproc == 1 and not chosen_by_config:  # one plain process; it inherits CUDA_VISIBLE_DEVICES as is
        extra = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}
        return [sys.executable, "-m", "trainer", "--run-dir", str(run_dir)], extra
    world = local_world(cfg, environ, on_gpu, gpu_count)
    return launch_command(world, 0, "127.0.0.1", port, run_dir), {}


def prepare_model_source(cfg: RootConfig, convert: bool = True) -> None:
    """Have the model's folder ready on this node before any rank starts, made by this process (one
    that writes whole files, never a rank a library may treat as non-main): the hub download, and
    with `convert` the GGUF conversion or builtin random init. At a Slurm submission only the
    download runs (login nodes have the network; the conversion is the compute node's work)."""
    from trainer.model_source import prepare_model
    from trainer.pretrained import ModelSourceError, is_hub_id, resolve_model_dir

    model = cfg.model
    try:
        if convert:
            prepare_model(model, cfg.seed)
        elif is_hub_id(model.name_or_path):
            resolve_model_dir(model.name_or_path, model.gguf_file, model.cache_dir, model.revision, download=True)
    except (FileNotFoundError, FileExistsError) as err:
        raise ModelSourceError(str(err)) from None


def manual_commands(run_dir: Path, nproc: int, devices: List[str] | None = None) -> List[str]:
    """Ways to start the same workers by hand, for users who bring their own launcher. `devices`: the
    deepspeed launcher's device flags (default --num_gpus NPROC)."""
    d = shlex.quote(str(run_dir))
    flags = shlex.join(devices or ["--num_gpus", str(nproc)])
    return [f"deepspeed {flags} --module trainer --run-dir {d}",
            f"torchrun --nproc_per_node {nproc} -m trainer --run-dir {d}",
            f"srun --ntasks-per-node {nproc} python -m trainer --run-dir {d}   # sets SLURM_PROCID etc."]


def exit_code(run_dir: Path, launcher_code: int, liveness: Optional["Liveness"] = None) -> int:
    """The launcher's code, except that a clean stop is always reported as 'resume me'."""
    recorded = recorded_exit(run_dir)
    if recorded is None:
        return launcher_code
    if recorded == EXIT_RESUME_ME or launcher_code == 0:
        return recorded
    done = all_ranks_done(run_dir, liveness.folder, liveness.ranks) if liveness else all_ranks_done(run_dir)
    if recorded == EXIT_OK and done:
        # Rank 0 records 0 only after the last step, checkpoint and export; with every rank's last
        # heartbeat "done", nothing was left to lose: a crash while tearing down is reported, not failed.
        print(f"[shardtune] every rank finished, but one exited {launcher_code} while shutting down; "
              "the run is complete", file=sys.stderr, flush=True)
        return EXIT_OK
    return launcher_code


def all_ranks_done(run_dir: Path, folder: Optional[Path] = None, ranks: Optional[range] = None) -> bool:
    # Nothing in the folder (a launcher waiting on node launchers): their summaries say.
    beats = read_heartbeats(run_dir, ranks, folder) or (known_heartbeats(run_dir) if ranks is None else [])
    return bool(beats) and all(b.get("phase") == "done" for b in beats)


@dataclass
class Liveness:
    """Where a launcher's ranks beat, and what it watches: `ranks` (a node's; None: every rank in `folder`).
    `node_local`: the folder is on this node (we launch on every node); the launcher then copies a
    summary into the shared run directory every SUMMARY_EVERY_S and at the end."""
    folder: Path
    ranks: Optional[range]
    node_local: bool

    @classmethod
    def choose(cls, run_dir: Path, watched: Optional[range], node_local: bool) -> "Liveness":
        rd = RunDir(run_dir)
        return cls(rd.node_heartbeats if node_local else rd.heartbeats, watched, node_local)

    def clear(self) -> None:
        """An earlier launch's heartbeats would look like a hang at once: remove this launcher's ranks'."""
        paths = sorted(self.folder.glob("rank*.json")) if self.ranks is None else \
            [rank_heartbeat(self.folder, r) for r in self.ranks]
        for path in paths:
            path.unlink(missing_ok=True)

    def summarise(self, run_dir: Path) -> None:
        if self.node_local:
            try:
                write_node_summary(run_dir, self.folder, self.ranks[0] if self.ranks else 0, self.ranks)
            except OSError:
                pass  # liveness for the report: a full disk must not end the job here

    def close(self, run_dir: Path) -> None:
        """The last summary, then the node-local files go (they live in memory on /dev/shm)."""
        if self.node_local:
            self.summarise(run_dir)
            self.clear()
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # when no other launcher of this run (same host) still uses it


def run_workers(argv: List[str], env: Dict[str, str], run_dir: Path, heartbeat_timeout_s: float = 0,
                watched: Optional[range] = None, node_local: bool = True) -> int:
    """Run the workers in their own session; turn our signals into a checkpoint-and-stop request.

    While they run, a watchdog reads the ranks' heartbeats: a live rank silent for longer than
    `heartbeat_timeout_s` (0: no watchdog) ends the whole job with EXIT_HUNG and a message naming it.
    `watched`: the ranks this launcher started (a node's), None: all. `node_local`: the ranks run on
    this node (always, except a hostfile launch whose remote ranks no launcher of ours watches), so
    they beat into node-local storage, not the shared run directory.
    Whatever happens, every process of the job is gone when this returns (no orphans).
    """
    liveness = Liveness.choose(run_dir, watched, node_local)
    liveness.clear()
    env = {**env, LAUNCHER_ENV: launcher_identity()}  # ranks that outlive us checkpoint and stop
    if node_local:
        env[HEARTBEAT_DIR_ENV] = str(liveness.folder)
    else:
        env.pop(HEARTBEAT_DIR_ENV, None)
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    interrupts = []

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        interrupts.append(name)
        if name == "SIGINT" and len(interrupts) > 1:
            _kill_job(process)  # a second Ctrl-C: stop now, lose the current step
            return
        print(f"[shardtune] {name}: asking all ranks to checkpoint and stop "
              f"(Ctrl-C again to kill)", file=sys.stderr, flush=True)
        request_stop(run_dir, name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        code = _wait_watching(process, run_dir, heartbeat_timeout_s, liveness)
        if code != EXIT_HUNG:
            code = exit_code(run_dir, code, liveness)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _kill_job(process)  # ranks left behind by a failed launcher (none when all went well)
        liveness.close(run_dir)
    return code


def _wait_watching(process: subprocess.Popen, run_dir: Path, heartbeat_timeout_s: float, liveness: Liveness) -> int:
    next_summary = time.monotonic() + SUMMARY_EVERY_S
    while True:
        try:
            return process.wait(timeout=WATCH_EVERY_S)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= next_summary:
            liveness.summarise(run_dir)
            next_summary = time.monotonic() + SUMMARY_EVERY_S
        stale = (stale_ranks(run_dir, heartbeat_timeout_s, ranks=liveness.ranks, folder=liveness.folder)
                 if heartbeat_timeout_s > 0 else [])
        if stale:
            report_hang(run_dir, heartbeat_timeout_s, stale)
            _kill_job(process)
            process.wait()
            return EXIT_HUNG


def report_hang(run_dir: Path, heartbeat_timeout_s: float, stale: list) -> None:
    """Say which rank stopped answering (and where), on stderr and in control/exit.json.
    `stale`: the ranks found silent (read once: one may beat again meanwhile)."""
    culprit = describe_rank(likely_stuck(stale)[0], time.time())
    detail = (f"hang: no heartbeat for more than cluster.heartbeat_timeout_s={heartbeat_timeout_s:g}s; "
              f"stuck: {culprit}\n{describe_stragglers(run_dir)}")
    print(f"[shardtune] {detail}\n[shardtune] ending the job (exit code {EXIT_HUNG}); resume to continue "
          "from the last checkpoint", file=sys.stderr, flush=True)
    record_exit(run_dir, EXIT_HUNG, detail)


def _kill_job(process: subprocess.Popen) -> None:
    """SIGKILL the job's process group (the workers' session), stopped processes included."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_local(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> int:
    port = cfg.cluster.master_port or free_port()
    argv, extra = local_command(cfg, run_dir, port, on_gpu)
    env = {**worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node), **extra}
    if cfg.run.launch == "dry_run":
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        print("would run:\n  " + shlex.join(argv) + "\nwith environment:\n" +
              "\n".join(f"  {k}={v}" for k, v in sorted(changed.items())))
        return 0
    if cfg.run.launch == "print":
        print(f"run directory written: {run_dir}\nstart the workers with one of:\n  " +
              "\n  ".join(manual_commands(run_dir, cfg.cluster.nproc_per_node,
                                           local_gpu_args(cfg, os.environ) if on_gpu else None)))
        return 0
    if port_is_free(port):  # no live job rendezvouses there: buffers of that port are a killed job's
        remove_shm_buffers(port)
    try:
        return run_workers(argv, env, run_dir, cfg.cluster.heartbeat_timeout_s)
    finally:
        remove_shm_buffers(port)


def port_is_free(port: int) -> bool:
    """Nothing listens on `port`, over IPv4 or IPv6 (a rendezvous store may bind either)."""
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family) as sock:
                sock.bind((address, port))
        except OSError as err:
            if family == socket.AF_INET6 and err.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 here
            return False
    return True


def remove_shm_buffers(port: int) -> None:
    """Delete DeepSpeed's CPU all-reduce buffers of this job from /dev/shm.

    Ranks that are killed never unlink them; each is tens of MB, a full /dev/shm makes later
    jobs on the machine hang in their first collective, and a later job on the same port would
    open a dead job's buffers, flags and all.
    """
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)
