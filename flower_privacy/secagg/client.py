"""Client half of the secure aggregation protocol (see :mod:`.protocol`)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

import numpy as np

from flower_privacy.secagg import graph, groups, keys, shamir, signing
from flower_privacy.secagg._common import (
    RefusedError,
    UnmaskRule,
)
from flower_privacy.secagg._common import associated_data as _ad
from flower_privacy.secagg._common import context as _context
from flower_privacy.secagg._common import mask_sign as _sign
from flower_privacy.secagg.prg import expand_mask
from flower_privacy.secagg.quantize import Encoder


@dataclass(frozen=True)
class Identity:
    """A node's signing key and the signing keys it trusts (the roster).

    A node with an identity signs its advertised key, accepts only neighbours' keys
    signed under roster keys, and unmasks only after the consistency check.
    """

    signing_key: bytes
    trusted: frozenset[bytes]

    def __post_init__(self) -> None:
        if signing.signing_public_key(self.signing_key) not in self.trusted:
            raise ValueError("this node's own signing key is not in the roster it trusts")


@dataclass
class ClientState:
    """Everything a node keeps between messages (serialisable to bytes)."""

    node_id: int
    run: bytes = b""
    epoch: int = 0
    private_key: bytes = b""
    roster: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    degree: int = 0
    threshold_fraction: float = 0.5
    round: int = 0
    cohort: list[int] = field(default_factory=list)
    uploaded: bool = False
    unmasked: bool = False
    burned: dict[int, int] = field(default_factory=dict)  # node -> epoch whose key we revealed
    signers: dict[int, bytes] = field(default_factory=dict)  # node -> signing key, this run
    signed: list[list[int]] = field(default_factory=list)  # [survivors, dropped] we signed
    groups: list[list[int]] = field(default_factory=list)  # this round's groups, if any
    generations: list[list[int]] = field(default_factory=list)  # group generations seen
    group_seed: bytes = b""  # the partition seed first seen in this run
    min_survivors: int = 0  # fewest survivors this round's upload may be unmasked with

    def to_bytes(self) -> bytes:
        data = {
            "node_id": self.node_id,
            "run": self.run.hex(),
            "epoch": self.epoch,
            "private_key": self.private_key.hex(),
            "roster": {str(k): [v[0].hex(), v[1]] for k, v in self.roster.items()},
            "degree": self.degree,
            "threshold_fraction": self.threshold_fraction,
            "round": self.round,
            "cohort": self.cohort,
            "uploaded": self.uploaded,
            "unmasked": self.unmasked,
            "burned": {str(k): v for k, v in self.burned.items()},
            "signers": {str(k): v.hex() for k, v in self.signers.items()},
            "signed": self.signed,
            "groups": self.groups,
            "generations": self.generations,
            "group_seed": self.group_seed.hex(),
            "min_survivors": self.min_survivors,
        }
        return base64.b64encode(json.dumps(data).encode())

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientState:
        data = json.loads(base64.b64decode(raw))
        return cls(
            node_id=data["node_id"],
            run=bytes.fromhex(data["run"]),
            epoch=data["epoch"],
            private_key=bytes.fromhex(data["private_key"]),
            roster={int(k): (bytes.fromhex(v[0]), v[1]) for k, v in data["roster"].items()},
            degree=data["degree"],
            threshold_fraction=data["threshold_fraction"],
            round=data["round"],
            cohort=data["cohort"],
            uploaded=data["uploaded"],
            unmasked=data["unmasked"],
            burned={int(k): v for k, v in data["burned"].items()},
            signers={int(k): bytes.fromhex(v) for k, v in data["signers"].items()},
            signed=data["signed"],
            groups=data["groups"],
            generations=data["generations"],
            group_seed=bytes.fromhex(data["group_seed"]),
            min_survivors=int(data.get("min_survivors", 0)),
        )

    def neighbours(self) -> list[int]:
        return graph.neighbours(sorted(self.roster), self.degree, self.run)[self.node_id]

    def round_neighbours(self) -> list[int]:
        cohort = set(self.cohort)
        return [v for v in self.neighbours() if v in cohort]

    def pair(self, peer: int) -> keys.PairSecrets:
        peer_key, _ = self.roster[peer]
        return keys.pair_secrets(self.private_key, self.node_id, peer_key, peer, self.run)


def client_advertise(state: ClientState, request: dict, identity: Identity | None = None) -> dict:
    """Step 1: a fresh key pair for this run (a new epoch), signed with ``identity``."""
    run = _bytes(request, "run")
    if state.run != run:  # a new run: nothing of an old one carries over
        state.__dict__.update(ClientState(node_id=state.node_id, run=run).__dict__)
    state.epoch += 1
    state.private_key = keys.generate_private_key()
    state.roster = {}
    state.uploaded = state.unmasked = False
    public_key = keys.public_key(state.private_key)
    reply: dict = {"public-key": public_key, "epoch": state.epoch}
    if identity is not None:
        message = signing.advertise_message(state.run, state.node_id, state.epoch, public_key)
        reply["signing-key"] = signing.signing_public_key(identity.signing_key)
        reply["key-signature"] = signing.sign(identity.signing_key, message)
    return reply


def client_distribute(state: ClientState, request: dict, identity: Identity | None = None) -> dict:
    """Step 2: learn the roster, derive neighbours, share the private key among them."""
    _check_run(state, request)
    node_ids = [int(x) for x in request["node-ids"]]
    public_keys = list(request["public-keys"])
    epochs = [int(x) for x in request["epochs"]]
    if not len(node_ids) == len(public_keys) == len(epochs):
        raise RefusedError("roster lists differ in length")
    roster = dict(zip(node_ids, zip(public_keys, epochs, strict=True), strict=True))
    if roster.get(state.node_id) != (keys.public_key(state.private_key), state.epoch):
        raise RefusedError("the roster does not hold this node's current public key")
    if identity is not None:
        _check_signed_keys(state, request, node_ids, public_keys, epochs, identity)
    state.roster = roster
    state.degree = int(request["degree"])
    state.threshold_fraction = float(request["threshold-fraction"])
    peers = state.neighbours()
    t = graph.threshold(len(peers), state.threshold_fraction)
    shares = shamir.split(state.private_key, t, len(peers))
    sealed = [
        keys.seal(
            state.pair(peer).encryption_key,
            share,
            _ad(b"sk", state.run, state.node_id, peer, state.epoch, roster[peer][1]),
        )
        for peer, share in zip(peers, shares, strict=True)
    ]
    return {"to": peers, "shares": sealed, "epoch": state.epoch}


def client_upload(
    state: ClientState, request: dict, update: np.ndarray, weight: int, quantizer: Encoder
) -> tuple[dict, dict]:
    """Step 3: mask ``weight * update``; returns (upload, report of what was clipped)."""
    _check_run(state, request)
    rnd = int(request["round"])
    if rnd <= state.round:
        raise RefusedError(f"round {rnd} is not after round {state.round} (replay)")
    cohort = sorted(int(x) for x in request["cohort"])
    if state.node_id not in cohort:
        raise RefusedError("this node is not in the round's cohort")
    unknown = [v for v in cohort if v not in state.roster]
    if unknown:
        raise RefusedError(f"cohort nodes {unknown} have no key in this node's roster")
    stale = [v for v in cohort if state.burned.get(v) == state.roster[v][1]]
    if stale:
        raise RefusedError(f"cohort nodes {stale} were not re-keyed after their key was rebuilt")
    if state.uploaded and not state.unmasked:
        # This node uploaded in round `state.round` but was never asked to unmask as a
        # survivor: the server may have rebuilt its key (claiming it dropped). Masks
        # under that key are no longer safe: it takes part again only after re-keying.
        raise RefusedError(
            f"round {state.round}'s upload was never unmasked with this node as a survivor; "
            "its key must be renewed first"
        )
    round_groups = _checked_groups(state, request, cohort)
    state.round, state.cohort, state.uploaded, state.unmasked = rnd, cohort, False, False
    state.signed, state.groups = [], round_groups
    # The server's own floor, fixed before anything is masked: it cannot lower it at
    # unmasking by declaring more nodes dropped (distributed DP's noise depends on it).
    state.min_survivors = int(request.get("min-survivors", 0))
    peers = state.round_neighbours()
    if len(peers) < 2:
        raise RefusedError(f"only {len(peers)} neighbour(s) in the cohort; at least 2 needed")
    encoded = quantizer.encode(update, weight)
    vector = np.concatenate(
        [encoded.values, np.array([encoded.weight, encoded.clipped], dtype=np.uint32)]
    )
    self_seed = os.urandom(32)
    vector += expand_mask(self_seed, _context(state.run, rnd, state.node_id), vector.size)
    for peer in peers:
        mask = expand_mask(state.pair(peer).mask_seed, _context(state.run, rnd), vector.size)
        if _sign(state.node_id, peer) > 0:
            vector += mask
        else:
            vector -= mask  # uint32 arithmetic wraps modulo 2^32
    t = graph.threshold(len(peers), state.threshold_fraction)
    shares = shamir.split(self_seed, t, len(peers))
    sealed = [
        keys.seal(
            state.pair(peer).encryption_key,
            share,
            _ad(b"b", state.run, rnd, state.node_id, peer, state.epoch, state.roster[peer][1]),
        )
        for peer, share in zip(peers, shares, strict=True)
    ]
    state.uploaded = True
    upload = {"round": rnd, "masked": vector.astype("<u4").tobytes(), "to": peers, "shares": sealed}
    return upload, {"clipped": encoded.clipped, "weight-capped": int(encoded.weight_capped)}


def client_consistency(state: ClientState, request: dict, identity: Identity) -> dict:
    """Consistency stage: sign the survivor and dropped lists, once per round."""
    survivors, dropped = _checked_lists(state, request, "consistency")
    if state.signed:
        raise RefusedError(f"round {state.round}'s lists were already signed (replay)")
    state.signed = [survivors, dropped]
    message = signing.consistency_message(state.run, state.round, survivors, dropped)
    return {"round": state.round, "signature": signing.sign(identity.signing_key, message)}


def client_unmask(
    state: ClientState,
    request: dict,
    rule: UnmaskRule | None = None,
    identity: Identity | None = None,
) -> dict:
    """Step 4: check the server's request; reveal only what keeps every input hidden."""
    survivors, dropped = _checked_lists(state, request, "unmask")
    rnd = state.round
    round_peers = state.round_neighbours()
    if identity is not None:
        _check_consistency(state, request, survivors, dropped)
    broken = groups.incomplete_groups(state.groups, survivors)
    if broken:
        raise RefusedError(f"groups {broken} are incomplete in the survivor list")
    if len(survivors) < state.min_survivors:
        raise RefusedError(
            f"{len(survivors)} survivors, but the round promised at least {state.min_survivors}"
        )
    if rule is not None and (why := rule(survivors, dropped, state.cohort)) is not None:
        raise RefusedError(f"unmask rule: {why}")
    owners = [int(x) for x in request["from"]]
    sealed = list(request["sealed"])
    if len(owners) != len(sealed) or len(set(owners)) != len(owners):
        raise RefusedError("malformed share list")
    all_peers = set(state.neighbours())
    outside = [u for u in owners if u not in all_peers]
    if outside:
        raise RefusedError(f"shares requested of nodes {outside} outside this node's neighbourhood")
    sk_of, sk_shares, b_of, b_shares = [], [], [], []
    for owner, blob in zip(owners, sealed, strict=True):
        owner_epoch = state.roster[owner][1]
        if owner in dropped:
            ad = _ad(b"sk", state.run, owner, state.node_id, owner_epoch, state.epoch)
            target_of, target = sk_of, sk_shares
        else:
            if owner not in round_peers:
                raise RefusedError(f"self-mask share of node {owner}, not a neighbour this round")
            if state.burned.get(owner) == owner_epoch:
                raise RefusedError(f"node {owner}'s key was rebuilt: its self masks stay secret")
            ad = _ad(b"b", state.run, rnd, owner, state.node_id, owner_epoch, state.epoch)
            target_of, target = b_of, b_shares
        try:
            share = keys.open_sealed(state.pair(owner).encryption_key, blob, ad)
        except keys.DecryptionError:
            raise RefusedError(f"the share from node {owner} failed authentication") from None
        target_of.append(owner)
        target.append(share)
    for owner in sk_of:
        state.burned[owner] = state.roster[owner][1]
    state.unmasked = True
    return {
        "round": rnd,
        "sk-of": sk_of,
        "sk-shares": sk_shares,
        "b-of": b_of,
        "b-shares": b_shares,
    }


def _checked_lists(state: ClientState, request: dict, stage: str) -> tuple[list[int], list[int]]:
    """The survivor and dropped lists of a request, after every check a node makes."""
    _check_run(state, request)
    rnd = int(request["round"])
    if rnd != state.round or not state.uploaded:
        raise RefusedError(
            f"{stage} request for round {rnd}, but this node uploaded in no such round"
        )
    if state.unmasked:
        raise RefusedError(f"round {rnd} was already unmasked (replay)")
    survivors = [int(x) for x in request["survivors"]]
    dropped = [int(x) for x in request["dropped"]]
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise RefusedError(f"nodes {both} are listed both as survivor and as dropped")
    if sorted(survivors + dropped) != state.cohort:
        raise RefusedError("survivors and dropped nodes do not make up the round's cohort")
    if state.node_id not in survivors:
        raise RefusedError("this node uploaded but is not listed as a survivor")
    round_peers = state.round_neighbours()
    live_peers = [v for v in round_peers if v in survivors]
    t = graph.threshold(len(round_peers), state.threshold_fraction)
    if len(live_peers) < t:
        raise RefusedError(
            f"only {len(live_peers)} surviving neighbours named, fewer than the threshold {t}"
        )
    return survivors, dropped


def _checked_groups(state: ClientState, request: dict, cohort: list[int]) -> list[list[int]]:
    """The round's groups, recomputed from the run seed; the cohort must be whole groups."""
    if "group-size" not in request:
        return []
    size = int(request["group-size"])
    if size < 2:
        raise RefusedError(f"group size {size} protects nobody: at least 2 needed")
    try:
        generations = groups.unflatten(
            [int(x) for x in request["generation-nodes"]],
            [int(x) for x in request["generation-sizes"]],
        )
        seed = _bytes(request, "group-seed")
        round_groups = groups.groups_from_generations(generations, size, seed)
    except ValueError as err:
        raise RefusedError(f"the groups are not a partition of the run's nodes: {err}") from None
    if (state.group_seed and seed != state.group_seed) or (
        generations[: len(state.generations)] != state.generations
    ):
        # Regrouping could let rounds be differenced down to fewer than T nodes.
        raise RefusedError("the server regrouped nodes: groups formed earlier changed")
    if not groups.is_union_of_groups(round_groups, cohort):
        raise RefusedError("the cohort is not a union of whole groups")
    state.generations, state.group_seed = generations, seed
    return round_groups


def _check_signed_keys(
    state: ClientState,
    request: dict,
    node_ids: list[int],
    public_keys: list[bytes],
    epochs: list[int],
    identity: Identity,
) -> None:
    signing_keys = list(request.get("signing-keys", []))
    signatures = list(request.get("key-signatures", []))
    if len(signing_keys) != len(node_ids) or len(signatures) != len(node_ids):
        raise RefusedError("the server sent keys without their owners' signatures")
    if len(set(signing_keys)) != len(signing_keys):
        raise RefusedError("one signing key stands for several nodes")
    for node, key, epoch, signer, signature in zip(
        node_ids, public_keys, epochs, signing_keys, signatures, strict=True
    ):
        if signer not in identity.trusted:
            raise RefusedError(f"node {node}'s signing key is not in the roster")
        if state.signers.get(node, signer) != signer:
            raise RefusedError(f"node {node}'s signing key changed during the run")
        message = signing.advertise_message(state.run, node, epoch, key)
        if not signing.verify(signer, signature, message):
            raise RefusedError(f"node {node}'s key signature does not verify")
    state.signers.update(zip(node_ids, signing_keys, strict=True))


def _check_consistency(
    state: ClientState, request: dict, survivors: list[int], dropped: list[int]
) -> None:
    if state.signed != [survivors, dropped]:
        raise RefusedError("the unmask lists differ from the lists this node signed")
    signers = [int(x) for x in request.get("signers", [])]
    signatures = list(request.get("signatures", []))
    if len(signers) != len(signatures):
        raise RefusedError("malformed signature list")
    message = signing.consistency_message(state.run, state.round, survivors, dropped)
    peers = set(state.round_neighbours())
    valid = {
        node
        for node, signature in zip(signers, signatures, strict=True)
        if node in peers
        and node in state.signers
        and signing.verify(state.signers[node], signature, message)
    }
    t = graph.threshold(len(peers), state.threshold_fraction)
    if len(valid) < t:
        raise RefusedError(
            f"only {len(valid)} neighbours signed the lists this node signed, fewer than "
            f"the threshold {t} (the server shows different nodes different lists)"
        )


def _check_run(state: ClientState, request: dict) -> None:
    if _bytes(request, "run") != state.run or not state.private_key:
        raise RefusedError("the request belongs to another run or key set-up (replay)")


def _bytes(request: dict, key: str) -> bytes:
    value = request.get(key)
    if not isinstance(value, bytes):
        raise RefusedError(f"request field {key!r} is missing or not bytes")
    return value
