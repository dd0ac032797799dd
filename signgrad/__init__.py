"""signgrad: binary neural networks with swappable gradient estimators for sign()."""

# The only place the version is written (pyproject.toml reads it): keep it a plain literal.
__version__ = "0.1.0"
