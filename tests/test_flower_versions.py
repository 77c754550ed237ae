"""Our Flower-facing signatures cover the installed Flower's, and the docs state our range."""

from __future__ import annotations

import inspect
import re
import tomllib

import pytest
from conftest import REPO_ROOT
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_privacy.strategies import (
    ClientLevelDP,
    EncryptedFedAvg,
    SecureAggregation,
    StrictRounds,
)
from flower_privacy.testing import InProcessGrid


def _parameters(function) -> dict[str, inspect.Parameter]:  # noqa: ANN001
    return dict(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (StrictRounds.start, Strategy.start),
        (EncryptedFedAvg.start, Strategy.start),
        (ClientLevelDP.start, Strategy.start),
        (SecureAggregation.start, Strategy.start),
        (InProcessGrid.pull_messages, Grid.pull_messages),
        (InProcessGrid.send_and_receive, Grid.send_and_receive),
        (InProcessGrid.push_messages, Grid.push_messages),
    ],
)
def test_we_accept_every_argument_the_installed_flower_defines(ours, theirs) -> None:  # noqa: ANN001
    # Any call Flower's signature allows must bind to ours: every name by keyword, as many
    # positional arguments, and nothing required that Flower does not require.
    mine, flowers = _parameters(ours), _parameters(theirs)
    missing = sorted(set(flowers) - set(mine))
    assert not missing, f"{ours.__qualname__} lacks {missing} of Flower's {theirs.__qualname__}"
    assert len(_positional(mine)) >= len(_positional(flowers))
    assert _required(mine) <= _required(flowers)


def _positional(parameters: dict[str, inspect.Parameter]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [name for name, p in parameters.items() if p.kind in kinds]


def _required(parameters: dict[str, inspect.Parameter]) -> set[str]:
    return {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}


def test_the_1_43_arguments_are_accepted_on_every_supported_flower() -> None:
    for start in (StrictRounds.start, EncryptedFedAvg.start):
        assert _parameters(start)["should_stop"].default is None
    pull = _parameters(InProcessGrid.pull_messages)
    assert pull["reply_to_message_ids"].default is None
    assert pull["message_ids"].kind is inspect.Parameter.KEYWORD_ONLY


def test_the_readme_states_the_pinned_flower_range() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [r for r in project["dependencies"] if r.startswith("flwr[")]
    readme = (REPO_ROOT / "README.md").read_text()
    assert re.search(rf"We support `{re.escape(pin)}`", readme), pin
