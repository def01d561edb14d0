"""The shape the code keeps (docs/architecture.md): no import cycle among launcher/ and trainer/
modules, and no run-directory file name written anywhere but trainer/run_dir.py."""
from __future__ import annotations

import importlib.util

import pytest

from helpers import REPO


def measured() -> dict:
    spec = importlib.util.spec_from_file_location("architecture_check", REPO / "scripts" / "architecture_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure()


def test_no_import_cycles_and_run_dir_names_have_one_owner():
    facts = measured()
    assert facts["cycles"] == [], facts["cycles"]
    assert facts["run_dir_literals"] == [], "name run-directory files through trainer.run_dir.RunDir"
    assert facts["peft_method_literals"] == [], "say what a peft method does in trainer/peft_methods.py's table"


def test_the_run_dir_reader_skips_a_line_being_written(tmp_path):
    from trainer.run_dir import RunDir

    run = RunDir(tmp_path)
    problems: list = []
    assert run.read_metrics(problems) == [] and problems == ["metrics.jsonl: not written (yet)"]
    run.metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a live run's last line
    problems = []
    assert run.read_metrics(problems) == [{"step": 1}, {"step": 2}]
    assert problems == ["metrics.jsonl:3: unreadable line skipped"]


def _gpu_device_nodes() -> bool:
    import glob

    from launcher.devices import GPU_DEVICE_NODES

    return any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES)


@pytest.mark.skipif(_gpu_device_nodes(), reason="with a GPU here the launcher asks torch how many")
def test_the_launcher_decides_and_writes_a_run_without_importing_torch(tmp_path):
    """Composing, validating, the resume decision and the run directory are the torch-free contract
    (trainer/config.py, validate.py, checkpoint_catalog.py, run_dir.py, model_source.py): a launch's
    own process pays no torch import (1-2 s of every launch) on a machine without GPU device nodes
    (launcher/devices.py gpu_count asks torch only where a GPU can exist)."""
    import subprocess
    import sys

    from helpers import subprocess_env

    script = ("import sys; from launcher.cli import main; "
              f"code = main(['train', 'run.dir={tmp_path / 'run'}', 'run.launch=print']); "
              "print('torch imported:', 'torch' in sys.modules, 'exit', code)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert "torch imported: False exit 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
