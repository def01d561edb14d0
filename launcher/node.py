"""One node's share of a multi-node run: start this node's ranks and join the world.

Two callers:
  * Slurm: the batch script runs `python -m launcher.node --run-dir D` once per node (`srun
    --ntasks-per-node=1`). The rendezvous comes from the job: MASTER_ADDR is the first node of
    SLURM_JOB_NODELIST (its NodeAddr from scontrol when the name does not resolve), MASTER_PORT is
    derived from the job id (two jobs sharing a node get different ports), the node rank is
    SLURM_NODEID.
  * cluster=hostfile with cluster.no_ssh=true: `shardtune train` on every node, each with its
    cluster.node_rank, calls `start_node` directly.

For one rank per node the rank is a plain `python -m trainer` with RANK/WORLD_SIZE set; for more,
DeepSpeed's per-node launcher starts the node's ranks (launcher/deepspeed_launch.py), as DeepSpeed's
runner would in --no_ssh mode.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from launcher.compose import has_cuda
from launcher.deepspeed_launch import launch_command
from launcher.devices import VISIBLE, node_world, visible_entries, visible_gpus
from launcher.devices import read_hostfile  # noqa: F401  moved to launcher/devices.py; still importable here
from launcher.local import prepare_model_source, run_workers, worker_env
from launcher.slurm_env import derive_port, expand_nodelist, head_node_address, port_key_from_env
from trainer.config import RootConfig, load_run_config
from trainer.control import NODE_ENV, node_identity


def node_command(cfg: RootConfig, run_dir: Path, node_rank: int, hosts: Sequence[str], addr: str, port: int,
                 use_deepspeed: bool, visible: Optional[List[int]] = None) -> Tuple[List[str], Dict[str, str]]:
    """The command that starts this node's ranks, and the rendezvous environment it needs. `visible`: this
    node's CUDA_VISIBLE_DEVICES on a GPU run (the ranks use those GPUs; launcher/devices.py)."""
    nproc, nnodes = cfg.cluster.nproc_per_node, len(hosts)
    rendezvous = {"MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    if not use_deepspeed:  # one rank on this node: no launcher process in between
        return ([sys.executable, "-m", "trainer", "--run-dir", str(run_dir)],
                {**rendezvous, "RANK": str(node_rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(nnodes)})
    return launch_command(node_world(hosts, node_rank, nproc, visible), node_rank, addr, port, run_dir), {}


def start_node(cfg: RootConfig, run_dir: Path, on_gpu: bool, node_rank: int, hosts: Sequence[str], addr: str,
               port: int, use_deepspeed: bool) -> int:
    """Run this node's ranks to the end; a signal to us becomes a checkpoint-and-stop request."""
    visible = node_gpus(cfg, on_gpu)
    argv, extra = node_command(cfg, run_dir, node_rank, hosts, addr, port, use_deepspeed, visible)
    env = {**worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node), **extra,
           NODE_ENV: node_identity(addr, port, node_rank)}
    # Ranks must not mistake the launcher task's own Slurm ids for theirs.
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        env.pop(name, None)
    print(f"[shardtune] node {node_rank}/{len(hosts)} ({os.uname().nodename}): {cfg.cluster.nproc_per_node} "
          f"rank(s), rendezvous {addr}:{port}", file=sys.stderr, flush=True)
    nproc = cfg.cluster.nproc_per_node
    return run_workers(argv, env, run_dir, cfg.cluster.heartbeat_timeout_s,
                       watched=range(node_rank * nproc, (node_rank + 1) * nproc))  # this node's ranks


def node_gpus(cfg: RootConfig, on_gpu: bool, environ=os.environ) -> Optional[List[int]]:
    """This node's CUDA_VISIBLE_DEVICES on a GPU run (Slurm sets it from the job's GPUs), checked against the
    node's ranks before any starts; None on CPU or when unset."""
    entries = visible_entries(environ) if on_gpu else None
    if not entries:
        return None
    if len(entries) != cfg.cluster.nproc_per_node:
        raise SystemExit(f"[shardtune] node: {VISIBLE}={','.join(entries)} gives {len(entries)} GPU(s) but "
                         f"cluster.nproc_per_node={cfg.cluster.nproc_per_node} (one rank per GPU): ask for "
                         f"{cfg.cluster.nproc_per_node} GPU(s) per node (cluster.slurm.gpus_per_node) or set "
                         f"cluster.nproc_per_node={len(entries)}")
    try:
        return visible_gpus(environ)
    except ValueError:
        # UUIDs (some Slurm sites, MIG): --include cannot name them. As before, the ranks take the job's GPUs
        # 0..N-1 as this node numbers them, which are the job's own where Slurm confines its devices.
        print(f"[shardtune] node: {VISIBLE}={environ[VISIBLE]} holds no GPU indices; ranks use GPUs 0-"
              f"{len(entries) - 1} as this node numbers them", file=sys.stderr, flush=True)
        return None


def slurm_rendezvous(cfg: RootConfig, env=os.environ) -> Tuple[int, List[str], str, int]:
    """(node rank, node names, head address, port) from the job's environment."""
    nodes = expand_nodelist(env["SLURM_JOB_NODELIST"])
    if len(nodes) != cfg.cluster.nnodes:
        raise SystemExit(f"this job has {len(nodes)} node(s) ({env['SLURM_JOB_NODELIST']}) but the run was "
                         f"written for cluster.nnodes={cfg.cluster.nnodes}")
    port = cfg.cluster.master_port or derive_port(port_key_from_env(env))
    return int(env["SLURM_NODEID"]), nodes, head_node_address(nodes), port


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.node", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="the run directory `shardtune train` wrote")
    run_dir = Path(parser.parse_args(argv).run_dir).resolve()
    cfg = load_run_config(run_dir)
    node_rank, nodes, addr, port = slurm_rendezvous(cfg)
    prepare_model_source(cfg)  # before any rank of this node needs it
    return start_node(cfg, run_dir, has_cuda(cfg), node_rank, nodes, addr, port,
                      use_deepspeed=cfg.cluster.nproc_per_node > 1)


if __name__ == "__main__":
    sys.exit(main())
