"""Client side of client-level DP with client-side clipping: a ClientApp mod.

``ClientApp(mods=[client_clipping_mod])`` with ``ClientLevelDP(..., placement="client")``
on the server. The app trains as usual; the mod replaces its weights by the global
weights plus the update clipped (all arrays together) to the L2 norm the server sent,
and reports whether the update fitted under it (for adaptive clipping). With secure
aggregation put it inside: ``ClientApp(mods=[secagg_mod, client_clipping_mod])``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from flower_privacy import _flwr_compat as compat
from flower_privacy._arrays import add_flat
from flower_privacy.dp.clipping import clip_l2
from flower_privacy.wire import dp as wire


def client_clipping_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Clip the app's model update to the server's ``dp-clip-norm`` before it leaves."""
    if msg.metadata.message_type.split(".")[0] != "train" or not msg.has_content():
        return call_next(msg, context)
    config = msg.content.config_records.get("config")
    if config is None or wire.CLIP_NORM not in config:
        # Not a client-level DP round (or DP with server-side clipping): nothing to do.
        return call_next(msg, context)
    try:
        clip_norm = float(config[wire.CLIP_NORM])
        global_arrays = _single_arrays(msg.content, "the server's message")
    except ValueError as err:
        return _error(msg, str(err))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        local = _single_arrays(reply.content, "the app's reply")
        clipped, unclipped = _clip_update(global_arrays, local, clip_norm)
    except ValueError as err:
        return _error(msg, str(err))
    content = RecordDict()
    for key, record in reply.content.items():
        content[key] = clipped if isinstance(record, ArrayRecord) else record
    metrics = [r for r in content.metric_records.values()]
    if metrics:
        metrics[0][wire.UNCLIPPED] = int(unclipped)
    else:
        content["metrics"] = MetricRecord({wire.UNCLIPPED: int(unclipped)})
    return Message(content, reply_to=msg)


def _single_arrays(content: RecordDict, where: str) -> ArrayRecord:
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"{where} holds {len(records)} ArrayRecords, expected 1")
    return records[0]


def _clip_update(
    global_arrays: ArrayRecord, local: ArrayRecord, clip_norm: float
) -> tuple[ArrayRecord, bool]:
    if list(local.keys()) != list(global_arrays.keys()):
        raise ValueError(
            f"the app's arrays {list(local.keys())} differ from the model's "
            f"{list(global_arrays.keys())}"
        )
    before = [global_arrays[k].numpy() for k in global_arrays.keys()]
    after = [local[k].numpy() for k in global_arrays.keys()]
    for key, b, a in zip(global_arrays.keys(), before, after, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"array {key!r} has shape {a.shape}, expected {b.shape}")
    delta = np.concatenate(
        [
            np.subtract(a, b, dtype=np.float64).reshape(-1)
            for a, b in zip(after, before, strict=True)
        ]
    )
    clipped, was_clipped = clip_l2(delta, clip_norm)
    return add_flat(global_arrays, clipped), not was_clipped


def _error(msg: Message, reason: str) -> Message:
    return Message(
        Error(code=compat.ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{wire.MOD_NAME}: {reason}"),
        reply_to=msg,
    )
