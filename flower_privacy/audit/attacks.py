"""The attackers, each played on exactly what it saw in one configuration's runs."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import UserConfig
from torch import nn

from flower_privacy.audit import differencing, empirical_eps, imprint, inversion, metrics, runner
from flower_privacy.audit.findings import (
    CLIENT,
    CURIOUS,
    DIFFERENCING,
    DIFFERENCING_COSINE,
    KEY_HOLDER,
    MALICIOUS,
    MEMBERSHIP,
    AuditSettings,
    ConfigAudit,
    Finding,
    Picture,
    Progress,
)
from flower_privacy.audit.hook import AuditHook
from flower_privacy.errors import RunHaltedError
from flower_privacy.secagg.audit import audit as privacy_t
from flower_privacy.wire import dp as dp_wire


class _Auditor:
    def __init__(self, hook: AuditHook, name: str, cfg: UserConfig, settings: AuditSettings):
        self.hook, self.name, self.cfg, self.settings = hook, name, cfg, settings
        self.result = ConfigAudit(name)
        n = hook.num_nodes(cfg)
        self.data = {runner.FIRST_NODE_ID + i: hook.client_data(i, n, cfg) for i in range(n)}

    # -- helpers -------------------------------------------------------------------

    @property
    def image_metric(self) -> str:
        """The metric of every reconstruction row (one name, whatever the threshold)."""
        return f"images above {self.settings.threshold_db:g} dB"

    def model_at(self, state: runner.State) -> nn.Module:
        model = self.hook.model(self.cfg)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
        return model

    def inputs(self, nodes) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
        xs = [self.data[n][0] for n in nodes if n in self.data]
        ys = [self.data[n][1] for n in nodes if n in self.data]
        return np.concatenate(xs), np.concatenate(ys)

    def score(self, attacker: str, attack: str, true: np.ndarray, candidates: np.ndarray) -> None:
        shape = self.hook.image_shape
        threshold = self.settings.threshold_db
        found = metrics.match(true, candidates, shape)
        baseline = metrics.random_baseline(true, len(candidates), shape, self.settings.seed)
        count = found.count_above(threshold)
        best = found.best_psnr
        if count:
            verdict = f"reconstructed {count} of {len(true)} images above {threshold:g} dB"
        else:
            verdict = "nothing recovered"
        verdict += f" (best {best:.1f} dB; random images reach {baseline.best_psnr:.1f} dB)"
        self.add(
            attacker,
            attack,
            self.image_metric,
            count,
            verdict,
            inputs=len(true),
            candidates=len(candidates),
            best_psnr_db=round(best, 2),
            best_ssim=round(float(found.ssim.max()) if found.ssim.size else 0.0, 4),
            above_30db=found.count_above(30.0),
            random_baseline_psnr_db=round(baseline.best_psnr, 2),
        )
        if found.psnr.size:
            top = slice(0, 8)
            self.result.pictures.append(
                Picture(
                    self.name,
                    attacker,
                    attack,
                    true[found.true_index[top]],
                    np.clip(candidates[found.candidate_index[top]], 0, 1),
                    found.psnr[top],
                )
            )

    def add(self, attacker, attack, metric, value, verdict, **details) -> None:  # noqa: ANN001
        self.result.findings.append(
            Finding(attacker, attack, self.name, metric, value, verdict, details)
        )

    def invert(self, attacker: str, model: nn.Module, update: runner.State, nodes) -> None:  # noqa: ANN001
        """Analytic, Inverting Gradients and DLG on one update of ``nodes``' inputs."""
        true, labels = self.inputs(nodes)
        weight, bias = inversion.first_linear(model)
        self.score(
            attacker,
            "analytic first layer",
            true,
            inversion.analytic_first_layer(update, weight, bias),
        )
        s = self.settings
        if len(true) > s.max_iterative_inputs:
            self.add(
                attacker,
                "inverting gradients",
                self.image_metric,
                None,
                f"not run: {len(true)} inputs > {s.max_iterative_inputs}",
            )
        else:
            shape = self.hook.input_shape
            rec = inversion.inverting_gradients(
                model, update, labels, shape, self.hook.loss, s.inversion, self.hook.image_shape
            )
            self.score(attacker, "inverting gradients", true, rec)
        if len(true) > s.max_dlg_inputs:
            self.add(
                attacker,
                "DLG",
                self.image_metric,
                None,
                f"not run: {len(true)} inputs > {s.max_dlg_inputs} (DLG inverts small batches)",
            )
        else:
            lr = self.hook.local_training(self.cfg).learning_rate
            rec = inversion.dlg(
                model, update, len(true), self.hook.num_classes, self.hook.input_shape, lr
            )
            self.score(attacker, "DLG", true, rec)

    # -- the attackers ---------------------------------------------------------------

    def honest(self, fed: runner.Federation) -> None:
        """The curious server and a participating client on an honest run."""
        model = self.model_at(fed.globals[0])
        first = fed.participants.get(1, [])
        clear = fed.clear_updates.get(1, {})
        if clear:
            target = sorted(clear)[0]
            self.invert(f"{CURIOUS} (client {target}'s update)", model, clear[target], [target])
        elif first:
            self.invert(f"{CURIOUS} (sum of {len(first)} clients)", model, fed.release(1), first)
        if len(first) > 1:
            attacker = first[-1]
            others = [n for n in first if n != attacker]
            self.invert(f"{CLIENT} (global model change)", model, fed.release(1), others)

    def differencing(self, fed: runner.Federation) -> None:
        if fed.clear_updates:
            self.result.privacy_t = [1] * fed.rounds
            self.add(
                DIFFERENCING,
                "isolation from participation",
                "smallest T",
                1,
                "the server sees every update in the clear: each client is isolated",
            )
            return
        matrix = fed.participation()
        self.result.privacy_t = []
        for rnd in range(1, fed.rounds + 1):
            found = privacy_t(matrix[:rnd])
            self.result.privacy_t.append(
                found.exact if found.exact is not None else found.lower_bound
            )
        rank = np.linalg.matrix_rank(matrix)
        isolated = [
            fed.node_ids[j]
            for j in range(matrix.shape[1])
            if matrix[:, j].any()
            and np.linalg.matrix_rank(np.vstack([matrix, np.eye(matrix.shape[1])[j]])) == rank
        ]
        t = self.result.privacy_t[-1]
        self.add(
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
        self.add(
            DIFFERENCING,
            "isolation from participation",
            "smallest T",
            t,
            f"every combination of round sums mixes at least {t} clients"
            if t > 1
            else "some combination of round sums is one client's update alone",
        )
        if self.hook.fixed_updates(self.cfg):
            self.least_squares(fed)

    def least_squares(self, fed: runner.Federation) -> None:
        """Per-client updates by least squares over the rounds' releases (So et al.),
        scored by the cosine to each client's true update."""
        attack, metric = DIFFERENCING_COSINE
        if fed.clear_updates:
            self.add(DIFFERENCING, attack, metric, 1.0, "the server sees every update in the clear")
            return
        true = runner.fixed_updates(self.hook, self.cfg, fed.globals[0])
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
        self.add(
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

    def malicious(self, honest: runner.Federation) -> None:
        """Robbing the Fed: the server sends an imprint model in round 1."""
        model = self.model_at(honest.globals[0])
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if len(linears) < 2 or linears[0][1].out_features != linears[1][1].in_features:
            self.add(
                MALICIOUS,
                "imprint (Robbing the Fed)",
                self.image_metric,
                None,
                "not applicable: the model does not start Linear, ReLU, Linear",
            )
            return
        weight, bias = inversion.first_linear(model)
        next_weight = f"{linears[1][0]}.weight"
        nodes = honest.participants.get(1, [])
        true, _ = self.inputs(nodes)
        crafted, module = imprint.craft(
            honest.globals[0],
            weight,
            bias,
            next_weight,
            self.hook.public_data(self.cfg),
            expected_inputs=len(true),
            seed=self.settings.seed,
            gain=self.settings.imprint_gain,
        )
        attack = "imprint (Robbing the Fed)"
        try:
            fed = runner.run(self.hook, self.cfg, rounds=1, initial=crafted)
        except RunHaltedError as err:
            self.add(MALICIOUS, attack, self.image_metric, 0, f"refused, nothing recovered: {err}")
            return
        clear = fed.clear_updates.get(1, {})
        if clear:
            candidates = np.concatenate([module.recover(u) for u in clear.values()])
            self.score(f"{MALICIOUS} (each client's update)", attack, true, candidates)
        else:
            who = len(fed.participants.get(1, []))
            self.score(
                f"{MALICIOUS} (sum of {who} clients)", attack, true, module.recover(fed.release(1))
            )
        if clear and self.is_dp(fed):
            self.score(
                f"{MALICIOUS} (the noisy release)", attack, true, module.recover(fed.release(1))
            )

    def inconsistency(self, honest: runner.Federation) -> None:
        """Different models to different clients: the target gets the imprint model, the
        others one whose first layer never fires, so the sum's first layer is the target's.
        """
        attack = "model inconsistency (imprint to one client)"
        if honest.clear_updates:
            self.add(
                MALICIOUS,
                attack,
                self.image_metric,
                None,
                "not needed: the server sees every update in the clear",
            )
            return
        model = self.model_at(honest.globals[0])
        weight, bias = inversion.first_linear(model)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        target = honest.node_ids[0]
        true, _ = self.inputs([target])
        crafted, module = imprint.craft(
            honest.globals[0],
            weight,
            bias,
            f"{linears[1]}.weight",
            self.hook.public_data(self.cfg),
            expected_inputs=len(true),
            seed=self.settings.seed,
            gain=self.settings.imprint_gain,
        )
        dead = dict(crafted)
        dead[bias] = np.full_like(crafted[bias], -1e4)  # no input reaches past the threshold

        def rewrite(message):  # noqa: ANN001, ANN202
            if message.metadata.dst_node_id == target:
                return runner.replace_model(message, crafted)
            return message

        try:
            fed = runner.run(self.hook, self.cfg, rounds=1, initial=dead, rewrite=rewrite)
        except RunHaltedError as err:
            self.add(MALICIOUS, attack, self.image_metric, 0, f"refused, nothing recovered: {err}")
            return
        self.score(
            f"{MALICIOUS} (client {target} inside the sum)",
            attack,
            true,
            module.recover(fed.release(1)),
        )

    @staticmethod
    def is_dp(fed: runner.Federation) -> bool:
        return any(dp_wire.METRIC_EPSILON in m for m in fed.train_metrics.values())

    def empirical_epsilon(self, honest: runner.Federation) -> None:
        """Andrew et al. (ICLR 2024): canary clients, cosines, a Gaussian fit per round."""
        s = self.settings
        initial = {
            k: v.detach().cpu().numpy() for k, v in self.hook.model(self.cfg).state_dict().items()
        }
        dim = int(sum(np.asarray(v).size for v in initial.values()))
        dirs = empirical_eps.directions(s.canaries + s.null_directions, dim, s.seed + 1)
        real = self.hook.num_nodes(self.cfg)
        first = runner.FIRST_NODE_ID + real
        canary_ids = list(range(first, first + s.canaries))
        app = runner.canary_app(
            self.hook.client_mods,
            dict(zip(canary_ids, dirs[: s.canaries], strict=True)),
            # At the strategy's clip norm: the largest update DP lets through whole.
            float(honest.train_metrics[1][dp_wire.METRIC_CLIP_NORM]),
        )
        fed = runner.run(
            self.hook,
            self.cfg,
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
            self.result.epsilons.append(
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
            self.result.violations.append(f"{self.name}: {verdict}")
        else:
            verdict = f"empirical ε {interval}; accountant's ε {accountant:.2f}"
        self.add(
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

    def key_custody(self) -> None:
        """HE: ciphertexts hide nothing from whoever holds the secret key."""
        cfg = self.cfg
        if not str(cfg.get("he-server-context", "")) and bool(cfg.get("he-simulation-keys", False)):
            self.add(
                KEY_HOLDER,
                "server holds the secret key",
                "uploads the server decrypts",
                "all",
                "the ServerApp generated the keys (he-simulation-keys=true, no "
                "he-server-context): this server decrypts every upload, as in 'none'",
            )
        else:
            self.add(
                KEY_HOLDER,
                "server holds the secret key",
                "uploads the server decrypts",
                "none",
                "the server holds a public context only (keys made by a client-side party)",
            )
        self.add(
            KEY_HOLDER,
            "server + one client (shared client key)",
            "uploads decrypted",
            "all",
            "every client holds the same secret key (client.ctx): the server plus any one "
            "client decrypts every upload",
        )


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
    auditor = _Auditor(hook, name, cfg, settings)
    if str(cfg.get("privacy")) == "he":
        # The server holds ciphertexts only; what matters is who can decrypt them.
        auditor.key_custody()
        return auditor.result
    chosen = settings.attacks
    progress(f"{name}: honest run ({settings.rounds} rounds)")
    honest = runner.run(hook, cfg, rounds=settings.rounds)
    if "inversion" in chosen:
        progress(f"{name}: gradient inversion")
        auditor.honest(honest)
    if "differencing" in chosen:
        auditor.differencing(honest)
    if "imprint" in chosen:
        progress(f"{name}: malicious server (imprint, model inconsistency)")
        auditor.malicious(honest)
        auditor.inconsistency(honest)
    if "empirical-epsilon" in chosen and auditor.is_dp(honest):
        progress(f"{name}: canaries ({settings.canaries}) for the empirical ε")
        auditor.empirical_epsilon(honest)
    return auditor.result
