"""When does a round complete? Exactly when the card's condition holds (a property test).

The condition (card, "Dropouts"): with P the prepared nodes left after nodes with fewer
than t prepared neighbours sit out, S the survivors (nodes of P that uploaded) and A the
answering holders (nodes of S that answer the unmask request and have at least t live
neighbours, as an honest node checks), a round completes iff
- at least ``min_survivors`` nodes are in P and in S;
- every survivor has at least t live round neighbours (neighbours in S);
- every survivor's self-mask seed has at least t holders in A;
- every dropped node of P with a live neighbour has at least t holders of its round key
  in A.
The cores run alone (no Flower) over random populations, degrees, colluder floors and
dropout patterns at every stage; the prediction uses only the neighbour lists the
server sent.
"""

from __future__ import annotations

import numpy as np
import pytest

from flower_privacy.secagg import protocol as proto
from flower_privacy.secagg.floors import required_threshold
from flower_privacy.secagg.quantize import Quantizer

# Flower-free cores: run on the main Flower version only.
pytestmark = pytest.mark.once

STAGES = ("none", "prepare", "train", "unmask")
QUANT = Quantizer(clip_range=1.0, max_weight=1, max_clients=64)
UPDATE = np.linspace(-0.5, 0.5, 6)


def _prune(prepared: set[int], neighbours: dict[int, list[int]], t: int) -> set[int]:
    while thin := {u for u in prepared if len(prepared.intersection(neighbours[u])) < t}:
        prepared = prepared - thin
    return prepared


def _predicted(
    neighbours: dict[int, list[int]], drops: dict[int, str], t: int, min_survivors: int
) -> tuple[bool, str]:
    prepared = _prune({u for u in neighbours if drops[u] != "prepare"}, neighbours, t)
    survivors = {u for u in prepared if drops[u] not in ("train",)}
    if len(prepared) < min_survivors or len(survivors) < min_survivors or not survivors:
        return False, "too few prepared or surviving nodes"

    def live(u: int) -> set[int]:
        return survivors.intersection(neighbours[u])

    answering = {v for v in survivors if drops[v] != "unmask" and len(live(v)) >= t}
    for u in survivors:
        if len(live(u)) < t:
            return False, f"survivor {u} has {len(live(u))} live neighbours"
        if len(answering.intersection(neighbours[u])) < t:
            return False, f"survivor {u}'s seed has too few answering holders"
    for d in prepared - survivors:
        if live(d) and len(answering.intersection(neighbours[d])) < t:
            return False, f"dropped node {d}'s key has too few answering holders"
    return True, "condition holds"


def _run_round(
    n: int, degree: int, colluders: int, drops: dict[int, str], min_survivors: int
) -> tuple[bool, dict[int, list[int]], int]:
    """(completed, the round's neighbour lists, t) of one protocol round."""
    ids = list(range(1, n + 1))
    server = proto.SecAggServer(degree=degree, max_colluders=colluders)
    floors = proto.ClientFloors(max_colluders=colluders)
    clients = {i: proto.ClientState(node_id=i) for i in ids}
    for node in ids:
        server.accept_advertisement(
            node, proto.client_advertise(clients[node], server.advertise_request())
        )
    requests = server.prepare_requests(1, ids, {"min_survivors": min_survivors})
    neighbours = {node: list(r["keys-of"]) for node, r in requests.items()}
    t = int(next(iter(requests.values()))["threshold"])
    for node, request in requests.items():
        reply = proto.client_prepare(clients[node], request, floors)
        if drops[node] != "prepare":
            assert server.accept_prepare(1, node, reply) is None
    for node, request in server.train_requests(1).items():
        try:
            upload, _ = proto.client_mask(clients[node], request, UPDATE, 1, QUANT, b"c")
        except proto.RefusedError:
            continue  # an honest node refusing to mask is a dropout here
        if drops[node] != "train":
            assert server.accept_upload(1, node, upload, UPDATE.size) is None
    if not server.survivors(1):
        return False, neighbours, t
    replies = {}
    for node, request in server.unmask_requests(1).items():
        if drops[node] == "unmask":
            continue
        try:
            replies[node] = proto.client_unmask(clients[node], request, None, None, colluders)
        except proto.RefusedError:
            continue
    try:
        result = server.unmask(1, replies, UPDATE.size)
    except proto.ProtocolError:
        return False, neighbours, t
    mean = QUANT.decode_sum(result.total, result.weight)
    np.testing.assert_allclose(mean, UPDATE, atol=QUANT.resolution)
    return True, neighbours, t


def _cases(count: int, seed: int) -> list[tuple[int, int, int, dict[int, str], int]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        n = int(rng.integers(4, 15))
        degree = int(rng.integers(2, n))
        colluders = int(rng.integers(0, 2))
        if required_threshold(degree, colluders) > degree:
            colluders = 0
        rate = float(rng.choice([0.05, 0.15, 0.3]))
        drops = {
            node: str(rng.choice(STAGES, p=[1 - rate, rate / 3, rate / 3, rate / 3]))
            for node in range(1, n + 1)
        }
        cases.append((n, degree, colluders, drops, int(rng.integers(1, 4))))
    return cases


@pytest.mark.parametrize("seed", [1, 2])
def test_a_round_completes_exactly_when_the_stated_condition_holds(seed: int) -> None:
    outcomes = {True: 0, False: 0}
    for n, degree, colluders, drops, min_survivors in _cases(30, seed):
        completed, neighbours, t = _run_round(n, degree, colluders, drops, min_survivors)
        predicted, why = _predicted(neighbours, drops, t, min_survivors)
        assert completed == predicted, (n, degree, colluders, t, drops, why)
        outcomes[completed] += 1
    # Both sides of the "iff" were exercised.
    assert outcomes[True] >= 5 and outcomes[False] >= 3, outcomes
