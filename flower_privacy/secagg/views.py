"""Every value the protocol hashes, signs, MACs or derives keys from, defined once.

All of them are canonical encodings (:mod:`.canonical`) under their own domain label,
so that a value meant for one purpose can never be replayed as another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flower_privacy.secagg import canonical, keys
from flower_privacy.secagg._common import PROTOCOL
from flower_privacy.secagg.prg import derive_key

if TYPE_CHECKING:
    from flower_privacy.secagg.state import RoundSecrets


def advertise_message(nonce: bytes, node: int, lt_key: bytes) -> bytes:
    """What a node signs for its long-term key: it binds node id, key and protocol run."""
    return canonical.encode(["advertise", PROTOCOL, nonce, node, lt_key])


class SealKeys:
    """The ChaCha20-Poly1305 keys one node seals share packages with, one per peer.

    From the two nodes' long-term keys; this node's is loaded once for all its peers.
    """

    def __init__(self, lt_key: bytes, own: int, nonce: bytes) -> None:
        self._agreement = keys.KeyAgreement(lt_key, own)
        self._context = canonical.encode(["seal", PROTOCOL, nonce])

    def with_peer(self, peer_lt_key: bytes, peer: int) -> bytes:
        """The key shared with ``peer``."""
        return self._agreement.material(peer_lt_key, peer, self._context)[:32]


def package_ad(nonce: bytes, rnd: int, owner: int, holder: int) -> bytes:
    """Associated data of one share package: its run, round, owner and holder."""
    return canonical.encode(["package", PROTOCOL, nonce, rnd, owner, holder])


def share_commitments(nonce: bytes, rnd: int) -> Callable[[int, int, str, bytes], bytes]:
    """:func:`share_commitment` of one run and round as ``(owner, holder, kind, share)``.

    The common head is hashed once: the server checks n·k shares a round.
    """
    head = canonical.PrefixDigest("share-commitment", [PROTOCOL, nonce, rnd], tail_items=4)
    return head.digest


def share_commitment(
    nonce: bytes, rnd: int, owner: int, holder: int, kind: str, share: bytes
) -> bytes:
    """The owner's commitment to one holder's share (checked by holder and server).

    ``canonical.digest("share-commitment", [PROTOCOL, nonce, rnd, owner, holder, kind, share])``.
    """
    return share_commitments(nonce, rnd)(owner, holder, kind, share)


def self_seed_commitment(nonce: bytes, rnd: int, owner: int, seed: bytes) -> bytes:
    """The owner's commitment to its self-mask seed (the server checks the rebuilt seed)."""
    return canonical.digest("self-seed-commitment", [PROTOCOL, nonce, rnd, owner, seed])


@dataclass(frozen=True)
class RoundPair:
    """What two nodes share in one round, from their per-round keys."""

    mac_key: bytes
    seed_base: bytes

    def mask_seed(self, view: bytes) -> bytes:
        """The pairwise mask seed: it depends on the view, so two views never cancel."""
        return derive_key(self.seed_base, b"flower-privacy/secagg/pair-seed|" + view)


class RoundPairs:
    """One node's per-round pairwise secrets with its peers (its round key loaded once)."""

    def __init__(self, mask_key: bytes, own: int, nonce: bytes, rnd: int) -> None:
        self._agreement = keys.KeyAgreement(mask_key, own)
        self._context = canonical.encode(["round", PROTOCOL, nonce, rnd])

    def with_peer(self, peer_mask_key: bytes, peer: int) -> RoundPair:
        """The secrets shared with ``peer`` (symmetric in the two)."""
        material = self._agreement.material(peer_mask_key, peer, self._context)
        return RoundPair(mac_key=material[:32], seed_base=material[32:])


def tag_message(sender: int, receiver: int, view: bytes) -> bytes:
    """What a view tag from ``sender`` to ``receiver`` authenticates (directional)."""
    return canonical.encode(["view-tag", PROTOCOL, sender, receiver, view])


def view_digest(nonce: bytes, secrets: RoundSecrets, content_digest: bytes) -> bytes:
    """The round as this node saw it before masking: parameters, cohorts and content."""
    return canonical.digest(
        "view",
        [
            PROTOCOL,
            nonce,
            secrets.round,
            secrets.degree,
            secrets.threshold,
            secrets.graph_seed,
            _ids(secrets.cohort),
            _ids(secrets.prepared),
            # One partition for all: the So et al. argument needs it. Members and group
            # sizes as two arrays: injective, and two items to encode, not one per group.
            _ids([node for group in secrets.groups for node in group]),
            _ids([len(group) for group in secrets.groups]),
            content_digest,
        ],
    )


def round_view(
    nonce: bytes,
    secrets: RoundSecrets,
    survivors: list[int],
    dropped: list[int],
    excluded: list[int],
) -> bytes:
    """What survivors sign in the consistency check: the view plus the unmask lists."""
    lists = [_ids(survivors), _ids(dropped), _ids(excluded)]
    return canonical.encode(["round-view", PROTOCOL, nonce, secrets.view, *lists])


def _ids(nodes: list[int]) -> np.ndarray:
    """Node ids (unsigned 64-bit) as one array: canonical, and one item to encode."""
    return np.asarray(nodes, dtype="<u8")
