"""The installed eedn version (kept in step with pyproject.toml), importable from every room."""
__version__ = "0.1.0"
