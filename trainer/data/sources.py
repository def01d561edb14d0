"""Where records come from: files (JSONL, JSON, Parquet, CSV/TSV, globs; the text formats also
compressed as .gz, .bz2 or .xz), `save_to_disk` folders and hub datasets. Each source yields `(where, record)` with `where` naming the file and line (or
row), and a fingerprint of its content for the preparation cache.

A bad line does not raise here: it is yielded as a DataError in place of the record, so the
caller decides (strict: stop; skip: count) and keeps the exact position.
"""
from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

from trainer.data.errors import DataError

HUB_PREFIX = "hf://"
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
              ".csv": "csv", ".tsv": "tsv"}
# Compressed text files are read as a stream (line numbers stay those of the uncompressed text).
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What a truncated or damaged compressed file raises part-way through.
CORRUPT_ARCHIVE = (EOFError, OSError, zlib.error, lzma.LZMAError)
BOM = "\ufeff"
NEWLINE = b"\n"


@dataclass(frozen=True)
class Source:
    kind: str  # jsonl | json | parquet | csv | tsv | disk | hub
    path: str  # a file, a folder, or "owner/name" (hub)
    split: str = "train"  # disk (DatasetDict) and hub only

    def __str__(self) -> str:
        return self.path if self.kind not in ("hub",) else f"{HUB_PREFIX}{self.path}:{self.split}"


def is_disk_dataset(path: str) -> bool:
    """A folder written by `datasets.save_to_disk` (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def resolve(pattern: str) -> List[Source]:
    """Expand one entry of data.train_files / eval_files into sources, or raise naming it."""
    if pattern.startswith(HUB_PREFIX):
        name, _, split = pattern[len(HUB_PREFIX):].partition(":")
        return [Source("hub", name, split or "train")]
    path, _, split = pattern.partition("::")  # folder::split picks a split of a DatasetDict
    matched = sorted(glob.glob(os.path.expanduser(path)))
    if not matched:
        raise DataError(pattern, "matches no file")
    sources = []
    for item in matched:
        if is_disk_dataset(item):
            sources.append(Source("disk", item, split or "train"))
            continue
        if os.path.isdir(item):
            raise DataError(item, "is a folder but not one written by datasets.save_to_disk "
                                  "(no state.json or dataset_dict.json); give a glob such as folder/*.jsonl")
        sources.append(Source(file_kind(item), item))
    return sources


def file_kind(path: str) -> str:
    """jsonl, json, parquet, csv or tsv from the file's suffix (before .gz/.bz2/.xz), or DataError."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSIONS
    suffix = (suffixes[-2] if len(suffixes) > 1 else "") if compressed else (suffixes[-1] if suffixes else "")
    kind = FILE_KINDS.get(suffix)
    if kind is None or (compressed and kind == "parquet"):
        raise DataError(path, f"unknown file type {''.join(Path(path).suffixes[-2:]) or '(no suffix)'!r}; valid: "
                              f"{', '.join(FILE_KINDS)} (all but .parquet also as {', '.join(COMPRESSIONS)}), "
                              "a save_to_disk folder or hf://owner/name[:split]")
    return kind


def _open_binary(path: str):
    """The file's bytes, decompressed on the fly where its suffix says so."""
    opener = COMPRESSIONS.get(Path(path).suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _corrupt(path: str, where: str, err: Exception) -> DataError:
    return DataError(where, f"{path} is truncated or corrupt ({type(err).__name__}: {err}); the rest of this "
                            "file cannot be read: re-create or re-download it", "corrupt_archive")


def fingerprint(source: Source) -> str:
    """A hash of the source's content (not its name or date): the cache key's data part."""
    digest = hashlib.sha256(source.kind.encode())
    if source.kind == "hub":
        digest.update(_hub_dataset(source)._fingerprint.encode())
        return digest.hexdigest()
    files = [source.path] if os.path.isfile(source.path) else sorted(
        str(p) for p in Path(source.path).rglob("*") if p.is_file())
    for name in files:
        digest.update(os.path.relpath(name, source.path).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(source.split.encode())
    return digest.hexdigest()


def read(source: Source) -> Iterator[Tuple[str, object]]:
    readers = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv,
               "tsv": _read_csv, "disk": _read_datasets, "hub": _read_datasets}
    return readers[source.kind](source)


def _decode(raw: bytes, where: str, first: bool):
    """bytes -> str, or a DataError. A BOM opening the file is accepted (editors write one);
    one anywhere else means files were concatenated and is reported."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(where, f"invalid UTF-8 at byte {err.start} of the line "
                                f"(bytes {raw[err.start:err.start + 4]!r}); re-encode the file as UTF-8",
                         "invalid_utf8")
    if text.startswith(BOM):
        if not first:
            return DataError(where, "a byte-order mark (U+FEFF) starts this line, not the file: "
                                    "were files concatenated? Strip it (sed -i 's/^\\xEF\\xBB\\xBF//')", "bom")
        text = text[1:]
    return text


def _read_jsonl(source: Source) -> Iterator[Tuple[str, object]]:
    for where, record, _ in _read_jsonl_located(source):
        yield where, record


def _read_jsonl_located(source: Source) -> Iterator[Tuple[str, object, Tuple[int, int]]]:
    """(where, record, (byte offset of the line, line number))."""
    number, offset = 0, 0
    with _open_binary(source.path) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except CORRUPT_ARCHIVE as err:
                where = f"{source.path}:{number + 1}"
                yield where, _corrupt(source.path, where, err), (offset, number + 1)
                return
            number += 1
            start, offset = offset, offset + len(raw)
            where = f"{source.path}:{number}"
            line = _decode(raw, where, first=number == 1)
            if not isinstance(line, DataError) and not line.strip():
                continue
            yield where, _json_line(line, where), (start, number)


def _json_line(line, where: str):
    """One decoded line -> its record, or a DataError (also passed through)."""
    if isinstance(line, DataError):
        return line
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:  # the line's own column: the newline would count as a line
        column = min(err.pos, len(line.rstrip("\r\n"))) + 1
        return DataError(where, f"malformed JSON: {err.msg} at column {column}"
                                f"{' (the line ends early)' if column > len(line.rstrip()) else ''}",
                         "malformed_json")


def _read_json(source: Source) -> Iterator[Tuple[str, object]]:
    """A JSON array of objects (each record located by its line), or JSON lines named .json."""
    try:
        with _open_binary(source.path) as handle:
            raw = handle.read()
    except CORRUPT_ARCHIVE as err:
        yield source.path, _corrupt(source.path, source.path, err)
        return
    try:
        text = raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as err:
        where = f"{source.path}:{raw.count(NEWLINE, 0, err.start) + 1}"
        yield where, DataError(where, f"invalid UTF-8 (bytes {raw[err.start:err.start + 4]!r}); re-encode the "
                                      "file as UTF-8 (the rest of this file cannot be read)", "invalid_utf8")
        return
    stripped = text.lstrip()
    if not stripped.startswith("["):
        yield from _read_jsonl(source)  # many ".json" files are JSON lines
        return
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        where = f"{source.path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield f"{source.path}:{err.lineno}", DataError(
                f"{source.path}:{err.lineno}", f"malformed JSON: {err.msg} at column {err.colno} "
                                               "(the rest of this file cannot be read)", "malformed_json")
            return
        yield where, record


def _read_csv(source: Source) -> Iterator[Tuple[str, object]]:
    with io.TextIOWrapper(_open_binary(source.path), newline="", encoding="utf-8-sig", errors="strict") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if source.kind == "tsv" else ",")
        try:
            for row in reader:
                yield f"{source.path}:{reader.line_num}", dict(row)
        except UnicodeDecodeError as err:
            where = f"{source.path}:{reader.line_num + 1}"
            yield where, DataError(where, f"invalid UTF-8 ({err.reason}); re-encode the file as UTF-8 "
                                          "(the rest of this file cannot be read)", "invalid_utf8")
        except CORRUPT_ARCHIVE as err:
            where = f"{source.path}:{reader.line_num + 1}"
            yield where, _corrupt(source.path, where, err)


def _read_parquet(source: Source) -> Iterator[Tuple[str, object]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(source.path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{source.path}:row {row}", record


def _hub_dataset(source: Source):
    import datasets

    if source.kind == "disk":
        loaded = datasets.load_from_disk(source.path)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(source.path, f"has no split {source.split!r}; splits: {', '.join(loaded)} "
                                             f"(pick one with {source.path}::SPLIT)")
            loaded = loaded[source.split]
        return loaded
    # Needs network access (or a populated HF cache); cannot be tested offline.
    return datasets.load_dataset(source.path, split=source.split)


def _read_datasets(source: Source) -> Iterator[Tuple[str, object]]:
    for row, record in enumerate(_hub_dataset(source), start=1):
        yield f"{source}:row {row}", record


# ---------------------------------------------------------------- one record at a time (data.streaming)
# A streamed source is read twice: once in order to index it, then a record at a time, by its
# locator, when training needs it: (byte offset, line number) in a JSON-lines file, (row, row) in a
# save_to_disk folder. Compressed files cannot be entered in the middle; a hub dataset is downloaded
# whole by `datasets` (nothing to stream from); JSON arrays, CSV and Parquet are not kept as one
# record per seekable line or row.
SEEKABLE = ("jsonl", "disk")


def seek_problem(source: Source) -> str | None:
    """Why data.streaming cannot read `source` one record at a time, or None."""
    compressed = source.kind == "jsonl" and Path(source.path).suffix.lower() in COMPRESSIONS
    if source.kind in SEEKABLE and not compressed:
        return None
    what = "a compressed file" if compressed else f"a {source.kind} source"
    return (f"data.streaming=true reads each record from its place in the source, which {what} does not allow; "
            "streamed sources are uncompressed JSON lines (.jsonl, .ndjson) or save_to_disk folders "
            "(convert this one, or set data.streaming=false to prepare it into the cache)")


def read_located(source: Source) -> Iterator[Tuple[str, object, Tuple[int, int]]]:
    """(where, record, locator) for every record of a seekable source, in order."""
    if source.kind == "jsonl":
        yield from _read_jsonl_located(source)
        return
    for row, record in enumerate(_hub_dataset(source)):
        yield f"{source}:row {row + 1}", record, (row, row + 1)


class RecordReader:
    """Reads records of one seekable source by locator; the file (or dataset) is opened on first use
    and again after a fork (a handle's position is shared with the parent)."""

    def __init__(self, source: Source):
        self.source = source
        self._handle, self._pid = None, None

    def _opened(self):
        if self._handle is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._handle = open(self.source.path, "rb") if self.source.kind == "jsonl" else _hub_dataset(self.source)
        return self._handle

    def read(self, locator: Tuple[int, int]) -> Tuple[str, object]:
        """(where, record or DataError) at `locator`."""
        first, second = int(locator[0]), int(locator[1])
        handle = self._opened()
        if self.source.kind != "jsonl":
            return f"{self.source}:row {second}", handle[first]
        handle.seek(first)
        where = f"{self.source.path}:{second}"
        return where, _json_line(_decode(handle.readline(), where, first=second == 1), where)


def quick_fingerprint(source: Source, sample_bytes: int = 1 << 20) -> str:
    """A fingerprint that does not read the whole source: each file's name, size, modification time
    and first and last `sample_bytes`. Hashing a source too large for a node's disk at every start
    would read all of it; a record changed later is caught when it is read (its length no longer
    matches the index)."""
    digest = hashlib.sha256(source.kind.encode())
    files = [source.path] if os.path.isfile(source.path) else sorted(
        str(p) for p in Path(source.path).rglob("*") if p.is_file())
    for name in files:
        stat = os.stat(name)
        digest.update(f"{os.path.relpath(name, source.path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        with open(name, "rb") as handle:
            digest.update(handle.read(sample_bytes))
            handle.seek(max(0, stat.st_size - sample_bytes))
            digest.update(handle.read(sample_bytes))
    digest.update(source.split.encode())
    return digest.hexdigest()
