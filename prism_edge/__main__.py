"""`python -m prism_edge ...`: the command line (prism_edge.app.cli)."""

import sys

from .app.cli import main

sys.exit(main())
