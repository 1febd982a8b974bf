"""Reading what a jail writes on its channel: lines of bounded size, JSON of bounded depth, big documents parsed
off the event loop. Whatever arrives, the only exception that leaves this module is `Malformed`, which the reader
turns into that run's failure (a test's Error, a workflow's failure kind), never into an error of the service.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

INLINE_BYTES = 64 << 10  # documents larger than this are parsed in a worker thread


class Malformed(Exception):
    """What the jail wrote is not what the protocol allows (too long, too deep, not JSON, cut short)."""


def parse(data: bytes, max_depth: int) -> Any:
    """JSON text -> a value at most `max_depth` containers deep; Malformed otherwise."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError, MemoryError) as e:
        raise Malformed(f"not JSON ({type(e).__name__})") from None
    pending = [(value, 0)]
    while pending:  # iteratively: a depth check must not recurse itself
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            if depth >= max_depth:
                raise Malformed(f"nested deeper than {max_depth} levels")
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


async def parse_off_loop(data: bytes, max_depth: int) -> Any:
    """`parse`, in a worker thread when the document is large (a 1 MiB document takes milliseconds)."""
    if len(data) <= INLINE_BYTES:
        return parse(data, max_depth)
    return await asyncio.to_thread(parse, data, max_depth)


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line without its newline (at most the reader's limit), or None at the end of the stream."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise Malformed("the stream ended in the middle of a line") from None
        return None
    except asyncio.LimitOverrunError:
        raise Malformed(f"a line is longer than {reader._limit} bytes") from None  # noqa: SLF001 - set by us
    except (ConnectionError, OSError) as e:
        raise Malformed(f"the channel failed: {e}") from None
    return line[:-1]


async def read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise Malformed(f"the stream ended before the {size} bytes announced") from None
    except (ConnectionError, OSError) as e:
        raise Malformed(f"the channel failed: {e}") from None
