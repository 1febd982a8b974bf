"""Values that cross from the jail to the judge: the harness's tagged JSON (harness._encode) decoded into built-in
Python values, with bounds on depth and size, so that the judge only ever compares plain data.

What cannot be plain data arrives as an `Opaque` (an object of the solution's own class, say): it takes part in no
comparison (verdicts.py refuses it). What an iterator yielded arrives as `Yielded`: list(), set(), sorted() ...
read it, but, as an iterator, it equals nothing else.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 100
MAX_HASHED = 10_000  # set members and dict keys per answer: hashing crafted ints costs O(n^2)
MAX_INT_BITS = 1 << 17


class BadValue(Exception):
    """The encoding breaks the format (an unknown tag, an unhashable set member, a bound exceeded)."""


@dataclass(frozen=True, eq=False)
class Opaque:
    """A value that is not plain data: `type_name` and why it could not be converted."""

    type_name: str
    why: str

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


@dataclass(frozen=True, eq=False)
class Yielded:
    """The items an iterator (a generator, map(), a dict's values()) yielded: iterable, equal only to itself."""

    items: tuple

    def __iter__(self):
        return iter(self.items)

    def __repr__(self) -> str:
        return f"<iterator over {list(self.items)!r:.200}>"


class _Decoder:
    def __init__(self):
        self.hashed = 0

    def value(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise BadValue(f"nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            if isinstance(node, int) and not isinstance(node, bool) and node.bit_length() > MAX_INT_BITS:
                raise BadValue(f"an int of more than {MAX_INT_BITS} bits")
            return node
        if isinstance(node, list):
            return [self.value(item, depth + 1) for item in node]
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise BadValue("not a tagged value")
        tag, body = next(iter(node.items()))
        if tag == "O" and isinstance(body, str) and isinstance(node.get("why", ""), str):
            return Opaque(body[:200], str(node.get("why", ""))[:300])
        decoder = _TAGS.get(tag)
        if decoder is None or len(node) != 1:
            raise BadValue(f"unknown tag {tag!r}")
        return decoder(self, body, depth)

    def items(self, body: Any, depth: int) -> list:
        if not isinstance(body, list):
            raise BadValue("a tagged sequence without a list")
        return [self.value(item, depth + 1) for item in body]

    def hashable(self, count: int) -> None:
        self.hashed += count
        if self.hashed > MAX_HASHED:
            raise BadValue(f"more than {MAX_HASHED} set members and dict keys")

    def mapping(self, body: Any, depth: int) -> dict:
        pairs = self.items(body, depth)
        self.hashable(len(pairs))
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
            raise BadValue("a dict entry is not a [key, value] pair")
        try:
            return {key: value for key, value in pairs}
        except TypeError as e:
            raise BadValue(f"a dict key is unhashable: {e}") from None

    def members(self, body: Any, depth: int, kind: type) -> set | frozenset:
        items = self.items(body, depth)
        self.hashable(len(items))
        try:
            return kind(items)
        except TypeError as e:
            raise BadValue(f"a set member is unhashable: {e}") from None


def _float(decoder: _Decoder, body: Any, depth: int) -> float:
    if body not in ("nan", "inf", "-inf"):
        raise BadValue(f"not a float: {body!r:.50}")
    return float(body)


def _big_int(decoder: _Decoder, body: Any, depth: int) -> int:
    if not isinstance(body, str) or len(body) > MAX_INT_BITS // 4 + 2:
        raise BadValue("a big int that is too big")
    try:
        return int(body, 16)
    except ValueError:
        raise BadValue("a big int that is not hexadecimal") from None


def _bytes(decoder: _Decoder, body: Any, depth: int) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise BadValue("bytes that are not base64") from None


def _complex(decoder: _Decoder, body: Any, depth: int) -> complex:
    parts = decoder.items(body, depth)
    if len(parts) != 2 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
        raise BadValue("a complex number that is not [real, imag]")
    return complex(*parts)


def _range(decoder: _Decoder, body: Any, depth: int) -> range:
    if not (isinstance(body, list) and len(body) == 3 and all(type(x) is int for x in body) and body[2]):
        raise BadValue("a range that is not [start, stop, step]")
    if max(abs(x).bit_length() for x in body) > 64:
        raise BadValue("a range beyond 64-bit bounds")
    return range(*body)


_TAGS = {
    "T": lambda d, body, depth: tuple(d.items(body, depth)),
    "D": _Decoder.mapping,
    "S": lambda d, body, depth: d.members(body, depth, set),
    "Z": lambda d, body, depth: d.members(body, depth, frozenset),
    "B": _bytes,
    "C": _complex,
    "F": _float,
    "I": _big_int,
    "R": _range,
    "It": lambda d, body, depth: Yielded(tuple(d.items(body, depth))),
}


def decode(node: Any) -> Any:
    """A parsed answer value (channel.parse) as plain Python data; BadValue if it breaks the format."""
    try:
        return _Decoder().value(node, 0)
    except RecursionError:
        raise BadValue("nested too deeply") from None


def show(value: Any, limit: int = 200) -> str:
    """A short repr for messages (plain data's repr runs no solution code)."""
    try:
        text = repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"
    except (ValueError, RecursionError):  # an int beyond repr's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
