"""model.random_init (a model folder without weights), train.profile_steps, and the GPU-count check."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, losses, train
from trainer.config import ConfigError, ModelConfig, RootConfig
from trainer.validate import validate


def weightless_folder(tmp_path: Path) -> Path:
    """The builtin tiny Llama's config and tokenizer, as a downloaded folder without its weights."""
    folder = tmp_path / "model"
    shutil.copytree(REPO / "trainer" / "builtin" / "tiny-llama", folder)
    assert not list(folder.glob("*.safetensors"))
    return folder


def local_config(folder: Path, **model) -> RootConfig:
    cfg = RootConfig()
    cfg.run.dir, cfg.run.name = "/tmp/x", "x"
    cfg.data.train_files = [str(REPO / "samples" / "chat" / "train.jsonl")]
    cfg.model.name_or_path = str(folder)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_a_folder_without_weights_needs_random_init_said_out_loud(tmp_path):
    folder = weightless_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"has a config.json but no weights .* model.random_init=true"):
        validate(local_config(folder), has_cuda=False)
    validate(local_config(folder, random_init=True), has_cuda=False)


def test_random_init_is_seeded(tmp_path):
    from trainer.model import _create

    folder = weightless_folder(tmp_path)
    cfg = ModelConfig(name_or_path=str(folder), random_init=True)

    def weights(seed: int):
        return torch.cat([p.detach().flatten() for p in _create(cfg, folder, torch.float32, seed).parameters()])

    first = weights(7)
    assert torch.equal(first, weights(7))
    assert not torch.equal(first, weights(8))
    assert first.std() > 0.005  # the architecture's own initialisation, not zeros


@pytest.mark.parametrize("shape, billions", [("llama-1b", 1.236), ("llama-8b", 8.030)])
def test_published_shapes_have_their_published_sizes(tmp_path, shape, billions):
    from transformers import AutoConfig, AutoModelForCausalLM

    subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_model.py"), shape, str(tmp_path)],
                   check=True, capture_output=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.002)


def test_no_more_local_ranks_than_gpus(monkeypatch):
    import launcher.devices

    monkeypatch.setattr(launcher.devices, "gpu_count", lambda: 1)  # the launcher's one GPU count
    cfg = RootConfig()
    cfg.run.dir, cfg.run.name, cfg.model.name_or_path = "/tmp/x", "x", "builtin:tiny-llama"
    cfg.cluster.nproc_per_node = 2
    with pytest.raises(ConfigError, match=r"cluster.nproc_per_node=2 but this machine has 1 visible GPU"):
        validate(cfg, has_cuda=True, check_files=False)
    cfg.cluster.nproc_per_node = 1
    validate(cfg, has_cuda=True, check_files=False)


@pytest.mark.distributed
def test_random_init_trains_and_the_profiler_writes_its_tables(tmp_path):
    folder = weightless_folder(tmp_path)
    run = tmp_path / "run"
    train(run, "model=local", f"model.name_or_path={folder}", "model.random_init=true", "train.max_steps=3",
          "train.profile_steps=2", "deepspeed.reduce_bucket_size=1000000", check=True)
    assert len(losses(run)) == 3 and all(0 < x < 20 for x in losses(run))
    table = (run / "profile" / "rank0.txt").read_text()
    assert table.startswith("last 2 step(s)") and "aten::mm" in table
    assert (run / "profile" / "rank1.trace.json").stat().st_size > 1000
