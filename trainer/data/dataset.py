"""Assemble the train and eval splits from prepared sources: mixing weights, held-out fraction,
packing. A dataset row is one document, or (packed) several with restarting position ids.

Contract with the loop: len(ds); ds[i] -> {input_ids, labels[, position_ids]} (lists);
ds.label_tokens(i) -> tokens of row i that carry a loss.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.config import DataConfig
from trainer.data import cache, sources, streamed
from trainer.data.errors import DataError
from trainer.data.packing import pack
from trainer.data.prepare import tokenize_source
from trainer.data.render import IGNORE
from trainer.data.store import DocStore, store_problem

HISTOGRAM_BINS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Corpus:
    """Several DocStores (or StreamedStores) seen as one list of documents (global ids)."""

    def __init__(self, stores: Sequence[DocStore]):
        self.stores = list(stores)
        self.starts = np.cumsum([0] + [len(s) for s in self.stores])
        self.lengths = np.concatenate([s.lengths for s in self.stores] or [np.zeros(0, np.int64)])
        self.label_counts = np.concatenate([s.label_counts for s in self.stores] or [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def doc(self, doc_id: int):
        s = int(np.searchsorted(self.starts, doc_id, side="right")) - 1
        return self.stores[s].doc(int(doc_id - self.starts[s]))


class TokenizedDataset:
    """Rows of documents over a Corpus; packed rows carry position_ids."""

    def __init__(self, corpus: Corpus, rows: List[np.ndarray], packed: bool, max_seq_len: int,
                 report: Optional[dict] = None):
        self.corpus, self.rows, self.packed, self.max_seq_len = corpus, rows, packed, max_seq_len
        self.report = report or {}
        self._label_tokens = np.asarray([int(corpus.label_counts[r].sum()) for r in rows], dtype=np.int64)
        self._ahead: Dict[int, Future] = {}  # rows being read in the background (streamed data)
        self._reader: Optional[ThreadPoolExecutor] = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def streamed(self) -> bool:
        """Rows are read and tokenised from their sources when asked for (data.streaming)."""
        return any(isinstance(store, streamed.StreamedStore) for store in self.corpus.stores)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading rows `indices` in a background thread, so that a streamed row's read and
        tokenisation (milliseconds) overlap the step before it; the loop asks for the next step's rows.
        A no-op for prepared rows (memory-mapped: microseconds)."""
        if not self.streamed:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-prefetch")
        self._ahead = {i: self._ahead.get(i) or self._reader.submit(self._read, i) for i in indices}

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        ahead = self._ahead.pop(index, None)
        return ahead.result() if ahead is not None else self._read(index)

    def _read(self, index: int) -> Dict[str, List[int]]:
        ids, labels, positions = [], [], []
        for doc_id in self.rows[index]:
            doc_ids, trained = self.corpus.doc(int(doc_id))
            doc_labels = np.where(trained.astype(bool), doc_ids, IGNORE)
            doc_labels[0] = IGNORE  # predicted from nothing (alone) or from another document (packed)
            ids.extend(doc_ids.tolist())
            labels.extend(doc_labels.tolist())
            positions.extend(range(len(doc_ids)))
        row = {"input_ids": ids, "labels": labels}
        if self.packed:
            row["position_ids"] = positions
        return row

    def label_tokens(self, index: int) -> int:
        return int(self._label_tokens[index])

    # Statistics, for the log line and `shardtune data preview`.
    @property
    def skipped(self) -> Counter:
        return Counter(self.report.get("skipped", {}))

    @property
    def truncated(self) -> int:
        return int(self.report.get("truncated", 0))

    def stats(self) -> dict:
        docs = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
        lengths = self.corpus.lengths[docs]
        tokens, trained = int(lengths.sum()), int(self._label_tokens.sum())
        edges = [b for b in HISTOGRAM_BINS if b < self.max_seq_len] + [self.max_seq_len]
        counts = np.histogram(lengths, bins=[0, *edges])[0] if len(lengths) else np.zeros(len(edges), int)
        stats = {"rows": len(self), "documents": int(len(docs)), "tokens": tokens, "trained_tokens": trained,
                 "trained_fraction": trained / tokens if tokens else 0.0,
                 "length_histogram": {f"<={e}": int(c) for e, c in zip(edges, counts)}, **self.report}
        if self.packed:
            slots = len(self) * self.max_seq_len
            stats["packing"] = {"rows": len(self), "slots": slots, "fill": tokens / slots if slots else 0.0,
                                "trained_per_slot": trained / slots if slots else 0.0}
        return stats

    def describe(self) -> str:
        s = self.stats()
        text = (f"{s['rows']} rows, {s['documents']} documents, {s['tokens']} tokens "
                f"({s['trained_tokens']} trained), {s.get('truncated', 0)} truncated, "
                f"dropped {s.get('dropped') or 'none'}, skipped {s.get('skipped') or 'none'}")
        if self.packed:
            text += f", packing fill {100 * s['packing']['fill']:.1f}%"
        return text + f", cache {s.get('cache_hits', 0)} hit / {s.get('cache_misses', 0)} prepared"


def expand_files(patterns: List[str]) -> List[str]:
    """The files (or folders, or hf:// names) that data.*_files name, in order."""
    return [s.path if s.kind != "hub" else str(s) for p in patterns for s in sources.resolve(p)]


def _prepare(source: sources.Source, tokenizer, cfg: DataConfig, tok_print: str, log,
             prepare_source=tokenize_source) -> Tuple[DocStore | streamed.StreamedStore, bool]:
    """The source's store from the cache, prepared (or, streaming, indexed) first on a miss."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_cache_dir()
    if cfg.streaming:
        if prepare_source is not tokenize_source:
            raise DataError(str(source), "data.streaming=true reads SFT data (text, chat, prompt/completion); "
                                         "preference data is prepared into the cache: set data.streaming=false",
                            "not_seekable")
        key = cache.cache_key("index:" + sources.quick_fingerprint(source), tok_print, cfg)
        folder, hit = cache.get_or_prepare(root, key, lambda tmp: streamed.index_source(source, tokenizer, cfg, tmp),
                                           log, check=streamed.index_problem)
        return streamed.StreamedStore(folder, source, tokenizer, cfg), hit
    key = cache.cache_key(sources.fingerprint(source), tok_print, cfg)
    folder, hit = cache.get_or_prepare(root, key, lambda tmp: prepare_source(source, tokenizer, cfg, tmp), log,
                                       check=store_problem)
    return DocStore(folder), hit


def _load_groups(patterns: List[str], tokenizer, cfg: DataConfig, log,
                 prepare_source=tokenize_source) -> Tuple[Corpus, List[np.ndarray], dict]:
    """Prepare every source of every pattern (with `prepare_source`: SFT documents, or preference
    records: trainer/data/preference.py); returns the corpus, the doc ids of each pattern, counts."""
    tok_print = cache.tokenizer_fingerprint(tokenizer)
    stores, groups, report = [], [], {"skipped": Counter(), "truncated": 0, "dropped": Counter(),
                                      "cache_hits": 0, "cache_misses": 0}
    for pattern in patterns:
        first = sum(len(s) for s in stores)
        for source in sources.resolve(pattern):
            store, hit = _prepare(source, tokenizer, cfg, tok_print, log, prepare_source)
            stores.append(store)
            report["skipped"].update(store.skipped)
            report["truncated"] += store.meta["truncated"]
            report["dropped"].update(store.meta["dropped"])
            report["cache_hits" if hit else "cache_misses"] += 1
        groups.append(np.arange(first, sum(len(s) for s in stores)))
    report["skipped"], report["dropped"] = dict(report["skipped"]), dict(report["dropped"])
    return Corpus(stores), groups, report


def mix(groups: List[np.ndarray], weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Doc ids of one epoch: each group gets weight/sum(weights) of the total, repeating a small
    group (upsampling) or taking a seeded subset of a large one."""
    if not weights:
        return np.concatenate(groups) if groups else np.zeros(0, np.int64)
    total, norm = sum(len(g) for g in groups), float(sum(weights))
    picked = []
    for group, weight in zip(groups, weights):
        target = int(round(total * weight / norm))
        if len(group) == 0:
            continue
        full, rest = divmod(target, len(group))
        picked.extend([np.tile(group, full), rng.choice(group, rest, replace=False)])
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def _rows(corpus: Corpus, docs: np.ndarray, cfg: DataConfig) -> List[np.ndarray]:
    if not cfg.packing:
        return [docs[i:i + 1] for i in range(len(docs))]
    return [docs[row] for row in pack(corpus.lengths[docs], cfg.max_seq_len)]


def _make(corpus, docs, cfg, report) -> TokenizedDataset:
    return TokenizedDataset(corpus, _rows(corpus, docs, cfg), cfg.packing, cfg.max_seq_len, report)


def load_files(patterns: List[str], tokenizer, cfg: DataConfig, log=None) -> TokenizedDataset:
    """Every document of `patterns` as one dataset (no mixing, no split)."""
    corpus, groups, report = _load_groups(list(patterns), tokenizer, cfg, log)
    return _make(corpus, mix(groups, [], None), cfg, report)


def build_datasets(cfg: DataConfig, tokenizer, log=None) -> Tuple[TokenizedDataset, Optional[TokenizedDataset]]:
    """The train split and the eval split (None when there is no eval data)."""
    corpus, groups, report = _load_groups(list(cfg.train_files), tokenizer, cfg, log)
    if not len(corpus):
        raise DataError(", ".join(cfg.train_files), f"no usable sample (skipped {report['skipped']}, "
                                                    f"dropped {report['dropped']})", "empty")
    rng = np.random.default_rng(cfg.seed)
    evaluation = None
    if cfg.eval_files:
        evaluation = load_files(list(cfg.eval_files), tokenizer, cfg, log)
    elif cfg.eval_fraction > 0:
        held_out = rng.permutation(len(corpus))[:max(1, int(len(corpus) * cfg.eval_fraction))]
        groups = [np.setdiff1d(g, held_out) for g in groups]
        evaluation = _make(corpus, np.sort(held_out), cfg, {})
    return _make(corpus, mix(groups, cfg.weights, rng), cfg, report), evaluation
