"""Exceptions raised by flower-privacy on the server side."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flower_privacy.strategies.result import PrivacyResult


class FlowerPrivacyError(Exception):
    """Base class of every error flower-privacy raises on purpose."""


class RoundFailedError(FlowerPrivacyError):
    """One round produced no model; the reason says why.

    ``revealed``: the server saw the round's aggregate before it failed (a DP release
    all the same, to be charged).
    """

    def __init__(self, server_round: int, reason: str, *, revealed: bool = False) -> None:
        super().__init__(f"round {server_round} failed: {reason}")
        self.server_round = server_round
        self.reason = reason
        self.revealed = revealed


@contextmanager
def revealed_on_failure(server_round: int) -> Iterator[None]:
    """Whatever fails inside fails the round as revealed: the server has seen its sum."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever failed, the sum was seen
        reason = err.reason if isinstance(err, RoundFailedError) else repr(err)
        raise RoundFailedError(server_round, reason, revealed=True) from err


class RunHaltedError(FlowerPrivacyError):
    """The run cannot make progress; ``result`` holds everything up to the halt."""

    def __init__(self, message: str, result: PrivacyResult) -> None:
        super().__init__(message)
        self.result = result


class NotEnoughNodesError(FlowerPrivacyError):
    """Fewer nodes are connected than the strategy needs, after waiting."""
