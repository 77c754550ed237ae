"""Encrypt chunks in several processes (SEAL encrypts single-threaded).

Workers hold only the *public* context. Start-up (spawning interpreters, importing
TenSEAL, loading the context) is timed apart in :attr:`EncryptionPool.start_seconds`.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from flower_privacy._closing import ClosesOnExit
from flower_privacy.he.errors import HEConfigError

_WORKER_CONTEXT = None


def _init_worker(public_context: bytes) -> None:
    global _WORKER_CONTEXT
    import tenseal as ts

    _WORKER_CONTEXT = ts.context_from(public_context)


def _ready(_: int) -> int:
    time.sleep(0.05)  # hold the worker so that every worker gets one warm-up task
    return os.getpid()


def _encrypt_batch(scheme: str, chunks: list[np.ndarray]) -> list[bytes]:
    from flower_privacy.he.engine import encrypt_chunks

    assert _WORKER_CONTEXT is not None, "worker not initialised"
    return encrypt_chunks(_WORKER_CONTEXT, scheme, chunks)


def default_workers() -> int:
    """Processes to use: the CPUs this process may run on, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class EncryptionPool(ClosesOnExit):
    """A process pool that encrypts chunks under one public context.

    Parameters
    ----------
    public_context : bytes
        Serialized TenSEAL context without the secret key.
    workers : int
        Number of processes (>= 1).
    """

    def __init__(self, public_context: bytes, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise HEConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers = workers
        started = time.perf_counter()
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            # "spawn" is safe in threaded hosts such as Ray actors.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(public_context,),
        )
        list(self._executor.map(_ready, range(workers)))
        self.start_seconds = time.perf_counter() - started

    def encrypt(self, scheme: str, chunks: list[np.ndarray]) -> list[bytes]:
        """Ciphertexts of ``chunks``, in order, encrypted across the workers."""
        per_worker = -(-len(chunks) // self.workers)
        batches = [chunks[i : i + per_worker] for i in range(0, len(chunks), per_worker)]
        futures = [self._executor.submit(_encrypt_batch, scheme, b) for b in batches]
        return [blob for future in futures for blob in future.result()]

    def close(self) -> None:
        """Stop the worker processes."""
        self._executor.shutdown(wait=True, cancel_futures=True)
