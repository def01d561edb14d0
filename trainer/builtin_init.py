"""Seeded random weights for a builtin model, written once as a normal Hugging Face folder.

Creating random weights inside `deepspeed.zero.Init` (ZeRO-3) draws the random numbers in another
order than creating them whole, so the "same seed" would give a different model per ZeRO stage.
Instead the weights are made once, outside any ZeRO context, and every stage and world size then
loads the same folder with `from_pretrained`, exactly as it loads a pretrained model.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional

from trainer.pretrained import DEFAULT_CACHE, publish_once

MARKER = ".shardtune-init.json"  # written last: the folder is complete


def _cache_name(builtin_dir: Path, seed: int) -> str:
    digest = hashlib.sha256((builtin_dir / "config.json").read_bytes()).hexdigest()[:12]
    return f"builtin-{builtin_dir.name}-{digest}-seed{seed}"


def _write_init(builtin_dir: Path, folder: Path, seed: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # from_config would make partitioned (empty) tensors
        raise RuntimeError("builtin model init must be made before a ZeRO-3 context is active: "
                           "call trainer.model.weights_dir() before HfDeepSpeedConfig/TrainingArguments")
    import torch  # here, not above: the launcher finds an init made earlier without torch

    from trainer.weights import save_whole_model

    config = AutoConfig.from_pretrained(builtin_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_whole_model(model, folder)  # not save_pretrained: that writes weights on rank 0 only
    for item in builtin_dir.iterdir():  # tokenizer, and the builtin's own generation config
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, folder / item.name)
    return {"source": str(builtin_dir), "seed": seed}


def materialize(builtin_dir: Path, seed: int, cache_dir: Optional[str] = None) -> Path:
    """The folder holding `builtin_dir`'s model with weights drawn from `seed` (made on first use,
    by one of the concurrent callers: every rank calls it)."""
    target = Path(cache_dir or DEFAULT_CACHE).expanduser() / _cache_name(builtin_dir, seed)
    return publish_once(target, MARKER, lambda folder: _write_init(builtin_dir, folder, seed), replace_incomplete=True)
