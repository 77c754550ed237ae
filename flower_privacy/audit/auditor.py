"""What every attacker has: the run's configuration, the clients' data, and the scoring.

An attacker (:mod:`~flower_privacy.audit.attacks`, :mod:`~flower_privacy.audit.malicious`,
:mod:`~flower_privacy.audit.membership`) plays on what it saw and records its
findings through :meth:`Auditor.add` and :meth:`Auditor.score`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import UserConfig
from torch import nn

from flower_privacy.audit import inversion, metrics, runner
from flower_privacy.audit.findings import AuditSettings, ConfigAudit, Finding, Picture
from flower_privacy.audit.hook import AuditHook
from flower_privacy.wire import dp as dp_wire


class Auditor:
    """One configuration's audit: its findings accumulate in :attr:`result`."""

    def __init__(self, hook: AuditHook, name: str, cfg: UserConfig, settings: AuditSettings):
        self.hook, self.name, self.cfg, self.settings = hook, name, cfg, settings
        self.result = ConfigAudit(name)
        n = hook.num_nodes(cfg)
        self.data = {runner.FIRST_NODE_ID + i: hook.client_data(i, n, cfg) for i in range(n)}

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
        """One reconstruction row: ``candidates`` matched to the ``true`` images."""
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
        """One finding of this configuration."""
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

    @staticmethod
    def is_dp(fed: runner.Federation) -> bool:
        return any(dp_wire.METRIC_EPSILON in m for m in fed.train_metrics.values())
