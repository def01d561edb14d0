"""Session-scoped real Slurm cluster (two emulated nodes n1, n2) for the tests in tests/slurm/.

Root on a fresh machine (CI): Slurm is installed with apt-get when missing and the cluster really
runs. The tests are skipped only when this process is not root AND Slurm is not installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent
for p in (str(Path(__file__).resolve().parent), str(TESTS_DIR), str(REPO)):  # the harness sits beside us
    if p not in sys.path:
        sys.path.insert(0, p)

import slurm_harness  # noqa: E402

# Clusters started in this session; their ``timings`` dicts (the harness's, plus what tests add)
# are shown in the terminal summary.
_CLUSTERS: list = []


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0 and not slurm_harness.slurm_installed():
        pytest.skip(
            "Slurm is not installed and this process is not root, so it cannot be installed "
            "(apt-get install slurmctld slurmd slurm-client munge, or run the tests as root)"
        )
    with slurm_harness.LocalSlurm() as cluster:
        _CLUSTERS.append(cluster)
        yield cluster


def pytest_terminal_summary(terminalreporter):
    for cluster in _CLUSTERS:
        terminalreporter.write_sep("-", f"local Slurm timings in seconds ({cluster.state_dir})")
        for k, v in cluster.timings.items():
            terminalreporter.write_line(f"{k}: {v:.2f}")
