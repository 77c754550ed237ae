"""``with`` for the objects that own processes or threads: leaving the block closes them."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosesOnExit:
    """``with obj:`` gives ``obj``; leaving the block, however, calls :meth:`close`.

    A subclass that starts its processes or threads on entry overrides ``__enter__``
    (returning ``self``); one that starts them in ``__init__`` need not.
    """

    def close(self) -> None:
        """Stop and release everything this object started."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
