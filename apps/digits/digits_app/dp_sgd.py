"""Sample-level DP-SGD for the digits app with Opacus (no Flower in here).

Each client trains with Opacus's ``PrivacyEngine``: per-sample gradients clipped to
``max_grad_norm`` (L2), Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` added to their sum, and batches drawn by Poisson
sampling (Opacus's ``DPDataLoader``, rate ``1 / ceil(n / batch_size)``), so the
accountant's amplification by subsampling holds. Neighbouring datasets differ in one
example of one client (sample-level DP, for that client's data).

The accountant is Opacus's RDP accountant (a conservative upper bound). Its history,
``(noise_multiplier, sample_rate, steps)`` tuples, is kept by the caller between rounds
(the client app stores it in ``context.state``), so the ε returned is cumulative over
every round the client has trained so far (Abadi et al. 2016, https://arxiv.org/abs/1607.00133;
Mironov 2017, https://arxiv.org/abs/1702.07476).

Randomness: Opacus's ``secure_mode`` needs torchcsprng, which has no build for current
torch (its last release, 0.2.1, targets torch 1.8). Instead, every call draws fresh
64-bit seeds from the OS CSPRNG (``os.urandom``) for two ``torch.Generator``s: one on the
model's device for the noise, one on the CPU for Poisson sampling. What that gives: the
noise and the batches are unpredictable to anyone without the seed, and never come from
torch's global generator (which is seeded with the run's public ``seed``). What it does
not give: torch's generators (Philox on CUDA, Mersenne Twister on the CPU) are not
cryptographically secure, so an observer who sees enough of their raw output could in
principle reconstruct the seed and the rest of the stream; and floating-point Gaussian
samplers have the known least-significant-bit weakness (Mironov 2012). Both are the
usual caveats of Opacus without ``secure_mode``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from digits_app.task import Net, Split, device

# Keys of the run config (``apps/digits/pyproject.toml``).
KEY_NOISE_MULTIPLIER = "dp-sgd-noise-multiplier"
KEY_MAX_GRAD_NORM = "dp-sgd-max-grad-norm"
KEY_DELTA = "dp-sgd-delta"
# Keys of the train reply's metrics.
METRIC_EPSILON = "dp-sgd-epsilon"
METRIC_DELTA = "dp-sgd-delta"
# Opacus's RDP accountant (an upper bound); its history travels as a flat ConfigRecord.
ACCOUNTANT_MECHANISM = "rdp"

# One step of history: (noise multiplier, sample rate, number of steps).
HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class DpSgdConfig:
    """DP-SGD parameters, validated at construction.

    Attributes
    ----------
    noise_multiplier : float
        Noise standard deviation over the clipping norm; > 0.
    max_grad_norm : float
        L2 bound each per-sample gradient is clipped to; > 0.
    delta : float
        The δ at which ε is reported; in (0, 1), and well below 1 / (examples per client).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        _check_positive(KEY_NOISE_MULTIPLIER, self.noise_multiplier)
        _check_positive(KEY_MAX_GRAD_NORM, self.max_grad_norm)
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"{KEY_DELTA} must be in (0, 1), got {self.delta}")

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, object]) -> DpSgdConfig:
        """Read and validate the ``dp-sgd-*`` keys of a run config."""
        values = {}
        for key in (KEY_NOISE_MULTIPLIER, KEY_MAX_GRAD_NORM, KEY_DELTA):
            if key not in cfg:
                raise ValueError(f"privacy 'dp-sgd' needs the run-config key {key!r}")
            try:
                values[key] = float(cfg[key])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {cfg[key]!r}") from None
        return cls(values[KEY_NOISE_MULTIPLIER], values[KEY_MAX_GRAD_NORM], values[KEY_DELTA])


def _check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class DpSgdResult:
    """What one call of :func:`train_dp_sgd` produced.

    Attributes
    ----------
    loss : float
        Mean training loss of the last epoch.
    epsilon : float
        Cumulative ε over ``history`` at the configured δ.
    history : tuple[HistoryEntry, ...]
        The accountant's whole history (earlier rounds and this one): pass it back in
        the next round.
    steps : int
        Noisy optimizer steps taken in this call.
    """

    loss: float
    epsilon: float
    history: tuple[HistoryEntry, ...]
    steps: int


def os_seed() -> int:
    """A 64-bit seed from the OS CSPRNG (``os.urandom``)."""
    return int.from_bytes(os.urandom(8), "little")


def check_opacus_compatible(net: nn.Module) -> None:
    """Raise ``ValueError`` if Opacus cannot compute per-sample gradients for ``net``.

    The model is not "fixed" (e.g. BatchNorm replaced by GroupNorm) here: the server
    and every client must share one architecture, so a fix belongs in ``Net`` itself.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"model is not compatible with Opacus DP-SGD: {errors}")


def epsilon_of(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε after ``history`` at ``delta``, as Opacus's RDP accountant computes it (0 if empty).

    The same arithmetic as ``RDPAccountant.get_epsilon`` (same orders, RDP of ``n`` steps =
    ``n`` x RDP of one step), with the one-step RDP cached per (noise multiplier, sample
    rate): Opacus recomputes it in pure Python on every call (~0.25 s), which would
    otherwise dominate a round of this small model.
    """
    from opacus.accountants.analysis import rdp as analysis

    if not history:
        return 0.0
    rdp = sum(np.asarray(_rdp_of_one_step(z, q)) * n for z, q, n in history)
    eps, _ = analysis.get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
    return float(eps)


def _rdp_orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_rdp_orders()
    )
    return tuple(float(v) for v in rdp)


def history_to_record(history: Sequence[HistoryEntry]) -> dict[str, list[float] | list[int] | str]:
    """The accountant's history as flat lists (the contents of a Flower ConfigRecord)."""
    return {
        "mechanism": ACCOUNTANT_MECHANISM,
        "noise-multipliers": [float(z) for z, _, _ in history],
        "sample-rates": [float(q) for _, q, _ in history],
        "steps": [int(n) for _, _, n in history],
    }


def history_from_record(record: Mapping[str, object]) -> tuple[HistoryEntry, ...]:
    """Inverse of :func:`history_to_record`; refuses another mechanism or ragged lists."""
    if record.get("mechanism") != ACCOUNTANT_MECHANISM:
        raise ValueError(
            f"stored accountant mechanism must be {ACCOUNTANT_MECHANISM!r}, "
            f"got {record.get('mechanism')!r}"
        )
    zs, qs, ns = (list(record[k]) for k in ("noise-multipliers", "sample-rates", "steps"))  # type: ignore[call-overload]
    if not len(zs) == len(qs) == len(ns):
        raise ValueError(f"stored accountant history is ragged: {len(zs)}, {len(qs)}, {len(ns)}")
    return tuple((float(z), float(q), int(n)) for z, q, n in zip(zs, qs, ns, strict=True))


def train_dp_sgd(
    net: Net,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    config: DpSgdConfig,
    history: Sequence[HistoryEntry] = (),
    seed: int | None = None,
) -> DpSgdResult:
    """Train ``net`` in place with DP-SGD; return the loss, cumulative ε and history.

    Parameters
    ----------
    net : Net
        The model; moved to :func:`~digits_app.task.device` (CUDA when present).
    data : Split
        This client's training data.
    epochs, batch_size, lr : int, int, float
        Local epochs, expected Poisson batch size, SGD learning rate (momentum 0.9).
    config : DpSgdConfig
        Noise multiplier, clipping norm and δ.
    history : Sequence[HistoryEntry]
        The accountant's history from this client's earlier rounds (empty at first).
    seed : int | None
        FOR REPRODUCIBLE TESTS ONLY. ``None`` (what the app always passes) seeds the
        noise and sampling generators from ``os.urandom``. A fixed seed makes the noise
        predictable, and then the reported ε protects nothing.

    Returns
    -------
    DpSgdResult
        ε is an upper bound (RDP) for sample-level (ε, δ)-DP of everything this client
        has released so far, valid only with ``seed=None``.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if epochs < 1 or batch_size < 1 or len(data) == 0:
        raise ValueError(
            f"need epochs >= 1, batch-size >= 1 and data, got {epochs}, {batch_size}, {len(data)}"
        )
    check_opacus_compatible(net)
    dev = device()
    net.to(dev).train()
    noise_seed, sampling_seed = (os_seed(), os_seed()) if seed is None else (seed, seed + 1)
    # Not the global generators: those are seeded with the run's public `seed`.
    noise_generator = torch.Generator(device=dev).manual_seed(noise_seed)
    sampling_generator = torch.Generator().manual_seed(sampling_seed)

    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    # make_private replaces this loader's sampler by Poisson sampling (DPDataLoader)
    # driven by this loader's generator.
    loader = DataLoader(dataset, batch_size=batch_size, generator=sampling_generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the module docstring says what we do instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT_MECHANISM)
    engine.accountant.load_state_dict({"history": list(history), "mechanism": ACCOUNTANT_MECHANISM})
    model, optimizer, private_loader = engine.make_private(
        module=net,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
    )
    try:
        with warnings.catch_warnings():
            # torch notes that the inputs need no gradient: Opacus's hooks need only the weights'.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            last, steps = _run_epochs(model, optimizer, private_loader, epochs, dev)
    finally:
        model.remove_hooks()
    new_history = tuple((float(z), float(q), int(n)) for z, q, n in engine.accountant.history)
    return DpSgdResult(
        loss=last,
        epsilon=epsilon_of(new_history, config.delta),
        history=new_history,
        steps=steps,
    )


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    dev: torch.device,
) -> tuple[float, int]:
    """Run ``epochs`` passes of ``loader``; return (last epoch's mean loss, steps taken)."""
    loss_fn = nn.CrossEntropyLoss()
    last, steps = 0.0, 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            optimizer.zero_grad()
            # An empty Poisson batch still takes a (pure-noise) step: skipping it would
            # make the step count depend on the data.
            loss = loss_fn(model(xb), yb) if len(yb) else model(xb).sum()
            loss.backward()
            optimizer.step()
            steps += 1
            if len(yb):
                total += loss.item() * len(yb)
                count += len(yb)
        last = total / max(count, 1)
    return last, steps
