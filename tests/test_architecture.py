"""The shape the code keeps (docs/architecture.md): no import cycle among launcher/ and trainer/
modules, and no run-directory file name written anywhere but trainer/run_dir.py."""
from __future__ import annotations

import importlib.util

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
