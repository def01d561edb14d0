"""The data pipeline under real DeepSpeed on 2 CPU ranks: bad input stops before training with
file:line; a packed run trains on exactly the tokens the sampler picked, prepared once."""
from __future__ import annotations

import json
import math

import pytest

from helpers import metrics, train

pytestmark = pytest.mark.distributed


def test_bad_input_stops_before_training_with_file_and_line(tmp_path):
    run = tmp_path / "run"
    proc = train(run, "data.train_files=[tests/fixtures/data/bad/unknown_role.jsonl]", "data.eval_files=[]",
                 f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode != 0
    assert "tests/fixtures/data/bad/unknown_role.jsonl:3: message 1 has unknown role 'narrator'" in proc.stdout
    assert not (run / "metrics.jsonl").exists() or metrics(run) == []


def test_packed_run_trains_on_the_sampled_tokens(tmp_path):
    from trainer.config import load_run_config
    from trainer.data import build_datasets
    from trainer.data.sampler import GlobalBatchSampler
    from trainer.model import build_tokenizer

    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = train(run, "data.packing=true", f"data.cache_dir={cache}", "train.max_steps=3")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "packing fill" in proc.stdout
    records = metrics(run)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    # The same pipeline in this process (a cache hit now) gives the figure each step must report.
    cfg = load_run_config(run)
    train_set, _ = build_datasets(cfg.data, build_tokenizer(cfg.model))
    assert train_set.report["cache_hits"] == 1 and train_set.packed
    sampler = GlobalBatchSampler(len(train_set), cfg.train.micro_batch_size, cfg.train.grad_accum, 2, 0, cfg.seed)
    expected = [sum(train_set.label_tokens(i) for i in sampler.global_indices(s)) for s in range(3)]
    assert [r["step_tokens"] for r in records] == expected
    # Both ranks asked for every source; each was prepared once (train, eval, eval.general_files).
    prepared = sorted(p.name for p in cache.iterdir())
    assert not [n for n in prepared if n.endswith((".lock", ".error")) or ".tmp-" in n], prepared
    documents = sorted(json.loads((cache / n / "meta.json").read_text())["documents"] for n in prepared)
    assert 400 in documents and 60 in documents and len(documents) == len(set(prepared))
