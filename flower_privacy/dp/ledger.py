"""A privacy ledger: released rounds of one mechanism in, ε out, a state to resume from.

Events stay data (:class:`~flower_privacy.dp.accounting.GaussianRounds` and the discrete
events of :mod:`~flower_privacy.dp.discrete_accounting`); the ledger only counts the
rounds released under one of them and asks the matching accountant for ε. Its
:meth:`PrivacyLedger.state_dict` lets a restarted run keep counting from where the last
one stopped, so ε covers every round the server ever saw.
"""

from __future__ import annotations

import dataclasses

from flower_privacy._fields import required_fields
from flower_privacy.dp import accounting, discrete_accounting
from flower_privacy.dp.accounting import GaussianRounds
from flower_privacy.dp.discrete_accounting import DistributedDiscreteGaussianRounds, SkellamRounds

RoundEvent = GaussianRounds | SkellamRounds | DistributedDiscreteGaussianRounds
_KINDS: dict[str, type] = {
    "gaussian": GaussianRounds,
    "skellam": SkellamRounds,
    "ddg": DistributedDiscreteGaussianRounds,
}
STATE_VERSION = 1


class PrivacyLedger:
    """Rounds released under ``event`` (its ``rounds`` is ignored: one round each).

    Parameters
    ----------
    event : GaussianRounds | SkellamRounds | DistributedDiscreteGaussianRounds
        One round's mechanism.
    delta : float
        The δ at which ε is reported.
    accountant : str
        For Gaussian rounds: ``"pld"``, ``"rdp"`` or ``"prv"``; discrete events are
        always accounted by their Rényi bounds.
    """

    def __init__(self, event: RoundEvent, delta: float, accountant: str = "pld") -> None:
        if type(event) not in _KINDS.values():
            raise TypeError(f"no accountant for {type(event).__name__} events")
        accounting._check(delta, accountant)
        self.event = dataclasses.replace(event, rounds=1)
        self.delta, self.accountant = delta, accountant
        self._released = 0
        self._cache: dict[int, float] = {}

    @property
    def released(self) -> int:
        """Rounds charged so far."""
        return self._released

    def charge(self, rounds: int = 1) -> None:
        """Record ``rounds`` more released rounds."""
        if int(rounds) != rounds or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds}")
        self._released += int(rounds)

    def epsilon(self, rounds: int | None = None) -> float:
        """ε after ``rounds`` released rounds (default: those charged); 0 for none."""
        rounds = self._released if rounds is None else rounds
        if rounds <= 0:
            return 0.0
        if rounds not in self._cache:
            event = dataclasses.replace(self.event, rounds=rounds)
            if isinstance(event, GaussianRounds):
                value = accounting.epsilon(event, self.delta, self.accountant)
            else:
                value = discrete_accounting.epsilon(event, self.delta)
            self._cache[rounds] = value
        return self._cache[rounds]

    def state_dict(self) -> dict:
        """Everything needed to resume: the mechanism, δ, accountant and rounds charged."""
        kind = next(k for k, cls in _KINDS.items() if type(self.event) is cls)
        return {
            "version": STATE_VERSION,
            "kind": kind,
            "event": dataclasses.asdict(self.event),
            "delta": self.delta,
            "accountant": self.accountant,
            "released": self._released,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyLedger:
        """The ledger :meth:`state_dict` described; ``ValueError`` names a bad field."""
        with required_fields("the ledger state"):
            try:
                if state["version"] != STATE_VERSION:
                    raise ValueError(f"ledger state version {state['version']!r} is not supported")
                kind = _KINDS.get(state["kind"])
                if kind is None:
                    raise ValueError(f"unknown mechanism kind {state['kind']!r}")
                event = kind(**state["event"])
                ledger = cls(event, float(state["delta"]), str(state["accountant"]))
                released = state["released"]
            except TypeError as err:
                raise ValueError(f"the ledger state's event is malformed: {err}") from None
        if isinstance(released, bool) or not isinstance(released, int) or released < 0:
            raise ValueError(f"released must be an integer >= 0, got {released!r}")
        ledger._released = int(released)
        return ledger
