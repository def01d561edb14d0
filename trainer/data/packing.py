"""Pack documents into rows of at most `max_seq_len` tokens (best-fit decreasing).

Each packed row keeps its documents apart by position ids that restart at 0 for every document,
and the batch carries NO attention mask: transformers then builds a per-row block-diagonal causal
mask (sdpa, eager, flex_attention) or runs varlen flash attention (flash_attention_2) from the
position ids. Attention stays per row, so a row costs what an unpacked row of the same length
costs. Two things silently defeat this and are refused: a KV cache (the loop passes
use_cache=False) and methods that prepend cached keys (prefix tuning).
"""
from __future__ import annotations

import bisect
from typing import List

import numpy as np

from trainer.peft_methods import METHODS as PEFT_METHODS

# attn_implementation values that honour per-document position ids without a mask; the device
# checks (flash_attention_2 needs CUDA) live in trainer/validate.py.
ISOLATING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def packing_problems(attn_implementation: str, peft_method: str, on_gpu: bool) -> List[str]:
    """Why packing would leak across documents with these settings (empty: it is safe)."""
    problems = []
    if attn_implementation not in ISOLATING_ATTENTION:
        problems.append(f"data.packing=true with model.attn_implementation={attn_implementation!r}: documents "
                        f"would attend to each other; use one of {', '.join(ISOLATING_ATTENTION)}")
    if attn_implementation == "flash_attention_2" and not on_gpu:
        problems.append("data.packing=true with model.attn_implementation=flash_attention_2 needs a CUDA GPU "
                        "(varlen kernels); on CPU use sdpa, eager or flex_attention")
    entry = PEFT_METHODS.get(peft_method)
    if entry is not None and entry.no_packing:
        problems.append(f"data.packing=true with peft.method={peft_method}: {entry.no_packing}; set "
                        "data.packing=false or use peft=lora")
    return problems


def pack(lengths: np.ndarray, capacity: int) -> List[np.ndarray]:
    """Group item indices into bins of total length <= capacity; deterministic.

    Best-fit decreasing: place each item, longest first, into the fullest bin it still fits
    (a sorted list of free space makes it O(n log n)); typically > 95 % full on chat data.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: List[List[int]] = []
    free: List[tuple] = []  # sorted (free space, bin id)
    for item in order:
        size = int(lengths[item])
        if size > capacity:
            raise ValueError(f"item {item} has {size} tokens > capacity {capacity}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, b = free.pop(slot)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(item)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return [np.asarray(sorted(b), dtype=np.int64) for b in bins]
