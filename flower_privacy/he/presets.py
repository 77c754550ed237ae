"""Encryption presets, declared limits and the capacity arithmetic that keeps sums exact.

Three presets (see ``strategies/encrypted-fedavg.md`` for their precision and limits):

``bfv`` (default)
    Integer BFV. Each client clips its values to ``±clip_range``, multiplies them by its
    weight (capped at ``max_weight``) and rounds them stochastically to steps of
    ``2**-precision_bits``. The plain modulus ``t`` is the smallest batching prime with
    ``max_clients`` worst-case contributions inside ``(-t/2, t/2)`` (no wrap-around), and
    the coefficient modulus leaves room for the worst-case noise of ``max_clients``
    fresh ciphertexts, so the decrypted sum is exact on the integers.
``ckks``
    Add-only CKKS with one data prime (N=8192, [60, 60], scale 2^40): clients weight
    their values themselves, the server only adds. Approximate arithmetic.
``nvflare``
    NVIDIA FLARE's parameters (N=8192, [60, 40, 40], scale 2^40), used add-only here.

Capacity is checked from the *declared* limits and the context's real moduli (read back
from SEAL), never from observed values. Worst-case BFV noise: a public-key encryption
in SEAL is made at the key level and divided by the special prime, leaving an error of
at most ``(N+1)/2`` (rounding times a ternary secret) plus 2 (encoding and the divided
key-level noise, below 1 once the special prime exceeds ``19 * (2N+1)``); a sum of K
ciphertexts decrypts correctly while ``2 * t * K * ((N+1)/2 + 2) < q``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flower_privacy.he.errors import CapacityError, HEConfigError

PRESETS = ("bfv", "ckks", "nvflare")
DEFAULT_PRESET = "bfv"
# SEAL's 128-bit security limits: most coefficient-modulus bits per ring degree.
SEAL_MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
_MAX_PRIME_BITS = 60
_MIN_SPECIAL_PRIME_BITS = 30  # > log2(19 * (2N + 1)) for every N we use


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HEConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


@dataclass(frozen=True)
class DeclaredLimits:
    """What the federation promises; the parameters must hold it without wrap-around.

    Parameters
    ----------
    max_clients : int
        Most clients aggregated in one round (1 to 100,000).
    max_weight : int
        A client's weight (its example count) is capped here (1 to 2^31).
    clip_range : float
        Every model value is clipped to ``[-clip_range, clip_range]``; clipped values are
        counted. In (0, 1e6].
    precision_bits : int
        BFV only: a weighted value is rounded to steps of ``2**-precision_bits`` (1 to 40).
    """

    max_clients: int = 100
    max_weight: int = 1000
    clip_range: float = 4.0
    precision_bits: int = 16

    def __post_init__(self) -> None:
        _check_int("max_clients", self.max_clients, 1, 100_000)
        _check_int("max_weight", self.max_weight, 1, 2**31)
        _check_int("precision_bits", self.precision_bits, 1, 40)
        clip = self.clip_range
        if isinstance(clip, bool) or not isinstance(clip, int | float):
            raise HEConfigError(f"clip_range must be a number in (0, 1e6], got {clip!r}")
        if not (math.isfinite(clip) and 0 < clip <= 1e6):
            raise HEConfigError(f"clip_range must be in (0, 1e6], got {clip!r}")
        object.__setattr__(self, "clip_range", float(clip))

    def to_dict(self) -> dict[str, int | float]:
        """Plain values (for message records and file headers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DeclaredLimits:
        """Rebuild from :meth:`to_dict` output; unknown or missing keys are an error."""
        expected = {"max_clients", "max_weight", "clip_range", "precision_bits"}
        if set(values) != expected:
            raise HEConfigError(
                f"declared limits need keys {sorted(expected)}, got {sorted(values)}"
            )
        return cls(
            max_clients=int(values["max_clients"]),
            max_weight=int(values["max_weight"]),
            clip_range=float(values["clip_range"]),
            precision_bits=int(values["precision_bits"]),
        )

    @property
    def max_quantized(self) -> int:
        """BFV: largest magnitude of one client's quantised weighted value."""
        return math.ceil(self.max_weight * self.clip_range * 2**self.precision_bits)

    @property
    def bfv_slot_max(self) -> int:
        """BFV: largest magnitude one client puts in any slot (values, weight, counters)."""
        return max(self.max_quantized, self.max_weight)


@dataclass(frozen=True)
class HEParameters:
    """Concrete TenSEAL parameters of one key pair."""

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus: int | None = None  # BFV
    scale_bits: int | None = None  # CKKS

    @property
    def slots(self) -> int:
        """Values per ciphertext: N for BFV batching, N/2 for CKKS."""
        n = self.poly_modulus_degree
        return n if self.scheme == "bfv" else n // 2


def derive_parameters(preset: str, limits: DeclaredLimits) -> HEParameters:
    """Parameters of ``preset`` that hold ``limits``; raises :class:`CapacityError` if none do."""
    if preset == "bfv":
        params = _bfv_parameters(limits)
    elif preset == "ckks":
        params = HEParameters("ckks", 8192, (60, 60), scale_bits=40)
    elif preset == "nvflare":
        params = HEParameters("ckks", 8192, (60, 40, 40), scale_bits=40)
    else:
        raise HEConfigError(f"preset must be one of {PRESETS}, got {preset!r}")
    data_modulus = 1
    for bits in params.coeff_mod_bit_sizes[:-1]:
        data_modulus *= 2 ** (bits - 1)  # a b-bit prime is at least 2^(b-1)
    check_capacity(params, limits, data_modulus)
    return params


def _bfv_parameters(limits: DeclaredLimits) -> HEParameters:
    bound = limits.max_clients * limits.bfv_slot_max
    reasons = []
    for n, max_bits in SEAL_MAX_COEFF_BITS.items():
        t = smallest_batching_prime(n, 2 * bound + 1)
        if t.bit_length() > _MAX_PRIME_BITS:
            break  # a larger ring only makes t larger
        needed = 2 * t * limits.max_clients * bfv_noise_per_ciphertext(n)
        primes = 1
        while True:
            bits = -(-(needed.bit_length() + primes) // primes)  # ceil
            if bits <= _MAX_PRIME_BITS:
                break
            primes += 1
        special = min(_MAX_PRIME_BITS, max_bits - primes * bits)
        if special >= max(_MIN_SPECIAL_PRIME_BITS, t.bit_length() + 1):
            return HEParameters("bfv", n, (bits,) * primes + (special,), plain_modulus=t)
        reasons.append(f"N={n} needs {primes * bits} data bits of at most {max_bits}")
    raise CapacityError(
        "the declared limits need more than BFV can hold at 128-bit security: "
        f"max_clients={limits.max_clients} x max_weight={limits.max_weight} x "
        f"clip_range={limits.clip_range} x 2^precision_bits={2**limits.precision_bits} "
        f"needs a plain modulus above {2 * bound} (at most 2^60) "
        f"({'; '.join(reasons) or 'plain modulus too large'}); lower one of them"
    )


def bfv_noise_per_ciphertext(poly_modulus_degree: int) -> int:
    """Worst-case decryption error of one fresh SEAL BFV public-key ciphertext (see module doc)."""
    return (poly_modulus_degree + 1) // 2 + 2


def check_capacity(params: HEParameters, limits: DeclaredLimits, data_modulus: int) -> None:
    """Raise :class:`CapacityError` unless ``limits`` fit ``params`` without wrap-around.

    ``data_modulus`` is the product of the data primes (the context's real value when
    known, a lower bound when deriving).
    """
    k = limits.max_clients
    if params.scheme == "bfv":
        t = params.plain_modulus
        assert t is not None
        total = k * limits.bfv_slot_max
        if total > (t - 1) // 2:
            raise CapacityError(
                f"sums can wrap: max_clients={k} contributions of up to "
                f"{limits.bfv_slot_max} (max_weight={limits.max_weight} x clip_range="
                f"{limits.clip_range} x 2^{limits.precision_bits}) reach {total}, but the "
                f"plain modulus holds at most {(t - 1) // 2}; lower max_clients, max_weight, "
                f"clip_range or precision_bits, or make keys for these limits"
            )
        needed = 2 * t * k * bfv_noise_per_ciphertext(params.poly_modulus_degree)
        if needed >= data_modulus:
            raise CapacityError(
                f"the noise of max_clients={k} added ciphertexts could exceed the coefficient "
                f"modulus ({needed.bit_length()} bits needed, {data_modulus.bit_length()} "
                "available); lower max_clients or make keys for these limits"
            )
        return
    assert params.scale_bits is not None
    largest = k * max(limits.max_weight * limits.clip_range, float(limits.max_weight))
    # Encoded magnitude plus worst-case noise must stay below q/2 (a factor 4 of room).
    if largest * 2.0**params.scale_bits * 4 >= data_modulus:
        limit = data_modulus / (4 * 2.0**params.scale_bits)
        raise CapacityError(
            f"CKKS sums can overflow: max_clients={k} x max_weight={limits.max_weight} x "
            f"clip_range={limits.clip_range} = {largest:g} must stay below {limit:g} at scale "
            f"2^{params.scale_bits}; lower one of them"
        )


def precision_bound(params: HEParameters, limits: DeclaredLimits) -> float:
    """Worst-case absolute error of the decrypted mean when every weight is 1.

    BFV: stochastic rounding moves each weighted value by less than one step, so the
    mean of K clients with total weight W_sum is off by less than K / (2^F * W_sum)
    <= 2^-F. CKKS: each fresh ciphertext's slot error is at most N * ((N+1)/2 + 2) / scale
    (the coefficient error through the canonical embedding); typical errors are ~1e-9.
    """
    if params.scheme == "bfv":
        return 2.0**-limits.precision_bits
    assert params.scale_bits is not None
    n = params.poly_modulus_degree
    return n * bfv_noise_per_ciphertext(n) / 2.0**params.scale_bits


def smallest_batching_prime(poly_modulus_degree: int, at_least: int) -> int:
    """The smallest prime ``p >= at_least`` with ``p = 1 (mod 2N)`` (needed for batching)."""
    step = 2 * poly_modulus_degree
    candidate = max(at_least - 1, 0) // step * step + 1
    if candidate < at_least:
        candidate += step
    while not _is_prime(candidate):
        candidate += step
    return candidate


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (covers every 64-bit value)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True
