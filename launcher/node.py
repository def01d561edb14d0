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
the `deepspeed` launcher in --no_ssh mode starts the node's ranks from a hostfile.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from launcher.compose import has_cuda
from launcher.local import prepare_model_source, run_workers, worker_env
from launcher.slurm_env import derive_port, expand_nodelist, head_node_address, port_key_from_env
from trainer.config import RootConfig, load_run_config
from trainer.run_dir import RunDir
from trainer.control import NODE_ENV, node_identity


def write_hostfile(path: Path, hosts: Sequence[str], slots: int) -> Path:
    """A DeepSpeed hostfile: one `host slots=N` line per node, in node-rank order."""
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    return path


def read_hostfile(path: str) -> List[Tuple[str, int]]:
    """`host slots=N` lines (comments and blank lines skipped); errors name the file and line."""
    hosts = []
    for number, line in enumerate(Path(path).expanduser().read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise SystemExit(f"{path}:{number}: {line!r} is not 'HOST slots=N'")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise SystemExit(f"{path}: no hosts; write one 'HOST slots=N' line per node")
    return hosts


def node_command(cfg: RootConfig, run_dir: Path, node_rank: int, hosts: Sequence[str], addr: str, port: int,
                 use_deepspeed: bool) -> Tuple[List[str], Dict[str, str]]:
    """The command that starts this node's ranks, and the rendezvous environment it needs."""
    nproc, nnodes = cfg.cluster.nproc_per_node, len(hosts)
    rendezvous = {"MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    if not use_deepspeed:  # one rank on this node: no launcher process in between
        return ([sys.executable, "-m", "trainer", "--run-dir", str(run_dir)],
                {**rendezvous, "RANK": str(node_rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(nnodes)})
    hostfile = write_hostfile(RunDir(run_dir).hostfile(node_rank), hosts, nproc)
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", addr, "--master_port", str(port),
            "--module", "trainer", "--run-dir", str(run_dir)]
    return argv, {}


def start_node(cfg: RootConfig, run_dir: Path, on_gpu: bool, node_rank: int, hosts: Sequence[str], addr: str,
               port: int, use_deepspeed: bool) -> int:
    """Run this node's ranks to the end; a signal to us becomes a checkpoint-and-stop request."""
    argv, extra = node_command(cfg, run_dir, node_rank, hosts, addr, port, use_deepspeed)
    env = {**worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node), **extra,
           NODE_ENV: node_identity(addr, port, node_rank)}
    # Ranks must not mistake the launcher task's own Slurm ids for theirs.
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        env.pop(name, None)
    print(f"[shardtune] node {node_rank}/{len(hosts)} ({os.uname().nodename}): {cfg.cluster.nproc_per_node} "
          f"rank(s), rendezvous {addr}:{port}", file=sys.stderr, flush=True)
    return run_workers(argv, env, run_dir, cfg.cluster.heartbeat_timeout_s)


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
