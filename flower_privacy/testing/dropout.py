"""Dropouts for experiments: a seeded fraction of clients answers training with an error.

``ClientApp(mods=[dropout_mod, secagg_mod])`` with run config ``dropout-fraction`` (0 to
1) and ``dropout-seed``: in every round, each node drops with that probability, decided
by a hash of (seed, node, round), so a run is reproducible and the same node does not
always drop. A dropped node replies with an error at once (no sleep): the server sees
exactly what a lost node looks like after the timeout, without waiting for it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

from flwr.app import Context, Error, Message

from flower_privacy import _flwr_compat as compat

DROPOUT_FRACTION = "dropout-fraction"
DROPOUT_SEED = "dropout-seed"
DROPOUT_REASON = "simulated dropout (run config dropout-fraction)"


def drops(seed: int, node_id: int, server_round: int, fraction: float) -> bool:
    """Whether ``node_id`` drops in ``server_round`` (a keyed hash below ``fraction``)."""
    digest = hashlib.sha256(struct.pack("<qQq", seed, node_id % 2**64, server_round)).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def dropout_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Answer a seeded fraction of training requests (those carrying a model) with an error."""
    fraction = float(context.run_config.get(DROPOUT_FRACTION, 0.0))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"run config {DROPOUT_FRACTION} must be in [0, 1], got {fraction}")
    if fraction == 0.0 or msg.metadata.message_type != "train" or not msg.has_content():
        return call_next(msg, context)
    if not msg.content.array_records:  # a protocol stage without a model: not training
        return call_next(msg, context)
    server_round = next(
        (
            int(r["server-round"])
            for r in msg.content.config_records.values()
            if "server-round" in r
        ),
        0,
    )
    seed = int(context.run_config.get(DROPOUT_SEED, 0))
    if drops(seed, context.node_id, server_round, fraction):
        return Message(
            Error(code=compat.ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=DROPOUT_REASON),
            reply_to=msg,
        )
    return call_next(msg, context)
