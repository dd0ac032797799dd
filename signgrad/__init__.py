"""signgrad: binary neural networks with swappable gradient estimators for sign()."""

__version__ = "0.1.0"
