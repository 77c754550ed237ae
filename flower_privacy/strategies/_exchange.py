"""One push-and-pull over the grid, timed: every exchange's duration is in the log."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

# The ServerApp log line benchmarks read to split a round into its exchanges.
EXCHANGE_LOG = "exchange-seconds"


def send_and_receive(
    grid: Grid, messages: list[Message], timeout: float, server_round: int, what: str
) -> list[Message]:
    """``grid.send_and_receive`` of ``messages``; logs how long it took and what came back."""
    started = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    log(
        INFO,
        "%s round=%d what=%s messages=%d replies=%d seconds=%.3f",
        EXCHANGE_LOG,
        server_round,
        what,
        len(messages),
        len(replies),
        time.perf_counter() - started,
    )
    return replies
