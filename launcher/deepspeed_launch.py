"""Start DeepSpeed's per-node launcher (deepspeed.launcher.launch) for a world shardtune computed.

`deepspeed ...` (DeepSpeed's runner) is a process whose only work on one node, or on a node started
without ssh, is to turn its flags into this launcher's `--world_info` and start it: one more Python
process importing torch and deepspeed (seconds on every launch, on every node). shardtune computes the
world itself (launcher/devices.py, with the runner's rules) and starts the per-node launcher directly:

    python -u -m launcher.deepspeed_launch --world_info=... --node_rank=R ... --module trainer --run-dir D

Run as a module, it is DeepSpeed's launcher itself, with one difference: DeepSpeed's autotuner's eager
import of mlflow is kept out (trainer/optional_imports.py), as in every shardtune process.
"""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

POLL_S = 0.1  # how often the per-node launcher looks at its ranks (DeepSpeed's own: 1 s)


def world_info(world: Dict[str, List[int]]) -> str:
    """The encoding deepspeed.launcher.launch decodes (urlsafe base64 of the JSON {host: [ids]})."""
    return base64.urlsafe_b64encode(json.dumps(world).encode()).decode()


def launch_command(world: Dict[str, List[int]], node_rank: int, addr: str, port: int, run_dir: Path) -> List[str]:
    """The command that starts this node's ranks: one per id in world[this node's host]."""
    return [sys.executable, "-u", "-m", "launcher.deepspeed_launch", f"--world_info={world_info(world)}",
            f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}",
            "--module", "trainer", "--run-dir", str(run_dir)]


def decode_world(argv: List[str]) -> Dict[str, List[int]]:
    """The world a launch command carries (for tests and `run.launch=dry_run` readers)."""
    value = next(a.split("=", 1)[1] for a in argv if a.startswith("--world_info="))
    return json.loads(base64.urlsafe_b64decode(value))


if __name__ == "__main__":
    import runpy

    import trainer  # noqa: F401  installs the mlflow deferral before deepspeed is imported

    # DeepSpeed's launcher checks its ranks once a second (time.sleep(1) in its loop), so every job
    # ended up to 1 s after its last rank. This process only spawns and waits: poll every 0.1 s.
    import time

    _sleep = time.sleep
    time.sleep = lambda seconds: _sleep(min(seconds, POLL_S))
    sys.argv[0] = "deepspeed.launcher.launch"
    runpy.run_module("deepspeed.launcher.launch", run_name="__main__", alter_sys=True)
    # Every rank exited cleanly (a failure exits inside): skip the teardown of DeepSpeed's and torch's
    # modules (1-2 s that the launcher waits for at the end of every launch).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
