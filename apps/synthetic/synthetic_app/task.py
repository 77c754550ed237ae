"""Training mode of the synthetic app: a small torch MLP on data generated per client.

Every client draws its own examples from a generator seeded by (run seed, partition
id), labelled by one fixed random "teacher" network seeded by the run seed alone, so
the federation learns one shared task and nothing is downloaded. With the defaults
(512 examples, 13 epochs, batch 32, an 85k-parameter MLP) one client's training takes
about 0.2 s on one CPU core.

torch is imported only here: the fixed-update mode and the secure aggregation stages
never import it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

INPUTS, HIDDEN, CLASSES = 64, 256, 10
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings, read from the run config."""

    examples: int
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    device: str

    @classmethod
    def from_run_config(cls, cfg: dict) -> TrainConfig:
        """The settings of ``cfg``; a bad value raises ValueError naming its key."""
        config = cls(
            examples=int(cfg["train-examples"]),
            epochs=int(cfg["local-epochs"]),
            batch_size=int(cfg["batch-size"]),
            learning_rate=float(cfg["learning-rate"]),
            seed=int(cfg["seed"]),
            device=str(cfg["device"]),
        )
        for key, value in (
            ("train-examples", config.examples),
            ("local-epochs", config.epochs),
            ("batch-size", config.batch_size),
        ):
            if value < 1:
                raise ValueError(f"run config {key} must be >= 1, got {value}")
        if not config.learning_rate > 0:
            raise ValueError(f"run config learning-rate must be > 0, got {config.learning_rate}")
        if config.device not in DEVICES:
            raise ValueError(f"run config device must be one of {DEVICES}, got {config.device!r}")
        return config


def make_model(seed: int) -> nn.Module:
    """The MLP every node trains (64 -> 256 -> 256 -> 10), initialised from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Linear(INPUTS, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA if present, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run config device='cuda' but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def client_data(seed: int, partition_id: int, examples: int) -> tuple[np.ndarray, np.ndarray]:
    """``examples`` inputs and labels of one partition (deterministic in both seeds)."""
    rng = np.random.default_rng([seed, partition_id])
    # Partitions differ in their input distribution (a per-client shift), not the task.
    shift = rng.normal(0.0, 0.5, INPUTS)
    x = (rng.standard_normal((examples, INPUTS)) + shift).astype(np.float32)
    teacher = np.random.default_rng([seed, 2**31]).standard_normal((INPUTS, CLASSES))
    y = (x @ teacher).argmax(axis=1).astype(np.int64)
    return x, y


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig, seed: int) -> float:
    """SGD on (x, y) for ``config.epochs`` epochs; returns the last epoch's mean loss."""
    device = pick_device(config.device)
    model.to(device)
    inputs, labels = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    loss_sum = 0.0
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        loss_sum, batches = 0.0, 0
        for start in range(0, len(labels), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            loss_sum, batches = loss_sum + float(loss.detach()), batches + 1
        loss_sum /= batches
    model.to("cpu")
    return loss_sum


def solo_seconds(config: TrainConfig, repeats: int = 5) -> float:
    """Median seconds of one client's training alone on one core (after a warm-up).

    What a client's compute costs without the simulation around it: the Ray figures
    are read against it.
    """
    torch.set_num_threads(1)
    x, y = client_data(config.seed, 0, config.examples)
    model = make_model(config.seed)
    train(model, x, y, config, seed=0)  # warm-up: first-call allocations
    seconds = []
    for repeat in range(repeats):
        started = time.perf_counter()
        train(model, x, y, config, seed=repeat + 1)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)
