"""`shardtune report RUN_DIR|SWEEP_DIR`: write report.html and report.md (see docs/report.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

from trainer.run_dir import RunDir


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardtune report", description=(
        "Write RUN_DIR/report.html (self-contained, plots inlined) and report.md: loss curves, task gain, "
        "retention check, generations before and after, config and timing. Works on finished, running and "
        "failed runs; on a sweep directory it reports every trial and writes a table linking them."))
    parser.add_argument("run_dir", help="a run directory (holds config.yaml) or a sweep directory (trial-*/)")
    args = parser.parse_args(argv)
    folder = Path(args.run_dir).expanduser().resolve()
    if not folder.is_dir():
        print(f"shardtune report: {args.run_dir}: no such directory", file=sys.stderr)
        return 2
    from trainer.report_build import is_sweep, write_run_report, write_sweep_report

    if is_sweep(folder):
        rows = write_sweep_report(folder)
        print(f"sweep report: {folder / 'report.html'} ({len(rows)} trials)")
        return 0
    if not RunDir(folder).is_run() and not RunDir(folder).metrics.is_file():
        print(f"shardtune report: {folder} is neither a run directory (config.yaml, metrics.jsonl) nor a sweep "
              "directory (trial-*/ folders)", file=sys.stderr)
        return 2
    summary = write_run_report(folder)
    from trainer.report_render import retention_sentence, task_sentence

    print(f"report: {folder / 'report.html'} ({summary['status']['state']})\n"
          f"  task: {task_sentence(summary['task'])}\n  retention: {retention_sentence(summary['retention'])}")
    return 0
