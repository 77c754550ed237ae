"""How secure aggregation stages travel in Flower messages (shared by strategy and mod).

Stages ride in ``train`` messages holding a ConfigRecord under :data:`RECORD`: a
ClientApp dispatches on message type before any mod runs, so a ``train`` message is
the one kind that reaches an app-wide ``secagg_mod`` in every app that trains.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

RECORD = "secagg"
STAGE = "stage"
ADVERTISE, DISTRIBUTE, TRAIN, UPLOAD = "advertise", "distribute", "train", "upload"
CONSISTENCY, UNMASK = "consistency", "unmask"
# Node config keys (file paths) that give a node its signing key and trusted roster.
NODE_SIGNING_KEY, NODE_ROSTER = "secagg-signing-key", "secagg-roster"
MOD_NAME = "flower_privacy.mods.secagg_mod"


def to_record(stage: str, payload: dict) -> ConfigRecord:
    """A protocol dict as a ConfigRecord (values: ints, floats, str, bytes, lists)."""
    return ConfigRecord({STAGE: stage, **payload})


def stage_of(content: RecordDict) -> str | None:
    """The secure aggregation stage a message carries, or None."""
    record = content.config_records.get(RECORD)
    return None if record is None else str(record.get(STAGE, ""))


def payload_of(content: RecordDict) -> dict:
    """The protocol dict of a message (its stage removed)."""
    return {k: v for k, v in content.config_records[RECORD].items() if k != STAGE}
