"""One entry point for privacy: ``make_private(strategy, config)`` and ``client_mods()``.

Server side::

    privacy = PrivacyConfig.from_run_config(context.run_config)
    strategy = make_private(FedAvg(...), privacy)
    strategy.start(grid, arrays, num_rounds, timeout=privacy.round_timeout)

Client side: ``ClientApp(mods=client_mods())``. This package's ``__init__`` imports no
server code, so that ClientApp processes stay light.
"""

from flower_privacy.private.client import REQUIRED, client_mods, required_mechanisms
from flower_privacy.private.config import RUN_CONFIG_KEYS, PrivacyConfig, config_snippet
from flower_privacy.private.matrix import (
    MECHANISMS,
    InvalidCompositionError,
    NotSupportedYetError,
)

__all__ = [
    "MECHANISMS",
    "REQUIRED",
    "RUN_CONFIG_KEYS",
    "InvalidCompositionError",
    "NotSupportedYetError",
    "PrivacyConfig",
    "client_mods",
    "config_snippet",
    "make_private",
    "required_mechanisms",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the server side imports torch-free flwr strategies
    if name == "make_private":
        from flower_privacy.private.server import make_private

        return make_private
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
