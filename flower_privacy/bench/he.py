"""``flower-privacy bench he``: our encrypted FedAvg against an NVFlare-style CKKS baseline.

One process, one run, same data: a 1M-parameter model (five layers) whose values are
of unit scale (uniform in [-1, 1]), 10 clients with example counts in [100, 1000].

- ``ours``: the default preset (BFV, quantised, clients pre-weight, one flat vector in
  slot-size chunks encrypted by a process pool; the server only adds).
- ``ckks``: our add-only CKKS preset, same pipeline.
- ``nvflare_style``: NVIDIA FLARE's path: CKKS N=8192 [60, 40, 40], scale 2^40, one
  vector per layer encrypted in one process, the server multiplies each client's
  ciphertexts by its plaintext weight share and adds.

Each row: ``expansion`` (upload ciphertext bytes over float32 bytes), ``encrypt_s`` (one
client's model, median over clients), ``aggregate_s`` (server side, all clients: the
homomorphic arithmetic on deserialized ciphertexts, as in the issue's figures),
``aggregate_with_io_s`` (the same from uploaded bytes to the serialized aggregate),
``decrypt_s`` (one client, aggregate bytes to the mean model), ``max_abs_error``
(against the float64 weighted mean). The pool's start-up is reported apart as
``pool_start_s``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np

from flower_privacy import he
from flower_privacy.he._tenseal import tenseal

LAYERS = {
    "l1.w": (784, 1000),
    "l1.b": (1000,),
    "l2.w": (1000, 200),
    "l2.b": (200,),
    "l3.w": (200, 74),
}


def _models(clients: int, quick: bool) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(2026)  # benchmark data, not secrets
    shapes = {k: (max(1, s[0] // 10), *s[1:]) for k, s in LAYERS.items()} if quick else LAYERS
    models = [
        {k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in shapes.items()}
        for _ in range(clients)
    ]
    weights = [int(w) for w in rng.integers(100, 1001, clients)]
    return models, weights


def _exact_mean(models: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {
        k: sum(w * m[k].astype(np.float64) for m, w in zip(models, weights, strict=True)) / total
        for k in models[0]
    }


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return float(max(np.max(np.abs(got[k].astype(np.float64) - want[k])) for k in want))


def _ours(
    preset: str,
    limits: he.DeclaredLimits,
    models: list[dict[str, np.ndarray]],
    weights: list[int],
    workers: int,
    log: Callable[[str], None],
) -> tuple[dict, float]:
    params = he.derive_parameters(preset, limits)
    with tempfile.TemporaryDirectory() as keys:
        client_path, server_path = he.generate_keys(keys, params)
        client, server = he.HEContext.load(client_path), he.HEContext.load(server_path)
    layout = he.Layout.of(models[0])
    pool = he.EncryptionPool(client.public_bytes, workers) if workers > 1 else None
    try:
        uploads, times = [], []
        for model, weight in zip(models, weights, strict=True):
            started = time.perf_counter()
            update = he.encrypt_model(client, model, weight, limits, encryptor=pool)
            uploads.append(update.envelope.to_bytes())
            times.append(time.perf_counter() - started)
        single = time.perf_counter()
        he.encrypt_model(client, models[0], weights[0], limits)
        single_s = time.perf_counter() - single
    finally:
        if pool is not None:
            pool.close()
    started = time.perf_counter()
    loaded = [he.load_update(server, blob, layout, limits) for blob in uploads]
    added = time.perf_counter()
    total = he.sum_updates(loaded)
    aggregate_s = time.perf_counter() - added
    aggregate = total.to_envelope().to_bytes()
    aggregate_with_io_s = time.perf_counter() - started
    del loaded, total
    started = time.perf_counter()
    mean = he.decrypt_model(client, aggregate)
    decrypt_s = time.perf_counter() - started
    row = {
        "scheme": params.scheme,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "plain_modulus": params.plain_modulus,
        "expansion": len(uploads[0]) / (4 * layout.size),
        "encrypt_s": statistics.median(times),
        "encrypt_single_process_s": single_s,
        "aggregate_s": aggregate_s,
        "aggregate_with_io_s": aggregate_with_io_s,
        "decrypt_s": decrypt_s,
        "max_abs_error": _max_error(mean.arrays, _exact_mean(models, weights)),
        "documented_error_bound": he.precision_bound(params, limits),
    }
    log(f"{preset}: {row}")
    return row, (pool.start_seconds if pool is not None else 0.0)


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to stderr (the JSON owns stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _nvflare_style(
    models: list[dict[str, np.ndarray]], weights: list[int], log: Callable[[str], None]
) -> dict:
    ts = tenseal()
    secret = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40]
    )
    secret.global_scale = 2.0**40
    public = ts.context_from(
        secret.serialize(save_public_key=True, save_secret_key=False, save_relin_keys=False)
    )
    uploads, times = [], []
    for model in models:
        started = time.perf_counter()
        with _native_stdout_to_stderr():  # TenSEAL warns on stdout about multi-chunk layers
            uploads.append(
                {
                    k: ts.ckks_vector(public, v.reshape(-1).tolist()).serialize()
                    for k, v in model.items()
                }
            )
        times.append(time.perf_counter() - started)
    total = float(sum(weights))
    started = time.perf_counter()
    loaded = [{k: ts.ckks_vector_from(public, b) for k, b in u.items()} for u in uploads]
    computed = time.perf_counter()
    aggregate: dict = {}
    for vectors, weight in zip(loaded, weights, strict=True):
        for key, vector in vectors.items():
            weighted = vector * (weight / total)  # the server sees every client's weight
            aggregate[key] = weighted if key not in aggregate else aggregate[key] + weighted
    aggregate_s = time.perf_counter() - computed
    aggregate_bytes = {k: v.serialize() for k, v in aggregate.items()}
    aggregate_with_io_s = time.perf_counter() - started
    del loaded
    started = time.perf_counter()
    mean = {
        k: np.array(ts.ckks_vector_from(secret, b).decrypt()).reshape(models[0][k].shape)
        for k, b in aggregate_bytes.items()
    }
    decrypt_s = time.perf_counter() - started
    size = sum(v.size for v in models[0].values())
    row = {
        "scheme": "ckks",
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": [60, 40, 40],
        "expansion": sum(len(b) for b in uploads[0].values()) / (4 * size),
        "encrypt_s": statistics.median(times),
        "aggregate_s": aggregate_s,
        "aggregate_with_io_s": aggregate_with_io_s,
        "decrypt_s": decrypt_s,
        "max_abs_error": _max_error(mean, _exact_mean(models, weights)),
    }
    log(f"nvflare_style: {row}")
    return row


def run(
    *,
    clients: int = 10,
    workers: int | None = None,
    quick: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Measure the three rows in this process and return one JSON-ready dict."""
    workers = he.default_workers() if workers is None else workers
    models, weights = _models(clients, quick)
    limits = he.DeclaredLimits(
        max_clients=clients, max_weight=1000, clip_range=1.0, precision_bits=16
    )
    ours, pool_start = _ours("bfv", limits, models, weights, workers, log)
    ckks, _ = _ours("ckks", limits, models, weights, workers, log)
    nvflare = _nvflare_style(models, weights, log)
    params = sum(v.size for v in models[0].values())
    return {
        "params": params,
        "clients": clients,
        "workers": workers,
        "cpus": os.cpu_count(),
        "limits": limits.to_dict(),
        "data": "values uniform in [-1, 1], example counts in [100, 1000]",
        "ours": ours,
        "ckks": ckks,
        "nvflare_style": nvflare,
        "pool_start_s": pool_start,
        "ratios": {
            "aggregate_nvflare_over_ours": nvflare["aggregate_s"] / ours["aggregate_s"],
            "aggregate_with_io_nvflare_over_ours": (
                nvflare["aggregate_with_io_s"] / ours["aggregate_with_io_s"]
            ),
            "encrypt_nvflare_over_ours": nvflare["encrypt_s"] / ours["encrypt_s"],
            "encrypt_nvflare_over_ours_single_process": (
                nvflare["encrypt_s"] / ours["encrypt_single_process_s"]
            ),
            "expansion_nvflare_over_ours": nvflare["expansion"] / ours["expansion"],
        },
        "targets_met": {
            "ours_expansion_le_4": ours["expansion"] <= 4,
            "aggregate_10x_below_nvflare": nvflare["aggregate_s"] >= 10 * ours["aggregate_s"],
            "encrypt_1_5x_below_nvflare": nvflare["encrypt_s"] >= 1.5 * ours["encrypt_s"],
            "ours_max_abs_error_le_1e-4": ours["max_abs_error"] <= 1e-4,
        },
    }
