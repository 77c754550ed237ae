"""ClientLevelDP on the in-process grid: calibration, accounting, budget, noise, sampling."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from conftest import NoModelFedAvg, RaisingFedAvg, initial_arrays, make_toy_client_app
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedMedian

from flower_privacy.dp import distributed
from flower_privacy.dp.accounting import GaussianRounds, epsilon
from flower_privacy.dp.clipping import AdaptiveClipping, clip_l2, noisy_unclipped_fraction
from flower_privacy.dp.noise import secure_generator
from flower_privacy.errors import RunHaltedError
from flower_privacy.mods import client_clipping_mod, secagg_mod
from flower_privacy.strategies import ClientLevelDP, SecureAggregation
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import secagg as secagg_wire

N = 10


def _fedavg(fraction_train: float = 1.0, n: int = N) -> FedAvg:
    return FedAvg(
        fraction_train=fraction_train,
        min_train_nodes=1,
        min_available_nodes=n,
        fraction_evaluate=0.0,
    )


def _run(placement: str, dim: int, rounds: int, **kwargs):  # noqa: ANN003, ANN202
    mods = {"central": [], "client": [client_clipping_mod]}[placement]
    grid = InProcessGrid(make_toy_client_app(dim=dim, mods=mods), num_nodes=N)
    kwargs.setdefault("accountant", "rdp")
    strategy = ClientLevelDP(_fedavg(), placement=placement, **kwargs)
    return strategy, grid, strategy.start(grid, initial_arrays(dim), num_rounds=rounds)


def test_metrics_report_the_accounted_epsilon_every_round() -> None:
    strategy, _, result = _run("central", 8, 3, target_epsilon=4.0, delta=1e-5, seed=1)
    z = strategy.noise_multiplier
    for rnd in (1, 2, 3):
        metrics = result.train_metrics_clientapp[rnd]
        reference = RdpAccountant()
        reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rnd))
        assert metrics["dp-epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        assert metrics["dp-delta"] == 1e-5 and metrics["dp-noise-multiplier"] == z
        assert metrics["dp-clip-norm"] == 0.1
        # Clients' own metrics are aggregates of data, not noised: never released.
        assert "calls" not in metrics and "num-examples" not in metrics
    assert result.train_metrics_clientapp[3]["dp-epsilon"] <= 4.0
    assert result.halt_reason is None


def test_calibration_before_round_one_meets_the_target_with_the_pld_accountant() -> None:
    # Every node every round (q = 1): the PLD accountant's exact Gaussian profile.
    strategy, _, result = _run("central", 4, 3, target_epsilon=2.0, delta=1e-5, accountant="pld")
    z = strategy.noise_multiplier
    assert result.train_metrics_clientapp[3]["dp-epsilon"] <= 2.0
    assert (
        epsilon(GaussianRounds(z, 1.0, 3), 1e-5)
        <= 2.0
        < epsilon(GaussianRounds(0.99 * z, 1.0, 3), 1e-5)
    )


def test_budget_exhaustion_stops_cleanly_at_the_right_round() -> None:
    z, delta = 1.0, 1e-5
    after = [epsilon(GaussianRounds(z, 1.0, k), delta, "rdp") for k in (3, 4)]
    target = (after[0] + after[1]) / 2  # three rounds fit, a fourth does not
    strategy, _, result = _run(
        "central", 4, 10, noise_multiplier=z, target_epsilon=target, delta=delta, seed=2
    )
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert result.train_metrics_clientapp[3]["dp-epsilon"] == pytest.approx(after[0])
    assert "privacy budget spent" in result.halt_reason and "after 3 private" in result.halt_reason
    assert strategy.released == 3 and not result.failed_rounds


@pytest.mark.parametrize("placement", ["central", "client"])
def test_noise_has_the_intended_mean_and_variance(placement) -> None:  # noqa: ANN001
    dim, clip, z = 20_000, 1.0, 1.0
    _, _, result = _run(placement, dim, 1, noise_multiplier=z, clip_norm=clip, seed=3)
    # Every toy client adds (id + 1) to each weight: norm >> clip, so each is clipped to
    # clip/sqrt(dim) per coordinate; the mean over m = N expected clients is that again.
    noise = result.arrays["w"].numpy().astype(np.float64) - clip / math.sqrt(dim)
    std = z * clip / N
    assert abs(noise.mean()) < 4 * std / math.sqrt(dim)
    assert noise.var() == pytest.approx(std**2, rel=0.04)


def test_noise_comes_from_the_csprng_unless_a_test_seed_is_given() -> None:
    runs = []
    for seed in (None, None, 7, 7):
        np.random.seed(0)  # the global generator must not matter
        _, _, result = _run("central", 64, 1, noise_multiplier=1.0, seed=seed)
        runs.append(result.arrays["w"].numpy())
    assert not np.array_equal(runs[0], runs[1])
    assert np.array_equal(runs[2], runs[3])
    assert secure_generator().random() != secure_generator().random()


def test_poisson_sampling_frequencies_match_the_rate() -> None:
    rounds, q = 25, 0.3
    _, grid, result = _run("central", 4, rounds, noise_multiplier=1.0, sampling_rate=q, seed=11)
    calls = [
        int(c.state["calls"]["n"]) if "calls" in c.state else 0 for c in grid.contexts.values()
    ]
    expected, std = N * rounds * q, math.sqrt(N * rounds * q * (1 - q))
    assert abs(sum(calls) - expected) < 4 * std, calls
    per_node_std = math.sqrt(rounds * q * (1 - q))
    assert all(abs(c - rounds * q) < 4.5 * per_node_std for c in calls), calls
    assert not result.failed_rounds


def test_poisson_sampling_needs_an_inner_strategy_that_selects_every_node() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=N)
    strategy = ClientLevelDP(_fedavg(0.5), noise_multiplier=1.0, sampling_rate=0.2)
    with pytest.raises(ValueError, match="fraction_train=1.0"):
        strategy.start(grid, initial_arrays(), num_rounds=1)


def test_client_placement_rejects_an_update_that_skipped_clipping() -> None:
    grid = InProcessGrid(make_toy_client_app(dim=8), num_nodes=N)  # no client_clipping_mod
    strategy = ClientLevelDP(_fedavg(), noise_multiplier=1.0, placement="client")
    with pytest.raises(RunHaltedError, match="client_clipping_mod"):
        strategy.start(grid, initial_arrays(8), num_rounds=1)


def test_client_placement_rejects_a_client_that_lies_about_clipping() -> None:
    app = ClientApp(mods=[])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        weights = msg.content["arrays"]["w"].numpy() + np.float32(5.0)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(weights)}),
                    "metrics": MetricRecord({"num-examples": 1, "dp-unclipped": 1}),
                }
            ),
            reply_to=msg,
        )

    grid = InProcessGrid(app, num_nodes=N)
    strategy = ClientLevelDP(_fedavg(), noise_multiplier=1.0, placement="client")
    with pytest.raises(RunHaltedError, match="exceeds the clip norm"):
        strategy.start(grid, initial_arrays(8), num_rounds=1)


def test_server_noise_under_secure_aggregation_is_refused() -> None:
    # Secure aggregation's fixed-point rounding would add up to sqrt(d)/scale to each
    # update's norm, beyond the clip norm that server noise is calibrated for.
    inner = SecureAggregation(_fedavg(), weighting="uniform")
    for placement in ("central", "client"):
        with pytest.raises(TypeError, match="needs placement='distributed'"):
            ClientLevelDP(inner, noise_multiplier=1.0, placement=placement)


def test_a_fixed_size_sample_is_refused() -> None:
    # Adding a client could push another out of a fixed-size sample: sensitivity 2C.
    grid = InProcessGrid(make_toy_client_app(), num_nodes=N)
    strategy = ClientLevelDP(_fedavg(0.5), noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(ValueError, match="doubling the sensitivity"):
        strategy.start(grid, initial_arrays(), num_rounds=1)


def test_adaptive_clipping_reports_a_moving_clip_norm_and_charges_the_count() -> None:
    strategy, _, result = _run(
        "client", 16, 3, noise_multiplier=1.0, adaptive_clipping=True, count_noise_std=2.0, seed=5
    )
    norms = [result.train_metrics_clientapp[r]["dp-clip-norm"] for r in (1, 2, 3)]
    assert norms[0] == 0.1 and norms[1] != norms[0]
    # Every toy update is far longer than the clip norm: the clip norm grows.
    assert norms[2] > norms[0]
    # z = (z_Δ^-2 + (2σ_b)^-2)^-1/2: the update gets less noise than z alone would give.
    assert strategy.update_noise_multiplier == pytest.approx((1.0 - 1 / 16) ** -0.5)


def test_adaptive_clipping_with_too_little_count_noise_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="count_noise_std"):
        _run("central", 4, 1, noise_multiplier=2.0, adaptive_clipping=True)  # σ_b = 10/20


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile(quantile) -> None:  # noqa: ANN001
    rng = np.random.default_rng(11)  # test data, not privacy noise
    clients = 200
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=clients)
    rule = AdaptiveClipping(target_quantile=quantile, learning_rate=0.2)
    noise_rng = secure_generator(seed=12)
    clip, history = 0.1, []
    for _ in range(300):
        unclipped = int(np.sum(norms <= clip))
        noise = noise_rng.normal(0.0, clients / 20)
        clip = rule.next_clip_norm(
            clip, noisy_unclipped_fraction(unclipped, clients, clients, noise)
        )
        history.append(clip)
    settled = np.mean(history[-100:])
    low, high = np.quantile(norms, [quantile - 0.07, quantile + 0.07])
    assert low <= settled <= high, (settled, low, high)


def test_clipping_scales_long_updates_only() -> None:
    short, was = clip_l2(np.array([0.3, 0.4]), 1.0)
    assert not was and np.allclose(short, [0.3, 0.4])
    long, was = clip_l2(np.array([3.0, 4.0]), 1.0)
    assert was and np.isclose(np.linalg.norm(long), 1.0)
    zero, was = clip_l2(np.zeros(3), 1.0)
    assert not was and not zero.any()
    with pytest.raises(ValueError, match="NaN"):
        clip_l2(np.array([np.nan]), 1.0)


def test_bad_configurations_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="target_epsilon.*or noise_multiplier"):
        ClientLevelDP(_fedavg())
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 2"):
        ClientLevelDP(_fedavg(), noise_multiplier=1.0, delta=2)
    with pytest.raises(ValueError, match="placement must be one of"):
        ClientLevelDP(_fedavg(), noise_multiplier=1.0, placement="local")
    with pytest.raises(TypeError, match="mean-based"):
        ClientLevelDP(FedMedian(), noise_multiplier=1.0)
    with pytest.raises(TypeError, match="SecureAggregation"):
        ClientLevelDP(_fedavg(), target_epsilon=3.0, placement="distributed")
    distributed = {"target_epsilon": 3.0, "placement": "distributed"}
    with pytest.raises(ValueError, match="uniform client weights"):
        ClientLevelDP(SecureAggregation(_fedavg()), **distributed)
    fixed = SecureAggregation(_fedavg(), weighting="uniform", uniform_denominator=4.0)
    with pytest.raises(ValueError, match="without uniform_denominator"):
        ClientLevelDP(fixed, **distributed)
    secure = SecureAggregation(_fedavg(), weighting="uniform")
    with pytest.raises(ValueError, match="adaptive clipping with distributed noise"):
        ClientLevelDP(secure, adaptive_clipping=True, **distributed)
    with pytest.raises(ValueError, match="target_quantile must be in"):
        ClientLevelDP(_fedavg(), noise_multiplier=1.0, adaptive_clipping=True, target_quantile=1)


def _unchanged_app(mods: list) -> ClientApp:
    """Every client sends the global weights back: its update is exactly zero."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        content = RecordDict(
            {"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(content, reply_to=msg)

    return app


@pytest.fixture
def pinned_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded noise shares: the statistical checks below then pass or fail for good."""
    seeds = itertools.count(1)
    monkeypatch.setattr(
        distributed, "secure_generator", lambda seed=None: secure_generator(next(seeds))
    )


def _distributed(n: int, min_clients: int, mechanism: str = "skellam") -> ClientLevelDP:
    inner = SecureAggregation(
        _fedavg(n=n), weighting="uniform", min_train_replies=min_clients, max_clients=20
    )
    return ClientLevelDP(
        inner, target_epsilon=3.0, clip_norm=1.0, placement="distributed", mechanism=mechanism
    )


@pytest.mark.parametrize(("mechanism", "dropped"), [("skellam", 0), ("skellam", 3), ("ddg", 3)])
def test_distributed_noise_is_never_below_the_target_and_exactly_it_at_the_minimum(
    mechanism, dropped, pinned_shares
) -> None:  # noqa: ANN001
    from conftest import stage_filter

    n, min_clients, dim = 8, 5, 20_000
    grid = InProcessGrid(_unchanged_app([secagg_mod]), num_nodes=n)
    for node in list(grid.contexts)[:dropped]:
        grid.drop_node(node, when=stage_filter("train", 1), unlist=False)
    strategy = _distributed(n, min_clients, mechanism)
    result = strategy.start(grid, initial_arrays(dim), num_rounds=1)
    plan = strategy.distributed_plan
    survivors = n - dropped
    assert result.train_metrics_clientapp[1]["secagg-clients"] == survivors
    assert "secagg-clipped" not in result.train_metrics_clientapp[1]
    assert result.train_metrics_clientapp[1]["dp-epsilon"] <= 3.0
    # Zero updates: the decoded mean is the summed noise / (γ · m), m = n expected.
    noise = result.arrays["w"].numpy().astype(np.float64) * plan.scale * n
    assert abs(noise.mean()) < 4 * math.sqrt(survivors * plan.share_variance / dim)
    assert noise.var() == pytest.approx(survivors * plan.share_variance, rel=0.04)
    assert survivors * plan.share_variance >= plan.noise_variance
    if survivors == min_clients:
        assert noise.var() == pytest.approx(plan.noise_variance, rel=0.04)


def test_distributed_noise_recovers_the_clipped_mean(pinned_shares: None) -> None:
    dim, n = 2048, 6
    grid = InProcessGrid(make_toy_client_app(dim=dim, mods=[secagg_mod]), num_nodes=n)
    strategy = _distributed(n, 4)
    result = strategy.start(grid, initial_arrays(dim), num_rounds=2)
    plan = strategy.distributed_plan
    # Each update (id + 1 per coordinate) is clipped to 1/sqrt(d) per coordinate; two
    # rounds move the weights by twice that, plus two rounds of noise.
    error = result.arrays["w"].numpy().astype(np.float64) - 2 / math.sqrt(dim)
    noise_std = math.sqrt(2 * n * plan.share_variance) / (plan.scale * n)
    assert abs(error.mean()) < 4 * noise_std / math.sqrt(dim)
    assert error.std() == pytest.approx(noise_std, rel=0.1)
    assert result.train_metrics_clientapp[2]["dp-epsilon"] <= 3.0


def test_a_second_run_is_not_charged_for_the_first_runs_unmasking() -> None:
    from conftest import stage_filter

    dim, n = 64, 6
    strategy = _distributed(n, 4)
    first = InProcessGrid(make_toy_client_app(dim=dim, mods=[secagg_mod]), num_nodes=n)
    strategy.start(first, initial_arrays(dim), num_rounds=1)
    assert strategy.released == 1
    # Round 1 of the second run fails before anything is unmasked (3 uploads, 4 needed).
    second = InProcessGrid(make_toy_client_app(dim=dim, mods=[secagg_mod]), num_nodes=n)
    for node in list(second.contexts)[:3]:
        second.drop_node(node, when=stage_filter("train", 1), unlist=False)
    try:
        result = strategy.start(second, initial_arrays(dim), num_rounds=1)
    except RunHaltedError as err:
        result = err.result
    assert "masked uploads" in result.failed_rounds[1]
    assert strategy.released == 0


def _weight_liar(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
    """A malicious client: one more unit in its masked weight slot (masks are additive)."""
    reply = call_next(msg, context)
    if context.node_id != min(NODES) or not reply.has_content():
        return reply
    if secagg_wire.UPLOAD in secagg_wire.stages_of(reply.content):
        upload = secagg_wire.payload_of(reply.content, secagg_wire.UPLOAD)
        words = np.frombuffer(upload["masked"], dtype="<u4").copy()
        words[-2] += np.uint32(1)  # the weight slot
        secagg_wire.put(reply.content, secagg_wire.UPLOAD, {**upload, "masked": words.tobytes()})
    return reply


NODES = range(1001, 1007)


def test_a_round_that_fails_after_unmasking_is_charged_and_the_sum_keys_stay_server_side() -> None:
    dim, n = 64, 6
    grid = InProcessGrid(make_toy_client_app(dim=dim, mods=[_weight_liar, secagg_mod]), num_nodes=n)
    assert sorted(grid.contexts) == list(NODES)
    strategy = _distributed(n, 4)
    try:
        result = strategy.start(grid, initial_arrays(dim), num_rounds=1)
    except RunHaltedError as err:
        result = err.result
    assert "lied about its weight" in result.failed_rounds[1]
    assert strategy.released == 1  # the server saw the noisy sum: charged
    sent = [e.message.content for e in grid.transcript if e.direction == "to-node"]
    keys = {k for c in sent for record in c.config_records.values() for k in record}
    assert keys and not any(k.startswith(secagg_wire.SUM_PREFIX) for k in keys)


@pytest.mark.parametrize(
    ("inner_cls", "reason"),
    [(NoModelFedAvg, "returned no model"), (RaisingFedAvg, "inner step broke")],
)
def test_a_round_whose_inner_step_fails_after_the_release_is_charged_and_recorded(
    inner_cls: type, reason: str
) -> None:
    # The release step charges before it hands the mean on: a failure in the inner
    # strategy's own step must not give the server a free look at the noisy sum, and it
    # is a failed (revealed) round, not an exception out of the run.
    dim, n = 64, 6
    grid = InProcessGrid(make_toy_client_app(dim=dim, mods=[secagg_mod]), num_nodes=n)
    inner = SecureAggregation(
        inner_cls(fraction_train=1.0, min_train_nodes=1, min_available_nodes=n),
        weighting="uniform",
        min_train_replies=4,
        max_clients=20,
        trust_inner_is_mean=True,
    )
    strategy = ClientLevelDP(inner, target_epsilon=3.0, clip_norm=1.0, placement="distributed")
    with pytest.raises(RunHaltedError) as info:
        strategy.start(grid, initial_arrays(dim), num_rounds=1)
    assert reason in info.value.result.failed_rounds[1]
    assert info.value.__cause__.revealed
    assert strategy.released == 1


def test_distributed_placement_refuses_sampling_it_cannot_account() -> None:
    inner = SecureAggregation(_fedavg(), weighting="uniform")
    with pytest.raises(ValueError, match="amplification by sampling does not hold"):
        ClientLevelDP(inner, target_epsilon=3.0, placement="distributed", sampling_rate=0.2)
    with pytest.raises(ValueError, match="give target_epsilon"):
        ClientLevelDP(inner, noise_multiplier=1.0, placement="distributed")


def test_a_round_with_nobody_sampled_still_releases_noise() -> None:
    _, grid, result = _run("central", 64, 1, noise_multiplier=1.0, sampling_rate=1e-6, seed=8)
    assert not [e for e in grid.transcript if e.message_type == "train"]
    assert not result.failed_rounds and "dp-epsilon" in result.train_metrics_clientapp[1]
    # Noise alone moved the model: std z·C/m with m = q·N = 1e-5 expected clients.
    assert result.arrays["w"].numpy().std() == pytest.approx(1.0 * 0.1 / (1e-6 * N), rel=0.3)


def test_adaptive_clipping_applies_the_update_noise_for_the_clip_norm_in_use() -> None:
    dim, sigma_b = 20_000, 2.0
    grid = InProcessGrid(_unchanged_app([]), num_nodes=N)
    strategy = ClientLevelDP(
        _fedavg(),
        noise_multiplier=1.0,
        adaptive_clipping=True,
        count_noise_std=sigma_b,
        clip_norm=0.5,
        accountant="rdp",
        seed=9,
    )
    result = strategy.start(grid, initial_arrays(dim), num_rounds=1)
    z_update = (1.0 - (2 * sigma_b) ** -2) ** -0.5
    assert strategy.update_noise_multiplier == pytest.approx(z_update)
    # Zero updates: the model is the noise, std z_Δ · C / m with C the round's clip norm.
    assert result.arrays["w"].numpy().std() == pytest.approx(z_update * 0.5 / N, rel=0.03)
    # Every update fitted under the clip norm: it shrinks (b̄ ≈ 1 > 0.5, up to noise).
    assert strategy.clip_norm < 0.5


@pytest.mark.parametrize("placement", ["central", "client"])
def test_each_clients_own_update_enters_the_mean(placement) -> None:  # noqa: ANN001
    mods = [client_clipping_mod] if placement == "client" else []
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        weights = msg.content["arrays"]["w"].numpy().copy()
        weights[pid] += 0.05 * (pid + 1)  # short: never clipped; one coordinate each
        content = RecordDict(
            {"arrays": ArrayRecord({"w": Array(weights)}), "metrics": MetricRecord({"n": 1})}
        )
        return Message(content, reply_to=msg)

    grid = InProcessGrid(app, num_nodes=5)
    strategy = ClientLevelDP(
        _fedavg(n=5),
        noise_multiplier=1e-6,
        placement=placement,
        clip_norm=1.0,
        accountant="rdp",
        seed=10,
    )
    result = strategy.start(grid, initial_arrays(8), num_rounds=1)
    expected = [0.05 * (pid + 1) / 5 for pid in range(5)] + [0.0] * 3
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, atol=1e-6)
