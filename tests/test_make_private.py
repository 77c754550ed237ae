"""``make_private`` and ``client_mods``: every cell of the composition matrix, on the grid.

Valid cells run two rounds on the in-process grid with ``client_mods()`` and show their
mechanism in the transcript; invalid and not-yet cells fail at construction naming the
conflict and the fix. Every run also checks that the one timeout of the configuration
reaches every exchange of every layer (the grid records waits and TTLs).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
from conftest import initial_arrays, make_toy_client_app
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy import PrivacyConfig, client_mods, he, make_private
from flower_privacy.private import matrix
from flower_privacy.private.matrix import INVALID, MECHANISMS, NOT_YET, VALID
from flower_privacy.strategies import (
    ClientLevelDP,
    EncryptedFedAvg,
    SecureAggregation,
    StrictRounds,
)
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import dp as dp_wire
from flower_privacy.wire import he as he_wire
from flower_privacy.wire import secagg as secagg_wire

TIMEOUT = 30.0
NODES = 6
LIMITS = he.DeclaredLimits(max_clients=10, max_weight=100, clip_range=16.0, precision_bits=16)
# Small, fast parameters; the noise is fixed or cheap to calibrate (RDP).
BASE = {
    "round_timeout": TIMEOUT,
    "group_size": 3,
    "selection_seed": 1,
    "noise_multiplier": 1.0,
    "target_epsilon": 50.0,
    "accountant": "rdp",
    "clip_norm": 1.0,
    "min_clients": 3,
    "secagg_max_clients": 20,
}
VALID_CONFIGS = [
    "none",
    "secagg",
    "secagg-groups",
    "dp-central",
    "dp-client",
    "dp-distributed",
    "secagg-groups+dp-distributed",
    "he",
    "dp-sgd",
    *[f"{m}+dp-sgd" for m in MECHANISMS if m != "dp-sgd"],
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return he.generate_keys(tmp_path_factory.mktemp("keys"), he.derive_parameters("bfv", LIMITS))


def _config(privacy: str, keys: tuple[Path, Path] | None = None) -> PrivacyConfig:
    extra = {}
    if keys is not None and "he" in privacy.split("+"):
        extra = {"he_server_context": str(keys[1]), **LIMITS_AS_FIELDS}
    return PrivacyConfig(privacy, **BASE, **extra)


LIMITS_AS_FIELDS = {
    "he_max_clients": LIMITS.max_clients,
    "he_max_weight": LIMITS.max_weight,
    "he_clip_range": LIMITS.clip_range,
    "he_precision_bits": LIMITS.precision_bits,
}


def _fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES)


def _app(keys: tuple[Path, Path] | None = None) -> ClientApp:
    he_context = str(keys[0]) if keys is not None else None
    return make_toy_client_app(app=ClientApp(mods=client_mods(he_context=he_context)))


def _sent(grid: InProcessGrid) -> list:
    return [e.message for e in grid.transcript if e.direction == "to-node"]


# -- valid cells ---------------------------------------------------------------------


def test_every_valid_cell_is_in_the_list_run_below() -> None:
    singles = {m for m in MECHANISMS}
    pairs = {
        f"{a}+{b}" for a, b in combinations(MECHANISMS, 2) if matrix.cell(a, b).status == VALID
    }
    covered = {PrivacyConfig(c, **BASE, he_server_context="x").privacy for c in VALID_CONFIGS}
    canonical = {PrivacyConfig(c, **BASE, he_server_context="x").privacy for c in singles | pairs}
    assert canonical <= covered, canonical - covered


@pytest.mark.parametrize("privacy", VALID_CONFIGS)
def test_a_valid_cell_runs_and_the_timeout_reaches_every_exchange(privacy, keys) -> None:
    config = _config(privacy, keys)
    mechanisms = config.mechanisms
    uses_he = "he" in mechanisms
    grid = InProcessGrid(_app(keys if uses_he else None), num_nodes=NODES)
    strategy = make_private(_fedavg(), config)
    result = strategy.start(grid, initial_arrays(), num_rounds=2, timeout=config.round_timeout)
    assert not result.failed_rounds and result.halt_reason is None
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    # One timeout, every wait of every layer, every message's TTL.
    assert grid.timeouts and set(grid.timeouts) == {TIMEOUT}
    assert max(e.ttl for e in grid.transcript) <= TIMEOUT
    sent, metrics = _sent(grid), result.train_metrics_clientapp[2]
    secure = [m for m in sent if secagg_wire.stages_of(m.content)]
    assert bool(secure) == bool(mechanisms & matrix.SECURE_SUMS), privacy
    encrypted = [m for m in sent if he_wire.stage_of(m.content) == he_wire.GLOBAL]
    assert bool(encrypted) == uses_he
    if mechanisms & matrix.CLIENT_LEVEL_DP:
        eps = [result.train_metrics_clientapp[r]["dp-epsilon"] for r in (1, 2)]
        assert 0 < eps[0] < eps[1]
    else:
        assert "dp-epsilon" not in metrics
    asked_to_clip = [
        m for m in sent if dp_wire.CLIP_NORM in m.content.config_records.get("config", {})
    ]
    assert bool(asked_to_clip) == ("dp-client" in mechanisms)
    masked_with_noise = [
        m
        for m in secure
        if secagg_wire.TRAIN in secagg_wire.stages_of(m.content)
        and secagg_wire.payload_of(m.content, secagg_wire.MASKING).get("encoding")
    ]
    assert bool(masked_with_noise) == ("dp-distributed" in mechanisms)
    if "secagg-groups" in mechanisms and "dp-distributed" not in mechanisms:
        assert metrics["secagg-privacy-t"] >= 3


def test_make_private_composes_the_wrappers_the_one_way_each_needs(keys) -> None:
    def layers(privacy: str) -> list[type]:
        out, layer = [], make_private(_fedavg(), _config(privacy, keys))
        while isinstance(layer, StrictRounds):
            out.append(type(layer))
            layer = layer.strategy
        return out

    assert layers("none") == [StrictRounds]
    assert layers("secagg-groups") == [SecureAggregation]
    assert layers("dp-client") == [ClientLevelDP]
    assert layers("he") == [EncryptedFedAvg]
    distributed = make_private(_fedavg(), _config("secagg-groups+dp-distributed"))
    assert layers("secagg-groups+dp-distributed") == [ClientLevelDP, SecureAggregation]
    secure = distributed.strategy
    assert secure.weighting == "uniform" and secure.min_train_replies == 3
    assert secure.group_size == 3 and distributed.sampling_rate is None
    # dp-sgd is the app's training: the server is the same as without it.
    for privacy in VALID_CONFIGS:
        if privacy.endswith("+dp-sgd"):
            assert layers(privacy) == layers(privacy.removesuffix("+dp-sgd"))


def test_dp_distributed_alone_brings_secure_aggregation() -> None:
    assert PrivacyConfig("dp-distributed", target_epsilon=3.0).privacy == "secagg+dp-distributed"
    assert PrivacyConfig("secagg+dp-distributed", target_epsilon=3.0).mechanisms == {
        "secagg",
        "dp-distributed",
    }


# -- invalid and not-yet cells -------------------------------------------------------

REFUSED_PAIRS = [
    (a, b) for a, b in combinations(MECHANISMS, 2) if matrix.cell(a, b).status != VALID
]


@pytest.mark.parametrize("pair", REFUSED_PAIRS, ids="+".join)
def test_a_refused_cell_fails_at_construction_naming_conflict_and_fix(pair) -> None:
    first, second = pair
    status = matrix.cell(first, second).status
    error = matrix.InvalidCompositionError if status == INVALID else matrix.NotSupportedYetError
    with pytest.raises(error) as caught:
        PrivacyConfig(f"{first}+{second}", **BASE, he_server_context="server.ctx")
    text = str(caught.value)
    assert f"{first}+{second}" in text
    # The fix (invalid) or what it would take (not yet) is named.
    assert ("choose" in text or "use" in text) if status == INVALID else "would take" in text
    assert status in (INVALID, NOT_YET)


def test_the_matrix_is_symmetric_and_complete() -> None:
    for a, b in combinations(MECHANISMS, 2):
        assert matrix.cell(a, b) == matrix.cell(b, a)
        assert matrix.cell(a, b).status in (VALID, INVALID, NOT_YET)


def test_the_readme_holds_the_matrix_and_its_reasons() -> None:
    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    assert matrix.markdown_table() in readme
    for line in matrix.reasons():
        assert line in readme, line


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"privacy": "secagg-groups", "group_size": 1}, "secagg-group-size >= 2"),
        ({"privacy": "dp-central"}, "dp-target-epsilon"),
        ({"privacy": "dp-distributed", "noise_multiplier": 1.0}, "set dp-target-epsilon"),
        (
            {"privacy": "dp-distributed", "target_epsilon": 3.0, "sampling_rate": 0.1},
            "dp-sampling-rate = 0",
        ),
        (
            {"privacy": "dp-distributed", "target_epsilon": 3.0, "adaptive_clipping": True},
            "not supported yet",
        ),
        ({"privacy": "he"}, "he-server-context"),
        ({"privacy": "none+secagg"}, "'none' stands alone"),
        ({"privacy": "secagg+secagg"}, "twice"),
        ({"privacy": "sec-agg"}, "unknown mechanism"),
        ({"privacy": "dp-client", "target_epsilon": 1.0, "accountant": "x"}, "dp-accountant"),
    ],
)
def test_a_bad_parameter_is_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyConfig(**kwargs)


def test_dp_sgd_under_secure_aggregation_in_the_digits_app() -> None:
    """The dp-sgd cells are app code: the digits app's Opacus training under secagg."""
    import tomllib

    from conftest import DIGITS_APP
    from digits_app import server_app
    from digits_app.client_app import DP_SGD_STATE
    from digits_app.client_app import app as digits_client

    defaults = tomllib.loads((DIGITS_APP / "pyproject.toml").read_text())["tool"]["flwr"]
    cfg = {
        **defaults["app"]["config"],
        "privacy": "secagg+dp-sgd",
        "num-server-rounds": 1,
        "min-nodes": 3,
        "local-epochs": 1,
        "batch-size": 128,  # few DP-SGD steps: the cell, not the accuracy, is under test
        "partitioner": "iid",
    }
    grid = InProcessGrid(digits_client, num_nodes=3, run_config=cfg)
    grid.run_server_app(server_app.app)
    replies = [e.message for e in grid.transcript if e.direction == "from-node"]
    uploads = [m for m in replies if secagg_wire.UPLOAD in secagg_wire.stages_of(m.content)]
    assert len(uploads) == 3 and not any(m.content.array_records for m in uploads)
    # Each node trained with DP-SGD: its accountant history is in its state.
    assert all(DP_SGD_STATE in context.state for context in grid.contexts.values())
