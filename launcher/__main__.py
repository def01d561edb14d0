"""`python -m launcher <overrides>` is `shardtune train <overrides>`."""
import sys

from launcher.app import train_main

sys.exit(train_main(sys.argv[1:]))
