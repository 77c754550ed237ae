"""How secure aggregation stages travel in Flower messages (shared by strategy and mod).

Stages ride in ``train`` messages, one ConfigRecord per stage named ``secagg.<stage>``:
a ClientApp dispatches on message type before any mod runs, so a ``train`` message is
the one kind that reaches an app-wide ``secagg_mod`` in every app that trains. One
message may carry several stages (the unmask of round r with the prepare of round
r + 1), so that secure aggregation adds one exchange per round in steady state.
A stage's reply is its payload or a structured refusal (:data:`REFUSED` code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict

from flower_privacy.secagg import canonical

PREFIX = "secagg."
ADVERTISE, PREPARE, TRAIN, UPLOAD = "advertise", "prepare", "train", "upload"
CONSISTENCY, UNMASK = "consistency", "unmask"
# Order in which a node handles the stages of one message: finish round r first.
ORDER = (UNMASK, CONSISTENCY, ADVERTISE, PREPARE, TRAIN)
REPLY_STAGE = {TRAIN: UPLOAD}
REFUSED, DETAIL = "refused", "detail"
# Not a stage: how the node encodes its update, beside the train stage (read by the mod).
MASKING = "masking"
# Node config keys (file paths) that give a node its signing key and trusted roster.
NODE_SIGNING_KEY, NODE_ROSTER = "secagg-signing-key", "secagg-roster"
MOD_NAME = "flower_privacy.mods.secagg_mod"
# Metrics of each securely aggregated round (counts the server learns anyway).
METRIC_CLIENTS = "secagg-clients"  # survivors summed
METRIC_DROPPED = "secagg-dropped"
METRIC_EXCLUDED = "secagg-excluded"  # uploaded, left out with an incomplete group
METRIC_CLIPPED = "secagg-clipped"  # clipped coordinates, summed inside the masks
METRIC_PRIVACY_T = "secagg-privacy-t"  # the participation audit's T so far


# Server side only: what an outer layer (client-level DP) asks of the secure sum, as
# keys of the train config it passes down; taken out before the inner strategy sees it.
SUM_PREFIX = "secagg.sum."


@dataclass(frozen=True)
class SumSettings:
    """One round's request of an outer layer to secure aggregation: how clients encode.

    ``encoding``: the clients' encoding in place of the fixed-point quantiser, as
    ``DistributedNoiseEncoding.request_fields()``. The layer that asks for it releases
    the sum itself (``SecureAggregation.aggregate_sum``, then ``step``).
    """

    encoding: dict = field(default_factory=dict)

    def put(self, config: ConfigRecord) -> ConfigRecord:
        """``config`` plus these settings (a new record); refuses to overwrite any."""
        taken = sorted(k for k in config if k.startswith(SUM_PREFIX))
        if taken:
            raise ValueError(f"the train config already holds secure-sum settings {taken}")
        out = ConfigRecord(dict(config.items()))
        for key, value in self.encoding.items():
            out[SUM_PREFIX + key] = value
        return out

    @classmethod
    def take(cls, config: ConfigRecord) -> tuple[ConfigRecord, SumSettings]:
        """(``config`` without the settings, the settings)."""
        rest = {k: v for k, v in config.items() if not k.startswith(SUM_PREFIX)}
        encoding = {k[len(SUM_PREFIX) :]: v for k, v in config.items() if k.startswith(SUM_PREFIX)}
        return ConfigRecord(rest), cls(encoding)


def stages_of(content: RecordDict) -> list[str]:
    """The secure aggregation stages a message carries (possibly none)."""
    names = [name[len(PREFIX) :] for name in content.config_records if name.startswith(PREFIX)]
    return [name for name in names if name != MASKING]


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


def content_digest(
    content: RecordDict, run_config: dict | None = None, masking: dict | None = None
) -> bytes:
    """Canonical digest of what a training message tells a node to do, and its run config.

    ``masking`` (the :data:`MASKING` payload: clip range, weights, DP noise) enters too:
    encoding settings shown to one node only would let its update dominate the sum.

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
        "masking": dict(masking or {}),
    }
    return canonical.digest("train-content", value)


@dataclass(frozen=True)
class Masking:
    """How a node encodes its update for masking: keys, weighting and the encoder's limits."""

    arrays_key: str
    weight_key: str
    weighting: str
    clip_range: float
    max_weight: int
    max_clients: int
    word_bits: int
    dp: dict = field(default_factory=dict)  # DistributedNoiseEncoding.request_fields()

    def to_payload(self) -> dict:
        return {
            "arrays-key": self.arrays_key,
            "weight-key": self.weight_key,
            "weighting": self.weighting,
            "clip-range": self.clip_range,
            "max-weight": self.max_weight,
            "max-clients": self.max_clients,
            "word-bits": self.word_bits,
            **self.dp,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> Masking:
        """Raise ``ValueError`` naming a missing field."""
        try:
            return cls(
                arrays_key=str(payload["arrays-key"]),
                weight_key=str(payload["weight-key"]),
                weighting=str(payload["weighting"]),
                clip_range=float(payload["clip-range"]),
                max_weight=int(payload["max-weight"]),
                max_clients=int(payload["max-clients"]),
                word_bits=int(payload["word-bits"]),
                dp={k: v for k, v in payload.items() if k == "encoding" or k.startswith("dp-")},
            )
        except KeyError as err:
            raise ValueError(f"the masking record lacks {err.args[0]!r}") from None
