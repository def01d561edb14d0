"""Worker entry: python -m trainer --run-dir D (rank and world size come from the environment)."""
import argparse
import sys

from trainer.run import main

parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
parser.add_argument("--run-dir", required=True, help="a run directory written by `shardtune train`")
parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher may add it
sys.exit(main(parser.parse_args().run_dir))
