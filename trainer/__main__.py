"""Worker entry: python -m trainer --run-dir D (rank and world size come from the environment)."""
import argparse
import os
import sys

from trainer.run import main

parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
parser.add_argument("--run-dir", required=True, help="a run directory written by `shardtune train`")
parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher may add it
code = main(parser.parse_args().run_dir)
# Every file of the run is written and closed, the sinks are closed and the process group is torn
# down: skip the interpreter's teardown of torch, DeepSpeed and transformers' modules, 1-2 s per rank
# at the end of every launch (measured) that the launcher and the job wait for.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
