"""Building blocks of secure aggregation: PRG, Shamir, quantisation, keys, graph."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flower_privacy.secagg import graph, keys, prg, shamir
from flower_privacy.secagg.prg import expand_mask
from flower_privacy.secagg.quantize import Quantizer

# Flower-free cores: run on the main Flower version only.
pytestmark = pytest.mark.once


def test_masks_are_deterministic_per_context_and_uniform() -> None:
    seed = os.urandom(32)
    a = expand_mask(seed, b"round-1", 200_000)
    assert a.dtype == np.uint32 and np.array_equal(a, expand_mask(seed, b"round-1", 200_000))
    b = expand_mask(seed, b"round-2", 200_000)
    assert np.mean(a == b) < 1e-3
    # Each byte position uniform: mean of top byte ~127.5, chi-square-ish spread.
    counts = np.bincount((a >> 24).astype(np.int64), minlength=256)
    assert abs((a >> 24).mean() - 127.5) < 1.5 and counts.min() > 600
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        expand_mask(b"short", b"x", 4)


@pytest.mark.parametrize(("t", "n"), [(1, 1), (2, 3), (3, 5), (6, 10), (51, 100)])
def test_shamir_rebuilds_from_any_threshold_subset(t, n) -> None:  # noqa: ANN001
    secret = os.urandom(32)
    shares = shamir.split(secret, t, n)
    rng = np.random.default_rng(t * 1000 + n)
    for _ in range(5):
        subset = [shares[i] for i in rng.choice(n, size=t, replace=False)]
        assert shamir.combine(subset, t) == secret


def test_shamir_below_threshold_reveals_nothing_checkable() -> None:
    secret_a, secret_b = bytes(32), bytes([255]) * 32
    # t-1 shares of two different secrets are identically distributed: compare limbs'
    # spread over many sharings (all values uniform in the field either way).
    values = {s: [] for s in (secret_a, secret_b)}
    for secret in values:
        for _ in range(300):
            share = shamir.split(secret, 3, 5)[0]
            values[secret].append(np.frombuffer(share[4:], dtype="<u4")[0])
    means = [np.mean(v) / shamir.PRIME for v in values.values()]
    assert all(abs(m - 0.5) < 0.1 for m in means)  # 6 sigma of 300 uniforms


def test_shamir_rejects_bad_input() -> None:
    shares = shamir.split(os.urandom(32), 3, 5)
    with pytest.raises(shamir.ShareError, match="need 3 shares, got 2"):
        shamir.combine(shares[:2], 3)
    with pytest.raises(shamir.ShareError, match="duplicate"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(shamir.ShareError, match="bytes"):
        shamir.combine([shares[0][:-1], shares[1], shares[2]], 3)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(os.urandom(32), 6, 5)


def test_quantisation_is_unbiased_and_sums_without_wrapping() -> None:
    q = Quantizer(clip_range=1.0, max_weight=10, max_clients=20)
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-1, 1, 5000) for _ in range(20)]
    weights = [10] * 20  # the worst case the scale allows
    total = np.zeros(5000, dtype=np.uint32)
    for u, w in zip(updates, weights, strict=True):
        total += q.encode(u, w).values
    mean = sum(w * u for u, w in zip(updates, weights, strict=True)) / sum(weights)
    decoded = q.decode_sum(total, sum(weights))
    assert np.max(np.abs(decoded - mean)) < 20 * q.resolution / sum(weights)
    extreme = [np.ones(10)] * 20  # every client at +clip with max weight: no wrap-around
    total = sum((q.encode(u, 10).values for u in extreme), np.zeros(10, dtype=np.uint32))
    np.testing.assert_allclose(q.decode_sum(total, 200), 1.0, atol=1e-6)


def test_quantisation_reports_clipping_and_caps_weights() -> None:
    q = Quantizer(clip_range=0.5, max_weight=4, max_clients=3)
    enc = q.encode(np.array([0.1, 0.7, -2.0, 0.5]), 9)
    assert enc.clipped == 2 and enc.weight == 4 and enc.weight_capped
    with pytest.raises(ValueError, match="NaN"):
        q.encode(np.array([np.nan]), 1)
    with pytest.raises(ValueError, match="clip_range"):
        Quantizer(clip_range=0.0, max_weight=1, max_clients=1)
    with pytest.raises(ValueError, match="no room"):
        Quantizer(clip_range=1.0, max_weight=2**20, max_clients=2**12)


@pytest.mark.parametrize("bits", [32, 64])
def test_either_word_width_sums_the_worst_case_cohort_without_wrapping(bits: int) -> None:
    q = Quantizer(clip_range=1.0, max_weight=1000, max_clients=3000, word_bits=bits)
    for sign in (1.0, -1.0):  # every client at the clip with the largest weight
        total = np.zeros(4, dtype=q.dtype)
        for _ in range(q.max_clients):
            total += q.encode(np.full(4, sign), q.max_weight).values
        decoded = q.decode_sum(total, q.max_clients * q.max_weight)
        np.testing.assert_allclose(decoded, sign, atol=q.resolution)
    # The wider word buys resolution: the bound is what picks it.
    assert (q.dtype.itemsize, q.resolution < 1e-9) == ((4, False) if bits == 32 else (8, True))


def test_the_word_width_is_the_narrowest_that_meets_the_error_bound() -> None:
    small = Quantizer.for_cohort(clip_range=1.0, max_weight=100, max_clients=100)
    assert small.word_bits == 32 and small.resolution <= 1e-3
    large = Quantizer.for_cohort(clip_range=1.0, max_weight=10_000, max_clients=10_000)
    assert large.word_bits == 64 and large.resolution <= 1e-3
    # 32 bits cannot even hold this cohort's worst-case sum: 64 bits are taken.
    assert Quantizer.for_cohort(1.0, 2**20, 2**12).word_bits == 64
    assert Quantizer.for_cohort(1.0, 100, 100, max_error=1e-9).word_bits == 64
    with pytest.raises(ValueError, match="no word width"):
        Quantizer.for_cohort(1.0, 100, 100, max_error=1e-30)
    with pytest.raises(ValueError, match="max_error"):
        Quantizer.for_cohort(1.0, 100, 100, max_error=float("nan"))


@pytest.mark.parametrize("base", [0.0, 2.0**30, 2.0**50])
def test_stochastic_rounding_is_unbiased_at_every_magnitude(base: float) -> None:
    from flower_privacy.secagg.quantize import stochastic_round

    for fraction in (0.25, 0.5):  # exact in float64 even beside 2^50
        x = np.full(40_000, base + fraction)
        rounded = stochastic_round(x, bytes(32))
        assert set(np.unique(rounded - int(base))) == {0, 1}
        # 40,000 draws: the rate is within 0.0125 (5 sigma) of the fraction.
        assert abs((rounded - int(base)).mean() - fraction) < 0.0125


@pytest.mark.parametrize("bits", [32, 64])
def test_a_reused_mask_buffer_gives_the_reference_keystream(bits: int) -> None:
    # The reference: AES-256-CTR, zero nonce, under HKDF-SHA256(seed, purpose), read
    # little-endian. One buffer serves many masks; each expand is the fresh result.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed, buffer = os.urandom(32), prg.MaskBuffer(1001, bits)
    for context in (b"first", b"second", b"first"):
        info = b"flower-privacy/secagg/mask/v1|" + (b"u64|" if bits == 64 else b"") + context
        encryptor = Cipher(
            algorithms.AES(prg.derive_key(seed, info)), modes.CTR(bytes(16))
        ).encryptor()
        reference = np.frombuffer(encryptor.update(bytes(1001 * bits // 8)), f"<u{bits // 8}")
        got = buffer.expand(seed, context)
        assert np.array_equal(got, reference) and got.size == 1001
        assert np.array_equal(expand_mask(seed, context, 1001, bits), reference)


def test_64_bit_masks_come_from_their_own_keystream() -> None:
    seed = os.urandom(32)
    narrow, wide = prg.expand_mask(seed, b"c", 8), prg.expand_mask(seed, b"c", 8, 64)
    assert narrow.dtype == np.uint32 and wide.dtype == np.uint64 and len(wide) == 8
    assert narrow.tobytes() != wide.tobytes()[: narrow.nbytes]
    with pytest.raises(ValueError, match="word_bits"):
        prg.expand_mask(seed, b"c", 8, 16)


def test_key_agreement_agrees_and_binds_ids_and_context() -> None:
    a, b = keys.generate_private_key(), keys.generate_private_key()
    with_a = keys.KeyAgreement(a, 1)
    ab = with_a.material(keys.public_key(b), 2, b"run")
    ba = keys.KeyAgreement(b, 2).material(keys.public_key(a), 1, b"run")
    assert ab == ba and len(ab) == 64
    assert with_a.material(keys.public_key(b), 2, b"other") != ab
    assert with_a.material(keys.public_key(b), 3, b"run") != ab
    # One loaded key, many peers: each agreement is its own (not the last peer's).
    c = keys.generate_private_key()
    ac = with_a.material(keys.public_key(c), 3, b"run")
    assert ac == keys.KeyAgreement(c, 3).material(keys.public_key(a), 1, b"run") != ab
    with pytest.raises(ValueError):
        with_a.material(bytes(32), 2, b"run")  # a low-order point: all-zero secret
    with pytest.raises(ValueError, match="32 bytes"):
        with_a.material(keys.public_key(b)[:31], 2, b"run")
    with pytest.raises(ValueError, match="itself"):
        with_a.material(keys.public_key(a), 1, b"run")


def test_view_macs_verify_only_the_same_message_and_key() -> None:
    key = os.urandom(32)
    tag = keys.mac(key, b"view")
    assert keys.mac_ok(key, b"view", tag)
    assert not keys.mac_ok(key, b"view!", tag)
    assert not keys.mac_ok(os.urandom(32), b"view", tag)


def test_canonical_encoding_separates_types_shapes_and_orders() -> None:
    import numpy as np

    from flower_privacy.secagg import canonical

    values = [
        1,
        "1",
        b"1",
        1.0,
        True,
        [1],
        {"a": 1},
        np.array([1], dtype=np.int32),
        np.array([1], dtype=np.int64),
        np.array([[1]], dtype=np.int32),
        [1, 2],
        [2, 1],
    ]
    encodings = [canonical.encode(v) for v in values]
    assert len(set(encodings)) == len(values)
    assert canonical.encode({"a": 1, "b": 2}) == canonical.encode({"b": 2, "a": 1})
    assert canonical.digest("x", [1]) != canonical.digest("y", [1])
    big = np.arange(6, dtype=">i4")
    assert canonical.encode(big) == canonical.encode(big.astype("<i4"))


def test_canonical_fast_paths_and_prefix_digests_give_the_same_bytes() -> None:
    import enum
    import struct

    import numpy as np

    from flower_privacy.secagg import canonical, views
    from flower_privacy.secagg._common import PROTOCOL

    def item(tag: bytes, body: bytes) -> bytes:
        return tag + struct.pack("<Q", len(body)) + body

    class Small(enum.IntEnum):
        FIVE = 5

    # The exact-type fast paths write what the general branches write.
    assert canonical.encode(5) == item(b"i", b"5") == canonical.encode(np.int64(5))
    assert canonical.encode(Small.FIVE) == item(b"i", b"5")
    assert canonical.encode(b"ab") == item(b"b", b"ab") == canonical.encode(bytearray(b"ab"))
    assert canonical.encode("\u00e9") == item(b"s", "\u00e9".encode())
    assert canonical.encode([1, b"x"]) == b"l" + struct.pack("<Q", 2) + item(b"i", b"1") + item(
        b"b", b"x"
    )
    # A shared head hashed once gives the digest of the whole list.
    head = canonical.PrefixDigest("d", [1, "two", b"3"], tail_items=2)
    assert head.digest(4, b"5") == canonical.digest("d", [1, "two", b"3", 4, b"5"])
    assert head.digest(4, b"6") != head.digest(4, b"5")
    with pytest.raises(ValueError):
        head.digest(4)
    nonce, share = os.urandom(16), os.urandom(68)
    expected = canonical.digest("share-commitment", [PROTOCOL, nonce, 3, 7, 9, "b", share])
    assert views.share_commitment(nonce, 3, 7, 9, "b", share) == expected
    assert views.share_commitments(nonce, 3)(7, 9, "b", share) == expected


def test_sealed_shares_reject_tampering_and_wrong_context() -> None:
    key = os.urandom(32)
    sealed = keys.seal(key, b"share", b"ad")
    assert keys.open_sealed(key, sealed, b"ad") == b"share"
    for bad_key, bad_blob, bad_ad in [
        (os.urandom(32), sealed, b"ad"),
        (key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"ad"),
        (key, sealed, b"other"),
        (key, sealed[:10], b"ad"),
    ]:
        with pytest.raises(keys.DecryptionError):
            keys.open_sealed(bad_key, bad_blob, bad_ad)


@pytest.mark.parametrize(("n", "degree"), [(5, 4), (40, 12), (41, 11), (100, 14)])
def test_graph_is_symmetric_regular_and_reproducible(n, degree) -> None:  # noqa: ANN001
    nodes = list(range(1000, 1000 + n))
    g = graph.neighbours(nodes, degree, b"seed")
    assert g == graph.neighbours(list(reversed(nodes)), degree, b"seed")
    assert g != graph.neighbours(nodes, degree, b"other") or degree == n - 1
    for node, peers in g.items():
        assert node not in peers and all(node in g[p] for p in peers)
        assert degree <= len(peers) <= degree + 1


def test_default_degree_survives_the_expected_dropout() -> None:
    from flower_privacy.secagg.floors import required_threshold

    assert graph.default_degree(8) == 7 and graph.default_degree(12) == 11  # complete
    for n in (100, 1000, 10_000):
        k = graph.default_degree(n, dropout=0.1)
        t = required_threshold(k, 0)
        assert k < n - 1 and t <= k
        assert graph.default_degree(n, dropout=0.2) > k  # more dropout, denser graph


def test_protocol_messages_round_trip_and_refuse_what_they_do_not_define() -> None:
    from flower_privacy.secagg import messages as m
    from flower_privacy.secagg._common import PROTOCOL

    request = m.TrainRequest(protocol=PROTOCOL, nonce=b"n", round=2, prepared=[1, 2], from_=[2])
    wire = request.to_dict()
    assert wire["from"] == [2] and m.TrainRequest.parse(wire) == request
    with pytest.raises(m.MessageError, match="unexpected fields \\['lr'\\]"):
        m.TrainRequest.parse({**wire, "lr": 0.1})
    with pytest.raises(m.MessageError, match="'round' is not int"):
        m.TrainRequest.parse({**wire, "round": True})
    with pytest.raises(m.MessageError, match="'prepared' is missing"):
        m.TrainRequest.parse({k: v for k, v in wire.items() if k != "prepared"})
    with pytest.raises(m.VersionError, match="flower-privacy-secagg/1"):
        m.TrainRequest.parse({**wire, "protocol": "flower-privacy-secagg/1"})
