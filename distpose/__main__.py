"""`python -m distpose`, the same as the `distpose` command."""

import sys

from distpose.commands import main

sys.exit(main())
