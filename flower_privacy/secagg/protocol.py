"""The secure aggregation protocol (SecAgg+ style, round-scoped secrets), free of Flower.

Messages are plain dicts of ints, bytes, strings and lists, so that any transport can
carry them. The invariant: **no secret that outlives one round is ever reconstructed.**

1. ``advertise`` (once per node and protocol run): a node returns its long-term X25519
   key, signed with its Ed25519 identity if it has one. Long-term keys only seal share
   packages between two nodes; they are never shared.
2. ``prepare`` (per round, for the round's cohort): the server fixes the cohort, the
   degree k, the threshold t and a graph seed; each node checks them against its own
   floors (:mod:`.floors`), makes a fresh round key pair and self-mask seed, Shamir-shares
   both over one holder set (its round neighbours), and returns, per holder, a package
   sealed under their long-term keys plus commitments to every share and to the seed.
3. ``train``/``upload``: each prepared node receives the packages it holds, checks them
   against the commitments, and uploads its encoded update masked with its self mask and
   pairwise masks (derived from the round keys and its *view digest*: run, round,
   parameters, cohorts, model, config and run config), plus a MAC of the view per
   neighbour.
4. optional ``consistency`` (nodes with an :class:`Identity`): survivors sign one
   canonical round view (view digest and unmask lists).
5. ``unmask``: each survivor checks the lists, its neighbours' view tags (and, with the
   option, enough signatures on its own view), then reveals for every neighbour exactly
   one share: the self-mask seed's if it survived, the round key's if it dropped. It
   answers once per round and then forgets the round's secrets. The server checks each
   revealed share against its commitment before combining.

A round key rebuilt for a dropout unmasks only that round; nothing re-keys.
"""

from flower_privacy.secagg._common import (
    EXTRA_SLOTS,
    PROTOCOL,
    ProtocolError,
    Refusal,
    RefusedError,
    UnmaskRule,
)
from flower_privacy.secagg.client import (
    client_advertise,
    client_mask,
    client_prepare,
    client_sign,
    client_unmask,
)
from flower_privacy.secagg.floors import ClientFloors
from flower_privacy.secagg.server import RoundResult, SecAggServer
from flower_privacy.secagg.state import ClientState, Identity

__all__ = [
    "EXTRA_SLOTS",
    "PROTOCOL",
    "ClientFloors",
    "ClientState",
    "Identity",
    "ProtocolError",
    "Refusal",
    "RefusedError",
    "RoundResult",
    "SecAggServer",
    "UnmaskRule",
    "client_advertise",
    "client_mask",
    "client_prepare",
    "client_sign",
    "client_unmask",
]
