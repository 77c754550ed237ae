"""One canonical byte encoding for everything that is hashed, MACed or signed.

Two parties that hold equal values always produce equal bytes, and different values
(including the same numbers under another type, dtype or shape) never do: every item
is tagged with its type; scalars and arrays carry their byte length, containers their
item count, so every item is self-delimiting; dict keys are sorted; arrays carry their
dtype and shape. The encoding is written piece by piece, so :func:`digest` hashes a
large model without copying it. No Flower here: the mod turns records into values.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np

_LEN = struct.Struct("<Q")


def _write(value: object, out: Callable[[bytes | memoryview], object]) -> None:
    kind = type(value)
    # Exact int, bytes and str first (most of what is hashed): the same bytes as below.
    if kind is int:
        body = str(value).encode()
        out(b"i" + _LEN.pack(len(body)) + body)
    elif kind is bytes:
        out(b"b" + _LEN.pack(len(value)))  # type: ignore[arg-type]
        out(value)  # type: ignore[arg-type]  # apart: a large value is not copied
    elif kind is str:
        body = value.encode("utf-8")  # type: ignore[attr-defined]
        out(b"s" + _LEN.pack(len(body)) + body)
    elif value is None:
        out(b"N")
    elif isinstance(value, bool | np.bool_):
        out(b"T" if value else b"F")
    elif isinstance(value, int | np.integer):
        body = str(int(value)).encode()
        out(b"i" + _LEN.pack(len(body)) + body)
    elif isinstance(value, float | np.floating):
        out(b"f" + _LEN.pack(8) + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        body = value.encode("utf-8")
        out(b"s" + _LEN.pack(len(body)) + body)
    elif isinstance(value, bytes | bytearray | memoryview):
        out(b"b" + _LEN.pack(len(value)))
        out(value)
    elif isinstance(value, np.ndarray):
        dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        array = value.astype(dtype, order="C", copy=False)  # keeps 0-d arrays 0-d
        out(b"a")
        _write([dtype.str, list(array.shape)], out)
        out(_LEN.pack(array.nbytes))
        out(memoryview(array.reshape(-1)).cast("B"))
    elif isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("canonical dict keys must be strings")
        out(b"d" + _LEN.pack(len(keys)))
        for key in sorted(keys):
            _write(key, out)
            _write(value[key], out)
    elif isinstance(value, Sequence):
        out(b"l" + _LEN.pack(len(value)))
        for item in value:
            _write(item, out)
    else:
        raise TypeError(f"no canonical encoding for {type(value).__name__}")


def encode(value: object) -> bytes:
    """The canonical bytes of ``value`` (None, bool, int, float, str, bytes, list, dict, array)."""
    parts: list[bytes] = []
    _write(value, lambda piece: parts.append(bytes(piece)))
    return b"".join(parts)


def digest(domain: str, value: object) -> bytes:
    """SHA-256 of ``value``'s canonical bytes, separated by ``domain`` (a purpose label)."""
    hasher = hashlib.sha256()
    _write(domain, hasher.update)
    _write(value, hasher.update)
    return hasher.digest()


class PrefixDigest:
    """:func:`digest` of ``domain`` and ``head + tail`` for many tails: the head hashed once.

    A list's encoding is its item count, then its items in order, so hashing the common
    head once and copying the hash state gives the same digest as hashing each list whole.
    """

    def __init__(self, domain: str, head: Sequence, tail_items: int) -> None:
        self._hasher = hashlib.sha256()
        _write(domain, self._hasher.update)
        self._hasher.update(b"l" + _LEN.pack(len(head) + tail_items))
        for item in head:
            _write(item, self._hasher.update)
        self._tail_items = tail_items

    def digest(self, *tail: object) -> bytes:
        if len(tail) != self._tail_items:
            raise ValueError(f"expected {self._tail_items} tail items, got {len(tail)}")
        hasher = self._hasher.copy()
        for item in tail:
            _write(item, hasher.update)
        return hasher.digest()
