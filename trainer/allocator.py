"""Which memory allocator CPU ranks run with (cluster.allocator), preloaded into every rank.

glibc's malloc keeps the holes that freed temporaries leave between live activations: measured on
SmolLM2's shapes, a LoRA forward held 85 % more than its live tensors (full fine-tuning 14 %), so
a CPU run's memory is neither what the tensors need nor what `shardtune preflight` predicts.
tcmalloc reuses those holes: on 2 CPU ranks it lowered peaks by 19-23 % and mostly shortened steps
(figures in docs/performance.md). jemalloc did on ZeRO-1/2 but held 37 % more than glibc under
ZeRO-3 with LoRA, hence tcmalloc first.

    auto      (default) on CPU: tcmalloc if its library is installed, else jemalloc, else glibc;
              on GPU: glibc (host memory is not what limits a GPU job)
    glibc     the C library's malloc, nothing preloaded
    jemalloc  / tcmalloc: that library, or a config error naming the package to install
"""
from __future__ import annotations

import ctypes.util
import os
from pathlib import Path
from typing import Dict, Optional

# Library file names, most specific first, and the package that ships them (Debian/Ubuntu).
LIBRARIES = {
    "jemalloc": (("libjemalloc.so.2", "libjemalloc.so"), "libjemalloc2"),
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so"),
                 "libtcmalloc-minimal4"),
}
# jemalloc by default hands freed pages back to the OS after 10 s, and faulting them in again made a
# LoRA step 24 % slower than glibc; never returning them, it ran 1-9 % faster than glibc and held
# 18 % less (freed blocks are reused, not returned). A user's own MALLOC_CONF wins.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")


def find_library(name: str) -> Optional[str]:
    """The path of allocator `name`'s shared library on this machine, or None."""
    files, _ = LIBRARIES[name]
    dirs = [os.path.join(os.environ["CONDA_PREFIX"], "lib")] if os.environ.get("CONDA_PREFIX") else []
    for folder in [*dirs, *SEARCH_DIRS]:
        for file in files:
            path = Path(folder) / file
            if path.is_file():
                return str(path)
    found = ctypes.util.find_library(name)  # ldconfig's cache: a name such as libjemalloc.so.2
    if found:
        for folder in [*dirs, *SEARCH_DIRS]:
            if (Path(folder) / found).is_file():
                return str(Path(folder) / found)
    return None


def choose(setting: str, on_gpu: bool) -> Optional[str]:
    """The allocator library to preload under cluster.allocator=`setting`, or None for glibc."""
    if setting == "glibc" or (setting == "auto" and on_gpu):
        return None
    if setting == "auto":
        return find_library("tcmalloc") or find_library("jemalloc")
    return find_library(setting)


def missing_problem(setting: str) -> Optional[str]:
    """A config problem when an explicitly chosen allocator is not installed here."""
    if setting not in LIBRARIES or find_library(setting):
        return None
    _, package = LIBRARIES[setting]
    return (f"cluster.allocator={setting}: its library is not installed on this machine (Debian/Ubuntu: "
            f"apt-get install {package}; conda: conda install {setting.replace('tcmalloc', 'gperftools')}); "
            "or use cluster.allocator=auto or glibc")


def preload_env(setting: str, on_gpu: bool, env: Dict[str, str]) -> Dict[str, str]:
    """`env` with the chosen allocator first in LD_PRELOAD (kept as is for glibc)."""
    library = choose(setting, on_gpu)
    if library is None:
        return env
    existing = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != library]
    env = {**env, "LD_PRELOAD": ":".join([library, *existing])}
    if "jemalloc" in library:
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def in_use() -> str:
    """The allocator this process runs with: jemalloc, tcmalloc or glibc (from its mapped libraries)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"
