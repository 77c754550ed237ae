"""The consistency check a holder runs before it reveals anything (signing keys only).

Every survivor signs one canonical round view R (:func:`.views.round_view`). A holder
releases a share of owner w only if at least t_w > (|H_w| + c) / 2 members of w's
holder set H_w signed the same R as it did. Honest nodes sign one R per round, so two
different views can never both reach t_w signatures from H_w: the server cannot show
one part of a neighbourhood "w survived" and another "w dropped".
"""

from __future__ import annotations

from flower_privacy.secagg import graph, signing
from flower_privacy.secagg._common import Refusal, RefusedError
from flower_privacy.secagg.floors import required_threshold
from flower_privacy.secagg.messages import UnmaskRequest
from flower_privacy.secagg.state import ClientState, Identity, RoundSecrets
from flower_privacy.secagg.views import advertise_message, round_view


def check_signatures(
    state: ClientState,
    secrets: RoundSecrets,
    req: UnmaskRequest,
    survivors: list[int],
    dropped: list[int],
    identity: Identity,
    max_colluders: int,
) -> None:
    """Raise :class:`RefusedError` unless enough holders of every owner signed our view."""
    expected = round_view(state.nonce, secrets, survivors, dropped, list(req.excluded))
    if not secrets.signed:
        raise RefusedError(Refusal.UNSIGNED, "this node signed no view of the round")
    if secrets.signed != expected:
        raise RefusedError(Refusal.UNSIGNED, "the unmask lists differ from the view it signed")
    columns = [
        req.signers,
        req.signatures,
        req.signer_keys,
        req.signer_lt_keys,
        req.signer_bindings,
    ]
    if len({len(c) for c in columns}) != 1:
        raise RefusedError(Refusal.UNSIGNED, "malformed signature lists")
    signers, keys_seen = list(req.signers), list(req.signer_keys)
    if len(set(keys_seen)) != len(keys_seen) or len(set(signers)) != len(signers):
        raise RefusedError(Refusal.UNSIGNED, "one signer or signing key appears twice")
    valid: set[int] = set()
    for node, signature, key, lt_key, binding in zip(signers, *columns[1:], strict=True):
        if key not in identity.trusted or state.signers.get(node, key) != key:
            continue
        # The binding proves that this key's owner is node `node` (it signed its id).
        if not signing.verify(key, binding, advertise_message(state.nonce, node, lt_key)):
            continue
        if signing.verify(key, signature, expected):
            valid.add(node)
            state.signers[node] = key
    ring = graph.Ring(secrets.cohort, secrets.degree, secrets.graph_seed)
    for owner in secrets.held:
        holders = ring.neighbours_of(owner)
        needed = required_threshold(len(holders), max_colluders)
        have = len(valid.intersection(holders))
        if have < needed:
            raise RefusedError(
                Refusal.UNSIGNED,
                f"only {have} of node {owner}'s holders signed this node's view, {needed} needed "
                "(the server may show different nodes different views)",
            )
