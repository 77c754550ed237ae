"""The attack lab behind ``flower-privacy audit``: what an attacker learns from a
configuration.

The attack cores (:mod:`.inversion`, :mod:`.imprint`, :mod:`.metrics`,
:mod:`.empirical_eps`) know nothing of Flower: numpy arrays and torch models in and
out. :mod:`.runner` runs an app in-process and extracts each party's view;
:mod:`.attacks` plays the attackers on those views; :mod:`.report` writes the page.
"""

from typing import Any

__all__ = ["AuditHook", "LocalTraining", "load_hook"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports this package for every command; torch loads only for audit.
    if name in __all__:
        from flower_privacy.audit import hook

        return getattr(hook, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
