"""The malicious server: it sends crafted models (Robbing the Fed's imprint module)."""

from __future__ import annotations

import numpy as np
from torch import nn

from flower_privacy.audit import imprint, inversion, runner
from flower_privacy.audit.auditor import Auditor
from flower_privacy.audit.findings import MALICIOUS
from flower_privacy.errors import RunHaltedError


def imprint_model(auditor: Auditor, honest: runner.Federation) -> None:
    """Robbing the Fed: the server sends an imprint model in round 1."""
    model = auditor.model_at(honest.globals[0])
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or linears[0][1].out_features != linears[1][1].in_features:
        auditor.add(
            MALICIOUS,
            "imprint (Robbing the Fed)",
            auditor.image_metric,
            None,
            "not applicable: the model does not start Linear, ReLU, Linear",
        )
        return
    weight, bias = inversion.first_linear(model)
    next_weight = f"{linears[1][0]}.weight"
    nodes = honest.participants.get(1, [])
    true, _ = auditor.inputs(nodes)
    crafted, module = imprint.craft(
        honest.globals[0],
        weight,
        bias,
        next_weight,
        auditor.hook.public_data(auditor.cfg),
        expected_inputs=len(true),
        seed=auditor.settings.seed,
        gain=auditor.settings.imprint_gain,
    )
    attack = "imprint (Robbing the Fed)"
    try:
        fed = runner.run(auditor.hook, auditor.cfg, rounds=1, initial=crafted)
    except RunHaltedError as err:
        auditor.add(
            MALICIOUS, attack, auditor.image_metric, 0, f"refused, nothing recovered: {err}"
        )
        return
    clear = fed.clear_updates.get(1, {})
    if clear:
        candidates = np.concatenate([module.recover(u) for u in clear.values()])
        auditor.score(f"{MALICIOUS} (each client's update)", attack, true, candidates)
    else:
        who = len(fed.participants.get(1, []))
        auditor.score(
            f"{MALICIOUS} (sum of {who} clients)", attack, true, module.recover(fed.release(1))
        )
    if clear and auditor.is_dp(fed):
        auditor.score(
            f"{MALICIOUS} (the noisy release)", attack, true, module.recover(fed.release(1))
        )


def inconsistency(auditor: Auditor, honest: runner.Federation) -> None:
    """Different models to different clients: the target gets the imprint model, the
    others one whose first layer never fires, so the sum's first layer is the target's.
    """
    attack = "model inconsistency (imprint to one client)"
    if honest.clear_updates:
        auditor.add(
            MALICIOUS,
            attack,
            auditor.image_metric,
            None,
            "not needed: the server sees every update in the clear",
        )
        return
    model = auditor.model_at(honest.globals[0])
    weight, bias = inversion.first_linear(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    target = honest.node_ids[0]
    true, _ = auditor.inputs([target])
    crafted, module = imprint.craft(
        honest.globals[0],
        weight,
        bias,
        f"{linears[1]}.weight",
        auditor.hook.public_data(auditor.cfg),
        expected_inputs=len(true),
        seed=auditor.settings.seed,
        gain=auditor.settings.imprint_gain,
    )
    dead = dict(crafted)
    dead[bias] = np.full_like(crafted[bias], -1e4)  # no input reaches past the threshold

    def rewrite(message):  # noqa: ANN001, ANN202
        if message.metadata.dst_node_id == target:
            return runner.replace_model(message, crafted)
        return message

    try:
        fed = runner.run(auditor.hook, auditor.cfg, rounds=1, initial=dead, rewrite=rewrite)
    except RunHaltedError as err:
        auditor.add(
            MALICIOUS, attack, auditor.image_metric, 0, f"refused, nothing recovered: {err}"
        )
        return
    auditor.score(
        f"{MALICIOUS} (client {target} inside the sum)",
        attack,
        true,
        module.recover(fed.release(1)),
    )
