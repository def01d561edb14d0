import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

# The tiers the layout shows: a test under tests/slurm/ needs the real local Slurm cluster, one
# under tests/gpu/ a CUDA GPU, so `-m "not slurm"` (make test-fast) leaves them out by folder.
FOLDER_MARKERS = {"slurm": pytest.mark.slurm, "gpu": pytest.mark.gpu}


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[parts[0]])
