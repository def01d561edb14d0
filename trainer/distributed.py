"""Distributed set-up in one place: rank facts from the environment, device choice, process group.

Any launcher works as long as it sets the usual variables: the `deepspeed` launcher, `torchrun`
and our own launcher set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; under `srun` without
them we read SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.control import progress


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str, timeout_s: int) -> DistInfo:
    """Initialise the process group once (gloo on CPU, NCCL on GPU) and return this rank's facts."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        os.environ.setdefault(name, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    device = pick_device(device_preference, local_rank)
    if device.type == "cpu":
        # DeepSpeed reads this when it is first imported; it must agree with the device we picked.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is set

    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=rank, world_size=world_size, auto_mpi_discovery=False,
    )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank: one tiny all-reduce, so all ranks agree."""
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_patient_calls = [0]


def patient_barrier(name: str, first_poll_s: float = 0.05, max_poll_s: float = 2.0) -> None:
    """Wait for every rank, however long it takes, without a collective: a rank still writing a large
    checkpoint to slow storage is not a failure, where `dist.barrier()` would end the job after
    cluster.timeout_s. Each rank adds itself to a counter in the process group's store and polls it
    (backing off to `max_poll_s`: 512 ranks poll rank 0's store ~256 times a second at most), telling
    its heartbeat it is waiting, not stuck. A rank that dies ends the job through the launcher; one
    that hangs goes silent and the watchdog names it. Every rank calls the same sequence of barriers."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _patient_calls[0] += 1
    key = f"shardtune/patient/{name}/{_patient_calls[0]}"
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    poll_s = first_poll_s
    while store.add(key, 0) < dist.get_world_size():
        progress()
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.5, max_poll_s)


def shutdown() -> None:
    if dist.is_initialized():
        # Every rank tears its connections down together: a rank that destroys the group while a
        # peer is still finishing can abort at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
