"""The history a flower-privacy strategy returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.serverapp.strategy import Result


@dataclass
class PrivacyResult(Result):
    """Flower's ``Result`` plus the rounds that failed and why the run stopped.

    Attributes
    ----------
    failed_rounds : dict[int, str]
        Round number to the reason it produced no model. The global model was not
        updated in these rounds.
    halt_reason : str | None
        Why the run stopped before its last round (a halt after failed rounds, or a
        clean stop such as a spent privacy budget, the last model kept), or None if it
        ran to the end.
    """

    failed_rounds: dict[int, str] = field(default_factory=dict)
    halt_reason: str | None = None

    def __repr__(self) -> str:
        rep = super().__repr__()
        if self.failed_rounds:
            rep += "\nFailed rounds:\n"
            rep += "".join(f"\t{rnd}: {why}\n" for rnd, why in sorted(self.failed_rounds.items()))
        if self.halt_reason:
            rep += f"\nRun stopped early: {self.halt_reason}\n"
        return rep
