"""Client half of the secure aggregation protocol (see :mod:`.protocol`).

Every check an honest node makes before it reveals anything is here; each failed
check raises :class:`RefusedError` with a structured code.
"""

from __future__ import annotations

import os

import numpy as np

from flower_privacy.secagg import canonical, graph, groups, keys, shamir, signing
from flower_privacy.secagg._common import PROTOCOL, Refusal, RefusedError, UnmaskRule
from flower_privacy.secagg._common import mask_sign as _sign
from flower_privacy.secagg.consistency import check_signatures
from flower_privacy.secagg.floors import ClientFloors
from flower_privacy.secagg.prg import expand_mask
from flower_privacy.secagg.quantize import Encoder
from flower_privacy.secagg.state import ClientState, Identity, RoundSecrets
from flower_privacy.secagg.views import (
    advertise_message,
    package_ad,
    pair_keys,
    round_view,
    seal_key,
    self_seed_commitment,
    share_commitment,
    tag_message,
    view_digest,
)

_SELF = b"self-mask|"
_PAIR = b"pair-mask|"


def client_advertise(state: ClientState, request: dict, identity: Identity | None = None) -> dict:
    """Return this node's long-term key (made once per Flower run), signed with ``identity``."""
    _check_version(request)
    nonce = _bytes(request, "nonce")
    if nonce != state.nonce:
        # A new protocol run: no round of an old one can be finished any more. Groups,
        # signing keys and the long-term key stay: they belong to the Flower run.
        state.nonce, state.rounds, state.last_prepared = nonce, {}, 0
    if not state.lt_key:
        state.lt_key = keys.generate_private_key()
    public = keys.public_key(state.lt_key)
    reply: dict = {"lt-key": public}
    if identity is not None:
        reply["signing-key"] = signing.signing_public_key(identity.signing_key)
        reply["key-signature"] = signing.sign(
            identity.signing_key, advertise_message(nonce, state.node_id, public)
        )
    return reply


def client_prepare(
    state: ClientState,
    request: dict,
    floors: ClientFloors,
    identity: Identity | None = None,
) -> dict:
    """Make this round's secrets and share them, sealed, among the round neighbours."""
    rnd, nonce = _check_round_request(state, request)
    if rnd <= state.last_prepared:
        raise RefusedError(Refusal.REPLAY, f"round {rnd} is not after round {state.last_prepared}")
    cohort = _ids(request, "cohort")
    if cohort != sorted(set(cohort)) or state.node_id not in cohort:
        raise RefusedError(Refusal.BAD_REQUEST, "the cohort is not a sorted list holding this node")
    if len(cohort) < floors.min_cohort:
        raise RefusedError(
            Refusal.BELOW_FLOOR, f"cohort of {len(cohort)}, this node needs {floors.min_cohort}"
        )
    degree, t = int(request["degree"]), int(request["threshold"])
    seed = _bytes(request, "graph-seed")
    try:
        peers = graph.neighbours(cohort, degree, seed)[state.node_id]
    except ValueError as err:
        raise RefusedError(Refusal.BAD_REQUEST, str(err)) from None
    if len(peers) < floors.min_degree:
        raise RefusedError(
            Refusal.BELOW_FLOOR, f"{len(peers)} neighbours, this node needs {floors.min_degree}"
        )
    if not floors.threshold_for(len(peers)) <= t <= len(peers):
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"threshold {t} for {len(peers)} holders; this node needs "
            f"{floors.threshold_for(len(peers))} to {len(peers)}",
        )
    if _ids(request, "keys-of") != peers or len(request["keys"]) != len(peers):
        raise RefusedError(Refusal.BAD_REQUEST, "long-term keys are not those of the neighbours")
    lt_keys = dict(zip(peers, request["keys"], strict=True))
    if identity is not None:
        _check_signed_keys(state, request, nonce, peers, lt_keys, identity)
    round_groups = _checked_groups(state, request, cohort, floors)
    min_survivors = max(floors.min_survivors, int(request.get("min-survivors", 0)))

    mask_key, self_seed = keys.generate_private_key(), os.urandom(32)
    mask_public = keys.public_key(mask_key)
    sk_shares = shamir.split(mask_key, t, len(peers))
    b_shares = shamir.split(self_seed, t, len(peers))
    packages, commit_sk, commit_b = [], [], []
    for peer, sk_share, b_share in zip(peers, sk_shares, b_shares, strict=True):
        key = seal_key(state.lt_key, state.node_id, lt_keys[peer], peer, nonce)
        ad = package_ad(nonce, rnd, state.node_id, peer)
        packages.append(keys.seal(key, mask_public + sk_share + b_share, ad))
        commit_sk.append(share_commitment(nonce, rnd, state.node_id, peer, "sk", sk_share))
        commit_b.append(share_commitment(nonce, rnd, state.node_id, peer, "b", b_share))
    # Older rounds can never be unmasked again (the server moved on): forget them.
    state.rounds = {r: s for r, s in state.rounds.items() if r >= rnd - 1}
    state.rounds[rnd] = RoundSecrets(
        round=rnd,
        cohort=cohort,
        degree=degree,
        threshold=t,
        graph_seed=seed,
        neighbours=peers,
        lt_keys=lt_keys,
        mask_key=mask_key,
        self_seed=self_seed,
        min_survivors=min_survivors,
        groups=round_groups,
    )
    state.last_prepared = rnd
    state.participated = True
    return {
        "round": rnd,
        "mask-key": mask_public,
        "seed-commitment": self_seed_commitment(nonce, rnd, state.node_id, self_seed),
        "to": peers,
        "packages": packages,
        "commit-sk": commit_sk,
        "commit-b": commit_b,
    }


def client_mask(
    state: ClientState,
    request: dict,
    update: np.ndarray,
    weight: int,
    encoder: Encoder,
    content_digest: bytes,
) -> tuple[dict, dict]:
    """Mask ``weight * update`` for the round; returns (upload, report of what was clipped).

    ``content_digest`` is the canonical digest of the training message (model, config)
    and the node's run config: it enters every pairwise mask and the view tags.
    """
    rnd, nonce = _check_round_request(state, request)
    secrets = _round(state, rnd)
    if secrets.uploaded or secrets.prepared:
        raise RefusedError(Refusal.REPLAY, f"round {rnd} was already trained")
    prepared = _ids(request, "prepared")
    if prepared != sorted(set(prepared)) or not set(prepared) <= set(secrets.cohort):
        raise RefusedError(Refusal.BAD_REQUEST, "the prepared nodes are not part of the cohort")
    if state.node_id not in prepared or len(prepared) < secrets.min_survivors:
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"{len(prepared)} prepared nodes, at least "
            f"{secrets.min_survivors} needed and this node among them",
        )
    if secrets.groups and not groups.is_union_of_groups(secrets.groups, prepared):
        raise RefusedError(Refusal.GROUPS, "the prepared nodes are not a union of whole groups")
    live = secrets.live_neighbours(prepared)
    if len(live) < secrets.threshold:
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"{len(live)} neighbours prepared, fewer than the threshold {secrets.threshold}",
        )
    owners = _ids(request, "from")
    if owners != live or not len(request["packages"]) == len(request["commit-sk"]) == len(
        request["commit-b"]
    ) == len(live):
        raise RefusedError(Refusal.BAD_REQUEST, "share packages are not those of the neighbours")
    for owner, blob, c_sk, c_b in zip(
        owners, request["packages"], request["commit-sk"], request["commit-b"], strict=True
    ):
        key = seal_key(state.lt_key, state.node_id, secrets.lt_keys[owner], owner, nonce)
        try:
            plain = keys.open_sealed(key, blob, package_ad(nonce, rnd, owner, state.node_id))
        except keys.DecryptionError:
            raise RefusedError(
                Refusal.BAD_SHARE, f"the share package of node {owner} failed authentication"
            ) from None
        mask_public, sk_share, b_share = _split_package(plain)
        if share_commitment(nonce, rnd, owner, state.node_id, "sk", sk_share) != c_sk or (
            share_commitment(nonce, rnd, owner, state.node_id, "b", b_share) != c_b
        ):
            raise RefusedError(
                Refusal.BAD_SHARE, f"node {owner}'s shares do not match their commitments"
            )
        secrets.mask_keys[owner] = mask_public
        secrets.held[owner] = [sk_share, b_share]
    secrets.prepared = prepared
    secrets.view = view_digest(nonce, secrets, content_digest)

    encoded = encoder.encode(update, weight)
    vector = np.concatenate(
        [encoded.values, np.array([encoded.weight, encoded.clipped], dtype=np.uint32)]
    )
    vector += expand_mask(secrets.self_seed, _SELF + canonical.encode([nonce, rnd]), vector.size)
    tags = []
    for peer in live:
        pair = pair_keys(secrets.mask_key, state.node_id, secrets.mask_keys[peer], peer, nonce, rnd)
        mask = expand_mask(pair.mask_seed(secrets.view), _PAIR, vector.size)
        if _sign(state.node_id, peer) > 0:
            vector += mask
        else:
            vector -= mask  # uint32 arithmetic wraps modulo 2^32
        tags.append(keys.mac(pair.mac_key, tag_message(state.node_id, peer, secrets.view)))
    secrets.uploaded = True
    upload = {
        "round": rnd,
        "masked": vector.astype("<u4").tobytes(),
        "view": secrets.view,
        "tags-to": live,
        "tags": tags,
    }
    return upload, {"clipped": encoded.clipped, "weight-capped": int(encoded.weight_capped)}


def client_sign(state: ClientState, request: dict, identity: Identity) -> dict:
    """Consistency check: sign the one round view this node was shown, once per round."""
    secrets, survivors, dropped = _checked_lists(state, request)
    if secrets.signed:
        raise RefusedError(Refusal.REPLAY, f"round {secrets.round}'s view was already signed")
    secrets.signed = round_view(state.nonce, secrets, survivors, dropped)
    return {"round": secrets.round, "signature": signing.sign(identity.signing_key, secrets.signed)}


def client_unmask(
    state: ClientState,
    request: dict,
    rule: UnmaskRule | None = None,
    identity: Identity | None = None,
    max_colluders: int = 0,
) -> dict:
    """Check the server's request; reveal one share per neighbour and never both secrets."""
    secrets, survivors, dropped = _checked_lists(state, request)
    if rule is not None and (why := rule(survivors, dropped, secrets.prepared)) is not None:
        raise RefusedError(Refusal.GROUPS, f"unmask rule: {why}")
    live = secrets.live_neighbours(survivors)
    if _ids(request, "tags-from") != live or len(request["tags"]) != len(live):
        raise RefusedError(Refusal.BAD_REQUEST, "view tags are not those of the live neighbours")
    for peer, tag in zip(live, request["tags"], strict=True):
        pair = pair_keys(
            secrets.mask_key,
            state.node_id,
            secrets.mask_keys[peer],
            peer,
            state.nonce,
            secrets.round,
        )
        if not keys.mac_ok(pair.mac_key, tag_message(peer, state.node_id, secrets.view), tag):
            raise RefusedError(
                Refusal.INCONSISTENT_VIEW,
                f"node {peer} masked under another view of round {secrets.round} "
                "(model, config, run config or cohort)",
            )
    if identity is not None:
        check_signatures(state, secrets, request, survivors, dropped, identity, max_colluders)
    alive = set(survivors)
    reply: dict = {"round": secrets.round, "b-of": [], "b-shares": [], "sk-of": [], "sk-shares": []}
    for owner in sorted(secrets.held):
        sk_share, b_share = secrets.held[owner]
        if owner in alive:
            reply["b-of"].append(owner)
            reply["b-shares"].append(b_share)
        else:
            reply["sk-of"].append(owner)
            reply["sk-shares"].append(sk_share)
    secrets.answered = True
    secrets.forget_secrets()
    return reply


# -- checks ---------------------------------------------------------------------------


def _checked_lists(state: ClientState, request: dict) -> tuple[RoundSecrets, list[int], list[int]]:
    """The survivor and dropped lists of a request, after every check a node makes.

    Survivors are summed; dropped nodes are not (``excluded`` ones among them uploaded
    but were left out, e.g. for an incomplete group: alive, they still hold shares).
    """
    rnd, _ = _check_round_request(state, request)
    secrets = _round(state, rnd)
    if not secrets.uploaded:
        raise RefusedError(Refusal.REPLAY, f"this node uploaded nothing in round {rnd}")
    if secrets.answered:
        raise RefusedError(Refusal.REPLAY, f"round {rnd} was already unmasked")
    survivors, dropped = _ids(request, "survivors"), _ids(request, "dropped")
    excluded = _ids(request, "excluded")
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise RefusedError(Refusal.BAD_REQUEST, f"nodes {both} are both survivor and dropped")
    if sorted(survivors + dropped) != secrets.prepared or not set(excluded) <= set(dropped):
        raise RefusedError(Refusal.BAD_REQUEST, "survivors and dropped are not the round's cohort")
    if state.node_id not in survivors and state.node_id not in excluded:
        raise RefusedError(
            Refusal.BAD_REQUEST, "this node uploaded but is neither summed nor excluded"
        )
    if len(survivors) < secrets.min_survivors:
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"{len(survivors)} survivors, the round promised at least {secrets.min_survivors}",
        )
    broken = groups.incomplete_groups(secrets.groups, survivors)
    if broken:
        raise RefusedError(Refusal.GROUPS, f"groups {broken} are incomplete among the survivors")
    live = secrets.live_neighbours(survivors + excluded)
    if state.node_id in survivors and len(live) < secrets.threshold:
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"only {len(live)} live neighbours, fewer than the threshold {secrets.threshold}",
        )
    return secrets, survivors, dropped


def _checked_groups(
    state: ClientState, request: dict, cohort: list[int], floors: ClientFloors
) -> list[list[int]]:
    """The round's groups, recomputed from the run's seed; the cohort must be whole groups."""
    if "group-size" not in request:
        if state.generations or floors.min_group_size:
            raise RefusedError(Refusal.GROUPS, "groups are required in this run, none were sent")
        return []
    size = int(request["group-size"])
    if size < max(2, floors.min_group_size):
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"group size {size}, this node needs {max(2, floors.min_group_size)}",
        )
    try:
        generations = groups.unflatten(
            _ids(request, "generation-nodes"), [int(x) for x in request["generation-sizes"]]
        )
        seed = _bytes(request, "group-seed")
        round_groups = groups.groups_from_generations(generations, size, seed)
    except ValueError as err:
        raise RefusedError(Refusal.GROUPS, f"the groups are not a partition: {err}") from None
    if (state.group_seed and seed != state.group_seed) or (
        generations[: len(state.generations)] != state.generations
    ):
        # Regrouping could let rounds be differenced down to fewer than T nodes.
        raise RefusedError(
            Refusal.GROUPS, "the server regrouped nodes: groups formed earlier changed"
        )
    if state.group_size and size != state.group_size:
        raise RefusedError(Refusal.GROUPS, "the group size changed during the run")
    if not groups.is_union_of_groups(round_groups, cohort):
        raise RefusedError(Refusal.GROUPS, "the cohort is not a union of whole groups")
    state.generations, state.group_seed, state.group_size = generations, seed, size
    return round_groups


def _check_signed_keys(
    state: ClientState,
    request: dict,
    nonce: bytes,
    peers: list[int],
    lt_keys: dict[int, bytes],
    identity: Identity,
) -> None:
    signers, signatures = list(request.get("signing-keys", [])), list(request.get("signatures", []))
    if len(signers) != len(peers) or len(signatures) != len(peers):
        raise RefusedError(Refusal.UNSIGNED, "the server sent keys without their signatures")
    if len(set(signers)) != len(signers):
        raise RefusedError(Refusal.UNSIGNED, "one signing key stands for several nodes")
    for node, signer, signature in zip(peers, signers, signatures, strict=True):
        if signer not in identity.trusted:
            raise RefusedError(Refusal.UNSIGNED, f"node {node}'s signing key is not in the roster")
        if state.signers.get(node, signer) != signer:
            raise RefusedError(Refusal.UNSIGNED, f"node {node}'s signing key changed")
        if not signing.verify(signer, signature, advertise_message(nonce, node, lt_keys[node])):
            raise RefusedError(Refusal.UNSIGNED, f"node {node}'s key signature does not verify")
    state.signers.update(zip(peers, signers, strict=True))


def _check_version(request: dict) -> None:
    if request.get("protocol") != PROTOCOL:
        raise RefusedError(
            Refusal.VERSION, f"protocol {request.get('protocol')!r}, this node speaks {PROTOCOL}"
        )


def _check_round_request(state: ClientState, request: dict) -> tuple[int, bytes]:
    _check_version(request)
    nonce = _bytes(request, "nonce")
    if nonce != state.nonce or not state.lt_key:
        raise RefusedError(Refusal.REPLAY, "the request belongs to another protocol run")
    return int(request["round"]), nonce


def _round(state: ClientState, rnd: int) -> RoundSecrets:
    secrets = state.rounds.get(rnd)
    if secrets is None:
        raise RefusedError(Refusal.REPLAY, f"this node prepared no round {rnd}")
    return secrets


def _split_package(plain: bytes) -> tuple[bytes, bytes, bytes]:
    size = shamir.SHARE_BYTES
    if len(plain) != keys.PUBLIC_KEY_BYTES + 2 * size:
        raise RefusedError(Refusal.BAD_SHARE, "a share package has the wrong length")
    pk = plain[: keys.PUBLIC_KEY_BYTES]
    return pk, plain[keys.PUBLIC_KEY_BYTES : -size], plain[-size:]


def _ids(request: dict, key: str) -> list[int]:
    value = request.get(key)
    if not isinstance(value, list):
        raise RefusedError(Refusal.BAD_REQUEST, f"request field {key!r} is missing or not a list")
    return [int(x) for x in value]


def _bytes(request: dict, key: str) -> bytes:
    value = request.get(key)
    if not isinstance(value, bytes):
        raise RefusedError(Refusal.BAD_REQUEST, f"request field {key!r} is missing or not bytes")
    return value
