"""Definitions shared by the client and server halves of the protocol."""

from __future__ import annotations

import struct
from collections.abc import Callable

PROTOCOL = "flower-privacy-secagg/1"
# Slots appended to every masked vector after the model coordinates.
EXTRA_SLOTS = 2  # total weight, clipped values


class RefusedError(Exception):
    """An honest node refuses a server request; the message names the failed check."""


class ProtocolError(Exception):
    """The server cannot complete the round (too few shares, bad uploads, ...)."""


UnmaskRule = Callable[[list[int], list[int], list[int]], "str | None"]
"""``rule(survivors, dropped, cohort)`` returns why a node must refuse, or None."""


def context(run: bytes, *parts: int) -> bytes:
    """Bytes naming a run and some counters (round, node ids), for key derivation."""
    return run + b"".join(struct.pack("<Q", p) for p in parts)


def mask_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pairwise mask it shares with ``peer``, -1 if it subtracts it."""
    return 1 if own < peer else -1


def associated_data(kind: bytes, run: bytes, *parts: int) -> bytes:
    """Associated data binding a sealed share to its purpose, run, round and parties."""
    return kind + b"|" + context(run, *parts)
