"""`python -m ldmkit ...` runs the `ldmkit` command line."""

import sys

from .cli import main

sys.exit(main())
