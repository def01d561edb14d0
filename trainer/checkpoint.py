"""Sharded checkpoints: DeepSpeed's engine state plus the loop's own state, committed atomically.

Layout under `<run.dir>/checkpoints/`:
    step-00000020/            DeepSpeed's shards (every rank writes its own)
        rng_rank{r}.pt        every RNG of rank r
        trainer_state.json    step, tokens seen, data position (rank 0)
        MANIFEST.json         size and sha256 of every file above, written LAST: the commit
    latest                    the tag of the newest committed checkpoint, replaced atomically
    universal/step-00000020/  the same checkpoint in DeepSpeed's universal format, made by the
                              launcher (trainer/universal.py) when a run resumes on another
                              world size or ZeRO stage

A folder without a manifest, or whose files no longer match it, is never resumed from. What a
committed checkpoint is and how to find one (tags, manifest, verify, rotate, layout) is
trainer/checkpoint_catalog.py, without torch, for the launcher; this module writes and loads them.
Every checkpoint file is unpickled with `torch.load(weights_only=True)` and an explicit allowlist
of the DeepSpeed classes the files hold (`SAFE_GLOBALS`): a file that needs anything else is
refused before DeepSpeed, whose own loaders use `weights_only=False`, ever opens it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from dataclasses import dataclass, replace
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from trainer.checkpoint_catalog import (  # noqa: F401  re-exported: callers read checkpoint.X
    CheckpointError, LATEST, MANIFEST, STATE, TAG_PREFIX, _files_of, _log_stderr, _manifest_files, _model_name,
    _report_latest, _sha256, _verify, _writer_rank, checkpoint_root, committed_size, committed_tags,
    find_resume_checkpoint, holds_frozen_base, layout_keys, layout_of, layout_problem, make_room, own_files,
    read_state, remove_uncommitted, rotate, space_problem, tag_for, verify, write_failure, write_manifest)
from trainer.control import progress
from trainer.distributed import DistInfo, barrier, patient_barrier
from trainer.model import base_problem
from trainer.run_dir import write_atomic
from trainer.train_state import TrainState


# ---------------------------------------------------------------- RNG state of one rank
def rng_state() -> Dict[str, Any]:
    """Every RNG of this rank, as plain tensors and numbers so it loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _HashingFile:
    """A binary file that hashes what is written through it: a checkpoint file's checksum while it is
    written, without reading the file back (at 1 TB over 512 ranks, rank 0 alone re-reading every
    file took ~17 minutes while the other ranks waited)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        progress()  # a large file on slow storage takes minutes: writing is not hanging
        return self.handle.write(view)

    def flush(self) -> None:
        self.handle.flush()


def save_recorded(obj: Any, path: Path, records: Dict[str, Dict[str, Any]], folder: Path,
                  zipfile: bool = True) -> None:
    """torch.save `obj` to `path`, hashing it on the way; `records[name in folder]` = its size and sha256."""
    with open(path, "wb") as handle:
        hashing = _HashingFile(handle)
        torch.save(obj, hashing, _use_new_zipfile_serialization=zipfile)
        handle.flush()
        os.fsync(handle.fileno())
    records[str(Path(path).relative_to(folder))] = {"size": hashing.size, "sha256": hashing.digest.hexdigest()}


def frozen_aliases(module) -> List[str]:
    """State-dict names of frozen parameters that DeepSpeed's exclude_frozen_parameters keeps: a tied
    output head (lm_head.weight, the frozen input embedding under a second name)."""
    named = {name for name, _ in module.named_parameters()}
    return [name for name, param in module.named_parameters(remove_duplicate=False)
            if not param.requires_grad and name not in named]


def snapshot(obj: Any, storages: Optional[Dict[int, Any]] = None) -> Any:
    """A copy of a state dict in host memory, for writing while training goes on: every tensor copied
    off the device (or cloned: training updates CPU tensors in place), tensors that share a storage
    sharing its copy (so the file holds what torch.save of the original would), other values deep-copied."""
    storages = {} if storages is None else storages
    if isinstance(obj, torch.Tensor):
        source = obj.detach().untyped_storage()
        key = source.data_ptr()
        if key not in storages:
            storages[key] = source.cpu() if source.device.type != "cpu" else source.clone()
        return torch.empty(0, dtype=obj.dtype).set_(storages[key], obj.storage_offset(), obj.size(), obj.stride())
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = snapshot(value, storages)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value, storages) for value in obj)
    return copy.deepcopy(obj)


class _Writes:
    """One save's files on this rank, written at once (`background=False`) or, after a snapshot in host
    memory, by a thread while training goes on. Records each file's size and sha256 as it is written
    and the non-finite tensors found in memory."""

    def __init__(self, folder: Path, background: bool, delay_s: float = 0.0):
        self.folder, self.background, self.delay_s = folder, background, delay_s
        self.zipfile = True
        self.records: Dict[str, Dict[str, Any]] = {}
        self.nonfinite: List[str] = []
        self.queue: List[tuple] = []
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def add(self, obj: Any, path: Path) -> None:
        bad = nonfinite_tensors(obj)
        if bad:
            self.nonfinite.append(f"{path}: non-finite values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        if self.background:
            self.queue.append((snapshot(obj), Path(path)))
        else:
            time.sleep(self.delay_s)  # train.fault_injection.save_write_delay_s (tests): a slow disk
            save_recorded(obj, Path(path), self.records, self.folder, self.zipfile)

    def start(self) -> None:
        if self.background:
            self.thread = threading.Thread(target=self._write_queue, name="checkpoint-writer", daemon=True)
            self.thread.start()

    def _write_queue(self) -> None:
        try:
            for obj, path in self.queue:
                time.sleep(self.delay_s)  # train.fault_injection.save_write_delay_s (tests): a slow disk
                save_recorded(obj, path, self.records, self.folder, self.zipfile)
        except BaseException as err:  # reported by the commit, on every rank
            self.error = err
        self.queue = []  # the snapshot's host memory goes as soon as it is written

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


def record_engine_saves(engine, writes: _Writes, drop_from_module: List[str] = ()) -> bool:
    """Route DeepSpeed's checkpoint writes through `writes` (non-finite check in memory, hashed as
    written; no file is read back); `drop_from_module`: module-state keys left out. False when the
    engine writes through a checkpoint engine of its own (a user's ds_config): it then writes, and
    its files are checked and hashed after."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine_writer = engine.checkpoint_engine
    if type(engine_writer) is not TorchCheckpointEngine:
        return False
    writes.zipfile = getattr(engine_writer, "zipfile_serialization", True)

    def save(state_dict, path):
        if drop_from_module and isinstance(state_dict.get("module"), dict):
            state_dict = {**state_dict, "module": {key: value for key, value in state_dict["module"].items()
                                                   if key not in drop_from_module}}
        writes.add(state_dict, Path(path))

    engine_writer.save = save
    return True


# ---------------------------------------------------------------- loading without executing pickles
def safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoint files contain (fp32/bf16/fp16, ZeRO 0-3;
    `fragment_address`, a dataclass of two ints, appears in ZeRO-1/2 shards once the engine has
    loaded a universal checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path, map_location=None, name=None) -> Any:
    """torch.load with weights_only=True and the allowlist; a refused file raises CheckpointError.
    `path` may be a file's bytes (io.BytesIO), `name` then the file it came from."""
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # UnpicklingError, a truncated zip, ...: all mean "do not trust it"
            raise CheckpointError(f"{name or path}: refused by the safe loader (weights_only=True): "
                                  f"{_reason(err)}") from None


def _reason(err: Exception) -> str:
    """The line of a torch.load error that says why (e.g. "Trying to load unsupported GLOBAL posix.system")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line]
    return (telling or lines[-1:] or [type(err).__name__])[0][:300]


def install_safe_loading(engine) -> None:
    """Make DeepSpeed's engine read its checkpoint files through `safe_load` instead of pickle."""
    engine.checkpoint_engine.load = safe_load


def preverify_loadable(folder: Path, rank: int = 0, world_size: int = 1) -> None:
    """Check this rank's stripe of `folder`'s files: content against the manifest's checksum, and every
    .pt file safe-loaded (DeepSpeed's own universal-checkpoint and ds_to_universal readers bypass the
    engine's loader, so nothing may reach them unchecked). One read per file; the ranks share the work,
    so a 1 TB checkpoint on 512 ranks costs each ~2 GB, not one process the whole terabyte."""
    listed = _manifest_files(folder)
    for index, path in enumerate(sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)):
        if index % world_size != rank:
            continue
        data = path.read_bytes()
        meta = listed.get(str(path.relative_to(folder)))
        if meta is not None and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted since it was saved); `shardtune verify "
                                  f"{Path(folder).parent.parent}` checks every checkpoint, and resume=<an earlier "
                                  "one> resumes from it")
        if path.suffix == ".pt":
            safe_load(io.BytesIO(data), map_location="cpu", name=path)


def nonfinite_tensors(obj: Any, prefix: str = "") -> List[str]:
    """Names of the floating-point tensors inside `obj` (nested dicts/lists) that hold NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "<tensor>"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in nonfinite_tensors(v, f"{prefix}[{i}]")]
    return []


def check_finite_files(paths: List[Path]) -> Optional[str]:
    """None if every tensor in `paths` is finite (and every file safe-loads), else the first problem."""
    for path in paths:
        try:
            bad = nonfinite_tensors(safe_load(path, map_location="cpu"))
        except CheckpointError as err:
            return str(err)
        if bad:
            return f"{path}: non-finite values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
    return None


# ---------------------------------------------------------------- save and load
def save(engine, run_dir: Path, state: TrainState, info: DistInfo, keep_last: int,
         check_finite: bool = True) -> Path:
    """Write a checkpoint for `state.step` on every rank, commit it on rank 0, then rotate old ones.

    Order matters for crash safety: shards (every rank) -> rng -> trainer_state -> MANIFEST (the
    commit) -> `latest` -> rotation. A crash anywhere before the manifest leaves a folder that is
    never chosen; rotation runs only after the commit, so a committed checkpoint always exists.
    Before anything is written rank 0 checks the disk has room for one more checkpoint the size
    of the last (rotating first if that makes room); if not, every rank stops with the reason.
    """
    return start_save(engine, run_dir, state, info, keep_last, check_finite).commit(info)


def start_save(engine, run_dir: Path, state: TrainState, info: DistInfo, keep_last: int,
               check_finite: bool = True, background: bool = False, delay_s: float = 0.0) -> "PendingSave":
    """The first half of `save`: every rank's files written (`background=False`), or snapshot in host
    memory with a thread writing them (`background=True`: training goes on meanwhile). Nothing is
    committed until `PendingSave.commit`, so a crash or kill before it leaves the previous checkpoint
    the latest."""
    root = checkpoint_root(run_dir)
    folder = root / tag_for(state.step)
    problem = None
    if info.is_main:  # the run directory is shared by every node, so one rank checks it
        remove_uncommitted(root)  # crashed saves: never resumed from, and they hold disk space
        if folder.exists():
            shutil.rmtree(folder)  # this step saved before, by a run resumed from an earlier checkpoint
        problem = space_problem(root, folder.name, keep_last=keep_last)
        if problem and make_room(root, keep_last):
            problem = space_problem(root, folder.name, keep_last=keep_last)
    if _any_rank_failed(problem is not None, info):  # every rank stops here together, nothing written
        raise CheckpointError(problem or "rank 0 found too little disk space for the checkpoint")
    writes = _Writes(folder, background, delay_s)
    adapter_only = state.base is not None
    recorded = record_engine_saves(engine, writes, frozen_aliases(engine.module) if adapter_only else [])
    try:
        # The train state goes in trainer_state.json alone (at the commit), not also in DeepSpeed's
        # client_state. `state.base` set: an adapter checkpoint, without the frozen base. DeepSpeed's
        # own barriers wait patiently: the last one follows the writes of a synchronous save.
        with patient_deepspeed_barriers(folder.name, engine):
            engine.save_checkpoint(str(root), tag=folder.name, save_latest=False,
                                   exclude_frozen_parameters=adapter_only)
        writes.add(rng_state(), folder / f"rng_rank{info.rank}.pt")
    except (OSError, RuntimeError) as err:  # ENOSPC surfaces as either (torch's zip writer: RuntimeError)
        raise CheckpointError(write_failure(root, folder.name, err)) from err
    writes.start()
    state = replace(state, zero_stage=int(engine.zero_optimization_stage()))
    return PendingSave(folder, state, writes, recorded, check_finite, keep_last)


@dataclass
class PendingSave:
    """A checkpoint whose files are written (or being written) and not yet committed."""

    folder: Path
    state: TrainState
    writes: _Writes
    recorded: bool  # False: the user's checkpoint engine wrote the files; checked by reading them back
    check_finite: bool
    keep_last: int

    def written_everywhere(self, info: DistInfo) -> bool:
        """Whether every rank has written its files (a collective: every rank calls it)."""
        return not _any_rank_failed(not self.writes.done(), info)

    def commit(self, info: DistInfo) -> Path:
        """Wait for this rank's writes, then commit on rank 0 once every rank's are on disk."""
        self.writes.wait()
        patient_barrier(f"{self.folder.name}/written")  # the slowest disk, then the collectives below
        root, folder = self.folder.parent, self.folder
        if self.writes.error is not None:
            problem = write_failure(root, folder.name, self.writes.error)
        elif not self.check_finite:
            problem = None
        elif self.recorded:
            problem = self.writes.nonfinite[0] if self.writes.nonfinite else None
        else:  # a checkpoint engine of the user's: read its files back
            problem = check_finite_files(own_files(folder, info.rank))
        if _any_rank_failed(problem is not None, info):  # also the barrier: every rank's shards are on disk
            raise CheckpointError(problem or f"{folder}: another rank failed to write or found non-finite values; "
                                             "not committed")
        every_rank = _gather_records(self.writes.records, info)
        if info.is_main:
            write_atomic(folder / STATE, self.state.to_json())
            write_manifest(folder, every_rank)
            write_atomic(root / LATEST, folder.name)
            rotate(root, self.keep_last)
        barrier()
        return folder


@contextlib.contextmanager
def patient_deepspeed_barriers(tag: str, engine):
    """DeepSpeed's `dist.barrier()` calls inside save_checkpoint, as patient barriers (see
    trainer.distributed.patient_barrier): its last one waits for the slowest rank's files. Under
    ZeRO-3 a collective follows the writes before that barrier (the optimizer's checkpoint epilogue
    gathers the persistent parameters again): every rank waits patiently before it too."""
    from deepspeed import comm

    optimizer = getattr(engine, "optimizer", None)
    epilogue = getattr(optimizer, "checkpoint_event_epilogue", None)
    if epilogue is not None:
        optimizer.checkpoint_event_epilogue = lambda: (patient_barrier(f"{tag}/epilogue"), epilogue())
    plain = comm.barrier

    def barrier_of_every_rank(*args, **kwargs):
        group = kwargs.get("group", args[0] if args else None)
        if group is not None:  # a subgroup's barrier (not in today's save path): as DeepSpeed wrote it
            return plain(*args, **kwargs)
        return patient_barrier(f"{tag}/deepspeed")

    comm.barrier = barrier_of_every_rank
    try:
        yield
    finally:
        comm.barrier = plain
        if epilogue is not None:
            del optimizer.checkpoint_event_epilogue  # the class's own method again


def _gather_records(records: Dict[str, Dict[str, Any]], info: DistInfo) -> Dict[str, Dict[str, Any]]:
    """Every rank's file records on rank 0 (a few hundred bytes per rank); {} elsewhere."""
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return records
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(records, gathered, dst=0)
    return {name: meta for part in gathered or [] for name, meta in part.items()}


def _any_rank_failed(failed: bool, info: DistInfo) -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def load(engine, folder: Path, info: DistInfo, base_now: Dict[str, Any]) -> TrainState:
    """Restore engine, optimizer, scheduler and RNGs from `folder`; return the loop state.

    Every rank first safe-loads its stripe of the folder's files, and all ranks agree on the result
    before DeepSpeed opens anything. An adapter checkpoint (no frozen base in it) loads only onto
    the base it was trained on (`base_now`: model.base_record of the model just built).
    """
    state = read_state(folder)
    problem = base_problem(state.base, base_now, f"checkpoint {folder}") if state.base is not None else None
    try:
        preverify_loadable(folder, info.rank, info.world_size)
    except CheckpointError as err:
        problem = problem or str(err)
    if _any_rank_failed(problem is not None, info):
        raise CheckpointError(problem or f"{folder}: another rank refused a file of this checkpoint (see its log)")
    install_safe_loading(engine)
    # Without the frozen base the module's saved state lacks those keys: the loaded base keeps them.
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=state.base is None,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {folder}")
    rng_file = folder / f"rng_rank{info.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: the new ranks keep the seed
        set_rng_state(safe_load(rng_file))
    return state
