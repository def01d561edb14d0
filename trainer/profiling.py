"""`train.profile_steps=N`: torch.profiler over the last N training steps of a run.

Writes <run.dir>/profile/rank<R>.txt, the ops that took the most time (device time on GPU, CPU
time on CPU), and rank<R>.trace.json for chrome://tracing or Perfetto. Meant for `shardtune bench`
runs: it answers "where does a step go" with kernel names, which the phase breakdown cannot.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.run_dir import RunDir


class StepProfiler:
    def __init__(self, steps: int, max_steps: int, run_dir: Path, rank: int, device: torch.device):
        self.first = max(0, max_steps - steps) if steps > 0 else None
        self.last = max_steps - 1
        self.out = RunDir(run_dir).profile
        self.rank, self.device = rank, device
        self.profiler = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
        self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self.profiler is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
        steps = self.last - self.first + 1
        (self.out / f"rank{self.rank}.txt").write_text(f"last {steps} step(s), sorted by {key}\n{table}\n")
        self.profiler.export_chrome_trace(str(self.out / f"rank{self.rank}.trace.json"))
        self.profiler = None
