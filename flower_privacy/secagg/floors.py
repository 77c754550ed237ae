"""Security floors that belong to the client, and the threshold rule they imply.

A server proposes the degree k, threshold t, cohort and group size of a round; a client
checks them against floors from its own node config and refuses anything weaker. The
server can raise a floor (ask for more), never lower one.

Threshold rule: with at most c colluding clients among a node's k share holders, the
server may obtain c shares for free and must not reach t with the honest holders of one
neighbourhood split two ways (Bell et al., CCS 2020), so t >= floor((k + c) / 2) + 1,
and t >= 2 so that no single holder rebuilds anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

# Node config keys (defined once, read by the mod).
MAX_COLLUDERS = "secagg-max-colluders"
MIN_DEGREE = "secagg-min-degree"
MIN_COHORT = "secagg-min-cohort"
MIN_SURVIVORS = "secagg-min-survivors"
MIN_GROUP_SIZE = "secagg-min-group-size"
REQUIRED = "secagg-required"
MIN_NOISE_MULTIPLIER = "secagg-min-noise-multiplier"


def required_threshold(degree: int, max_colluders: int) -> int:
    """The least threshold that keeps a neighbourhood of ``degree`` holders safe."""
    if degree < 1 or max_colluders < 0:
        raise ValueError(f"need degree >= 1 and max_colluders >= 0, got {degree}, {max_colluders}")
    return max(2, (degree + max_colluders) // 2 + 1)


@dataclass(frozen=True)
class ClientFloors:
    """The weakest round a node takes part in (node config, safe defaults).

    Attributes
    ----------
    max_colluders : int
        c: clients of a neighbourhood that may collude with the server.
    min_degree : int
        Fewest share holders (neighbours) per node.
    min_cohort : int
        Fewest nodes in a round's cohort.
    min_survivors : int
        Fewest survivors an upload is unmasked with.
    min_group_size : int
        With groups (multi-round privacy) required: their least size; 0 = not required.
    required : bool
        Refuse every plain training request (no downgrade to unprotected updates).
    min_noise_multiplier : float
        With distributed DP: the least noise (standard deviation over the clip norm) the
        promised survivors' shares must add up to; 0 = none required. Above 0 the node
        also refuses rounds without distributed DP noise.
    """

    max_colluders: int = 0
    min_degree: int = 2
    min_cohort: int = 3
    min_survivors: int = 3
    min_group_size: int = 0
    required: bool = False
    min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ValueError(
                "min_noise_multiplier must be a finite number >= 0, got "
                f"{self.min_noise_multiplier}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("required", "min_noise_multiplier"):
                continue
            if isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be an integer >= 0, got {value!r}")
        if self.min_degree < 2 or self.min_cohort < 3 or self.min_survivors < 2:
            raise ValueError(
                "floors cannot go below the protocol's own minimums (min_degree 2, "
                f"min_cohort 3, min_survivors 2), got {self.min_degree}, {self.min_cohort}, "
                f"{self.min_survivors}"
            )
        if self.min_group_size == 1:
            raise ValueError("min_group_size 1 protects nobody: 0 (no groups) or >= 2")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> ClientFloors:
        """Floors from a node config; absent keys keep the defaults, which only rise."""
        keys = {
            MAX_COLLUDERS: "max_colluders",
            MIN_DEGREE: "min_degree",
            MIN_COHORT: "min_cohort",
            MIN_SURVIVORS: "min_survivors",
            MIN_GROUP_SIZE: "min_group_size",
        }
        defaults = cls()
        values: dict[str, object] = {}
        for key, name in keys.items():
            if key in node_config:
                raw = node_config[key]
                if isinstance(raw, bool) or not isinstance(raw, int | str):
                    raise ValueError(f"node config {key} must be an integer, got {raw!r}")
                try:
                    value = int(raw)
                except ValueError:
                    raise ValueError(f"node config {key} must be an integer, got {raw!r}") from None
                values[name] = (
                    max(value, getattr(defaults, name)) if name != "min_group_size" else value
                )
        required = node_config.get(REQUIRED, False)
        if isinstance(required, str):
            if required.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"node config {REQUIRED} must be true or false, got {required!r}")
            required = required.lower() in ("true", "1")
        values["required"] = bool(required)
        if MIN_NOISE_MULTIPLIER in node_config:
            raw = node_config[MIN_NOISE_MULTIPLIER]
            try:
                values["min_noise_multiplier"] = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(
                    f"node config {MIN_NOISE_MULTIPLIER} must be a number, got {raw!r}"
                ) from None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as err:
            text = str(err)
            for key, name in {**keys, MIN_NOISE_MULTIPLIER: "min_noise_multiplier"}.items():
                text = text.replace(name, f"node config {key}")
            raise ValueError(text) from None

    def threshold_for(self, degree: int) -> int:
        """The least threshold this node accepts for ``degree`` holders."""
        return required_threshold(degree, self.max_colluders)


def safe_degree(
    cohort: int, colluder_fraction: float, dropout: float, sigma: float = 40.0
) -> tuple[int, int] | None:
    """Smallest (k, t) for a graph the server cannot bias, or None if none up to the cohort.

    Privacy fails for a node if 2t - k or more of its k neighbours collude (they and a
    split honest neighbourhood reach t twice); liveness fails if fewer than t of them
    survive. Both are bounded by binomial tails, summed over the cohort by a union bound,
    each kept at or below 2^-sigma (SecAgg+ analysis, Bell et al. 2020).
    """
    if not 0 <= colluder_fraction < 0.5 or not 0 <= dropout < 1:
        raise ValueError("need colluder_fraction in [0, 0.5) and dropout in [0, 1)")
    bound = 2.0 ** (-sigma)
    for k in range(2, cohort):
        collude, drop = _tails(k, colluder_fraction), _tails(k, dropout)
        for t in range(max(2, k // 2 + 1), k + 1):
            leak = cohort * collude[min(2 * t - k, k + 1)]
            dead = cohort * drop[k - t + 1]
            if leak <= bound and dead <= bound:
                return k, t
    return None


def _tails(n: int, p: float) -> list[float]:
    """tails[j] = P[Bin(n, p) >= j] for j = 0..n+1 (log-space pmf: no underflow to 1)."""
    if p == 0:
        return [1.0] + [0.0] * (n + 1)
    log_pmf = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(n + 1)
    ]
    tails = [0.0] * (n + 2)
    for i in range(n, -1, -1):
        tails[i] = tails[i + 1] + math.exp(log_pmf[i])
    return tails
