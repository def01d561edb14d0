"""Hub model ids (`model.name_or_path=Org/Name`) resolved through a Hugging Face cache laid out exactly
as huggingface_hub lays it out: models--Org--Name/{blobs, snapshots/<commit>, refs/<branch>}, each
snapshot file a relative link to its blob. Nothing reaches the network: a download is either
forbidden (HF_HUB_OFFLINE=1) or sent to a closed local port."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import train

from trainer import pretrained
from trainer.pretrained import ModelSourceError

REPO_ID = "TinyOrg/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Copy the model folder `source` into `cache` as huggingface_hub stores a download of it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if not item.is_file() or item.name.startswith("."):
            continue
        data = item.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / item.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """The builtin tiny Llama with seeded weights: a whole, real model folder."""
    from trainer.builtin_init import materialize
    from trainer.model import BUILTIN_DIR

    return materialize(BUILTIN_DIR / "tiny-llama", 0, str(tmp_path_factory.mktemp("models")))


@pytest.fixture
def hub_cache(tmp_path, tiny_weights, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    lay_out_hub_cache(cache, REPO_ID, tiny_weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a download would be refused at once
    return cache


def test_a_cached_hub_id_resolves_to_its_snapshot(hub_cache):
    snapshot = hub_cache / f"models--TinyOrg--tiny-llama/snapshots/{COMMIT}"
    assert pretrained.resolve_model_dir(REPO_ID) == snapshot
    assert pretrained.resolve_model_dir(REPO_ID, revision=COMMIT) == snapshot
    assert pretrained.folder_problems(snapshot) == []


def test_hf_home_is_read_when_hf_hub_cache_is_unset(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    assert pretrained.resolve_model_dir(REPO_ID).parent.parent.parent == hub_cache


def test_offline_a_misspelt_id_names_the_folder_searched_and_the_download_command(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as info:
        pretrained.resolve_model_dir("TinyOrg/tiny-lama", download=True)
    message = str(info.value)
    assert str(hub_cache / "models--TinyOrg--tiny-lama") in message
    assert "hf download TinyOrg/tiny-lama" in message and "HF_HUB_OFFLINE" in message


def test_an_unknown_revision_is_not_taken_for_main(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="revision v9.*hf download TinyOrg/tiny-llama --revision v9"):
        pretrained.resolve_model_dir(REPO_ID, revision="v9")


def test_a_failed_download_says_so_and_what_to_do(hub_cache):
    with pytest.raises(ModelSourceError, match="download failed.*hf download TinyOrg/other"):
        pretrained.resolve_model_dir("TinyOrg/other", download=True)


def test_ranks_never_download(hub_cache, monkeypatch):
    """Without download=True (what a rank asks) a missing model is an error, not a download."""
    import huggingface_hub

    def no_network(*args, local_files_only=False, **kwargs):
        assert local_files_only, "a download was attempted"
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache"):
        pretrained.resolve_model_dir("TinyOrg/other")


def test_a_cached_snapshot_missing_a_blob_is_incomplete_not_loaded(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = pretrained.resolve_model_dir(REPO_ID)
    (snapshot / "model.safetensors").resolve().unlink()  # the link now dangles
    with pytest.raises(ModelSourceError, match="incomplete.*model.safetensors is missing"):
        pretrained.resolve_model_dir(REPO_ID)


def test_a_local_folder_with_an_org_name_shape_wins(tmp_path, monkeypatch, tiny_weights):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "TinyOrg").mkdir()
    os.symlink(tiny_weights, tmp_path / "TinyOrg" / "tiny-llama")
    assert not pretrained.is_hub_id(REPO_ID)
    assert pretrained.resolve_model_dir(REPO_ID) == Path(REPO_ID)


def test_validation_accepts_a_cached_id_and_refuses_a_missing_one_offline(hub_cache, monkeypatch):
    from launcher.compose import compose
    from trainer.validate import ConfigError

    cfg = compose(["model=local", f"model.name_or_path={REPO_ID}", "peft=lora"])
    assert cfg.model.name_or_path == REPO_ID
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hf download TinyOrg/tiny-lama"):
        compose(["model=local", "model.name_or_path=TinyOrg/tiny-lama"])


@pytest.mark.distributed
def test_training_on_a_hub_id_exports_an_adapter_that_names_it(hub_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(run_dir, "model=local", f"model.name_or_path={REPO_ID}", "peft=lora", "train.max_steps=2",
                 "cluster.nproc_per_node=1", "checkpoint.export_final=true",
                 env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:]
    adapter = json.loads((run_dir / "export" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == REPO_ID
