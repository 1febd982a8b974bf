"""What an offline W&B run recorded, read from its run-<id>.wandb file: wandb 0.31 ships no Python reader of its
own (wandb-core writes the file). The file is LevelDB's log format with W&B's 7-byte header (":W&B", 0xBEE1,
version 0): 32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) that join into
protobuf `Record`s."""

from __future__ import annotations

import json
import pathlib
import struct
import time
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = struct.Struct("<IHB")  # crc32c, length, chunk type
FILE_HEADER = (b":W&B", 0xBEE1, 0)


def records(path: pathlib.Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == FILE_HEADER, f"{path} is not a W&B datastore file"
    found, pos, joined = [], 7, b""
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        joined += data[pos + HEADER.size : pos + HEADER.size + length]
        pos += HEADER.size + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(joined)
            found.append(record)
            joined = b""
    return found


def run_file(run_dir: pathlib.Path, run_id: str) -> pathlib.Path:
    """The newest offline run-<id>.wandb under <run_dir>/wandb (a resumed run writes another)."""
    return sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))[-1]


def history(path: pathlib.Path) -> list[dict[str, Any]]:
    """Each wandb.log call's values, wandb's own keys (_step, _runtime, _timestamp) left out."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def written_history(path: pathlib.Path, rows: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """`history(path)` once it holds `rows` rows. In the process that logged them, run.finish() returns before
    wandb-core has flushed the file: it tells the service the run is over without waiting (wandb_run.py,
    inform_finish), and the service closes the file afterwards (at interpreter exit wandb waits for it). Until then
    the file may end inside a record."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = history(path)
        except (AssertionError, DecodeError):  # the header or the last record not written whole yet
            found = []
        if len(found) >= rows or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def config(path: pathlib.Path) -> dict[str, Any]:
    """The run's config as wandb.init received it (wandb's own `_wandb` key left out)."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            items = {u.key: json.loads(u.value_json) for u in r.run.config.update}
            return {k: v for k, v in items.items() if k != "_wandb"}
    raise AssertionError(f"{path} has no run record")
