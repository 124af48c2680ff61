"""Training throughput benchmark; same as `distpose bench train` (see `distpose bench train --help`)."""

import sys

from distpose.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
