"""The `speckv` command line."""

from speckv.cli.main import main

__all__ = ["main"]
