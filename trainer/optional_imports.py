"""Keep DeepSpeed's eager import of mlflow off every process's start-up.

`import deepspeed` imports its autotuner, which imports mlflow whenever mlflow is installed (for
autotuning experiments, which shardtune never runs). With the trackers extra installed that is over
2 s of CPU added to every `import deepspeed`: in each rank, the deepspeed launcher and the export
and bench tools, on every launch. `defer_mlflow_for_deepspeed()` makes that one import fail as if
mlflow were absent (DeepSpeed then records `has_mlflow = False`); every other import of mlflow, such
as logger=mlflow's sink (trainer/metrics.py), works as usual.
"""
from __future__ import annotations

import importlib.abc
import sys

AUTOTUNER = "deepspeed.autotuning.autotuner"


class _MlflowNotForDeepSpeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "mlflow":
            return None
        frame = sys._getframe(1)
        while frame is not None:  # is this import on behalf of DeepSpeed's autotuner?
            if frame.f_globals.get("__name__") == AUTOTUNER:
                raise ImportError("mlflow is not imported for DeepSpeed's autotuner (shardtune does not autotune)")
            frame = frame.f_back
        return None


def defer_mlflow_for_deepspeed() -> None:
    if not any(isinstance(finder, _MlflowNotForDeepSpeed) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MlflowNotForDeepSpeed())
