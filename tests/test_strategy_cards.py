"""Every strategy card's drop-in snippet runs and yields a working strategy."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT, initial_arrays, make_toy_client_app
from flwr.serverapp.strategy import Strategy

from flower_privacy.testing import InProcessGrid

CARDS = sorted((REPO_ROOT / "strategies").glob("*.md"))
REQUIRED_SECTIONS = (
    "## Threat model",
    "## Guarantees",
    "## Parameters",
    "## Measured costs",
    "## Drop-in",
)


def test_there_is_a_card() -> None:
    assert CARDS


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_card_has_every_section(card) -> None:
    text = card.read_text()
    missing = [s for s in REQUIRED_SECTIONS if s not in text]
    assert not missing, f"{card.name} lacks {missing}"


@pytest.mark.parametrize("variant", ["make_private", "drop-in"])
@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_card_snippet_runs(card, variant) -> None:
    """The card's last snippet (``make_private``) runs; so does its older drop-in."""
    snippets = re.findall(r"```python\n(.*?)```", card.read_text(), flags=re.DOTALL)
    assert snippets, f"{card.name} has no python snippet"
    assert "make_private" in snippets[-1], f"{card.name}: its last snippet uses make_private"
    if variant == "drop-in":
        snippets = [s for s in snippets if "make_private" not in s]
    namespace: dict = {}
    exec(compile("\n".join(snippets), str(card), "exec"), namespace)
    strategy = namespace["strategy"]
    assert isinstance(strategy, Strategy)
    # A card may define the ClientApp its strategy needs (e.g. with a mod); the test
    # registers a toy train/evaluate function on it.
    client_app = make_toy_client_app(app=namespace.get("client_app"))
    result = strategy.start(InProcessGrid(client_app, num_nodes=3), initial_arrays(), num_rounds=2)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
