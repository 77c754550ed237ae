"""The imprint attack of Fowl et al., "Robbing the Fed: Directly Obtaining Private Data
in Federated Learning with Modified Models" (ICLR 2022).

A malicious server sends a model whose first linear layer (k neurons, then a ReLU) is
an *imprint module*: every row is one measurement direction ``m`` and neuron ``i``'s
bias is ``-c_i`` for increasing thresholds ``c_1 < ... < c_k``, so neuron ``i`` fires
for exactly the inputs with ``m . x > c_i``. Every column of the next linear layer is
set equal, so each input back-propagates the same value into every firing neuron.
Then neuron ``i``'s weight gradient is the sum of ``a_j x_j`` over the inputs above
``c_i`` and its bias gradient the sum of ``a_j``: for a bin ``(c_i, c_{i+1}]`` holding
one input, ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})`` *is* that input, however many
other inputs the update (or a secure-aggregation sum of updates) also contains.

The thresholds are quantiles of ``m . x`` on public data of the same kind (the
server's own held-out set), placed in the upper tail so that each bin holds about one
of the ``expected_inputs`` inputs of the round (the paper's bins hold 1/k of the mass
each; with more inputs than bins, the tail is where single inputs stay alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm


@dataclass(frozen=True)
class Imprint:
    """The crafted first layer: names, measurement and thresholds (ascending)."""

    weight: str
    bias: str
    measurement: np.ndarray
    thresholds: np.ndarray

    def recover(self, update: Mapping[str, np.ndarray], rel_tol: float = 1e-3) -> np.ndarray:
        """Candidate inputs, one per bin whose bias update is not negligible."""
        dw = np.asarray(update[self.weight], np.float64)
        db = np.asarray(update[self.bias], np.float64).reshape(-1)
        # Neurons are stored in threshold order; a bin is a neuron minus the next one.
        bin_w = np.concatenate([dw[:-1] - dw[1:], dw[-1:]])
        bin_b = np.concatenate([db[:-1] - db[1:], db[-1:]])
        scale = np.max(np.abs(bin_b)) if bin_b.size else 0.0
        rows = np.flatnonzero(np.abs(bin_b) > rel_tol * scale) if scale > 0 else np.zeros(0, int)
        return bin_w[rows] / bin_b[rows, None]


def craft(
    state: Mapping[str, np.ndarray],
    weight: str,
    bias: str,
    next_weight: str,
    public_inputs: np.ndarray,
    expected_inputs: int,
    seed: int = 0,
    gain: float = 1.0,
) -> tuple[dict[str, np.ndarray], Imprint]:
    """The malicious model: ``state`` with an imprint first layer; and how to read it.

    ``next_weight``: the weight of the linear layer after the first ReLU (its columns
    are made equal). ``expected_inputs``: how many inputs the attacked update sums.
    ``gain``: scale of that shared column; a larger back-propagated value lifts each
    input's imprint above the quantisation of secure aggregation.
    """
    if expected_inputs < 1:
        raise ValueError(f"expected_inputs must be >= 1, got {expected_inputs}")
    rng = np.random.default_rng(seed)
    w = np.asarray(state[weight])
    neurons, features = w.shape
    if np.asarray(state[next_weight]).shape[1] != neurons:
        raise ValueError(f"{next_weight!r} does not follow {weight!r} ({neurons} neurons)")
    public = np.asarray(public_inputs, np.float64).reshape(len(public_inputs), -1)
    if public.shape[1] != features:
        raise ValueError(f"public inputs have {public.shape[1]} features, the layer {features}")
    measurement = rng.standard_normal(features)
    measurement /= np.linalg.norm(measurement)
    projections = public @ measurement
    # Tail mass per bin ~ 1/expected_inputs, but never beyond the whole distribution.
    mass = 1.0 / max(expected_inputs, neurons)
    levels = 1.0 - mass * (np.arange(neurons, 0, -1) - 0.5)  # inside (0, 1)
    # A Gaussian fitted to the public projections (as the paper does): its tail
    # quantiles are smooth where a few hundred public samples are too sparse.
    thresholds = norm.ppf(levels, loc=projections.mean(), scale=projections.std(ddof=1))
    crafted = {k: np.array(v, copy=True) for k, v in state.items()}
    crafted[weight] = np.tile(measurement, (neurons, 1)).astype(w.dtype)
    crafted[bias] = (-thresholds).astype(w.dtype)
    next_w = np.asarray(state[next_weight])
    column = gain * rng.standard_normal(next_w.shape[0])
    crafted[next_weight] = np.tile(column[:, None], (1, neurons)).astype(next_w.dtype)
    return crafted, Imprint(weight, bias, measurement, thresholds)
