"""SecureAggregation + secagg_mod on the in-process grid: results, dropouts, a dishonest server."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import initial_arrays, make_toy_client_app
from conftest import stage_filter as _stage
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

from flower_privacy import _secagg_wire as wire
from flower_privacy.errors import RunHaltedError
from flower_privacy.mods import SecAggMod, secagg_mod
from flower_privacy.strategies import SecureAggregation
from flower_privacy.testing import InProcessGrid

SHAPES = {"conv": (3, 2, 2), "bias": (3,), "fc": (5, 4)}


def _updates_app(seed: int, mods: list | None = None) -> ClientApp:
    """Each node returns global + a fixed random offset and a fixed random weight."""
    app = ClientApp(mods=[secagg_mod] if mods is None else mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rng = np.random.default_rng([seed, context.node_id])
        arrays = msg.content["arrays"]
        out = {
            k: Array((arrays[k].numpy() + rng.uniform(-0.5, 0.5, SHAPES[k])).astype(np.float32))
            for k in arrays
        }
        weight = int(rng.integers(1, 50))
        return Message(
            RecordDict(
                {"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": weight})}
            ),
            reply_to=msg,
        )

    return app


def _expected_mean(seed: int, nodes: list[int]) -> dict[str, np.ndarray]:
    parts, weights = [], []
    for node in nodes:
        rng = np.random.default_rng([seed, node])
        parts.append({k: rng.uniform(-0.5, 0.5, s) for k, s in SHAPES.items()})
        weights.append(int(rng.integers(1, 50)))
    total = sum(weights)
    return {k: sum(w * p[k] for w, p in zip(weights, parts, strict=True)) / total for k in SHAPES}


def _zeros() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in SHAPES.items()})


def _fedavg(n: int, min_train: int | None = None) -> FedAvg:
    return FedAvg(min_available_nodes=n, min_train_nodes=min_train or n, fraction_evaluate=0.0)


def _secagg(n: int, **kwargs) -> SecureAggregation:  # noqa: ANN003
    kwargs.setdefault("min_train_replies", 3)
    return SecureAggregation(_fedavg(n), max_weight=100, **kwargs)


def _assert_mean(result, seed: int, nodes: list[int], tol: float = 1e-3) -> None:  # noqa: ANN001
    expected = _expected_mean(seed, nodes)
    for key in SHAPES:
        np.testing.assert_allclose(result.arrays[key].numpy(), expected[key], atol=tol)


@pytest.mark.parametrize(("n", "seed"), [(3, 1), (5, 2), (9, 3), (24, 4)])
def test_secure_mean_equals_weighted_fedavg(n, seed) -> None:  # noqa: ANN001
    grid = InProcessGrid(_updates_app(seed), num_nodes=n)
    result = _secagg(n).start(grid, _zeros(), num_rounds=1)
    _assert_mean(result, seed, list(grid.contexts))
    assert result.train_metrics_clientapp[1]["secagg-clients"] == n


def test_the_server_sees_no_plain_update() -> None:
    grid = InProcessGrid(make_toy_client_app(mods=[secagg_mod]), num_nodes=4)
    SecureAggregation(_fedavg(4)).start(grid, initial_arrays(4096), num_rounds=1)
    uploads = [
        e.message
        for e in grid.transcript
        if e.direction == "from-node" and wire.stage_of(e.message.content) == wire.UPLOAD
    ]
    assert len(uploads) == 4
    for upload in uploads:
        assert not upload.content.array_records and not upload.content.metric_records
        masked = np.frombuffer(wire.payload_of(upload.content)["masked"], dtype="<u4")
        assert masked.size == 4096 + 2
        # Quantised updates are small signed numbers near 0 mod 2^32; masked words are
        # uniform, so hardly any falls that close to 0.
        assert np.mean((masked < 2**20) | (masked > 2**32 - 2**20)) < 0.01


@pytest.mark.parametrize(
    ("stage", "rnd", "expected_clients"),
    [
        (wire.DISTRIBUTE, None, 5),  # after key advertisement: left out of the population
        (wire.TRAIN, 1, 5),  # after share distribution: keys rebuilt, masks removed
        (wire.UNMASK, 1, 6),  # after masked upload: its update counts, others unmask it
    ],
)
def test_one_dropout_at_each_stage_is_survived(stage, rnd, expected_clients) -> None:  # noqa: ANN001
    grid = InProcessGrid(_updates_app(11), num_nodes=6)
    victim = 1004
    grid.drop_node(victim, when=_stage(stage, rnd), unlist=False)
    result = _secagg(6, min_train_replies=3).start(grid, _zeros(), num_rounds=1)
    nodes = [n for n in grid.contexts if n != victim or expected_clients == 6]
    assert result.train_metrics_clientapp[1]["secagg-clients"] == expected_clients
    _assert_mean(result, 11, nodes)


def test_a_dropped_node_is_rekeyed_before_it_takes_part_again() -> None:
    grid = InProcessGrid(_updates_app(5), num_nodes=5)
    victim = 1002
    grid.drop_node(victim, when=_stage(wire.TRAIN, 1), unlist=False)

    def come_back_for_rekeying(msg: Message) -> Message:
        if (
            msg.metadata.dst_node_id == victim
            and wire.stage_of(msg.content) == wire.ADVERTISE
            and victim in grid.offline_nodes()
        ):
            grid.reconnect_node(victim)
        return msg

    grid.intercept(come_back_for_rekeying)
    strategy = _secagg(5)
    result = strategy.start(grid, _zeros(), num_rounds=2)
    assert result.train_metrics_clientapp[1]["secagg-dropped"] == 1
    assert result.train_metrics_clientapp[2]["secagg-clients"] == 5
    advertised = [
        e.node_id
        for e in grid.transcript
        if e.direction == "to-node" and wire.stage_of(e.message.content) == wire.ADVERTISE
    ]
    assert advertised.count(victim) == 2 and advertised.count(1001) == 1


def test_too_many_dropouts_fail_the_round_loudly() -> None:
    grid = InProcessGrid(_updates_app(3), num_nodes=6)
    for node in (1001, 1002, 1003, 1004):
        grid.drop_node(node, when=_stage(wire.UNMASK, 1), unlist=False)
    with pytest.raises(RunHaltedError, match="too many nodes dropped during unmasking") as info:
        _secagg(6).start(grid, _zeros(), num_rounds=2)
    assert list(info.value.result.failed_rounds) == [1]


def test_multi_round_training_with_fedadam_and_the_toy_app() -> None:
    grid = InProcessGrid(make_toy_client_app(mods=[secagg_mod]), num_nodes=4)
    strategy = SecureAggregation(
        FedAdam(min_available_nodes=4, min_train_nodes=4, fraction_evaluate=0.0), clip_range=8.0
    )
    plain = FedAdam(min_available_nodes=4, min_train_nodes=4, fraction_evaluate=0.0)
    ours = strategy.start(grid, initial_arrays(), num_rounds=3)
    theirs = plain.start(InProcessGrid(make_toy_client_app(), 4), initial_arrays(), num_rounds=3)
    np.testing.assert_allclose(ours.arrays["w"].numpy(), theirs.arrays["w"].numpy(), atol=1e-3)


def test_uniform_weighting_with_a_fixed_denominator() -> None:
    grid = InProcessGrid(_updates_app(9), num_nodes=4)
    result = SecureAggregation(
        _fedavg(4), weighting="uniform", uniform_denominator=8.0, max_weight=1
    ).start(grid, _zeros(), num_rounds=1)
    parts = []
    for node in grid.contexts:
        rng = np.random.default_rng([9, node])
        parts.append({k: rng.uniform(-0.5, 0.5, s) for k, s in SHAPES.items()})
    for key in SHAPES:
        np.testing.assert_allclose(
            result.arrays[key].numpy(), sum(p[key] for p in parts) / 8.0, atol=1e-4
        )


def test_clipped_values_are_counted_and_reported(caplog) -> None:  # noqa: ANN001
    grid = InProcessGrid(_updates_app(2), num_nodes=3)
    result = _secagg(3, clip_range=0.25).start(grid, _zeros(), num_rounds=1)
    clipped = result.train_metrics_clientapp[1]["secagg-clipped"]
    assert 0 < clipped < 3 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert "values were clipped" in caplog.text


def test_strategies_that_need_individual_updates_are_refused() -> None:
    for inner in (Krum(), FedMedian()):
        with pytest.raises(TypeError, match="needs each client's update"):
            SecureAggregation(inner)

    class MyAvg(FedAvg):
        pass

    with pytest.raises(TypeError, match="trust_inner_is_mean=True"):
        SecureAggregation(MyAvg())
    SecureAggregation(MyAvg(), trust_inner_is_mean=True)
    with pytest.raises(ValueError, match="weighting must be one of"):
        SecureAggregation(FedAvg(), weighting="median")


def test_an_app_without_the_mod_gets_an_error_naming_the_mod() -> None:
    grid = InProcessGrid(_updates_app(1, mods=[]), num_nodes=3)
    with pytest.raises(RunHaltedError, match=r"is flower_privacy.mods.secagg_mod in the ClientApp"):
        _secagg(3).start(grid, _zeros(), num_rounds=1)


def test_cohorts_larger_than_declared_are_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    with pytest.raises(RunHaltedError, match="max_clients=4"):
        SecureAggregation(_fedavg(5), max_clients=4).start(grid, _zeros(), num_rounds=1)


# -- a dishonest server, played by rewriting one client's unmask request ---------------

TARGET = 1001


def _tamper_unmask(grid: InProcessGrid, change) -> None:  # noqa: ANN001
    def rewrite(msg: Message) -> Message:
        if msg.metadata.dst_node_id == TARGET and wire.stage_of(msg.content) == wire.UNMASK:
            payload = change(wire.payload_of(msg.content))
            msg.content[wire.RECORD] = wire.to_record(wire.UNMASK, payload)
        return msg

    grid.intercept(rewrite)


def _run_attacked(grid: InProcessGrid, n: int, **kwargs) -> str:  # noqa: ANN003
    with pytest.raises(RunHaltedError) as info:
        _secagg(n, **kwargs).start(grid, _zeros(), num_rounds=1)
    return info.value.result.failed_rounds[1]


def test_flowers_known_attack_victim_both_survivor_and_dropped_is_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    _tamper_unmask(grid, lambda p: {**p, "dropped": [1003]})
    reason = _run_attacked(grid, 5)
    assert (
        f"node {TARGET}" in reason and "[1003] are listed both as survivor and as dropped" in reason
    )


def test_a_request_for_shares_outside_the_neighbourhood_is_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=12)
    state = {}

    def add_stranger(p: dict) -> dict:
        stranger = next(n for n in range(1001, 1013) if n != TARGET and n not in p["from"])
        state["stranger"] = stranger
        return {**p, "from": [*p["from"], stranger], "sealed": [*p["sealed"], b"\0" * 100]}

    _tamper_unmask(grid, add_stranger)
    reason = _run_attacked(grid, 12, degree=4)
    assert f"[{state['stranger']}] outside this node's neighbourhood" in reason


def test_fewer_survivors_than_the_threshold_is_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=6)
    _tamper_unmask(
        grid, lambda p: {**p, "survivors": [1001, 1002], "dropped": [1003, 1004, 1005, 1006]}
    )
    assert "fewer than the threshold" in _run_attacked(grid, 6)


def test_a_replayed_unmask_request_is_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=4)
    captured = {}

    def replay(msg: Message) -> Message:
        if msg.metadata.dst_node_id == TARGET and wire.stage_of(msg.content) == wire.UNMASK:
            payload = wire.payload_of(msg.content)
            if payload["round"] == 1:
                captured["round1"] = payload
            elif "round1" in captured:
                msg.content[wire.RECORD] = wire.to_record(wire.UNMASK, captured["round1"])
        return msg

    grid.intercept(replay)
    with pytest.raises(RunHaltedError) as info:
        _secagg(4).start(grid, _zeros(), num_rounds=2)
    assert list(info.value.result.failed_rounds) == [2]
    assert "uploaded in no such round" in info.value.result.failed_rounds[2]


def test_a_request_from_another_run_is_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=4)
    _tamper_unmask(grid, lambda p: {**p, "run": b"\x01" * 16})
    assert "another run" in _run_attacked(grid, 4)


def test_the_pluggable_unmask_rule_is_enforced_by_clients() -> None:
    def keep_pairs_whole(survivors, dropped, cohort):  # noqa: ANN001, ANN202
        return "pair (1003, 1004) incomplete" if (1003 in dropped) != (1004 in dropped) else None

    grid = InProcessGrid(_updates_app(1, mods=[SecAggMod(unmask_rule=keep_pairs_whole)]), 6)
    grid.drop_node(1003, when=_stage(wire.UNMASK, 1), unlist=False)  # fine: it uploaded
    _secagg(6).start(grid, _zeros(), num_rounds=1)
    grid = InProcessGrid(_updates_app(1, mods=[SecAggMod(unmask_rule=keep_pairs_whole)]), 6)
    grid.drop_node(1003, when=_stage(wire.TRAIN, 1), unlist=False)  # dropped: pair broken
    assert "unmask rule: pair (1003, 1004) incomplete" in _run_attacked(grid, 6)


def test_a_node_without_the_mod_is_left_out_with_a_warning(caplog) -> None:  # noqa: ANN001
    def mod_everywhere_but_1003(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        if context.node_id == 1003:
            return call_next(msg, context)
        return secagg_mod(msg, context, call_next)

    grid = InProcessGrid(_updates_app(4, mods=[mod_everywhere_but_1003]), num_nodes=5)
    result = _secagg(5).start(grid, _zeros(), num_rounds=1)
    assert result.train_metrics_clientapp[1]["secagg-clients"] == 4
    assert "node 1003, advertise stage: error reply" in caplog.text
    _assert_mean(result, 4, [1001, 1002, 1004, 1005])


def test_a_survivor_that_missed_unmasking_rekeys_before_its_next_round() -> None:
    grid = InProcessGrid(_updates_app(8), num_nodes=5)
    grid.drop_node(1003, when=_stage(wire.UNMASK, 1), only_matching=True)
    result = _secagg(5).start(grid, _zeros(), num_rounds=2)
    assert result.train_metrics_clientapp[2]["secagg-clients"] == 5
    advertised = [
        e.node_id
        for e in grid.transcript
        if e.direction == "to-node" and wire.stage_of(e.message.content) == wire.ADVERTISE
    ]
    assert advertised.count(1003) == 2 and advertised.count(1001) == 1


# -- the consistency option ---------------------------------------------------------


def _signed_grid(tmp_path, n: int, seed: int = 1) -> InProcessGrid:  # noqa: ANN001
    from flower_privacy.secagg.signing import write_signing_keys

    paths, roster = write_signing_keys(tmp_path / "keys", n)
    configs = [{wire.NODE_SIGNING_KEY: str(path), wire.NODE_ROSTER: str(roster)} for path in paths]
    return InProcessGrid(_updates_app(seed), num_nodes=n, node_configs=configs)


def test_consistency_check_runs_one_more_exchange_and_keeps_the_mean(tmp_path) -> None:  # noqa: ANN001
    grid = _signed_grid(tmp_path, 6, seed=12)
    grid.drop_node(1002, when=_stage(wire.CONSISTENCY, 1), only_matching=True)
    result = _secagg(6, consistency_check=True).start(grid, _zeros(), num_rounds=2)
    expected = _expected_mean(12, list(grid.contexts))  # each round adds the same mean
    for key in SHAPES:
        np.testing.assert_allclose(result.arrays[key].numpy(), 2 * expected[key], atol=2e-3)
    stages = [wire.stage_of(e.message.content) for e in grid.transcript if e.direction == "to-node"]
    assert stages.count(wire.CONSISTENCY) == 12 and stages.count(wire.UNMASK) == 11


def test_consistency_check_catches_lists_that_differ_from_the_signed_ones(tmp_path) -> None:  # noqa: ANN001
    # The server shows the target at unmasking a survivor list without 1003, unlike the
    # lists everyone (the target included) signed in the consistency stage.
    grid = _signed_grid(tmp_path, 6)

    def split(msg: Message) -> Message:
        if msg.metadata.dst_node_id == TARGET and wire.stage_of(msg.content) == wire.UNMASK:
            payload = wire.payload_of(msg.content)
            survivors = [n for n in payload["survivors"] if n != 1003]
            payload.update(survivors=survivors, dropped=sorted([*payload["dropped"], 1003]))
            msg.content[wire.RECORD] = wire.to_record(wire.UNMASK, payload)
        return msg

    grid.intercept(split)
    reason = _run_attacked(grid, 6, consistency_check=True)
    assert "the unmask lists differ from the lists this node signed" in reason


def test_consistency_check_without_signing_keys_fails_naming_the_node_config() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=4)
    with pytest.raises(RunHaltedError, match="secagg-signing-key"):
        _secagg(4, consistency_check=True).start(grid, _zeros(), num_rounds=1)


def test_declaring_survivors_dropped_below_the_promised_floor_is_refused() -> None:
    # A distributed DP noise share is calibrated for min_train_replies survivors: a
    # server that later claims more nodes dropped must not get fewer shares unmasked.
    grid = InProcessGrid(_updates_app(1), num_nodes=8)

    def fewer(p: dict) -> dict:
        survivors = list(p["survivors"])
        return {**p, "survivors": survivors[:6], "dropped": [*p["dropped"], *survivors[6:]]}

    _tamper_unmask(grid, fewer)
    reason = _run_attacked(grid, 8, min_train_replies=7)
    assert f"node {TARGET}" in reason and "6 survivors, but the round promised at least 7" in reason
