"""``python -m signgrad``: the command line (what ``torchrun -m signgrad`` runs too)."""

import sys

from signgrad.cli import main

sys.exit(main())
