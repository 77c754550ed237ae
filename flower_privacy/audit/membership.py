"""Membership: canary clients measure the ε a DP release really gives."""

from __future__ import annotations

import numpy as np

from flower_privacy.audit import empirical_eps, runner
from flower_privacy.audit.auditor import Auditor
from flower_privacy.audit.findings import MEMBERSHIP
from flower_privacy.wire import dp as dp_wire


def empirical_epsilon(auditor: Auditor, honest: runner.Federation) -> None:
    """Andrew et al. (ICLR 2024): canary clients, cosines, a Gaussian fit per round."""
    s = auditor.settings
    initial = {
        k: v.detach().cpu().numpy() for k, v in auditor.hook.model(auditor.cfg).state_dict().items()
    }
    dim = int(sum(np.asarray(v).size for v in initial.values()))
    dirs = empirical_eps.directions(s.canaries + s.null_directions, dim, s.seed + 1)
    real = auditor.hook.num_nodes(auditor.cfg)
    first = runner.FIRST_NODE_ID + real
    canary_ids = list(range(first, first + s.canaries))
    app = runner.canary_app(
        auditor.hook.client_mods,
        dict(zip(canary_ids, dirs[: s.canaries], strict=True)),
        # At the strategy's clip norm: the largest update DP lets through whole.
        float(honest.train_metrics[1][dp_wire.METRIC_CLIP_NORM]),
    )
    fed = runner.run(
        auditor.hook,
        auditor.cfg,
        rounds=s.rounds,
        initial=initial,
        extra_nodes=s.canaries,
        extra_app=app,
    )
    start = runner.flatten(fed.globals[0])
    last = None
    for rnd in range(1, fed.rounds + 1):
        change = runner.flatten(fed.globals[rnd]) - start
        found = empirical_eps.estimate(
            empirical_eps.cosines(change, dirs[: s.canaries]),
            empirical_eps.cosines(change, dirs[s.canaries :]),
            float(fed.train_metrics[rnd][dp_wire.METRIC_DELTA]),
            seed=s.seed,
        )
        accountant = float(fed.train_metrics[rnd][dp_wire.METRIC_EPSILON])
        auditor.result.epsilons.append(
            {
                "round": rnd,
                "accountant": accountant,
                "estimate": found.epsilon,
                "low": found.low,
                "high": found.high,
            }
        )
        last = (found, accountant)
    assert last is not None
    found, accountant = last
    interval = f"{found.epsilon:.2f} (95% interval {found.low:.2f}-{found.high:.2f})"
    if found.low > accountant:
        verdict = (
            f"BUG: the empirical ε {interval} exceeds the accountant's ε "
            f"{accountant:.2f}: the release leaks more than accounted"
        )
        auditor.result.violations.append(f"{auditor.name}: {verdict}")
    else:
        verdict = f"empirical ε {interval}; accountant's ε {accountant:.2f}"
    auditor.add(
        MEMBERSHIP,
        "one-shot empirical ε (Andrew et al. 2024)",
        "empirical epsilon",
        round(found.epsilon, 4),
        verdict,
        low=found.low,
        high=found.high,
        accountant_epsilon=accountant,
        delta=found.delta,
        canaries=found.canaries,
        null_directions=found.null_directions,
        threat_model=found.threat_model,
        rounds=fed.rounds,
    )
