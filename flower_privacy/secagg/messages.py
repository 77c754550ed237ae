"""Typed protocol messages: every field of every stage defined once, for both sides.

Each message is a frozen dataclass; :meth:`Msg.to_dict` gives the plain dict a
transport carries (field ``graph_seed`` travels as ``graph-seed``) and
:meth:`Msg.parse` checks a received dict field by field (presence, type, no extras),
raising :class:`MessageError` naming the field. Requests carry the protocol version;
a mismatch is refused before anything else is read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import ClassVar

from flower_privacy.secagg._common import PROTOCOL


class MessageError(ValueError):
    """A received message lacks a field, has a field of the wrong type, or an extra one."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: object) -> bool:
    if not isinstance(value, list):
        return False
    # Exact types first (one pass in C); subclasses then take the slow path.
    return set(map(type, value)) <= {int} or all(_is_int(v) for v in value)


def _is_bytes_list(value: object) -> bool:
    if not isinstance(value, list):
        return False
    return set(map(type, value)) <= {bytes} or all(isinstance(v, bytes) for v in value)


_CHECKS: dict[str, Callable[[object], bool]] = {
    "int": _is_int,
    "bytes": lambda value: isinstance(value, bytes),
    "str": lambda value: isinstance(value, str),
    "list[int]": _is_int_list,
    "list[bytes]": _is_bytes_list,
}


def _key(name: str) -> str:
    """The wire name of a field: ``graph_seed`` -> ``graph-seed``, ``from_`` -> ``from``."""
    return name.rstrip("_").replace("_", "-")


@dataclass(frozen=True)
class Msg:
    """Base of every protocol message."""

    KIND: ClassVar[str] = "message"

    def to_dict(self) -> dict:
        return {key: getattr(self, f.name) for key, (f, _) in _wire_fields(type(self)).items()}

    @classmethod
    def parse(cls, data: dict) -> Msg:
        names = _wire_fields(cls)
        extra = sorted(set(data) - set(names))
        if extra:
            raise MessageError(f"{cls.KIND}: unexpected fields {extra}")
        values = {}
        for key, (f, check) in names.items():
            if key not in data:
                if f.default is not MISSING:
                    values[f.name] = f.default
                elif f.default_factory is not MISSING:
                    values[f.name] = f.default_factory()
                else:
                    raise MessageError(f"{cls.KIND}: field {key!r} is missing")
                continue
            value = list(data[key]) if isinstance(data[key], tuple) else data[key]
            if not check(value):
                raise MessageError(f"{cls.KIND}: field {key!r} is not {f.type}")
            values[f.name] = value
        return cls(**values)


@functools.cache
def _wire_fields(cls: type[Msg]) -> dict[str, tuple[Field, Callable[[object], bool]]]:
    """A message class's fields by wire name, each with its type check (once per class)."""
    table = {}
    for f in fields(cls):
        if str(f.type) not in _CHECKS:
            raise TypeError(f"unsupported field type {f.type}")
        table[_key(f.name)] = (f, _CHECKS[str(f.type)])
    return table


@dataclass(frozen=True)
class Request(Msg):
    """A server request: it names the protocol version and the protocol run."""

    protocol: str
    nonce: bytes

    @classmethod
    def parse(cls, data: dict) -> Request:
        if data.get("protocol") != PROTOCOL:
            raise VersionError(f"protocol {data.get('protocol')!r}, this node speaks {PROTOCOL}")
        return super().parse(data)  # type: ignore[return-value]


class VersionError(MessageError):
    """A message of another protocol version."""


@dataclass(frozen=True)
class AdvertiseRequest(Request):
    KIND: ClassVar[str] = "advertise request"


@dataclass(frozen=True)
class AdvertiseReply(Msg):
    KIND: ClassVar[str] = "advertise reply"
    lt_key: bytes
    signing_key: bytes = b""  # with an identity only
    key_signature: bytes = b""


@dataclass(frozen=True)
class PrepareRequest(Request):
    KIND: ClassVar[str] = "prepare request"
    round: int
    cohort: list[int]
    degree: int
    threshold: int
    graph_seed: bytes
    keys_of: list[int]  # the node's round neighbours
    keys: list[bytes]  # their long-term keys
    min_survivors: int = 0
    signing_keys: list[bytes] = field(default_factory=list)  # consistency option
    signatures: list[bytes] = field(default_factory=list)
    group_size: int = 0  # 0: no groups
    group_seed: bytes = b""
    generation_nodes: list[int] = field(default_factory=list)
    generation_sizes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PrepareReply(Msg):
    KIND: ClassVar[str] = "prepare reply"
    round: int
    mask_key: bytes  # this round's public key
    seed_commitment: bytes
    to: list[int]  # holders, in the order of the lists below
    packages: list[bytes]
    commit_sk: list[bytes]
    commit_b: list[bytes]


@dataclass(frozen=True)
class TrainRequest(Request):
    KIND: ClassVar[str] = "train request"
    round: int
    prepared: list[int]
    from_: list[int] = field(default_factory=list)  # owners of the packages below
    packages: list[bytes] = field(default_factory=list)
    commit_sk: list[bytes] = field(default_factory=list)
    commit_b: list[bytes] = field(default_factory=list)
    mask_keys: list[bytes] = field(default_factory=list)  # the owners' committed round keys


@dataclass(frozen=True)
class Upload(Msg):
    KIND: ClassVar[str] = "upload"
    round: int
    masked: bytes
    view: bytes
    tags_to: list[int]
    tags: list[bytes]


@dataclass(frozen=True)
class UnmaskRequest(Request):
    """Also the consistency stage's request (the same lists, without tags)."""

    KIND: ClassVar[str] = "unmask request"
    round: int
    survivors: list[int]
    dropped: list[int]
    excluded: list[int] = field(default_factory=list)
    tags_from: list[int] = field(default_factory=list)
    tags: list[bytes] = field(default_factory=list)
    signers: list[int] = field(default_factory=list)  # consistency option
    signatures: list[bytes] = field(default_factory=list)
    signer_keys: list[bytes] = field(default_factory=list)
    signer_lt_keys: list[bytes] = field(default_factory=list)
    signer_bindings: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class SignReply(Msg):
    KIND: ClassVar[str] = "consistency reply"
    round: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskReply(Msg):
    KIND: ClassVar[str] = "unmask reply"
    round: int
    b_of: list[int]
    b_shares: list[bytes]
    sk_of: list[int]
    sk_shares: list[bytes]
