"""Capture what a logger logs, as message strings, for the duration of a block."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def capture_log_lines(logger_name: str = "flwr") -> Iterator[list[str]]:
    """Yield a list that collects the messages ``logger_name`` logs until the block ends."""
    lines: list[str] = []
    handler = _Lines(lines)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
