"""cluster=hostfile: several nodes without Slurm.

Over ssh (default): the `deepspeed` launcher reads cluster.hostfile (`host slots=N` lines), reaches
every host with pdsh (cluster.ssh_launcher) and starts its ranks there. The run directory must be
on a file system all hosts share; the workers' environment (device, threads, cluster.env such as
NCCL_SOCKET_IFNAME) travels in <run.dir>/deepspeed_env, which the launcher exports on each host.

No ssh (cluster.no_ssh=true): run the same `shardtune train ...` on every node, each with its own
cluster.node_rank, the same cluster.master_addr (node 0's address) and cluster.master_port.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from launcher.local import run_workers, worker_env
from launcher.devices import VISIBLE, filter_args, read_hostfile, select_slots
from launcher.node import node_command, node_gpus, start_node
from trainer.allocator import choose as choose_allocator
from trainer.config import ConfigError, RootConfig
from trainer.run_dir import RunDir


def host_names(cfg: RootConfig) -> List[str]:
    """Node names in node-rank order: from the hostfile, else placeholders (no-ssh needs none)."""
    if cfg.cluster.hostfile:
        # cluster.include/exclude may leave out hosts (validated: GPU runs over ssh only)
        hosts = list(select_slots(dict(read_hostfile(cfg.cluster.hostfile)), cfg.cluster.include, cfg.cluster.exclude))
        if len(hosts) != cfg.cluster.nnodes:
            raise SystemExit(f"cluster.hostfile={cfg.cluster.hostfile} lists {len(hosts)} host(s) but "
                             f"cluster.nnodes={cfg.cluster.nnodes}")
        return hosts
    return [f"node{rank}" for rank in range(cfg.cluster.nnodes)]


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def is_local(host: str) -> bool:
    return host in LOCAL_NAMES or host.startswith("127.") or host in (socket.gethostname(), socket.getfqdn())


def rendezvous_address(cfg: RootConfig, hosts: List[str]) -> str:
    """Where rank 0 listens: cluster.master_addr, unless it is a loopback address that the other
    hosts could not reach; then the hostfile's first host (node 0, where rank 0 runs)."""
    addr = cfg.cluster.master_addr
    if not is_local(addr) or all(is_local(host) for host in hosts):
        return addr
    head = socket.gethostname() if is_local(hosts[0]) else hosts[0]
    print(f"[shardtune] cluster.master_addr={addr} is a loopback address, which the other hosts cannot reach: "
          f"rank 0 listens on the hostfile's first host, {head} (set cluster.master_addr to choose)",
          file=sys.stderr, flush=True)
    return head


def ssh_options(cfg: RootConfig) -> List[str]:
    """The ssh options the launcher will use: the user's PDSH_SSH_ARGS_APPEND (pdsh) and cluster.ssh_port."""
    options = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", "")) if cfg.cluster.ssh_launcher == "pdsh" else []
    return options + (["-p", str(cfg.cluster.ssh_port)] if cfg.cluster.ssh_port else [])


def unreachable_hosts(hosts: List[str], options: List[str], timeout_s: int = 20) -> List[Tuple[str, str]]:
    """(host, ssh's complaint) for every host that `ssh HOST true` cannot reach without a password.

    The deepspeed launcher checks only the first host, and a host that cannot be reached later
    leaves the others waiting for the rendezvous until the collective timeout."""
    base = ["ssh", *options, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}"]
    probes = {host: subprocess.Popen([*base, host, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True) for host in hosts}
    failed = []
    for host, probe in probes.items():
        try:
            _, err = probe.communicate(timeout=timeout_s + 10)
        except subprocess.TimeoutExpired:
            probe.kill()
            err, probe.returncode = f"no answer within {timeout_s + 10}s", 255
        if probe.returncode != 0:
            failed.append((host, (err.strip().splitlines() or [f"exit {probe.returncode}"])[-1]))
    return failed


def ssh_problem(cfg: RootConfig, hosts: List[str]) -> Optional[str]:
    """Why the launch over ssh cannot start (a tool missing, a host unreachable), or None."""
    for program in ["ssh"] + (["pdsh"] if cfg.cluster.ssh_launcher == "pdsh" else []):  # MPI: its launcher says
        if not shutil.which(program):
            return (f"cluster.ssh_launcher={cfg.cluster.ssh_launcher} needs `{program}` on this machine's PATH; "
                    f"install it, or run without ssh (cluster.no_ssh=true, docs/multinode.md)")
    failed = unreachable_hosts(hosts, ssh_options(cfg))
    if not failed:
        return None
    listed = "\n".join(f"    {host}: {why}" for host, why in failed)
    return (f"{len(failed)} of {len(hosts)} host(s) in cluster.hostfile={cfg.cluster.hostfile} cannot be reached "
            f"by ssh without a password:\n{listed}\n  set up key-based ssh to every host (`ssh HOST true` must "
            "succeed without a prompt; cluster.ssh_port for another port, PDSH_SSH_ARGS_APPEND for other ssh "
            "options), or run without ssh (cluster.no_ssh=true, docs/multinode.md)")


def ssh_devices(cfg: RootConfig, on_gpu: bool) -> List[str]:
    """The runner's node and device flags. On GPUs, --num_gpus would replace every host's slots= by
    range(nproc_per_node): the hostfile's slots (each validated equal to nproc_per_node) stand instead, or
    cluster.include/exclude choose (the runner takes neither with --num_nodes/--num_gpus)."""
    if on_gpu:
        return filter_args(cfg) or ["--num_nodes", str(cfg.cluster.nnodes)]
    return ["--num_nodes", str(cfg.cluster.nnodes), "--num_gpus", str(cfg.cluster.nproc_per_node)]


def ssh_command(cfg: RootConfig, run_dir: Path, hosts: List[str], on_gpu: bool = False) -> List[str]:
    port = cfg.cluster.master_port or 29500
    # --no_ssh_check: shardtune checked every host already (ssh_problem); deepspeed checks only the first.
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(Path(cfg.cluster.hostfile).expanduser()),
            "--launcher", cfg.cluster.ssh_launcher, *ssh_devices(cfg, on_gpu),
            "--master_addr", rendezvous_address(cfg, hosts), "--master_port", str(port), "--no_ssh_check"]
    if cfg.cluster.ssh_port:
        argv += ["--ssh_port", str(cfg.cluster.ssh_port)]
    return argv + ["--module", "trainer", "--run-dir", str(run_dir)]


def write_remote_env(cfg: RootConfig, on_gpu: bool, run_dir: Path) -> Path:
    """The variables every remote rank needs; the deepspeed launcher exports the file's lines there."""
    env = worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node)
    keys = ["OMP_NUM_THREADS", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", *cfg.cluster.env]
    if not on_gpu:
        keys.append("DS_ACCELERATOR")
    if choose_allocator(cfg.cluster.allocator, on_gpu):  # the same library path on every host
        keys += ["LD_PRELOAD", "MALLOC_CONF"]
    path = RunDir(run_dir).deepspeed_env
    path.write_text("".join(f"{k}={env[k]}\n" for k in keys if env.get(k)))
    return path


def launch_hostfile(cfg: RootConfig, run_dir: Path, on_gpu: bool) -> int:
    hosts = host_names(cfg)
    if cfg.cluster.no_ssh:
        if cfg.run.launch != "spawn":
            argv, extra = node_command(cfg, run_dir, cfg.cluster.node_rank, hosts, cfg.cluster.master_addr,
                                       cfg.cluster.master_port, use_deepspeed=True, visible=node_gpus(cfg, on_gpu))
            print("would run on this node:\n  " + shlex.join(argv))
            return 0
        return start_node(cfg, run_dir, on_gpu, cfg.cluster.node_rank, hosts, cfg.cluster.master_addr,
                          cfg.cluster.master_port, use_deepspeed=True)
    env = worker_env(cfg, on_gpu, cfg.cluster.nproc_per_node)
    env["DS_ENV_FILE"] = str(write_remote_env(cfg, on_gpu, run_dir))
    argv = ssh_command(cfg, run_dir, hosts, on_gpu)
    if on_gpu and os.environ.get(VISIBLE) and not filter_args(cfg):
        print(f"[shardtune] {VISIBLE}={os.environ[VISIBLE]} is this machine's; over ssh each host runs on the GPUs of "
              "its slots= (0..slots-1): choose GPUs on the hosts with cluster.include (docs/multinode.md)",
              file=sys.stderr, flush=True)
    if cfg.run.launch != "spawn":
        print(f"would run:\n  DS_ENV_FILE={env['DS_ENV_FILE']} {shlex.join(argv)}")
        return 0
    problem = ssh_problem(cfg, hosts)
    if problem:
        raise ConfigError([problem])
    print(f"[shardtune] {len(hosts)} hosts over {cfg.cluster.ssh_launcher}: {', '.join(hosts)}", file=sys.stderr)
    # Remote ranks are started by DeepSpeed's runner, not by a launcher of ours: they beat into the
    # shared run directory, where this (head node) launcher's watchdog sees them.
    return run_workers(argv, env, run_dir, cfg.cluster.heartbeat_timeout_s, node_local=False)
