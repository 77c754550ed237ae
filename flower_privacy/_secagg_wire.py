"""How secure aggregation stages travel in Flower messages (shared by strategy and mod).

Stages ride in ``train`` messages, one ConfigRecord per stage named ``secagg.<stage>``:
a ClientApp dispatches on message type before any mod runs, so a ``train`` message is
the one kind that reaches an app-wide ``secagg_mod`` in every app that trains. One
message may carry several stages (the unmask of round r with the prepare of round
r + 1), so that secure aggregation adds one exchange per round in steady state.
A stage's reply is its payload or a structured refusal (:data:`REFUSED` code).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from flower_privacy.secagg import canonical

PREFIX = "secagg."
ADVERTISE, PREPARE, TRAIN, UPLOAD = "advertise", "prepare", "train", "upload"
CONSISTENCY, UNMASK = "consistency", "unmask"
# Order in which a node handles the stages of one message: finish round r first.
ORDER = (UNMASK, CONSISTENCY, ADVERTISE, PREPARE, TRAIN)
REPLY_STAGE = {TRAIN: UPLOAD}
REFUSED, DETAIL = "refused", "detail"
# Node config keys (file paths) that give a node its signing key and trusted roster.
NODE_SIGNING_KEY, NODE_ROSTER = "secagg-signing-key", "secagg-roster"
MOD_NAME = "flower_privacy.mods.secagg_mod"


def stages_of(content: RecordDict) -> list[str]:
    """The secure aggregation stages a message carries (possibly none)."""
    return [name[len(PREFIX) :] for name in content.config_records if name.startswith(PREFIX)]


def payload_of(content: RecordDict, stage: str) -> dict:
    """The protocol dict of one stage of a message."""
    return dict(content.config_records[PREFIX + stage].items())


def put(content: RecordDict, stage: str, payload: dict) -> None:
    """Add one stage's payload to ``content``."""
    content[PREFIX + stage] = ConfigRecord(payload)


def without_stages(content: RecordDict) -> RecordDict:
    """``content`` with every secure aggregation record removed (what the app sees)."""
    return RecordDict({k: v for k, v in content.items() if not k.startswith(PREFIX)})


def refusal_of(payload: dict) -> tuple[str, str] | None:
    """(code, detail) if a reply payload is a structured refusal, else None."""
    if REFUSED not in payload:
        return None
    return str(payload[REFUSED]), str(payload.get(DETAIL, ""))


def content_digest(content: RecordDict, run_config: dict | None = None) -> bytes:
    """Canonical digest of what a training message tells a node to do, and its run config.

    Arrays enter with their dtype, shape and bytes; configs and metrics with their typed
    values. Two nodes holding different models, configs or run configs get different
    digests, so their pairwise masks do not cancel and their view tags do not verify.
    """
    value = {
        "arrays": {
            name: {key: array.numpy() for key, array in record.items()}
            for name, record in content.array_records.items()
        },
        "configs": {
            name: dict(record.items())
            for name, record in content.config_records.items()
            if not name.startswith(PREFIX)
        },
        "metrics": {name: dict(record.items()) for name, record in content.metric_records.items()},
        "run-config": dict(run_config or {}),
    }
    return canonical.digest("train-content", value)
