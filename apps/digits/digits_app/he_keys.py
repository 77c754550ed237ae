"""Encrypted FedAvg in the digits app: where keys live, the strategy, the client mod.

With ``he-server-context`` empty (the default, for simulation), the ServerApp plays
the key dealer: it generates a key pair into a private folder under the system's temp
directory (``flower-privacy-<uid>/he-run-<run id>``, mode 0700, outside the app
folder, so never packed into a FAB), keeps only ``server.ctx`` for itself, and
clients of the same run find ``client.ctx`` there. In a deployment, generate keys
with ``flower-privacy keys generate`` and give the server ``he-server-context`` and
each SuperNode ``--node-config "he-context='.../client.ctx'"``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from flower_privacy import he
from flower_privacy.mods import EncryptionMod
from flower_privacy.strategies import EncryptedFedAvg

FINAL_MODEL = "final-model.fphe"


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


def build_strategy(inner: Strategy, cfg: dict, run_id: int) -> EncryptedFedAvg:
    """``EncryptedFedAvg`` over ``inner``; in simulation it first generates the keys."""
    limits = _limits(cfg)
    server_context = str(cfg.get("he-server-context", ""))
    if server_context:
        save_path = Path(server_context).with_name(FINAL_MODEL)
    else:
        key_dir = simulation_key_dir(run_id)
        params = he.derive_parameters(str(cfg.get("he-preset", he.DEFAULT_PRESET)), limits)
        client_ctx, server_ctx = he.generate_keys(key_dir, params, overwrite=True)
        log(
            INFO,
            "simulation: generated %s keys in %s (clients read %s)",
            params.scheme,
            key_dir,
            client_ctx.name,
        )
        server_context, save_path = str(server_ctx), key_dir / FINAL_MODEL
    strategy = EncryptedFedAvg(
        inner,
        server_context=server_context,
        max_clients=limits.max_clients,
        max_weight=limits.max_weight,
        clip_range=limits.clip_range,
        precision_bits=limits.precision_bits,
        save_path=save_path,
    )
    log(
        INFO,
        "the encrypted final model is written to %s (decrypt with "
        "`flower-privacy he decrypt` and client.ctx)",
        save_path,
    )
    return strategy


def locate_client_context(context: Context) -> Path:
    """Node config ``he-context``, else run config ``he-context``, else the simulation keys."""
    path = context.node_config.get("he-context") or context.run_config.get("he-context")
    if path:
        return Path(str(path))
    return simulation_key_dir(context.run_id) / he.CLIENT_CONTEXT


encryption_mod = EncryptionMod(locate_client_context)
"""The digits app's encryption mod (passes every non-HE message through)."""
