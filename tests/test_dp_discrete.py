"""Discrete noise for distributed DP: samplers, encoding, wrap-around, RDP bounds, calibration.

Where the bounds come from and how they are checked: neither paper prints a table of ε or
RDP values (their figures are plots), so the bounds are checked against (1) the exact
Rényi divergence of the actual distributions, computed numerically in log space with
scipy (the bounds must be above it, and tight where the papers say so), and (2) the
authors' reference code (google-research/federated, distributed_dp/accounting_utils.py:
``_skellam_rdp``, ``compute_rdp_dgaussian``, ``ddgauss_epsilon``'s τ,
``_compute_rdp_subsampled``), transcribed below as scalar loops.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant, compute_epsilon
from scipy import stats
from scipy.special import gammaln, logsumexp

from flower_privacy.dp.discrete import (
    centred,
    discrete_gaussian_noise,
    discrete_gaussian_variance,
    encode,
    l1_sensitivity,
    l2_sensitivity,
    randomized_round,
    secure_generator,
    share_variance,
    skellam_noise,
    to_modular,
    wrap_probability,
)
from flower_privacy.dp.discrete_accounting import (
    ORDERS,
    DistributedDiscreteGaussianRounds,
    SkellamRounds,
    ddg_rdp,
    epsilon,
    rdp,
    skellam_rdp,
    subsampled_rdp,
)
from flower_privacy.dp.discrete_planning import calibrate_variance, plan_distributed

# Flower-free cores: run on the main Flower version only.
pytestmark = pytest.mark.once

TEST_SEED = 20240601  # reproducible tests only: a seeded generator gives no privacy


# ------------------------------------------------------------------ exact Rényi divergences


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    """D_α(P || Q) from log-pmfs on a common support (terms with P = 0 dropped)."""
    terms = alpha * log_p + (1 - alpha) * log_q
    return float(logsumexp(terms[np.isfinite(terms)]) / (alpha - 1))


def _skellam_logpmf(x: np.ndarray, variance: float) -> np.ndarray:
    """log P(Pois(λ) - Pois(λ) = x), λ = v/2, as a log-space sum over the second Poisson."""
    lam = variance / 2
    k = np.arange(0, int(lam + 60 * math.sqrt(lam) + 200))[None, :]
    xs = np.abs(x)[:, None]  # symmetric
    return logsumexp(stats.poisson.logpmf(k + xs, lam) + stats.poisson.logpmf(k, lam), axis=1)


def _dg_sum_logpmf(x: np.ndarray, sigma2: float, n: int) -> np.ndarray:
    """log-pmf of the sum of n independent N_Z(0, σ²), by log-space convolution on x's grid."""
    one = -(x**2) / (2 * sigma2)
    one = one - logsumexp(one)
    out = one
    for _ in range(n - 1):
        # (out * one)(z) = Σ_y out(y) one(z - y), all on the grid x (wide enough to truncate)
        idx = np.arange(x.size)
        shift = idx[:, None] - idx[None, :] + x.size // 2  # grid is symmetric around 0
        valid = (shift >= 0) & (shift < x.size)
        terms = np.where(valid, out[None, :] + one[np.clip(shift, 0, x.size - 1)], -np.inf)
        out = logsumexp(terms, axis=1)
    return out


@pytest.mark.parametrize("variance", [2.0, 10.0, 100.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_skellam_rdp_bound_is_above_the_exact_divergence(variance, shift) -> None:  # noqa: ANN001
    # Agarwal et al. 2021, Theorem 3.5 at d = 1 (Δ1 = Δ2 = |shift|): the bound must hold at
    # every order, and the Gaussian term αΔ²/(2v) alone must not (the extra term is needed
    # only at small v); it must be tight (within 3%) once v ≫ Δ at orders up to 8. At high
    # orders the exact divergence falls below even the Gaussian's αΔ²/(2v) (the Skellam's
    # log-likelihood ratio grows sub-linearly in the tails): there the bound is loose.
    orders = np.array([2, 3, 5, 8, 16, 32])
    bound = skellam_rdp(orders, shift, shift, variance)
    x = np.arange(
        -int(60 * math.sqrt(variance)) - 40, 32 * shift + 60 * int(math.sqrt(variance)) + 80
    )
    log_q = _skellam_logpmf(x, variance)
    log_p = _skellam_logpmf(x - shift, variance)
    exact = np.array([_renyi(log_p, log_q, int(a)) for a in orders])
    assert np.all(exact <= bound * (1 + 1e-9))
    if variance >= 100:
        assert np.all(bound[orders <= 8] <= exact[orders <= 8] * 1.03)
        assert exact[-1] < orders[-1] * shift**2 / (2 * variance)


def test_skellam_rdp_bound_in_two_dimensions() -> None:
    # Product noise: the exact divergence is the sum over coordinates; the bound takes
    # Δ2 = ||(2, 1)||₂ = √5 and Δ1 = 3.
    variance, orders = 6.0, np.array([2, 4, 8])
    x = np.arange(-200, 260)
    log_q = _skellam_logpmf(x, variance)
    exact = sum(
        np.array([_renyi(_skellam_logpmf(x - s, variance), log_q, int(a)) for a in orders])
        for s in (2, 1)
    )
    assert np.all(exact <= skellam_rdp(orders, 3.0, math.sqrt(5), variance))


@pytest.mark.parametrize(("sigma2", "clients"), [(0.25, 2), (0.6, 3), (2.0, 2)])
@pytest.mark.parametrize("shift", [1, 2])
def test_ddg_rdp_bound_is_above_the_exact_divergence(sigma2, clients, shift) -> None:  # noqa: ANN001
    # Kairouz et al. 2021, Proposition 14 at d = 1 for the sum of n discrete Gaussians of
    # parameter σ²: the bound (with τ) must be above the exact divergence of the sum.
    orders = np.array([2, 4, 8, 16])
    half = int(16 * shift + 30 * math.sqrt(clients * sigma2) + 30)
    x = np.arange(-half, half + 1)
    log_q = _dg_sum_logpmf(x, sigma2, clients)
    log_p = np.concatenate([np.full(shift, -np.inf), log_q[:-shift]])  # law of N + shift
    exact = np.array([_renyi(log_p, log_q, int(a)) for a in orders])
    bound = ddg_rdp(orders, shift, shift, sigma2, clients, 1)
    assert np.all(exact <= bound * (1 + 1e-9))


# ------------------------------------------------------------- the authors' reference code


def _ref_rdp_subsampled(alpha: int, gamma: float, eps) -> float:  # noqa: ANN001
    # accounting_utils._compute_rdp_subsampled(upper_bound=True), Zhu & Wang Theorem 6.
    def log_comb(n, k):  # noqa: ANN001, ANN202
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    a = [0, eps(2)]
    b = [
        ((1 - gamma) ** (alpha - 1)) * (alpha * gamma - gamma + 1),
        math.comb(alpha, 2) * (gamma**2) * (1 - gamma) ** (alpha - 2),
    ]
    for ell in range(3, alpha + 1):
        a.append(
            (ell - 1) * eps(ell)
            + log_comb(alpha, ell)
            + (alpha - ell) * np.log(1 - gamma)
            + ell * np.log(gamma)
        )
        b.append(3)
    return float(logsumexp(a=a, b=b) / (alpha - 1))


def _ref_skellam_rdp(l1: float, l2: float, central_var: float, s: float, order: int) -> float:
    # accounting_utils._skellam_rdp: unscaled units, s = scale.
    a, mu = order, central_var
    return a / (2 * mu) * l2**2 + min(
        ((2 * a - 1) * s * l2**2 + 6 * l1) / (4 * s**3 * mu**2), 3 * l1 / (2 * s * mu)
    )


@pytest.mark.parametrize("q", [1.0, 0.05])
def test_skellam_matches_the_reference_code(q) -> None:  # noqa: ANN001
    event = SkellamRounds(
        clip=0.5,
        dim=1000,
        scale=40.0,
        noise_variance=900.0,
        sampling_rate=q,
        rounds=7,
        beta=math.exp(-0.5),
    )
    s = event.scale  # reference code works in update units: divide sensitivities by γ, var by γ²
    l1, l2, var = event.l1_sensitivity / s, event.l2_sensitivity / s, event.noise_variance / s**2

    def eps(order):  # noqa: ANN001, ANN202
        return _ref_skellam_rdp(l1, l2, var, s, order)

    ref = [min(_ref_rdp_subsampled(int(a), q, eps), eps(a)) if q < 1 else eps(a) for a in ORDERS]
    np.testing.assert_allclose(rdp(event), np.array(ref) * 7, rtol=1e-9)
    # and the rounded L2 bound: rounded_l2_norm_bound(c, β, d) transcribed
    c, d = 0.5 * 40.0, 1000
    bound2 = math.sqrt(
        c**2 + 0.25 * d + math.sqrt(2 * math.log(1 / math.exp(-0.5))) * (c + 0.5 * math.sqrt(d))
    )
    assert event.l2_sensitivity == pytest.approx(min(c + math.sqrt(d), bound2), rel=1e-12)


@pytest.mark.parametrize("q", [1.0, 0.1])
def test_ddg_matches_the_reference_code(q) -> None:  # noqa: ANN001
    # One survivor count (min = max = n): compute_rdp_dgaussian with ddgauss_epsilon's τ.
    n, local_std, d = 5, 0.7, 50  # integer units: a small σ so that τ matters
    event = DistributedDiscreteGaussianRounds(
        clip=1.0,
        dim=d,
        scale=8.0,
        noise_variance=n * local_std**2,
        sampling_rate=q,
        rounds=3,
        min_clients=n,
        max_clients=n,
        beta=0.0,
    )
    tau = 10 * sum(math.exp(-2 * (math.pi * local_std) ** 2 * (k / (k + 1))) for k in range(1, n))
    l2_scale = event.l2_sensitivity / (math.sqrt(n) * local_std)
    l1_scale = event.l1_sensitivity / (math.sqrt(n) * local_std)

    def eps(order):  # noqa: ANN001, ANN202
        return min(
            order / 2 * l2_scale**2 + tau * d,
            order / 2 * (l2_scale**2 + 2 * l1_scale * tau + tau**2 * d),
            order / 2 * (l2_scale + math.sqrt(d) * tau) ** 2,
        )

    ref = [min(_ref_rdp_subsampled(int(a), q, eps), eps(a)) if q < 1 else eps(a) for a in ORDERS]
    np.testing.assert_allclose(rdp(event), np.array(ref) * 3, rtol=1e-9)
    assert event.l2_sensitivity == 8.0 + math.sqrt(d)  # β = 0: γC + √d


# ---------------------------------------------------------------------- accounting sanity


def test_subsampling_bound_is_above_the_tight_gaussian_and_below_no_sampling() -> None:
    # Zhu & Wang's general bound applied to the Gaussian's RDP must be above the tight
    # RDP of the Poisson-subsampled Gaussian (dp-accounting, Mironov et al. 2019).
    for z, q in [(1.0, 0.01), (2.0, 0.1), (0.8, 0.3)]:
        general = subsampled_rdp(ORDERS / (2 * z * z), q)
        acc = RdpAccountant(orders=[float(a) for a in ORDERS])
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
        assert np.all(general >= np.array(acc._rdp) * (1 - 1e-9))
        assert np.all(general <= ORDERS / (2 * z * z) + 1e-12)
    unsampled = SkellamRounds(1.0, 100, 1e3, 1e6, 1.0, 50)
    sampled = SkellamRounds(1.0, 100, 1e3, 1e6, 0.1, 50)
    assert epsilon(sampled, 1e-5) < epsilon(unsampled, 1e-5)


def test_skellam_tends_to_the_gaussian_with_the_same_variance() -> None:
    # Fixed noise multiplier z = √v / Δ2: as γ grows the Skellam ε decreases to the
    # Gaussian's RDP ε (same orders, same conversion) and never goes below it.
    z, rounds, delta = 1.2, 20, 1e-5
    gauss = compute_epsilon(ORDERS, ORDERS / (2 * z * z) * rounds, delta)[0]
    previous = math.inf
    for scale in (1.0, 10.0, 100.0, 1e4):
        event = SkellamRounds(1.0, 10, scale, 1.0, 1.0, rounds, beta=0.0)
        event = SkellamRounds(1.0, 10, scale, (z * event.l2_sensitivity) ** 2, 1.0, rounds, 0.0)
        eps = epsilon(event, delta)
        assert gauss <= eps <= previous
        previous = eps
    assert previous == pytest.approx(gauss, rel=1e-3)


def test_ddg_accounts_every_survivor_count() -> None:
    base = dict(clip=1.0, dim=20, scale=3.0, sampling_rate=1.0, rounds=5, beta=0.0)
    many = DistributedDiscreteGaussianRounds(
        noise_variance=3 * 0.3, min_clients=3, max_clients=9, **base
    )
    worst = max(
        epsilon(
            DistributedDiscreteGaussianRounds(
                noise_variance=n * many.local_variance, min_clients=n, max_clients=n, **base
            ),
            1e-5,
        )
        for n in range(3, 10)
    )
    assert epsilon(many, 1e-5) == pytest.approx(worst, rel=1e-9)


@pytest.mark.parametrize("mechanism", ["skellam", "ddg"])
@pytest.mark.parametrize("target", [1.0, 4.0])
def test_calibration_returns_the_smallest_sufficient_variance(mechanism, target) -> None:  # noqa: ANN001
    kw = dict(clip=0.5, dim=10_000, scale=200.0, sampling_rate=0.2, rounds=30)

    def eps(v: float) -> float:
        if mechanism == "skellam":
            return epsilon(SkellamRounds(noise_variance=v, **kw), 1e-5)
        return epsilon(
            DistributedDiscreteGaussianRounds(
                noise_variance=v, min_clients=4, max_clients=12, **kw
            ),
            1e-5,
        )

    v = calibrate_variance(mechanism, target, 1e-5, min_clients=4, max_clients=12, **kw)
    assert eps(v) <= target < eps(0.99 * v)


def test_calibration_refuses_unreachable_targets_and_bad_parameters() -> None:
    kw = dict(clip=1.0, dim=10, scale=10.0, sampling_rate=1.0, rounds=1)
    with pytest.raises(ValueError, match="use a smaller target"):
        calibrate_variance("skellam", 1e4, 1e-5, **kw)
    with pytest.raises(ValueError, match="target_epsilon must be > 0, got 0"):
        calibrate_variance("skellam", 0.0, 1e-5, **kw)
    with pytest.raises(ValueError, match="mechanism must be one of"):
        calibrate_variance("gauss", 1.0, 1e-5, **kw)
    with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\], got 1.5"):
        SkellamRounds(1.0, 10, 10.0, 1.0, 1.5, 1)
    with pytest.raises(ValueError, match="max_clients must be an integer >= min_clients=5, got 4"):
        DistributedDiscreteGaussianRounds(1.0, 10, 10.0, 1.0, 1.0, 1, 5, 4)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 0"):
        epsilon(SkellamRounds(1.0, 10, 10.0, 1.0, 1.0, 1), 0.0)


# -------------------------------------------------------------------------------- samplers


def test_secure_generator_is_reproducible_only_when_seeded() -> None:
    a = secure_generator(TEST_SEED).integers(0, 2**62, 4)
    b = secure_generator(TEST_SEED).integers(0, 2**62, 4)
    c = secure_generator().integers(0, 2**62, 4)
    d = secure_generator().integers(0, 2**62, 4)
    assert (a == b).all() and not (c == d).all()


def _chi_square_p(samples: np.ndarray, pmf) -> float:  # noqa: ANN001
    values, counts = np.unique(samples, return_counts=True)
    expected = pmf(values) * samples.size
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], samples.size - expected[keep].sum())
    return float(stats.chisquare(observed, expected).pvalue)


def test_skellam_sampler_has_the_skellam_law() -> None:
    rng = secure_generator(TEST_SEED)
    small = skellam_noise(200_000, 3.0, rng)
    assert small.dtype == np.int64
    assert _chi_square_p(small, lambda x: stats.skellam.pmf(x, 1.5, 1.5)) > 1e-4
    n, variance = 400_000, 2.5e9
    big = skellam_noise(n, variance, rng).astype(np.float64)
    assert abs(big.mean()) < 5 * math.sqrt(variance / n)
    assert big.var() == pytest.approx(variance, rel=5 * math.sqrt(2 / n))


def test_discrete_gaussian_sampler_has_the_discrete_gaussian_law() -> None:
    rng = secure_generator(TEST_SEED)
    for sigma in (0.7, 3.0):
        support = np.arange(-60, 61)
        weights = np.exp(-(support**2) / (2 * sigma**2))

        def pmf(x, w=weights, s=support):  # noqa: ANN001, ANN202
            return w[np.searchsorted(s, x)] / w.sum()

        assert _chi_square_p(discrete_gaussian_noise(200_000, sigma, rng), pmf) > 1e-4
    sample = discrete_gaussian_noise((400, 1000), 50.0, rng).astype(np.float64)
    assert sample.shape == (400, 1000)
    assert abs(sample.mean()) < 5 * 50.0 / math.sqrt(sample.size)
    assert sample.var() == pytest.approx(
        discrete_gaussian_variance(50.0), rel=5 * math.sqrt(2 / sample.size)
    )
    assert discrete_gaussian_variance(0.3) < 0.3**2  # below σ² for small σ


def test_discrete_gaussian_sampler_is_fast_for_large_sigma() -> None:
    rng = secure_generator(TEST_SEED)
    # A guard against a sampler whose cost grows with sigma (CPU time, not wall time:
    # other processes on a loaded machine do not count).
    start = time.process_time()
    discrete_gaussian_noise(1_000_000, 1e4, rng)
    assert time.process_time() - start < 3.0  # ~0.15 s measured on this machine kind


# ---------------------------------------------------------------------- shares over survivors


@pytest.mark.parametrize("total", [1234.567, 0.1, 3.3e14])
def test_shares_sum_to_at_least_the_target_for_every_survivor_count(total) -> None:  # noqa: ANN001
    min_clients, max_clients = 7, 100
    share = share_variance(total, min_clients)
    for k in range(min_clients, max_clients + 1):
        assert Fraction(share) * k >= Fraction(total)  # exact rational arithmetic
    assert min_clients * share == pytest.approx(total, rel=1e-15)  # the target at the minimum
    # Skellam is closed under summation: k shares are the Skellam of variance k·share.
    rng = secure_generator(TEST_SEED)
    for k in (min_clients, 40):
        summed = sum(skellam_noise(100_000, 25.0, rng) for _ in range(k)).astype(np.float64)
        assert summed.var() == pytest.approx(25.0 * k, rel=5 * math.sqrt(2 / 100_000))


# ------------------------------------------------------------------- encoding and wrap-around


def test_encoding_respects_the_sensitivity_and_is_unbiased() -> None:
    rng = secure_generator(TEST_SEED)
    d, clip, scale = 5000, 0.3, 100.0
    for beta in (0.0, math.exp(-0.5)):
        bound = l2_sensitivity(clip, scale, d, beta)
        for _ in range(20):
            r = encode(rng.normal(size=d), clip, scale, beta, rng)
            assert r.dtype == np.int64 and float(np.dot(r, r)) <= bound**2
    assert l2_sensitivity(clip, scale, d, 0.0) == clip * scale + math.sqrt(d)
    assert l2_sensitivity(clip, scale, d, 0.5) < clip * scale + math.sqrt(d)
    assert l1_sensitivity(4.0, 100) == 16.0 and l1_sensitivity(40.0, 100) == 400.0
    x = np.full(200_000, 0.3)
    assert randomized_round(x, rng).mean() == pytest.approx(0.3, abs=5 * math.sqrt(0.21 / 2e5))
    with pytest.raises(ValueError, match="no rounding within l2_bound"):
        randomized_round(np.full(100, 0.5), rng, l2_bound=1.0, max_tries=5)


def test_modular_sum_decodes_to_the_signed_sum() -> None:
    rng = secure_generator(TEST_SEED)
    vectors = [rng.integers(-(2**28), 2**28, 1000) for _ in range(7)]
    total = np.zeros(1000, dtype=np.uint32)
    for v in vectors:
        total += to_modular(v, 32)  # uint32 addition wraps mod 2^32, as secure aggregation
    np.testing.assert_array_equal(centred(total, 32), np.sum(vectors, axis=0))


def test_wrap_probability_behaves_and_bounds_simulated_wraps() -> None:
    kw = dict(dim=2000, clip=1.0, beta=0.0, max_clients=10)
    p = [
        wrap_probability("skellam", scale=10.0, noise_variance=300.0**2, modulus_bits=b, **kw)
        for b in (11, 12, 13, 16)
    ]
    assert p[0] == 1.0 or p[0] > p[1] > p[2] > p[3]
    assert (
        wrap_probability("skellam", scale=300.0, noise_variance=1.0, modulus_bits=12, **kw) == 1.0
    )
    assert wrap_probability("ddg", scale=10.0, noise_variance=1e4, modulus_bits=32, **kw) < 1e-300
    # Simulation at a bound near 0.2: worst-case signal (all clients in one coordinate,
    # and every coordinate as large as possible) plus Skellam noise.
    variance, bits = 430.0**2, 12
    bound = wrap_probability(
        "skellam", scale=10.0, noise_variance=variance, modulus_bits=bits, **kw
    )
    assert 0.01 < bound < 0.5
    rng = secure_generator(TEST_SEED)
    wraps = 0
    for _ in range(200):
        s = 10 * 10 + skellam_noise(2000, variance, rng)
        wraps += bool(np.any((s >= 2 ** (bits - 1)) | (s < -(2 ** (bits - 1)))))
    assert wraps / 200 <= bound + 3 * math.sqrt(bound / 200)
    with pytest.raises(ValueError, match="mechanism must be one of"):
        wrap_probability("gauss", scale=1.0, noise_variance=1.0, **kw)


def test_plan_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError, match="no scale works"):
        plan_distributed(
            "skellam",
            1.0,
            1e-5,
            clip=1.0,
            dim=100_000,
            sampling_rate=1.0,
            rounds=10,
            min_clients=10,
            max_clients=100,
            modulus_bits=12,
        )


def test_plan_for_the_recommended_setting() -> None:
    # d = 1M, C = 1, 10 to 100 survivors, 2^32, ε = 3 at δ = 1e-5 over 100 rounds, q = 1.
    plan = plan_distributed(
        "skellam",
        3.0,
        1e-5,
        clip=1.0,
        dim=1_000_000,
        sampling_rate=1.0,
        rounds=100,
        min_clients=10,
        max_clients=100,
    )
    assert plan.epsilon <= 3.0 and plan.wrap_probability <= 1e-9
    assert plan.l2_sensitivity / plan.scale < 1.0 + 1e-3  # rounding inflates Δ2 by < 0.1%
    assert plan.share_variance * 10 >= plan.noise_variance
