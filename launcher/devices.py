"""Which GPUs a launch's ranks use.

shardtune starts DeepSpeed's per-node launcher (deepspeed.launcher.launch) itself, with the world it
computes here, {host: [GPU ids]} in node-rank order: what DeepSpeed's runner would compute, without the
runner's process in between (launcher/deepspeed_launch.py). The runner's own rules are why this exists:
it honours CUDA_VISIBLE_DEVICES only on one node and only without --include/--exclude/--num_gpus, and
given --num_gpus N it rebuilds every host's slots as range(N), so hostfile `slots=` and
CUDA_VISIBLE_DEVICES were both lost (the job ran on GPUs 0..N-1). Here:

  * CUDA_VISIBLE_DEVICES=2,3 (cluster=local)      -> localhost: [2, 3]
  * cluster.include / cluster.exclude              -> the GPUs they leave, DeepSpeed's syntax and rules
  * hostfile slots= (cluster=hostfile over ssh)    -> the runner (pdsh) without --num_gpus: slots stand
  * a no-ssh node (Slurm, cluster.no_ssh) with CUDA_VISIBLE_DEVICES -> that node's entry: those GPUs

DeepSpeed's per-node launcher then gives each rank one listed GPU (it sets CUDA_VISIBLE_DEVICES). CPU
runs are unchanged: their ranks are processes, numbered 0..N-1. The runner's flags for the same choice
(`local_gpu_args`) are what `run.launch=print` shows a user who starts the workers by hand.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from trainer.config import RootConfig

VISIBLE = "CUDA_VISIBLE_DEVICES"
LOCALHOST = "localhost"  # the runner's name for this machine when there is no hostfile
# Device nodes a GPU torch can use shows up as: NVIDIA's, AMD's (ROCm runs under torch.cuda), WSL2's.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_count() -> int:
    """The GPUs torch would use here (under CUDA_VISIBLE_DEVICES), the one answer to "is there a GPU?"
    on the launcher's side. torch is asked only where a GPU can exist: on a machine without GPU device
    nodes the answer is 0 without importing torch (1-2 s of every launch, and of `--help`)."""
    if not any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES):
        return 0
    import torch

    return torch.cuda.device_count()


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


def visible_entries(environ: Mapping[str, str]) -> Optional[List[str]]:
    """CUDA_VISIBLE_DEVICES's entries (indices, UUIDs or MIG names); None when unset or empty."""
    items = [item.strip() for item in environ.get(VISIBLE, "").split(",") if item.strip()]
    return items or None


def visible_gpus(environ: Mapping[str, str]) -> Optional[List[int]]:
    """CUDA_VISIBLE_DEVICES as GPU indices; None when unset or empty. ValueError for entries that are not
    indices (UUIDs, MIG names): DeepSpeed's --include takes indices only."""
    value, items = environ.get(VISIBLE, "").strip(), visible_entries(environ)
    if not items:
        return None
    if not all(item.isdigit() for item in items) or len(set(items)) != len(items):
        raise ValueError(f"{VISIBLE}={value} is not a list of distinct GPU indices; DeepSpeed's launcher places "
                         "ranks by index: give indices, e.g. CUDA_VISIBLE_DEVICES=2,3 (nvidia-smi -L lists them)")
    return [int(item) for item in items]


def parse_node_specs(text: str) -> Dict[str, List[int]]:
    """DeepSpeed's NODE_SPEC[@NODE_SPEC ...], NODE_SPEC = NAME[:SLOT[,SLOT ...]]: {host: slots}, [] = all."""
    specs: Dict[str, List[int]] = {}
    for spec in text.split("@"):
        name, _, slots = spec.strip().partition(":")
        if not name:
            raise ValueError(f"{text!r}: an empty host name; write NAME[:SLOT,...] joined by @, e.g. localhost:2,3")
        items = [s.strip() for s in slots.split(",")] if slots else []
        if not all(item.isdigit() for item in items):
            raise ValueError(f"{text!r}: slots of {name} must be GPU indices, e.g. {name}:0,1")
        specs.setdefault(name, []).extend(int(item) for item in items)
    return specs


def select_slots(pool: Mapping[str, int], include: Optional[str], exclude: Optional[str]) -> Dict[str, List[int]]:
    """The GPUs left of `pool` ({host: slot count}) after --include/--exclude, as DeepSpeed's
    `parse_resource_filter` computes them: host order kept, hosts with no slot left dropped.
    ValueError (naming the host or slot) where the runner would refuse."""
    hosts = {host: list(range(count)) for host, count in pool.items()}
    if not include and not exclude:
        return hosts
    chosen = {} if include else {host: list(slots) for host, slots in hosts.items()}
    for host, slots in parse_node_specs(include or exclude).items():
        if host not in hosts:
            raise ValueError(f"host {host} is not one of {', '.join(hosts)}")
        missing = [slot for slot in slots if slot not in hosts[host]]
        if missing:
            raise ValueError(f"{host} has GPUs 0-{len(hosts[host]) - 1}, not {','.join(map(str, missing))}")
        if include:
            chosen[host] = sorted(set(chosen.get(host, []) + (slots or hosts[host])))
        else:
            chosen[host] = [slot for slot in chosen[host] if slots and slot not in slots]
    return {host: chosen[host] for host in hosts if chosen.get(host)}


def filter_args(cfg: RootConfig) -> List[str]:
    """cluster.include / cluster.exclude as the runner's flags."""
    c = cfg.cluster
    return ["--include", c.include] if c.include else ["--exclude", c.exclude] if c.exclude else []


def local_gpu_args(cfg: RootConfig, environ: Mapping[str, str]) -> List[str]:
    """The runner's device flags for a GPU launch on this machine (validated: see `device_problems`)."""
    if filter_args(cfg):
        return filter_args(cfg)
    try:
        visible = visible_gpus(environ)
    except ValueError:  # UUIDs: refused for several ranks; one rank runs as a plain process that inherits them
        visible = None
    if visible:
        return ["--include", f"{LOCALHOST}:{','.join(map(str, visible))}"]
    return ["--num_gpus", str(cfg.cluster.nproc_per_node)]


def local_world(cfg: RootConfig, environ: Mapping[str, str], on_gpu: bool,
                gpu_count: Callable[[], int]) -> Dict[str, List[int]]:
    """{localhost: device ids} of a local launch with several ranks (validated: `device_problems`).
    `gpu_count`: how many GPUs this machine has, asked only when cluster.include/exclude must count them."""
    nproc = cfg.cluster.nproc_per_node
    if not on_gpu:
        return {LOCALHOST: list(range(nproc))}
    if filter_args(cfg):
        return select_slots({LOCALHOST: gpu_count()}, cfg.cluster.include, cfg.cluster.exclude)
    try:
        visible = visible_gpus(environ)
    except ValueError:  # UUIDs: refused for several ranks (one rank runs as a plain process that inherits them)
        visible = None
    return {LOCALHOST: visible or list(range(nproc))}


def node_world(hosts: Sequence[str], node_rank: int, nproc: int, visible: Optional[List[int]]) -> Dict[str, List[int]]:
    """A no-ssh node's world: this node's ranks on its CUDA_VISIBLE_DEVICES (else GPUs 0..nproc-1), every
    other node's nproc ranks (only their count matters here: it places the global ranks)."""
    return {host: (visible if rank == node_rank and visible else list(range(nproc))) for rank, host in enumerate(hosts)}


def _count_problem(what: str, count: int, nproc: int, fix: str) -> List[str]:
    if count == nproc:
        return []
    return [f"{what} gives {count} GPU(s) but cluster.nproc_per_node={nproc} (one rank per GPU): set "
            f"cluster.nproc_per_node={count}, or {fix}"]


def _visible_problems(cfg: RootConfig, environ: Mapping[str, str]) -> List[str]:
    """CUDA_VISIBLE_DEVICES against the node's ranks. One rank is a plain process that inherits it as it
    is (UUIDs and MIG names too); several are placed by DeepSpeed's launcher, which needs indices."""
    visible, nproc = visible_entries(environ), cfg.cluster.nproc_per_node
    if not visible:
        return []
    problems = _count_problem(f"{VISIBLE}={','.join(visible)}", len(visible), nproc,
                              f"list {nproc} GPU(s) in {VISIBLE}")
    if not problems and nproc > 1:
        try:
            visible_gpus(environ)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _local_problems(cfg: RootConfig, environ: Mapping[str, str], gpu_count: int) -> List[str]:
    c = cfg.cluster
    if not filter_args(cfg):
        return _visible_problems(cfg, environ)
    key, value = ("cluster.include", c.include) if c.include else ("cluster.exclude", c.exclude)
    if visible_entries(environ):
        return [f"{key}={value} and {VISIBLE}={environ[VISIBLE]} both choose GPUs; keep one (unset "
                f"{VISIBLE}, or drop {key})"]
    try:
        if set(parse_node_specs(value)) != {LOCALHOST}:
            return [f"{key}={value}: cluster=local runs on this machine, which DeepSpeed calls {LOCALHOST}: "
                    f"write e.g. {LOCALHOST}:2,3"]
        chosen = select_slots({LOCALHOST: gpu_count}, c.include, c.exclude)
    except ValueError as err:
        return [f"{key}={value}: {err}"]
    return _count_problem(f"{key}={value}", len(chosen.get(LOCALHOST, [])), c.nproc_per_node,
                          f"change {key}")


def _hostfile_problems(cfg: RootConfig) -> List[str]:
    """Over ssh: every host runs nproc_per_node ranks (the world size and batch sizes count on it)."""
    c = cfg.cluster
    if not c.hostfile or not Path(c.hostfile).expanduser().is_file():
        return []  # said by trainer/validate.py
    try:
        pool = dict(read_hostfile(c.hostfile))
        chosen = select_slots(pool, c.include, c.exclude)
    except (ValueError, SystemExit) as err:
        key = "cluster.include" if c.include else "cluster.exclude" if c.exclude else "cluster.hostfile"
        return [f"{key}: {err}"]
    where = (f"cluster.hostfile={c.hostfile} with cluster.include={c.include}" if c.include else
             f"cluster.hostfile={c.hostfile} with cluster.exclude={c.exclude}" if c.exclude else
             f"cluster.hostfile={c.hostfile}")
    problems = [f"{where} leaves {len(chosen)} host(s) but cluster.nnodes={c.nnodes}"] if len(chosen) != c.nnodes else []
    for host, slots in chosen.items():
        problems += _count_problem(f"{where}: host {host}", len(slots), c.nproc_per_node,
                                   f"set slots={c.nproc_per_node} on that line (or choose GPUs with cluster.include)")
    return problems


def device_problems(cfg: RootConfig, environ: Mapping[str, str], on_gpu: bool, gpu_count: int) -> List[str]:
    """Problems with the devices a launch would use, before any process starts. `gpu_count`: the GPUs this
    machine shows (torch.cuda.device_count(), under its CUDA_VISIBLE_DEVICES)."""
    c = cfg.cluster
    if c.include and c.exclude:
        return [f"cluster.include={c.include} and cluster.exclude={c.exclude}: DeepSpeed takes one or the other"]
    if (c.include or c.exclude) and not on_gpu:
        return [f"cluster.{'include' if c.include else 'exclude'} chooses GPUs, and this run is on CPU; leave it "
                "null (or run on a machine with GPUs)"]
    if (c.include or c.exclude) and (c.backend == "slurm" or (c.backend == "hostfile" and c.no_ssh)):
        return ["cluster.include/exclude apply to cluster=local and to cluster=hostfile over ssh; on Slurm and on "
                f"no-ssh nodes each node's {VISIBLE} chooses its GPUs (Slurm sets it from the job's GPUs)"]
    if not on_gpu:
        return []
    if c.backend == "hostfile" and not c.no_ssh:
        return _hostfile_problems(cfg)
    if c.backend == "slurm":
        return []  # the compute nodes' CUDA_VISIBLE_DEVICES, checked there (launcher/node.py)
    if c.backend == "hostfile":  # a no-ssh node: this machine's GPUs
        return _visible_problems(cfg, environ)
    return _local_problems(cfg, environ, gpu_count)


def restricts_devices(cfg: RootConfig, environ: Mapping[str, str]) -> bool:
    """Whether the user chose the GPUs (then `device_problems` counts them, not the machine's total)."""
    return bool(cfg.cluster.include or cfg.cluster.exclude or environ.get(VISIBLE, "").strip())
