"""The Flower-free secure aggregation protocol: correctness, dropouts, refusals.

Protocol version 3 (round-scoped secrets): advertise (long-term keys, once), then per
round prepare, train/upload, the optional consistency stage and unmask.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_privacy.secagg import canonical, keys, shamir, signing
from flower_privacy.secagg import client as secagg_client
from flower_privacy.secagg import protocol as p
from flower_privacy.secagg._common import mask_sign
from flower_privacy.secagg.floors import (
    MAX_COLLUDERS,
    MIN_COHORT,
    MIN_DEGREE,
    MIN_GROUP_SIZE,
    MIN_SURVIVORS,
    REQUIRED,
    _tails,
    required_threshold,
    safe_degree,
)
from flower_privacy.secagg.prg import expand_mask
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.secagg.views import RoundPairs, advertise_message, self_seed_commitment

# Flower-free cores: run on the main Flower version only.
pytestmark = pytest.mark.once

QUANT = Quantizer(clip_range=4.0, max_weight=100, max_clients=50)
CONTENT = b"the round's model, config and run config"


class Federation:
    """n clients and a server exchanging the protocol's dicts directly.

    Client states go through ``to_bytes``/``from_bytes`` after every call, as the mod
    keeps them in ``context.state``. Every request and reply is recorded per round.
    """

    def __init__(
        self,
        n: int,
        *,
        degree: int | None = None,
        max_colluders: int = 0,
        first_id: int = 101,
        consistency: bool = False,
        floors: p.ClientFloors | None = None,
    ) -> None:
        self.ids = list(range(first_id, first_id + n))
        self.max_colluders = max_colluders
        self.server = p.SecAggServer(
            max_colluders=max_colluders, degree=degree, consistency=consistency
        )
        self.floors = floors or p.ClientFloors(max_colluders=max_colluders)
        self.clients = {i: p.ClientState(node_id=i) for i in self.ids}
        self.identities: dict[int, p.Identity | None] = {i: None for i in self.ids}
        if consistency:
            private = {i: signing.generate_signing_key() for i in self.ids}
            roster = frozenset(signing.signing_public_key(k) for k in private.values())
            self.identities = {i: p.Identity(private[i], roster) for i in self.ids}
        self.prepare_replies: dict[int, dict[int, dict]] = {}
        self.train_reqs: dict[int, dict[int, dict]] = {}
        self.uploads: dict[int, dict[int, dict]] = {}
        self.unmask_reqs: dict[int, dict[int, dict]] = {}
        self.unmask_replies: dict[int, dict[int, dict]] = {}
        self.advertise(self.ids)

    def call(self, node: int, fn: Callable, *args, **kwargs):  # noqa: ANN201
        """``fn(state, *args)`` for ``node``; its state persists through bytes."""
        try:
            return fn(self.clients[node], *args, **kwargs)
        finally:
            self.clients[node] = p.ClientState.from_bytes(self.clients[node].to_bytes())

    def advertise(self, nodes: Iterable[int]) -> None:
        for node in self.server.nodes_to_advertise(list(nodes)):
            request = self.server.advertise_request()
            reply = self.call(node, p.client_advertise, request, self.identities[node])
            self.server.accept_advertisement(node, reply)

    def prepare(
        self, rnd: int, cohort: list[int] | None = None, *, silent=(), extra=None
    ) -> dict[int, dict]:
        requests = self.server.prepare_requests(rnd, cohort or self.ids, extra or {})
        self.prepare_replies[rnd] = {}
        for node, request in requests.items():
            if node in silent:
                continue
            reply = self.call(node, p.client_prepare, request, self.floors, self.identities[node])
            self.prepare_replies[rnd][node] = reply
            assert self.server.accept_prepare(rnd, node, reply) is None
        return requests

    def train(self, rnd: int, updates, weights, *, silent=(), lost=(), content=None) -> None:  # noqa: ANN001
        """Prepared nodes mask; ``silent`` never get to train, ``lost`` uploads never arrive."""
        length = len(next(iter(updates.values())))
        self.train_reqs[rnd] = self.server.train_requests(rnd)
        self.uploads[rnd] = {}
        for node, request in self.train_reqs[rnd].items():
            if node in silent:
                continue
            digest = (content or {}).get(node, CONTENT)
            upload, _ = self.call(
                node, p.client_mask, request, updates[node], weights[node], QUANT, digest
            )
            self.uploads[rnd][node] = upload
            if node not in lost:
                assert self.server.accept_upload(rnd, node, upload, length) is None

    def sign(self, rnd: int, *, silent=(), shown: dict[int, dict] | None = None) -> None:
        signed = {}
        for node, request in self.server.consistency_requests(rnd).items():
            if node in silent:
                continue
            request = dict(request, **(shown or {}).get(node, {}))
            signed[node] = self.call(node, p.client_sign, request, self.identities[node])
        self.server.accept_consistency(rnd, signed)

    def reveal(self, rnd: int, *, silent=(), unsigned=(), rule=None) -> dict[int, dict]:  # noqa: ANN001
        """Survivors reveal; ``unsigned`` nodes (absent at consistency) must refuse."""
        self.unmask_reqs[rnd] = self.server.unmask_requests(rnd)
        self.unmask_replies[rnd] = {}
        for node, request in self.unmask_reqs[rnd].items():
            if node in unsigned:
                refused(p.Refusal.UNSIGNED, self.unmask, node, request, rule=rule)
            elif node not in silent:
                self.unmask_replies[rnd][node] = self.unmask(node, request, rule=rule)
        return self.unmask_replies[rnd]

    def unmask(self, node: int, request: dict, rule=None) -> dict:  # noqa: ANN001
        return self.call(
            node, p.client_unmask, request, rule, self.identities[node], self.max_colluders
        )

    def round(
        self,
        rnd: int,
        updates,  # noqa: ANN001
        weights,  # noqa: ANN001
        *,
        cohort: list[int] | None = None,
        drop_in_prepare=(),
        drop_after_prepare=(),
        drop_before_upload=(),
        drop_in_consistency=(),
        drop_in_unmask=(),
    ) -> p.RoundResult:
        length = len(next(iter(updates.values())))
        self.prepare(rnd, cohort or sorted(updates), silent=drop_in_prepare)
        self.train(rnd, updates, weights, silent=drop_after_prepare, lost=drop_before_upload)
        if self.server.consistency:
            self.sign(rnd, silent=drop_in_consistency)
        replies = self.reveal(rnd, silent=drop_in_unmask, unsigned=drop_in_consistency)
        return self.server.unmask(rnd, replies, length)

    def uploaded(self, rnd: int = 1, dim: int = 8) -> dict[int, dict]:
        """Every node prepares and uploads a random update; returns the unmask requests."""
        updates, weights = _updates(self.ids, dim)
        self.prepare(rnd)
        self.train(rnd, updates, weights)
        if self.server.consistency:
            self.sign(rnd)
        return self.server.unmask_requests(rnd)


def _updates(ids, dim, seed=0):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, dim) for i in ids}, {i: int(rng.integers(1, 100)) for i in ids}


def _expected(updates, weights, nodes):  # noqa: ANN001, ANN202
    total_w = sum(weights[n] for n in nodes)
    return sum(weights[n] * updates[n] for n in nodes) / total_w, total_w


def _assert_mean(result: p.RoundResult, updates, weights, survivors) -> None:  # noqa: ANN001
    mean, total_w = _expected(updates, weights, survivors)
    assert result.survivors == sorted(survivors)
    assert result.weight == total_w
    bound = len(survivors) * QUANT.resolution / total_w
    np.testing.assert_allclose(QUANT.decode_sum(result.total, result.weight), mean, atol=bound)


def refused(code: str, fn: Callable, *args, **kwargs) -> p.RefusedError:
    """``fn(*args)`` must raise a RefusedError with ``code``; returns the error."""
    with pytest.raises(p.RefusedError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"expected {code}, got {info.value}"
    return info.value


def _without(request: dict, node: int) -> dict:
    """An unmask request in which ``node`` dropped: lists and view tags moved to match."""
    keep = [i for i, v in enumerate(request["tags-from"]) if v != node]
    return dict(
        request,
        survivors=[v for v in request["survivors"] if v != node],
        dropped=sorted([*request["dropped"], node]),
        **{
            "tags-from": [request["tags-from"][i] for i in keep],
            "tags": [request["tags"][i] for i in keep],
        },
    )


def _shifted(share: bytes) -> bytes:
    """A well-formed share of another secret: every field value plus one."""
    (x,) = struct.unpack("<I", share[:4])
    values = np.frombuffer(share[4:], dtype="<u4").astype(np.int64)
    return struct.pack("<I", x) + ((values + 1) % shamir.PRIME).astype("<u4").tobytes()


# -- correctness and dropouts ------------------------------------------------------------


@pytest.mark.parametrize(("n", "degree"), [(3, None), (8, None), (12, 4), (40, None)])
def test_secure_sum_equals_weighted_mean(n, degree) -> None:  # noqa: ANN001
    fed = Federation(n, degree=degree)
    updates, weights = _updates(fed.ids, 257)
    result = fed.round(1, updates, weights)
    assert result.dropped == [] and result.bad_holders == []
    _assert_mean(result, updates, weights, fed.ids)


def test_real_flower_node_ids_use_all_64_bits() -> None:
    # SuperLinks hand out unsigned 64-bit node ids; the largest must work everywhere.
    fed = Federation(5, first_id=2**64 - 5)
    assert fed.ids[-1] == 2**64 - 1
    updates, weights = _updates(fed.ids, 32)
    result = fed.round(1, updates, weights, drop_before_upload=[2**64 - 3])
    assert result.dropped == [2**64 - 3]
    _assert_mean(result, updates, weights, [i for i in fed.ids if i != 2**64 - 3])


def test_dropouts_at_prepare_after_prepare_after_upload_and_in_unmask_are_survived() -> None:
    # A complete graph of 10 (k = 9, t = 5): four nodes missing leave exactly t shares.
    fed = Federation(10, degree=9)
    updates, weights = _updates(fed.ids, 64, seed=1)
    result = fed.round(
        1,
        updates,
        weights,
        drop_in_prepare=[102],
        drop_after_prepare=[103],
        drop_before_upload=[107],
        drop_in_unmask=[105],
    )
    assert result.dropped == [103, 107]  # 102 never prepared: not part of the round
    _assert_mean(result, updates, weights, [i for i in fed.ids if i not in (102, 103, 107)])
    # Nothing re-keys: every node, the dropouts included, takes part in the next rounds.
    updates, weights = _updates(fed.ids, 64, seed=2)
    _assert_mean(fed.round(2, updates, weights), updates, weights, fed.ids)
    result = fed.round(3, updates, weights, drop_after_prepare=[105])
    _assert_mean(result, updates, weights, [i for i in fed.ids if i != 105])


def test_too_many_silent_in_unmask_fails_loudly() -> None:
    fed = Federation(6)
    updates, weights = _updates(fed.ids, 16)
    with pytest.raises(p.ProtocolError, match="too many holders dropped or refused"):
        fed.round(1, updates, weights, drop_in_unmask=[101, 102, 103, 104])


def test_a_single_upload_is_indistinguishable_from_random() -> None:
    fed = Federation(5)
    fed.prepare(1)
    request = fed.server.train_requests(1)[101]
    upload, _ = fed.call(101, p.client_mask, request, np.zeros(4096), 1, QUANT, CONTENT)
    masked = np.frombuffer(upload["masked"], dtype="<u4")
    # An all-zero update masks to uniform words: mean near 2^31, no zeros to speak of.
    assert abs(masked.mean() / 2**31 - 1) < 0.05 and np.count_nonzero(masked == 0) < 3


def test_the_server_checks_its_own_parameters() -> None:
    with pytest.raises(ValueError, match="max_colluders"):
        p.SecAggServer(max_colluders=-1)
    with pytest.raises(ValueError, match="degree"):
        p.SecAggServer(degree=1)
    fed = Federation(6)
    with pytest.raises(p.ProtocolError, match="no long-term key"):
        fed.server.prepare_requests(1, [*fed.ids, 999], {})
    with pytest.raises(p.ProtocolError, match="needs 3"):
        fed.server.prepare_requests(1, fed.ids[:2], {})
    strict = Federation(4, max_colluders=3)  # k = 3 holders cannot meet t = 4
    with pytest.raises(p.ProtocolError, match="cannot meet the threshold"):
        strict.server.prepare_requests(1, strict.ids, {})


# -- round-scoped secrets ------------------------------------------------------------------


def _strip_masks(fed: Federation, node: int, rnd: int, key: bytes, seed: bytes) -> np.ndarray:
    """What a server gets from ``node``'s round-``rnd`` upload with ``key`` and ``seed``."""
    upload = fed.uploads[rnd][node]
    nonce = fed.server.nonce
    vector = np.frombuffer(upload["masked"], dtype="<u4").copy()
    vector -= expand_mask(seed, secagg_client._SELF + canonical.encode([nonce, rnd]), vector.size)
    for peer in upload["tags-to"]:
        peer_key = fed.prepare_replies[rnd][peer]["mask-key"]
        pair = RoundPairs(key, node, nonce, rnd).with_peer(peer_key, peer)
        mask = expand_mask(pair.mask_seed(upload["view"]), secagg_client._PAIR, vector.size)
        if mask_sign(node, peer) > 0:
            vector -= mask
        else:
            vector += mask
    return vector


def _rebuild(replies: dict[int, dict], kind: str, owner: int, t: int) -> bytes:
    shares = [
        share
        for reply in replies.values()
        for of, share in zip(reply[f"{kind}-of"], reply[f"{kind}-shares"], strict=True)
        if of == owner
    ]
    assert len(shares) >= t
    return shamir.combine(shares, t)


def test_a_round_key_rebuilt_for_a_dropout_unmasks_no_other_round() -> None:
    dim, victim = 4096, 103
    fed = Federation(6)
    t = fed.server.prepare_requests(1, fed.ids, {})[victim]["threshold"]
    rng = np.random.default_rng(5)
    updates = {i: rng.uniform(-1, 1, dim) for i in fed.ids}
    weights = dict.fromkeys(fed.ids, 1)
    # Round 1: the victim survives; the server legitimately learns its self-mask seed.
    fed.prepare(1)
    key_1 = fed.clients[victim].rounds[1].mask_key  # the victim's secret, for the control
    fed.train(1, updates, weights)
    fed.reveal(1)
    _assert_mean(fed.server.unmask(1, fed.unmask_replies[1], dim), updates, weights, fed.ids)
    seed_1 = _rebuild(fed.unmask_replies[1], "b", victim, t)
    commitment = fed.prepare_replies[1][victim]["seed-commitment"]
    assert self_seed_commitment(fed.server.nonce, 1, victim, seed_1) == commitment
    assert fed.clients[victim].rounds[1].mask_key == b""  # forgotten after unmasking
    # Round 2: the victim drops after prepare; the server learns its round-2 key.
    others = [i for i in fed.ids if i != victim]
    result = fed.round(2, updates, weights, drop_after_prepare=[victim])
    _assert_mean(result, updates, weights, others)
    key_2 = _rebuild(fed.unmask_replies[2], "sk", victim, t)
    assert keys.public_key(key_2) == fed.prepare_replies[2][victim]["mask-key"]
    assert key_2 != key_1
    assert keys.public_key(key_2) != fed.prepare_replies[1][victim]["mask-key"]
    # Control: with the victim's real round-1 key, the server would read its update.
    true_update = updates[victim]
    with_real_key = QUANT.decode_sum(_strip_masks(fed, victim, 1, key_1, seed_1)[:dim], 1)
    np.testing.assert_allclose(with_real_key, true_update, atol=2 * QUANT.resolution)
    # Everything the server did learn leaves the round-1 upload looking random.
    attempt = QUANT.decode_sum(_strip_masks(fed, victim, 1, key_2, seed_1)[:dim], 1)
    assert abs(np.corrcoef(attempt, true_update)[0, 1]) < 0.1


def test_a_node_keeps_at_most_two_rounds_of_secrets() -> None:
    fed = Federation(5)
    updates, weights = _updates(fed.ids, 8)
    for rnd in (1, 2, 3):
        fed.round(rnd, updates, weights)
    fed.prepare(4)
    assert sorted(fed.clients[101].rounds) == [3, 4]
    assert fed.clients[101].rounds[3].held == {} and fed.clients[101].rounds[3].self_seed == b""
    assert len(fed.clients[101].rounds[4].held) == 0  # shares arrive with the train request
    refused(p.Refusal.REPLAY, fed.call, 101, p.client_prepare, _prepare_request(fed, 3), fed.floors)


def _prepare_request(fed: Federation, rnd: int, node: int = 101) -> dict:
    """A fresh honest prepare request for ``node`` (the server starts round ``rnd`` anew)."""
    return fed.server.prepare_requests(rnd, fed.ids, {})[node]


# -- a dishonest server: every refusal has its code ---------------------------------------


def test_refuses_a_node_listed_as_survivor_and_dropped() -> None:
    # Flower's known attack: the victim's pairwise masks via its "dropped" key shares,
    # its self mask via its "survivor" shares.
    fed = Federation(6)
    requests = fed.uploaded()
    attack = dict(requests[101], dropped=[102])
    err = refused(p.Refusal.BAD_REQUEST, fed.unmask, 101, attack)
    assert "102" in err.detail
    # The refusal costs nothing: the honest request is still answered afterwards.
    assert fed.unmask(101, requests[101])["round"] == 1


def test_refuses_share_packages_of_a_node_outside_its_neighbourhood() -> None:
    fed = Federation(12, degree=4)
    fed.prepare(1)
    request = fed.server.train_requests(1)[101]
    stranger = next(i for i in fed.ids if i != 101 and i not in request["from"])
    forged = dict(
        request,
        **{
            "from": [*request["from"], stranger],
            "packages": [*request["packages"], request["packages"][0]],
            "commit-sk": [*request["commit-sk"], request["commit-sk"][0]],
            "commit-b": [*request["commit-b"], request["commit-b"][0]],
        },
    )
    updates, weights = _updates(fed.ids, 8)
    refused(
        p.Refusal.BAD_REQUEST,
        fed.call,
        101,
        p.client_mask,
        forged,
        updates[101],
        1,
        QUANT,
        CONTENT,
    )


def test_refuses_fewer_survivors_than_the_threshold() -> None:
    fed = Federation(8)  # complete graph: k = 7, t = 4
    requests = fed.uploaded()
    target = requests[101]
    forged = dict(target, survivors=[101, 102, 103], dropped=[104, 105, 106, 107, 108])
    err = refused(p.Refusal.BELOW_FLOOR, fed.unmask, 101, forged)
    assert "threshold 4" in err.detail
    forged = dict(target, survivors=[101, 102], dropped=[103, 104, 105, 106, 107, 108])
    refused(p.Refusal.BELOW_FLOOR, fed.unmask, 101, forged)  # and below min-survivors


def test_refuses_replays_of_another_round_run_or_version() -> None:
    fed = Federation(6)
    requests = fed.uploaded()
    request = requests[101]
    refused(p.Refusal.REPLAY, fed.unmask, 101, dict(request, nonce=b"x" * 16))
    refused(p.Refusal.REPLAY, fed.unmask, 101, dict(request, round=0))
    refused(p.Refusal.REPLAY, fed.unmask, 101, dict(request, round=2))
    for older in ("flower-privacy-secagg/1", "flower-privacy-secagg/2"):
        refused(p.Refusal.VERSION, fed.unmask, 101, dict(request, protocol=older))
    fed.unmask(101, request)
    refused(p.Refusal.REPLAY, fed.unmask, 101, request)
    # Neither the round's training nor its preparation can be run again.
    train = fed.train_reqs[1][101]
    refused(p.Refusal.REPLAY, fed.call, 101, p.client_mask, train, np.zeros(8), 1, QUANT, CONTENT)
    refused(p.Refusal.REPLAY, fed.call, 101, p.client_prepare, _prepare_request(fed, 1), fed.floors)
    # A request of another protocol run (another server nonce) is refused at every stage.
    other = p.SecAggServer()
    foreign = dict(fed.train_reqs[1][102], nonce=other.nonce)
    refused(p.Refusal.REPLAY, fed.call, 102, p.client_mask, foreign, np.zeros(8), 1, QUANT, CONTENT)


@pytest.mark.parametrize("forged_first", [True, False])
def test_a_holder_answers_one_unmask_request_per_round(forged_first) -> None:  # noqa: ANN001
    # Two requests with different lists would reveal both shares of node 104 (its round
    # key as "dropped", its self-mask seed as "survivor"): only the first is answered.
    fed = Federation(6)
    requests = fed.uploaded()
    honest, forged = requests[101], _without(requests[101], 104)
    first, second = (forged, honest) if forged_first else (honest, forged)
    reply = fed.unmask(101, first)
    assert (104 in reply["sk-of"]) == forged_first and (104 in reply["b-of"]) != forged_first
    refused(p.Refusal.REPLAY, fed.unmask, 101, second)
    secrets = fed.clients[101].rounds[1]
    assert secrets.held == {} and secrets.mask_key == b"" and secrets.self_seed == b""
    # The keys derived for the round's packages and view tags go with it.
    assert secrets.seal_keys == {} and secrets.tag_keys == {}


def test_a_node_keeps_none_of_its_own_round_secrets_after_uploading() -> None:
    # Its round key and self-mask seed now live only as shares with its neighbours: a
    # node whose state leaks between upload and unmask reveals nothing to strip its masks.
    fed = Federation(6)
    fed.uploaded()
    secrets = fed.clients[101].rounds[1]
    assert secrets.uploaded
    assert secrets.mask_key == b"" and secrets.self_seed == b"" and secrets.seal_keys == {}
    assert secrets.held and secrets.tag_keys  # what unmasking still needs


def test_refuses_what_the_pluggable_rule_forbids() -> None:
    fed = Federation(6)
    requests = fed.uploaded()
    seen = []

    def whole_groups_only(survivors, dropped, cohort):  # noqa: ANN001, ANN202
        seen.append((survivors, dropped, cohort))
        return "group {101, 102} is incomplete" if 102 in dropped else None

    forged = _without(requests[101], 102)
    err = refused(p.Refusal.GROUPS, fed.unmask, 101, forged, rule=whole_groups_only)
    assert "group {101, 102}" in err.detail
    assert seen == [([101, 103, 104, 105, 106], [102], fed.ids)]
    assert fed.unmask(101, requests[101], rule=whole_groups_only)["round"] == 1


def test_refuses_tampered_share_packages_and_commitments() -> None:
    fed = Federation(6)
    fed.prepare(1)
    request = fed.server.train_requests(1)[101]

    def mask(forged: dict) -> None:
        fed.call(101, p.client_mask, forged, np.zeros(8), 1, QUANT, CONTENT)

    flipped = list(request["packages"])
    flipped[0] = flipped[0][:-1] + bytes([flipped[0][-1] ^ 1])
    refused(p.Refusal.BAD_SHARE, mask, dict(request, packages=flipped))
    swapped = [request["packages"][1], request["packages"][0], *request["packages"][2:]]
    refused(p.Refusal.BAD_SHARE, mask, dict(request, packages=swapped))  # another owner's
    for name in ("commit-sk", "commit-b"):
        wrong = list(request[name])
        wrong[2] = bytes(32)
        refused(p.Refusal.BAD_SHARE, mask, dict(request, **{name: wrong}))
    mask(request)  # the genuine packages still work


def test_refuses_a_view_that_differs_between_neighbours() -> None:
    # The server sends node 101 another model (or config): its masks do not cancel with
    # its neighbours' and its view tags do not verify, so nobody reveals anything.
    fed = Federation(6)
    updates, weights = _updates(fed.ids, 8)
    fed.prepare(1)
    fed.train(1, updates, weights, content={101: b"another model"})
    requests = fed.server.unmask_requests(1)
    refused(p.Refusal.INCONSISTENT_VIEW, fed.unmask, 101, requests[101])
    err = refused(p.Refusal.INCONSISTENT_VIEW, fed.unmask, 102, requests[102])
    assert "node 101" in err.detail
    # Same content everywhere: the tags verify.
    fed = Federation(6)
    fed.prepare(1)
    fed.train(1, updates, weights, content=dict.fromkeys(fed.ids, b"another model"))
    assert fed.unmask(102, fed.server.unmask_requests(1)[102])["round"] == 1


# -- shares that fail their commitments -----------------------------------------------------


def test_a_holder_revealing_shifted_shares_is_named_and_the_round_completes() -> None:
    fed = Federation(8)  # k = 7, t = 4: six honest holders per owner suffice
    updates, weights = _updates(fed.ids, 32, seed=4)
    fed.prepare(1)
    fed.train(1, updates, weights, lost=[108])
    replies = fed.reveal(1)
    liar = 103
    bad = dict(replies[liar])
    bad["b-shares"] = [_shifted(s) for s in bad["b-shares"]]
    bad["sk-shares"] = [_shifted(s) for s in bad["sk-shares"]]
    assert bad["sk-of"] == [108] and bad["b-shares"]
    result = fed.server.unmask(1, {**replies, liar: bad}, 32)
    assert result.bad_holders == [liar]
    _assert_mean(result, updates, weights, [i for i in fed.ids if i != 108])
    # With too few honest holders left the round fails loudly instead.
    liars = {
        holder: dict(reply, **{"b-shares": [_shifted(s) for s in reply["b-shares"]]})
        for holder, reply in list(replies.items())[:4]
    }
    with pytest.raises(p.ProtocolError, match="valid shares"):
        fed.server.unmask(1, {**replies, **liars}, 32)


@pytest.mark.parametrize(("owner_drops", "what"), [(False, "self-mask seed"), (True, "round key")])
def test_an_owner_whose_shares_miss_its_commitment_is_named(owner_drops, what) -> None:  # noqa: ANN001
    # Node 104 commits to one secret and shares another (holders cannot tell).
    fed = Federation(6)
    updates, weights = _updates(fed.ids, 8)
    requests = fed.server.prepare_requests(1, fed.ids, {})
    for node, request in requests.items():
        reply = fed.call(node, p.client_prepare, request, fed.floors)
        if node == 104:
            field = "mask-key" if owner_drops else "seed-commitment"
            other = keys.public_key(keys.generate_private_key())
            reply = dict(reply, **{field: other})
        assert fed.server.accept_prepare(1, node, reply) is None
    if owner_drops:
        # Its holders compare the key in their packages with the committed one: they
        # refuse before masking, naming the owner.
        holder = next(n for n in fed.server.train_requests(1) if n != 104)
        request = fed.server.train_requests(1)[holder]
        err = refused(
            p.Refusal.BAD_SHARE,
            fed.call,
            holder,
            p.client_mask,
            request,
            updates[holder],
            weights[holder],
            QUANT,
            CONTENT,
        )
        assert "node 104 gave holders another round key" in err.detail
        return
    fed.train(1, updates, weights)
    replies = fed.reveal(1)
    with pytest.raises(p.ProtocolError, match=f"node 104 shared a {what}"):
        fed.server.unmask(1, replies, 8)


# -- client floors ---------------------------------------------------------------------------


def _refuse_prepare(fed: Federation, request: dict, floors: p.ClientFloors | None = None) -> str:
    err = refused(
        p.Refusal.BELOW_FLOOR, fed.call, 101, p.client_prepare, request, floors or fed.floors
    )
    return err.detail


def test_clients_refuse_rounds_below_their_floors() -> None:
    fed = Federation(9, degree=4)
    honest = _prepare_request(fed, 1)
    assert honest["degree"] == 4 and honest["threshold"] == 3
    # A threshold below floor((k + c) / 2) + 1, for this node's own c.
    _refuse_prepare(fed, dict(honest, threshold=2))
    _refuse_prepare(fed, dict(honest, threshold=1))
    _refuse_prepare(fed, dict(honest, threshold=5))  # more than its holders: no liveness
    colluders = p.ClientFloors.from_node_config({MAX_COLLUDERS: "2"})
    assert "needs 4" in _refuse_prepare(fed, honest, colluders)
    # A degree below secagg-min-degree (the graph is recomputed by the node).
    few = p.ClientFloors.from_node_config({MIN_DEGREE: 6})
    assert "needs 6" in _refuse_prepare(fed, honest, few)
    _refuse_prepare(fed, dict(honest, degree=2, threshold=2), p.ClientFloors(min_degree=3))
    # A cohort below secagg-min-cohort.
    big = p.ClientFloors.from_node_config({MIN_COHORT: 10})
    assert "needs 10" in _refuse_prepare(fed, honest, big)
    small = dict(honest, cohort=[101, 102], degree=1, threshold=1)
    _refuse_prepare(fed, small)  # below the protocol's own minimum of 3
    # The honest request passes the default floors.
    assert fed.call(101, p.client_prepare, honest, fed.floors)["round"] == 1


def test_clients_refuse_too_few_prepared_or_missing_groups() -> None:
    fed = Federation(6, floors=p.ClientFloors(min_survivors=6))
    fed.prepare(1, silent=[106])
    request = fed.server.train_requests(1)[101]
    refused(
        p.Refusal.BELOW_FLOOR, fed.call, 101, p.client_mask, request, np.zeros(8), 1, QUANT, CONTENT
    )
    grouped = p.ClientFloors(min_group_size=3)
    refused(
        p.Refusal.GROUPS, fed.call, 102, p.client_prepare, _prepare_request(fed, 2, 102), grouped
    )


def test_floors_from_node_config_only_rise() -> None:
    defaults = p.ClientFloors()
    assert p.ClientFloors.from_node_config({}) == defaults
    assert p.ClientFloors.from_node_config({"partition-id": 3}) == defaults
    floors = p.ClientFloors.from_node_config(
        {
            MAX_COLLUDERS: 2,
            MIN_DEGREE: "6",
            MIN_COHORT: 20,
            MIN_SURVIVORS: 5,
            MIN_GROUP_SIZE: 4,
            REQUIRED: "true",
        }
    )
    assert floors == p.ClientFloors(
        max_colluders=2,
        min_degree=6,
        min_cohort=20,
        min_survivors=5,
        min_group_size=4,
        required=True,
    )
    lowered = p.ClientFloors.from_node_config(
        {MAX_COLLUDERS: -3, MIN_DEGREE: 1, MIN_COHORT: 0, MIN_SURVIVORS: "1"}
    )
    assert lowered == defaults  # a node config cannot go below the safe defaults
    assert p.ClientFloors.from_node_config({REQUIRED: False}).required is False
    assert p.ClientFloors.from_node_config({REQUIRED: "0"}).required is False
    assert floors.threshold_for(10) == required_threshold(10, 2) == 7


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (MIN_DEGREE, True),
        (MIN_DEGREE, 2.5),
        (MIN_COHORT, [5]),
        (MIN_SURVIVORS, "three"),
        (MAX_COLLUDERS, "1.5"),
        (MIN_GROUP_SIZE, 1),
        (MIN_GROUP_SIZE, -2),
        (REQUIRED, "maybe"),
    ],
)
def test_bad_floor_values_raise_naming_the_key(key, value) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=key):
        p.ClientFloors.from_node_config({key: value})


def test_floor_objects_refuse_unsafe_values() -> None:
    for bad in ({"min_degree": 1}, {"min_cohort": 2}, {"min_survivors": 1}, {"min_group_size": 1}):
        with pytest.raises(ValueError):
            p.ClientFloors(**bad)
    with pytest.raises(ValueError, match="max_colluders"):
        p.ClientFloors(max_colluders=-1)


@pytest.mark.parametrize(
    ("degree", "colluders", "expected"),
    [(1, 0, 2), (2, 0, 2), (3, 0, 2), (4, 0, 3), (5, 0, 3), (7, 0, 4), (7, 2, 5), (10, 3, 7)],
)
def test_required_threshold(degree, colluders, expected) -> None:  # noqa: ANN001
    t = required_threshold(degree, colluders)
    assert t == expected
    # Two disjoint sets of holders reaching t need more than k + c holders in all.
    assert 2 * t > degree + colluders and t >= 2


def test_required_threshold_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        required_threshold(0, 0)
    with pytest.raises(ValueError):
        required_threshold(5, -1)


def _tail(n: int, prob: float, at_least: int) -> float:
    from math import comb

    return sum(comb(n, i) * prob**i * (1 - prob) ** (n - i) for i in range(max(at_least, 0), n + 1))


@pytest.mark.parametrize(
    ("cohort", "colluders", "dropout", "sigma"),
    [(100, 0.05, 0.05, 10.0), (50, 0.0, 0.1, 20.0), (500, 0.02, 0.02, 20.0)],
)
def test_safe_degree_is_the_smallest_safe_graph(cohort, colluders, dropout, sigma) -> None:  # noqa: ANN001
    found = safe_degree(cohort, colluders, dropout, sigma)
    assert found is not None
    k, t = found

    def safe(k: int, t: int) -> bool:
        bound = 2.0**-sigma
        leak = cohort * _tail(k, colluders, 2 * t - k)
        dead = cohort * _tail(k, dropout, k - t + 1)
        return leak <= bound and dead <= bound

    assert safe(k, t) and k // 2 + 1 <= t <= k
    for smaller in range(2, k):
        assert not any(safe(smaller, s) for s in range(max(2, smaller // 2 + 1), smaller + 1))
    assert _tails(k, colluders)[2 * t - k] == pytest.approx(_tail(k, colluders, 2 * t - k))
    # More colluders or more dropouts never make a smaller graph safe.
    worse = safe_degree(cohort, min(colluders * 2, 0.45), min(dropout * 2, 0.9), sigma)
    assert worse is None or worse[0] >= k


def test_safe_degree_limits() -> None:
    assert safe_degree(10, 0.3, 0.3) is None  # no graph of 10 nodes is that safe
    for bad in ((100, 0.5, 0.1), (100, -0.1, 0.1), (100, 0.1, 1.0)):
        with pytest.raises(ValueError):
            safe_degree(*bad)


# -- the consistency option: signed keys and signed views ------------------------------------


def test_consistency_option_with_dropouts_in_every_stage() -> None:
    # k = 10, t = 6: a node missing at the consistency stage signed nothing, so it must
    # refuse to unmask (UNSIGNED) and counts as one more silent holder.
    fed = Federation(11, degree=10, consistency=True)
    updates, weights = _updates(fed.ids, 64, seed=3)
    result = fed.round(
        1,
        updates,
        weights,
        drop_in_prepare=[103],
        drop_after_prepare=[102],
        drop_in_consistency=[104],
        drop_in_unmask=[106],
    )
    assert result.dropped == [102]
    _assert_mean(result, updates, weights, [i for i in fed.ids if i not in (102, 103)])
    assert 104 not in fed.unmask_replies[1] and 106 not in fed.unmask_replies[1]
    # A second round with everyone back.
    _assert_mean(fed.round(2, updates, weights), updates, weights, fed.ids)


def test_the_server_refuses_unsigned_keys_under_the_consistency_option() -> None:
    fed = Federation(4)  # clients without identities
    strict = p.SecAggServer(consistency=True)
    reply = p.client_advertise(p.ClientState(node_id=7), strict.advertise_request())
    with pytest.raises(p.ProtocolError, match="node 7 advertised no validly signed key"):
        strict.accept_advertisement(7, reply)
    assert fed.server.lt_keys.keys() == set(fed.ids)


def test_a_split_view_of_the_survivor_list_is_caught() -> None:
    # The server shows node 101 a list in which 103 dropped, everyone else the truth.
    fed = Federation(6, consistency=True)
    updates, weights = _updates(fed.ids, 8)
    fed.prepare(1)
    fed.train(1, updates, weights)
    others = [i for i in fed.ids if i != 103]
    fed.sign(1, shown={101: {"survivors": others, "dropped": [103]}})
    requests = fed.server.unmask_requests(1)
    # The true lists to 101: not what it signed.
    err = refused(p.Refusal.UNSIGNED, fed.unmask, 101, requests[101])
    assert "differ" in err.detail
    # The lists 101 signed: nobody else signed them, so 101 reveals nothing of 103.
    err = refused(p.Refusal.UNSIGNED, fed.unmask, 101, _without(requests[101], 103))
    assert "holders signed" in err.detail
    # The others, who signed the truth, answer: the round still completes without 101.
    replies = {n: fed.unmask(n, r) for n, r in requests.items() if n != 101}
    _assert_mean(fed.server.unmask(1, replies, 8), updates, weights, fed.ids)


def test_too_few_signatures_on_a_view_are_refused() -> None:
    fed = Federation(6, consistency=True)
    fed.uploaded()
    requests = fed.server.unmask_requests(1)
    signed = requests[101]["signers"]
    kept = [i for i, n in enumerate(signed) if n in (101, 102)]
    columns = ("signers", "signatures", "signer-keys", "signer-lt-keys", "signer-bindings")
    thin = dict(requests[101], **{c: [requests[101][c][i] for i in kept] for c in columns})
    refused(p.Refusal.UNSIGNED, fed.unmask, 101, thin)
    forged = list(requests[101]["signatures"])
    forged[1] = bytes(64)
    forged[2] = bytes(64)
    forged[3] = bytes(64)
    refused(p.Refusal.UNSIGNED, fed.unmask, 101, dict(requests[101], signatures=forged))
    assert fed.unmask(101, requests[101])["round"] == 1


def test_unmasking_without_the_consistency_stage_is_refused() -> None:
    fed = Federation(5, consistency=True)
    updates, weights = _updates(fed.ids, 8)
    fed.prepare(1)
    fed.train(1, updates, weights)
    fed.sign(1, silent=[101])
    requests = fed.server.unmask_requests(1)
    assert 101 not in requests  # the server does not ask a node that signed nothing
    # The server skips the stage: no signatures at all.
    columns = ("signers", "signatures", "signer-keys", "signer-lt-keys", "signer-bindings")
    skipped = dict(requests[102], **dict.fromkeys(columns, []))
    refused(p.Refusal.UNSIGNED, fed.unmask, 102, skipped)
    # A node that never saw the stage refuses whatever signatures come with the request.
    state = fed.clients[102]
    state.rounds[1].signed = b""
    err = refused(p.Refusal.UNSIGNED, fed.unmask, 102, requests[102])
    assert "signed no view" in err.detail
    # A node signs one view per round.
    sign = fed.server.consistency_requests(1)[103]
    refused(p.Refusal.REPLAY, fed.call, 103, p.client_sign, sign, fed.identities[103])
    assert fed.unmask(103, requests[103])["round"] == 1


def test_substituted_or_unsigned_keys_are_refused() -> None:
    fed = Federation(5, consistency=True)
    honest = _prepare_request(fed, 1)
    victim = 102
    idx = honest["keys-of"].index(victim)

    def prepare(request: dict) -> dict:
        return fed.call(101, p.client_prepare, request, fed.floors, fed.identities[101])

    swapped = list(honest["keys"])
    swapped[idx] = p.client_advertise(p.ClientState(node_id=999), fed.server.advertise_request())[
        "lt-key"
    ]
    err = refused(p.Refusal.UNSIGNED, prepare, dict(honest, keys=swapped))
    assert "node 102's key signature does not verify" in err.detail
    outsider = signing.generate_signing_key()
    signers = list(honest["signing-keys"])
    signers[idx] = signing.signing_public_key(outsider)
    err = refused(p.Refusal.UNSIGNED, prepare, dict(honest, **{"signing-keys": signers}))
    assert "not in the roster" in err.detail
    # Outsider key, validly signed by the outsider: still not in the roster.
    signatures = list(honest["signatures"])
    signatures[idx] = signing.sign(
        outsider, advertise_message(fed.server.nonce, victim, honest["keys"][idx])
    )
    forged = dict(honest, **{"signing-keys": signers, "signatures": signatures})
    refused(p.Refusal.UNSIGNED, prepare, forged)
    unsigned = {k: v for k, v in honest.items() if k not in ("signing-keys", "signatures")}
    refused(p.Refusal.UNSIGNED, prepare, unsigned)
    doubled = list(honest["signing-keys"])
    doubled[idx] = doubled[(idx + 1) % len(doubled)]
    refused(p.Refusal.UNSIGNED, prepare, dict(honest, **{"signing-keys": doubled}))
    assert prepare(honest)["round"] == 1


def test_an_identity_must_trust_its_own_key() -> None:
    with pytest.raises(ValueError, match="not in the roster"):
        p.Identity(signing.generate_signing_key(), frozenset())
    key = signing.generate_signing_key()
    assert p.Identity(key, frozenset({signing.signing_public_key(key)})).signing_key == key


# -- property: the secure mean is the weighted mean, for any shapes, weights, dropouts --


@st.composite
def _scenarios(draw):  # noqa: ANN001, ANN202
    n = draw(st.integers(min_value=3, max_value=8))  # complete graph: n - 1 neighbours
    dim = draw(st.integers(min_value=1, max_value=300))
    threshold = required_threshold(n - 1, 0)
    budget = draw(st.integers(min_value=0, max_value=n - 1 - threshold))
    missing = draw(st.permutations(range(n)).map(lambda order: list(order)[:budget]))
    cuts = sorted(draw(st.lists(st.integers(0, budget), min_size=3, max_size=3)))
    stages = [missing[a:b] for a, b in zip([0, *cuts], [*cuts, budget], strict=True)]
    weights = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, dim, stages, weights, seed


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_scenarios())
def test_property_secure_mean_survives_any_tolerable_dropout_pattern(scenario) -> None:  # noqa: ANN001
    n, dim, stages, weights, seed = scenario
    fed = Federation(n)
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-4, 4, dim) for i in fed.ids}
    weight_of = dict(zip(fed.ids, weights, strict=True))
    in_prepare, after_prepare, before_upload, in_unmask = (
        [fed.ids[i] for i in stage] for stage in stages
    )
    result = fed.round(
        1,
        updates,
        weight_of,
        drop_in_prepare=in_prepare,
        drop_after_prepare=after_prepare,
        drop_before_upload=before_upload,
        drop_in_unmask=in_unmask,
    )
    assert result.dropped == sorted(after_prepare + before_upload)
    survivors = [i for i in fed.ids if i not in in_prepare + after_prepare + before_upload]
    _assert_mean(result, updates, weight_of, survivors)
