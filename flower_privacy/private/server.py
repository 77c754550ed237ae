"""``make_private``: the server strategy for a declared privacy configuration.

It composes today's wrappers (``StrictRounds``, ``SecureAggregation``,
``ClientLevelDP``, ``EncryptedFedAvg``) the one way each configuration needs, so that
no application writes that composition again.
"""

from __future__ import annotations

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
    return SecureAggregation(
        strategy,
        clip_range=config.secagg_clip_range,
        max_weight=config.secagg_max_weight,
        max_clients=config.secagg_max_clients,
        **options,
    )


def _client_level_dp(strategy: Strategy, config: PrivacyConfig, placement: str) -> ClientLevelDP:
    return ClientLevelDP(
        strategy,
        target_epsilon=config.target_epsilon,
        noise_multiplier=config.noise_multiplier,
        delta=config.delta,
        clip_norm=config.clip_norm,
        adaptive_clipping=config.adaptive_clipping,
        placement=placement,
        sampling_rate=config.sampling_rate,
        accountant=config.accountant,
        # The secure sum enforces its own minimum; in the clear, Poisson rounds may
        # legitimately be small (the noise is calibrated for the expected count).
        min_train_replies=1,
    )


def _encrypted(strategy: Strategy, config: PrivacyConfig) -> EncryptedFedAvg:
    assert config.he_server_context  # PrivacyConfig refuses he without it
    return EncryptedFedAvg(
        strategy,
        server_context=config.he_server_context,
        max_clients=config.he_max_clients,
        max_weight=config.he_max_weight,
        clip_range=config.he_clip_range,
        precision_bits=config.he_precision_bits,
        save_path=config.he_save_path,
    )
