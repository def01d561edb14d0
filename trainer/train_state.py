"""What a checkpoint records about training: one dataclass, written once by the checkpoint save,
read by the worker (resume), the launcher (the resume decision) and the offline export.

Torch-free, so the launcher reads it without loading the worker's dependencies. A checkpoint
written by an older shardtune lacks some fields: they read as their defaults (None: unknown).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

FILE = "trainer_state.json"  # inside each checkpoint folder


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # trained (label) tokens over all ranks
    nonfinite_streak: int = 0  # non-finite steps in a row, up to train.max_nonfinite_steps
    skipped_steps: List[int] = field(default_factory=list)  # steps whose update was skipped (non-finite)
    # Filled at the save: where the data is, and the shape the state was saved in.
    data: Dict[str, Any] = field(default_factory=dict)  # the sampler's position (trainer/data/sampler.py)
    world_size: Optional[int] = None
    global_batch: Optional[int] = None  # samples per optimizer step: a resume keeps it
    layout: Optional[Dict[str, Any]] = None  # which parameters the checkpoint holds (checkpoint.layout_of)
    zero_stage: Optional[int] = None  # the ZeRO stage the shards were written with
    # Set when the checkpoint holds no frozen base weights (an adapter's): the base model it was trained
    # on (model.base_record), which a resume or an export reloads from the model source and checks.
    base: Optional[Dict[str, Any]] = None

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainState":
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in known})
        state.skipped_steps = list(state.skipped_steps)
        return state

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def read(cls, folder: Path) -> "TrainState":
        return cls.from_dict(json.loads((Path(folder) / FILE).read_text()))

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / FILE).is_file()
