"""Reference log-probs for full fine-tuning, precomputed in one pass before training.

DPO and KTO compare the policy with the model it started from. With peft the reference is the same
model with its adapters disabled (trainer/objectives/__init__.py reference_mode). With full
fine-tuning the starting weights are gone after the first step, so every row's reference log-probs
(a pair's two answers; a KTO answer and its mismatched KL sample) are computed once, by the model as
built and before any checkpoint is loaded, under the run's own ZeRO sharding: no second model.

They are stored in the data cache beside the prepared data, keyed by the prepared stores (content,
tokenizer, data settings), the model (source, revision, seed of a random init, dtype, precision)
and the peft settings; a later run, a resume and the other ranks find them there. The pass writes
its result in parts, so a pass that is interrupted continues where it stopped.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively); a rank
with no rows left runs a throwaway batch. Each part is all-reduced, so every rank holds every value.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from trainer.config import RootConfig
from trainer.control import progress
from trainer.data import cache
from trainer.data.preference import PreferenceDataset
from trainer.objectives import sequence_logps, unwrap

BATCHES_PER_PART = 16  # forward passes per rank between two saved parts
REFERENCE_VERSION = 1


def model_fingerprint(cfg: RootConfig) -> dict:
    """What decides the reference model's weights and numerics (not its speed switches)."""
    model = {k: v for k, v in asdict(cfg.model).items()
             if k not in ("compile", "loss_chunks", "activation_checkpointing", "cache_dir", "frozen_modules")}
    seeded = cfg.model.name_or_path.startswith("builtin:") or cfg.model.random_init
    files = {}
    folder = Path(os.path.expanduser(cfg.model.name_or_path))
    if folder.exists():  # a local folder or file: its weights may change under the same path
        for path in sorted([folder] if folder.is_file() else folder.glob("*")):
            if path.is_file() and path.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".json"):
                stat = path.stat()
                files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"model": model, "init_seed": (cfg.model.init_seed or cfg.seed) if seeded else None, "files": files,
            "precision": cfg.deepspeed.precision, "peft": asdict(cfg.peft)}


def reference_key(cfg: RootConfig, dataset: PreferenceDataset) -> str:
    payload = json.dumps({"v": REFERENCE_VERSION, "stores": [s.folder.name for s in dataset.corpus.stores],
                          "kind": dataset.kind, "max_seq_len": dataset.max_seq_len, "model": model_fingerprint(cfg)},
                         sort_keys=True, default=str)
    return "reference-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def _everyone_sees(path: Path, sum_over_ranks: Callable, world_size: int) -> bool:
    """A collective decision: true only if the file is there for every rank (a shared cache)."""
    return sum_over_ranks([1.0 if path.is_file() else 0.0])[0] == world_size


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def compute_reference(cfg: RootConfig, dataset: PreferenceDataset, engine, objective, info, sum_over_ranks,
                      log=print, cache_root: Optional[Path] = None) -> np.ndarray:
    """(units of the corpus x 2) reference log-probs of `dataset`'s corpus, from the cache or computed now.

    `sum_over_ranks(list) -> list` all-reduces (trainer.distributed.sum_across_ranks on a device);
    `objective.collate` builds the batches; `engine` is the model as built, before any training.
    """
    root = cache_root or (Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else cache.default_cache_dir())
    folder = root / reference_key(cfg, dataset)
    final = folder / "reference.npy"
    if _everyone_sees(final, sum_over_ranks, info.world_size):
        log(f"reference log-probs: cache hit ({final})")
        return np.load(final)
    folder.mkdir(parents=True, exist_ok=True)
    units = PreferenceDataset.units_of_corpus(dataset.corpus, dataset.kind)
    everything = PreferenceDataset(dataset.corpus, np.arange(units), dataset.kind, dataset.max_seq_len)
    mbs = cfg.train.micro_batch_size
    batches = math.ceil(units / (mbs * info.world_size))
    parts = math.ceil(batches / BATCHES_PER_PART)
    values = np.zeros((units, 2), dtype=np.float64)
    computed = 0
    for part in range(parts):
        path = folder / f"part-{part:05d}.npy"
        first, last = part * BATCHES_PER_PART, min(batches, (part + 1) * BATCHES_PER_PART)
        span = slice(first * mbs * info.world_size, min(units, last * mbs * info.world_size))
        if _everyone_sees(path, sum_over_ranks, info.world_size):
            values[span] = np.load(path)
            continue
        local = np.zeros((span.stop - span.start, 2), dtype=np.float64)
        for b in range(first, last):
            start = b * mbs * info.world_size + info.rank * mbs
            mine = list(range(start, min(start + mbs, units)))
            logps = _reference_of_rows(engine, objective, everything, mine or [0], info.device)
            progress()  # a pass over a large dataset is long, not hung
            if mine:
                local[mine[0] - span.start: mine[-1] + 1 - span.start] = logps
                computed += len(mine)
        part_values = np.asarray(sum_over_ranks(local.reshape(-1).tolist()), dtype=np.float64).reshape(local.shape)
        values[span] = part_values
        if info.is_main:
            _atomic_save(path, part_values)
    if info.is_main:
        _atomic_save(final, values)
        for leftover in folder.glob("part-*.npy"):
            leftover.unlink(missing_ok=True)
    log(f"reference log-probs: computed {units} {'pairs' if dataset.kind == 'preference' else 'examples'} "
        f"in one pass ({computed} on rank {info.rank}), cached in {final}")
    return values


def _reference_of_rows(engine, objective, dataset: PreferenceDataset, rows: List[int], device) -> np.ndarray:
    model = unwrap(engine)
    batch = {k: v.to(device) for k, v in objective.collate([dataset[i] for i in rows], 0, None).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logps, _ = sequence_logps(engine, batch)
    finally:
        model.train(was_training)
    return torch.stack(logps.chunk(2), dim=1).double().cpu().numpy()


def attach_reference(cfg: RootConfig, datasets, engine, objective, info, sum_over_ranks, log=print) -> None:
    """Give every preference dataset of the run (train, eval) its reference log-probs; datasets that
    share a corpus (an eval_fraction split) share one pass."""
    done = {}
    for dataset in datasets:
        if dataset is None:
            continue
        corpus_id = id(dataset.corpus)
        if corpus_id not in done:
            done[corpus_id] = compute_reference(cfg, dataset, engine, objective, info, sum_over_ranks, log)
        dataset.reference = done[corpus_id]
