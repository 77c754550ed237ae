"""The Flower-free secure aggregation protocol: correctness, dropouts, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_privacy.secagg import protocol as p
from flower_privacy.secagg import signing
from flower_privacy.secagg.quantize import Quantizer

QUANT = Quantizer(clip_range=4.0, max_weight=100, max_clients=50)


class Federation:
    """n clients and a server exchanging the protocol's dicts directly."""

    def __init__(
        self,
        n: int,
        *,
        degree: int | None = None,
        fraction: float = 0.5,
        first_id: int = 101,
        consistency: bool = False,
    ) -> None:
        self.ids = list(range(first_id, first_id + n))
        self.server = p.SecAggServer(
            threshold_fraction=fraction, degree=degree, consistency=consistency
        )
        self.clients = {i: p.ClientState(node_id=i) for i in self.ids}
        self.identities: dict[int, p.Identity | None] = {i: None for i in self.ids}
        if consistency:
            private = {i: signing.generate_signing_key() for i in self.ids}
            roster = frozenset(signing.signing_public_key(k) for k in private.values())
            self.identities = {i: p.Identity(private[i], roster) for i in self.ids}
        self.setup(self.ids)

    def setup(self, nodes: list[int]) -> None:
        for node in self.server.nodes_to_key(nodes):
            request = self.server.advertise_request()
            reply = p.client_advertise(self.clients[node], request, self.identities[node])
            self.server.accept_advertisement(node, reply)
        request = self.server.distribute_request(nodes)
        self.server.accept_distributions(
            {n: p.client_distribute(self.clients[n], request, self.identities[n]) for n in nodes}
        )

    def upload_all(self, rnd: int = 1, dim: int = 8) -> None:
        """Every node uploads a random update for round ``rnd``."""
        updates, weights = _updates(self.ids, dim)
        request = self.server.train_request(rnd, self.ids)
        for node in self.ids:
            upload, _ = p.client_upload(
                self.clients[node], request, updates[node], weights[node], QUANT
            )
            assert self.server.accept_upload(node, upload, dim) is None

    def round(
        self,
        rnd,
        updates,
        weights,
        *,
        drop_before_upload=(),
        drop_in_unmask=(),
        drop_in_consistency=(),
    ):  # noqa: ANN001, ANN201
        cohort = sorted(updates)
        request = self.server.train_request(rnd, cohort)
        length = len(next(iter(updates.values())))
        for node in cohort:
            upload, _ = p.client_upload(
                self.clients[node], request, updates[node], weights[node], QUANT
            )
            if node not in drop_before_upload:
                assert self.server.accept_upload(node, upload, length) is None
        if self.server.consistency:
            signed = {
                node: p.client_consistency(self.clients[node], req, self.identities[node])
                for node, req in self.server.consistency_requests().items()
                if node not in drop_in_consistency
            }
            self.server.accept_consistency(signed)
        replies = {}
        for node, req in self.server.unmask_requests().items():
            if node not in drop_in_unmask:
                replies[node] = p.client_unmask(
                    self.clients[node], req, identity=self.identities[node]
                )
        return self.server.unmask(replies, length)


def _updates(ids, dim, seed=0):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, dim) for i in ids}, {i: int(rng.integers(1, 100)) for i in ids}


def _expected(updates, weights, nodes):  # noqa: ANN001, ANN202
    total_w = sum(weights[n] for n in nodes)
    return sum(weights[n] * updates[n] for n in nodes) / total_w, total_w


@pytest.mark.parametrize(("n", "degree"), [(3, None), (8, None), (12, 4), (40, None)])
def test_secure_sum_equals_weighted_mean(n, degree) -> None:  # noqa: ANN001
    fed = Federation(n, degree=degree)
    updates, weights = _updates(fed.ids, 257)
    result = fed.round(1, updates, weights)
    mean, total_w = _expected(updates, weights, fed.ids)
    assert result.weight == total_w and result.dropped == []
    np.testing.assert_allclose(
        QUANT.decode_sum(result.total, result.weight), mean, atol=2 * QUANT.resolution
    )


def test_real_flower_node_ids_use_all_64_bits() -> None:
    # SuperLinks hand out unsigned 64-bit node ids; the largest must work everywhere.
    fed = Federation(5, first_id=2**64 - 5)
    updates, weights = _updates(fed.ids, 32)
    result = fed.round(1, updates, weights, drop_before_upload=[2**64 - 3])
    survivors = [i for i in fed.ids if i != 2**64 - 3]
    mean, _ = _expected(updates, weights, survivors)
    np.testing.assert_allclose(
        QUANT.decode_sum(result.total, result.weight), mean, atol=2 * QUANT.resolution
    )


def test_dropouts_after_upload_and_during_unmask_are_survived() -> None:
    fed = Federation(10)
    updates, weights = _updates(fed.ids, 64, seed=1)
    gone, silent = [103, 107], [105]
    result = fed.round(1, updates, weights, drop_before_upload=gone, drop_in_unmask=silent)
    assert result.dropped == gone
    survivors = [i for i in fed.ids if i not in gone]
    mean, total_w = _expected(updates, weights, survivors)
    assert result.weight == total_w
    np.testing.assert_allclose(
        QUANT.decode_sum(result.total, result.weight), mean, atol=2 * QUANT.resolution
    )
    # Rebuilt keys are burned, and a survivor that missed unmasking cannot tell whether
    # its key was rebuilt: all of them re-key before the next round.
    assert sorted(fed.server.rekey) == sorted(gone + silent)
    with pytest.raises(p.RefusedError, match="never unmasked with this node as a survivor"):
        p.client_upload(
            fed.clients[105], fed.server.train_request(2, fed.ids), updates[105], 1, QUANT
        )
    with pytest.raises(p.RefusedError, match="not re-keyed"):
        p.client_upload(
            fed.clients[101], fed.server.train_request(2, fed.ids), updates[101], 1, QUANT
        )
    fed.setup(fed.ids)
    result = fed.round(3, updates, weights)
    assert result.dropped == []


def test_too_many_silent_in_unmask_fails_loudly() -> None:
    fed = Federation(6)
    updates, weights = _updates(fed.ids, 16)
    with pytest.raises(p.ProtocolError, match="too many nodes dropped during unmasking"):
        fed.round(1, updates, weights, drop_in_unmask=[101, 102, 103, 104])


def test_a_single_upload_is_indistinguishable_from_random() -> None:
    fed = Federation(5)
    updates = {i: np.zeros(4096) for i in fed.ids}
    request = fed.server.train_request(1, fed.ids)
    upload, _ = p.client_upload(fed.clients[101], request, updates[101], 1, QUANT)
    masked = np.frombuffer(upload["masked"], dtype="<u4")
    # An all-zero update masks to uniform words: mean near 2^31, no zeros to speak of.
    assert abs(masked.mean() / 2**31 - 1) < 0.05 and np.count_nonzero(masked == 0) < 3


# -- a dishonest server: every refusal names its check ---------------------------------


def _uploaded(n: int = 6):  # noqa: ANN202
    fed = Federation(n)
    fed.upload_all()
    return fed, fed.server.unmask_requests()


def test_refuses_a_node_listed_as_survivor_and_dropped() -> None:
    # Flower's known attack: the victim's pairwise masks via its "dropped" key shares,
    # its self mask via its "survivor" shares.
    fed, requests = _uploaded()
    victim, target = 102, 101
    honest = requests[target]
    attack = dict(honest, dropped=[victim])
    with pytest.raises(
        p.RefusedError, match=r"nodes \[102\] are listed both as survivor and as dropped"
    ):
        p.client_unmask(fed.clients[target], attack)


def test_refuses_shares_of_a_node_outside_its_neighbourhood() -> None:
    fed = Federation(12, degree=4)
    fed.upload_all()
    requests = fed.server.unmask_requests()
    target = 101
    stranger = next(i for i in fed.ids if i != target and i not in fed.clients[target].neighbours())
    forged = dict(
        requests[target],
        **{
            "from": [*requests[target]["from"], stranger],
            "sealed": [*requests[target]["sealed"], b"\0" * 60],
        },
    )
    with pytest.raises(
        p.RefusedError, match=rf"nodes \[{stranger}\] outside this node's neighbourhood"
    ):
        p.client_unmask(fed.clients[target], forged)


def test_refuses_fewer_survivors_than_the_threshold() -> None:
    fed, requests = _uploaded(6)
    target = 101
    forged = dict(requests[target], survivors=[101, 102], dropped=[103, 104, 105, 106])
    with pytest.raises(p.RefusedError, match="fewer than the threshold 3"):
        p.client_unmask(fed.clients[target], forged)


def test_refuses_replays_of_another_round_or_run() -> None:
    fed, requests = _uploaded()
    target = 101
    with pytest.raises(p.RefusedError, match="another run"):
        p.client_unmask(fed.clients[target], dict(requests[target], run=b"x" * 16))
    with pytest.raises(p.RefusedError, match="uploaded in no such round"):
        p.client_unmask(fed.clients[target], dict(requests[target], round=0))
    p.client_unmask(fed.clients[target], requests[target])
    with pytest.raises(p.RefusedError, match="already unmasked"):
        p.client_unmask(fed.clients[target], requests[target])
    with pytest.raises(p.RefusedError, match="replay"):
        p.client_upload(
            fed.clients[target], fed.server.train_request(1, fed.ids), np.zeros(8), 1, QUANT
        )


def test_refuses_what_the_pluggable_rule_forbids() -> None:
    fed, requests = _uploaded()

    def whole_groups_only(survivors, dropped, cohort):  # noqa: ANN001, ANN202
        return "group {101, 102} is incomplete" if 102 in dropped else None

    forged = dict(requests[101], survivors=[101, 103, 104, 105, 106], dropped=[102])
    with pytest.raises(p.RefusedError, match="unmask rule: group"):
        p.client_unmask(fed.clients[101], forged, rule=whole_groups_only)


def test_refuses_tampered_shares_and_self_masks_of_a_burned_key() -> None:
    fed, requests = _uploaded()
    req = requests[101]
    tampered = list(req["sealed"])
    tampered[0] = tampered[0][:-1] + bytes([tampered[0][-1] ^ 1])
    with pytest.raises(p.RefusedError, match="failed authentication"):
        p.client_unmask(fed.clients[101], dict(req, sealed=tampered))


def test_a_burned_key_never_unlocks_self_masks() -> None:
    # Round 1: the server claims 102 dropped and rebuilds its key from 101 and others.
    fed = Federation(6)
    updates, weights = _updates(fed.ids, 8)
    fed.round(1, updates, weights, drop_before_upload=[102])
    # Round 2: the server skips re-keying 102 and asks 101 for its self-mask share.
    fed.server.rekey.clear()
    request = fed.server.train_request(2, fed.ids)
    with pytest.raises(p.RefusedError, match=r"nodes \[102\] were not re-keyed"):
        p.client_upload(fed.clients[101], request, updates[101], 1, QUANT)


# -- the consistency option: signed keys and signed survivor lists ----------------------


def test_consistency_option_with_dropouts_in_every_stage() -> None:
    fed = Federation(9, consistency=True)
    updates, weights = _updates(fed.ids, 64, seed=3)
    result = fed.round(
        1,
        updates,
        weights,
        drop_before_upload=[102],
        drop_in_consistency=[104],
        drop_in_unmask=[106],
    )
    survivors = [i for i in fed.ids if i != 102]
    mean, total_w = _expected(updates, weights, survivors)
    assert result.weight == total_w
    np.testing.assert_allclose(
        QUANT.decode_sum(result.total, result.weight), mean, atol=2 * QUANT.resolution
    )
    assert {102, 104, 106} <= fed.server.rekey


def _signed_round(fed: Federation, victim_view: dict | None = None):  # noqa: ANN202
    fed.upload_all()
    requests = fed.server.consistency_requests()
    signed = {}
    for node, req in requests.items():
        shown = dict(req, **victim_view) if victim_view and node == 101 else req
        signed[node] = p.client_consistency(fed.clients[node], shown, fed.identities[node])
    fed.server.accept_consistency(signed)
    return fed.server.unmask_requests()


def test_a_split_view_of_the_survivor_list_is_caught() -> None:
    # The server shows node 101 a list in which 103 dropped, everyone else the truth.
    fed = Federation(6, consistency=True)
    others = [i for i in fed.ids if i != 103]
    requests = _signed_round(fed, victim_view={"survivors": others, "dropped": [103]})
    assert 101 not in requests  # its signature is not on the true lists
    forged = dict(requests[102], survivors=others, dropped=[103])
    fed.clients[101].signed = [others, [103]]
    with pytest.raises(p.RefusedError, match="neighbours signed the lists this node signed"):
        p.client_unmask(fed.clients[101], forged, identity=fed.identities[101])


def test_unmasking_without_the_consistency_stage_is_refused() -> None:
    fed = Federation(5, consistency=True)
    requests = _signed_round(fed)
    fed.clients[101].signed = []
    with pytest.raises(p.RefusedError, match="differ from the lists this node signed"):
        p.client_unmask(fed.clients[101], requests[101], identity=fed.identities[101])


def test_substituted_or_unsigned_keys_are_refused() -> None:
    fed = Federation(5, consistency=True)
    for node in fed.ids:
        reply = p.client_advertise(
            fed.clients[node], fed.server.advertise_request(), fed.identities[node]
        )
        fed.server.accept_advertisement(node, reply)
    honest = fed.server.distribute_request(fed.ids)
    target, victim = 101, 102
    idx = honest["node-ids"].index(victim)
    swapped = list(honest["public-keys"])
    swapped[idx] = p.client_advertise(p.ClientState(node_id=999), {"run": fed.server.run})[
        "public-key"
    ]
    with pytest.raises(p.RefusedError, match="node 102's key signature does not verify"):
        p.client_distribute(
            fed.clients[target], dict(honest, **{"public-keys": swapped}), fed.identities[target]
        )
    outsider = signing.generate_signing_key()
    signers = list(honest["signing-keys"])
    signers[idx] = signing.signing_public_key(outsider)
    with pytest.raises(p.RefusedError, match="node 102's signing key is not in the roster"):
        p.client_distribute(
            fed.clients[target], dict(honest, **{"signing-keys": signers}), fed.identities[target]
        )
    unsigned = {k: v for k, v in honest.items() if k not in ("signing-keys", "key-signatures")}
    with pytest.raises(p.RefusedError, match="without their owners' signatures"):
        p.client_distribute(fed.clients[target], unsigned, fed.identities[target])


def test_an_identity_must_trust_its_own_key() -> None:
    with pytest.raises(ValueError, match="not in the roster"):
        p.Identity(signing.generate_signing_key(), frozenset())


# -- property: the secure mean is the weighted mean, for any shapes, weights, dropouts --


@st.composite
def _scenarios(draw):  # noqa: ANN001, ANN202
    n = draw(st.integers(min_value=3, max_value=8))  # complete graph: n - 1 neighbours
    dim = draw(st.integers(min_value=1, max_value=300))
    threshold = (n - 1) // 2 + 1
    budget = draw(st.integers(min_value=0, max_value=n - 1 - threshold))
    missing = draw(st.permutations(range(n)).map(lambda order: list(order)[:budget]))
    split = draw(st.integers(min_value=0, max_value=budget))
    weights = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, dim, missing[:split], missing[split:], weights, seed


@settings(max_examples=40, deadline=None)
@given(_scenarios())
def test_property_secure_mean_survives_any_tolerable_dropout_pattern(scenario) -> None:  # noqa: ANN001
    n, dim, before_upload, in_unmask, weights, seed = scenario
    fed = Federation(n)
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-4, 4, dim) for i in fed.ids}
    weight_of = dict(zip(fed.ids, weights, strict=True))
    gone = [fed.ids[i] for i in before_upload]
    silent = [fed.ids[i] for i in in_unmask]
    result = fed.round(1, updates, weight_of, drop_before_upload=gone, drop_in_unmask=silent)
    survivors = [i for i in fed.ids if i not in gone]
    mean, total_w = _expected(updates, weight_of, survivors)
    assert result.weight == total_w and result.dropped == sorted(gone)
    bound = len(survivors) * QUANT.resolution / total_w
    np.testing.assert_allclose(QUANT.decode_sum(result.total, result.weight), mean, atol=bound)
