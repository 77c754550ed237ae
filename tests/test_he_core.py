"""The HE core (no Flower): presets, capacity, keys, quantisation, packing, verification."""

from __future__ import annotations

import random
import stat
from dataclasses import replace

import numpy as np
import pytest

from flower_privacy import he
from flower_privacy.he import codec
from flower_privacy.he._tenseal import tenseal
from flower_privacy.he.envelope import Envelope

# Flower-free cores: run on the main Flower version only.
pytestmark = pytest.mark.once

LIMITS = he.DeclaredLimits(max_clients=8, max_weight=100, clip_range=2.0, precision_bits=16)
SHAPES = {
    "one-array": {"w": (7,)},
    "multi-chunk": {"w": (70, 130), "b": (130,), "v": (3, 1, 2)},
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[he.HEContext, he.HEContext]]:
    """A key pair per preset: (client context, server context)."""
    out = {}
    for preset in he.PRESETS:
        folder = tmp_path_factory.mktemp(preset)
        client, server = he.generate_keys(folder, he.derive_parameters(preset, LIMITS))
        out[preset] = (he.HEContext.load(client), he.HEContext.load(server))
    return out


def _models(shapes: dict, k: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(seed)
    models = [
        {n: rng.uniform(-1.5, 1.5, s).astype(np.float32) for n, s in shapes.items()}
        for _ in range(k)
    ]
    return models, [int(w) for w in rng.integers(1, 150, k)]  # some above max_weight


def _aggregate(client, server, models, weights, limits=LIMITS) -> bytes:
    layout = he.Layout.of(models[0])
    uploads = [
        he.encrypt_model(client, m, w, limits).envelope.to_bytes()
        for m, w in zip(models, weights, strict=True)
    ]
    loaded = [he.load_update(server, blob, layout, limits) for blob in uploads]
    return he.add_updates(loaded).to_bytes()


@pytest.mark.parametrize("preset", he.PRESETS)
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("k", [1, 3, 8])
def test_decrypted_mean_matches_plain_fedavg_within_the_documented_precision(
    keys, preset, shape_name, k
) -> None:
    client, server = keys[preset]
    models, weights = _models(SHAPES[shape_name], k, seed=k)
    result = he.decrypt_model(client, _aggregate(client, server, models, weights))
    capped = [min(w, LIMITS.max_weight) for w in weights]
    assert result.total_weight == sum(capped) and result.contributors == k
    params = he.derive_parameters(preset, LIMITS)
    if preset == "bfv":  # stochastic rounding: under one step per client, over the weight
        bound = k / (2**LIMITS.precision_bits * sum(capped))
    else:  # worst case per ciphertext, over the weight
        bound = he.precision_bound(params, LIMITS) * k / sum(capped)
    for name in SHAPES[shape_name]:
        exact = sum(w * m[name].astype(np.float64) for m, w in zip(models, capped, strict=True))
        exact /= sum(capped)
        got = result.arrays[name]
        assert got.shape == exact.shape and got.dtype == np.float32
        assert np.max(np.abs(got - exact)) <= bound + 1e-7  # + float32 rounding of the output


def test_the_public_context_cannot_decrypt(keys) -> None:
    client, server = keys["bfv"]
    models, weights = _models(SHAPES["one-array"], 2, seed=0)
    aggregate = _aggregate(client, server, models, weights)
    with pytest.raises(he.KeyRoleError, match="no secret key and cannot decrypt"):
        he.decrypt_model(server, aggregate)
    # Not only our check: TenSEAL itself has no key to decrypt with.
    chunk = Envelope.from_bytes(aggregate).chunks[0]
    with pytest.raises(ValueError, match="secret"):
        tenseal().bfv_vector_from(server.context, chunk).decrypt()


def test_key_files_roles_and_modes(tmp_path) -> None:
    client_path, server_path = he.generate_keys(tmp_path, he.derive_parameters("bfv", LIMITS))
    assert stat.S_IMODE(client_path.stat().st_mode) == 0o600
    server = he.HEContext.load(server_path)
    assert not server.is_private
    assert not server.context.has_relin_keys() and not server.context.has_galois_keys()
    client = he.HEContext.load(client_path).require_secret()
    assert client.fingerprint == server.fingerprint
    with pytest.raises(he.KeyRoleError, match="holds the secret key"):
        client.require_public_only()
    with pytest.raises(he.HEConfigError, match="key files exist already"):
        he.generate_keys(tmp_path, he.derive_parameters("bfv", LIMITS))
    with pytest.raises(he.HEConfigError, match="not a TenSEAL context"):
        he.HEContext.from_bytes(b"garbage")


def test_sums_cannot_wrap_at_the_declared_limits(keys) -> None:
    """max_clients clients at max_weight with every value at ±clip_range: exact."""
    client, server = keys["bfv"]
    k, r = LIMITS.max_clients, LIMITS.clip_range
    model = {"up": np.full(5000, r, np.float32), "down": np.full(3000, -r, np.float32)}
    result = he.decrypt_model(client, _aggregate(client, server, [model] * k, [10**6] * k))
    assert result.total_weight == k * LIMITS.max_weight
    assert np.all(result.arrays["up"] == r) and np.all(result.arrays["down"] == -r)
    # The plain modulus holds exactly this much: one more client could wrap.
    t = server.plain_modulus
    assert k * LIMITS.bfv_slot_max <= (t - 1) // 2 < (k + 1) * LIMITS.bfv_slot_max


def test_limits_beyond_the_capacity_are_refused_by_name(keys) -> None:
    _, server = keys["bfv"]
    more_clients = he.DeclaredLimits(9, 100, 2.0, 16)
    with pytest.raises(he.CapacityError, match="max_clients=9 contributions"):
        server.check_limits(more_clients)
    with pytest.raises(he.CapacityError, match="max_weight=200"):
        server.check_limits(he.DeclaredLimits(8, 200, 2.0, 16))
    _, ckks = keys["ckks"]
    with pytest.raises(he.CapacityError, match="CKKS sums can overflow"):
        ckks.check_limits(he.DeclaredLimits(100_000, 2**31, 1e6, 16))
    with pytest.raises(he.CapacityError, match="needs a plain modulus above"):
        he.derive_parameters("bfv", he.DeclaredLimits(100_000, 2**31, 1e6, 40))
    # Nine uploads under limits of eight are refused before they are added.
    client, _ = keys["bfv"]
    model = {"w": np.zeros(3, np.float32)}
    loaded = [
        he.load_update(
            server, he.encrypt_model(client, model, 1, LIMITS).envelope, he.Layout.of(model), LIMITS
        )
        for _ in range(9)
    ]
    with pytest.raises(he.InvalidCiphertext, match="9 contributions exceed max_clients=8"):
        he.sum_updates(loaded)


def test_config_errors_name_parameter_range_and_value() -> None:
    with pytest.raises(
        he.HEConfigError, match=r"max_clients must be an integer in \[1, 100000\], got 0"
    ):
        he.DeclaredLimits(max_clients=0)
    with pytest.raises(he.HEConfigError, match=r"clip_range must be in \(0, 1e6\], got nan"):
        he.DeclaredLimits(clip_range=float("nan"))
    with pytest.raises(he.HEConfigError, match="preset must be one of"):
        he.derive_parameters("paillier", LIMITS)
    with pytest.raises(he.HEConfigError, match="dtype int64"):
        he.Layout.of({"steps": np.zeros(2, np.int64)})


def _upload(keys, model=None, weight=5) -> tuple[bytes, he.Layout]:
    client, _ = keys["bfv"]
    model = model or {"w": np.linspace(-1, 1, 9000).astype(np.float32)}
    return he.encrypt_model(client, model, weight, LIMITS).envelope.to_bytes(), he.Layout.of(model)


def test_a_ciphertext_under_another_key_is_named(keys, tmp_path) -> None:
    other_client, _ = he.generate_keys(tmp_path, he.derive_parameters("bfv", LIMITS))
    other = he.HEContext.load(other_client)
    model = {"w": np.ones(9000, np.float32)}
    blob = he.encrypt_model(other, model, 1, LIMITS).envelope.to_bytes()
    _, server = keys["bfv"]
    with pytest.raises(he.InvalidCiphertext, match="made under another key"):
        he.load_update(server, blob, he.Layout.of(model), LIMITS)
    # Relabelled with the right fingerprint, it gets past the label but not the canaries.
    forged = replace(Envelope.from_bytes(blob), fingerprint=server.fingerprint)
    aggregate = he.add_updates([he.load_update(server, forged, he.Layout.of(model), LIMITS)])
    with pytest.raises(he.InvalidCiphertext, match="canary check failed"):
        he.decrypt_model(keys["bfv"][0], aggregate)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b: b[:-100], "truncated or padded"),
        (lambda b: b[: len(b) // 2], "truncated or padded"),
        (lambda b: b"XXXXX" + b[5:], "bad magic"),
        (lambda b: b + b"\x00", "truncated or padded"),
    ],
    ids=["tail-cut", "half", "magic", "trailing-byte"],
)
def test_truncated_and_malformed_bytes_are_named(keys, corrupt, message) -> None:
    blob, layout = _upload(keys)
    with pytest.raises(he.InvalidCiphertext, match=message):
        he.load_update(keys["bfv"][1], corrupt(blob), layout, LIMITS)


def test_tampered_ciphertext_bytes_never_decrypt_to_a_wrong_model(keys) -> None:
    """Flip a byte anywhere in a chunk: refused at load or by the canaries, or, when the
    flip only perturbs low-order coefficient bits (absorbed as noise, about 1 in 25),
    decrypted to the very same model. Never to a different one."""
    client, server = keys["bfv"]
    model = {"w": np.linspace(-1, 1, 9000).astype(np.float32)}
    blob, layout = _upload(keys, model)
    envelope = Envelope.from_bytes(blob)
    untampered = he.decrypt_model(
        client, he.add_updates([he.load_update(server, envelope, layout, LIMITS)])
    )
    rng = np.random.default_rng(1)
    refused = 0
    for _ in range(40):
        index = int(rng.integers(len(envelope.chunks)))
        chunk = bytearray(envelope.chunks[index])
        pos = int(rng.integers(len(chunk) // 4, len(chunk)))
        chunk[pos] ^= 0xFF
        chunks = list(envelope.chunks)
        chunks[index] = bytes(chunk)
        bad = replace(envelope, chunks=tuple(chunks))
        try:
            aggregate = he.add_updates([he.load_update(server, bad, layout, LIMITS)])
            result = he.decrypt_model(client, aggregate)
        except he.InvalidCiphertext as err:
            assert "chunk" in str(err)  # names where, never what
            refused += 1
            continue
        # Accepted: bit-for-bit the model the untampered ciphertext decrypts to.
        assert np.array_equal(result.arrays["w"], untampered.arrays["w"])
        assert (result.total_weight, result.clipped) == (
            untampered.total_weight,
            untampered.clipped,
        )
    assert refused >= 30
    # A chunk swapped for a valid ciphertext of other content: only the canary sees it.
    chunks = list(envelope.chunks)
    chunks[1] = _zero_canary_chunk(client)
    swapped = replace(envelope, chunks=tuple(chunks))
    aggregate = he.add_updates([he.load_update(server, swapped, layout, LIMITS)])
    with pytest.raises(
        he.InvalidCiphertext, match=r"canary check failed in 1 of 3 chunks \(first: chunk 1\)"
    ):
        he.decrypt_model(client, aggregate)


def _zero_canary_chunk(client: he.HEContext) -> bytes:
    """A valid ciphertext of a full chunk whose canary is 0 (an adversary's or a bug's)."""
    return tenseal().bfv_vector(client.context, [0] * client.slots).serialize()


def test_a_shape_that_does_not_match_the_model_is_named(keys) -> None:
    blob, _ = _upload(keys, {"w": np.zeros((90, 100), np.float32)})
    expected = he.Layout.of({"w": np.zeros((100, 90), np.float32)})
    with pytest.raises(
        he.InvalidCiphertext,
        match=r"shape does not match the model: .*wrong shape or dtype \['w'\]",
    ):
        he.load_update(keys["bfv"][1], blob, expected, LIMITS)
    with pytest.raises(he.HEConfigError, match=r"array 'w' has shape \(2,\), expected \(3,\)"):
        he.encrypt_model(
            keys["bfv"][0], {"w": np.zeros(2)}, 1, LIMITS, layout=he.Layout.of({"w": np.zeros(3)})
        )


def test_an_upload_claiming_several_contributions_is_refused(keys) -> None:
    blob, layout = _upload(keys)
    envelope = Envelope.from_bytes(blob)
    inflated = replace(envelope, contributors=3)
    with pytest.raises(he.InvalidCiphertext, match="must hold one contribution"):
        he.load_update(keys["bfv"][1], inflated, layout, LIMITS)


def test_stochastic_rounding_uses_the_os_csprng_and_is_unbiased(monkeypatch) -> None:
    calls = []
    real = __import__("os").urandom
    monkeypatch.setattr(codec.os, "urandom", lambda n: calls.append(n) or real(n))
    np.random.seed(123)
    random.seed(123)
    numpy_state, random_state = np.random.get_state()[1].copy(), random.getstate()
    values = np.full(200_000, 0.3 / 2**16)  # 0.3 of a step
    rounded, clipped = codec.quantize(values, 1, LIMITS)
    assert calls == [4 * 200_000] and clipped == 0
    assert set(np.unique(rounded)) == {0, 1}
    assert abs(rounded.mean() - 0.3) < 0.01  # unbiased (std of the mean ~0.001)
    # Global generators untouched.
    assert (
        np.array_equal(np.random.get_state()[1], numpy_state) and random.getstate() == random_state
    )
    # The test seed (tests only) is reproducible and does not touch the CSPRNG.
    calls.clear()
    a, _ = codec.quantize(values, 1, LIMITS, test_seed=5)
    b, _ = codec.quantize(values, 1, LIMITS, test_seed=5)
    assert np.array_equal(a, b) and calls == []


def test_clipping_is_counted_and_non_finite_values_are_refused(keys) -> None:
    client, server = keys["bfv"]
    model = {"w": np.array([0.5, 3.0, -7.0, 1.0], np.float32)}
    update = he.encrypt_model(client, model, 2, LIMITS)
    assert update.clipped == 2
    aggregate = he.add_updates(
        [he.load_update(server, update.envelope, he.Layout.of(model), LIMITS)]
    )
    result = he.decrypt_model(client, aggregate)
    assert result.clipped == 2
    assert np.allclose(result.arrays["w"], [0.5, 2.0, -2.0, 1.0], atol=1e-4)
    with pytest.raises(he.HEConfigError, match="NaN or infinite"):
        he.encrypt_model(client, {"w": np.array([np.nan], np.float32)}, 1, LIMITS)
    with pytest.raises(
        he.HEConfigError, match=r"weight \(num-examples\) must be an integer >= 1, got 0"
    ):
        he.encrypt_model(client, model, 0, LIMITS)


def test_the_process_pool_encrypts_what_one_process_does(keys) -> None:
    client, server = keys["bfv"]
    model = {"w": np.random.default_rng(3).uniform(-1, 1, 20_000).astype(np.float32)}
    with he.EncryptionPool(client.public_bytes, workers=2) as pool:
        assert pool.start_seconds > 0
        pooled = he.encrypt_model(client, model, 7, LIMITS, encryptor=pool, test_seed=1)
    single = he.encrypt_model(client, model, 7, LIMITS, test_seed=1)
    layout = he.Layout.of(model)
    decrypted = [
        he.decrypt_model(
            client, he.add_updates([he.load_update(server, u.envelope, layout, LIMITS)])
        )
        for u in (pooled, single)
    ]
    # Same quantised plaintext under fresh encryption randomness: identical decryptions.
    assert pooled.envelope.chunks != single.envelope.chunks
    assert np.array_equal(decrypted[0].arrays["w"], decrypted[1].arrays["w"])
    with pytest.raises(he.HEConfigError, match="workers must be an integer >= 1, got 0"):
        he.EncryptionPool(client.public_bytes, workers=0)


def test_derived_bfv_parameters_fit_seal_and_leave_noise_room() -> None:
    for limits in (LIMITS, he.DeclaredLimits(), he.DeclaredLimits(1000, 10_000, 8.0, 20)):
        params = he.derive_parameters("bfv", limits)
        assert (
            sum(params.coeff_mod_bit_sizes)
            <= he.presets.SEAL_MAX_COEFF_BITS[params.poly_modulus_degree]
        )
        assert params.plain_modulus % (2 * params.poly_modulus_degree) == 1
        ctx = he.HEContext(he.keys.make_context(params))  # SEAL accepts them
        ctx.check_limits(limits)


def test_max_clients_copies_of_an_extreme_ciphertext_decrypt_exactly(keys) -> None:
    """Worst case the capacity check must hold: max_clients copies of ONE ciphertext (its
    noise adds up coherently, K times) of values at ±clip_range and weight max_weight
    (every slot at the declared maximum), under parameters sized to within two bits of
    the noise bound; and one bit less than the bound is refused."""
    client, server = keys["bfv"]
    k = LIMITS.max_clients
    params = he.derive_parameters("bfv", LIMITS)
    t, n = server.plain_modulus, server.poly_modulus_degree
    needed = 2 * t * k * he.presets.bfv_noise_per_ciphertext(n)
    assert needed < server.data_modulus < 4 * needed  # the key is sized tightly
    signs = np.where(np.arange(3 * server.slots) % 2 == 0, 1.0, -1.0)
    model = {"w": (LIMITS.clip_range * signs).astype(np.float32)}
    layout = he.Layout.of(model)
    upload = he.encrypt_model(client, model, LIMITS.max_weight, LIMITS).envelope.to_bytes()
    copies = [he.load_update(server, upload, layout, LIMITS) for _ in range(k)]
    result = he.decrypt_model(client, he.add_updates(copies))
    assert result.contributors == k and result.total_weight == k * LIMITS.max_weight
    assert np.array_equal(result.arrays["w"], model["w"])  # K * (±max_quantized), exact
    # The raw sum, slot by slot: exactly K times the one contribution, canaries included.
    one = he.engine._deserialize(client, Envelope.from_bytes(upload))
    again = [he.load_update(server, upload, layout, LIMITS) for _ in range(k)]
    summed = he.engine._deserialize(client, he.add_updates(again))
    for single, total in zip(one, summed, strict=True):
        assert np.array_equal(k * np.array(single.decrypt()), np.array(total.decrypt()))
    # A coefficient modulus one bit short of the noise bound is refused.
    small = he.HEParameters("bfv", n, (needed.bit_length() - 1, 60), plain_modulus=t)
    undersized = he.HEContext(he.keys.make_context(small))
    assert undersized.data_modulus < needed
    with pytest.raises(he.CapacityError, match="noise of max_clients=8 added ciphertexts"):
        undersized.check_limits(LIMITS)
    assert params.coeff_mod_bit_sizes[-1] == 60


def test_swapped_chunks_are_refused_by_their_canaries(keys) -> None:
    """Each chunk's canary is its position (1 + j): a reordered upload cannot decrypt."""
    client, server = keys["bfv"]
    model = {"w": np.linspace(-1, 1, 3 * client.slots).astype(np.float32)}
    blob, layout = _upload(keys, model)
    envelope = Envelope.from_bytes(blob)
    assert len(envelope.chunks) == 4
    chunks = list(envelope.chunks)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    swapped = replace(envelope, chunks=tuple(chunks))
    # Both chunks are full-size, so only the canaries can tell.
    aggregate = he.add_updates([he.load_update(server, swapped, layout, LIMITS)])
    with pytest.raises(
        he.InvalidCiphertext, match=r"canary check failed in 2 of 4 chunks \(first: chunk 1\)"
    ):
        he.decrypt_model(client, aggregate)
    # The canaries of one contribution are 1, 2, 3, 4 (K times that in a sum of K).
    raw = he.engine._deserialize(client, envelope)
    assert [round(v.decrypt()[0]) for v in raw] == [1, 2, 3, 4]


def _forged(envelope: Envelope, chunk: bytes) -> Envelope:
    return replace(envelope, chunks=(chunk, *envelope.chunks[1:]))


def test_a_ciphertext_at_another_scale_or_level_is_refused_at_load(keys) -> None:
    """Parseable under the key, but not addable to fresh encryptions: named at load."""
    ts = tenseal()
    client, server = keys["ckks"]
    model = {"w": np.zeros(10, np.float32)}
    layout = he.Layout.of(model)
    envelope = he.encrypt_model(client, model, 1, LIMITS).envelope
    length = len(ts.ckks_vector_from(client.context, envelope.chunks[0]).decrypt())
    other_scale = ts.ckks_vector(client.context, [1.0] * length, scale=2.0**30).serialize()
    with pytest.raises(he.InvalidCiphertext, match=r"chunk 0 has CKKS scale 2\^30, expected 2\^40"):
        he.load_update(server, _forged(envelope, other_scale), layout, LIMITS)
    nv_client, nv_server = keys["nvflare"]  # [60, 40, 40]: two data levels
    envelope = he.encrypt_model(nv_client, model, 1, LIMITS).envelope
    vec = ts.ckks_vector(nv_client.context, [1.0] * length)
    lower = (vec * ([1.0] * length)).serialize()  # rescaled: one prime fewer
    with pytest.raises(he.InvalidCiphertext, match="chunk 0 is at another modulus level"):
        he.load_update(nv_server, _forged(envelope, lower), layout, LIMITS)
    # Without the check, the sum would fail for everyone:
    fresh = ts.ckks_vector_from(
        client.context, he.encrypt_model(client, model, 1, LIMITS).envelope.chunks[0]
    )
    with pytest.raises(ValueError, match="scale mismatch"):
        fresh + ts.ckks_vector_from(client.context, other_scale)


def test_a_server_context_with_relinearisation_or_galois_keys_is_refused(keys) -> None:
    client, _ = keys["ckks"]
    for make in ("generate_relin_keys", "generate_galois_keys"):
        context = client.context.copy()
        getattr(context, make)()
        context.make_context_public()
        blob = context.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
        )
        ctx = he.HEContext.from_bytes(blob)
        assert not ctx.is_private and ctx.fingerprint == client.fingerprint
        with pytest.raises(he.KeyRoleError, match="(relinearisation|Galois) keys"):
            ctx.require_public_only()
    keys["ckks"][1].require_public_only()  # server.ctx as generated: accepted
