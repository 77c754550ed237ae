"""Each client's integer noise share inside secure aggregation (the distributed placement).

A :class:`DistributedNoiseEncoding` replaces secure aggregation's fixed-point quantiser:
a client clips its update to L2 norm ``C``, scales by ``γ``, rounds conditionally
(:func:`~flower_privacy.dp.discrete.encode`), adds its noise share and reduces mod
2^32. The masked sum then carries at least the calibrated noise whenever at least
``min_clients`` clients survive; the server reads it centred and divides by ``γ``.
Nothing else leaves the client: the weight slot is 1 (uniform weights) and the
clipped slot 0 (whether an update was clipped is data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flower_privacy._fields import required_fields
from flower_privacy.dp import discrete
from flower_privacy.dp.noise import secure_generator
from flower_privacy.secagg.quantize import Encoded

ENCODING = "dp-distributed"
# The request's fields, in order: (key, attribute, type); both directions read this.
_REQUEST: tuple[tuple[str, str, type], ...] = (
    ("dp-mechanism", "mechanism", str),
    ("dp-clip-norm", "clip_norm", float),
    ("dp-scale", "scale", float),
    ("dp-share-variance", "share_variance", float),
    ("dp-beta", "beta", float),
)


@dataclass(frozen=True)
class DistributedNoiseEncoding:
    """One run's agreed encoding: mechanism, clip norm, scale, noise share, rounding β."""

    mechanism: str
    clip_norm: float
    scale: float
    share_variance: float
    beta: float

    def __post_init__(self) -> None:
        if self.mechanism not in discrete.MECHANISMS:
            raise ValueError(
                f"mechanism must be one of {discrete.MECHANISMS}, got {self.mechanism!r}"
            )
        for name in ("clip_norm", "scale", "share_variance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        discrete._beta(self.beta)

    @property
    def word_bits(self) -> int:
        """The ring is Z_(2^32): the accountant's wrap-around bound assumes 32 bits."""
        return 32

    def encode(self, update: np.ndarray, weight: int = 1, *, seed: int | None = None) -> Encoded:
        """Clip, scale, round, add this client's noise share, reduce mod 2^32.

        ``weight`` must be 1 (client-level DP weighs clients uniformly); ``seed`` is for
        reproducible tests only.
        """
        if weight != 1:
            raise ValueError(
                f"distributed DP weighs clients uniformly: weight must be 1, got {weight}"
            )
        rng = secure_generator(seed)
        rounded = discrete.encode(update, self.clip_norm, self.scale, self.beta, rng)
        if self.mechanism == "skellam":
            noise = discrete.skellam_noise(rounded.shape, self.share_variance, rng)
        else:
            noise = discrete.discrete_gaussian_noise(
                rounded.shape, math.sqrt(self.share_variance), rng
            )
        return Encoded(
            values=discrete.to_modular(rounded + noise), clipped=0, weight=1, weight_capped=False
        )

    def noise_multiplier(self, survivors: int, dim: int) -> float:
        """What ``survivors`` shares give a ``dim``-coordinate update, as a node checks it.

        The standard deviation of their summed noise (each share's true variance: below
        its σ² parameter for a small discrete Gaussian) over the L2 bound of the clipped,
        scaled, rounded update, the sensitivity the accountant uses; every term comes from
        the request and the node's own update size, so a server cannot inflate it.
        """
        if survivors <= 0:
            return 0.0
        variance = (
            self.share_variance
            if self.mechanism == "skellam"
            else discrete.discrete_gaussian_variance(math.sqrt(self.share_variance))
        )
        sensitivity = discrete.l2_sensitivity(self.clip_norm, self.scale, dim, self.beta)
        return math.sqrt(survivors * variance) / sensitivity

    def decode_sum(self, total: np.ndarray, denominator: float) -> np.ndarray:
        """The noisy sum mod 2^32, centred, in update units, divided by ``denominator``."""
        if not denominator > 0:
            raise ValueError(f"denominator must be > 0, got {denominator}")
        return discrete.centred(total) / (self.scale * denominator)

    def request_fields(self) -> dict:
        """What the server sends each client (the clients check it in :meth:`from_request`)."""
        return {"encoding": ENCODING, **{key: getattr(self, name) for key, name, _ in _REQUEST}}

    @classmethod
    def from_request(cls, request: dict) -> DistributedNoiseEncoding:
        """The encoding a server asked for; ValueError names a missing or bad field."""
        with required_fields("distributed DP request"):
            return cls(**{name: kind(request[key]) for key, name, kind in _REQUEST})
