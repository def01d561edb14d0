"""Load files into tokenized samples: {input_ids, labels}, with counts of what was dropped and why."""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

from trainer.config import DataConfig
from trainer.data.errors import DataError
from trainer.data.render import IGNORE, render_messages


@dataclass
class TokenizedDataset:
    samples: List[Dict[str, List[int]]]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return self.samples[index]

    def label_tokens(self, index: int) -> int:
        """Tokens of sample `index` that carry a loss (position 0 predicts nothing)."""
        return sum(1 for t in self.samples[index]["labels"][1:] if t != IGNORE)


def expand_files(patterns: List[str]) -> List[str]:
    files: List[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise DataError(pattern, "matches no file")
        files.extend(matched)
    return files


def read_jsonl(path: str) -> Iterator[Tuple[str, object]]:
    """Yield (where, record) for every non-blank line; a bad line raises DataError naming file:line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, DataError(where, f"invalid UTF-8 at byte {err.start}")
                continue
            line = line.lstrip("\ufeff").strip()
            if not line:
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, DataError(where, f"malformed JSON ({err.msg} at column {err.colno})")


def render_record(record, tokenizer, cfg: DataConfig, where: str) -> Tuple[List[int], List[int]]:
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
    key = cfg.fields.get("messages", "messages")
    if key in record:
        return render_messages(tokenizer, record[key], cfg.loss_on, where)
    text_key = cfg.fields.get("text", "text")
    if text_key in record:
        ids = tokenizer(record[text_key], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, list(ids)
    raise DataError(where, f"missing field: expected {key!r} (chat) or {text_key!r} (raw text); "
                           f"found keys {sorted(record)}")


def _fit_length(ids, labels, cfg: DataConfig, where: str):
    if len(ids) <= cfg.max_seq_len:
        return ids, labels, False
    if cfg.length_policy == "drop":
        raise DataError(where, f"too long: {len(ids)} tokens > data.max_seq_len={cfg.max_seq_len}")
    return ids[: cfg.max_seq_len], labels[: cfg.max_seq_len], True


def load_files(patterns: List[str], tokenizer, cfg: DataConfig) -> TokenizedDataset:
    """Tokenize every record; strict mode stops at the first bad one, skip mode counts by reason."""
    dataset = TokenizedDataset(samples=[])
    for path in expand_files(patterns):
        for where, record in read_jsonl(path):
            try:
                if isinstance(record, DataError):
                    raise record
                ids, labels = render_record(record, tokenizer, cfg, where)
                ids, labels, cut = _fit_length(ids, labels, cfg, where)
                if all(t == IGNORE for t in labels[1:]):
                    raise DataError(where, "zero trainable tokens after masking (and truncation)")
            except DataError as err:
                if cfg.on_error == "strict":
                    raise
                dataset.skipped[err.problem.split(":")[0].split(" (")[0]] += 1
                continue
            dataset.truncated += int(cut)
            dataset.samples.append({"input_ids": ids, "labels": labels})
    return dataset


def build_datasets(cfg: DataConfig, tokenizer) -> Tuple[TokenizedDataset, TokenizedDataset | None]:
    """The train split and the eval split (None when there is no eval data)."""
    train = load_files(cfg.train_files, tokenizer, cfg)
    evaluation = load_files(cfg.eval_files, tokenizer, cfg) if cfg.eval_files else None
    if evaluation is None and cfg.eval_fraction > 0:
        cut = max(1, int(len(train) * cfg.eval_fraction))
        evaluation = TokenizedDataset(samples=train.samples[-cut:])
        train = TokenizedDataset(samples=train.samples[:-cut], skipped=train.skipped, truncated=train.truncated)
    return train, evaluation
