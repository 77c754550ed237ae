"""Reply triage: which training replies can be aggregated, and why the others cannot."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common import log

from flower_privacy.errors import RoundFailedError

Shapes = dict[str, tuple[tuple[int, ...], str]]


def shapes_of(arrays: ArrayRecord) -> Shapes:
    """Each array's shape and dtype, by key."""
    return {key: (tuple(arr.shape), str(arr.dtype)) for key, arr in arrays.items()}


def first_non_finite(arrays: ArrayRecord) -> str | None:
    """The key of the first floating array holding NaN or inf, or None."""
    for key, arr in arrays.items():
        values = arr.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return key
    return None


def reply_problem(reply: Message, expected: Shapes) -> str | None:
    """Why a training reply cannot be aggregated against the ``expected`` model, or None."""
    if reply.has_error():
        return f"error reply ({reply.error.reason})"
    records = list(reply.content.array_records.values())
    if len(records) != 1:
        return f"expected exactly one ArrayRecord, found {len(records)}"
    received = shapes_of(records[0])
    if expected and received != expected:
        missing = sorted(set(expected) - set(received))
        extra = sorted(set(received) - set(expected))
        wrong = sorted(
            key for key in set(received) & set(expected) if received[key] != expected[key]
        )
        return (
            "arrays do not match the global model "
            f"(missing {missing}, unexpected {extra}, wrong shape or dtype {wrong})"
        )
    bad = first_non_finite(records[0])
    if bad is not None:
        return f"array '{bad}' has NaN or inf values"
    return None


def log_silent_nodes(
    server_round: int, stage: str, asked: list[int], replies: list[Message]
) -> list[int]:
    """The nodes asked that did not reply, logged."""
    replied = {m.metadata.src_node_id for m in replies}
    silent = [node for node in asked if node not in replied]
    if silent:
        log(
            WARNING,
            "round %d: no %s reply from node(s) %s before the timeout (node down or too slow)",
            server_round,
            stage,
            silent,
        )
    return silent


def require_usable(
    server_round: int,
    usable_count: int,
    sent_to: list[int],
    problems: list[str],
    silent: list[int],
    minimum: int,
    what: str,
) -> None:
    """Raise :class:`RoundFailedError` if fewer than ``minimum`` ``what`` are usable."""
    if usable_count < minimum:
        detail = "; ".join(problems) if problems else "no errors reported"
        if silent:
            detail += f"; no reply from {len(silent)} node(s)"
        raise RoundFailedError(
            server_round,
            f"{usable_count} usable {what} of {len(sent_to)} requested, "
            f"at least {minimum} needed ({detail})",
        )
