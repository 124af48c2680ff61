"""Triton CRF kernel benchmark; same as `distpose bench kernel` (see `distpose bench kernel --help`)."""

import sys

from distpose.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernel", *sys.argv[1:]]))
