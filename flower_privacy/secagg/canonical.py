"""One canonical byte encoding for everything that is hashed, MACed or signed.

Two parties that hold equal values always produce equal bytes, and different values
(including the same numbers under another type, dtype or shape) never do: every item
is tagged with its type and length-prefixed, dict keys are sorted, arrays carry their
dtype and shape. No Flower here: the mod turns Flower records into these values.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

import numpy as np

_LEN = struct.Struct("<Q")


def _frame(tag: bytes, body: bytes) -> bytes:
    return tag + _LEN.pack(len(body)) + body


def encode(value: object) -> bytes:
    """The canonical bytes of ``value`` (None, bool, int, float, str, bytes, list, dict, array)."""
    if value is None:
        return b"N"
    if isinstance(value, bool | np.bool_):
        return b"T" if value else b"F"
    if isinstance(value, int | np.integer):
        return _frame(b"i", str(int(value)).encode())
    if isinstance(value, float | np.floating):
        return _frame(b"f", struct.pack("<d", float(value)))
    if isinstance(value, str):
        return _frame(b"s", value.encode("utf-8"))
    if isinstance(value, bytes | bytearray | memoryview):
        return _frame(b"b", bytes(value))
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        header = encode([dtype.str, list(array.shape)])
        return _frame(b"a", header + array.astype(dtype, copy=False).tobytes())
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("canonical dict keys must be strings")
        body = b"".join(encode(k) + encode(value[k]) for k in sorted(keys))
        return _frame(b"d", _LEN.pack(len(keys)) + body)
    if isinstance(value, Sequence):
        return _frame(b"l", _LEN.pack(len(value)) + b"".join(encode(v) for v in value))
    raise TypeError(f"no canonical encoding for {type(value).__name__}")


def digest(domain: str, value: object) -> bytes:
    """SHA-256 of ``value``'s canonical bytes, separated by ``domain`` (a purpose label)."""
    return hashlib.sha256(encode(domain) + encode(value)).digest()
