#!/usr/bin/env bash
# Regenerate the dependency locks (`make lock`): the newest versions inside pyproject.toml's ranges,
# pinned exactly, for each torch variant we support. A lock bump is a commit of its own, made only
# after `make test` passed on it (see docs/install.md).
#
#   requirements/lock-cpu.txt   torch's CPU build (pip finds it through its own configuration:
#                               find-links or an index such as download.pytorch.org/whl/cpu)
#   requirements/lock-cuda.txt  torch's default PyPI build (CUDA) with its nvidia-* wheels
#
# Both are for CPython 3.11 on Linux x86-64, the platform CI and the GPU nodes run.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.cache/lock-tools
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "pip-tools==7.7.0"
fi
# LOCK_ADD_ONLY=1 resolves a newly added dependency while keeping every existing pin (adding a
# package is not a bump); by default every package moves to its newest version in range.
if [ "${LOCK_ADD_ONLY:-0}" = 1 ]; then UPGRADE=""; else UPGRADE="--upgrade"; fi
compile() {  # $1: variant, then extra environment for pip
  local variant=$1; shift
  env "$@" CUSTOM_COMPILE_COMMAND="make lock" "$TOOLS/bin/pip-compile" -q --allow-unsafe --strip-extras --no-emit-find-links \
    --no-emit-index-url --no-emit-trusted-host --annotation-style=line $UPGRADE \
    --extra test --extra eval --extra gguf --extra sweeps --extra trackers \
    -o "requirements/lock-$variant.txt" \
    pyproject.toml requirements/build.in "requirements/torch-$variant.in"
}
compile cpu
# The CUDA lock is resolved against the package index alone: pip's local configuration (a find-links
# folder holding a CPU build, a constraints file) would otherwise leak into it.
compile cuda -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null
echo "locked: $(grep -cE '^[A-Za-z0-9]' requirements/lock-cpu.txt) packages (cpu)," \
     "$(grep -cE '^[A-Za-z0-9]' requirements/lock-cuda.txt) (cuda)"
