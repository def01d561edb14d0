"""`shardtune stop RUN_DIR`: ask a running run to checkpoint at the next step and exit (code 75)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from trainer.control import request_stop
from trainer.run_dir import RunDir


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardtune stop", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the run directory of a running job")
    args = parser.parse_args(argv)
    if not RunDir(args.run_dir).is_run():
        parser.error(f"{args.run_dir}: not a shardtune run directory (no config.yaml)")
    request_stop(args.run_dir, "shardtune stop")
    print(f"stop requested: every rank checkpoints after its current step; resume with "
          f"`shardtune train run.dir={args.run_dir}`")
    return 0
