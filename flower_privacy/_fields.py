"""Reading a record that a peer or a file supplied: a missing field is a ``ValueError``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def required_fields(record: str) -> Iterator[None]:
    """Inside, a ``KeyError`` becomes ``ValueError("<record> lacks '<key>'")``.

    Callers refuse bad input with ValueError; a KeyError would read as a bug of ours.
    """
    try:
        yield
    except KeyError as err:
        raise ValueError(f"{record} lacks {err.args[0]!r}") from None
