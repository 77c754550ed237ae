"""The audit's report: ``audit.json`` and a self-contained ``index.html``."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flower_privacy.audit.findings import ConfigAudit

PAPERS = [
    ("Phong et al. 2018, analytic first-layer recovery", "https://eprint.iacr.org/2017/715"),
    ("Zhu et al. 2019, Deep Leakage from Gradients", "https://arxiv.org/abs/1906.08935"),
    ("Geiping et al. 2020, Inverting Gradients", "https://arxiv.org/abs/2003.14053"),
    ("Fowl et al. 2022, Robbing the Fed", "https://arxiv.org/abs/2110.13057"),
    (
        "So et al. 2023, Securing Secure Aggregation (multi-round)",
        "https://arxiv.org/abs/2106.03328",
    ),
    (
        "Andrew et al. 2024, One-shot empirical privacy estimation",
        "https://arxiv.org/abs/2302.03098",
    ),
]
ASSUMPTIONS = [
    "Attackers see only what the grid carried to them; scores use the true inputs, which "
    "the attackers never see.",
    "Inverting Gradients is given the labels (as in Geiping et al.); DLG optimises soft labels.",
    "The malicious server calibrates its imprint model on its own held-out data and knows "
    "roughly how many inputs a round sums (from earlier rounds' weights).",
    "The empirical ε assumes the final-model threat model, canaries inserted in every round, "
    "and a Gaussian (pooled-variance) fit: an estimate, not a bound.",
    "A short audit run (few rounds) stands in for the full run; several local steps are "
    "attacked as one pseudo-gradient.",
]


def _strict(value: object) -> object:
    """``value`` with non-finite floats as strings: strict JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, np.generic):
        return _strict(value.item())
    return value


def to_json(audits: Sequence[ConfigAudit], meta: dict) -> dict:
    """The JSON document: metadata, the attack rows, verdicts per configuration."""
    return _strict(_document(audits, meta))  # type: ignore[return-value]


def _document(audits: Sequence[ConfigAudit], meta: dict) -> dict:
    rows = [dataclasses.asdict(f) for a in audits for f in a.findings]
    return {
        **meta,
        "attacks": rows,
        "verdicts": {
            a.name: [f"{f.attacker} / {f.attack}: {f.verdict}" for f in a.findings] for a in audits
        },
        "privacy_t": {a.name: a.privacy_t for a in audits if a.privacy_t},
        "epsilon": {a.name: a.epsilons for a in audits if a.epsilons},
        "violations": [v for a in audits for v in a.violations],
        "seconds": {a.name: round(a.seconds, 1) for a in audits},
    }


def _png(fig) -> str:  # noqa: ANN001
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def images_figure(audits: Sequence[ConfigAudit], image_shape: tuple[int, int]):  # noqa: ANN201
    """Per configuration, the attack that recovered most: true (top) vs reconstructed."""
    import matplotlib.pyplot as plt

    best = []
    for a in audits:
        if a.pictures:
            best.append(max(a.pictures, key=lambda p: float(p.psnr.max())))
    if not best:
        return None
    cols = 8
    fig, axes = plt.subplots(
        2 * len(best), cols, figsize=(cols * 0.9, 2.1 * len(best)), squeeze=False
    )
    for i, pic in enumerate(best):
        for j in range(cols):
            for row, images in ((2 * i, pic.true), (2 * i + 1, pic.reconstructed)):
                ax = axes[row][j]
                ax.axis("off")
                if j < len(images):
                    ax.imshow(images[j].reshape(image_shape), cmap="gray", vmin=0, vmax=1)
            if j < len(pic.psnr):
                axes[2 * i + 1][j].set_title(f"{pic.psnr[j]:.0f} dB", fontsize=7)
        axes[2 * i][0].set_title(
            f"{pic.config}: {pic.attacker}, {pic.attack}", fontsize=8, loc="left"
        )
    fig.suptitle("true inputs (upper row) and the attacker's best reconstructions", fontsize=9)
    return fig


def _rounds_figure(
    series: Sequence[ConfigAudit],
    ylabel: str,
    plot: Callable[[Any, int, ConfigAudit], None],
    bottom: float | None = None,
):  # noqa: ANN202
    """One axes over rounds, ``plot(ax, k, audit)`` drawing the k-th audit; None if none."""
    import matplotlib.pyplot as plt

    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    for k, a in enumerate(series):
        plot(ax, k, a)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if bottom is not None:
        ax.set_ylim(bottom=bottom)
    ax.legend(fontsize=7)
    return fig


def t_figure(audits: Sequence[ConfigAudit]):  # noqa: ANN201
    def plot(ax, k: int, a: ConfigAudit) -> None:  # noqa: ANN001
        ax.plot(range(1, len(a.privacy_t) + 1), a.privacy_t, marker="o", label=a.name)

    series = [a for a in audits if a.privacy_t]
    ylabel = "privacy T (fewest clients any\ncombination of sums mixes)"
    return _rounds_figure(series, ylabel, plot, bottom=0)


def epsilon_figure(audits: Sequence[ConfigAudit]):  # noqa: ANN201
    def plot(ax, k: int, a: ConfigAudit) -> None:  # noqa: ANN001
        rounds = np.array([e["round"] for e in a.epsilons]) + 0.08 * k
        acc = [e["accountant"] for e in a.epsilons]
        est = np.array([e["estimate"] for e in a.epsilons])
        low = np.array([e["low"] for e in a.epsilons])
        high = np.array([e["high"] for e in a.epsilons])
        line = ax.plot(rounds, acc, label=f"{a.name}: accountant ε")[0]
        ax.errorbar(
            rounds,
            est,
            yerr=[est - low, high - est],
            fmt="o",
            color=line.get_color(),
            capsize=3,
            label=f"{a.name}: empirical ε (95%)",
        )

    return _rounds_figure([a for a in audits if a.epsilons], "ε", plot)


def write(
    out: Path, document: dict, audits: Sequence[ConfigAudit], image_shape: tuple[int, int]
) -> None:
    """Write ``audit.json``, ``index.html`` and the figures' PNGs into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(document, indent=2, allow_nan=False))
    figures = []
    for name, fig in (
        ("reconstructions", images_figure(audits, image_shape)),
        ("privacy-t", t_figure(audits)),
        ("epsilon", epsilon_figure(audits)),
    ):
        if fig is not None:
            data = _png(fig)
            (out / f"{name}.png").write_bytes(base64.b64decode(data))
            figures.append((name, data))
    (out / "index.html").write_text(_html(document, figures))


def _side_by_side(document: dict) -> str:
    """One row per (attacker, attack, metric), one column per configuration."""
    esc = html.escape
    configs = list(document.get("configs", []))
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in document["attacks"]:
        attacker, _, seen = r["attacker"].partition(" (")
        key = (attacker, r["attack"], r["metric"])
        view = f" [{seen.rstrip(')')}]" if seen else ""
        cells.setdefault(key, {})[r["config"]] = f"{r['value']}{view}: {r['verdict']}"
    head = "".join(f"<th>{esc(c)}</th>" for c in configs)
    body = "".join(
        f"<tr><td>{esc(a)}</td><td>{esc(t)}</td><td>{esc(m)}</td>"
        + "".join(f"<td>{esc(row.get(c, '-'))}</td>" for c in configs)
        + "</tr>"
        for (a, t, m), row in cells.items()
    )
    return f"<table><tr><th>attacker</th><th>attack</th><th>metric</th>{head}</tr>{body}</table>"


def _html(document: dict, figures: list[tuple[str, str]]) -> str:
    esc = html.escape
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(str(r[k]))}</td>"
            for k in ("config", "attacker", "attack", "metric", "value", "verdict")
        )
        + "</tr>"
        for r in document["attacks"]
    )
    violations = (
        "".join(f"<li class=bug>{esc(v)}</li>" for v in document["violations"]) or "<li>none</li>"
    )
    pictures = "".join(
        f'<h3>{esc(n)}</h3><img alt="{esc(n)}" src="data:image/png;base64,{d}">' for n, d in figures
    )
    papers = "".join(f'<li><a href="{esc(u)}">{esc(t)}</a></li>' for t, u in PAPERS)
    assumptions = "".join(f"<li>{esc(a)}</li>" for a in ASSUMPTIONS)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
        ".bug{color:#b00;font-weight:bold}"
    )
    header = "".join(
        f"<th>{k}</th>" for k in ("config", "attacker", "attack", "metric", "value", "verdict")
    )
    configs = esc(", ".join(document.get("configs", [])))
    wall = float(document.get("wall_seconds", 0))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>flower-privacy audit</title><style>{style}</style></head><body>
<h1>What an attacker learns: {esc(str(document.get("app", "")))}</h1>
<p>Configurations: {configs}. Audit wall time {wall:.0f} s.</p>
<h2>Accounting violations</h2><ul>{violations}</ul>
<h2>Side by side</h2>{_side_by_side(document)}
<h2>Attacks</h2><table><tr>{header}</tr>{rows}</table>
<h2>Figures</h2>{pictures}
<h2>Assumptions and limits</h2><ul>{assumptions}</ul><h2>Papers</h2><ul>{papers}</ul>
</body></html>"""
