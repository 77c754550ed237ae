"""``flower-privacy bench secagg``: our secure aggregation against FedAvg and Flower's SecAgg+.

Everything in-process runs on the same in-process grid, in the same process, with
clients that return a fixed synthetic update, so the protocols (not training) are
measured. Round times are steady-state medians (rounds after the first).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy import _flwr_compat as compat
from flower_privacy.bench.app_logs import ROUND_SECONDS, logged_json
from flower_privacy.mods import secagg_mod
from flower_privacy.secagg import graph
from flower_privacy.secagg import protocol as proto
from flower_privacy.secagg.prg import MaskBuffer
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.strategies import SecureAggregation
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import secagg as wire

ROUNDS = 4
_REPO = Path(__file__).resolve().parents[2]


def _update(node_id: int, size: int) -> np.ndarray:
    return np.random.default_rng(node_id).uniform(-0.01, 0.01, size).astype(np.float32)


def fixed_update_app(mods: list) -> ClientApp:
    """A ClientApp (with ``mods``) whose update is a fixed per-node synthetic vector."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(w + _update(context.node_id, w.size))}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=msg,
        )

    return app


def _steady(marks: list[float]) -> float:
    per_round = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return statistics.median(per_round[1:]) if len(per_round) > 1 else per_round[0]


def _time_message_api(
    strategy, app: ClientApp, n: int, params: int, drop=None
) -> tuple[float, InProcessGrid]:  # noqa: ANN001, E501
    grid = InProcessGrid(app, n, serialize=False)
    if drop:
        drop(grid)
    marks: list[float] = []
    arrays = ArrayRecord({"w": Array(np.zeros(params, dtype=np.float32))})
    strategy.start(
        grid, arrays, num_rounds=ROUNDS, evaluate_fn=lambda r, a: marks.append(time.perf_counter())
    )  # noqa: E501
    return _steady(marks), grid


def _time_flower_secaggplus(n: int, params: int, dropout: float) -> float:
    """Flower 1.41's legacy SecAggPlusWorkflow on the same grid and data."""
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Client(NumPyClient):
        def __init__(self, node_id: int) -> None:
            self.node_id = node_id

        def fit(self, parameters, config):  # noqa: ANN001, ANN201
            return [parameters[0] + _update(self.node_id, params)], 10, {}

    client_app = LegacyClientApp(
        client_fn=lambda ctx: Client(ctx.node_id).to_client(), mods=[secaggplus_mod]
    )
    marks: list[float] = []

    def stamp(server_round, parameters, config):  # noqa: ANN001, ANN202
        marks.append(time.perf_counter())

    server_app = ServerApp()
    shares = n if n % 2 else n - 1  # Flower wants an odd number of shares

    @server_app.main()
    def main(grid, context):  # noqa: ANN001, ANN202
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=ROUNDS),
            strategy=LegacyFedAvg(
                fraction_evaluate=0.0,
                min_fit_clients=n,
                min_available_clients=n,
                evaluate_fn=stamp,
                initial_parameters=ndarrays_to_parameters([np.zeros(params, np.float32)]),
            ),
        )
        workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=shares // 2 + 1)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    grid = InProcessGrid(client_app, n, serialize=False)
    for node in list(grid.contexts)[: int(round(dropout * n))]:
        grid.drop_node(node, when=_legacy_unmask_stage, only_matching=True)
    server_app(
        grid,
        Context(
            run_id=1,
            node_id=compat.SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config={},
        ),
    )
    if len(marks) < ROUNDS + 1:
        raise RuntimeError(f"Flower's SecAgg+ completed {len(marks) - 1} of {ROUNDS} rounds")
    return _steady(marks)


def _legacy_unmask_stage(msg: Message) -> bool:
    record = msg.content.config_records.get("secaggplus_configs")
    return record is not None and record.get("stage") == "unmask"


def _our_unmask_stage(msg: Message) -> bool:
    # The unmask message of round r also carries the prepare of round r + 1: a node
    # that drops it misses that round too, as a real dropout would.
    return wire.UNMASK in wire.stages_of(msg.content)


def case(n: int, params: int, dropout: float) -> dict:
    """One row of ``cases``."""

    def fedavg() -> FedAvg:
        return FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)

    fedavg_s, _ = _time_message_api(fedavg(), fixed_update_app([]), n, params)
    dropped = int(round(dropout * n))

    def drop(grid: InProcessGrid) -> None:
        for node in list(grid.contexts)[:dropped]:
            grid.drop_node(node, when=_our_unmask_stage, only_matching=True)

    ours = SecureAggregation(fedavg(), max_weight=100, min_train_replies=n - dropped)
    secagg_s, grid = _time_message_api(ours, fixed_update_app([secagg_mod]), n, params, drop)
    # Protocol 1's default degree (2·log2 n above 8 nodes), for a like-for-like figure:
    # the default now sizes the graph for 10% dropouts, which costs more masks.
    sparse = n - 1 if n <= 8 else min(n - 1, 2 * math.ceil(math.log2(n)))
    sparse_strategy = SecureAggregation(
        fedavg(), max_weight=100, min_train_replies=n - dropped, degree=sparse
    )
    sparse_s, _ = _time_message_api(
        sparse_strategy, fixed_update_app([secagg_mod]), n, params, drop
    )
    upload = next(
        e.message
        for e in grid.transcript
        if e.direction == "from-node" and wire.UPLOAD in wire.stages_of(e.message.content)
    )
    return {
        "clients": n,
        "params": params,
        "dropout": dropout,
        "fedavg_s": fedavg_s,
        "flower_secaggplus_s": _time_flower_secaggplus(n, params, dropout),
        "secagg_s": secagg_s,
        "degree": ours.protocol.degree or graph.default_degree(n),
        "secagg_sparse_s": sparse_s,
        "sparse_degree": sparse,
        "_upload_masked_bytes": len(wire.payload_of(upload.content, wire.UPLOAD)["masked"]),
        "_upload_message_bytes": compat.wire_size(upload),
    }


def mask_throughput_ratio(length: int = 1_000_000, neighbours: int = 10) -> float:
    """Raw AES-128-CTR keystream time over our mask time, for the same number of words.

    Ours: one client's self mask and ``neighbours`` pairwise masks of ``length`` uint32
    words each (HKDF, AES-256-CTR, uint32 additions into the vector).
    """
    seed = os.urandom(32)

    def ours() -> None:  # as client_mask does it: one mask buffer for the stage
        vector = np.zeros(length, dtype=np.uint32)
        masks = MaskBuffer(length)
        vector += masks.expand(seed, b"self")
        for i in range(neighbours):
            vector += masks.expand(seed, i.to_bytes(4, "little"))

    def raw() -> None:
        encryptor = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()
        for _ in range(neighbours + 1):  # the same words, in the same chunk size
            np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4")

    def best(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(raw) / best(ours)


def unmask_seconds(clients: int = 100, dropped: int = 10, params: int = 1_000_000) -> float:
    """Server-side unmasking time of one round with ``dropped`` nodes gone after prepare.

    Protocol level, no Flower: long-term keys, then the round's prepare (fresh round
    keys and self seeds shared among the default-degree neighbours), masked uploads of
    the survivors, the survivors' revealed shares; only ``SecAggServer.unmask`` (share
    checks, rebuilding, self masks and the dropouts' pairwise masks) is timed.
    """
    quantizer = Quantizer(clip_range=1.0, max_weight=100, max_clients=clients)
    ids = list(range(1, clients + 1))
    server = proto.SecAggServer()
    floors = proto.ClientFloors()
    states = {i: proto.ClientState(node_id=i) for i in ids}
    for i in ids:
        server.accept_advertisement(
            i, proto.client_advertise(states[i], server.advertise_request())
        )
    rnd = 1
    for i, request in server.prepare_requests(rnd, ids, {}).items():
        problem = server.accept_prepare(rnd, i, proto.client_prepare(states[i], request, floors))
        if problem is not None:
            raise RuntimeError(f"node {i}'s prepare reply was refused: {problem}")
    gone = set(ids[:dropped])
    update = np.zeros(params)
    content = b"bench: one model and config for all"
    for i, request in server.train_requests(rnd).items():
        if i not in gone:
            upload, _ = proto.client_mask(states[i], request, update, 1, quantizer, content)
            problem = server.accept_upload(rnd, i, upload, params)
            if problem is not None:
                raise RuntimeError(f"node {i}'s upload was refused: {problem}")
    replies = {i: proto.client_unmask(states[i], r) for i, r in server.unmask_requests(rnd).items()}
    t0 = time.perf_counter()
    result = server.unmask(rnd, replies, params)
    seconds = time.perf_counter() - t0
    if result.dropped != sorted(gone) or result.weight != clients - dropped:
        raise RuntimeError(f"unmasking gave {result.weight} weight, dropped {result.dropped}")
    return seconds


def deployment(params: int = 10_000, rounds: int = 4) -> dict:
    """Steady-state round time through a real SuperLink with 3 SuperNodes."""
    from flower_privacy.harness.deployment import LocalDeployment
    from flower_privacy.secagg.signing import write_signing_keys

    names = {"none": "fedavg_s", "secagg": "secagg_s", "secagg-consistency": "secagg_consistency_s"}
    out = {}
    with tempfile.TemporaryDirectory(prefix="flower-privacy-keys-") as keys_dir:
        key_paths, roster = write_signing_keys(Path(keys_dir), 3)

        def signing_config(index: int) -> dict[str, str]:
            return {wire.NODE_SIGNING_KEY: str(key_paths[index]), wire.NODE_ROSTER: str(roster)}

        for privacy, name in names.items():
            # Only the consistency run gets signing keys: a node with a roster insists
            # on signed keys and lists.
            extra = signing_config if privacy == "secagg-consistency" else None
            with LocalDeployment(3, node_config=extra) as dep:
                outcome = dep.run(
                    _REPO / "apps" / "synthetic",
                    timeout=900,
                    run_config=[
                        f"num-params={params} num-server-rounds={rounds} privacy='{privacy}'"
                    ],
                )
            if not outcome.completed:
                raise RuntimeError(
                    f"deployment run ({privacy}) failed: {outcome.status} {outcome.details}"
                )
            seconds = logged_json(outcome.log, ROUND_SECONDS)
            out[name] = statistics.median(seconds[1:])
    return out


def run(
    *, quick: bool = False, with_deployment: bool = True, log: Callable[[str], None] = print
) -> dict:  # noqa: E501
    """All figures as one dict."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    specs = (
        [(5, 10_000, 0.0), (10, 100_000, 0.1)]
        if quick
        else [(5, 100_000, 0.0), (20, 1_000_000, 0.1)]
    )  # noqa: E501
    cases = []
    for n, params, dropout in specs:
        log(f"case {n} clients x {params} params, {dropout:.0%} dropping after upload ...")
        cases.append(case(n, params, dropout))
    big = cases[-1]
    log("mask throughput, unmasking ...")
    result = {
        "cases": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases],
        "mask_throughput_ratio": mask_throughput_ratio(),
        "unmask_s_100_clients": unmask_seconds(params=100_000 if quick else 1_000_000),
        "upload_bytes_per_param": big["_upload_masked_bytes"] / big["params"],
        "message_bytes_per_param": big["_upload_message_bytes"] / big["params"],
        "mask_throughput_definition": "raw AES-128-CTR keystream time / our time for one "
        "client's self mask + 10 pairwise masks of 1M uint32 each, applied to its vector",
        "default_degree_100_clients": graph.default_degree(100),
        "in_process_note": "all clients run one after another in one process: client-side "
        "costs add up over clients here, where a federation runs them in parallel",
    }
    if with_deployment:
        log("deployment: 3 SuperNodes on 127.0.0.1 ...")
        result["deployment"] = deployment()
    return result
