"""What the audit needs to know about a torch app, and how it finds it.

An app opts in with one table in its ``pyproject.toml``::

    [tool.flower-privacy]
    audit-hook = "my_app.audit_hook:hook"

naming a function that takes no argument and returns an :class:`AuditHook`. The audit
plays the app's own ClientApp and server strategy; it needs the model, the loss and the
clients' data only to attack (and to score attacks against the true inputs, which the
attackers never see).
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Strategy
from torch import nn

HOOK_KEY = "audit-hook"


@dataclass(frozen=True)
class LocalTraining:
    """A client's local training, as the attacker models it."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0


@dataclass(frozen=True)
class AuditHook:
    """An app's hook for ``flower-privacy audit``.

    Attributes
    ----------
    client_app : ClientApp
        The app's ClientApp, as every node runs it.
    client_mods : Sequence
        The mods of ``client_app`` (canary clients run the same ones).
    strategy : Callable[[UserConfig, int], Strategy]
        The server's strategy for a run config and a federation of that many nodes
        (as the ServerApp builds it, on a simulation grid; the audit may add canary
        nodes); called once per federation, it may seed global state.
    model : Callable[[UserConfig], nn.Module]
        A fresh initial model for a run config.
    loss : Callable[[Tensor, Tensor], Tensor]
        The training loss of (logits, labels).
    input_shape, image_shape : tuple[int, ...]
        One input as the model takes it, and as an image (height, width) for pictures.
    num_classes : int
    client_data : Callable[[int, int, UserConfig], tuple[ndarray, ndarray]]
        (partition id, number of partitions, run config) -> the training inputs and
        labels that node trains on.
    public_data : Callable[[UserConfig], ndarray]
        Inputs of the same kind the server holds (a malicious server calibrates its
        crafted model on them).
    local_training : Callable[[UserConfig], LocalTraining]
    num_nodes : Callable[[UserConfig], int]
        Federation size for a run config.
    default_config : UserConfig
        The app's run config (``[tool.flwr.app.config]``).
    configs : Mapping[str, UserConfig]
        Privacy configuration name -> run-config overrides that select it.
    fixed_updates : Callable[[UserConfig], bool]
        Whether, for a run config, every node uploads the same update in every round
        (a test app). Then a client's true update is well defined and the audit scores
        the differencing attacker's per-client estimates against it (the audit checks
        the claim on a plain run and fails if it does not hold).
    """

    client_app: ClientApp
    client_mods: Sequence
    strategy: Callable[[UserConfig, int], Strategy]
    model: Callable[[UserConfig], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    input_shape: tuple[int, ...]
    image_shape: tuple[int, int]
    num_classes: int
    client_data: Callable[[int, int, UserConfig], tuple[np.ndarray, np.ndarray]]
    public_data: Callable[[UserConfig], np.ndarray]
    local_training: Callable[[UserConfig], LocalTraining]
    num_nodes: Callable[[UserConfig], int]
    default_config: UserConfig = field(default_factory=dict)
    configs: Mapping[str, UserConfig] = field(default_factory=dict)
    fixed_updates: Callable[[UserConfig], bool] = field(default=lambda cfg: False)

    def config(self, name: str, overrides: UserConfig | None = None) -> UserConfig:
        """The app's run config with configuration ``name`` and ``overrides`` applied."""
        if name not in self.configs:
            raise ValueError(f"unknown configuration {name!r}; this app has {sorted(self.configs)}")
        return {**self.default_config, **self.configs[name], **(overrides or {})}


class HookNotFoundError(RuntimeError):
    """The app directory has no usable audit hook."""


def load_hook(app_dir: Path) -> AuditHook:
    """Import the hook named in ``APP_DIR/pyproject.toml`` (the app joins ``sys.path``)."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise HookNotFoundError(f"{app_dir} has no pyproject.toml: not a Flower app directory")
    meta = tomllib.loads(pyproject.read_text())
    spec = meta.get("tool", {}).get("flower-privacy", {}).get(HOOK_KEY)
    if not spec or ":" not in str(spec):
        raise HookNotFoundError(
            f'{pyproject} has no [tool.flower-privacy] {HOOK_KEY} = "module:function" '
            "(see the README, 'Audit your configuration')"
        )
    module_name, function = str(spec).split(":", 1)
    root = str(Path(app_dir).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    hook = getattr(importlib.import_module(module_name), function)()
    if not isinstance(hook, AuditHook):
        raise HookNotFoundError(f"{spec} returned {type(hook).__name__}, expected AuditHook")
    return hook
