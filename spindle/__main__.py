"""`python -m spindle ...` is the `spindle` command."""

import sys

from spindle.cli import main

sys.exit(main())
