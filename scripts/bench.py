"""`python scripts/bench.py ARGS` == `shardtune bench ARGS`; see launcher/bench_cmd.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.bench_cmd import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
