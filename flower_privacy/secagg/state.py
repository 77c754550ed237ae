"""What a node keeps between messages: its long-term key and at most two rounds' secrets.

Per-round secrets (the masking key pair, the self-mask seed and the shares a node holds
for its neighbours) live only until the round is unmasked; a node's state is O(degree).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from flower_privacy.secagg import signing


@dataclass(frozen=True)
class Identity:
    """A node's signing key and the signing keys it trusts (the roster).

    A node with an identity signs its long-term key, seals shares only to neighbours
    whose keys are signed under roster keys, and unmasks only after the consistency check.
    """

    signing_key: bytes
    trusted: frozenset[bytes]

    def __post_init__(self) -> None:
        if signing.signing_public_key(self.signing_key) not in self.trusted:
            raise ValueError("this node's own signing key is not in the roster it trusts")


@dataclass
class RoundSecrets:
    """One round as a node sees it, from prepare to unmask."""

    round: int
    cohort: list[int]
    degree: int
    threshold: int
    graph_seed: bytes
    neighbours: list[int]
    seal_keys: dict[int, bytes]  # per-neighbour package keys (from the long-term keys)
    mask_key: bytes  # this round's X25519 private key
    self_seed: bytes
    min_survivors: int
    groups: list[list[int]]
    prepared: list[int] = field(default_factory=list)  # the cohort that prepared
    tag_keys: dict[int, bytes] = field(default_factory=dict)  # per-neighbour view-tag MAC keys
    held: dict[int, list[bytes]] = field(default_factory=dict)  # owner -> [sk, b] shares
    view: bytes = b""
    uploaded: bool = False
    signed: bytes = b""  # the round view this node signed (consistency check)
    answered: bool = False

    def live_neighbours(self, survivors: list[int]) -> list[int]:
        alive = set(survivors)
        return [v for v in self.neighbours if v in alive]

    def forget_own_secrets(self) -> None:
        """After uploading, this node's own round secrets are never used again: drop them.

        What the held shares protect is then only in the neighbours' hands.
        """
        self.mask_key = self.self_seed = b""
        self.seal_keys = {}

    def forget_secrets(self) -> None:
        """After unmasking nothing of this round is needed again: drop it."""
        self.mask_key = self.self_seed = b""
        self.held, self.seal_keys, self.tag_keys = {}, {}, {}


@dataclass
class ClientState:
    """Everything a node keeps (one Flower run: a new ``context.state`` starts afresh)."""

    node_id: int
    lt_key: bytes = b""  # this protocol run's X25519 key: seals and authenticates, never shared
    nonce: bytes = b""  # the protocol run the server advertised
    old_nonces: list[bytes] = field(default_factory=list)  # ended runs: never again
    rounds: dict[int, RoundSecrets] = field(default_factory=dict)
    last_prepared: int = 0
    group_seed: bytes = b""  # groups are fixed for the whole Flower run
    generations: list[list[int]] = field(default_factory=list)
    group_size: int = 0
    signers: dict[int, bytes] = field(default_factory=dict)  # node -> signing key
    participated: bool = False  # took part in secure aggregation in this Flower run

    def to_bytes(self) -> bytes:
        # Shallow copies: dataclasses.asdict would deep-copy every id list (O(n) per call).
        data = {k: _hexify(v) for k, v in vars(self).items() if k != "rounds"}
        data["rounds"] = {str(r): _round_to_json(s) for r, s in self.rounds.items()}
        return json.dumps(data).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientState:
        data = json.loads(raw)
        return cls(
            node_id=int(data["node_id"]),
            lt_key=bytes.fromhex(data["lt_key"]),
            nonce=bytes.fromhex(data["nonce"]),
            old_nonces=[bytes.fromhex(n) for n in data["old_nonces"]],
            rounds={int(r): _round_from_json(s) for r, s in data["rounds"].items()},
            last_prepared=int(data["last_prepared"]),
            group_seed=bytes.fromhex(data["group_seed"]),
            generations=data["generations"],
            group_size=int(data["group_size"]),
            signers={int(k): bytes.fromhex(v) for k, v in data["signers"].items()},
            participated=bool(data["participated"]),
        )


_BYTES_FIELDS = ("graph_seed", "mask_key", "self_seed", "view", "signed")


def _round_to_json(secrets: RoundSecrets) -> dict:
    data = dict(vars(secrets))
    for name in _BYTES_FIELDS:
        data[name] = data[name].hex()
    data["seal_keys"] = {str(k): v.hex() for k, v in secrets.seal_keys.items()}
    data["tag_keys"] = {str(k): v.hex() for k, v in secrets.tag_keys.items()}
    data["held"] = {str(k): [s.hex() for s in v] for k, v in secrets.held.items()}
    return data


def _round_from_json(data: dict) -> RoundSecrets:
    for name in _BYTES_FIELDS:
        data[name] = bytes.fromhex(data[name])
    data["seal_keys"] = {int(k): bytes.fromhex(v) for k, v in data["seal_keys"].items()}
    data["tag_keys"] = {int(k): bytes.fromhex(v) for k, v in data["tag_keys"].items()}
    data["held"] = {int(k): [bytes.fromhex(s) for s in v] for k, v in data["held"].items()}
    return RoundSecrets(**data)


def _hexify(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _hexify(v) for k, v in value.items()}
    if isinstance(value, list):
        if all(type(v) is int for v in value):
            return value  # id lists (generations, cohorts): nothing to convert
        return [_hexify(v) for v in value]
    return value
