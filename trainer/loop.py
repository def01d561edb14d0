"""The training loop: one, explicit, for full fine-tuning and every peft method alike.

    resume -> baseline eval -> while step < max_steps: train_step; log; maybe eval; maybe save
                                                       stop request -> save -> exit "resume me"

The loss is a mean over the objective's units of the global batch (not a mean of per-micro-batch
means): every trained token for SFT, every pair or example for the preference objectives
(trainer/objectives/), so one rank with 8 samples per micro-batch and two ranks with 4 compute the
same update. The objective supplies the batches, the summed loss and its metrics; the loop is the same.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from trainer import checkpoint
from trainer.config import RootConfig
from trainer.control import EXIT_NONFINITE, EXIT_OK, EXIT_RESUME_ME, Heartbeat, StopRequest
from trainer.data import TokenizedDataset
from trainer.data.sampler import GlobalBatchSampler
from trainer.data.collate import row_width
from trainer.objectives import SFT
from trainer.faults import Faults
from trainer.distributed import DistInfo, sum_across_ranks
from trainer.profiling import StepProfiler
from trainer.speed import compiled_frames
from trainer.timing import lap
from trainer.train_state import TrainState


@dataclass
class TrainContext:
    cfg: RootConfig
    info: DistInfo
    run_dir: Path
    engine: Any
    tokenizer: Any
    train_set: TokenizedDataset
    eval_set: Optional[TokenizedDataset]
    sampler: GlobalBatchSampler
    sinks: Any
    stop: StopRequest
    heartbeat: Heartbeat
    log: Any = print
    evaluator: Any = None  # callable(ctx, step) -> None; default: loss/perplexity only
    on_finish: Any = None  # callable(ctx) -> None, e.g. the final export
    timer: Any = None  # trainer.timing.PhaseTimer when train.timing=true (shardtune bench)
    faults: Faults = field(default_factory=lambda: Faults({}, 0))  # train.fault_injection (tests), built once
    objective: Any = None  # trainer.objectives: SFT (None) | Preference
    # model.base_record when the checkpoints leave the frozen base out (an adapter's), else None
    base: Optional[Dict[str, Any]] = None
    pending: Optional[checkpoint.PendingSave] = None  # an asynchronous save not committed yet


def _to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _objective(ctx: "TrainContext"):
    return ctx.objective if ctx.objective is not None else SFT(ctx.cfg.model.loss_chunks)


def _collate(ctx: "TrainContext", samples, objective=None) -> Dict[str, torch.Tensor]:
    data = ctx.cfg.data
    width = row_width(data.pad_to, data.max_seq_len, ctx.cfg.model.compile)
    batch = (objective or _objective(ctx)).collate(samples, ctx.tokenizer.pad_token_id, width)
    return _to_device(batch, ctx.info.device)


def _add_totals(into: Dict[str, list], totals: Dict[str, tuple]) -> None:
    for name, (value, count) in totals.items():
        pair = into.setdefault(name, [0.0, 0.0])
        pair[0] += value
        pair[1] += count


def _flat(totals: Dict[str, list]) -> list:
    return [x for name in sorted(totals) for x in totals[name]]


def _unflat(names, values) -> Dict[str, tuple]:
    return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(sorted(names))}


def _set_lr_to_zero(engine) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0


def train_step(ctx: TrainContext, step: int) -> Dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; returns what was measured."""
    cfg, info, engine, objective = ctx.cfg, ctx.info, ctx.engine, _objective(ctx)
    started, frames_before = time.perf_counter(), compiled_frames()
    step_indices = ctx.sampler.global_indices(step)
    global_tokens = sum(ctx.train_set.label_tokens(i) for i in step_indices)
    global_units = objective.units(ctx.train_set, step_indices)  # tokens (sft) or rows (preference)
    scale = info.world_size * cfg.train.grad_accum / global_units  # undo DeepSpeed's mean over ranks and accum
    local_sum, local_nonfinite, local_totals = 0.0, False, {}
    micro_batches = ctx.sampler.micro_batches(step)
    if step + 1 < cfg.train.max_steps:  # streamed rows: the next step's are read while this one computes
        ctx.train_set.prefetch([i for chunk in ctx.sampler.micro_batches(step + 1) for i in chunk])
    faults = ctx.faults
    faults.maybe_pause(step + 1, ctx.heartbeat, ctx.stop)
    for accum, indices in enumerate(micro_batches):
        batch = _collate(ctx, [ctx.train_set[i] for i in indices], objective)
        lap(ctx.timer, "data", batch)
        ctx.heartbeat.beat(step, "forward")
        sum_loss, totals = objective.micro_loss(engine, batch)
        sum_ce = sum_loss * faults.loss_factor(step + 1)
        _add_totals(local_totals, totals)
        finite = bool(torch.isfinite(sum_ce))
        local_nonfinite |= not finite
        local_sum += sum_ce.item() if finite else 0.0
        lap(ctx.timer, "forward")
        ctx.heartbeat.beat(step, "backward")
        # A non-finite loss backpropagates as zero (nan_to_num's gradient is 0 there), which keeps every
        # rank's collectives in step; the update itself is then cancelled below.
        engine.backward(torch.nan_to_num(sum_ce * scale, nan=0.0, posinf=0.0, neginf=0.0)
                        * faults.grad_factor(step + 1))
        lap(ctx.timer, "backward")
        if accum == len(micro_batches) - 1:
            stop_local = ctx.stop.requested() or faults.stop_requested(step + 1)
            total, nonfinite_any, stop_any, *step_totals = sum_across_ranks(
                [local_sum, float(local_nonfinite), float(stop_local), *_flat(local_totals)], info.device)
            if nonfinite_any:
                _set_lr_to_zero(engine)  # skip this update on every rank
            lap(ctx.timer, "loss_allreduce")
        ctx.heartbeat.beat(step, "optimizer")
        engine.step()
        lap(ctx.timer, "optimizer")
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if not nonfinite_any and (not engine.was_step_applied() or math.isinf(grad_norm)):
        # Finite loss but inf/NaN gradients: DeepSpeed's ZeRO step saw the global (all-reduced) norm,
        # so every rank skipped the update at this same step; count it like a non-finite loss.
        nonfinite_any = True
    result = {"loss": total / global_units, "tokens": global_tokens, "nonfinite": bool(nonfinite_any),
              "stop": bool(stop_any), "grad_norm": grad_norm, "seconds": time.perf_counter() - started,
              "compiled_frames": compiled_frames() - frames_before,
              "objective": objective.summarise(_unflat(local_totals, step_totals))}
    if ctx.timer is not None:
        ctx.timer.step_end(step, result)
    return result


@torch.no_grad()
def evaluate_loss(ctx: TrainContext, dataset: TokenizedDataset, objective=None) -> Dict[str, float]:
    """Exact loss over a dataset (averaged over the objective's units: tokens, or pairs), sharded over
    ranks, with the objective's metrics under "metrics". `objective`: the run's unless given (the
    general set of a preference run is text: SFT).

    Every rank runs the same number of forward passes (under ZeRO-3 each one gathers parameters
    collectively); a rank whose shard ran out runs a throwaway batch that counts for nothing.
    """
    info, mbs = ctx.info, ctx.cfg.train.micro_batch_size
    shard = list(range(info.rank, len(dataset), info.world_size))
    per_rank = math.ceil(len(dataset) / info.world_size)
    limit = ctx.cfg.eval.max_batches
    n_batches = math.ceil(per_rank / mbs) if not limit else min(limit, math.ceil(per_rank / mbs))
    objective = objective or _objective(ctx)
    ctx.engine.eval()
    local_sum, local_units, local_totals, totals = 0.0, 0, {}, {}
    for b in range(n_batches):
        ctx.heartbeat.touch()  # a long eval is not a hang
        indices = shard[b * mbs:(b + 1) * mbs]
        batch = _collate(ctx, [dataset[i] for i in (indices or [0])], objective)
        sum_loss, totals = objective.micro_loss(ctx.engine, batch, live=bool(indices))
        if indices:
            local_sum += sum_loss.item()
            local_units += objective.units(dataset, indices)
            _add_totals(local_totals, totals)
    ctx.engine.train()
    # Every rank has the same metric names only once it ran a real batch; the objective's full set
    # is known from any batch, so a rank that had none reports zeros under the same names.
    names = sorted(set(local_totals) | set(totals))
    for name in names:
        local_totals.setdefault(name, [0.0, 0.0])
    total, units, *summed = sum_across_ranks([local_sum, float(local_units), *_flat(local_totals)], info.device)
    loss = total / max(units, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(units),
            "metrics": objective.summarise(_unflat(names, summed))}


def default_evaluator(ctx: TrainContext, step: int) -> None:
    if ctx.eval_set is None or len(ctx.eval_set) == 0:
        return
    ctx.heartbeat.beat(step, "eval")
    result = evaluate_loss(ctx, ctx.eval_set)
    ctx.sinks.log({"kind": "eval", "step": step, "eval_loss": result["loss"], "eval_ppl": result["ppl"],
                   "eval_tokens": result["tokens"], **{f"eval_{k}": v for k, v in result["metrics"].items()}})


def _save(ctx: TrainContext, state: TrainState, at_once: bool = False) -> None:
    """Save a checkpoint of `state`: in the background with checkpoint.async_save unless `at_once` (a stop,
    the last save), which commits before returning. An earlier background save commits first."""
    _commit_pending(ctx)
    ctx.heartbeat.beat(state.step, "checkpoint")
    started = time.perf_counter()
    # The position in the data and the shape of the run, as of this step (the ZeRO stage: checkpoint.save).
    saved = replace(state, data=ctx.sampler.state_dict(state.step), world_size=ctx.info.world_size,
                    global_batch=ctx.sampler.global_batch, layout=checkpoint.layout_of(ctx.cfg),
                    base=ctx.base)
    background = ctx.cfg.checkpoint.async_save and not at_once
    with ctx.heartbeat.keepalive(ctx.cfg.cluster.timeout_s):  # a large model's save takes minutes
        pending = checkpoint.start_save(ctx.engine, ctx.run_dir, saved, ctx.info, ctx.cfg.checkpoint.keep_last,
                                        background=background, delay_s=ctx.faults.save_write_delay_s())
    ctx.pending = pending
    if background:
        ctx.log(f"checkpoint {pending.folder.name}: training stalled {time.perf_counter() - started:.2f}s (state "
                "copied to host memory); writing in the background")
        return
    _commit_pending(ctx, started)


def _commit_pending(ctx: TrainContext, started: Optional[float] = None) -> None:
    """Commit the save in flight, waiting for its writes (a no-op when there is none)."""
    if ctx.pending is None:
        return
    pending, ctx.pending = ctx.pending, None
    waited = time.perf_counter()
    with ctx.heartbeat.keepalive(ctx.cfg.cluster.timeout_s):
        folder = pending.commit(ctx.info)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    took = f"in {time.perf_counter() - started:.2f}s" if started is not None else (
        f"(in the background; {time.perf_counter() - waited:.2f}s waited for it)")
    ctx.log(f"checkpoint {folder.name} committed {took} ({size / 2**20:.1f} MiB)")


def _commit_if_written(ctx: TrainContext) -> None:
    """After each step while a background save is in flight: commit it once every rank has written
    (one small collective per step meanwhile, none otherwise)."""
    if ctx.pending is not None and ctx.pending.written_everywhere(ctx.info):
        _commit_pending(ctx)


def _train_record(state: TrainState, result: Dict[str, Any], lr: float) -> Dict[str, Any]:
    return {"kind": "train", "step": state.step, "loss": None if result["nonfinite"] else result["loss"],
            "lr": lr, "grad_norm": None if not math.isfinite(result["grad_norm"]) else result["grad_norm"],
            "tokens": state.tokens_seen, "step_tokens": result["tokens"],
            "tokens_per_s": result["tokens"] / result["seconds"], "step_time_s": result["seconds"],
            "skipped": result["nonfinite"], "time": time.time(), **result.get("objective", {})}


def _report_recompile(ctx: TrainContext, step: int, result: Dict[str, Any]) -> None:
    """torch.compile compiling again after the first step is time lost each time: say so."""
    if ctx.cfg.model.compile and step > 1 and result["compiled_frames"]:
        fixed = row_width(ctx.cfg.data.pad_to, ctx.cfg.data.max_seq_len, compiled=True) is not None
        hint = ("a graph break that varies from batch to batch (TORCH_LOGS=recompiles names the guard)" if fixed
                else "a new row width: data.pad_to=max_seq_len gives every batch one shape")
        ctx.log(f"step {step}: torch.compile compiled {result['compiled_frames']} more frame(s) in this step "
                f"({compiled_frames()} so far): {hint}")


def train(ctx: TrainContext, state: TrainState) -> int:
    """Run until max_steps or a stop request; return the process exit code."""
    cfg = ctx.cfg
    evaluator = ctx.evaluator or default_evaluator
    # from_pretrained returns a model in eval mode: without this, dropout and activation
    # checkpointing would stay off until the first evaluation switched the model back.
    ctx.engine.train()
    if state.step == 0 and cfg.eval.baseline:
        evaluator(ctx, 0)
    last_saved = state.step
    profiler = StepProfiler(cfg.train.profile_steps, cfg.train.max_steps, ctx.run_dir, ctx.info.rank, ctx.info.device)
    while state.step < cfg.train.max_steps:
        lr = ctx.engine.get_lr()[0]
        profiler.before_step(state.step)
        result = train_step(ctx, state.step)
        profiler.after_step(state.step)
        state.step += 1
        state.tokens_seen += result["tokens"]
        if result["nonfinite"]:
            state.nonfinite_streak += 1
            state.skipped_steps.append(state.step)
            ctx.log(f"step {state.step}: non-finite loss or gradient norm on at least one rank; update skipped "
                    f"({state.nonfinite_streak} in a row, limit {cfg.train.max_nonfinite_steps})")
            if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                _commit_pending(ctx)  # a save of earlier, finite steps still counts
                ctx.log(f"aborting: {state.nonfinite_streak} non-finite steps in a row (last step {state.step}); "
                        "lower optim.lr, check the data, or resume from the last checkpoint")
                return EXIT_NONFINITE
        else:
            state.nonfinite_streak = 0
        _report_recompile(ctx, state.step, result)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            ctx.sinks.log(_train_record(state, result, lr))
        if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < cfg.train.max_steps:
            evaluator(ctx, state.step)
        _commit_if_written(ctx)
        if result["stop"]:
            _save(ctx, state, at_once=True)
            ctx.log(f"stopped at step {state.step} ({ctx.stop.reason()}); checkpoint saved, resume to continue")
            return EXIT_RESUME_ME
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
            _save(ctx, state)
            last_saved = state.step
    evaluator(ctx, state.step)
    if cfg.checkpoint.save_final and last_saved != state.step:
        _save(ctx, state, at_once=True)
    _commit_pending(ctx)
    if ctx.on_finish is not None:
        ctx.heartbeat.beat(state.step, "export")
        with ctx.heartbeat.keepalive(ctx.cfg.cluster.timeout_s):
            ctx.on_finish(ctx)
    return EXIT_OK
