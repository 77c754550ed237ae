"""Encrypt a model, add encrypted models, decrypt and check an aggregate.

Clients: :func:`encrypt_model` (weight, clip, quantise, pack, encrypt). Server:
:func:`load_update` (verify one upload), :func:`add_updates` (the only operation it
performs), :func:`encrypt_public_model` (the public initial model). Clients again:
:func:`decrypt_model` (verify every canary and bound, divide by the decrypted weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from flower_privacy.he import codec
from flower_privacy.he._tenseal import tenseal
from flower_privacy.he.envelope import Envelope
from flower_privacy.he.errors import HEConfigError, InvalidCiphertext
from flower_privacy.he.keys import HEContext
from flower_privacy.he.presets import DeclaredLimits

# CKKS decrypts integers (canaries, weights) approximately: accept within this distance.
_CKKS_INTEGER_TOLERANCE = 0.25


class ChunkEncryptor(Protocol):
    """Something that encrypts chunks, e.g. :class:`~flower_privacy.he.pool.EncryptionPool`."""

    def encrypt(self, scheme: str, chunks: list[np.ndarray]) -> list[bytes]: ...


def encrypt_chunks(context: Any, scheme: str, chunks: list[np.ndarray]) -> list[bytes]:
    """Encrypt each chunk in this process (public key suffices).

    Calls TenSEAL's C++ constructors directly: its Python wrappers first copy every
    chunk into a PlainTensor (about 15% of the time).
    """
    cpp = tenseal()._ts_cpp
    if scheme == "bfv":
        return [cpp.BFVVector(context.data, c.tolist()).serialize() for c in chunks]
    scale = float(context.global_scale)
    return [cpp.CKKSVector(context.data, c.tolist(), scale).serialize() for c in chunks]


@dataclass(frozen=True)
class EncryptedUpdate:
    """A client's encrypted model and what it may log locally (never sent in clear)."""

    envelope: Envelope
    clipped: int


def encrypt_model(
    ctx: HEContext,
    arrays: Mapping[str, np.ndarray],
    weight: int,
    limits: DeclaredLimits,
    *,
    layout: codec.Layout | None = None,
    encryptor: ChunkEncryptor | None = None,
    test_seed: int | None = None,
) -> EncryptedUpdate:
    """Encrypt ``weight * arrays`` (weight capped at ``limits.max_weight``) under ``ctx``.

    ``test_seed`` fixes the stochastic rounding **for tests only** (see
    :func:`~flower_privacy.he.codec.quantize`).
    """
    ctx.check_limits(limits)
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight < 1:
        raise HEConfigError(f"weight (num-examples) must be an integer >= 1, got {weight!r}")
    weight = min(int(weight), limits.max_weight)
    layout = layout or codec.Layout.of(arrays)
    values = layout.flatten(arrays)
    if ctx.scheme == "bfv":
        encoded, clipped = codec.quantize(values, weight, limits, test_seed=test_seed)
    else:
        clipped_values, clipped = codec.clip(values, limits.clip_range)
        encoded = clipped_values * float(weight)
    header = np.array([weight, min(clipped, limits.max_weight)], dtype=encoded.dtype)
    chunks = codec.pack(header, encoded, ctx.slots, canary_cycle(ctx.scheme, limits))
    if encryptor is None:
        ciphertexts = encrypt_chunks(ctx.context, ctx.scheme, chunks)
    else:
        ciphertexts = encryptor.encrypt(ctx.scheme, chunks)
    envelope = Envelope(ctx.scheme, ctx.fingerprint, layout, limits, 1, tuple(ciphertexts))
    return EncryptedUpdate(envelope, clipped)


def canary_cycle(scheme: str, limits: DeclaredLimits) -> int:
    """C of the chunk canaries ``1 + (j mod C)``: the most one client may put in a slot.

    The capacity check already reserves room for ``max_clients`` such values in every
    slot, so the canaries need no extra room. BFV: ``limits.bfv_slot_max``; CKKS:
    ``max_weight * max(clip_range, 1)`` (whole part).
    """
    if scheme == "bfv":
        return limits.bfv_slot_max
    return max(1, int(limits.max_weight * max(limits.clip_range, 1.0)))


def encrypt_public_model(
    ctx: HEContext, arrays: Mapping[str, np.ndarray], limits: DeclaredLimits
) -> EncryptedUpdate:
    """The server's encryption of a public model (the initial one), with weight 1."""
    return encrypt_model(ctx, arrays, 1, limits)


@dataclass
class LoadedUpdate:
    """A verified envelope with its chunks deserialized under the server's context."""

    envelope: Envelope
    vectors: list[Any]

    def to_envelope(self) -> Envelope:
        """Serialize the (possibly summed) chunks back into an envelope."""
        return replace(self.envelope, chunks=tuple(v.serialize() for v in self.vectors))


def load_update(
    ctx: HEContext, data: bytes | Envelope, layout: codec.Layout, limits: DeclaredLimits
) -> LoadedUpdate:
    """Parse and verify one client's upload; raises :class:`InvalidCiphertext` naming why."""
    envelope = data if isinstance(data, Envelope) else Envelope.from_bytes(data)
    _verify(ctx, envelope, layout, limits)
    if envelope.contributors != 1:
        raise InvalidCiphertext(
            f"an upload must hold one contribution, this one claims {envelope.contributors}"
        )
    return LoadedUpdate(envelope, _deserialize(ctx, envelope))


def sum_updates(updates: Sequence[LoadedUpdate]) -> LoadedUpdate:
    """The homomorphic sum of verified updates, accumulated into the first one (consumed).

    Ciphertext additions are the server's only arithmetic.
    """
    if not updates:
        raise HEConfigError("no updates to add")
    first = updates[0].envelope
    contributors = sum(u.envelope.contributors for u in updates)
    if contributors > first.limits.max_clients:
        raise InvalidCiphertext(
            f"{contributors} contributions exceed max_clients={first.limits.max_clients}: "
            "the sum could wrap"
        )
    total = updates[0].vectors
    for update in updates[1:]:
        for acc, vec in zip(total, update.vectors, strict=True):
            try:
                acc += vec
            except (ValueError, RuntimeError, TypeError) as err:
                raise InvalidCiphertext(f"ciphertexts cannot be added ({err})") from None
    return LoadedUpdate(replace(first, contributors=contributors), total)


def add_updates(updates: Sequence[LoadedUpdate]) -> Envelope:
    """The encrypted sum of verified updates, serialized (consumes ``updates``)."""
    return sum_updates(updates).to_envelope()


@dataclass(frozen=True)
class DecryptedModel:
    """The weighted mean a key holder recovers from an aggregate."""

    arrays: dict[str, np.ndarray]
    total_weight: int
    clipped: int
    contributors: int


def decrypt_model(
    ctx: HEContext,
    data: bytes | Envelope,
    *,
    layout: codec.Layout | None = None,
    limits: DeclaredLimits | None = None,
) -> DecryptedModel:
    """Decrypt an aggregate, check every canary and bound, and divide by the total weight.

    With ``layout`` or ``limits`` given, the envelope must carry exactly those.
    Raises :class:`KeyRoleError` for a public context and :class:`InvalidCiphertext`
    when any check fails (nothing decrypted is returned then).
    """
    ctx.require_secret()
    envelope = data if isinstance(data, Envelope) else Envelope.from_bytes(data)
    _verify(ctx, envelope, layout or envelope.layout, limits or envelope.limits)
    limits = envelope.limits
    ctx.check_limits(limits)
    k = envelope.contributors
    if not 1 <= k <= limits.max_clients:
        raise InvalidCiphertext(
            f"the envelope claims {k} contributions, outside [1, max_clients={limits.max_clients}]"
        )
    vectors = _deserialize(ctx, envelope)
    cycle = canary_cycle(ctx.scheme, limits)

    def expected_canaries(n_chunks: int) -> np.ndarray:
        return k * codec.canaries(n_chunks, cycle)

    if ctx.scheme == "bfv":
        assert ctx.plain_modulus is not None
        half = (ctx.plain_modulus - 1) // 2
        chunks = []
        for vec in vectors:
            raw = np.array(vec.decrypt(), dtype=np.int64)
            chunks.append(np.where(raw > half, raw - ctx.plain_modulus, raw))
        canaries, header, values = codec.unpack(chunks)
        bad = np.flatnonzero(canaries != expected_canaries(len(chunks)))
        weight, clipped = int(header[0]), int(header[1])
    else:
        chunks = [np.array(vec.decrypt(), dtype=np.float64) for vec in vectors]
        canaries, header, values = codec.unpack(chunks)
        bad = np.flatnonzero(
            np.abs(canaries - expected_canaries(len(chunks))) > _CKKS_INTEGER_TOLERANCE
        )
        weight, clipped = _ckks_integer(header[0]), _ckks_integer(header[1])
    if bad.size:
        raise InvalidCiphertext(
            f"canary check failed in {bad.size} of {len(canaries)} chunks (first: chunk "
            f"{int(bad[0])}): the data does not decrypt to {k} contributions, chunks in order, "
            "under this key (tampered, reordered, made under another key, or corrupted)"
        )
    if weight is None or not k <= weight <= k * limits.max_weight:
        raise InvalidCiphertext(
            f"the decrypted total weight is outside [{k}, {k * limits.max_weight}]: corrupted"
        )
    if clipped is None or not 0 <= clipped <= k * limits.max_weight:
        raise InvalidCiphertext("the decrypted clipped count is out of range: corrupted")
    if ctx.scheme == "bfv":
        if np.abs(values).max(initial=0) > k * limits.max_quantized:
            raise InvalidCiphertext("decrypted values exceed the declared range: corrupted")
        mean = values.astype(np.float64) / (2.0**limits.precision_bits * weight)
    else:
        if np.abs(values).max(initial=0) > k * limits.max_weight * limits.clip_range * 1.01 + 1:
            raise InvalidCiphertext("decrypted values exceed the declared range: corrupted")
        mean = values / weight
    return DecryptedModel(envelope.layout.unflatten(mean), weight, clipped, k)


def _ckks_integer(value: float) -> int | None:
    nearest = round(float(value))
    return nearest if abs(value - nearest) <= _CKKS_INTEGER_TOLERANCE else None


def _verify(
    ctx: HEContext, envelope: Envelope, layout: codec.Layout, limits: DeclaredLimits
) -> None:
    if envelope.fingerprint != ctx.fingerprint:
        raise InvalidCiphertext(
            f"made under another key (key {envelope.fingerprint.hex()[:16]}..., this context's "
            f"key is {ctx.fingerprint.hex()[:16]}...)"
        )
    if envelope.scheme != ctx.scheme:
        raise InvalidCiphertext(
            f"scheme {envelope.scheme!r} does not match the key's {ctx.scheme!r}"
        )
    if envelope.layout != layout:
        raise InvalidCiphertext(
            f"shape does not match the model: {_layout_difference(envelope.layout, layout)}"
        )
    if envelope.limits != limits:
        raise InvalidCiphertext(
            f"made under declared limits {envelope.limits.to_dict()}, expected {limits.to_dict()}"
        )
    expected = codec.chunk_lengths(layout.size, ctx.slots)
    if len(envelope.chunks) != len(expected):
        raise InvalidCiphertext(
            f"{len(envelope.chunks)} ciphertext chunks, the model needs {len(expected)}"
        )


def _deserialize(ctx: HEContext, envelope: Envelope) -> list[Any]:
    ts = tenseal()
    load = ts.bfv_vector_from if ctx.scheme == "bfv" else ts.ckks_vector_from
    expected = codec.chunk_lengths(envelope.layout.size, ctx.slots)
    vectors = []
    for index, (blob, length) in enumerate(zip(envelope.chunks, expected, strict=True)):
        try:
            vec = load(ctx.context, blob)
        except Exception:  # noqa: BLE001 - SEAL/protobuf raise assorted types on bad bytes
            raise InvalidCiphertext(
                f"chunk {index} is not a valid ciphertext for this key's parameters "
                "(tampered or truncated bytes)"
            ) from None
        if vec.size() != length:
            raise InvalidCiphertext(f"chunk {index} holds {vec.size()} slots, expected {length}")
        _check_fresh(ctx, vec, index)
        vectors.append(vec)
    return vectors


def _check_fresh(ctx: HEContext, vec: Any, index: int) -> None:
    """Refuse a chunk that parses but could not be added to a fresh encryption.

    Uploads and sums of uploads are one ciphertext of two polynomials at the key's data
    level (and, for CKKS, at the key's global scale); anything else (another scale,
    another level, a product not relinearised) would make the sum fail for everyone.
    """
    ciphertexts = vec.data.ciphertext()
    if len(ciphertexts) != 1:
        raise InvalidCiphertext(f"chunk {index} holds {len(ciphertexts)} ciphertexts, expected 1")
    ct = ciphertexts[0]
    if ct.size() != 2:
        raise InvalidCiphertext(
            f"chunk {index} has {ct.size()} polynomials, expected 2 (not a fresh encryption)"
        )
    if list(ct.parms_id()) != ctx.parms_id:
        raise InvalidCiphertext(
            f"chunk {index} is at another modulus level ({ct.coeff_modulus_size()} primes) "
            "than a fresh encryption under this key"
        )
    if ct.is_ntt_form() != (ctx.scheme == "ckks"):
        raise InvalidCiphertext(f"chunk {index} is not in the form of a {ctx.scheme} encryption")
    if ctx.scheme == "ckks" and float(ct.scale) != 2.0 ** (ctx.scale_bits or 0):
        scale = float(ct.scale)
        shown = f"2^{math.log2(scale):.4g}" if scale > 0 else f"{scale!r}"
        raise InvalidCiphertext(
            f"chunk {index} has CKKS scale {shown}, expected 2^{ctx.scale_bits} "
            "(the key's global scale)"
        )


def _layout_difference(got: codec.Layout, want: codec.Layout) -> str:
    got_map = dict(zip(got.names, zip(got.shapes, got.dtypes, strict=True), strict=True))
    want_map = dict(zip(want.names, zip(want.shapes, want.dtypes, strict=True), strict=True))
    missing = sorted(set(want_map) - set(got_map))
    extra = sorted(set(got_map) - set(want_map))
    wrong = sorted(k for k in set(got_map) & set(want_map) if got_map[k] != want_map[k])
    order = "" if missing or extra or got.names == want.names else ", arrays in another order"
    return f"missing {missing}, unexpected {extra}, wrong shape or dtype {wrong}{order}"
