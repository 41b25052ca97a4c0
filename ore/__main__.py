"""``python -m ore`` (used by ``torchrun -m ore``) runs the same command line as ``ore``."""

import sys

from ore.cli import main

sys.exit(main())
