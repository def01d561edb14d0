"""The checkpoint catalogue, without torch: what a committed checkpoint is and where to find one.

The launcher (the resume decision, `shardtune verify`, export, the report) and the ranks read
checkpoints through this module; writing and loading them (DeepSpeed's engine, torch) is
trainer/checkpoint.py, which re-exports these names.

    step-00000020/MANIFEST.json   size and sha256 of every file of the checkpoint, written LAST: the commit
    latest                        the tag of the newest committed checkpoint, a pointer for people
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.peft_methods import METHODS as PEFT_METHODS
from trainer.run_dir import RunDir, write_atomic
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _manifest_files(folder: Path) -> Dict[str, Dict[str, Any]]:
    """The manifest's records, {} when there is none (a folder being written; checked by `verify`)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


def write_manifest(folder: Path, known: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """MANIFEST.json for every file in `folder`: `known` records (hashed as they were written) are taken
    as they are once the file's size agrees; the others (small: the loop state, DeepSpeed's scripts)
    are hashed here."""
    known = known or {}
    files = {}
    for path in _files_of(folder):
        name, size = str(path.relative_to(folder)), path.stat().st_size
        if name in known and known[name]["size"] != size:
            raise CheckpointError(f"{path}: {size} bytes on disk, {known[name]['size']} written (another writer?)")
        files[name] = known.get(name) or {"size": size, "sha256": _sha256(path)}
    missing = sorted(set(known) - set(files))
    if missing:
        raise CheckpointError(f"{folder}: written by a rank but not visible here: {missing[:5]} (is the run "
                              "directory on a filesystem every node shares?)")
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
        log(f"skipping checkpoint {folder.name}: {verify(folder, deep=False)}")
    for tag in candidates:
        # Sizes against the manifest here; content is checked by the ranks as they load, each its share
        # (preverify_loadable), and in full by `shardtune verify`.
        problem = verify(root / tag, deep=False)
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
def layout_keys(peft_method: str) -> tuple:
    entry = PEFT_METHODS.get(peft_method)  # the peft method table; none (full fine-tuning): no keys
    return entry.layout_keys if entry else ()


def _model_name(name_or_path: str) -> str:
    """A local model folder by its name, so that a moved or re-mounted folder is the same model."""
    return Path(name_or_path).name if os.sep in name_or_path else name_or_path


def layout_of(cfg) -> Dict[str, Any]:
    """{config key: value} for the settings that shape the checkpoint (saved with every checkpoint)."""
    layout = {"model.name_or_path": _model_name(cfg.model.name_or_path), "model.gguf_file": cfg.model.gguf_file,
              "model.frozen_modules": list(cfg.model.frozen_modules), "peft.method": cfg.peft.method}
    for key in layout_keys(cfg.peft.method):
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


# ---------------------------------------------------------------- what is kept: the base, rotation, disk space
def holds_frozen_base(cfg) -> bool:
    """Whether this run's checkpoints hold the frozen base weights. An adapter's do not (a LoRA
    checkpoint of an 8B base would otherwise rewrite 16 GB of unchanged weights at every save): its
    base is reloaded from the model source. A random init made on the device (model.random_init)
    is not reproducible on another world size or stage, so its checkpoints keep it."""
    return cfg.peft.method == "none" or cfg.checkpoint.save_frozen_base or cfg.model.random_init


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
