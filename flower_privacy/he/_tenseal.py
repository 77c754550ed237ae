"""TenSEAL, imported on first use (it is the optional ``he`` extra)."""

from __future__ import annotations

from types import ModuleType


def tenseal() -> ModuleType:
    """The ``tenseal`` module, or an ImportError that says how to install it."""
    try:
        import tenseal as ts
    except ImportError as err:  # pragma: no cover - the test env has it
        raise ImportError(
            "encrypted FedAvg needs TenSEAL: pip install 'flower-privacy[he]'"
        ) from err
    return ts
