import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

# The tiers the layout shows: a test under tests/slurm/ needs the real local Slurm cluster, one
# under tests/gpu/ a CUDA GPU, so `-m "not slurm"` (make test-fast) leaves them out by folder.
FOLDER_MARKERS = {"slurm": pytest.mark.slurm, "gpu": pytest.mark.gpu}


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory):
    """run(method, stage): one 2-step, 2-rank run of the tiny model per peft method and ZeRO stage (a
    live export and a final checkpoint), made once for the whole session: the export tests
    (test_peft_export.py) and the eval tests (test_eval.py) read the same runs."""
    from helpers import run_method

    root, runs = tmp_path_factory.mktemp("methods"), {}

    def run(method: str, stage: int) -> Path:
        if (method, stage) not in runs:
            runs[method, stage] = run_method(root, method, stage)
        return runs[method, stage]
    return run


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[parts[0]])
