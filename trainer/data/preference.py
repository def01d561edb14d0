"""Preference data: pairs (DPO, SimPO) and marked single answers (KTO), through the SFT pipeline's
stages: read (sources) -> normalise (here) -> render with the chat template (render.chat_spans,
the SFT renderer) -> tokenize (render.tokenize) -> length policy (here) -> DocStore (store) ->
dataset rows of two sequences that one forward pass takes together.

Records:
    pairs  {prompt, chosen, rejected}: prompt a string or messages, answers strings or messages;
           or {chosen, rejected} as whole conversations whose common prefix is the prompt
    kto    {prompt, completion, label}: label a JSON boolean (true: desirable)
Field names are remapped by data.fields, as for SFT.

Store layout: a pair is two consecutive documents (chosen, rejected); a KTO example is one document,
its label in labels.npy. Loss only on the answer: the prompt's tokens are never trained.

Length policy (data.max_seq_len = L): a sequence longer than L first loses the start of its prompt
(the end, next to the answer, is kept), the prompt keeping at least min(its length, L/2) tokens;
what still does not fit is cut from the answer's end. An answer that alone fills L (it would not fit
with the prompt cut to nothing) is bad input: `too_long`. Both kinds of cut are counted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data import dataset as sft_dataset
from trainer.data import formats, sources
from trainer.data.collate import collate
from trainer.data.errors import DataError
from trainer.data.prepare import _records_with_format, _worker_state, processed
from trainer.data.render import IGNORE, chat_spans, check_messages, tokenize
from trainer.data.store import StoreWriter

PAIRS, KTO = "preference", "kto"  # the data.format of each kind of preference data
PREFERENCE_FORMATS = (PAIRS, KTO)
HISTOGRAM_BINS = sft_dataset.HISTOGRAM_BINS


# ---------------------------------------------------------------- normalise: record -> messages

def _as_messages(value, role: str, names: formats.FieldNames, where: str, what: str) -> List[Dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return formats._chat_messages(value, names, where)
    raise DataError(where, f"{what} must be a string or a message list, got {type(value).__name__}", "missing_field")


def _answer(messages: List[Dict], where: str, what: str) -> List[Dict]:
    """The answer part of a pair: exactly one non-empty assistant message."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise DataError(where, f"{what} must be one assistant answer after the prompt, got roles {roles}", "bad_pair")
    if not str(messages[0]["content"]).strip():
        raise DataError(where, f"{what} is empty: nothing to prefer", "empty_answer")
    return messages


def _split_conversations(chosen: List[Dict], rejected: List[Dict], where: str) -> Tuple[List[Dict], List, List]:
    """Two whole conversations -> (their common prefix: the prompt, chosen answer, rejected answer)."""
    common = 0
    while (common < min(len(chosen), len(rejected)) - 1
           and (chosen[common]["role"], chosen[common]["content"]) == (rejected[common]["role"], rejected[common]["content"])):
        common += 1
    prompt = chosen[:common]
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(where, "chosen and rejected do not share a prompt: their conversations differ before any "
                               "common user turn (give {prompt, chosen, rejected}, or two conversations that "
                               "differ only in the last assistant answer)", "no_shared_prompt")
    return prompt, chosen[common:], rejected[common:]


def normalize_pair(record, names: formats.FieldNames, where: str) -> Tuple[List[Dict], List[Dict], List[Dict]]:
    """One pair record -> (prompt messages, chosen answer, rejected answer); raises DataError."""
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}", "not_an_object")
    chosen = _as_messages(formats._field(record, "chosen", names, PAIRS, where), "assistant", names, where, "chosen")
    rejected = _as_messages(formats._field(record, "rejected", names, PAIRS, where), "assistant", names, where,
                            "rejected")
    if record.get(names("prompt")) is not None:
        prompt = _as_messages(record[names("prompt")], "user", names, where, "prompt")
        # Answers given as whole conversations beside a prompt: the prompt is their common start.
        chosen = chosen[len(prompt):] if chosen[:len(prompt)] == prompt else chosen
        rejected = rejected[len(prompt):] if rejected[:len(prompt)] == prompt else rejected
    else:
        prompt, chosen, rejected = _split_conversations(chosen, rejected, where)
    chosen, rejected = _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected")
    if chosen[0]["content"] == rejected[0]["content"]:
        raise DataError(where, "chosen and rejected are the same answer: the pair teaches nothing", "identical_answers")
    return prompt, chosen, rejected


def normalize_kto(record, names: formats.FieldNames, where: str) -> Tuple[List[Dict], List[Dict], bool]:
    """One KTO record -> (prompt messages, answer, desirable); raises DataError."""
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}", "not_an_object")
    prompt = _as_messages(formats._field(record, "prompt", names, KTO, where), "user", names, where, "prompt")
    answer = _as_messages(formats._field(record, "completion", names, KTO, where), "assistant", names, where,
                          "completion")
    label = formats._field(record, "label", names, KTO, where)
    if not isinstance(label, bool):
        raise DataError(where, f"label {label!r} is not a boolean: true (desirable) or false (undesirable)",
                        "bad_label")
    return prompt, _answer(answer, where, "completion"), label


# ---------------------------------------------------------------- length policy

def answer_start(trained: np.ndarray) -> int:
    """Index of the first trained token: what precedes it is the prompt."""
    return int(np.argmax(trained)) if trained.any() else len(trained)


def fit(ids: np.ndarray, trained: np.ndarray, limit: int, prompt_keep: Optional[int] = None):
    """Cut one sequence to `limit` tokens: the prompt from its start (down to `prompt_keep` tokens),
    then the answer from its end. Returns (ids, trained, prompt_cut, answer_cut)."""
    start = answer_start(trained)
    if len(ids) <= limit:
        return ids, trained, False, False
    answer_len = len(ids) - start
    floor = min(start, limit // 2) if prompt_keep is None else min(start, prompt_keep)
    keep_prompt = min(start, max(floor, limit - answer_len))
    keep_answer = limit - keep_prompt
    cut = slice(start - keep_prompt, start + keep_answer)
    return ids[cut], trained[cut], keep_prompt < start, keep_answer < answer_len


def _fit_record(where: str, sequences: List[Tuple[np.ndarray, np.ndarray]], limit: int):
    """Fit the sequences of one record (a pair's two, or one); a DataError when an answer alone fills
    the limit or an answer has no trained token. Returns (sequences, Counter of cuts)."""
    cuts = Counter()
    fitted = []
    for ids, trained in sequences:
        start = answer_start(trained)
        if not trained[1:].any():
            raise DataError(where, "the answer has no trainable token after rendering", "zero_trainable")
        if len(ids) - start >= limit:
            raise DataError(where, f"an answer of {len(ids) - start} tokens does not fit data.max_seq_len={limit} "
                                   "even with the prompt cut to nothing; raise data.max_seq_len or shorten it",
                            "too_long")
        ids, trained, prompt_cut, answer_cut = fit(ids, trained, limit)
        cuts.update(prompt_cut=int(prompt_cut), answer_cut=int(answer_cut))
        fitted.append((ids, trained))
    return fitted, cuts


# ---------------------------------------------------------------- prepare: one source -> a DocStore

def _render(prompt: List[Dict], answer: List[Dict], tokenizer, where: str):
    messages = prompt + answer
    check_messages(messages, where)
    return chat_spans(tokenizer, messages, "last_turn", where)


def _prepare_record(where: str, record, kind: str, tokenizer, cfg: DataConfig):
    """One record -> (list of Rendered, KTO label or None), or a DataError."""
    if isinstance(record, DataError):
        return record
    names = formats.FieldNames(cfg.fields)
    try:
        if kind == PAIRS:
            prompt, chosen, rejected = normalize_pair(record, names, where)
            return [_render(prompt, chosen, tokenizer, where), _render(prompt, rejected, tokenizer, where)], None
        prompt, answer, label = normalize_kto(record, names, where)
        return [_render(prompt, answer, tokenizer, where)], label
    except DataError as err:
        return err
    except (TypeError, ValueError, KeyError) as err:  # a template or field of an unexpected type
        return DataError(where, f"cannot render this record: {type(err).__name__}: {err}", "bad_message")


def process_preference_chunk(chunk: List[Tuple[str, object, str]]):
    """Worker task: records -> [(sequences, label, cuts) or DataError], in order."""
    tokenizer, cfg, kind = _worker_state["tokenizer"], _worker_state["cfg"], _worker_state["kind"]
    prepared = [_prepare_record(where, record, kind, tokenizer, cfg) for where, record, _ in chunk]
    results: List = []
    for (where, _, _), item in zip(chunk, prepared):
        if isinstance(item, DataError):
            results.append(item)
            continue
        rendered, label = item
        try:
            sequences, cuts = _fit_record(where, tokenize(tokenizer, rendered), cfg.max_seq_len)
            results.append((sequences, label, cuts))
        except DataError as err:
            results.append(err)
    return results


def tokenize_preference_source(source: sources.Source, tokenizer, cfg: DataConfig, folder: Path) -> dict:
    """Write `source` (cfg.format is `preference` or `kto`) as a DocStore; strict mode raises the first
    bad record's DataError, skip mode counts by reason. Returns the store's meta."""
    kind = cfg.format
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(str(source), "preference data is rendered with the tokenizer's chat template, but this "
                                     "tokenizer has none; set model.chat_template=chatml", "template")
    _worker_state.update(tokenizer=tokenizer, cfg=cfg, kind=kind)
    writer = StoreWriter(folder)
    skipped, cuts, labels = Counter(), Counter(), []
    records = _records_with_format(source, cfg)
    for sequences, label, record_cuts in processed(process_preference_chunk, records, cfg, skipped):
        for ids, trained in sequences:
            writer.add(ids, trained)
        cuts.update(record_cuts)
        if label is not None:
            labels.append(label)
    if kind == KTO:
        np.save(folder / "labels.npy", np.asarray(labels, dtype=np.uint8))
    meta = {"source": str(source), "kind": kind, "documents": len(writer.offsets) - 1, "tokens": writer.offsets[-1],
            "skipped": dict(skipped), "truncated": cuts["prompt_cut"] + cuts["answer_cut"],
            "prompt_cut": cuts["prompt_cut"], "answer_cut": cuts["answer_cut"], "dropped": {}}
    writer.close(meta)
    return meta


# ---------------------------------------------------------------- dataset: rows of two sequences

class PreferenceDataset:
    """Rows over a Corpus of preference stores. Row i holds two sequences that go through one forward
    pass (the loop puts every row's first sequence, then every row's second, along the batch):
        pairs  (chosen, rejected)
        kto    (the answer, a mismatched answer after the same prompt: the KL reference point's sample)
    A unit is a pair (pairs) or an example (kto): `units[i]` is row i's unit in the corpus.
    `reference` (units of the corpus x 2), when set, holds precomputed reference log-probs.
    """

    def __init__(self, corpus: sft_dataset.Corpus, units: np.ndarray, kind: str, max_seq_len: int,
                 report: Optional[dict] = None):
        self.corpus, self.units, self.kind, self.max_seq_len = corpus, np.asarray(units, np.int64), kind, max_seq_len
        self.report = report or {}
        self.packed = False
        self.reference: Optional[np.ndarray] = None
        self.desirable = (np.concatenate([np.load(s.folder / "labels.npy") for s in corpus.stores]).astype(bool)
                          if kind == KTO and corpus.stores else np.zeros(0, bool))

    def prefetch(self, indices) -> None:
        """Nothing to read ahead: preference data is prepared into the cache, never streamed."""

    def __len__(self) -> int:
        return len(self.units)

    @staticmethod
    def units_of_corpus(corpus: sft_dataset.Corpus, kind: str) -> int:
        return len(corpus) // 2 if kind == PAIRS else len(corpus)

    def _kl_partner(self, doc: int) -> int:
        """KTO's mismatched answer for example `doc`: the next example's of the same source (wrapping),
        fixed by the data alone, so every world size and resume sees the same pairs."""
        s = int(np.searchsorted(self.corpus.starts, doc, side="right")) - 1
        first, count = int(self.corpus.starts[s]), len(self.corpus.stores[s])
        return first + (doc - first + 1) % count

    def _row(self, ids: np.ndarray, trained: np.ndarray) -> Dict[str, List[int]]:
        labels = np.where(trained.astype(bool), ids, IGNORE)
        labels[0] = IGNORE
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def sequences(self, unit: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        if self.kind == PAIRS:
            return [self.corpus.doc(2 * unit), self.corpus.doc(2 * unit + 1)]
        ids, trained = self.corpus.doc(unit)
        other_ids, other_trained = self.corpus.doc(self._kl_partner(unit))
        start, other_start = answer_start(trained), answer_start(other_trained)
        mixed_ids = np.concatenate([ids[:start], other_ids[other_start:]])
        mixed_trained = np.concatenate([trained[:start], other_trained[other_start:]])
        mixed_ids, mixed_trained, _, _ = fit(mixed_ids, mixed_trained, self.max_seq_len)
        return [(ids, trained), (mixed_ids, mixed_trained)]

    def __getitem__(self, index: int) -> dict:
        unit = int(self.units[index])
        sequences = [self._row(ids, trained) for ids, trained in self.sequences(unit)]
        # input_ids: the first sequence's tokens, for tools that probe a row's text (the export's logit
        # probe); the loop reads `sequences` through collate_rows.
        row = {"sequences": sequences, "input_ids": sequences[0]["input_ids"]}
        if self.kind == KTO:
            row["desirable"] = bool(self.desirable[unit])
        if self.reference is not None:
            row["reference"] = self.reference[unit].tolist()
        return row

    def label_tokens(self, index: int) -> int:
        """Trained tokens of row `index` (both answers of a pair; a KTO example's own answer)."""
        unit = int(self.units[index])
        counts = self.corpus.label_counts
        return int(counts[2 * unit] + counts[2 * unit + 1]) if self.kind == PAIRS else int(counts[unit])

    # Statistics, for the log line and `shardtune data preview`.
    def stats(self) -> dict:
        lengths = self.corpus.lengths
        if self.kind == PAIRS:
            first, second = lengths[2 * self.units], lengths[2 * self.units + 1]
            answers = self.corpus.label_counts
            chosen, rejected = answers[2 * self.units], answers[2 * self.units + 1]
            extra = {"pairs": len(self), "chosen_answer_tokens_mean": float(chosen.mean()) if len(self) else 0.0,
                     "rejected_answer_tokens_mean": float(rejected.mean()) if len(self) else 0.0,
                     "chosen_longer_share": float((chosen > rejected).mean()) if len(self) else 0.0}
        else:
            first = second = lengths[self.units]
            desirable = self.desirable[self.units]
            extra = {"examples": len(self), "desirable": int(desirable.sum()), "undesirable": int((~desirable).sum())}
        longest = np.maximum(first, second)
        edges = [b for b in HISTOGRAM_BINS if b < self.max_seq_len] + [self.max_seq_len]
        counts = np.histogram(longest, bins=[0, *edges])[0] if len(longest) else np.zeros(len(edges), int)
        tokens = int(first.sum() + second.sum()) if self.kind == PAIRS else int(first.sum())
        trained = int(sum(self.label_tokens(i) for i in range(len(self))))
        return {"rows": len(self), "kind": self.kind, **extra, "tokens": tokens, "trained_tokens": trained,
                "trained_fraction": trained / tokens if tokens else 0.0,
                "length_histogram": {f"<={e}": int(c) for e, c in zip(edges, counts)}, **self.report}

    def describe(self) -> str:
        s = self.stats()
        what = (f"{s['pairs']} pairs" if self.kind == PAIRS
                else f"{s['examples']} examples ({s['desirable']} desirable, {s['undesirable']} undesirable)")
        return (f"{what}, {s['tokens']} tokens ({s['trained_tokens']} trained), prompts cut "
                f"{s.get('prompt_cut', 0)}, answers cut {s.get('answer_cut', 0)}, skipped {s.get('skipped') or 'none'}, "
                f"cache {s.get('cache_hits', 0)} hit / {s.get('cache_misses', 0)} prepared")


def _load(patterns: Sequence[str], tokenizer, cfg: DataConfig, log):
    """(corpus, units of each pattern, report) with the cut counts added from the stores' meta."""
    corpus, groups, report = sft_dataset._load_groups(list(patterns), tokenizer, cfg, log,
                                                      prepare_source=tokenize_preference_source)
    for key in ("prompt_cut", "answer_cut"):
        report[key] = int(sum(store.meta.get(key, 0) for store in corpus.stores))
    if cfg.format == PAIRS:
        groups = [g[0::2] // 2 for g in groups]  # a pair is two consecutive documents
    return corpus, groups, report


def _check_kto_balance(dataset: PreferenceDataset, files: Sequence[str]) -> None:
    desirable = dataset.desirable[dataset.units]
    if len(desirable) and desirable.all():
        raise DataError(", ".join(files), f"all {len(desirable)} KTO examples are desirable (label true): KTO needs "
                                          "undesirable ones (label false) to learn what to avoid; for good "
                                          "answers alone use objective=sft", "one_sided")


def build_preference_datasets(cfg: DataConfig, kind: str, tokenizer, log=None
                              ) -> Tuple[PreferenceDataset, Optional[PreferenceDataset]]:
    """The train and eval splits of preference data of `kind` (`preference` or `kto`)."""
    cfg = replace(cfg, format=kind)  # in the cache key: the same file prepared as SFT data is another entry
    corpus, groups, report = _load(cfg.train_files, tokenizer, cfg, log)
    if not sum(len(g) for g in groups):
        raise DataError(", ".join(cfg.train_files), f"no usable {kind} record (skipped {report['skipped']})", "empty")
    rng = np.random.default_rng(cfg.seed)
    evaluation = None
    if cfg.eval_files:
        eval_corpus, eval_groups, eval_report = _load(cfg.eval_files, tokenizer, cfg, log)
        evaluation = PreferenceDataset(eval_corpus, np.concatenate(eval_groups), kind, cfg.max_seq_len, eval_report)
    elif cfg.eval_fraction > 0:
        units = np.concatenate(groups)
        held_out = rng.permutation(units)[:max(1, int(len(units) * cfg.eval_fraction))]
        groups = [np.setdiff1d(g, held_out) for g in groups]
        evaluation = PreferenceDataset(corpus, np.sort(held_out), kind, cfg.max_seq_len, {})
    train = PreferenceDataset(corpus, sft_dataset.mix(groups, cfg.weights, rng), kind, cfg.max_seq_len, report)
    if kind == KTO:
        _check_kto_balance(train, cfg.train_files)
    return train, evaluation


def collate_rows(rows: List[dict], pad_id: int, width: Optional[int] = None):
    """Rows of two sequences -> one batch of 2B sequences (every first sequence, then every second),
    plus `reference` (B x 2, float64) and `desirable` (B, bool) when the rows carry them."""
    sequences = [row["sequences"][0] for row in rows] + [row["sequences"][1] for row in rows]
    batch = collate(sequences, pad_id, width)
    if "reference" in rows[0]:
        batch["reference"] = torch.tensor([row["reference"] for row in rows], dtype=torch.float64)
    if "desirable" in rows[0]:
        batch["desirable"] = torch.tensor([row["desirable"] for row in rows], dtype=torch.bool)
    return batch


# ---------------------------------------------------------------- before launch

SHAPES = {PAIRS: (("chosen", "rejected"), "prompt, chosen, rejected (or chosen and rejected conversations)"),
          KTO: (("prompt", "completion", "label"), "prompt, completion, label")}


def first_record_problem(files: Sequence[str], kind: str, fields: Dict[str, str]) -> Optional[str]:
    """Why the first record of the first JSON Lines file cannot be `kind` data (a file of SFT
    conversations given to objective=dpo, ...), or None; other file types are checked while preparing."""
    import glob
    import json
    import os

    names = formats.FieldNames(fields)
    paths = sorted(glob.glob(os.path.expanduser(files[0]))) if files else []
    if not paths or not paths[0].endswith(".jsonl"):
        return None
    try:
        with open(paths[0], encoding="utf-8") as handle:
            first = next((json.loads(line) for line in handle if line.strip()), None)
    except (OSError, ValueError):
        return None  # unreadable or malformed: the data pipeline reports it with its line
    needed, shape = SHAPES[kind]
    if not isinstance(first, dict) or all(names(k) in first for k in needed):
        return None
    return (f"data.train_files: {paths[0]}:1 has keys {sorted(first)}, not {kind} data ({shape}); "
            f"point data.train_files at such records, rename fields with data.fields, or use objective=sft")
