"""``flower-privacy bench secagg --scaling``: the protocol cores alone at 100 to 10,000 clients.

One process, no Flower: every client prepares, masks a fixed update and unmasks, a
fraction drops after preparing, the server routes shares and unmasks. Client time is
the mean per client; server time is the round's total. Two sets of floors: ``hbc`` (no
colluders; the degree survives the dropout) and ``malicious`` (the degree also keeps 5%
colluders below the privacy bound, c = floor(0.05 k) + 1).

Each simulated client's state is kept between stages as its serialised bytes, as the
mod keeps it in ``context.state`` (loading and saving count as client time): 10,000
live states in one process are 2 x 10,000 id lists of 10,000 entries, which Python's
cyclic garbage collector rescans on every full collection, whoever triggers it; a
real server holds none of them, and the server's timings are its own work only.
``server_cpu_s`` is the server's process (CPU) time, which other load on the machine
does not inflate as it does the wall-clock ``server_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from flower_privacy.secagg import graph
from flower_privacy.secagg import protocol as proto
from flower_privacy.secagg.floors import required_threshold, safe_degree
from flower_privacy.secagg.quantize import Quantizer

COLLUDER_FRACTION = 0.05
FAILURE_BITS = 20.0


def _floors(n: int, floors: str, dropout: float) -> tuple[int, int]:
    """(degree, colluders) for ``floors`` at ``n`` clients."""
    if floors == "hbc":
        return graph.default_degree(n, dropout, FAILURE_BITS), 0
    found = safe_degree(n, COLLUDER_FRACTION, dropout, FAILURE_BITS)
    degree = n - 1 if found is None else found[0]
    return degree, int(COLLUDER_FRACTION * degree) + 1


def one_round(
    n: int,
    floors: str,
    params: int = 100_000,
    dropout: float = 0.1,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """One round of ``n`` clients; the row of ``scaling`` (the mean is checked).

    ``log`` hears the end of each stage (a 10,000-client round takes minutes a stage).
    """
    degree, colluders = _floors(n, floors, dropout)
    quantizer = Quantizer(clip_range=1.0, max_weight=1, max_clients=n)
    ids = list(range(1, n + 1))
    server = proto.SecAggServer(degree=degree, max_colluders=colluders)
    states = {i: proto.ClientState(node_id=i).to_bytes() for i in ids}
    client_floors = proto.ClientFloors(max_colluders=colluders)
    update = np.random.default_rng(0).uniform(-1, 1, params)
    client_s = server_s = server_cpu = 0.0
    setup_bytes = 0

    def timed(fn: Callable, *args: object) -> tuple[object, float]:
        nonlocal server_cpu
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        server_cpu += time.process_time() - cpu
        return out, time.perf_counter() - start

    def client(fn: Callable, node: int, *args: object) -> tuple[object, float]:
        """One client step on its state, loaded and saved as the mod does."""
        start = time.perf_counter()
        state = proto.ClientState.from_bytes(states[node])
        out = fn(state, *args)
        states[node] = state.to_bytes()
        return out, time.perf_counter() - start

    for node in ids:
        reply, _ = client(proto.client_advertise, node, server.advertise_request())
        server.accept_advertisement(node, reply)
    server_cpu = 0.0  # the round alone
    requests, spent = timed(server.prepare_requests, 1, ids, {})
    server_s += spent
    for node, request in requests.items():
        reply, spent = client(proto.client_prepare, node, request, client_floors)
        client_s += spent
        setup_bytes += _size(request) + _size(reply)
        _, spent = timed(server.accept_prepare, 1, node, reply)
        server_s += spent
    train, spent = timed(server.train_requests, 1)
    server_s += spent
    stage = "prepared; server {:.1f} s ({:.1f} s CPU), clients {:.1f} s in all"
    log(stage.format(server_s, server_cpu, client_s))
    dropped = set(ids[: int(dropout * n)])
    upload: dict = {}
    for node, request in train.items():
        setup_bytes += _size(request)  # the packages it holds (the model rides apart)
        (upload, _), spent = client(
            proto.client_mask, node, request, update, 1, quantizer, b"content"
        )
        client_s += spent
        if node not in dropped:
            _, spent = timed(server.accept_upload, 1, node, upload, params)
            server_s += spent
    unmask, spent = timed(server.unmask_requests, 1)
    server_s += spent
    log(stage.replace("prepared", "masked and uploaded").format(server_s, server_cpu, client_s))
    replies = {}
    for node, request in unmask.items():
        replies[node], spent = client(proto.client_unmask, node, request, None, None, colluders)
        client_s += spent
    result, spent = timed(server.unmask, 1, replies, params)
    server_s += spent
    mean = quantizer.decode_sum(result.total, result.weight)
    error = float(np.abs(mean - update).max())
    if error > 1e-3:
        raise AssertionError(f"the unmasked mean is off by {error}")
    return {
        "clients": n,
        "floors": floors,
        "degree": degree,
        "threshold": required_threshold(degree, colluders),
        "params": params,
        "dropout": dropout,
        "server_s": server_s,
        "server_cpu_s": server_cpu,
        "client_s": client_s / n,
        "setup_bytes_per_node": setup_bytes / n,
        "bytes_per_param": len(upload["masked"]) / params,
    }


def run(
    sizes: tuple[int, ...] = (100, 1_000, 10_000),
    params: int = 100_000,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """The ``scaling`` list: every size under both floors."""
    rows = []
    for n in sizes:
        for floors in ("hbc", "malicious"):
            log(f"scaling: {n} clients, {floors} floors ...")
            rows.append(one_round(n, floors, params, log=log))
    return rows


def _size(payload: dict) -> int:
    """Bytes of a protocol dict's values (ints as 8, lists summed)."""
    total = 0
    for value in payload.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total
