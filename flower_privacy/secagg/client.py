"""Client half of the secure aggregation protocol (see :mod:`.protocol`).

Every check an honest node makes before it reveals anything is here or in
:mod:`.client_checks`; each failed check raises :class:`RefusedError` with a structured code.
"""

from __future__ import annotations

import os

import numpy as np

from flower_privacy.secagg import canonical, graph, groups, keys, shamir, signing
from flower_privacy.secagg import messages as m
from flower_privacy.secagg._common import Refusal, RefusedError, UnmaskRule
from flower_privacy.secagg._common import mask_sign as _sign
from flower_privacy.secagg.client_checks import (
    check_run,
    check_signed_keys,
    checked_groups,
    checked_lists,
    parse_request,
    round_of,
    split_package,
)
from flower_privacy.secagg.consistency import check_signatures
from flower_privacy.secagg.floors import ClientFloors
from flower_privacy.secagg.prg import MaskBuffer
from flower_privacy.secagg.quantize import Encoder, word_dtype
from flower_privacy.secagg.state import ClientState, Identity, RoundSecrets
from flower_privacy.secagg.views import (
    RoundPairs,
    SealKeys,
    advertise_message,
    package_ad,
    round_view,
    self_seed_commitment,
    share_commitments,
    tag_message,
    view_digest,
)

_SELF = b"self-mask|"
_PAIR = b"pair-mask|"


def client_advertise(state: ClientState, request: dict, identity: Identity | None = None) -> dict:
    """Return this node's sealing key for the protocol run, signed with ``identity``.

    A new protocol run (nonce) gets a new sealing key, and a nonce seen before is
    refused: packages sealed in an old run can never be opened again, so an old run
    cannot be replayed to make holders reveal a second secret of one owner.
    """
    nonce = parse_request(m.AdvertiseRequest, request).nonce
    if nonce != state.nonce:
        if nonce in state.old_nonces:
            raise RefusedError(Refusal.REPLAY, "this protocol run ended: its nonce is not reused")
        # Groups and signing keys stay: they belong to the Flower run.
        if state.nonce:
            state.old_nonces.append(state.nonce)
        state.nonce, state.rounds, state.last_prepared = nonce, {}, 0
        state.lt_key = keys.generate_private_key()
    public = keys.public_key(state.lt_key)
    if identity is None:
        return m.AdvertiseReply(lt_key=public).to_dict()
    return m.AdvertiseReply(
        lt_key=public,
        signing_key=signing.signing_public_key(identity.signing_key),
        key_signature=signing.sign(
            identity.signing_key, advertise_message(nonce, state.node_id, public)
        ),
    ).to_dict()


def client_prepare(
    state: ClientState,
    request: dict,
    floors: ClientFloors,
    identity: Identity | None = None,
) -> dict:
    """Make this round's secrets and share them, sealed, among the round neighbours."""
    req = parse_request(m.PrepareRequest, request)
    rnd, nonce = check_run(state, req)
    if rnd <= state.last_prepared:
        raise RefusedError(Refusal.REPLAY, f"round {rnd} is not after round {state.last_prepared}")
    cohort = list(req.cohort)
    if cohort != sorted(set(cohort)) or state.node_id not in cohort:
        raise RefusedError(Refusal.BAD_REQUEST, "the cohort is not a sorted list holding this node")
    if len(cohort) < floors.min_cohort:
        raise RefusedError(
            Refusal.BELOW_FLOOR, f"cohort of {len(cohort)}, this node needs {floors.min_cohort}"
        )
    degree, t, seed = req.degree, req.threshold, req.graph_seed
    try:
        peers = graph.Ring(cohort, degree, seed).neighbours_of(state.node_id)
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
    if list(req.keys_of) != peers or len(req.keys) != len(peers):
        raise RefusedError(Refusal.BAD_REQUEST, "long-term keys are not those of the neighbours")
    lt_keys = dict(zip(peers, req.keys, strict=True))
    if identity is not None:
        check_signed_keys(state, req, peers, lt_keys, identity)
    round_groups = checked_groups(state, req, cohort, floors)
    min_survivors = max(floors.min_survivors, req.min_survivors)

    mask_key, self_seed = keys.generate_private_key(), os.urandom(32)
    mask_public = keys.public_key(mask_key)
    sk_shares = shamir.split(mask_key, t, len(peers))
    b_shares = shamir.split(self_seed, t, len(peers))
    packages, commit_sk, commit_b = [], [], []
    commit = share_commitments(nonce, rnd)
    seal_keys = SealKeys(state.lt_key, state.node_id, nonce)
    # The same keys open the neighbours' packages at masking: derived once, kept a round.
    package_keys = {peer: seal_keys.with_peer(lt_keys[peer], peer) for peer in peers}
    for peer, sk_share, b_share in zip(peers, sk_shares, b_shares, strict=True):
        ad = package_ad(nonce, rnd, state.node_id, peer)
        packages.append(keys.seal(package_keys[peer], mask_public + sk_share + b_share, ad))
        commit_sk.append(commit(state.node_id, peer, "sk", sk_share))
        commit_b.append(commit(state.node_id, peer, "b", b_share))
    # Older rounds can never be unmasked again (the server moved on): forget them.
    state.rounds = {r: s for r, s in state.rounds.items() if r >= rnd - 1}
    state.rounds[rnd] = RoundSecrets(
        round=rnd,
        cohort=cohort,
        degree=degree,
        threshold=t,
        graph_seed=seed,
        neighbours=peers,
        seal_keys=package_keys,
        mask_key=mask_key,
        self_seed=self_seed,
        min_survivors=min_survivors,
        groups=round_groups,
    )
    state.last_prepared = rnd
    state.participated = True
    return m.PrepareReply(
        round=rnd,
        mask_key=mask_public,
        seed_commitment=self_seed_commitment(nonce, rnd, state.node_id, self_seed),
        to=peers,
        packages=packages,
        commit_sk=commit_sk,
        commit_b=commit_b,
    ).to_dict()


def client_mask(
    state: ClientState,
    request: dict,
    update: np.ndarray,
    weight: int,
    encoder: Encoder,
    content_digest: bytes,
    min_noise_multiplier: float = 0.0,
    max_colluders: int = 0,
) -> tuple[dict, dict]:
    """Mask ``weight * update`` for the round; returns (upload, report of what was clipped).

    ``content_digest`` is the canonical digest of the training message (model, config)
    and the node's run config: it enters every pairwise mask and the view tags. A node
    with a noise floor refuses an encoder whose promised noise is below it.
    """
    req = parse_request(m.TrainRequest, request)
    rnd, nonce = check_run(state, req)
    secrets = round_of(state, rnd)
    if secrets.uploaded or secrets.prepared:
        raise RefusedError(Refusal.REPLAY, f"round {rnd} was already trained")
    prepared = list(req.prepared)
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
    if min_noise_multiplier > 0:
        # Colluding survivors may add no noise: count only the honest ones.
        honest = secrets.min_survivors - max_colluders
        promised = getattr(encoder, "noise_multiplier", None)
        noise = 0.0 if promised is None else promised(honest, int(np.asarray(update).size))
        if noise < min_noise_multiplier:
            raise RefusedError(
                Refusal.BELOW_FLOOR,
                f"distributed DP noise multiplier {noise:.4g} (over the rounded update's L2 "
                f"bound) from {max(honest, 0)} honest survivors of {secrets.min_survivors}, "
                f"this node needs {min_noise_multiplier}",
            )
    live = secrets.live_neighbours(prepared)
    if len(live) < secrets.threshold:
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"{len(live)} neighbours prepared, fewer than the threshold {secrets.threshold}",
        )
    if list(req.from_) != live or not (
        len(req.packages)
        == len(req.commit_sk)
        == len(req.commit_b)
        == len(req.mask_keys)
        == len(live)
    ):
        raise RefusedError(Refusal.BAD_REQUEST, "share packages are not those of the neighbours")
    # Everything is checked before any state changes: a bad package refuses the round
    # cleanly (naming its owner), and the server may ask again without it.
    held, pairs = {}, {}
    commit = share_commitments(nonce, rnd)
    round_pairs = RoundPairs(secrets.mask_key, state.node_id, nonce, rnd)
    for owner, blob, c_sk, c_b, committed in zip(
        live, req.packages, req.commit_sk, req.commit_b, req.mask_keys, strict=True
    ):
        try:
            plain = keys.open_sealed(
                secrets.seal_keys[owner], blob, package_ad(nonce, rnd, owner, state.node_id)
            )
        except keys.DecryptionError:
            raise RefusedError(
                Refusal.BAD_SHARE, f"the share package of node {owner} failed authentication"
            ) from None
        mask_public, sk_share, b_share = split_package(plain)
        if commit(owner, state.node_id, "sk", sk_share) != c_sk or (
            commit(owner, state.node_id, "b", b_share) != c_b
        ):
            raise RefusedError(
                Refusal.BAD_SHARE, f"node {owner}'s shares do not match their commitments"
            )
        # The key the owner committed to the server: the one its key shares rebuild.
        if mask_public != committed:
            raise RefusedError(
                Refusal.BAD_SHARE, f"node {owner} gave holders another round key than the server"
            )
        try:
            pairs[owner] = round_pairs.with_peer(mask_public, owner)
        except ValueError:
            raise RefusedError(Refusal.BAD_SHARE, f"node {owner}'s round key is invalid") from None
        held[owner] = [sk_share, b_share]
    secrets.held, secrets.prepared = held, prepared
    # Unmasking checks the neighbours' view tags with these: no key agreement again.
    secrets.tag_keys = {owner: pair.mac_key for owner, pair in pairs.items()}
    secrets.view = view_digest(nonce, secrets, content_digest)

    encoded = encoder.encode(update, weight)
    bits = encoder.word_bits
    words = word_dtype(bits)
    if encoded.values.dtype != words:
        raise ValueError(f"the encoder gave {encoded.values.dtype} words, not {bits}-bit ones")
    vector = np.concatenate(
        [encoded.values, np.array([encoded.weight, encoded.clipped], dtype=words)]
    )
    self_context = _SELF + canonical.encode([nonce, rnd])
    masks = MaskBuffer(vector.size, bits)
    vector += masks.expand(secrets.self_seed, self_context)
    tags = []
    for peer in live:
        pair = pairs[peer]
        mask = masks.expand(pair.mask_seed(secrets.view), _PAIR)
        if _sign(state.node_id, peer) > 0:
            vector += mask
        else:
            vector -= mask  # unsigned arithmetic wraps modulo 2^bits
        tags.append(keys.mac(pair.mac_key, tag_message(state.node_id, peer, secrets.view)))
    secrets.uploaded = True
    secrets.forget_own_secrets()
    upload = m.Upload(
        round=rnd,
        masked=vector.astype(words, copy=False).tobytes(),
        view=secrets.view,
        tags_to=live,
        tags=tags,
    ).to_dict()
    return upload, {"clipped": encoded.clipped, "weight-capped": int(encoded.weight_capped)}


def client_sign(state: ClientState, request: dict, identity: Identity) -> dict:
    """Consistency check: sign the one round view this node was shown, once per round."""
    req = parse_request(m.UnmaskRequest, request)
    secrets, survivors, dropped = checked_lists(state, req)
    if secrets.signed:
        raise RefusedError(Refusal.REPLAY, f"round {secrets.round}'s view was already signed")
    secrets.signed = round_view(state.nonce, secrets, survivors, dropped, list(req.excluded))
    signature = signing.sign(identity.signing_key, secrets.signed)
    return m.SignReply(round=secrets.round, signature=signature).to_dict()


def client_unmask(
    state: ClientState,
    request: dict,
    rule: UnmaskRule | None = None,
    identity: Identity | None = None,
    max_colluders: int = 0,
) -> dict:
    """Check the server's request; reveal one share per neighbour and never both secrets."""
    req = parse_request(m.UnmaskRequest, request)
    secrets, survivors, dropped = checked_lists(state, req)
    if rule is not None and (why := rule(survivors, dropped, secrets.prepared)) is not None:
        raise RefusedError(Refusal.GROUPS, f"unmask rule: {why}")
    live = secrets.live_neighbours(survivors)
    if list(req.tags_from) != live or len(req.tags) != len(live):
        raise RefusedError(Refusal.BAD_REQUEST, "view tags are not those of the live neighbours")
    for peer, tag in zip(live, req.tags, strict=True):
        if not keys.mac_ok(
            secrets.tag_keys[peer], tag_message(peer, state.node_id, secrets.view), tag
        ):
            raise RefusedError(
                Refusal.INCONSISTENT_VIEW,
                f"node {peer} masked under another view of round {secrets.round} "
                "(model, config, run config or cohort)",
            )
    if identity is not None:
        check_signatures(state, secrets, req, survivors, dropped, identity, max_colluders)
    alive = set(survivors)
    b_of = [owner for owner in sorted(secrets.held) if owner in alive]
    sk_of = [owner for owner in sorted(secrets.held) if owner not in alive]
    reply = m.UnmaskReply(
        round=secrets.round,
        b_of=b_of,
        b_shares=[secrets.held[owner][1] for owner in b_of],
        sk_of=sk_of,
        sk_shares=[secrets.held[owner][0] for owner in sk_of],
    )
    secrets.answered = True
    secrets.forget_secrets()
    return reply.to_dict()
