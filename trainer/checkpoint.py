"""Sharded checkpoints: DeepSpeed's engine state plus the loop's own state, committed atomically.

Layout under `<run.dir>/checkpoints/`:
    step-00000020/            DeepSpeed's shards (every rank writes its own)
        rng_rank{r}.pt        every RNG of rank r
        trainer_state.json    step, tokens seen, data position (rank 0)
        MANIFEST.json         size and sha256 of every file above, written LAST: the commit
    latest                    the tag of the newest committed checkpoint, replaced atomically

A folder without a manifest, or whose files no longer match it, is never resumed from.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from trainer.distributed import DistInfo, barrier

MANIFEST = "MANIFEST.json"
LATEST = "latest"
STATE = "trainer_state.json"
TAG_PREFIX = "step-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def _write_atomic(path: Path, text: str) -> None:
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


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files_of(folder)}
    _write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify(folder: Path, deep: bool = True) -> Optional[str]:
    """None if `folder` is a complete committed checkpoint, else what is wrong with it."""
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
    """The newest checkpoint that verifies, preferring the one `latest` names; problems are logged."""
    candidates = committed_tags(root)
    latest = root / LATEST
    if latest.exists():
        named = latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            log(f"{latest}: names {named!r}, which is not a committed checkpoint; ignoring it")
    for tag in candidates:
        problem = verify(root / tag)
        if problem is None:
            return root / tag
        log(f"skipping checkpoint {tag}: {problem}")
    return None


# ---------------------------------------------------------------- save and load
def save(engine, run_dir: Path, step: int, loop_state: Dict[str, Any], info: DistInfo, keep_last: int) -> Path:
    """Write a checkpoint for `step` on every rank, commit it on rank 0, then rotate old ones."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    folder = root / tag
    if info.is_main and folder.exists():
        shutil.rmtree(folder)  # an uncommitted leftover of a crashed save of this same step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"shardtune": loop_state}, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{info.rank}.pt")
    barrier()  # every rank's shards are on disk
    if info.is_main:
        _write_atomic(folder / STATE, json.dumps(loop_state, indent=1))
        write_manifest(folder)
        _write_atomic(root / LATEST, tag)
        rotate(root, keep_last)
    barrier()
    return folder


def rotate(root: Path, keep_last: int) -> None:
    """Delete committed checkpoints beyond the newest `keep_last` (0 keeps all); never others' folders."""
    if keep_last <= 0:
        return
    for tag in committed_tags(root)[keep_last:]:
        shutil.rmtree(root / tag, ignore_errors=True)


def load(engine, folder: Path, info: DistInfo) -> Dict[str, Any]:
    """Restore engine, optimizer, scheduler and RNGs from `folder`; return the loop state."""
    path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
    rng_file = folder / f"rng_rank{info.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((folder / STATE).read_text())
