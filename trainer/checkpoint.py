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

A folder without a manifest, or whose files no longer match it, is never resumed from.
Every checkpoint file is unpickled with `torch.load(weights_only=True)` and an explicit allowlist
of the DeepSpeed classes the files hold (`SAFE_GLOBALS`): a file that needs anything else is
refused before DeepSpeed, whose own loaders use `weights_only=False`, ever opens it.
"""
from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import replace
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from trainer.distributed import DistInfo, barrier
from trainer.run_dir import RunDir
from trainer.train_state import FILE as TRAIN_STATE_FILE, TrainState

class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded or committed; the message names the file."""


MANIFEST = "MANIFEST.json"
LATEST = "latest"
STATE = TRAIN_STATE_FILE  # trainer/train_state.py owns what it holds
TAG_PREFIX = "step-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoint_root(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


# ---------------------------------------------------------------- loading without executing pickles
def safe_globals() -> list:
    """The only non-tensor classes DeepSpeed's checkpoint files contain (fp32/bf16/fp16, ZeRO 0-3;
    `fragment_address`, a dataclass of two ints, appears in ZeRO-1/2 shards once the engine has
    loaded a universal checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path, map_location=None) -> Any:
    """torch.load with weights_only=True and the allowlist; a refused file raises CheckpointError."""
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # UnpicklingError, a truncated zip, ...: all mean "do not trust it"
            raise CheckpointError(f"{path}: refused by the safe loader (weights_only=True): {_reason(err)}") from None


def _reason(err: Exception) -> str:
    """The line of a torch.load error that says why (e.g. "Trying to load unsupported GLOBAL posix.system")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line]
    return (telling or lines[-1:] or [type(err).__name__])[0][:300]


def install_safe_loading(engine) -> None:
    """Make DeepSpeed's engine read its checkpoint files through `safe_load` instead of pickle."""
    engine.checkpoint_engine.load = safe_load


def pickle_files(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).rglob("*.pt") if p.is_file())


def preverify_loadable(folder: Path, rank: int = 0, world_size: int = 1) -> None:
    """Safe-load this rank's stripe of every .pt file under `folder` (DeepSpeed's own universal-checkpoint
    and ds_to_universal readers bypass the engine's loader, so nothing may reach them unchecked)."""
    for index, path in enumerate(pickle_files(folder)):
        if index % world_size == rank:
            safe_load(path, map_location="cpu")


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


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files_of(folder)}
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify(folder: Path, deep: bool = True) -> Optional[str]:
    """None if `folder` is a complete committed checkpoint, else what is wrong with it."""
    try:
        return _verify(folder, deep)
    except OSError as err:  # deleted or replaced while read (rotation, another node's conversion)
        return f"{folder}: unreadable ({err})"


def _verify(folder: Path, deep: bool) -> Optional[str]:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder}: no {MANIFEST} (the save never completed)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest}: unreadable manifest ({err})"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST})"
        if path.stat().st_size != meta["size"]:
            return f"{path}: size {path.stat().st_size} != {meta['size']} in {MANIFEST}"
        if deep and _sha256(path) != meta["sha256"]:
            return f"{path}: checksum mismatch (corrupted since it was saved)"
    return None


# ---------------------------------------------------------------- finding what to resume from
def committed_tags(root: Path) -> List[str]:
    """Tags with a manifest, newest first (not yet checksummed)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(tags, reverse=True)


def find_resume_checkpoint(root: Path, log=print) -> Optional[Path]:
    """The newest committed checkpoint that verifies; every one passed over is logged with why.

    The manifest is the commit, so `latest` is only a pointer for people and other tools: an empty,
    dangling or stale `latest` is reported and never trusted over the manifests.
    """
    candidates = committed_tags(root)
    _report_latest(root / LATEST, candidates, log)
    for folder in sorted(p for p in root.glob(TAG_PREFIX + "*") if p.is_dir() and p.name not in candidates):
        log(f"skipping checkpoint {folder.name}: {verify(folder)}")
    for tag in candidates:
        problem = verify(root / tag)
        if problem is None:
            return root / tag
        log(f"skipping checkpoint {tag}: {problem}")
    return None


def _report_latest(latest: Path, candidates: List[str], log) -> None:
    if latest.is_symlink() and not latest.exists():
        log(f"{latest}: a dangling link; ignoring it")
    elif latest.exists():
        named = latest.read_text().strip()
        if not named:
            log(f"{latest}: empty (a save was interrupted while writing it); ignoring it")
        elif named not in candidates:
            log(f"{latest}: names {named!r}, which is not a committed checkpoint; ignoring it")


def read_state(folder: Path) -> TrainState:
    """The train state saved with a checkpoint (step, data position, world size, ZeRO stage, ...)."""
    return TrainState.read(folder)


# ---------------------------------------------------------------- what a checkpoint holds

# The settings that decide which parameters (and optimizer moments) a checkpoint holds. Resuming
# with others fails deep inside DeepSpeed on every rank, or, worse, loads (the shapes agree: a
# different base model of one architecture) and trains on the checkpoint's weights unannounced.
LAYOUT_KEYS = {"none": (), "lora": ("r", "target_modules", "modules_to_save"),
               "dora": ("r", "target_modules", "modules_to_save"), "ia3": ("target_modules", "modules_to_save"),
               "prefix_tuning": ("num_virtual_tokens",)}


def _model_name(name_or_path: str) -> str:
    """A local model folder by its name, so that a moved or re-mounted folder is the same model."""
    return Path(name_or_path).name if os.sep in name_or_path else name_or_path


def layout_of(cfg) -> Dict[str, Any]:
    """{config key: value} for the settings in LAYOUT_KEYS (saved with every checkpoint)."""
    layout = {"model.name_or_path": _model_name(cfg.model.name_or_path), "model.gguf_file": cfg.model.gguf_file,
              "model.frozen_modules": list(cfg.model.frozen_modules), "peft.method": cfg.peft.method}
    for key in LAYOUT_KEYS.get(cfg.peft.method, ()):
        value = getattr(cfg.peft, key)
        layout[f"peft.{key}"] = value if isinstance(value, (str, int)) or value is None else list(value)
    return layout


def layout_problem(saved: Dict[str, Any], cfg, folder: Path) -> Optional[str]:
    """Why `folder` (saved with the layout `saved`) cannot be resumed with `cfg`, or None."""
    now = layout_of(cfg)
    # Keys of one side only belong to another peft method, whose difference is listed already.
    differ = [key for key in sorted(set(saved) & set(now)) if saved[key] != now[key]]
    if not differ:
        return None
    listed = "\n".join(f"    {key}: saved {saved[key]!r}, now {now[key]!r}" for key in differ)
    return (f"cannot resume {folder}: it holds the parameters of another model or adapter than this launch "
            f"builds:\n{listed}\n  resume with the saved values; or start afresh (resume=never, or another "
            "run.dir); or, to begin a new run from its weights, export them (shardtune export) and point "
            "model.name_or_path at the export")


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
    try:
        # The train state goes in trainer_state.json alone (below), not also in DeepSpeed's client_state.
        engine.save_checkpoint(str(root), tag=folder.name, save_latest=False)
        torch.save(rng_state(), folder / f"rng_rank{info.rank}.pt")
    except (OSError, RuntimeError) as err:  # ENOSPC surfaces as either (torch's zip writer: RuntimeError)
        raise CheckpointError(write_failure(root, folder.name, err)) from err
    barrier()  # every rank's shards are on disk
    problem = check_finite_files(own_files(folder, info.rank)) if check_finite else None
    if _any_rank_failed(problem is not None, info):
        raise CheckpointError(problem or f"{folder}: another rank found non-finite values; not committed")
    if info.is_main:
        state = replace(state, zero_stage=int(engine.zero_optimization_stage()))
        write_atomic(folder / STATE, state.to_json())
        write_manifest(folder)
        write_atomic(root / LATEST, folder.name)
        rotate(root, keep_last)
    barrier()
    return folder


def _log_stderr(message: str) -> None:
    print(f"[shardtune] {message}", file=sys.stderr, flush=True)


def remove_uncommitted(root: Path, log=_log_stderr) -> None:
    """Delete checkpoint folders without a manifest: saves that never completed."""
    committed = set(committed_tags(root))
    for folder in sorted(root.glob(TAG_PREFIX + "*")) if root.is_dir() else []:
        if folder.is_dir() and folder.name not in committed:
            shutil.rmtree(folder, ignore_errors=True)
            log(f"removed {folder.name}: an uncommitted checkpoint (a save that did not finish)")


def make_room(root: Path, keep_last: int, log=_log_stderr) -> bool:
    """Rotate before the save rather than after it: delete now the committed checkpoints this save
    would rotate out anyway. The newest always stays, so a complete checkpoint exists throughout.
    Returns whether anything was deleted."""
    if keep_last <= 0:
        return False
    before = set(committed_tags(root))
    rotate(root, max(keep_last - 1, 1))
    removed = sorted(before - set(committed_tags(root)))
    if removed:
        log(f"disk nearly full: removed {', '.join(removed)} before saving rather than after "
            f"(checkpoint.keep_last={keep_last})")
    return bool(removed)


def committed_size(folder: Path) -> int:
    """Bytes of a committed checkpoint, from its manifest."""
    return sum(meta["size"] for meta in json.loads((folder / MANIFEST).read_text())["files"].values())


def space_problem(root: Path, tag: str, free_bytes: Optional[int] = None, keep_last: int = 0) -> Optional[str]:
    """Why checkpoint `tag` would not fit on `root`'s disk (free_bytes: measured unless given),
    judged by the newest committed one's size; None when it fits or there is none to judge by."""
    previous = committed_tags(root)
    if not previous:
        return None
    needed = committed_size(root / previous[0])
    free_bytes = shutil.disk_usage(root).free if free_bytes is None else free_bytes
    if free_bytes >= needed * 1.05:  # shards vary a little (the loop state, pickling)
        return None
    # keep_last > 0 has already rotated all it could (make_room); only "keep all" can keep fewer.
    fewer = ", keep fewer checkpoints (checkpoint.keep_last=1)" if keep_last <= 0 else ""
    return (f"not enough disk space for checkpoint {tag}: {free_bytes / 2**20:.1f} MiB free in {root}, and "
            f"the last one ({previous[0]}) takes {needed / 2**20:.1f} MiB (a new checkpoint is written before "
            f"an old one is deleted). Nothing was written and {previous[0]} is intact. Free some space{fewer} "
            f"or move run.dir to a larger disk; then run the same command to resume from {previous[0]}")


def write_failure(root: Path, tag: str, err: Exception) -> str:
    """The message for a checkpoint write that failed part-way (a full disk, a lost mount, ...)."""
    previous = committed_tags(root)
    try:
        free_bytes = shutil.disk_usage(root).free
        free = f"{free_bytes / 2**20:.1f} MiB free now"
    except OSError:
        free_bytes, free = None, "free space unknown"
    full = getattr(err, "errno", None) == errno.ENOSPC or (free_bytes is not None and free_bytes < 2**20)
    kept = f"{previous[0]} is intact and is what a rerun resumes from" if previous else "no earlier checkpoint exists"
    return (f"{'the disk is full: ' if full else ''}writing checkpoint {tag} into {root} failed "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}; {free}). The partial {tag} is never "
            f"resumed from (and is removed by the next save); {kept}")


def own_files(folder: Path, rank: int) -> List[Path]:
    """The .pt files rank `rank` wrote into a checkpoint folder (rank 0 owns the unranked ones)."""
    return [p for p in _files_of(folder) if p.suffix == ".pt" and _writer_rank(p.name) == rank]


def _writer_rank(name: str) -> int:
    match = re.search(r"(?:pp_rank_|rng_rank)(\d+)", name)
    return int(match.group(1)) if match else 0


def _any_rank_failed(failed: bool, info: DistInfo) -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def rotate(root: Path, keep_last: int) -> None:
    """Delete committed checkpoints beyond the newest `keep_last` that verify (0 keeps all).

    Only folders named like ours and holding our manifest are candidates, so nothing a user put in
    the folder is touched; a corrupt checkpoint does not count towards the ones kept.
    """
    if keep_last <= 0:
        return
    kept = 0
    for tag in committed_tags(root):
        if kept < keep_last and verify(root / tag, deep=False) is None:
            kept += 1
            continue
        if kept >= keep_last:
            shutil.rmtree(root / tag, ignore_errors=True)
            shutil.rmtree(root / "universal" / tag, ignore_errors=True)


def load(engine, folder: Path, info: DistInfo) -> TrainState:
    """Restore engine, optimizer, scheduler and RNGs from `folder`; return the loop state.

    Every rank first safe-loads its stripe of the folder's files, and all ranks agree on the result
    before DeepSpeed opens anything.
    """
    problem = None
    try:
        preverify_loadable(folder, info.rank, info.world_size)
    except CheckpointError as err:
        problem = str(err)
    if _any_rank_failed(problem is not None, info):
        raise CheckpointError(problem or f"{folder}: another rank refused a file of this checkpoint (see its log)")
    install_safe_loading(engine)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {folder}")
    rng_file = folder / f"rng_rank{info.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: the new ranks keep the seed
        set_rng_state(safe_load(rng_file))
    return read_state(folder)
