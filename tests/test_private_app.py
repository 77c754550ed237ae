"""A plain Flower app made private by ``make_private`` + ``client_mods()`` + the snippet;
nodes that require a mechanism refuse weaker requests; the snippet is complete.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_APP, REPO_ROOT, initial_arrays, make_toy_client_app
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import flatten_dict, fuse_dicts
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import flower_privacy
from flower_privacy.errors import RunHaltedError
from flower_privacy.private import REQUIRED, RUN_CONFIG_KEYS, PrivacyConfig, config_snippet
from flower_privacy.private.client import ALLOW_EVALUATE, MAX_CLIP_NORM
from flower_privacy.secagg import floors
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import secagg as secagg_wire

NODES = 6
SNIPPET = flatten_dict(tomllib.loads(config_snippet()))


# -- an app that never heard of flower-privacy ----------------------------------------


def _client_app(mods: list) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # Plain Flower: one step towards this node's target (its partition id).
        target = np.float32(int(context.node_config["partition-id"]))
        weights = msg.content["arrays"]["w"].numpy()
        new = weights + np.float32(0.5) * (target - weights)
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(new)}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def _server_app(private: bool) -> tuple[ServerApp, list]:
    app, results = ServerApp(), []

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES)
        timeout = 3600.0
        if private:  # the whole server-side change
            privacy = flower_privacy.PrivacyConfig.from_run_config(context.run_config)
            strategy, timeout = (
                flower_privacy.make_private(strategy, privacy),
                privacy.round_timeout,
            )
        results.append(strategy.start(grid, initial_arrays(), num_rounds=2, timeout=timeout))

    return app, results


def test_a_plain_app_becomes_private_by_make_private_client_mods_and_the_snippet() -> None:
    # As `flwr run . --run-config "privacy='secagg-groups+dp-distributed' ..."` fuses them.
    overrides = {
        "privacy": "secagg-groups+dp-distributed",
        "secagg-group-size": 3,
        "dp-min-clients": 3,
        "dp-clip-norm": 1.0,
        "dp-target-epsilon": 20.0,
        "round-timeout": 45.0,
    }
    run_config = fuse_dicts(SNIPPET, overrides)
    server_app, results = _server_app(private=True)
    grid = InProcessGrid(
        _client_app(flower_privacy.client_mods()), num_nodes=NODES, run_config=run_config
    )
    grid.run_server_app(server_app, run_config)
    result = results[0]
    assert not result.failed_rounds and sorted(result.train_metrics_clientapp) == [1, 2]
    assert 0 < result.train_metrics_clientapp[2]["dp-epsilon"] <= 20.0
    replies = [e.message for e in grid.transcript if e.direction == "from-node"]
    # No node ever sent its weights: only masked uploads.
    assert not any(m.content.array_records for m in replies if not m.has_error())
    assert any(secagg_wire.UPLOAD in secagg_wire.stages_of(m.content) for m in replies)
    assert set(grid.timeouts) == {45.0}
    # The same app, unchanged, runs in the clear: the three changes are what did it.
    plain_app, plain = _server_app(private=False)
    grid = InProcessGrid(_client_app([]), num_nodes=NODES, run_config=run_config)
    grid.run_server_app(plain_app, run_config)
    assert any(
        m.content.array_records for m in (e.message for e in grid.transcript) if m.has_content()
    )
    assert "dp-epsilon" not in plain[0].train_metrics_clientapp[2]


# -- the snippet ------------------------------------------------------------------------


def test_the_snippet_declares_every_key_and_flower_refuses_an_undeclared_one() -> None:
    assert sorted(SNIPPET) == sorted(spec.key for spec in RUN_CONFIG_KEYS)
    # Every key can be overridden on the command line, as flwr run fuses them.
    fused = fuse_dicts(SNIPPET, {spec.key: spec.default for spec in RUN_CONFIG_KEYS})
    assert PrivacyConfig.from_run_config(fused).privacy == "none"
    with pytest.raises(ValueError, match="Key 'dp-epsilon' is not present in the main dictionary"):
        fuse_dicts(SNIPPET, {"dp-epsilon": 3.0})


def test_the_readme_and_the_digits_app_declare_the_snippet() -> None:
    assert config_snippet() in (REPO_ROOT / "README.md").read_text()
    digits = tomllib.loads((DIGITS_APP / "pyproject.toml").read_text())
    declared = flatten_dict(digits["tool"]["flwr"]["app"]["config"])
    missing = [spec.key for spec in RUN_CONFIG_KEYS if spec.key not in declared]
    assert not missing, missing


def test_from_run_config_reads_every_key_into_its_field() -> None:
    cfg = {
        **SNIPPET,
        "privacy": "secagg-groups+dp-distributed",
        "secagg-group-size": 4,
        "dp-target-epsilon": 2.5,
        "dp-min-clients": 7,
        "round-timeout": 12.0,
    }
    config = PrivacyConfig.from_run_config(cfg)
    assert (config.group_size, config.target_epsilon, config.min_clients) == (4, 2.5, 7)
    assert config.round_timeout == 12.0 and config.noise_multiplier is None  # 0 = unset
    with pytest.raises(ValueError, match="secagg-group-size must be a whole number"):
        PrivacyConfig.from_run_config({**cfg, "secagg-group-size": 2.5})
    with pytest.raises(ValueError, match="dp-adaptive-clipping must be true or false"):
        PrivacyConfig.from_run_config({**cfg, "dp-adaptive-clipping": 1})


# -- no downgrade -----------------------------------------------------------------------


def _run(privacy: str, node_config: dict, **fields) -> InProcessGrid:
    config = PrivacyConfig(
        privacy,
        group_size=3,
        selection_seed=1,
        target_epsilon=50.0,
        noise_multiplier=1.0,
        accountant="rdp",
        clip_norm=1.0,
        min_clients=3,
        **fields,
    )
    app = make_toy_client_app(app=ClientApp(mods=flower_privacy.client_mods()))
    grid = InProcessGrid(app, num_nodes=NODES, node_configs=[node_config] * NODES)
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES)
    flower_privacy.make_private(inner, config).start(
        grid, initial_arrays(), num_rounds=1, timeout=30.0
    )
    return grid


def _refusals(grid: InProcessGrid) -> list[str]:
    replies = [e.message for e in grid.transcript if e.direction == "from-node"]
    out = [m.error.reason for m in replies if m.has_error()]
    for m in replies:
        if m.has_content():
            for stage in secagg_wire.stages_of(m.content):
                refused = secagg_wire.refusal_of(secagg_wire.payload_of(m.content, stage))
                if refused:
                    out.append(" ".join(refused))
    return out


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_train_request() -> None:
    app = make_toy_client_app(app=ClientApp(mods=flower_privacy.client_mods()))
    grid = InProcessGrid(app, num_nodes=1, node_configs=[{REQUIRED: "secagg"}])
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord({})})
    request = grid.create_message(content, "train", grid.get_node_ids()[0], "")
    (reply,) = grid.send_and_receive([request], timeout=10.0)
    assert reply.has_error()
    assert "requires secure aggregation and never sends a plain update" in reply.error.reason
    with pytest.raises(RunHaltedError):
        _run("none", {REQUIRED: "secagg"})
    assert not _refusals(_run("secagg", {REQUIRED: "secagg"}))


@pytest.mark.parametrize(
    ("required", "weaker", "stronger"),
    [
        ("secagg-groups", "secagg", "secagg-groups"),
        ("dp-client", "none", "dp-client"),
        ("dp-client", "secagg", "secagg+dp-distributed"),
    ],
)
def test_a_node_refuses_what_is_weaker_than_it_requires(required, weaker, stronger) -> None:
    node_config = {REQUIRED: required, MAX_CLIP_NORM: 1.0}
    with pytest.raises(RunHaltedError):
        _run(weaker, node_config)
    assert not _refusals(_run(stronger, node_config))


def test_a_node_requiring_distributed_dp_names_its_noise_floor() -> None:
    node_config = {REQUIRED: "dp-distributed", floors.MIN_NOISE_MULTIPLIER: 0.1}
    with pytest.raises(RunHaltedError):
        _run("secagg", node_config)
    assert not _refusals(_run("dp-distributed", node_config))
    with pytest.raises(RunHaltedError):
        _run("dp-distributed", {REQUIRED: "dp-distributed"})  # no floor given


@pytest.mark.parametrize(
    ("required", "message"),
    [
        ("dp-central", "cannot check dp-central"),
        ("dp-sgd", "app's own training code"),
        ("he+secagg", "invalid"),
        ("secure", "unknown mechanism"),
    ],
)
def test_a_requirement_no_node_can_check_is_a_named_node_config_error(required, message) -> None:
    app = make_toy_client_app(app=ClientApp(mods=flower_privacy.client_mods()))
    grid = InProcessGrid(app, num_nodes=1, node_configs=[{REQUIRED: required}])
    request = grid.create_message(
        RecordDict({"arrays": initial_arrays()}), "train", grid.get_node_ids()[0], ""
    )
    (reply,) = grid.send_and_receive([request], timeout=10.0)
    assert reply.has_error() and message in reply.error.reason and REQUIRED in reply.error.reason


def _probe(node_config: dict, message_type: str, config: dict | None = None) -> Message:
    """One message, as a deviating server would send it, and the node's reply."""
    app = make_toy_client_app(app=ClientApp(mods=flower_privacy.client_mods()))

    @app.query()
    def query(msg: Message, context: Context) -> Message:  # an app that answers queries
        return Message(RecordDict({"metrics": MetricRecord({"rows": 100})}), reply_to=msg)

    grid = InProcessGrid(app, num_nodes=1, node_configs=[node_config])
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord(config or {})})
    request = grid.create_message(content, message_type, grid.get_node_ids()[0], "")
    (reply,) = grid.send_and_receive([request], timeout=10.0)
    return reply


@pytest.mark.parametrize(
    ("node_config", "message_type", "config", "reason"),
    [
        # "train.<action>" reaches the app's train function: every mod must see it.
        ({REQUIRED: "he"}, "train.default", None, "requires encryption"),
        ({REQUIRED: "he"}, "evaluate.default", None, "requires encryption"),
        ({REQUIRED: "secagg"}, "train.default", None, "requires secure aggregation"),
        # An evaluate reply releases metrics on any model: outside the guarantee.
        (
            {REQUIRED: "dp-distributed", floors.MIN_NOISE_MULTIPLIER: 0.5},
            "evaluate",
            None,
            "evaluate reply releases its metrics",
        ),
        ({REQUIRED: "secagg"}, "evaluate.default", None, "evaluate reply releases"),
        ({REQUIRED: "secagg"}, "query", None, "answers no 'query' messages"),
        # The clip norm this node relies on is its own, not the server's request.
        (
            {REQUIRED: "dp-client", MAX_CLIP_NORM: 1.0},
            "train.default",
            {"dp-clip-norm": 1e300},
            "clip norm of at most 1.0",
        ),
        ({REQUIRED: "dp-client"}, "train", {"dp-clip-norm": 0.5}, MAX_CLIP_NORM),
    ],
)
def test_a_deviating_server_gets_nothing_weaker_from_a_requiring_node(
    node_config, message_type, config, reason
) -> None:  # noqa: ANN001
    reply = _probe(node_config, message_type, config)
    assert reply.has_error() and reason in reply.error.reason, reply


def test_evaluate_is_answered_with_the_nodes_opt_in_and_clipping_within_its_ceiling() -> None:
    allowed = {REQUIRED: "secagg", ALLOW_EVALUATE: True}
    assert not _probe(allowed, "evaluate").has_error()
    clipped = _probe({REQUIRED: "dp-client", MAX_CLIP_NORM: 1.0}, "train", {"dp-clip-norm": 0.5})
    assert not clipped.has_error()
    assert clipped.content.metric_records["metrics"]["dp-unclipped"] in (0, 1)


def test_a_node_that_requires_encryption_refuses_a_plaintext_model() -> None:
    app = make_toy_client_app(app=ClientApp(mods=flower_privacy.client_mods()))
    grid = InProcessGrid(app, num_nodes=1, node_configs=[{REQUIRED: "he"}])
    for message_type in ("train", "evaluate"):
        request = grid.create_message(
            RecordDict({"arrays": initial_arrays()}), message_type, grid.get_node_ids()[0], ""
        )
        (reply,) = grid.send_and_receive([request], timeout=10.0)
        assert reply.has_error() and "requires encryption" in reply.error.reason


def test_nothing_required_the_mods_are_passive() -> None:
    assert not _refusals(_run("none", {}))


# -- make demo's output (the runs faked: no Ray) -----------------------------------------


def test_the_demo_prints_rounds_baseline_and_privacy_and_ends_with_the_final_accuracy(
    monkeypatch,
) -> None:
    from typer.testing import CliRunner

    from flower_privacy import cli
    from flower_privacy.harness import simulation
    from flower_privacy.harness.flwr_cli import RunOutcome

    asked: list[list[str]] = []
    private_log = [
        "INFO : round 1: accuracy 0.500, ε 10.782, T 10",
        "INFO : some other line",
        "INFO : privacy: secagg-groups+dp-distributed; client-level (ε=49.997, δ=1e-05)-DP",
        "INFO : final accuracy: 0.850",
    ]

    class FakeSimulation:
        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            return None

        def run(self, app_dir, federation, *, run_config, echo=None, timeout=0.0):  # noqa: ANN001, ANN201
            asked.append(run_config)
            private = run_config[0].endswith("demo.toml")
            log = private_log if private else ["INFO : final accuracy: 0.958"]
            for line in log:
                if echo:
                    echo(line)
            return RunOutcome(
                1, "finished:completed", final_accuracy=0.85 if private else 0.958, log=log
            )

    monkeypatch.setattr(simulation, "LocalSimulation", FakeSimulation)
    out = CliRunner().invoke(cli.app, ["demo"])
    assert out.exit_code == 0, out.output
    assert [Path(r[0]).name for r in asked] == ["demo-baseline.toml", "demo.toml"]
    lines = out.output.strip().splitlines()
    assert "round 1: accuracy 0.500, ε 10.782, T 10" in out.output
    assert "some other line" not in out.output
    assert "accuracy: private 0.850 vs plain baseline 0.958" in lines
    assert lines[-2].startswith("privacy: secagg-groups+dp-distributed; client-level (ε=49.997")
    assert lines[-1] == "final accuracy: 0.850"
    demo = tomllib.loads((REPO_ROOT / "configs" / "run" / "demo.toml").read_text())
    assert demo["privacy"] == "secagg-groups+dp-distributed"
