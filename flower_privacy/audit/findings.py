"""What the audit finds: settings, one row per attack, pictures, per-configuration results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flower_privacy.audit import inversion

CURIOUS = "honest-but-curious server"
MALICIOUS = "malicious server"
CLIENT = "participating client"
DIFFERENCING = "server, multi-round differencing"
DIFFERENCING_COSINE = ("differencing", "best cosine to a true update")
"""Attack and metric of the row scoring per-client estimates on a fixed-update app."""
KEY_HOLDER = "key holders (HE)"
MEMBERSHIP = "membership test on the final model"
ATTACKS = frozenset({"inversion", "differencing", "imprint", "empirical-epsilon"})


@dataclass(frozen=True)
class AuditSettings:
    """How hard the audit tries (the defaults take seconds per configuration)."""

    rounds: int = 3
    seed: int = 0
    threshold_db: float = 20.0
    inversion: inversion.InversionSettings = inversion.InversionSettings(iterations=150)
    max_iterative_inputs: int = 256
    max_dlg_inputs: int = 8
    canaries: int = 20
    null_directions: int = 500
    imprint_gain: float = 1.0
    attacks: frozenset[str] = ATTACKS
    """Which of :data:`ATTACKS` to play."""

    def __post_init__(self) -> None:
        unknown = set(self.attacks) - ATTACKS
        if unknown:
            raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {sorted(ATTACKS)}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


@dataclass(frozen=True)
class Finding:
    """One attack's result: the JSON row."""

    attacker: str
    attack: str
    config: str
    metric: str
    value: float | int | str | None
    verdict: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Picture:
    """True inputs beside the best reconstructions of them."""

    config: str
    attacker: str
    attack: str
    true: np.ndarray
    reconstructed: np.ndarray
    psnr: np.ndarray


@dataclass
class ConfigAudit:
    """Everything the audit found for one configuration."""

    name: str
    findings: list[Finding] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)
    privacy_t: list[int] = field(default_factory=list)  # per round, cumulative
    epsilons: list[dict] = field(default_factory=list)  # per round: accountant and estimate
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0


Progress = Callable[[str], None]
