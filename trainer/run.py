"""A worker's whole life: read the run directory, build every part from its config node, train.

`python -m trainer --run-dir D` under any launcher (ours, `deepspeed`, `torchrun`, `srun`).
"""
from __future__ import annotations

import os
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from trainer import checkpoint
from trainer.allocator import in_use as allocator_in_use
from trainer.config import RootConfig, load_run_config
from trainer.control import EXIT_FAILED, Heartbeat, StopRequest, control_dir, describe_stragglers, record_exit
from trainer.distributed import DistInfo, init_distributed, shutdown
from trainer.faults import Faults
from trainer.output_log import tee_rank_output
from trainer.run_dir import RunDir


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # On by default with the above: every torch.empty is filled with NaN to catch reads of
        # uninitialised memory. That is a write of every new buffer, a cost on GPU, and changes no result.
        torch.utils.deterministic.fill_uninitialized_memory = False


def load_ds_config(run_dir: Path, cfg: RootConfig, info: DistInfo) -> dict:
    """The launcher's ds_config.json, checked against this launch's world size."""
    ds_config = RunDir(run_dir).read_ds_config()
    if ds_config["train_batch_size"] != cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size:
        raise SystemExit(
            f"{run_dir / 'ds_config.json'} was written for a world size of "
            f"{ds_config['train_batch_size'] // (cfg.train.micro_batch_size * cfg.train.grad_accum)} ranks but "
            f"this launch has {info.world_size}; write the run directory for this world size with "
            f"`shardtune train run.dir={run_dir} cluster.nproc_per_node=... run.launch=print`")
    return ds_config


def make_logger(info: DistInfo):
    def log(message: str) -> None:
        if info.is_main:
            print(f"[shardtune] {message}", file=sys.stderr, flush=True)
    return log


def build_context(run_dir: Path, cfg: RootConfig, info: DistInfo):
    """Build tokenizer, data, model, engine, sinks; resume if asked. Returns (context, loop state)."""
    import deepspeed
    from omegaconf import OmegaConf

    from trainer.data.sampler import GlobalBatchSampler
    from trainer.objectives import build_datasets, build_objective
    from trainer.loop import TrainContext
    from trainer.train_state import TrainState
    from trainer.metrics import build_sinks
    from trainer.model import base_record, build_model, build_tokenizer, count_parameters
    from trainer.optim import build_optimizer, build_scheduler

    log = make_logger(info)
    ds_config = load_ds_config(run_dir, cfg, info)
    # From the first moment: the launcher's watchdog sees set-up phases too, named in a hang report.
    heartbeat = Heartbeat(run_dir, info.rank)
    faults = Faults(cfg.train.fault_injection, info.rank)
    in_setup = lambda phase: setup_phase(heartbeat, phase, cfg.cluster.setup_timeout_s)  # noqa: E731
    with in_setup("setup:tokenizer"):
        tokenizer = build_tokenizer(cfg.model)
    objective = build_objective(cfg)
    # One process per job prepares the data (cached on disk); the others wait on a lease, not a
    # collective. Both report progress from inside (per chunk, per poll): no keepalive needed.
    heartbeat.beat(0, "setup:data")
    train_set, eval_set = build_datasets(cfg, tokenizer, log=log)  # the shape the objective reads
    log(f"data: train {train_set.describe()}; eval {eval_set.describe() if eval_set else 'none'}")
    sampler = GlobalBatchSampler(len(train_set), cfg.train.micro_batch_size, cfg.train.grad_accum,
                                 info.world_size, info.rank, cfg.seed, cfg.data.shuffle)
    with in_setup("setup:model"):
        faults.delay_setup()
        model = build_model(cfg.model, cfg.peft, ds_config, info.device, cfg.seed)
    trainable, total = count_parameters(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%); "
        f"memory allocator: {allocator_in_use()}")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    with in_setup("setup:engine"):  # may build DeepSpeed's ops (minutes on a cold cache)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, dist_init_required=False)
    if objective.reference == "precomputed":  # from the weights as built: before any checkpoint is loaded
        heartbeat.beat(0, "setup:reference")  # the pass reports progress per batch
        from trainer.distributed import sum_across_ranks
        from trainer.objectives.reference import attach_reference

        attach_reference(cfg, (train_set, eval_set), engine, objective, info,
                         lambda values: sum_across_ranks(values, info.device), log)
    state = TrainState()
    resume_from = find_resume(run_dir, cfg, log)
    # Read once per launch (a few MiB per weight file), not at every save.
    base = None if checkpoint.holds_frozen_base(cfg) and resume_from is None else base_record(cfg.model, cfg.seed)
    if resume_from is not None:
        load_started = time.perf_counter()
        with in_setup("setup:resume"):
            state = checkpoint.load(engine, resume_from, info, base)
        warn_if_data_changed(state.data, sampler, log)
        log(f"resumed from {resume_from} at step {state.step} (loaded in {time.perf_counter() - load_started:.2f}s)")
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    sinks = build_sinks(cfg, cfg_dict, run_dir, info.is_main, state.step)
    ctx = TrainContext(cfg=cfg, info=info, run_dir=run_dir, engine=engine, tokenizer=tokenizer,
                       train_set=train_set, eval_set=eval_set, sampler=sampler, sinks=sinks,
                       stop=StopRequest(run_dir), heartbeat=heartbeat, log=log, faults=faults, objective=objective,
                       base=None if checkpoint.holds_frozen_base(cfg) else base)
    if cfg.train.timing:
        from trainer.timing import PhaseTimer

        ctx.timer = PhaseTimer(info.device)
    from trainer.evaluation import build_evaluator

    ctx.evaluator = build_evaluator(cfg, tokenizer, log)  # eval + general losses, generations
    if cfg.checkpoint.export_final:
        from trainer.export import export_final

        ctx.on_finish = export_final  # HF model / adapter in <run.dir>/export, gathered under ZeRO-3
    return ctx, state


def setup_phase(heartbeat, phase: str, limit_s: float):
    """A set-up phase that cannot report progress from inside (a model load, DeepSpeed's set-up): its
    name in the heartbeat, and a keepalive for up to cluster.setup_timeout_s. A rank stopped for good
    still goes silent (SIGSTOP stops its keepalive too); one stuck in it past the limit is named."""
    heartbeat.beat(0, phase)
    return heartbeat.keepalive(limit_s=limit_s)


def warn_if_data_changed(saved: dict, sampler, log) -> None:
    """Another dataset (or data seed) under a resumed run: allowed (a new data phase), but the
    loss curve is no longer the uninterrupted run's, so say it."""
    now = sampler.state_dict(0)
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in ("num_samples", "seed")
               if key in saved and saved[key] != now[key]]
    if changed:
        log(f"warning: the training data differs from the checkpoint's ({', '.join(changed)}): resuming at the "
            "same step in another sample order; the loss curve will not continue the interrupted run's")


def find_resume(run_dir: Path, cfg: RootConfig, log):
    """The checkpoint the launcher decided on (launcher/resume.py): ranks never search themselves, so
    every rank of every node resumes from the same folder, whatever its working directory."""
    from trainer.control import resume_decision

    decision = resume_decision(run_dir)
    if decision is None:
        raise SystemExit(f"{RunDir(run_dir).resume_decision} is missing: start workers through `shardtune train` "
                         f"(run.launch=print writes it and prints the commands), or run `python -m launcher.resume "
                         f"--run-dir {run_dir}` before starting them by hand")
    if decision["resume_from"] is None:
        return None
    folder = Path(decision["resume_from"])
    problem = checkpoint.verify(folder, deep=False)  # the launcher checked its content moments ago
    if problem:
        raise SystemExit(f"resume from {folder} ({RunDir(run_dir).resume_decision}): {problem}")
    return folder


def write_exit(run_dir: Path, info: DistInfo, code: int, detail: str = "") -> None:
    """Record the exit code for the launcher; on a full disk it cannot be written, and the launcher
    then goes by the process's own exit code."""
    if info.is_main:
        try:
            record_exit(run_dir, code, detail)
        except OSError as err:
            print(f"[shardtune] could not record the exit code in {control_dir(run_dir)}: {err}", file=sys.stderr)


def quiet_known_warnings() -> None:
    """Deprecation notices that DeepSpeed and transformers raise on every step, not the user's concern."""
    for pattern in (r".*all_gather_into_tensor.* is deprecated", r".*reduce_scatter_tensor.* is deprecated",
                    r".*is_gradient_checkpointing.* is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def main(run_dir: str) -> int:
    quiet_known_warnings()
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    seed_everything(cfg.seed, cfg.train.deterministic)
    info = init_distributed(cfg.cluster.device, cfg.cluster.timeout_s)
    tee_rank_output(RunDir(run_dir).rank_log(info.rank))  # logs/rank-<N>.log: the failed rank's last lines
    from trainer.loop import train

    try:
        ctx, state = build_context(run_dir, cfg, info)
        code = train(ctx, state)
        ctx.heartbeat.finish(state.step)  # the launcher's watchdog stops watching this rank
        if ctx.timer is not None:
            ctx.timer.write(run_dir, info.rank)
        ctx.sinks.close()
    except Exception as err:  # report why, and which rank looks stuck, then fail
        detail = f"rank {info.rank}: {type(err).__name__}: {err}"
        if "timed out" in str(err).lower() or "timeout" in type(err).__name__.lower():
            detail += "\n" + describe_stragglers(run_dir)
        print(f"[shardtune] {detail}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        write_exit(run_dir, info, EXIT_FAILED, detail)
        os._exit(EXIT_FAILED)  # do not wait in collectives that will never complete
    write_exit(run_dir, info, code)
    shutdown()
    return code
