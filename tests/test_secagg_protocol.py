"""The Flower-free secure aggregation protocol: correctness, dropouts, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from flower_privacy.secagg import protocol as p
from flower_privacy.secagg.quantize import Quantizer

QUANT = Quantizer(clip_range=4.0, max_weight=100, max_clients=50)


class Federation:
    """n clients and a server exchanging the protocol's dicts directly."""

    def __init__(
        self, n: int, *, degree: int | None = None, fraction: float = 0.5, first_id: int = 101
    ) -> None:
        self.ids = list(range(first_id, first_id + n))
        self.server = p.SecAggServer(threshold_fraction=fraction, degree=degree)
        self.clients = {i: p.ClientState(node_id=i) for i in self.ids}
        self.setup(self.ids)

    def setup(self, nodes: list[int]) -> None:
        for node in self.server.nodes_to_key(nodes):
            reply = p.client_advertise(self.clients[node], self.server.advertise_request())
            self.server.accept_advertisement(node, reply)
        request = self.server.distribute_request(nodes)
        self.server.accept_distributions(
            {n: p.client_distribute(self.clients[n], request) for n in nodes}
        )

    def round(self, rnd, updates, weights, *, drop_before_upload=(), drop_in_unmask=()):  # noqa: ANN001, ANN201
        cohort = sorted(updates)
        request = self.server.train_request(rnd, cohort)
        length = len(next(iter(updates.values())))
        for node in cohort:
            upload, _ = p.client_upload(
                self.clients[node], request, updates[node], weights[node], QUANT
            )
            if node not in drop_before_upload:
                assert self.server.accept_upload(node, upload, length) is None
        replies = {}
        for node, req in self.server.unmask_requests().items():
            if node not in drop_in_unmask:
                replies[node] = p.client_unmask(self.clients[node], req)
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
    # The rebuilt keys are burned: those nodes must re-key before the next round.
    assert sorted(fed.server.rekey) == gone
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
    updates, weights = _updates(fed.ids, 8)
    request = fed.server.train_request(1, fed.ids)
    for node in fed.ids:
        upload, _ = p.client_upload(fed.clients[node], request, updates[node], weights[node], QUANT)
        fed.server.accept_upload(node, upload, 8)
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
    updates, weights = _updates(fed.ids, 8)
    request = fed.server.train_request(1, fed.ids)
    for node in fed.ids:
        upload, _ = p.client_upload(fed.clients[node], request, updates[node], weights[node], QUANT)
        fed.server.accept_upload(node, upload, 8)
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
