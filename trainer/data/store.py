"""A prepared (tokenized) source on disk: flat token ids, a trained-token mask and document
offsets, memory-mapped when read, so a dataset larger than RAM costs only page cache.

    <dir>/ids.bin       int32, every document's tokens back to back
    <dir>/trained.bin   uint8, 1 where the token carries a loss
    <dir>/offsets.npy   int64, n+1 document boundaries
    <dir>/meta.json     counts (documents, tokens, skipped by reason, truncated, dropped), source
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np


class StoreWriter:
    """Appends documents chunk by chunk, so preparation never holds a whole dataset in memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ids = open(folder / "ids.bin", "wb")
        self._trained = open(folder / "trained.bin", "wb")
        self.offsets: List[int] = [0]

    def add(self, ids: np.ndarray, trained: np.ndarray) -> None:
        ids.astype(np.int32, copy=False).tofile(self._ids)
        trained.astype(np.uint8, copy=False).tofile(self._trained)
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self, meta: Dict) -> None:
        self._ids.close()
        self._trained.close()
        np.save(self.folder / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def store_problem(folder: Path) -> str | None:
    """What is wrong with a prepared folder whose files no longer agree (truncated, deleted), or None."""
    try:
        offsets = np.load(folder / "offsets.npy")
        total = int(offsets[-1])
        for name, itemsize in (("ids.bin", 4), ("trained.bin", 1)):
            size = (folder / name).stat().st_size
            if size != total * itemsize:
                return f"{folder / name} has {size} bytes, {total * itemsize} expected"
        json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, IndexError) as err:
        return f"{folder}: {type(err).__name__}: {err}"
    return None


class DocStore:
    """Read side: documents by index, their lengths and trained-token counts."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.offsets = np.load(self.folder / "offsets.npy")
        total = int(self.offsets[-1])
        # np.memmap refuses empty files; an all-skipped source has no tokens.
        self.ids = np.memmap(self.folder / "ids.bin", np.int32, "r") if total else np.zeros(0, np.int32)
        self.trained = np.memmap(self.folder / "trained.bin", np.uint8, "r") if total else np.zeros(0, np.uint8)
        self.lengths = np.diff(self.offsets)
        # Tokens whose label counts: position 0 of a document predicts nothing (nor, packed, does
        # the first token of each document: it would be predicted from the previous one).
        cumulative = np.concatenate([[0], np.cumsum(self.trained, dtype=np.int64)])
        firsts = np.asarray(self.trained[self.offsets[:-1]], dtype=np.int64) if len(self) else np.zeros(0, np.int64)
        self.label_counts = cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]] - firsts

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, index: int):
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return np.asarray(self.ids[lo:hi]), np.asarray(self.trained[lo:hi])

    @property
    def skipped(self) -> Counter:
        return Counter(self.meta.get("skipped", {}))
