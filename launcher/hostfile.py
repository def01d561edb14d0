"""cluster=hostfile: several nodes without Slurm.

Over ssh (default): the `deepspeed` launcher reads cluster.hostfile (`host slots=N` lines), reaches
every host with pdsh (cluster.ssh_launcher) and starts its ranks there. The run directory must be
on a file system all hosts share; the workers' environment (device, threads, cluster.env such as
NCCL_SOCKET_IFNAME) travels in <run.dir>/deepspeed_env, which the launcher exports on each host.

No ssh (cluster.no_ssh=true): run the same `shardtune train ...` on every node, each with its own
cluster.node_rank, the same cluster.master_addr (node 0's address) and cluster.master_port.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List

from launcher.local import run_workers, worker_env
from launcher.node import node_command, read_hostfile, start_node
from trainer.allocator import choose as choose_allocator
from trainer.config import RootConfig


def host_names(cfg: RootConfig) -> List[str]:
    """Node names in node-rank order: from the hostfile, else placeholders (no-ssh needs none)."""
    if cfg.cluster.hostfile:
        hosts = read_hostfile(cfg.cluster.hostfile)
        if len(hosts) != cfg.cluster.nnodes:
            raise SystemExit(f"cluster.hostfile={cfg.cluster.hostfile} lists {len(hosts)} host(s) but "
                             f"cluster.nnodes={cfg.cluster.nnodes}")
        return [name for name, _ in hosts]
    return [f"node{rank}" for rank in range(cfg.cluster.nnodes)]


def ssh_command(cfg: RootConfig, run_dir: Path) -> List[str]:
    port = cfg.cluster.master_port or 29500
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(Path(cfg.cluster.hostfile).expanduser()),
            "--launcher", cfg.cluster.ssh_launcher, "--num_nodes", str(cfg.cluster.nnodes),
            "--num_gpus", str(cfg.cluster.nproc_per_node), "--master_addr", cfg.cluster.master_addr,
            "--master_port", str(port), "--module", "trainer", "--run-dir", str(run_dir)]


def write_remote_env(cfg: RootConfig, on_gpu: bool, run_dir: Path) -> Path:
    """The variables every remote rank needs; the deepspeed launcher exports the file's lines there."""
    env = worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node)
    keys = ["OMP_NUM_THREADS", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", *cfg.cluster.env]
    if not on_gpu:
        keys.append("DS_ACCELERATOR")
    if choose_allocator(cfg.cluster.allocator, on_gpu):  # the same library path on every host
        keys += ["LD_PRELOAD", "MALLOC_CONF"]
    path = run_dir / "deepspeed_env"
    path.write_text("".join(f"{k}={env[k]}\n" for k in keys if env.get(k)))
    return path


def launch_hostfile(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> int:
    hosts = host_names(cfg)
    if cfg.cluster.no_ssh:
        if cfg.run.launch != "spawn":
            argv, extra = node_command(cfg, run_dir, cfg.cluster.node_rank, hosts, cfg.cluster.master_addr,
                                       cfg.cluster.master_port, use_deepspeed=True)
            print("would run on this node:\n  " + shlex.join(argv))
            return 0
        return start_node(cfg, run_dir, on_gpu, cfg.cluster.node_rank, hosts, cfg.cluster.master_addr,
                          cfg.cluster.master_port, use_deepspeed=True)
    env = worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node)
    env["DS_ENV_FILE"] = str(write_remote_env(cfg, on_gpu, run_dir))
    argv = ssh_command(cfg, run_dir)
    if cfg.run.launch != "spawn":
        print(f"would run:\n  DS_ENV_FILE={env['DS_ENV_FILE']} {shlex.join(argv)}")
        return 0
    print(f"[shardtune] {len(hosts)} hosts over {cfg.cluster.ssh_launcher}: {', '.join(hosts)}", file=sys.stderr)
    return run_workers(argv, env, run_dir, cfg.cluster.heartbeat_timeout_s)
