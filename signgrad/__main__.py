"""``python -m signgrad``: the command line (what ``torchrun -m signgrad`` runs too)."""

from signgrad.cli import entry

entry()
