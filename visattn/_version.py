"""The package version, one place (``visattn.__version__``, written into every checkpoint)."""

__version__ = "0.1.0"
