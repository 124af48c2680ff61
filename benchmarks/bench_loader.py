"""Loader throughput benchmark; same as `distpose bench loader` (see `distpose bench loader --help`)."""

import sys

from distpose.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "loader", *sys.argv[1:]]))
