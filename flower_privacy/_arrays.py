"""Flat float64 views of a model's ArrayRecord, shared by strategies and client mods."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def add_flat(arrays: ArrayRecord, flat: np.ndarray) -> ArrayRecord:
    """``arrays`` plus ``flat``, a vector over all arrays in their order.

    The sum is taken in float64; each array keeps its dtype and shape.
    """
    out, offset = {}, 0
    for key, array in arrays.items():
        before = array.numpy()
        part = flat[offset : offset + before.size].reshape(before.shape)
        out[key] = Array((before.astype(np.float64) + part).astype(before.dtype))
        offset += before.size
    return ArrayRecord(out)
