"""The attackers, each played on exactly what it saw in one configuration's runs.

Here: the honest-but-curious server and client, differencing across rounds, and who
holds HE keys; the malicious server is in :mod:`~flower_privacy.audit.malicious`, the
canaries for the empirical ε in :mod:`~flower_privacy.audit.membership`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import UserConfig

from flower_privacy.audit import differencing, runner
from flower_privacy.audit.auditor import Auditor
from flower_privacy.audit.findings import (
    CLIENT,
    CURIOUS,
    DIFFERENCING,
    DIFFERENCING_COSINE,
    KEY_HOLDER,
    AuditSettings,
    ConfigAudit,
    Progress,
)
from flower_privacy.audit.hook import AuditHook
from flower_privacy.audit.malicious import imprint_model, inconsistency
from flower_privacy.audit.membership import empirical_epsilon
from flower_privacy.secagg.audit import audit as privacy_t


def audit_config(
    hook: AuditHook,
    name: str,
    overrides: UserConfig | None = None,
    settings: AuditSettings | None = None,
    progress: Progress = lambda line: None,
) -> ConfigAudit:
    """Run configuration ``name`` of the app and play every attacker on it."""
    settings = settings or AuditSettings()
    cfg = hook.config(name, overrides)
    auditor = Auditor(hook, name, cfg, settings)
    if str(cfg.get("privacy")) == "he":
        # The server holds ciphertexts only; what matters is who can decrypt them.
        key_custody(auditor)
        return auditor.result
    chosen = settings.attacks
    progress(f"{name}: honest run ({settings.rounds} rounds)")
    honest = runner.run(hook, cfg, rounds=settings.rounds)
    if "inversion" in chosen:
        progress(f"{name}: gradient inversion")
        honest_but_curious(auditor, honest)
    if "differencing" in chosen:
        isolation(auditor, honest)
    if "imprint" in chosen:
        progress(f"{name}: malicious server (imprint, model inconsistency)")
        imprint_model(auditor, honest)
        inconsistency(auditor, honest)
    if "empirical-epsilon" in chosen and auditor.is_dp(honest):
        progress(f"{name}: canaries ({settings.canaries}) for the empirical ε")
        empirical_epsilon(auditor, honest)
    return auditor.result


def honest_but_curious(auditor: Auditor, fed: runner.Federation) -> None:
    """The curious server and a participating client on an honest run."""
    model = auditor.model_at(fed.globals[0])
    first = fed.participants.get(1, [])
    clear = fed.clear_updates.get(1, {})
    if clear:
        target = sorted(clear)[0]
        auditor.invert(f"{CURIOUS} (client {target}'s update)", model, clear[target], [target])
    elif first:
        auditor.invert(f"{CURIOUS} (sum of {len(first)} clients)", model, fed.release(1), first)
    if len(first) > 1:
        attacker = first[-1]
        others = [n for n in first if n != attacker]
        auditor.invert(f"{CLIENT} (global model change)", model, fed.release(1), others)


def isolation(auditor: Auditor, fed: runner.Federation) -> None:
    """Differencing: which clients the rounds' participation isolates; the smallest T."""
    if fed.clear_updates:
        auditor.result.privacy_t = [1] * fed.rounds
        auditor.add(
            DIFFERENCING,
            "isolation from participation",
            "smallest T",
            1,
            "the server sees every update in the clear: each client is isolated",
        )
        return
    matrix = fed.participation()
    auditor.result.privacy_t = []
    for rnd in range(1, fed.rounds + 1):
        found = privacy_t(matrix[:rnd])
        auditor.result.privacy_t.append(
            found.exact if found.exact is not None else found.lower_bound
        )
    rank = np.linalg.matrix_rank(matrix)
    isolated = [
        fed.node_ids[j]
        for j in range(matrix.shape[1])
        if matrix[:, j].any()
        and np.linalg.matrix_rank(np.vstack([matrix, np.eye(matrix.shape[1])[j]])) == rank
    ]
    t = auditor.result.privacy_t[-1]
    auditor.add(
        DIFFERENCING,
        "isolation from participation",
        "isolated clients",
        len(isolated),
        f"{len(isolated)} of {len(fed.node_ids)} clients isolated by differencing "
        f"{fed.rounds} rounds' sums"
        if isolated
        else f"no client isolated in {fed.rounds} rounds; smallest T = {t}",
        isolated=isolated,
    )
    auditor.add(
        DIFFERENCING,
        "isolation from participation",
        "smallest T",
        t,
        f"every combination of round sums mixes at least {t} clients"
        if t > 1
        else "some combination of round sums is one client's update alone",
    )
    if auditor.hook.fixed_updates(auditor.cfg):
        least_squares(auditor, fed)


def least_squares(auditor: Auditor, fed: runner.Federation) -> None:
    """Per-client updates by least squares over the rounds' releases (So et al.),
    scored by the cosine to each client's true update."""
    attack, metric = DIFFERENCING_COSINE
    if fed.clear_updates:
        auditor.add(DIFFERENCING, attack, metric, 1.0, "the server sees every update in the clear")
        return
    true = runner.fixed_updates(auditor.hook, auditor.cfg, fed.globals[0])
    matrix = fed.participation()
    seen = [j for j in range(matrix.shape[1]) if matrix[:, j].any()]
    nodes = [fed.node_ids[j] for j in seen]
    releases = np.stack([runner.flatten(fed.release(r)) for r in range(1, fed.rounds + 1)])
    found, baseline = differencing.score(
        matrix[:, seen], releases, np.stack([true[n] for n in nodes])
    )
    best = int(np.argmax(found))
    value, baseline = round(float(found[best]), 4), round(baseline, 4)
    how = (
        f"recovers client {nodes[best]}'s update"
        if value >= 0.99
        else "mixes several clients' updates in every estimate"
    )
    auditor.add(
        DIFFERENCING,
        attack,
        metric,
        value,
        f"least squares over {fed.rounds} rounds' aggregates {how} (best cosine "
        f"{value:.3f}; the mean release alone reaches {baseline:.3f})",
        best_client=nodes[best],
        mean_release_cosine=baseline,
        cosines={str(n): round(float(c), 4) for n, c in zip(nodes, found, strict=True)},
    )


def key_custody(auditor: Auditor) -> None:
    """HE: ciphertexts hide nothing from whoever holds the secret key."""
    cfg = auditor.cfg
    if not str(cfg.get("he-server-context", "")) and bool(cfg.get("he-simulation-keys", False)):
        auditor.add(
            KEY_HOLDER,
            "server holds the secret key",
            "uploads the server decrypts",
            "all",
            "the ServerApp generated the keys (he-simulation-keys=true, no "
            "he-server-context): this server decrypts every upload, as in 'none'",
        )
    else:
        auditor.add(
            KEY_HOLDER,
            "server holds the secret key",
            "uploads the server decrypts",
            "none",
            "the server holds a public context only (keys made by a client-side party)",
        )
    auditor.add(
        KEY_HOLDER,
        "server + one client (shared client key)",
        "uploads decrypted",
        "all",
        "every client holds the same secret key (client.ctx): the server plus any one "
        "client decrypts every upload",
    )
