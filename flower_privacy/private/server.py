"""``make_private``: the server strategy for a declared privacy configuration.

It composes today's wrappers (``StrictRounds``, ``SecureAggregation``,
``ClientLevelDP``, ``EncryptedFedAvg``) the one way each configuration needs, so that
no application writes that composition again.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from flower_privacy.private.config import PrivacyConfig
from flower_privacy.private.matrix import (
    DP_CENTRAL,
    DP_CLIENT,
    DP_DISTRIBUTED,
    HE,
    SECAGG_GROUPS,
    SECURE_SUMS,
)
from flower_privacy.strategies import (
    ClientLevelDP,
    EncryptedFedAvg,
    SecureAggregation,
    StrictRounds,
)

# The wrappers' parameters that come straight from the configuration: each is the
# configuration's field of that name, behind the prefix secagg_ or he_ (DP's have none).
_SECAGG_FIELDS = ("clip_range", "max_weight", "max_clients")
_DP_FIELDS = (
    "target_epsilon",
    "noise_multiplier",
    "delta",
    "clip_norm",
    "adaptive_clipping",
    "sampling_rate",
    "accountant",
)
_HE_FIELDS = (
    "server_context",
    "max_clients",
    "max_weight",
    "clip_range",
    "precision_bits",
    "save_path",
)


def _kwargs_of(config: PrivacyConfig, names: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """``{name: config.<prefix><name>}``: the keyword arguments a wrapper takes from it."""
    return {name: getattr(config, prefix + name) for name in names}


def make_private(strategy: Strategy, config: PrivacyConfig | str) -> StrictRounds:
    """Wrap ``strategy`` (FedAvg-like) in the mechanisms ``config`` names.

    Parameters
    ----------
    strategy : Strategy
        The inner Flower strategy; it keeps its server optimiser, and its sampling
        unless the mechanism samples itself (groups, Poisson, secure aggregation).
    config : PrivacyConfig | str
        The configuration, or its name with every parameter at its default.

    Returns
    -------
    StrictRounds
        The composed strategy; run it with ``start(..., timeout=config.round_timeout)``.
        ``dp-sgd`` adds nothing on the server: the ClientApp's training applies it.
    """
    if isinstance(config, str):
        config = PrivacyConfig(config)
    if not isinstance(config, PrivacyConfig):
        raise TypeError(f"config must be a PrivacyConfig or a name, got {type(config).__name__}")
    mechanisms = config.mechanisms
    if HE in mechanisms:
        return _encrypted(strategy, config)
    secure = _secure(strategy, config) if mechanisms & SECURE_SUMS else None
    if DP_DISTRIBUTED in mechanisms:
        assert secure is not None  # parse_mechanisms adds secagg to dp-distributed
        return _client_level_dp(secure, config, "distributed")
    if secure is not None:
        return secure
    for name, placement in ((DP_CENTRAL, "central"), (DP_CLIENT, "client")):
        if name in mechanisms:
            return _client_level_dp(strategy, config, placement)
    return StrictRounds(strategy)


def _secure(strategy: Strategy, config: PrivacyConfig) -> SecureAggregation:
    groups = SECAGG_GROUPS in config.mechanisms
    distributed = DP_DISTRIBUTED in config.mechanisms
    # The seed makes cohorts (and groups) reproducible: experiments only.
    options: dict = {"selection_seed": config.selection_seed}
    if groups:
        options |= {
            "group_size": config.group_size,
            "selection": config.selection,
            "sampling_rate": config.group_sampling_rate,
        }
    if distributed:
        # Client-level DP: uniform weights (example counts are data) and noise
        # calibrated for the fewest survivors a round may have.
        options |= {"weighting": "uniform", "min_train_replies": config.min_clients}
    return SecureAggregation(strategy, **_kwargs_of(config, _SECAGG_FIELDS, "secagg_"), **options)


def _client_level_dp(strategy: Strategy, config: PrivacyConfig, placement: str) -> ClientLevelDP:
    return ClientLevelDP(
        strategy,
        **_kwargs_of(config, _DP_FIELDS),
        placement=placement,
        # The secure sum enforces its own minimum; in the clear, Poisson rounds may
        # legitimately be small (the noise is calibrated for the expected count).
        min_train_replies=1,
    )


def _encrypted(strategy: Strategy, config: PrivacyConfig) -> EncryptedFedAvg:
    assert config.he_server_context  # PrivacyConfig refuses he without it
    return EncryptedFedAvg(strategy, **_kwargs_of(config, _HE_FIELDS, "he_"))
