"""Per-phase timing and peak memory of each rank, for `shardtune bench` (train.timing=true).

The loop calls `lap(ctx.timer, name)` right after each phase ends (data, forward, backward, the
loss all-reduce, the optimizer step): the time since the previous lap goes to that phase. With
timing off `ctx.timer` is None and a lap costs one `is None` test. Each rank writes `<run_dir>/timing/rank<R>.json`.

Communication under ZeRO-3 happens inside forward and backward (parameter all-gathers in module
hooks) and the optimizer step (gradient reduce-scatter); it is included in those phases, not split
out. `loss_allreduce` is the one collective the loop itself issues.
"""
from __future__ import annotations

import json
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

from trainer.allocator import in_use as allocator_in_use
from trainer.run_dir import RunDir

PHASES = ("data", "forward", "backward", "loss_allreduce", "optimizer")


def lap(timer, name: str, batch=None) -> None:
    """Close phase `name` now (no-op without a timer); `batch` lets the timer count its tokens."""
    if timer is not None:
        timer.lap(name, batch)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def document_lengths(batch) -> List[int]:
    """Lengths of the documents in a batch: padded rows (attention_mask), or packed rows whose
    position_ids restart at 0 for each document."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum(dim=1).tolist()
    positions = batch.get("position_ids")
    if positions is None:
        return [batch["input_ids"].size(1)] * len(batch["input_ids"])
    lengths: List[int] = []
    for row in positions.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return lengths


class PhaseTimer:
    def __init__(self, device):
        self.device = device
        self.current: Dict[str, float] = defaultdict(float)
        self.steps: List[Dict[str, Any]] = []
        self.last_end = self.last_lap = time.perf_counter()
        self.input_tokens, self.trained_tokens, self.square_lengths = 0, 0, 0.0
        self.train_memory: Dict[str, Any] = {}
        self.allocator = allocator_in_use()  # what CPU peaks depend on: glibc keeps freed blocks resident

    def _sync(self) -> None:
        # GPU work is asynchronous: without a sync the time lands in whichever phase waits next.
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def lap(self, name: str, batch=None) -> None:
        self._sync()
        now = time.perf_counter()
        self.current[name] += now - self.last_lap
        self.last_lap = now
        if batch is not None:  # non-padding tokens and row lengths of this rank's micro-batch
            rows = document_lengths(batch)
            self.input_tokens += int(sum(rows))
            self.trained_tokens += int((batch["labels"][:, 1:] != -100).sum())  # trainer.data.render.IGNORE
            self.square_lengths += float(sum(r * r for r in rows))

    def step_end(self, step: int, result: Dict[str, Any]) -> None:
        """Record one optimizer step: wall time since the previous step ended, phases, tokens."""
        self._sync()
        now = time.perf_counter()
        self.steps.append({"step": step, "seconds": now - self.last_end, "local_trained_tokens": self.trained_tokens,
                           "local_input_tokens": self.input_tokens, "local_square_lengths": self.square_lengths,
                           "phases": dict(self.current), "compiled_frames": result.get("compiled_frames", 0)})
        self.current.clear()
        self.input_tokens, self.trained_tokens, self.square_lengths = 0, 0, 0.0
        # Peaks as of the last training step: the final evaluation, generations and export come after
        # and are not what a training configuration's memory is judged by.
        self.train_memory = self.memory()
        self.last_end = self.last_lap = time.perf_counter()

    def memory(self) -> Dict[str, Any]:
        facts: Dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes(), "allocator": self.allocator}
        if self.device.type == "cuda":
            import torch

            facts["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            facts["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return facts

    def write(self, run_dir: Path, rank: int) -> Path:
        folder = RunDir(run_dir).timing
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{rank}.json"
        memory = self.train_memory or self.memory()
        path.write_text(json.dumps({"rank": rank, "steps": self.steps, "memory": memory}) + "\n")
        return path
