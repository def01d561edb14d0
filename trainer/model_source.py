"""Which folder a model's files come from, by source (builtin, hub id, GGUF, local folder), without
torch: the launcher makes the folder ready before any rank starts (`prepare_model`), the ranks and the
offline commands then only find it (`model_dir`, `weights_dir`)."""
from __future__ import annotations

from pathlib import Path

from trainer.config import ModelConfig
from trainer.pretrained import BUILTIN_DIR, resolve_model_dir


def model_dir(cfg: ModelConfig) -> Path:
    """The local folder holding the model's config and tokenizer (converting GGUF once if needed)."""
    name = cfg.name_or_path
    if name.startswith("builtin:"):
        path = BUILTIN_DIR / name.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.name_or_path={name!r}: no builtin model at {path}")
        return path
    return resolve_model_dir(name, cfg.gguf_file, cfg.cache_dir, cfg.revision)


def prepare_model(cfg: ModelConfig, seed: int) -> Path:
    """Make the model's folder ready on this node before any rank needs it (the launcher calls it,
    a process that writes whole files): a hub download, a GGUF conversion, a builtin's random init.
    The ranks then only find it (`model_dir`, `weights_dir`)."""
    name = cfg.name_or_path
    if not name.startswith("builtin:"):
        resolve_model_dir(name, cfg.gguf_file, cfg.cache_dir, cfg.revision, download=True)
    return weights_dir(cfg, seed)


def weights_dir(cfg: ModelConfig, seed: int) -> Path:
    """The folder to load weights from: the model's own, or a builtin model's seeded random init."""
    if cfg.name_or_path.startswith("builtin:") and not cfg.random_init:
        from trainer.builtin_init import materialize

        return materialize(model_dir(cfg), init_seed(cfg, seed), cfg.cache_dir)
    return model_dir(cfg)


def init_seed(cfg: ModelConfig, seed: int) -> int:
    return cfg.init_seed if cfg.init_seed is not None else seed
