"""The one place that decides what a launch resumes from.

Before any rank starts, the launcher (`shardtune train`, or `python -m launcher.resume` at the start
of every Slurm job and requeue) turns `resume` (auto | never | a path, `~` and relative paths taken
from where the launcher runs) into an absolute checkpoint folder or a fresh start, checks it, and
writes the answer to <run.dir>/control/resume.json. Ranks read that file and never search.

If the checkpoint was saved with another world size or ZeRO stage, the launcher converts it once to
DeepSpeed's universal format (`trainer.universal.to_universal`), points the run at the converted
copy with `"checkpoint": {"load_universal": true}`, and recomputes `train.grad_accum` so that the
global batch (and with it every later step's samples and loss) stays what it was. When no
grad_accum keeps the global batch, the launch is refused with the numbers that would work.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from trainer import checkpoint_catalog as checkpoint  # torch-free: the launcher decides
from trainer.config import ConfigError, RootConfig


def _log(message: str) -> None:
    print(f"[shardtune] {message}", file=sys.stderr, flush=True)


@dataclass
class ResumeDecision:
    resume_from: Optional[Path]  # absolute; None: a fresh start
    universal: bool  # resume_from is a universal conversion (loaded with load_universal)
    reason: str


def resume_checkpoint(cfg: RootConfig) -> Optional[Path]:
    """The checkpoint the workers will resume from, or None for a fresh start. A path given by the
    user is taken from where the launcher runs (`~` expanded) and must be a committed checkpoint."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        folder = Path(cfg.resume).expanduser().resolve()
        problem = checkpoint.verify(folder, deep=False)  # content: by the ranks as they load it
        if problem:
            raise ConfigError([f"resume={cfg.resume}: {problem}; give a checkpoint folder "
                               "(<run.dir>/checkpoints/step-NNNNNNNN), resume=auto or resume=never"])
        return folder
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


def _set_load_universal(cfg: RootConfig, on: bool) -> None:
    extra = dict(cfg.deepspeed.extra)
    section = {k: v for k, v in dict(extra.get("checkpoint") or {}).items() if k != "load_universal"}
    if on:
        section["load_universal"] = True
    if section:
        extra["checkpoint"] = section
    else:
        extra.pop("checkpoint", None)
    cfg.deepspeed.extra = extra


def decide_resume(cfg: RootConfig, world: int, convert: bool = True, converts_here: bool = True) -> ResumeDecision:
    """What this launch resumes from; adapts `cfg` (in place) to a checkpoint saved with another world
    size or stage. `converts_here=False` (a no-ssh node launcher other than node 0): wait for node 0's
    conversion. `convert=False` (a dry run): decide, convert nothing."""
    folder = resume_checkpoint(cfg)
    if folder is None:
        return ResumeDecision(None, False, f"resume={cfg.resume}: a fresh start")
    if not (folder / checkpoint.STATE).is_file():
        return ResumeDecision(folder, False, f"resume={cfg.resume}: {folder.name}")
    state = checkpoint.read_state(folder)
    problem = checkpoint.layout_problem(state.layout, cfg, folder) if state.layout is not None else None
    if problem:
        raise ConfigError([problem])
    saved_world, saved_stage = state.world_size, state.zero_stage
    if saved_world in (None, world) and saved_stage in (None, cfg.deepspeed.stage):
        return ResumeDecision(folder, False, f"resume={cfg.resume}: {folder.name}")
    if cfg.deepspeed.stage == 0 or saved_stage == 0:
        raise ConfigError([f"cannot resume {folder} (ZeRO stage {saved_stage}, {saved_world} ranks) with "
                           f"deepspeed.stage={cfg.deepspeed.stage} on {world} ranks: a change of world size "
                           "or stage needs ZeRO 1-3 on both sides"])
    keep_global_batch(cfg, state.global_batch, world, folder)
    reason = (f"{folder.name} was saved on {saved_world} rank(s) with ZeRO-{saved_stage}; this launch has {world} "
              f"rank(s) with ZeRO-{cfg.deepspeed.stage}: resuming through a universal checkpoint")
    _log(reason)
    if not convert:
        return ResumeDecision(folder, True, reason)
    from trainer import universal  # torch: only when a checkpoint is converted

    converted = (universal.to_universal(folder, log=_log) if converts_here
                 else universal.wait_for_universal(folder, cfg.cluster.timeout_s, log=_log))
    _set_load_universal(cfg, True)
    return ResumeDecision(converted, True, reason)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m launcher.resume --run-dir D`: decide again for a run directory that exists (the
    start of a Slurm job, and every requeue: newer checkpoints may have been saved since the
    submission), and rewrite what the decision changes (train.grad_accum, load_universal)."""
    from launcher.compose import has_cuda
    from launcher.rundir import rewrite_for_launch, world_size
    from trainer.config import load_run_config
    from trainer.control import record_resume_decision, resume_decision

    parser = argparse.ArgumentParser(prog="python -m launcher.resume", description=main.__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True)
    run_dir = Path(parser.parse_args(argv).run_dir).resolve()
    cfg = load_run_config(run_dir)
    previous = resume_decision(run_dir) or {}
    if previous.get("universal"):  # the last decision's switch, not the user's: decide afresh
        _set_load_universal(cfg, False)
    try:
        decision = decide_resume(cfg, world_size(cfg))
    except (ConfigError, checkpoint.CheckpointError) as err:
        print(f"shardtune: {err}", file=sys.stderr)
        return 2
    rewrite_for_launch(cfg, run_dir, has_cuda(cfg))
    record_resume_decision(run_dir, decision.resume_from, decision.universal, decision.reason)
    _log(f"resume: {decision.resume_from or 'a fresh start'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
