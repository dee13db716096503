"""The command line: thin wrappers that parse arguments and print results."""

from labctl.cli.app import app, main

__all__ = ["app", "main"]
