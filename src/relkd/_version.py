"""The package version (a leaf module: the run record reads it without importing relkd)."""

__version__ = "0.1.0"
