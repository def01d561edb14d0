"""data.streaming=true: train on data that does not fit on a node's disk.

The map-style path writes every token of a source into the cache (5 bytes a token). A streamed
source keeps an index only: for each document kept, where its record is in the source, its token
count and its count of trained tokens, 32 bytes a document whatever its length. Mixing, packing,
the eval split and the sampler's order are computed from that index exactly as from a prepared
store (a StreamedStore reads like a DocStore), and a row's documents are read, rendered and
tokenised from the source when the loop asks for them. So a streamed run trains on the same
samples in the same order as the map-style run, and resumes mid-epoch the same way (the position is
a function of the step).

The index pass tokenises the source once, because the length policy decides which documents exist
and packing needs every length before the first row. The source must stay in place, unchanged,
while the run lasts: a record that no longer tokenises to its indexed length stops the run, naming
its file and line.

    <dir>/index.bin   int64 rows: locator (2 numbers, sources.read_located), tokens, trained tokens
    <dir>/meta.json   counts, as a DocStore's, and the format the records were read as
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import List, Optional

import numpy as np

from trainer.config import DataConfig
from trainer.data import prepare, sources
from trainer.data.errors import DataError

INDEX, META = "index.bin", "meta.json"
FIELDS = 4  # locator (2), tokens, label tokens
FLUSH_ROWS = 1 << 16


def index_chunk(chunk: List[tuple]) -> list:
    """Worker task: located records -> ((ids, trained, outcome), locator) or a DataError, in order."""
    results = prepare.process_chunk([item[:3] for item in chunk])
    return [r if isinstance(r, DataError) else (r, item[3]) for r, item in zip(results, chunk)]


def index_source(source: sources.Source, tokenizer, cfg: DataConfig, folder: Path) -> dict:
    """Write the index of `source` into `folder`; returns its meta. Raises DataError where a
    map-style preparation would (strict mode), or when the source cannot be read by locator."""
    problem = sources.seek_problem(source)
    if problem:
        raise DataError(str(source), problem, "not_seekable")
    records, fmt = prepare.source_records(source, tokenizer, cfg, located=True)
    folder.mkdir(parents=True, exist_ok=True)
    counts, skipped, rows, documents, tokens = Counter(), Counter(), [], 0, 0
    with open(folder / INDEX, "wb") as out:
        for (ids, trained, outcome), locator in prepare.processed(index_chunk, records, cfg, skipped):
            counts[outcome] += 1
            if ids is None:
                continue
            # As a DocStore counts them: a document's first token predicts nothing.
            rows.append((locator[0], locator[1], len(ids), int(trained.sum()) - int(trained[0])))
            documents, tokens = documents + 1, tokens + len(ids)
            if len(rows) >= FLUSH_ROWS:
                np.asarray(rows, dtype=np.int64).tofile(out)
                rows.clear()
        np.asarray(rows, dtype=np.int64).reshape(-1, FIELDS).tofile(out)
    meta = {**prepare.source_meta(source, documents, tokens, counts, skipped), "streamed": True, "format": fmt}
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def index_problem(folder: Path) -> Optional[str]:
    """What is wrong with an index folder (truncated, deleted, not an index), or None."""
    try:
        meta = json.loads((folder / META).read_text())
        size, expected = (folder / INDEX).stat().st_size, int(meta["documents"]) * FIELDS * 8
        if size != expected:
            return f"{folder / INDEX} has {size} bytes, {expected} expected"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{folder}: {type(err).__name__}: {err}"
    return None


class StreamedStore:
    """A DocStore's read side over an index: lengths and trained-token counts from the index,
    documents read and tokenised from the source on demand."""

    def __init__(self, folder: Path, source: sources.Source, tokenizer, cfg: DataConfig):
        self.folder, self.source, self.tokenizer, self.cfg = Path(folder), source, tokenizer, cfg
        self.meta = json.loads((self.folder / META).read_text())
        index = np.fromfile(self.folder / INDEX, dtype=np.int64).reshape(-1, FIELDS)
        self.locators, self.lengths, self.label_counts = index[:, :2], index[:, 2], index[:, 3]
        self.reader = sources.RecordReader(source)
        # One read at a time: a row prefetched in the background (TokenizedDataset.prefetch) and one
        # read by the loop share the file's position and the tokenizer.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, index: int):
        with self._lock:
            where, record = self.reader.read(self.locators[index])
            result = prepare.prepare_record(where, record, self.meta["format"], self.tokenizer, self.cfg)
        if isinstance(result, DataError) or result[0] is None or len(result[0]) != self.lengths[index]:
            found = result.problem if isinstance(result, DataError) else (
                "dropped" if result[0] is None else f"{len(result[0])} tokens")
            raise DataError(where, f"changed since data.streaming indexed it ({self.lengths[index]} tokens then, "
                                   f"{found} now): a streamed source must stay unchanged while a run reads it; "
                                   "restart the run to index it again", "source_changed")
        return result[0], result[1]

    @property
    def skipped(self) -> Counter:
        return Counter(self.meta.get("skipped", {}))
