"""`shardtune verify RUN_DIR`: check every committed checkpoint of a run against its manifest, content
included (each file's sha256, each pickle through the safe loader).

Training and resuming check sizes only in the launcher and leave the content to the ranks, each its
own share as it loads; this reads everything in one process, so it is the command to run on a copied
or long-stored run directory before trusting it, and what to run when a resume reports a checksum
mismatch (it says which earlier checkpoint is intact).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtune verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory (its checkpoints/ folder is checked)")
    parser.add_argument("--step", type=int, default=None, help="check this step's checkpoint only")
    return parser


def check(folder: Path) -> Optional[str]:
    """What is wrong with a committed checkpoint folder, or None."""
    from trainer import checkpoint

    problem = checkpoint.verify(folder, deep=True)
    if problem is None:
        try:
            checkpoint.preverify_loadable(folder)
        except checkpoint.CheckpointError as err:
            problem = str(err)
    return problem


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from trainer import checkpoint

    root = checkpoint.checkpoint_root(Path(args.run_dir).expanduser().resolve())
    tags = checkpoint.committed_tags(root)
    if args.step is not None:
        tags = [t for t in tags if t == checkpoint.tag_for(args.step)] or [checkpoint.tag_for(args.step)]
    if not tags:
        print(f"shardtune verify: no committed checkpoint in {root}", file=sys.stderr)
        return 1
    bad = []
    for tag in tags:  # newest first
        started = time.perf_counter()
        problem = check(root / tag)
        size = checkpoint.committed_size(root / tag) if problem is None else 0
        print(f"{tag}: " + (f"ok ({size / 2**20:.1f} MiB in {time.perf_counter() - started:.1f}s)"
                             if problem is None else f"BAD: {problem}"))
        bad += [tag] if problem else []
    intact = [t for t in tags if t not in bad]
    if bad:
        print(f"{len(bad)} of {len(tags)} checkpoint(s) damaged; "
              + (f"resume from the newest intact one: resume={root / intact[0]}" if intact else "none is intact"))
    return 1 if bad else 0
