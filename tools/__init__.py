"""Thin command-line entry points (python -m tools.<name>), wired to the library packages."""
