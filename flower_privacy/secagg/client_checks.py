"""The checks a client makes on a server request before it reveals anything.

Each failed check raises :class:`RefusedError` with a structured code; the stages in
:mod:`.client` call these (and make their own stage-specific checks).
"""

from __future__ import annotations

from typing import TypeVar

from flower_privacy.secagg import groups, keys, shamir, signing
from flower_privacy.secagg import messages as m
from flower_privacy.secagg._common import Refusal, RefusedError
from flower_privacy.secagg.floors import ClientFloors
from flower_privacy.secagg.state import ClientState, Identity, RoundSecrets
from flower_privacy.secagg.views import advertise_message

M = TypeVar("M")


def checked_lists(
    state: ClientState, req: m.UnmaskRequest
) -> tuple[RoundSecrets, list[int], list[int]]:
    """The survivor and dropped lists of a request, after every check a node makes.

    Survivors are summed; dropped nodes are not (``excluded`` ones among them uploaded
    but were left out, e.g. for an incomplete group: alive, they still hold shares).
    """
    rnd, _ = check_run(state, req)
    secrets = round_of(state, rnd)
    if not secrets.uploaded:
        raise RefusedError(Refusal.REPLAY, f"this node uploaded nothing in round {rnd}")
    if secrets.answered:
        raise RefusedError(Refusal.REPLAY, f"round {rnd} was already unmasked")
    survivors, dropped, excluded = list(req.survivors), list(req.dropped), list(req.excluded)
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


def checked_groups(
    state: ClientState, req: m.PrepareRequest, cohort: list[int], floors: ClientFloors
) -> list[list[int]]:
    """The round's groups, recomputed from the run's seed; the cohort must be whole groups."""
    if not req.group_size:
        if state.generations or floors.min_group_size:
            raise RefusedError(Refusal.GROUPS, "groups are required in this run, none were sent")
        return []
    size, seed = req.group_size, req.group_seed
    if size < max(2, floors.min_group_size):
        raise RefusedError(
            Refusal.BELOW_FLOOR,
            f"group size {size}, this node needs {max(2, floors.min_group_size)}",
        )
    try:
        generations = groups.unflatten(list(req.generation_nodes), list(req.generation_sizes))
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


def check_signed_keys(
    state: ClientState,
    req: m.PrepareRequest,
    peers: list[int],
    lt_keys: dict[int, bytes],
    identity: Identity,
) -> None:
    """The neighbours' long-term keys are signed under the roster, one signer per node."""
    nonce, signers, signatures = req.nonce, list(req.signing_keys), list(req.signatures)
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


def parse_request(cls: type[M], request: dict) -> M:
    """``request`` as the typed message ``cls``, or a refusal naming what is wrong."""
    try:
        return cls.parse(request)  # type: ignore[return-value]
    except m.VersionError as err:
        raise RefusedError(Refusal.VERSION, str(err)) from None
    except m.MessageError as err:
        raise RefusedError(Refusal.BAD_REQUEST, str(err)) from None


def check_run(
    state: ClientState, req: m.PrepareRequest | m.TrainRequest | m.UnmaskRequest
) -> tuple[int, bytes]:
    """(round, nonce) of a request of this node's protocol run."""
    if req.nonce != state.nonce or not state.lt_key:
        raise RefusedError(Refusal.REPLAY, "the request belongs to another protocol run")
    return req.round, req.nonce


def round_of(state: ClientState, rnd: int) -> RoundSecrets:
    """The secrets of a round this node prepared."""
    secrets = state.rounds.get(rnd)
    if secrets is None:
        raise RefusedError(Refusal.REPLAY, f"this node prepared no round {rnd}")
    return secrets


def split_package(plain: bytes) -> tuple[bytes, bytes, bytes]:
    """(owner's round public key, key share, seed share) of an opened share package."""
    size = shamir.SHARE_BYTES
    if len(plain) != keys.PUBLIC_KEY_BYTES + 2 * size:
        raise RefusedError(Refusal.BAD_SHARE, "a share package has the wrong length")
    pk = plain[: keys.PUBLIC_KEY_BYTES]
    return pk, plain[keys.PUBLIC_KEY_BYTES : -size], plain[-size:]
