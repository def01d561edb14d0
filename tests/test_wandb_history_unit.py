"""W&B continuity without DeepSpeed (T13's logic): the transaction-log reader and the sink's resume.

Real wandb (offline mode) in a child process; the distributed T13 check lives in test_reliability.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import REPO
from helpers import subprocess_env as child_env  # renamed: pytest would collect subprocess_env
from trainer import wandb_history

# One launch of a run through the real WandbSink, logging steps FIRST..LAST (a child process each,
# so wandb-core has exited and closed the file before the test edits it).
LAUNCH = textwrap.dedent("""
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    from trainer.metrics import WandbSink

    run_dir, first, last = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cfg = SimpleNamespace(logger=SimpleNamespace(project="p", entity=None, group=None, tags=[], mode="offline"),
                          run=SimpleNamespace(name="r"))
    sink = WandbSink(cfg, {}, run_dir)
    for step in range(first, last + 1):
        sink.log({"kind": "train", "step": step, "loss": 10.0 - step, "note": "x" * 40000 * (step == 2)})
    sink.close()
""")


def launch(run_dir: Path, first: int, last: int) -> None:
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(run_dir), str(first), str(last)], cwd=REPO,
                          env=child_env({"WANDB_MODE": "offline"}), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def killed_then_resumed(run_dir: Path, flushed: bool) -> list[int]:
    """Launch 1 logs steps 1-5 and is "killed"; launch 2 resumes from the checkpoint of step 4."""
    run_dir.mkdir()
    launch(run_dir, 1, 5)
    if not flushed:  # what kill -9 leaves when wandb-core had not flushed yet: the 7-byte header
        first = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        first.write_bytes(first.read_bytes()[:7])
    # metrics.jsonl as JsonlSink leaves it on resume from step 4.
    rows = [{"kind": "train", "step": s, "loss": 10.0 - s, "note": "x" * 40000 * (s == 2)} for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    launch(run_dir, 5, 8)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(wandb_history.run_files(run_dir / "wandb", run_id)) == 2
    return wandb_history.run_history_steps(run_dir / "wandb", run_id)


def test_a_resumed_run_logs_every_step_once_whatever_the_killed_launch_flushed(tmp_path):
    # A 40 kB row (step 2) spans two 32 KiB blocks: the reader must join FIRST/MIDDLE/LAST chunks.
    assert killed_then_resumed(tmp_path / "kept", flushed=True) == [1, 2, 3, 4, 5, 6, 7, 8]
    # Steps 1-5 never reached the file: 1-4 are backfilled from metrics.jsonl, 5 is trained again.
    assert killed_then_resumed(tmp_path / "lost", flushed=False) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_torn_tail_is_ignored_and_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b":W&B\xe1\xbe\x00" + b"\x00\x00\x00\x00\x10\x00\x01" + b"abc")  # says 16 bytes, has 3
    assert list(wandb_history.raw_records(path)) == []
    path.write_bytes(b":W&B\xe1\xbe\x00" + b"\x00\x00\x00\x00\x03\x00\x01" + b"abc")  # complete, wrong crc32
    assert list(wandb_history.raw_records(path)) == []
    path.write_bytes(b"PK\x03\x04 not a transaction log")
    try:
        list(wandb_history.raw_records(path))
    except ValueError as err:
        assert str(path) in str(err)
    else:
        raise AssertionError("a file without the W&B header was read")
