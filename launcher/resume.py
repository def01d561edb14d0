"""Resume on another world size or ZeRO stage in one command.

Before any rank starts, the launcher looks at the checkpoint the run will resume from. If it was
saved with another world size or ZeRO stage, the launcher converts it once to DeepSpeed's universal
format (`trainer.universal.to_universal`), points the run at the converted copy with
`"checkpoint": {"load_universal": true}`, and recomputes `train.grad_accum` so that the global
batch (and with it every later step's samples and loss) stays what it was. When no grad_accum
keeps the global batch, the launch is refused with the numbers that would work.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from trainer import checkpoint, universal
from trainer.config import ConfigError, RootConfig


def _log(message: str) -> None:
    print(f"[shardtune] {message}", file=sys.stderr, flush=True)


def resume_checkpoint(cfg: RootConfig) -> Optional[Path]:
    """The checkpoint the workers will resume from, or None for a fresh start."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume).expanduser().resolve()
    root = checkpoint.checkpoint_root(Path(cfg.run.dir).expanduser().resolve())
    return checkpoint.find_resume_checkpoint(root, log=_log)


def keep_global_batch(cfg: RootConfig, saved_global: int, world: int, folder: Path) -> None:
    """Set train.grad_accum so that micro x accum x world equals the checkpoint's global batch."""
    per_accum = cfg.train.micro_batch_size * world
    if saved_global % per_accum:
        options = [m for m in range(1, saved_global + 1) if saved_global % (m * world) == 0]
        raise ConfigError([
            f"cannot resume {folder} on {world} rank(s) with train.micro_batch_size="
            f"{cfg.train.micro_batch_size}: the checkpoint's global batch is {saved_global} samples, and "
            f"{saved_global} is not a multiple of {cfg.train.micro_batch_size} x {world}; "
            f"train.micro_batch_size in {options} would keep it (or resume=never to start afresh)"])
    accum = saved_global // per_accum
    if accum != cfg.train.grad_accum:
        _log(f"train.grad_accum {cfg.train.grad_accum} -> {accum}: keeps the global batch of {saved_global} "
             f"samples on {world} rank(s)")
        cfg.train.grad_accum = accum
        if cfg.train.global_batch_size is not None:
            cfg.train.global_batch_size = saved_global


def adapt_to_checkpoint(cfg: RootConfig, world: int, convert: bool = True, converts_here: bool = True) -> None:
    """Prepare `cfg` to resume from a checkpoint saved with another world size or stage (in place).
    `converts_here=False` (a no-ssh node launcher other than node 0): wait for node 0's conversion."""
    folder = resume_checkpoint(cfg)
    if folder is None or not (folder / checkpoint.STATE).is_file():
        return
    state = checkpoint.read_state(folder)
    problem = checkpoint.layout_problem(state["layout"], cfg, folder) if "layout" in state else None
    if problem:
        raise ConfigError([problem])
    saved_world, saved_stage = state.get("world_size"), state.get("zero_stage")
    if saved_world in (None, world) and saved_stage in (None, cfg.deepspeed.stage):
        return
    if cfg.deepspeed.stage == 0 or saved_stage == 0:
        raise ConfigError([f"cannot resume {folder} (ZeRO stage {saved_stage}, {saved_world} ranks) with "
                           f"deepspeed.stage={cfg.deepspeed.stage} on {world} ranks: a change of world size "
                           "or stage needs ZeRO 1-3 on both sides"])
    keep_global_batch(cfg, state["global_batch"], world, folder)
    _log(f"{folder.name} was saved on {saved_world} rank(s) with ZeRO-{saved_stage}; this launch has {world} "
         f"rank(s) with ZeRO-{cfg.deepspeed.stage}: resuming through a universal checkpoint")
    if convert:
        converted = (universal.to_universal(folder, log=_log) if converts_here
                     else universal.wait_for_universal(folder, cfg.cluster.timeout_s, log=_log))
        cfg.resume = str(converted)
        cfg.deepspeed.extra = {**dict(cfg.deepspeed.extra), "checkpoint": {"load_universal": True}}
