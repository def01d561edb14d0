"""Tokenize one source into a DocStore: read -> detect format -> render -> tokenize -> length
policy, in chunks, on `data.num_proc` worker processes; strict mode stops at the first bad record
(in file order), skip mode counts every skipped record by reason.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from trainer.config import DataConfig
from trainer.control import progress
from trainer.data import formats, sources
from trainer.data.errors import UNSKIPPABLE, DataError
from trainer.data.render import render, tokenize
from trainer.data.store import StoreWriter

CHUNK = 512  # records per tokenizer call / worker task
_worker_state: dict = {}  # the tokenizer and settings, inherited by forked workers


def _records_with_format(source: sources.Source, cfg: DataConfig, located: bool = False) -> Iterator[tuple]:
    """(where, record or DataError, format): the format is data.format or detected from the first
    record that shows one; records before that which show none are reported. `located`: each tuple
    also carries the record's locator in the source (sources.read_located)."""
    names = formats.FieldNames(cfg.fields)
    fmt = None if cfg.format == "auto" else cfg.format
    records = sources.read_located(source) if located else ((*item, None) for item in sources.read(source))
    for where, record, locator in records:
        if fmt is None and isinstance(record, dict):
            try:
                fmt = formats.detect(record, names, where)
            except DataError as err:
                record = err
        yield (where, record, fmt, locator) if located else (where, record, fmt)


def _needs_template(tokenizer, source: sources.Source, fmt: Optional[str]) -> None:
    if fmt in ("messages", "sharegpt", "alpaca") and not getattr(tokenizer, "chat_template", None):
        raise DataError(str(source), f"format {fmt} is rendered with the tokenizer's chat template, but this "
                                     "tokenizer has none; set model.chat_template=chatml (or a Jinja template)",
                        "template")


def _prepare_one(where: str, record, fmt: str, tokenizer, cfg: DataConfig):
    """One record -> Rendered, or a DataError."""
    if isinstance(record, DataError):
        return record
    try:
        canonical = formats.normalize(record, fmt, formats.FieldNames(cfg.fields), where)
        return render(canonical, tokenizer, cfg.loss_on, where)
    except DataError as err:
        return err
    except (TypeError, ValueError, KeyError) as err:  # a template or field of an unexpected type
        return DataError(where, f"cannot render this record: {type(err).__name__}: {err}", "bad_message")


def _fit(where: str, ids: np.ndarray, trained: np.ndarray, cfg: DataConfig):
    """Apply the length policy; returns (ids, trained, outcome) with outcome kept/truncated/dropped,
    or a DataError for a sample that never had a trainable token."""
    if not trained[1:].any():
        return DataError(where, "zero trainable tokens after masking (loss_on="
                                f"{cfg.loss_on}); the sample would teach nothing", "zero_trainable")
    if len(ids) <= cfg.max_seq_len:
        return ids, trained, "kept"
    if cfg.length_policy == "drop":
        return None, None, "dropped_too_long"
    ids, trained = ids[:cfg.max_seq_len], trained[:cfg.max_seq_len]
    if not trained[1:].any():
        return None, None, "dropped_no_trained_token_left"  # the whole answer lay past max_seq_len
    return ids, trained, "truncated"


def process_chunk(chunk: List[Tuple[str, object, str]]):
    """Worker task: a list of records -> a list of (where, result) in the same order."""
    tokenizer, cfg = _worker_state["tokenizer"], _worker_state["cfg"]
    prepared = [_prepare_one(where, record, fmt, tokenizer, cfg) for where, record, fmt in chunk]
    good = [i for i, p in enumerate(prepared) if not isinstance(p, DataError)]
    tokens = tokenize(tokenizer, [prepared[i] for i in good])
    results: List = list(prepared)
    for i, (ids, trained) in zip(good, tokens):
        results[i] = _fit(chunk[i][0], ids, trained, cfg)
    return results


def _chunks(records: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(islice(records, size))
        if not chunk:
            return
        yield chunk


def prepare_record(where: str, record, fmt: str, tokenizer, cfg: DataConfig):
    """One record, alone, as process_chunk prepares it in a chunk: (ids, trained, outcome) or a DataError."""
    prepared = _prepare_one(where, record, fmt, tokenizer, cfg)
    if isinstance(prepared, DataError):
        return prepared
    ids, trained = tokenize(tokenizer, [prepared])[0]
    return _fit(where, ids, trained, cfg)


def source_records(source: sources.Source, tokenizer, cfg: DataConfig,
                   located: bool = False) -> Tuple[Iterator, Optional[str]]:
    """(records for `processed`, the format they are read as) of one source, its chat template checked
    against the format; `located` as in _records_with_format. Sets the state forked workers inherit."""
    _worker_state.update(tokenizer=tokenizer, cfg=cfg)
    records = _records_with_format(source, cfg, located)
    first = next(records, None)
    if first is None:
        return iter(()), None
    _needs_template(tokenizer, source, first[2])
    return _prepend(first, records), first[2]


def source_meta(source: sources.Source, documents: int, tokens: int, counts: Counter, skipped: Counter) -> dict:
    """The counts a prepared (or indexed) source records: documents kept, tokens, skipped by reason,
    truncated, dropped by reason (`counts`: outcomes of _fit)."""
    return {"source": str(source), "documents": documents, "tokens": tokens, "skipped": dict(skipped),
            "truncated": counts["truncated"],
            "dropped": {k: counts[k] for k in ("dropped_too_long", "dropped_no_trained_token_left") if counts[k]}}


def tokenize_source(source: sources.Source, tokenizer, cfg: DataConfig, folder: Path) -> dict:
    """Write `source` as a DocStore into `folder`; returns its meta (counts). Raises DataError in
    strict mode at the first bad record."""
    records, _ = source_records(source, tokenizer, cfg)
    writer = StoreWriter(folder)
    counts, skipped = Counter(), Counter()
    for ids, trained, outcome in processed(process_chunk, records, cfg, skipped):
        counts[outcome] += 1
        if ids is not None:
            writer.add(ids, trained)
    meta = source_meta(source, len(writer.offsets) - 1, writer.offsets[-1], counts, skipped)
    writer.close(meta)
    return meta


def processed(process: Callable[[list], list], records: Iterator, cfg: DataConfig, skipped: Counter) -> Iterator:
    """`process` (one chunk of records -> their results) over `records`, in cfg.num_proc workers, results
    in record order. A bad record (a DataError result) stops everything in strict mode, or when it cannot
    be skipped; otherwise it is counted by reason in `skipped`."""
    pool = _pool(cfg.num_proc)
    chunks = _chunks(records, CHUNK)
    try:
        for chunk_results in (pool.imap(process, chunks) if pool else map(process, chunks)):
            progress()  # a large dataset's preparation is long, not hung
            for result in chunk_results:
                if isinstance(result, DataError):
                    # A damaged archive loses the rest of its file, not one record: never skipped.
                    if cfg.on_error == "strict" or result.reason in UNSKIPPABLE:
                        raise result
                    skipped[result.reason] += 1
                    continue
                yield result
    finally:
        if pool:
            pool.terminate()


def _prepend(first, rest):
    yield first
    yield from rest


def _pool(num_proc: int):
    if num_proc <= 1:
        return None
    # Forked workers inherit the tokenizer; Rust-side threads must be off before the fork.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return multiprocessing.get_context("fork").Pool(num_proc)
