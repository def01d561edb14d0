"""Optimizer and learning-rate schedule from the `optim` node."""
from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def build_optimizer(model, cfg: OptimConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: check peft and model.frozen_modules")
    # Biases and norms get no weight decay, as is standard for transformers. Under ZeRO-3 a
    # parameter is partitioned (`p.shape` is [0]); its real shape is `p.ds_shape`. Without this
    # every matrix would land in the no-decay group, and the group count would differ from the
    # same model on ZeRO-1/2, which breaks resuming across stages.
    def decays(name, p):
        return len(getattr(p, "ds_shape", p.shape)) >= 2 and "norm" not in name

    decay = [p for n, p in model.named_parameters() if p.requires_grad and decays(n, p)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not decays(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if cfg.name == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    # The fused kernel makes one pass over each tensor instead of ~10 element-wise passes: on CPU
    # it is 5-7x faster per step, which is most of an optimizer step on a small model.
    return torch.optim.AdamW(groups, fused=cfg.fused, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr for the update made at 0-based `step`: linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.scheduler == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
