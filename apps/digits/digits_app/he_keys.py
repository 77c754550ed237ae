"""Encrypted FedAvg in the digits app: where keys live, the strategy, the client mod.

Deployment: generate keys with ``flower-privacy keys generate`` (a client-side party,
never the server operator), give the server ``he-server-context`` and each SuperNode
``--node-config "he-context='.../client.ctx'"``. Without ``he-server-context`` a
deployment fails before round 1; a SuperNode without ``he-context`` refuses.

Simulation only (the ServerApp runs on Flower's simulation grid, or the test grid, and
run config ``he-simulation-keys = true``, the default): with ``he-server-context``
empty the ServerApp plays the key dealer. It generates a key pair into a private folder
under the system's temp directory (``flower-privacy-<uid>/he-run-<run id>``, mode 0700,
outside the app folder, so never packed into a FAB), keeps only ``server.ctx`` for
itself, and clients of the same run (run config ``he-simulation-keys = true``) find
``client.ctx`` there. The folder is **not** removed at the end of the run: it holds the
encrypted final model (``final-model.fphe``) and the ``client.ctx`` that decrypts it;
delete it when done (the ServerApp logs its path).
"""

from __future__ import annotations

import os
import stat
import tempfile
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.common import log

from flower_privacy import he
from flower_privacy.wire import he as wire

if TYPE_CHECKING:  # server side only: ClientApp processes never import the strategies
    from flwr.serverapp.strategy import Strategy

    from flower_privacy.strategies import EncryptedFedAvg

FINAL_MODEL = "final-model.fphe"
SIMULATION_KEYS = "he-simulation-keys"
NO_SERVER_CONTEXT = (
    "he-server-context required (a client-side party must make the keys: flower-privacy "
    "keys generate --out keys/; then run config he-server-context='keys/server.ctx' and "
    "each node --node-config \"he-context='keys/client.ctx'\"); the ServerApp generates "
    "keys only in a simulation with run config he-simulation-keys = true"
)


def is_simulation(grid: object) -> bool:
    """Whether ``grid`` is Flower's simulation grid or flower-privacy's in-process test grid."""
    from flower_privacy import _flwr_compat as compat
    from flower_privacy.testing import InProcessGrid

    return isinstance(grid, InProcessGrid) or compat.is_simulation_grid(grid)


def simulation_keys_allowed(run_config: dict) -> bool:
    """Run config ``he-simulation-keys`` (a boolean; missing means false)."""
    value = run_config.get(SIMULATION_KEYS, False)
    if not isinstance(value, bool):
        raise he.HEConfigError(f"{SIMULATION_KEYS} must be true or false, got {value!r}")
    return value


def simulation_key_dir(run_id: int) -> Path:
    """The private folder of a simulated run's keys (created 0700, checked to be ours)."""
    parent = Path(tempfile.gettempdir()) / f"flower-privacy-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    info = parent.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"{parent} must be a directory owned by this user with mode 0700 (it holds keys)"
        )
    return parent / f"he-run-{run_id}"


def _limits(cfg: dict) -> he.DeclaredLimits:
    return he.DeclaredLimits(
        max_clients=int(cfg.get("he-max-clients", 100)),
        max_weight=int(cfg.get("he-max-weight", 1000)),
        clip_range=float(cfg.get("he-clip-range", 4.0)),
        precision_bits=int(cfg.get("he-precision-bits", 16)),
    )


def server_context(cfg: dict, run_id: int, *, simulation: bool = False) -> tuple[str, Path]:
    """``(server.ctx path, where the encrypted final model goes)`` for an ``he`` run.

    Without ``he-server-context`` it generates the keys, but only when ``simulation``
    (the caller saw a simulation grid) and run config ``he-simulation-keys`` is true;
    otherwise it raises :class:`~flower_privacy.he.HEConfigError`.
    """
    limits = _limits(cfg)
    path = str(cfg.get("he-server-context", ""))
    if path:
        return path, Path(path).with_name(FINAL_MODEL)
    if not (simulation and simulation_keys_allowed(cfg)):
        raise he.HEConfigError(NO_SERVER_CONTEXT)
    key_dir = simulation_key_dir(run_id)
    params = he.derive_parameters(str(cfg.get("he-preset", he.DEFAULT_PRESET)), limits)
    client_ctx, server_ctx = he.generate_keys(key_dir, params, overwrite=True)
    log(
        WARNING,
        "simulation only: the ServerApp generated %s keys in %s (clients read %s); "
        "the folder stays after the run (secret key and encrypted final model): "
        "delete it when done",
        params.scheme,
        key_dir,
        client_ctx.name,
    )
    return str(server_ctx), key_dir / FINAL_MODEL


def build_strategy(
    inner: Strategy, cfg: dict, run_id: int, *, simulation: bool = False
) -> EncryptedFedAvg:
    """``make_private(inner, "he")`` with the keys of :func:`server_context`."""
    import dataclasses

    from digits_app.privacy import privacy_config
    from flower_privacy import make_private

    path, save_path = server_context(cfg, run_id, simulation=simulation)
    config = privacy_config({**cfg, "privacy": "he"}, he_server_context=path)
    strategy = make_private(inner, dataclasses.replace(config, he_save_path=str(save_path)))
    log(
        INFO,
        "the encrypted final model is written to %s (decrypt with "
        "`flower-privacy he decrypt` and client.ctx)",
        save_path,
    )
    return strategy  # type: ignore[return-value]


def locate_client_context(context: Context) -> Path:
    """Node config ``he-context``, else run config ``he-context``, else (only with run
    config ``he-simulation-keys = true``) the simulation keys."""
    path = wire.configured_context_path(context)
    if path:
        return Path(path)
    if not simulation_keys_allowed(context.run_config):
        raise he.HEConfigError(
            "no secret context: give this node --node-config \"he-context='<path to "
            "client.ctx>'\" (made by flower-privacy keys generate); simulation keys are "
            f"used only with run config {SIMULATION_KEYS} = true"
        )
    return simulation_key_dir(context.run_id) / he.CLIENT_CONTEXT


def requires_encryption(context: Context) -> bool:
    """A run whose privacy names ``he`` never sends or accepts a plaintext model."""
    from digits_app.privacy import mechanisms

    return "he" in mechanisms(context.run_config)
