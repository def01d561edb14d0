"""Build the tokenizer and the model (+ peft) from the `model` and `peft` config nodes.

Under ZeRO-3 a `HfDeepSpeedConfig` is kept alive while the model is built, so transformers
creates it inside `deepspeed.zero.Init`: every parameter is partitioned as it is made and a
model larger than one device never materialises whole on one rank.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from trainer.config import ModelConfig, PeftConfig
from trainer.model_source import init_seed, model_dir, prepare_model, weights_dir  # noqa: F401
from trainer.pretrained import BUILTIN_DIR  # noqa: F401

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(cfg: ModelConfig, on_gpu: bool) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return DTYPES[cfg.dtype]


def build_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    from trainer.templates import apply_template_override

    tokenizer = AutoTokenizer.from_pretrained(model_dir(cfg), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    apply_template_override(tokenizer, cfg.chat_template)
    return tokenizer


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


SAMPLE_BYTES = 1 << 20


def _file_sample(path: Path) -> str:
    """size:sha256 of a weight file's first and last MiB. Not a full hash: a resume of a 70B base must
    not read 140 GB to check it; two bases of one architecture (another seed, another fine-tune) have
    the same sizes but differ within the first MiB of tensor data."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            handle.seek(size - SAMPLE_BYTES)
            digest.update(handle.read(SAMPLE_BYTES))
    return f"{size}:{digest.hexdigest()[:16]}"


def base_record(cfg: ModelConfig, seed: int) -> Dict[str, Any]:
    """Which base weights this run loads, for an adapter checkpoint that does not hold them: the model,
    its hub revision (the snapshot folder's commit) and a sample of each weight file (_file_sample)."""
    folder = weights_dir(cfg, seed)
    files = {str(p.relative_to(folder)): _file_sample(p) for p in sorted(folder.rglob("*"))
             if p.suffix in WEIGHT_SUFFIXES and p.is_file()}
    revision = folder.name if folder.parent.name == "snapshots" else None
    return {"model": cfg.name_or_path, "revision": revision, "files": files}


def base_problem(saved: Dict[str, Any], now: Dict[str, Any], what: str) -> str | None:
    """Why the base loaded now is not the one an adapter checkpoint was trained on, or None."""
    differ = [key for key in ("revision", "files") if saved.get(key) != now.get(key)]
    if not differ:
        return None
    changed = sorted(set(saved.get("files", {}).items()) ^ set(now.get("files", {}).items()))[:6]
    return (f"{what} holds only the adapter and was trained on base {saved.get('model')!r} "
            f"(revision {saved.get('revision')}), but the base found now differs in its "
            f"{' and '.join(differ)}: {now.get('model')!r} revision {now.get('revision')}; weight files "
            f"(name, size:sample) differing: {changed}. Point model.name_or_path (and model.revision) at the base "
            "it was trained on; a run that must outlive its base saves it too (checkpoint.save_frozen_base=true)")


def _create(cfg: ModelConfig, source: Path, dtype: torch.dtype, seed: int = 0, device=None):
    """The model from `source`: its weights, or (model.random_init) a seeded random init made
    directly on `device` (under ZeRO-3, transformers makes it inside zero.Init, partitioned)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    def load(attn: str):
        if not cfg.random_init:
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                        attn_implementation=attn)
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        torch.manual_seed(init_seed(cfg, seed))
        # Made where it will train: an 8B model initialised on the CPU takes minutes.
        on_device = device is not None and not is_deepspeed_zero3_enabled()
        with torch.device(device) if on_device else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                    attn_implementation=attn)

    try:
        return load(cfg.attn_implementation)
    except ValueError as err:
        # sdpa is our default, not every architecture has it (Gemma 2's soft-capping, some remote
        # code): fall back to the model's eager attention rather than fail; explicit choices stand.
        if cfg.attn_implementation != "sdpa" or "does not support" not in str(err):
            raise
        import warnings

        warnings.warn(f"{source}: this architecture has no sdpa attention; using model.attn_implementation=eager")
        return load("eager")


def freeze_modules(model, patterns) -> int:
    """Freeze parameters whose name matches any glob pattern; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, p) or p in name for p in patterns):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def build_model(cfg: ModelConfig, peft_cfg: PeftConfig, ds_config: Dict[str, Any], device: torch.device, seed: int):
    """The model ready for `deepspeed.initialize`: created (partitioned under ZeRO-3), peft applied."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    dtype = resolve_dtype(cfg, device.type == "cuda")
    source = weights_dir(cfg, seed)  # before zero.Init is switched on: a builtin init is made whole
    # Must stay referenced while the model is built: transformers checks it to enter zero.Init.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = _create(cfg, source, dtype, seed, device)
    model.config.use_cache = False  # a KV cache would defeat the packed-document attention isolation
    if cfg.loss_chunks > 1:
        from trainer.loss import check_chunked_loss_supported

        check_chunked_loss_supported(model.config, cfg.loss_chunks)
    from trainer.speed import apply_speed_switches

    model = apply_speed_switches(model, cfg.activation_checkpointing, cfg.compile)  # checkpointing, compile
    if peft_cfg.method != "none":
        from trainer.peft_methods import apply_peft

        model = apply_peft(model, peft_cfg, cfg.family, zero3=hf_ds_config is not None)
    elif cfg.frozen_modules:
        freeze_modules(model, cfg.frozen_modules)
    del hf_ds_config
    return model


def count_parameters(model) -> Tuple[int, int]:
    """(trainable, total), using the full shapes of ZeRO-3 partitioned parameters."""
    trainable = total = 0
    for param in model.parameters():
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
