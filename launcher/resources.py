"""Where shardtune's own files are, in a source checkout and in an installed wheel alike.

The configs, the sbatch template, the sample data and the HF Trainer bench peer ship inside the
`launcher` package, under `launcher/bundled/` (in the repository those are links to the top-level
`configs/`, `slurm/`, `samples/` and `scripts/hf_peer.py`; the wheel holds copies). They are found
with importlib.resources, never through the repository's parent folder, so `pip install .` gives a
`shardtune` that runs from any directory.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

# The folder that holds the `launcher` and `trainer` packages: workers get it on PYTHONPATH so that
# `python -m trainer` finds the same code as the launcher (a checkout, or site-packages).
CODE_ROOT = Path(__file__).resolve().parent.parent
# Not resolved: in a checkout the links stay visible (paths read `.../launcher/bundled/samples/...`).
BUNDLED = Path(str(resources.files("launcher") / "bundled"))
CONFIG_DIR = BUNDLED / "configs"
SAMPLES_DIR = BUNDLED / "samples"
SLURM_DIR = BUNDLED / "slurm"
HF_PEER_SCRIPT = BUNDLED / "hf_peer.py"


def bundled_path(path: str | Path) -> Path:
    """`path` as given when absolute (after `~`), else relative to the bundled files
    (`slurm/job.sbatch.j2` is the template shipped with shardtune)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else BUNDLED / path
