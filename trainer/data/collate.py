"""Pad a micro-batch's rows to one width: its own longest row, or data.max_seq_len.

Unpacked rows get an attention mask. Packed rows get position_ids and NO attention mask: with a
mask transformers would not look at the position ids, and documents would see each other. Padding
at the end of a packed row is one more "document" (positions from 0) that carries no label.

Padding to the longest row wastes the least compute; padding every batch to max_seq_len gives the
model one input shape, which torch.compile compiles once instead of once per new shape.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from trainer.data.render import IGNORE


def row_width(pad_to: str, max_seq_len: int, compiled: bool) -> Optional[int]:
    """The fixed width data.pad_to asks for, or None for "each batch's longest row"."""
    fixed = pad_to == "max_seq_len" or (pad_to == "auto" and compiled)
    return max_seq_len if fixed else None


def collate(samples: List[Dict[str, List[int]]], pad_id: int, width: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Stack samples into a padded batch; `width` (at least the longest row) fixes the row length."""
    width = max([len(s["input_ids"]) for s in samples] + [width or 0])
    packed = "position_ids" in samples[0]
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    extra = torch.zeros((len(samples), width), dtype=torch.long)  # attention mask or position ids
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.tensor(sample["input_ids"])
        labels[row, :n] = torch.tensor(sample["labels"])
        if packed:
            extra[row, :n] = torch.tensor(sample["position_ids"])
            extra[row, n:] = torch.arange(width - n)
        else:
            extra[row, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: extra}
