"""Key generation, loading and fingerprints of TenSEAL contexts.

``generate_keys`` writes ``client.ctx`` (the secret context, mode 0600: every client
holds it, the server never does) and ``server.ctx`` (parameters and the public key only:
no secret key, no relinearisation or Galois keys, which add-only FedAvg never needs).
SEAL draws its keys from the OS entropy source.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from flower_privacy.he._tenseal import tenseal
from flower_privacy.he.errors import HEConfigError, KeyRoleError
from flower_privacy.he.presets import DeclaredLimits, HEParameters, check_capacity

CLIENT_CONTEXT = "client.ctx"
SERVER_CONTEXT = "server.ctx"
_FINGERPRINT_DOMAIN = b"flower-privacy/he/public-key/v1\x00"


class HEContext:
    """A TenSEAL context with its role, its real parameters and its key fingerprint.

    Parameters
    ----------
    context : tenseal.Context
        A context holding at least a public key.
    """

    def __init__(self, context: Any) -> None:
        if not context.has_public_key():
            raise KeyRoleError("the TenSEAL context holds no public key")
        self.context = context
        seal = context.seal_context().data
        data = seal.first_context_data()
        scheme = str(data.parms().scheme()).rsplit(".", 1)[-1].lower()
        if scheme not in ("bfv", "ckks"):
            raise HEConfigError(f"scheme must be BFV or CKKS, got {scheme!r}")
        self.scheme = scheme
        self.poly_modulus_degree = int(data.parms().poly_modulus_degree())
        # Fresh ciphertexts live at this level (checked when loading them).
        self.parms_id = list(seal.first_parms_id())
        # The product of the data primes (ciphertexts live at this level). TenSEAL returns
        # only its lowest 64-bit word; beyond 64 bits use the bit count's lower bound.
        bits = int(data.total_coeff_modulus_bit_count())
        self.data_modulus = int(data.total_coeff_modulus()) if bits <= 64 else 2 ** (bits - 1)
        self.plain_modulus = (
            2 * int(data.plain_upper_half_threshold()) - 1 if scheme == "bfv" else None
        )
        self.scale_bits = None
        if scheme == "ckks":
            scale = float(context.global_scale)
            if not (
                scale > 1 and float(scale).is_integer() and (int(scale) & (int(scale) - 1)) == 0
            ):
                raise HEConfigError(f"CKKS global scale must be a power of two, got {scale!r}")
            self.scale_bits = int(scale).bit_length() - 1
        self.public_bytes = context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        self.fingerprint = hashlib.sha256(_FINGERPRINT_DOMAIN + self.public_bytes).digest()

    @property
    def is_private(self) -> bool:
        """Whether this context holds the secret key."""
        return bool(self.context.is_private())

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        n = self.poly_modulus_degree
        return n if self.scheme == "bfv" else n // 2

    def check_limits(self, limits: DeclaredLimits) -> None:
        """Raise :class:`CapacityError` unless ``limits`` fit this context's real moduli."""
        params = HEParameters(
            self.scheme,
            self.poly_modulus_degree,
            (),
            plain_modulus=self.plain_modulus,
            scale_bits=self.scale_bits,
        )
        check_capacity(params, limits, self.data_modulus)

    @classmethod
    def from_bytes(cls, data: bytes) -> HEContext:
        """Load a serialized TenSEAL context."""
        try:
            return cls(tenseal().context_from(data))
        except (ValueError, RuntimeError, TypeError) as err:
            raise HEConfigError(f"not a TenSEAL context ({type(err).__name__})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HEContext:
        """Load a context file, naming the file when it cannot be read."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise HEConfigError(f"cannot read the context file {path}: {err.strerror}") from None
        try:
            return cls.from_bytes(data)
        except HEConfigError as err:
            raise HEConfigError(f"{path}: {err}") from None

    def require_public_only(self) -> HEContext:
        """Return self; raise :class:`KeyRoleError` if it holds more than the public key.

        The secret key is refused, and so are relinearisation and Galois keys: add-only
        FedAvg never needs them, and ``server.ctx`` from :func:`generate_keys` has none.
        """
        if self.is_private:
            raise KeyRoleError(
                "this context holds the secret key: the server must get server.ctx "
                "(public key only), never client.ctx"
            )
        extra = [
            name
            for name, present in (
                ("relinearisation", self.context.has_relin_keys()),
                ("Galois", self.context.has_galois_keys()),
            )
            if present
        ]
        if extra:
            raise KeyRoleError(
                f"this context holds {' and '.join(extra)} keys: the server must get server.ctx "
                "as `flower-privacy keys generate` writes it (public key only)"
            )
        return self

    def require_secret(self) -> HEContext:
        """Return self; raise :class:`KeyRoleError` unless it holds the secret key."""
        if not self.is_private:
            raise KeyRoleError(
                "this context holds no secret key and cannot decrypt: use client.ctx"
            )
        return self


def make_context(params: HEParameters) -> Any:
    """A fresh TenSEAL context (with a new key pair) for ``params``."""
    ts = tenseal()
    try:
        if params.scheme == "bfv":
            context = ts.context(
                ts.SCHEME_TYPE.BFV,
                poly_modulus_degree=params.poly_modulus_degree,
                plain_modulus=params.plain_modulus,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            )
        else:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            )
            context.global_scale = 2.0**params.scale_bits
    except ValueError as err:
        raise HEConfigError(f"SEAL refused the parameters {params}: {err}") from None
    return context


def generate_keys(
    out_dir: str | os.PathLike[str], params: HEParameters, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``client.ctx`` (secret, 0600) and ``server.ctx`` (public) into ``out_dir``.

    ``out_dir`` is created with mode 0700 if missing. Existing key files are refused
    unless ``overwrite``. Returns ``(client_path, server_path)``.
    """
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    client_path, server_path = out / CLIENT_CONTEXT, out / SERVER_CONTEXT
    if not overwrite:
        existing = [str(p) for p in (client_path, server_path) if p.exists()]
        if existing:
            raise HEConfigError(f"key files exist already: {existing} (pass overwrite)")
    context = make_context(params)
    secret = context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    write_private_file(client_path, secret)
    write_private_file(server_path, public, mode=0o644)
    return client_path, server_path


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically; the file has ``mode`` from its first byte (no umask race)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
