"""The interpreters jailed code may run with: named when the service starts (`--python NAME=PATH`, e.g. a virtual
environment with BigCodeBench's libraries), chosen per request by name, never by a path from the request.

"default" is the service's own choice (/usr/bin/python3 unless `--python default=PATH` replaces it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

DEFAULT = "default"
DEFAULT_PATH = "/usr/bin/python3"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UnknownPython(ValueError):
    """A request named a python this service does not have."""


def parse_pythons(specs: Sequence[str]) -> dict[str, str]:
    """{"default": path, name: path, ...} from 'NAME=PATH' specs; ValueError names the spec and what is wrong."""
    pythons = {DEFAULT: DEFAULT_PATH}
    named: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--python {spec!r}: expected NAME=PATH, e.g. --python bcb=/opt/bcb-venv/bin/python")
        if not _NAME.match(name):
            raise ValueError(f"--python {spec!r}: the name must be 1-64 letters, digits, '_', '.' or '-'")
        if name in named:
            raise ValueError(f"--python {spec!r}: the name {name!r} is given twice")
        if not os.path.isabs(path):
            raise ValueError(f"--python {spec!r}: give the interpreter's absolute path")
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ValueError(f"--python {spec!r}: {path} is not an executable file")
        named.add(name)
        pythons[name] = path
    return pythons


def python_path(pythons: Mapping[str, str], name: str | None) -> str:
    """The interpreter a request names (None: the default); UnknownPython lists the names there are."""
    if name is None:
        return pythons[DEFAULT]
    if name not in pythons:
        raise UnknownPython(f"unknown python {name!r}; this service has {', '.join(sorted(pythons))} (GET /health)")
    return pythons[name]
