"""Gradient inversion: what an observer of one model update learns about its inputs.

An *update* is a mapping parameter name -> (model after - model before), as a client
uploads it; after several local steps it is attacked as a pseudo-gradient (its
negative, up to the learning rate).

- :func:`analytic_first_layer`: Phong et al., "Privacy-preserving deep learning via
  additively homomorphic encryption" (2017/2018). For a fully connected first layer
  ``y = W x + b``, ``dL/dW_i = (dL/dy_i) x`` and ``dL/db_i = dL/dy_i``: every row with a
  non-zero bias gradient gives ``x = dW_i / db_i`` exactly for one input; for a batch, a
  mix of the inputs that activate that neuron. One SGD step keeps the ratio.
- :func:`inverting_gradients`: Geiping et al., "Inverting Gradients - How easy is it
  to break privacy in federated learning?" (NeurIPS 2020): optimise dummy inputs so
  that their gradient points the same way as the observed one (cosine distance) plus
  total variation, with Adam, from several random restarts; labels known.
- :func:`dlg`: Zhu et al., "Deep Leakage from Gradients" (NeurIPS 2019): L-BFGS on dummy
  inputs and soft labels, squared gradient distance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

Update = Mapping[str, np.ndarray]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def first_linear(model: nn.Module) -> tuple[str, str]:
    """Names of the weight and bias of ``model``'s first ``nn.Linear`` (with a bias)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module.bias is None:
                raise ValueError(f"the first linear layer {name!r} has no bias: no analytic attack")
            prefix = f"{name}." if name else ""
            return f"{prefix}weight", f"{prefix}bias"
    raise ValueError(f"{type(model).__name__} has no nn.Linear layer")


def analytic_first_layer(
    update: Update, weight: str, bias: str, rel_tol: float = 1e-4
) -> np.ndarray:
    """One candidate input per first-layer neuron with a non-negligible bias update."""
    dw = np.asarray(update[weight], np.float64)
    db = np.asarray(update[bias], np.float64).reshape(-1)
    if dw.ndim != 2 or dw.shape[0] != db.shape[0]:
        raise ValueError(f"{weight!r} {dw.shape} and {bias!r} {db.shape} are not one linear layer")
    scale = np.max(np.abs(db)) if db.size else 0.0
    rows = np.flatnonzero(np.abs(db) > rel_tol * scale) if scale > 0 else np.zeros(0, int)
    return dw[rows] / db[rows, None]


@dataclass(frozen=True)
class InversionSettings:
    """Optimisation budget of the iterative attacks (Geiping et al. use far more)."""

    iterations: int = 300
    restarts: int = 2
    learning_rate: float = 0.1
    tv_weight: float = 1e-2
    seed: int = 0


def _flat_target(model: nn.Module, update: Update) -> list[torch.Tensor]:
    # The pseudo-gradient: the update points against the gradient.
    return [
        -torch.as_tensor(np.asarray(update[n]), dtype=torch.float32)
        for n, _ in model.named_parameters()
    ]


def _gradients(model, params, x, y, loss_fn, create_graph=True):  # noqa: ANN001, ANN202
    loss = loss_fn(functional_call(model, params, (x,)), y)
    return torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)


def _tv(x: torch.Tensor, image_shape: tuple[int, ...]) -> torch.Tensor:
    if len(image_shape) < 2:
        return x.new_zeros(())
    img = x.reshape(len(x), *image_shape[-2:])
    return (img[:, 1:, :] - img[:, :-1, :]).abs().mean() + (
        img[:, :, 1:] - img[:, :, :-1]
    ).abs().mean()


def inverting_gradients(
    model: nn.Module,
    update: Update,
    labels: np.ndarray,
    input_shape: tuple[int, ...],
    loss_fn: LossFn,
    settings: InversionSettings = InversionSettings(),
    image_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Reconstruct ``len(labels)`` inputs in [0, 1] from ``update`` (cosine + TV, Adam)."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    target = _flat_target(model, update)
    target_norm = torch.sqrt(sum((t * t).sum() for t in target))
    y = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(settings.seed)
    best, best_loss = None, float("inf")
    for _ in range(settings.restarts):
        x = torch.rand((len(y), *input_shape), generator=generator).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.learning_rate)
        for _ in range(settings.iterations):
            optimizer.zero_grad()
            grads = _gradients(model, params, x, y, loss_fn)
            dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
            norm = torch.sqrt(sum((g * g).sum() for g in grads)) + 1e-12
            loss = (
                1
                - dot / (norm * target_norm)
                + settings.tv_weight * _tv(x, image_shape or input_shape)
            )
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        if loss.item() < best_loss:
            best, best_loss = x.detach().clone(), loss.item()
    assert best is not None
    return best.reshape(len(y), -1).numpy()


def dlg(
    model: nn.Module,
    update: Update,
    batch_size: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    learning_rate: float,
    iterations: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Reconstruct ``batch_size`` inputs by matching the gradient (L-BFGS, soft labels).

    ``learning_rate``: the client's, to turn a one-step update back into a gradient
    (DLG matches magnitudes, unlike the cosine of Inverting Gradients).
    """
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    target = [t / learning_rate for t in _flat_target(model, update)]
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size, *input_shape), generator=generator).requires_grad_(True)
    soft = torch.randn((batch_size, num_classes), generator=generator).requires_grad_(True)
    optimizer = torch.optim.LBFGS([x, soft], lr=1.0, max_iter=20, history_size=20)

    def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.mean(torch.sum(-torch.softmax(labels, -1) * torch.log_softmax(logits, -1), -1))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        grads = _gradients(model, params, x, soft, soft_cross_entropy)
        loss = sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
        loss.backward()
        return loss

    for _ in range(max(1, iterations // 20)):
        loss = optimizer.step(closure)
        if not torch.isfinite(loss):
            break
    return x.detach().reshape(batch_size, -1).clamp(0, 1).numpy()
