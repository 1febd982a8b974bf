"""Paths inside a run directory, as requests name them (files to write in, files to fetch back).

Kept apart from the jail so that the wire models can check a path without depending on how runs are isolated.
"""

from __future__ import annotations

from pathlib import PurePosixPath

JAIL_HOME = "/sandbox"  # where the run directory appears inside the jail


def safe_relative_path(path: str) -> PurePosixPath:
    """A path inside the run directory ('x/y.txt' or '/sandbox/x/y.txt'); ValueError says what is wrong."""
    pure = PurePosixPath(path)
    if pure.is_absolute():
        if not pure.is_relative_to(JAIL_HOME):
            raise ValueError(f"absolute paths must lie under {JAIL_HOME}")
        pure = pure.relative_to(JAIL_HOME)
    if not pure.parts or any(part in ("..", ".") for part in pure.parts):
        raise ValueError("path must name a file inside the run directory, without '.' or '..' parts")
    return pure
