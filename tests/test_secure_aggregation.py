"""SecureAggregation + secagg_mod on the in-process grid: results, dropouts, a dishonest server."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NoModelFedAvg, RaisingFedAvg, initial_arrays, make_toy_client_app
from conftest import stage_filter as _stage
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

from flower_privacy.errors import RunHaltedError
from flower_privacy.mods import SecAggMod, secagg_mod
from flower_privacy.secagg.protocol import Refusal
from flower_privacy.strategies import SecureAggregation
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import secagg as wire

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
        if e.direction == "from-node" and wire.UPLOAD in wire.stages_of(e.message.content)
    ]
    assert len(uploads) == 4
    for upload in uploads:
        assert not upload.content.array_records and not upload.content.metric_records
        masked = np.frombuffer(wire.payload_of(upload.content, wire.UPLOAD)["masked"], dtype="<u4")
        assert masked.size == 4096 + 2
        # Quantised updates are small signed numbers near 0 mod 2^32; masked words are
        # uniform, so hardly any falls that close to 0.
        assert np.mean((masked < 2**20) | (masked > 2**32 - 2**20)) < 0.01


@pytest.mark.parametrize(
    ("stage", "rnd", "expected_clients"),
    [
        (wire.PREPARE, 1, 5),  # never prepared: not in the round at all
        (wire.TRAIN, 1, 5),  # prepared, no upload: its round key rebuilt, masks removed
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


def test_a_dropout_never_rekeys_and_the_next_round_prepares_in_the_unmask_exchange() -> None:
    grid = InProcessGrid(_updates_app(5), num_nodes=5)
    victim = 1002
    grid.drop_node(victim, when=_stage(wire.TRAIN, 1), only_matching=True)
    result = _secagg(5).start(grid, _zeros(), num_rounds=3)
    assert result.train_metrics_clientapp[1]["secagg-dropped"] == 1
    assert result.train_metrics_clientapp[2]["secagg-clients"] == 5
    to_node = [e for e in grid.transcript if e.direction == "to-node"]
    advertised = [e.node_id for e in to_node if wire.ADVERTISE in wire.stages_of(e.message.content)]
    assert sorted(advertised) == sorted(grid.contexts)  # once per node, never again
    # Exchanges: advertise, prepare(1), then per round train and unmask(+prepare next).
    batches = [tuple(sorted(wire.stages_of(e.message.content))) for e in to_node]
    assert batches.count((wire.PREPARE, wire.UNMASK)) == 2 * 5 - 1  # rounds 1, 2 (1 dropout)
    assert batches.count((wire.PREPARE,)) == 5 + 1  # round 1, and the dropout's round 2


def test_too_many_dropouts_fail_the_round_loudly() -> None:
    grid = InProcessGrid(_updates_app(3), num_nodes=6)
    for node in (1001, 1002, 1003, 1004):
        grid.drop_node(node, when=_stage(wire.UNMASK, 1), unlist=False)
    with pytest.raises(RunHaltedError, match="too many holders dropped or refused") as info:
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


def test_client_sampling_with_a_fraction_runs_every_round() -> None:
    inner = FedAvg(
        fraction_train=0.5, min_available_nodes=12, min_train_nodes=3, fraction_evaluate=0.0
    )
    grid = InProcessGrid(_updates_app(6), num_nodes=12)
    result = SecureAggregation(inner, max_weight=100, min_train_replies=3).start(
        grid, _zeros(), num_rounds=4
    )
    assert not result.failed_rounds
    assert all(result.train_metrics_clientapp[r]["secagg-clients"] == 6 for r in range(1, 5))


def _upload_bytes(grid: InProcessGrid) -> set[int]:
    return {
        len(wire.payload_of(e.message.content, wire.UPLOAD)["masked"])
        for e in grid.transcript
        if e.direction == "from-node"
        and e.message.has_content()
        and wire.UPLOAD in wire.stages_of(e.message.content)
    }


def test_cohorts_are_sampled_no_larger_than_max_clients() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    strategy = SecureAggregation(_fedavg(5, min_train=3), max_clients=4, max_weight=100)
    result = strategy.start(grid, _zeros(), num_rounds=2)
    assert [result.train_metrics_clientapp[r]["secagg-clients"] for r in (1, 2)] == [4, 4]


def test_max_clients_is_derived_from_the_sampling_and_fixes_the_word_width() -> None:
    length = sum(int(np.prod(s)) for s in SHAPES.values())
    grid = InProcessGrid(_updates_app(2), num_nodes=10)
    inner = FedAvg(fraction_train=0.5, min_available_nodes=10, fraction_evaluate=0.0)
    narrow = SecureAggregation(inner, max_weight=100, min_train_replies=3)
    narrow.start(grid, _zeros(), num_rounds=1)
    assert (narrow.quantizer.max_clients, narrow.quantizer.word_bits) == (5, 32)
    assert _upload_bytes(grid) == {4 * (length + 2)}
    # A bound 32-bit words cannot meet: 64-bit words, and the mean within it.
    grid = InProcessGrid(_updates_app(2), num_nodes=10)
    wide = SecureAggregation(_fedavg(10), max_weight=100, max_mean_error=1e-8)
    result = wide.start(grid, _zeros(), num_rounds=1)
    assert (wide.quantizer.max_clients, wide.quantizer.word_bits) == (10, 64)
    assert _upload_bytes(grid) == {8 * (length + 2)}
    _assert_mean(result, 2, list(grid.contexts), tol=1e-6)


def test_a_poisson_cohort_is_never_truncated() -> None:
    grid = InProcessGrid(_updates_app(3), num_nodes=6)
    strategy = SecureAggregation(
        _fedavg(6, min_train=3),
        max_weight=100,
        group_size=3,
        selection="poisson",
        sampling_rate=1.0,
        max_clients=3,
        min_train_replies=3,
    )
    with pytest.raises(RunHaltedError, match="max_clients=3"):
        strategy.start(grid, _zeros(), num_rounds=1)
    derived = SecureAggregation(
        _fedavg(6, min_train=3),
        max_weight=100,
        group_size=3,
        selection="poisson",
        sampling_rate=0.5,
        min_train_replies=3,
    )
    derived.prepare_run(InProcessGrid(_updates_app(3), num_nodes=6), 1)
    assert derived.quantizer.max_clients == 6  # every group may be drawn


# -- structured refusals: a refusing holder is a missing holder, never a dropout ---------

TARGET = 1001


def _tamper(grid: InProcessGrid, stage: str, change, node: int = TARGET) -> None:  # noqa: ANN001
    def rewrite(msg: Message) -> Message:
        if msg.metadata.dst_node_id == node and stage in wire.stages_of(msg.content):
            wire.put(msg.content, stage, change(wire.payload_of(msg.content, stage)))
        return msg

    grid.intercept(rewrite)


def _codes(strategy: SecureAggregation) -> list[tuple[int, str, str]]:
    return [(e.node, e.stage, e.code) for e in strategy.refusals]


def test_a_refusing_holder_is_logged_and_the_round_completes_without_it(caplog) -> None:  # noqa: ANN001
    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    _tamper(grid, wire.UNMASK, lambda p: {**p, "dropped": [1003]})
    strategy = _secagg(5)
    result = strategy.start(grid, _zeros(), num_rounds=1)
    assert _codes(strategy) == [(TARGET, wire.UNMASK, Refusal.BAD_REQUEST)]
    assert f"SECURITY round 1: node {TARGET} refused unmask" in caplog.text
    _assert_mean(result, 1, list(grid.contexts))  # the others' shares sufficed


def test_a_forged_error_text_with_the_old_refusal_marker_does_not_halt_the_run() -> None:
    def liar(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        reply = secagg_mod(msg, context, call_next)
        if context.node_id == 1003 and wire.UPLOAD in wire.stages_of(reply.content):
            return Message(
                Error(code=0, reason=f"{wire.MOD_NAME} refused (unmask): x"), reply_to=msg
            )
        return reply

    grid = InProcessGrid(_updates_app(2, mods=[liar]), num_nodes=5)
    strategy = _secagg(5)
    result = strategy.start(grid, _zeros(), num_rounds=2)
    assert not result.failed_rounds and not strategy.refusals
    assert result.train_metrics_clientapp[1]["secagg-dropped"] == 1


def test_refusals_by_more_nodes_than_tolerated_stop_the_run() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=9)
    _tamper(grid, wire.UNMASK, lambda p: {**p, "dropped": [1003]})  # node 1001 refuses
    _tamper(grid, wire.UNMASK, lambda p: {**p, "dropped": [1004]}, node=1002)
    result = _secagg(9, max_refusals=1).start(grid, _zeros(), num_rounds=4)
    assert result.halt_reason is not None and "max_refusals=1" in result.halt_reason
    assert sorted(result.train_metrics_clientapp) == [1]


def test_one_node_refusing_every_round_never_stops_the_run() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    _tamper(grid, wire.UNMASK, lambda p: {**p, "dropped": [1003]})
    strategy = _secagg(5, max_refusals=1)
    result = strategy.start(grid, _zeros(), num_rounds=4)
    assert result.halt_reason is None and len(strategy.refusals) == 4
    with pytest.raises(ValueError, match="max_refusals must be >= 1"):
        _secagg(5, max_refusals=0)


def test_an_unknown_refusal_code_is_a_bad_reply_not_a_security_event() -> None:
    def liar(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        reply = secagg_mod(msg, context, call_next)
        if context.node_id == 1002 and wire.UNMASK in wire.stages_of(reply.content):
            wire.put(reply.content, wire.UNMASK, {wire.REFUSED: "anything", wire.DETAIL: "x"})
        return reply

    grid = InProcessGrid(_updates_app(2, mods=[liar]), num_nodes=5)
    strategy = _secagg(5, max_refusals=1)
    result = strategy.start(grid, _zeros(), num_rounds=3)
    assert not strategy.refusals and not result.failed_rounds


def test_a_replayed_unmask_request_is_refused() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=4)
    captured = {}

    def replay(msg: Message) -> Message:
        if msg.metadata.dst_node_id == TARGET and wire.UNMASK in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.UNMASK)
            if payload["round"] == 1:
                captured["round1"] = payload
            else:
                wire.put(msg.content, wire.UNMASK, captured["round1"])
        return msg

    grid.intercept(replay)
    strategy = _secagg(4, min_train_replies=3)
    strategy.start(grid, _zeros(), num_rounds=2)
    assert (TARGET, wire.UNMASK, Refusal.REPLAY) in _codes(strategy)


def test_the_pluggable_unmask_rule_is_enforced_by_clients() -> None:
    def keep_pairs_whole(survivors, dropped, cohort):  # noqa: ANN001, ANN202
        return "pair (1003, 1004) incomplete" if (1003 in dropped) != (1004 in dropped) else None

    grid = InProcessGrid(_updates_app(1, mods=[SecAggMod(unmask_rule=keep_pairs_whole)]), 6)
    grid.drop_node(1003, when=_stage(wire.UNMASK, 1), unlist=False)  # fine: it uploaded
    strategy = _secagg(6)
    strategy.start(grid, _zeros(), num_rounds=1)
    assert not strategy.refusals
    grid = InProcessGrid(_updates_app(1, mods=[SecAggMod(unmask_rule=keep_pairs_whole)]), 6)
    grid.drop_node(1003, when=_stage(wire.TRAIN, 1), unlist=False)  # dropped: pair broken
    strategy = _secagg(6)
    with pytest.raises(RunHaltedError, match="too many holders"):
        strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for _, _, code in _codes(strategy)} == {Refusal.GROUPS}


def test_a_node_without_the_mod_is_left_out_with_a_warning(caplog) -> None:  # noqa: ANN001
    def mod_everywhere_but_1003(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        if context.node_id == 1003:
            return call_next(msg, context)
        return secagg_mod(msg, context, call_next)

    grid = InProcessGrid(_updates_app(4, mods=[mod_everywhere_but_1003]), num_nodes=5)
    result = _secagg(5).start(grid, _zeros(), num_rounds=1)
    assert result.train_metrics_clientapp[1]["secagg-clients"] == 4
    assert "node 1003 answered with an error" in caplog.text
    _assert_mean(result, 4, [1001, 1002, 1004, 1005])


# -- the consistency option ---------------------------------------------------------


def _signed_grid(tmp_path, n: int, seed: int = 1) -> InProcessGrid:  # noqa: ANN001
    from flower_privacy.secagg.signing import write_signing_keys

    paths, roster = write_signing_keys(tmp_path / "keys", n)
    configs = [{wire.NODE_SIGNING_KEY: str(path), wire.NODE_ROSTER: str(roster)} for path in paths]
    return InProcessGrid(_updates_app(seed), num_nodes=n, node_configs=configs)


def test_consistency_check_runs_one_more_exchange_and_keeps_the_mean(tmp_path) -> None:  # noqa: ANN001
    grid = _signed_grid(tmp_path, 6, seed=12)
    result = _secagg(6, consistency_check=True).start(grid, _zeros(), num_rounds=2)
    expected = _expected_mean(12, list(grid.contexts))  # each round adds the same mean
    for key in SHAPES:
        np.testing.assert_allclose(result.arrays[key].numpy(), 2 * expected[key], atol=2e-3)
    stages = [
        s
        for e in grid.transcript
        if e.direction == "to-node"
        for s in wire.stages_of(e.message.content)
    ]
    assert stages.count(wire.CONSISTENCY) == 12 and stages.count(wire.UNMASK) == 12


def test_consistency_check_catches_lists_that_differ_from_the_signed_ones(tmp_path) -> None:  # noqa: ANN001
    # The server shows the target at unmasking a survivor list without 1003, unlike the
    # view everyone (the target included) signed in the consistency stage.
    grid = _signed_grid(tmp_path, 6)

    def split(p: dict) -> dict:
        survivors = [n for n in p["survivors"] if n != 1003]
        keep = [i for i, n in enumerate(p["tags-from"]) if n != 1003]
        return {
            **p,
            "survivors": survivors,
            "dropped": sorted([*p["dropped"], 1003]),
            "tags-from": [p["tags-from"][i] for i in keep],
            "tags": [p["tags"][i] for i in keep],
        }

    _tamper(grid, wire.UNMASK, split)
    strategy = _secagg(6, consistency_check=True)
    strategy.start(grid, _zeros(), num_rounds=1)
    assert _codes(strategy) == [(TARGET, wire.UNMASK, Refusal.UNSIGNED)]


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

    _tamper(grid, wire.UNMASK, fewer)
    strategy = _secagg(8, min_train_replies=7)
    strategy.start(grid, _zeros(), num_rounds=1)
    assert (TARGET, wire.UNMASK, Refusal.BELOW_FLOOR) in _codes(strategy)


def test_sum_settings_an_outer_layer_sends_are_checked() -> None:
    from flwr.app import ConfigRecord

    from flower_privacy.dp.distributed import DistributedNoiseEncoding
    from flower_privacy.strategies._secagg_checks import check_sum_settings

    fields = DistributedNoiseEncoding("skellam", 1.0, 100.0, 4.0, 0.5).request_fields()
    with pytest.raises(ValueError, match="unknown encoding"):
        check_sum_settings(wire.SumSettings({**fields, "encoding": "x"}), "uniform")
    with pytest.raises(ValueError, match="weighting='uniform'"):
        check_sum_settings(wire.SumSettings(fields), "weighted")
    assert check_sum_settings(wire.SumSettings(), "weighted") is None
    encoding = check_sum_settings(wire.SumSettings(fields), "uniform")
    assert encoding == DistributedNoiseEncoding.from_request(fields)
    config = wire.SumSettings(fields).put(ConfigRecord({"lr": 0.1}))
    rest, settings = wire.SumSettings.take(config)
    assert dict(rest.items()) == {"lr": 0.1} and settings == wire.SumSettings(fields)
    with pytest.raises(ValueError, match="already holds secure-sum settings"):
        wire.SumSettings(fields).put(config)


def test_a_dp_encoded_sum_is_not_released_by_secure_aggregation_itself() -> None:
    # A layer that asks for a DP encoding releases the sum (aggregate_sum, then step);
    # SecureAggregation alone would divide it by the survivors' count: refused before
    # anything is unmasked (nothing revealed, nothing to charge).
    from flwr.app import ConfigRecord

    from flower_privacy.dp.distributed import DistributedNoiseEncoding

    fields = DistributedNoiseEncoding("skellam", 1.0, 100.0, 4.0, 0.5).request_fields()
    grid = InProcessGrid(_updates_app(1), num_nodes=4)
    strategy = SecureAggregation(_fedavg(4), weighting="uniform", max_weight=1)
    config = wire.SumSettings(fields).put(ConfigRecord())
    with pytest.raises(RunHaltedError, match="carries a DP encoding") as info:
        strategy.start(grid, _zeros(), num_rounds=1, train_config=config)
    assert not info.value.__cause__.revealed
    assert not any(
        e.message.content.config_records.get(wire.PREFIX + wire.UNMASK)
        for e in grid.transcript
        if e.direction == "to-node"
    )


def test_max_clients_below_the_group_size_is_refused_when_the_run_starts() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=6)
    strategy = SecureAggregation(_fedavg(6), max_weight=100, group_size=3, max_clients=2)
    with pytest.raises(ValueError, match="no whole group fits"):
        strategy.start(grid, _zeros(), num_rounds=1)


def _weight_liar(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
    """A malicious client: one more unit in its masked weight slot (masks are additive)."""
    masking = (
        msg.content.config_records.get(wire.PREFIX + wire.MASKING) if msg.has_content() else None
    )
    reply = call_next(msg, context)  # the mod hands the app the message without its records
    if context.node_id != min(NODE_IDS) or not reply.has_content():
        return reply
    if wire.UPLOAD in wire.stages_of(reply.content):
        upload = wire.payload_of(reply.content, wire.UPLOAD)
        assert masking is not None
        bits = int(masking["word-bits"])
        words = np.frombuffer(upload["masked"], dtype=f"<u{bits // 8}").copy()
        words[-2] += words.dtype.type(1)  # the weight slot
        wire.put(reply.content, wire.UPLOAD, {**upload, "masked": words.tobytes()})
    return reply


NODE_IDS = range(1001, 1007)


@pytest.mark.parametrize("failure", ["no-model", "raises", "weight-lie"])
def test_a_sum_the_server_saw_enters_the_participation_audit_even_if_the_round_fails(
    failure: str,
) -> None:
    # Differencing works on every sum the server unmasked, including those of rounds that
    # then failed: the groups' audit must count them, and the failure is a recorded,
    # revealed round (never an exception out of the run).
    inner_cls = {"no-model": NoModelFedAvg, "raises": RaisingFedAvg}.get(failure, FedAvg)
    mods = [_weight_liar, secagg_mod] if failure == "weight-lie" else [secagg_mod]
    grid = InProcessGrid(make_toy_client_app(dim=4, mods=mods), num_nodes=6)
    assert sorted(grid.contexts) == list(NODE_IDS)
    strategy = SecureAggregation(
        inner_cls(min_available_nodes=6, min_train_nodes=6, fraction_evaluate=0.0),
        weighting="uniform",  # the revealed weight must be the survivor count
        group_size=3,
        min_train_replies=3,
        trust_inner_is_mean=True,
    )
    with pytest.raises(RunHaltedError) as info:
        strategy.start(grid, initial_arrays(4), num_rounds=1)
    assert info.value.__cause__.revealed
    reason = info.value.result.failed_rounds[1]
    expected = {"no-model": "returned no model", "raises": "inner step broke"}
    assert expected.get(failure, "lied about its weight") in reason
    assert strategy.plan is not None and strategy.plan.history == [set(NODE_IDS)]
