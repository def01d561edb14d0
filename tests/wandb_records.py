"""Test-only: read back what wandb wrote to an offline run's transaction log (`run-<id>.wandb`).

shardtune itself never reads W&B's files (trainer/metrics.py WandbSink keeps its own record of the
steps W&B confirmed); the tests do, to check what W&B really holds. wandb ships no Python reader for
these files (the writer lives in the Go `wandb-core`), so this is a small reader of the format:
LevelDB's log format behind a 7-byte header, 32 KiB blocks of chunks, each chunk a 7-byte header
(crc32, length, type) and a piece of one serialized `wandb_internal_pb2.Record`. A file that is not
in this format is refused with a ValueError naming it, so a wandb that changes it fails these tests
loudly, never shardtune.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterator, List

FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    """The serialized records of one `.wandb` file, in order, up to the first torn or corrupt chunk
    (what a killed writer leaves): every chunk's crc32 is checked, so garbage is never parsed."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size:
        return
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # the writer pads a block's last few bytes
            pos += room
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        end = pos + CHUNK_HEADER.size + length
        if end > len(data):
            return
        chunk, pos = data[pos + CHUNK_HEADER.size:end], end
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history_steps(path: Path) -> List[int]:
    """The step of every history row in one `.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    steps = []
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            steps.append(int(record.history.step.num))
    return steps


def run_files(wandb_dir: Path, run_id: str) -> List[Path]:
    """The transaction log of every offline launch of run `run_id` that `wandb sync` uploads (the
    sync command in wandb_run.json), oldest launch first; an `interrupted-...` folder is left out."""
    pattern = f"offline-run-*-{run_id}/run-{run_id}.wandb"
    return sorted(p for p in Path(wandb_dir).glob(pattern) if not p.parent.is_symlink())


def run_history_steps(wandb_dir: Path, run_id: str) -> List[int]:
    """History steps of run `run_id` over all its uploaded launches, in the order they were written."""
    return [step for path in run_files(wandb_dir, run_id) for step in history_steps(path)]
