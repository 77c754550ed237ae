"""Data, model and training loops of the digits app (no Flower in here)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SKLEARN_DIGITS = "sklearn-digits"
PARTITIONERS = ("iid", "dirichlet")
# Fraction of the data the server keeps for central evaluation (never partitioned).
SERVER_TEST_FRACTION = 0.2


class DatasetUnavailableError(RuntimeError):
    """A named dataset cannot be loaded (typically: offline and not cached)."""


@dataclass(frozen=True)
class Split:
    """Features as float32 rows and integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Net(nn.Module):
    """A small MLP: enough for 8x8 digits (~97% centrally)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def train(net: Net, data: Split, *, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    """Local SGD; returns the mean training loss of the last epoch."""
    dev = device()
    net.to(dev).train()
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x).to(dev)
    y = torch.from_numpy(data.y).to(dev)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(dev)
        total, count = 0.0, 0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


@torch.no_grad()
def evaluate(net: Net, data: Split) -> tuple[float, float]:
    """Return (mean loss, accuracy) on ``data``."""
    dev = device()
    net.to(dev).eval()
    logits = net(torch.from_numpy(data.x).to(dev))
    y = torch.from_numpy(data.y).to(dev)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


# -- data ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _sklearn_digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    # A fixed split: which rows the server holds out is not a privacy decision.
    order = np.random.default_rng(0).permutation(len(y))
    n_test = int(len(y) * SERVER_TEST_FRACTION)
    test, rest = order[:n_test], order[n_test:]
    return Split(x[rest], y[rest]), Split(x[test], y[test])


def _numpy_split(ds) -> Split:
    return Split(np.asarray(ds["x"], dtype=np.float32), np.asarray(ds["label"], dtype=np.int64))


def _hf_to_split(ds) -> Split:
    columns = ds.column_names
    image_col = next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in columns), None)
    if image_col is None or label_col is None:
        raise ValueError(f"dataset needs an image and a label column, found {columns}")
    x = np.stack([np.asarray(img, dtype=np.float32).reshape(-1) / 255.0 for img in ds[image_col]])
    return Split(x.astype(np.float32), np.asarray(ds[label_col], dtype=np.int64))


def _make_partitioner(partitioner: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioner == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet-alpha must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=10,
            self_balancing=False,
            seed=seed,
        )
    raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {partitioner!r}")


def _unavailable(name: str, err: Exception) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"dataset {name!r} could not be loaded ({type(err).__name__}: {err}). Downloadable "
        "datasets need network access or a copy in the Hugging Face cache (HF_HOME); "
        f"offline, use dataset={SKLEARN_DIGITS!r}, which ships with scikit-learn."
    )


@functools.lru_cache(maxsize=16)
def load_partition(
    dataset: str, partition_id: int, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> tuple[Split, Split]:
    """One client's (train, test) data: its partition split 80/20."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    part = _make_partitioner(partitioner, num_partitions, alpha, seed)
    if dataset == SKLEARN_DIGITS:
        from datasets import Dataset

        train_split, _ = _sklearn_digits()
        part.dataset = Dataset.from_dict({"x": train_split.x, "label": train_split.y})
        local = part.load_partition(partition_id).with_format("numpy")
        split = local.train_test_split(test_size=0.2, seed=seed)
        return _numpy_split(split["train"]), _numpy_split(split["test"])
    from flwr_datasets import FederatedDataset

    try:
        fds = FederatedDataset(dataset=dataset, partitioners={"train": part})
        local = fds.load_partition(partition_id)
    except Exception as err:
        raise _unavailable(dataset, err) from err
    split = local.train_test_split(test_size=0.2, seed=seed)
    return _hf_to_split(split["train"]), _hf_to_split(split["test"])


@functools.lru_cache(maxsize=4)
def load_server_test(dataset: str) -> Split:
    """The held-out data the server evaluates on (when it may see the model)."""
    if dataset == SKLEARN_DIGITS:
        return _sklearn_digits()[1]
    try:
        from datasets import load_dataset

        return _hf_to_split(load_dataset(dataset, split="test"))
    except Exception as err:
        raise _unavailable(dataset, err) from err


def model_shape(dataset: str) -> tuple[int, int]:
    """(input features, classes) of ``dataset``."""
    test = load_server_test(dataset)
    return test.x.shape[1], int(test.y.max()) + 1
