"""Pad a micro-batch to its own longest sample (not to max_seq_len)."""
from __future__ import annotations

from typing import Dict, List

import torch

from trainer.data.render import IGNORE


def collate(samples: List[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.tensor(sample["input_ids"])
        labels[row, :n] = torch.tensor(sample["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
