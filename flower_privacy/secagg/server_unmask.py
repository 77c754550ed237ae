"""What the server keeps of one round, and its last stage: check, rebuild, unmask.

Every revealed share is checked against the commitment its owner made at prepare; only
then are the self-mask seeds of survivors and the round keys of dropped nodes rebuilt
(each against its own commitment), and their masks taken off the sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flower_privacy.secagg import canonical, keys, shamir
from flower_privacy.secagg import messages as m
from flower_privacy.secagg._common import ProtocolError
from flower_privacy.secagg._common import mask_sign as _sign
from flower_privacy.secagg.prg import MaskBuffer
from flower_privacy.secagg.quantize import word_dtype
from flower_privacy.secagg.views import RoundPairs, self_seed_commitment, share_commitments

_SELF = b"self-mask|"
_PAIR = b"pair-mask|"


@dataclass
class ServerRound:
    """One round as the server sees it, from prepare to unmask."""

    cohort: list[int]
    degree: int
    threshold: int
    seed: bytes
    neighbours: dict[int, list[int]]
    prepares: dict[int, m.PrepareReply] = field(default_factory=dict)
    prepared: list[int] = field(default_factory=list)
    prepared_set: set[int] = field(default_factory=set)
    uploads: dict[int, m.Upload] = field(default_factory=dict)
    excluded: dict[int, m.Upload] = field(default_factory=dict)  # uploaded, left out of the sum
    signatures: dict[int, bytes] = field(default_factory=dict)


def checked_shares(
    state: ServerRound,
    nonce: bytes,
    rnd: int,
    replies: dict[int, dict],
    holders: set[int],
    survivors: list[int],
    dropped: list[int],
) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]], set[int]]:
    """(seed shares by survivor, key shares by dropped node, holders that sent a bad one).

    A share counts only if its holder holds it (a round neighbour of its owner), its
    owner's kind matches (seed shares of survivors, key shares of dropped nodes) and it
    is the share its owner committed to.
    """
    alive, gone = set(survivors), set(dropped)
    b_shares: dict[int, list[bytes]] = {u: [] for u in survivors}
    sk_shares: dict[int, list[bytes]] = {u: [] for u in dropped}
    bad: set[int] = set()
    commitment = share_commitments(nonce, rnd)
    for holder, raw in replies.items():
        try:
            reply = m.UnmaskReply.parse(raw)
        except m.MessageError:
            bad.add(holder)
            continue
        if holder not in holders or reply.round != rnd:
            continue
        peers = set(state.neighbours[holder])
        for kind, owners, shares, target, allowed in (
            ("b", reply.b_of, reply.b_shares, b_shares, alive),
            ("sk", reply.sk_of, reply.sk_shares, sk_shares, gone),
        ):
            if len(owners) != len(shares):
                bad.add(holder)
                continue
            for owner, share in zip(owners, shares, strict=True):
                index = state.neighbours[owner].index(holder) if owner in peers else -1
                commits = (
                    state.prepares[owner].commit_b
                    if kind == "b"
                    else state.prepares[owner].commit_sk
                )
                commit = commits[index] if index >= 0 and owner in allowed else b""
                if commit != commitment(owner, holder, kind, share):
                    bad.add(holder)  # a share that is not what its owner committed to
                    continue
                target[owner].append(share)
    return b_shares, sk_shares, bad


def unmasked_total(
    state: ServerRound,
    nonce: bytes,
    rnd: int,
    b_shares: dict[int, list[bytes]],
    sk_shares: dict[int, list[bytes]],
    size: int,
    word_bits: int,
) -> np.ndarray:
    """The survivors' uploads summed, their self masks and the dropped nodes' pair masks off."""
    words = word_dtype(word_bits)
    total = np.zeros(size, dtype=words)
    survivors = sorted(b_shares)
    for node in survivors:
        total += np.frombuffer(state.uploads[node].masked, dtype=words)
    self_context = _SELF + canonical.encode([nonce, rnd])
    masks = MaskBuffer(size, word_bits)
    for node in survivors:
        seed = rebuild(node, b_shares[node], state.threshold, "self-mask seed")
        if self_seed_commitment(nonce, rnd, node, seed) != state.prepares[node].seed_commitment:
            raise ProtocolError(f"node {node} shared a self-mask seed it did not commit to")
        total -= masks.expand(seed, self_context)
    alive = set(survivors)
    for node in sk_shares:
        live = [v for v in state.neighbours[node] if v in alive]
        if not live:
            continue  # no survivor masked with it
        mask_key = rebuild(node, sk_shares[node], state.threshold, "round key")
        if keys.public_key(mask_key) != state.prepares[node].mask_key:
            raise ProtocolError(f"node {node} shared a round key it did not commit to")
        pairs = RoundPairs(mask_key, node, nonce, rnd)
        for peer in live:
            pair = pairs.with_peer(state.prepares[peer].mask_key, peer)
            mask = masks.expand(pair.mask_seed(state.uploads[peer].view), _PAIR)
            if _sign(peer, node) > 0:  # the survivor added it: take it away
                total -= mask
            else:
                total += mask
    return total


def rebuild(owner: int, shares: list[bytes], t: int, what: str) -> bytes:
    """``owner``'s secret from its first ``t`` checked shares, or why it cannot be."""
    if len(shares) < t:
        raise ProtocolError(
            f"only {len(shares)} valid shares of node {owner}'s {what}, {t} needed: too "
            "many holders dropped or refused during unmasking"
        )
    try:
        return shamir.combine(shares, t)
    except shamir.ShareError as err:
        raise ProtocolError(f"shares of node {owner}'s {what} are inconsistent: {err}") from None
