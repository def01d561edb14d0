"""`shardtune preflight <overrides>`: memory per rank and FLOPs per step, before anything is launched.

Composes the config exactly as `shardtune train` would, reads the model's config.json (no
weights are loaded), and prints a table and a verdict. `--json` prints the estimate as JSON.
Exit code 0 when it fits, 3 when it does not, 2 on a bad config.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

from trainer.allocator import choose as choose_allocator
from trainer.config import ConfigError, RootConfig
from trainer.preflight import (Estimate, Setup, available_bytes_per_rank, estimate, format_table,
                               lora_dropout_values, setup_from_config, shape_from_config_dict, verdict,
                               DS_PERSISTENCE_THRESHOLD)

EXIT_WILL_NOT_FIT = 3
USAGE = "usage: shardtune preflight [--json] [hydra overrides ...]   e.g. shardtune preflight deepspeed=zero2 peft=lora"


def model_config_dict(cfg: RootConfig) -> dict:
    """The model's config as a dict: config.json of a folder or builtin, or a GGUF file's metadata."""
    from trainer.model import BUILTIN_DIR

    name = cfg.model.name_or_path
    if name.startswith("builtin:"):
        return json.loads((BUILTIN_DIR / name.split(":", 1)[1] / "config.json").read_text())
    from trainer.pretrained import resolve_model_dir  # a folder, a cached hub id; GGUF converted once

    folder = resolve_model_dir(name, cfg.model.gguf_file, cfg.model.cache_dir, cfg.model.revision)
    return json.loads((Path(folder) / "config.json").read_text())


def plan(cfg: RootConfig, on_gpu: bool) -> Tuple[Setup, Estimate, object]:
    """Shape, setup and estimate for a composed config."""
    lora = None
    if cfg.peft.method in ("lora", "dora"):
        targets = cfg.peft.target_modules
        if targets == "family":
            from trainer.families import lora_targets

            targets = lora_targets(cfg.model.family)
        lora = {"r": cfg.peft.r, "targets": targets if isinstance(targets, str) else list(targets)}
    threshold = cfg.deepspeed.stage3_param_persistence_threshold
    config = model_config_dict(cfg)
    shape, trainable, persistent = shape_from_config_dict(
        config, lora, DS_PERSISTENCE_THRESHOLD if threshold is None else threshold)
    setup = setup_from_config(cfg, on_gpu, trainable, persistent, shape)
    if lora is not None and cfg.peft.dropout > 0:
        setup = replace(setup, lora_dropout_values=lora_dropout_values(config, lora["targets"]))
    return setup, estimate(shape, setup), shape


def report(cfg: RootConfig, on_gpu: bool) -> Tuple[bool, str, dict]:
    """(fits, printable text, JSON-able facts) for `cfg`. Used by the slurm backend before sbatch too."""
    setup, est, shape = plan(cfg, on_gpu)
    capacity, where = available_bytes_per_rank(on_gpu, cfg.cluster.nproc_per_node)
    world = setup.world
    text = verdict(shape, setup, est, capacity, where, world)
    fits = text.startswith("fits")
    trainable = setup.trainable or shape.params
    header = (f"model: {shape.params:,} parameters ({trainable:,} trainable), {shape.layers} layers, "
              f"hidden {shape.hidden}, vocab {shape.vocab}\n"
              f"setup: ZeRO-{setup.stage}{' offload' if setup.offload_optimizer or setup.offload_param else ''}, "
              f"{setup.precision}, {world} ranks, micro-batch {setup.micro_batch} x {setup.seq_len} tokens, "
              f"checkpointing {setup.checkpointing}, attention {setup.attn}, {'GPU' if on_gpu else 'CPU'}")
    flops = (f"FLOPs per step per rank: {est.flops_per_step:.3e} ({est.flops_per_token:.3e} per token at "
             f"T={setup.seq_len}; PaLM convention, see docs/performance.md)")
    facts = {"fits": fits, "verdict": text, "per_rank_bytes": est.rank_total(on_gpu), "capacity_bytes": capacity,
             "device": est.device, "host": est.host, "flops_per_step": est.flops_per_step,
             "flops_per_token": est.flops_per_token, "params": shape.params, "trainable": trainable}
    lines = [header, format_table(est, on_gpu), flops, f"verdict: {text}"]
    if not on_gpu:  # measured: docs/performance.md, "How close it is"
        library = choose_allocator(cfg.cluster.allocator, on_gpu)
        if library:
            lines.append(f"allocator: {library} (cluster.allocator={cfg.cluster.allocator}), which reuses freed "
                         "blocks: a rank holds about its live tensors")
        else:
            lines.append("allocator: glibc: on CPU it keeps freed blocks on top of these live tensors (measured "
                         "+14 % of activations for full fine-tuning, +85 % for LoRA): keep 1.25x / 1.5x headroom, "
                         "or use cluster.allocator=tcmalloc (docs/performance.md)")
    return fits, "\n".join(lines), facts


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    as_json = "--json" in argv
    overrides = [a for a in argv if a != "--json"]
    from launcher.compose import compose, has_cuda

    try:
        cfg = compose(overrides, validate_files=False)
    except ConfigError as err:
        print(f"shardtune preflight: {err}", file=sys.stderr)
        return 2
    fits, text, facts = report(cfg, has_cuda(cfg))
    print(json.dumps(facts, indent=2) if as_json else text)
    return 0 if fits else EXIT_WILL_NOT_FIT
