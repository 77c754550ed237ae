"""A run's privacy configuration: named once, validated at construction, read from run config.

``PrivacyConfig("secagg-groups+dp-distributed", group_size=5, target_epsilon=8.0)`` or
``PrivacyConfig.from_run_config(context.run_config)``, so that
``flwr run . --run-config "privacy='secagg-groups+dp-distributed'"`` switches it. The
run-config keys are :data:`RUN_CONFIG_KEYS` (each defined once, here); their
``[tool.flwr.app.config]`` snippet is :func:`config_snippet`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flower_privacy.private import matrix
from flower_privacy.private.matrix import (
    CLIENT_LEVEL_DP,
    DP_DISTRIBUTED,
    MECHANISMS,
    NONE,
    SECAGG,
    SECAGG_GROUPS,
    SECURE_SUMS,
    SEPARATOR,
)

SELECTIONS = ("least-used", "poisson", "random")

# Run config keys (the documented snippet lists each with its default and meaning).
PRIVACY = "privacy"
ROUND_TIMEOUT = "round-timeout"
SECAGG_CLIP_RANGE = "secagg-clip-range"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_MAX_CLIENTS = "secagg-max-clients"
SECAGG_GROUP_SIZE = "secagg-group-size"
SECAGG_SELECTION = "secagg-selection"
SECAGG_GROUP_SAMPLING_RATE = "secagg-group-sampling-rate"
DP_TARGET_EPSILON = "dp-target-epsilon"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_DELTA = "dp-delta"
DP_CLIP_NORM = "dp-clip-norm"
DP_ADAPTIVE_CLIPPING = "dp-adaptive-clipping"
DP_SAMPLING_RATE = "dp-sampling-rate"
DP_MIN_CLIENTS = "dp-min-clients"
DP_ACCOUNTANT = "dp-accountant"
HE_SERVER_CONTEXT = "he-server-context"
HE_CLIP_RANGE = "he-clip-range"
HE_MAX_WEIGHT = "he-max-weight"
HE_MAX_CLIENTS = "he-max-clients"
HE_PRECISION_BITS = "he-precision-bits"


@dataclass(frozen=True)
class RunConfigKey:
    """One run-config key: the field it sets, its snippet default and what it means.

    ``unset`` is the run-config value meaning "not given" (run config has no null;
    None: every value is given).
    """

    key: str
    field: str
    default: str | int | float | bool
    doc: str
    unset: object = None


RUN_CONFIG_KEYS = (
    RunConfigKey(
        PRIVACY,
        "privacy",
        NONE,
        "none, or mechanisms joined by '+': " + ", ".join(MECHANISMS),
    ),
    RunConfigKey(ROUND_TIMEOUT, "round_timeout", 300.0, "seconds every exchange waits"),
    RunConfigKey(SECAGG_CLIP_RANGE, "secagg_clip_range", 1.0, "update clipped to +- this"),
    RunConfigKey(SECAGG_MAX_WEIGHT, "secagg_max_weight", 1000, "example-count cap"),
    RunConfigKey(
        SECAGG_MAX_CLIENTS,
        "secagg_max_clients",
        0,
        "most clients in a round (0 = the largest cohort the sampling draws)",
        unset=0,
    ),
    RunConfigKey(SECAGG_GROUP_SIZE, "group_size", 5, "secagg-groups: nodes per group"),
    RunConfigKey(SECAGG_SELECTION, "selection", "least-used", "secagg-groups: least-used, poisson"),
    RunConfigKey(
        SECAGG_GROUP_SAMPLING_RATE, "group_sampling_rate", 0.0, "poisson: group rate", unset=0.0
    ),
    RunConfigKey(DP_TARGET_EPSILON, "target_epsilon", 8.0, "dp-*: epsilon (0 = none)", unset=0.0),
    RunConfigKey(
        DP_NOISE_MULTIPLIER, "noise_multiplier", 0.0, "dp-*: fixed z (0 = calibrate)", unset=0.0
    ),
    RunConfigKey(DP_DELTA, "delta", 1e-5, "dp-*: delta of the guarantee"),
    RunConfigKey(DP_CLIP_NORM, "clip_norm", 0.1, "dp-*: L2 clip of each client's update"),
    RunConfigKey(DP_ADAPTIVE_CLIPPING, "adaptive_clipping", False, "dp-central/client only"),
    RunConfigKey(
        DP_SAMPLING_RATE, "sampling_rate", 0.0, "dp-central/client: Poisson q (0 = off)", unset=0.0
    ),
    RunConfigKey(DP_MIN_CLIENTS, "min_clients", 5, "dp-distributed: fewest survivors"),
    RunConfigKey(DP_ACCOUNTANT, "accountant", "pld", "dp-central/client: pld, prv or rdp"),
    RunConfigKey(HE_SERVER_CONTEXT, "he_server_context", "", "he: server.ctx path", unset=""),
    RunConfigKey(HE_CLIP_RANGE, "he_clip_range", 4.0, "he: values clipped to +- this"),
    RunConfigKey(HE_MAX_WEIGHT, "he_max_weight", 1000, "he: example-count cap"),
    RunConfigKey(HE_MAX_CLIENTS, "he_max_clients", 100, "he: most clients in a round"),
    RunConfigKey(HE_PRECISION_BITS, "he_precision_bits", 16, "he: quantisation 2^-bits"),
)


def parse_mechanisms(privacy: str) -> frozenset[str]:
    """The mechanisms a configuration name lists (``dp-distributed`` brings ``secagg``)."""
    if not isinstance(privacy, str) or not privacy.strip():
        raise ValueError(f"privacy must be a name such as 'secagg', got {privacy!r}")
    names = [part.strip() for part in privacy.split(SEPARATOR)]
    if names == [NONE]:
        return frozenset()
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        hint = " ('none' stands alone)" if NONE in unknown else ""
        raise ValueError(
            f"privacy {privacy!r}: unknown mechanism(s) {unknown}{hint}; choose 'none' or "
            f"mechanisms joined by '+' from {MECHANISMS}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"privacy {privacy!r} names a mechanism twice")
    mechanisms = frozenset(names)
    matrix.check(mechanisms)
    if DP_DISTRIBUTED in mechanisms and not mechanisms & SECURE_SUMS:
        # The noise shares only add up to the promised noise inside a secure sum.
        mechanisms |= {SECAGG}
    return mechanisms


@dataclass(frozen=True)
class PrivacyConfig:
    """A validated privacy configuration; invalid ones raise at construction.

    ``privacy`` is normalised to its canonical name (mechanisms in a fixed order;
    ``dp-distributed`` alone becomes ``secagg+dp-distributed``). Parameters that a
    configuration does not use are ignored. ``None`` means "not given" where a
    parameter is optional; in run config the key's ``unset`` value (0 or "") does.
    """

    privacy: str = NONE
    round_timeout: float = 300.0
    # Secure aggregation (secagg, secagg-groups, dp-distributed).
    secagg_clip_range: float = 1.0
    secagg_max_weight: int = 1000
    secagg_max_clients: int | None = None  # None: derived from the sampling at run start
    group_size: int = 5
    selection: str = "least-used"
    group_sampling_rate: float | None = None
    selection_seed: int | None = None
    # Client-level DP (dp-central, dp-client, dp-distributed).
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    clip_norm: float = 0.1
    adaptive_clipping: bool = False
    sampling_rate: float | None = None
    min_clients: int = 5
    accountant: str = "pld"
    # Encrypted FedAvg (he).
    he_server_context: str | None = None
    he_clip_range: float = 4.0
    he_max_weight: int = 1000
    he_max_clients: int = 100
    he_precision_bits: int = 16
    he_save_path: str | None = None

    def __post_init__(self) -> None:
        mechanisms = parse_mechanisms(self.privacy)
        object.__setattr__(self, "privacy", _canonical(mechanisms))
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ValueError(f"{ROUND_TIMEOUT} must be > 0 seconds, got {self.round_timeout}")
        if SECAGG_GROUPS in mechanisms:
            self._check_groups()
        if mechanisms & CLIENT_LEVEL_DP:
            self._check_dp(mechanisms)
        if matrix.HE in mechanisms and not self.he_server_context:
            raise ValueError(
                f"he needs the server's public context: set {HE_SERVER_CONTEXT} to the "
                "server.ctx made by a client-side party (flower-privacy keys generate)"
            )

    def _check_groups(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size < 2:
            raise ValueError(
                f"secagg-groups needs {SECAGG_GROUP_SIZE} >= 2 (a group of 1 protects "
                f"nobody), got {self.group_size}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"{SECAGG_SELECTION} must be one of {SELECTIONS}")
        if (self.selection == "poisson") != (self.group_sampling_rate is not None):
            raise ValueError(
                f"{SECAGG_SELECTION}='poisson' and {SECAGG_GROUP_SAMPLING_RATE} go together "
                f"(got selection {self.selection!r}, rate {self.group_sampling_rate})"
            )

    def _check_dp(self, mechanisms: frozenset[str]) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                f"client-level DP needs {DP_TARGET_EPSILON} (calibrated noise) or "
                f"{DP_NOISE_MULTIPLIER} (fixed noise, epsilon reported)"
            )
        from flower_privacy.dp.accounting import ACCOUNTANTS  # server side only

        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"{DP_ACCOUNTANT} must be one of {ACCOUNTANTS}, got {self.accountant!r}"
            )
        if DP_DISTRIBUTED not in mechanisms:
            return
        if self.target_epsilon is None:
            raise ValueError(
                f"dp-distributed calibrates its integer noise for a target: set {DP_TARGET_EPSILON}"
            )
        if self.sampling_rate is not None:
            raise ValueError(
                f"dp-distributed protects against the server, which picks the cohort: "
                f"amplification by sampling does not hold against it; set "
                f"{DP_SAMPLING_RATE} = 0"
            )
        if self.adaptive_clipping:
            raise matrix.NotSupportedYetError(
                "dp-distributed with adaptive clipping is not supported yet: it would take "
                "a noisy count of unclipped clients summed inside secure aggregation; set "
                f"{DP_ADAPTIVE_CLIPPING} = false"
            )
        if self.min_clients < 2:
            raise ValueError(f"{DP_MIN_CLIENTS} must be >= 2, got {self.min_clients}")

    @property
    def mechanisms(self) -> frozenset[str]:
        """The mechanisms of this configuration (empty for ``none``)."""
        return parse_mechanisms(self.privacy)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> PrivacyConfig:
        """Read the keys of :data:`RUN_CONFIG_KEYS`; a missing key keeps its default."""
        values: dict[str, object] = {}
        for spec in RUN_CONFIG_KEYS:
            if spec.key not in run_config:
                continue
            raw = run_config[spec.key]
            if spec.unset is not None and raw == spec.unset:
                continue  # "not given": the field keeps its default
            values[spec.field] = _typed(spec, raw)
        return cls(**values)  # type: ignore[arg-type]


def _typed(spec: RunConfigKey, raw: object) -> object:
    kind = type(spec.default)
    if kind is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"run config {spec.key} must be true or false, got {raw!r}")
        return raw
    if kind is str:
        return str(raw)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"run config {spec.key} must be a number, got {raw!r}")
    if kind is int:
        if float(raw) != int(raw):
            raise ValueError(f"run config {spec.key} must be a whole number, got {raw!r}")
        return int(raw)
    return float(raw)


def _canonical(mechanisms: frozenset[str]) -> str:
    return SEPARATOR.join(m for m in MECHANISMS if m in mechanisms) or NONE


def config_snippet() -> str:
    """The ``[tool.flwr.app.config]`` entries an app declares to use every key."""
    lines = ["# flower-privacy (PrivacyConfig.from_run_config)"]
    for spec in RUN_CONFIG_KEYS:
        value = spec.default
        text = (
            ("true" if value else "false")
            if isinstance(value, bool)
            else f'"{value}"'
            if isinstance(value, str)
            else repr(value)
        )
        lines.append(f"{spec.key} = {text}  # {spec.doc}")
    return "\n".join(lines)
