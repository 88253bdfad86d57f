"""`python -m spindle.cli ...` is `spindle ...`."""

import sys

from spindle.cli import main

sys.exit(main())
