"""Derive the exact DeepSpeed config from a shardtune config.

This is the only place a DeepSpeed config is made: the launcher writes its result to
`ds_config.json` and the engine is given that file, so the two can never drift apart.
"""
from __future__ import annotations

from typing import Any, Dict

from trainer.config import RootConfig


CPU_REDUCE_BUCKET = 10_000_000


def resolve_precision(cfg: RootConfig, on_gpu: bool) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if on_gpu else "fp32"


def _zero_section(cfg: RootConfig, on_gpu: bool) -> Dict[str, Any]:
    ds = cfg.deepspeed
    zero: Dict[str, Any] = {"stage": ds.stage}
    if ds.stage == 0:
        return zero
    zero["contiguous_gradients"] = ds.contiguous_gradients
    # Overlapping communication with compute pays on GPU streams; on CPU it only adds copies.
    zero["overlap_comm"] = on_gpu if ds.overlap_comm is None else ds.overlap_comm
    reduce_bucket = ds.reduce_bucket_size
    if reduce_bucket is None and not on_gpu:
        # DeepSpeed's default (5e8 elements) is sized for GPUs; ZeRO-2/3 allocate it whole, which
        # is 2 GB of fp32 per rank before the first step. On CPU a 1e7 bucket costs 40 MB.
        reduce_bucket = CPU_REDUCE_BUCKET
    optional = {
        "reduce_bucket_size": reduce_bucket,
        "allgather_bucket_size": ds.allgather_bucket_size if ds.stage < 3 else None,
        "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size if ds.stage == 3 else None,
        "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold if ds.stage == 3 else None,
        "stage3_max_live_parameters": ds.stage3_max_live_parameters if ds.stage == 3 else None,
    }
    zero.update({k: v for k, v in optional.items() if v is not None})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.stage == 3:
        # Saving a 16-bit model at the end gathers it on rank 0; exports stream instead.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if ds.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = ds.zero_hpz_partition_size
        if ds.zero_quantized_weights:
            zero["zero_quantized_weights"] = True
        if ds.zero_quantized_gradients:
            zero["zero_quantized_gradients"] = True
    return zero


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def build_ds_config(cfg: RootConfig, world_size: int, on_gpu: bool) -> Dict[str, Any]:
    """The DeepSpeed config for `cfg` on `world_size` ranks.

    The optimizer and scheduler are built by the trainer (they need the parameter groups and the
    exact schedule shape), so they are not part of this dict; gradient clipping is.
    """
    precision = resolve_precision(cfg, on_gpu)
    train = cfg.train
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": _zero_section(cfg, on_gpu),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own printing quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _deep_merge(ds, dict(cfg.deepspeed.extra))
