"""How encrypted FedAvg travels in Flower messages (shared by strategy and mod).

The encrypted model replaces the plaintext one inside the message's ``arrays`` record,
as one raw :class:`~flwr.app.Array` under :data:`CIPHERTEXT` (raw arrays travel in
5 MiB chunks and never become numpy on the way). A ConfigRecord under :data:`RECORD`
marks the message and carries the declared limits and the record keys.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from flower_privacy.he import DeclaredLimits

RECORD = "he"
CIPHERTEXT = "he-ciphertext"
STAGE = "stage"
GLOBAL, UPDATE = "global", "update"
# Node config (or run config) key naming the client's secret context file.
NODE_CONTEXT = "he-context"
MOD_NAME = "flower_privacy.mods.encryption_mod"
# Starts the reason of every refusal the mod sends (the server matches it).
REFUSED = f"{MOD_NAME} refused"


def configured_context_path(context: Context) -> str | None:
    """Node config :data:`NODE_CONTEXT`, else run config :data:`NODE_CONTEXT`, or None."""
    path = context.node_config.get(NODE_CONTEXT) or context.run_config.get(NODE_CONTEXT)
    return str(path) if path else None


def ciphertext_record(blob: bytes) -> ArrayRecord:
    """An ArrayRecord holding one envelope as a raw array."""
    return ArrayRecord(
        {CIPHERTEXT: Array(dtype="uint8", shape=(len(blob),), stype="raw", data=blob)}
    )


def ciphertext_of(record: ArrayRecord) -> bytes | None:
    """The envelope bytes in ``record``, or None if it holds anything else."""
    if list(record.keys()) != [CIPHERTEXT]:
        return None
    return bytes(record[CIPHERTEXT].data)


def request_record(arrays_key: str, weight_key: str, limits: DeclaredLimits) -> ConfigRecord:
    """What the server tells clients with the encrypted global model."""
    return ConfigRecord(
        {
            STAGE: GLOBAL,
            "arrays-key": arrays_key,
            "weight-key": weight_key,
            **{f"limit-{k}": v for k, v in limits.to_dict().items()},
        }
    )


def parse_request(record: ConfigRecord) -> tuple[str, str, DeclaredLimits]:
    """``(arrays_key, weight_key, limits)`` from :func:`request_record` output."""
    limits = {k[len("limit-") :]: v for k, v in record.items() if k.startswith("limit-")}
    return str(record["arrays-key"]), str(record["weight-key"]), DeclaredLimits.from_dict(limits)


def update_content(arrays_key: str, blob: bytes) -> RecordDict:
    """A client's reply: the encrypted update and nothing else."""
    return RecordDict({RECORD: ConfigRecord({STAGE: UPDATE}), arrays_key: ciphertext_record(blob)})


def stage_of(content: RecordDict) -> str | None:
    """The encrypted-FedAvg stage a message carries, or None."""
    record = content.config_records.get(RECORD)
    return None if record is None else str(record.get(STAGE, ""))
