"""JSONL files: one JSON object per line, read with the line that breaks named, written atomically."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped); a missing file or a broken line raises naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
    return records


def write_jsonl(path: str | os.PathLike, objects: Sequence[dict]) -> None:
    """Write all lines to a temporary file, then rename it over `path`: a reader never sees half a file."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
    partial.replace(path)
