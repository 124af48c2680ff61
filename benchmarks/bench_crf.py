"""Reference tree-CRF benchmark; same as `distpose bench crf` (see `distpose bench crf --help`)."""

import sys

from distpose.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "crf", *sys.argv[1:]]))
