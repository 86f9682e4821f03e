"""`python -m train CONFIG [key=value ...] [--nproc N]` and `python -m train export ...`."""
import sys

from train.cli import main

if __name__ == "__main__":  # spawned ranks re-import this module; only the launcher runs main
    sys.exit(main(sys.argv[1:]))
