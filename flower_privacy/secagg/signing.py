"""Client signing keys (Ed25519) for the consistency option.

A roster is the set of signing public keys the clients trust, provisioned offline
(``flower-privacy keys signing``). What a node signs is defined in
:mod:`flower_privacy.secagg.views` (its sealing key, and the round view in the
consistency stage); this module holds the keys and the Ed25519 operations only.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_KEY_BYTES = 32


def generate_signing_key() -> bytes:
    """A fresh Ed25519 private key (raw 32 bytes)."""
    return Ed25519PrivateKey.generate().private_bytes_raw()


def signing_public_key(private_key: bytes) -> bytes:
    """Raw 32-byte Ed25519 public key of ``private_key``."""
    return Ed25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def sign(private_key: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True only for a valid signature of ``message`` under ``public_key``."""
    if len(public_key) != SIGNING_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def write_private_key(path: Path, private_key: bytes) -> None:
    """Write a key as hex, readable by its owner only."""
    path = Path(path)
    path.write_text(private_key.hex() + "\n")
    path.chmod(0o600)


def read_private_key(path: Path) -> bytes:
    key = bytes.fromhex(Path(path).read_text().strip())
    if len(key) != SIGNING_KEY_BYTES:
        raise ValueError(f"{path}: a signing key is {SIGNING_KEY_BYTES} bytes, got {len(key)}")
    return key


def read_roster(path: Path) -> list[bytes]:
    """Trusted signing public keys, one hex key per line ('#' starts a comment)."""
    keys = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        key = bytes.fromhex(text)
        if len(key) != SIGNING_KEY_BYTES:
            raise ValueError(f"{path}:{number}: a public key is {SIGNING_KEY_BYTES} bytes")
        keys.append(key)
    if not keys:
        raise ValueError(f"{path}: the roster holds no keys")
    return keys


def write_signing_keys(directory: Path, count: int) -> tuple[list[Path], Path]:
    """Create ``count`` node signing keys and their roster in ``directory``.

    Returns the key files (``node-0.key``, ...; each readable by its owner only) and
    the roster (``roster.txt``: the public keys every node trusts). Give node ``i`` its
    key file and the roster, e.g. with ``--node-config "secagg-signing-key=... ..."``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, public = [], []
    for index in range(count):
        private = generate_signing_key()
        path = directory / f"node-{index}.key"
        write_private_key(path, private)
        paths.append(path)
        public.append(signing_public_key(private).hex())
    roster = directory / "roster.txt"
    roster.write_text(
        "# flower-privacy secure aggregation roster: trusted signing keys\n"
        + "\n".join(public)
        + "\n"
    )
    return paths, roster
