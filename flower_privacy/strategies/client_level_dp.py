"""Client-level differential privacy (DP-FedAvg) as a strategy wrapper.

``ClientLevelDP(FedAvg(...), target_epsilon=3.0, delta=1e-5)`` clips each client's
model update (its new weights minus the global ones) in L2 norm, sums the clipped
updates with uniform weights, adds Gaussian noise and divides by the *expected*
number of clients (a data-independent denominator), then hands the noisy mean to the
inner strategy as if one client had sent it. McMahan et al., "Learning Differentially
Private Recurrent Language Models" (ICLR 2018); adaptive clipping after Andrew et al.
(NeurIPS 2021). The unit of privacy is one client's whole dataset; neighbouring
datasets differ by adding or removing one client.

The noise multiplier is calibrated for the target ε, the planned rounds and the
sampling before round 1; every round reports ``dp-epsilon``, ``dp-delta``,
``dp-noise-multiplier`` and ``dp-clip-norm``, and the run stops cleanly (last model
kept) when one more round would exceed the target. The maths lives in
:mod:`flower_privacy.dp`; this module only moves records.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_privacy.dp.accounting import adaptive_update_noise
from flower_privacy.dp.clipping import AdaptiveClipping
from flower_privacy.dp.discrete_planning import DistributedPlan, plan_distributed
from flower_privacy.dp.distributed import DistributedNoiseEncoding
from flower_privacy.dp.ledger import PrivacyLedger
from flower_privacy.dp.noise import secure_generator
from flower_privacy.errors import RoundFailedError, revealed_on_failure
from flower_privacy.strategies._dp_budget import (
    BETA,
    BudgetSettings,
    DistributedBudget,
    budget_stop_reason,
    gaussian_budget,
    resumable_ledger,
)
from flower_privacy.strategies._dp_checks import check_arguments, check_inner
from flower_privacy.strategies._dp_clear import InTheClear
from flower_privacy.strategies.secure_aggregation import SecureAggregation
from flower_privacy.strategies.strict_rounds import StrictRounds
from flower_privacy.wire import dp as wire
from flower_privacy.wire import secagg as wire_secagg

# Participation counts are public in the distributed placement (zero-out relation).
_PUBLIC_SECAGG_METRICS = (
    wire_secagg.METRIC_CLIENTS,
    wire_secagg.METRIC_DROPPED,
    wire_secagg.METRIC_EXCLUDED,
    wire_secagg.METRIC_PRIVACY_T,  # from participation alone
)


class ClientLevelDP(InTheClear, StrictRounds):
    """Wrap a mean-based strategy so that its model is (ε, δ)-DP for each client.

    Parameters
    ----------
    strategy : Strategy
        FedAvg, FedAvgM, FedProx, FedAdam, FedYogi or FedAdagrad; or, for
        ``placement="distributed"`` (and optionally ``"client"``), a
        :class:`SecureAggregation` with ``weighting="uniform"`` around one of them.
    target_epsilon : float | None
        The ε to meet after the planned rounds. Without ``noise_multiplier`` the noise
        is calibrated for it before round 1; with one, it is the budget at which the
        run stops cleanly.
    noise_multiplier : float | None
        A fixed noise multiplier z (noise std over the clip norm); ε is then reported.
    delta : float
        The δ of the guarantee, in (0, 1); well below 1 / number of clients.
    clip_norm : float
        L2 norm each client's whole update is clipped to (the initial one if adaptive).
    adaptive_clipping : bool
        Move the clip norm towards ``target_quantile`` of the update norms (Andrew et
        al.), using a noisy count of unclipped clients whose privacy cost is included.
    target_quantile, clip_learning_rate : float
        Adaptive clipping's target quantile (0.5) and geometric learning rate (0.2).
    count_noise_std : float | None
        Std of the noise on the count of unclipped clients; default m/20 for m
        expected clients per round.
    placement : str
        ``"central"``: the server clips and adds noise (trusted server).
        ``"client"``: clients clip (``client_clipping_mod``), the server adds noise.
        ``"distributed"``: each client adds its share of integer noise inside secure
        aggregation, so the server sees only the noisy sum.
    sampling_rate : float | None
        Poisson sampling: each connected node trains in a round with this probability,
        drawn by this wrapper (the inner strategy must then select every node); the
        accounting claims amplification by sampling (against everyone but the server,
        which knows the sample: the central and client placements trust it). None: the
        inner strategy's selection, accounted without amplification (it is not Poisson
        sampling). Refused for ``"distributed"``, whose adversary is the server.
    accountant : str
        ``"pld"`` (tight, default), ``"prv"`` (Opacus) or ``"rdp"``. The distributed
        placement always uses the Rényi bounds of its discrete mechanism.
    mechanism : str
        The distributed placement's integer noise: ``"skellam"`` (Agarwal et al. 2021;
        shares add up to exactly a Skellam) or ``"ddg"`` (distributed discrete
        Gaussian, Kairouz et al. 2021).
    expected_clients : float | None
        The denominator m: clients expected per round, a public constant. Default:
        q times the nodes connected at the start (every node, without sampling), which
        treats the federation size as public, as Opacus treats the dataset size.
    seed : int | None
        For reproducible tests only: seeds the noise and the sampling, which then
        carry no privacy. Default: a generator seeded from the OS CSPRNG.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        delta: float = 1e-5,
        clip_norm: float = 0.1,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        placement: str = "central",
        sampling_rate: float | None = None,
        accountant: str = "pld",
        mechanism: str = "skellam",
        expected_clients: float | None = None,
        seed: int | None = None,
        min_train_replies: int | None = None,
        max_failed_rounds: int = 0,
        node_wait_timeout: float = 300.0,
    ) -> None:
        check_arguments(
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            delta=delta,
            clip_norm=clip_norm,
            placement=placement,
            sampling_rate=sampling_rate,
            accountant=accountant,
            mechanism=mechanism,
            count_noise_std=count_noise_std,
            expected_clients=expected_clients,
        )
        super().__init__(
            strategy,
            min_train_replies=min_train_replies,
            max_failed_rounds=max_failed_rounds,
            node_wait_timeout=node_wait_timeout,
        )
        self.adaptive = (
            AdaptiveClipping(target_quantile, clip_learning_rate) if (adaptive_clipping) else None
        )
        self.secure = strategy if isinstance(strategy, SecureAggregation) else None
        check_inner(strategy, self.secure, placement, adaptive_clipping, sampling_rate)
        self.initial_clip_norm = clip_norm
        self.count_noise_std, self.placement = count_noise_std, placement
        self.sampling_rate, self.seed = sampling_rate, seed
        self.mechanism = mechanism
        self.budget = BudgetSettings(
            target_epsilon, noise_multiplier, delta, self.accounted_sampling_rate, accountant
        )
        self.fixed_expected_clients = expected_clients
        if seed is not None:
            log(
                WARNING,
                "ClientLevelDP: seed=%s: noise and sampling are reproducible and carry NO "
                "privacy (tests only)",
                seed,
            )
        self.planned_rounds = 0
        self.distributed_plan: DistributedPlan | None = None
        self._encoding: DistributedNoiseEncoding | None = None
        # Per run (prepare_run).
        self.noise_multiplier = noise_multiplier or 0.0
        self.clip_norm = clip_norm
        self.expected_clients: float | None = None
        self.update_noise_multiplier: float | None = None
        self.ledger: PrivacyLedger | None = None  # per run; the accountant of its releases
        self._resume: PrivacyLedger | None = None
        self._rng = secure_generator(seed)
        self._global: ArrayRecord | None = None

    @property
    def accounted_sampling_rate(self) -> float:
        """q in the accounting: the Poisson rate, or 1 (no amplification claimed)."""
        return self.sampling_rate or 1.0

    # -- run set-up and budget ------------------------------------------------------

    def prepare_run(self, grid: Grid, num_rounds: int) -> None:
        """Calibrate the noise for the planned rounds and sampling, before round 1."""
        super().prepare_run(grid, num_rounds)
        self._rng = secure_generator(self.seed)
        self.clip_norm = self.initial_clip_norm
        self.expected_clients = self.update_noise_multiplier = None
        self.planned_rounds, self.distributed_plan = num_rounds, None
        self._encoding: DistributedNoiseEncoding | None = None
        self.ledger, resume, self._resume = None, self._resume, None
        if self.placement != "distributed":  # distributed: at round 1 (the model's size)
            self.noise_multiplier, self.ledger = gaussian_budget(self.budget, num_rounds, resume)
        if self.sampling_rate is not None:
            self._wait_for_nodes(grid)
            population = len(list(grid.get_node_ids()))
            self._fix_expected_clients(
                self.fixed_expected_clients or self.sampling_rate * population
            )

    def stop_reason(self, server_round: int) -> str | None:
        """Stop cleanly once one more round would take ε past ``target_epsilon``."""
        if self.budget.target_epsilon is None:
            return None
        if self.placement == "distributed" and self.distributed_plan is None:
            return None  # round 1: calibrated for the target when it is configured
        assert self.ledger is not None
        return budget_stop_reason(self.ledger, self.budget.target_epsilon)

    @property
    def released(self) -> int:
        """Rounds of this run (and of the run it resumed) the server released."""
        return 0 if self.ledger is None else self.ledger.released

    def state_dict(self) -> dict:
        """The privacy ledger's state after the last run, to resume with ε intact."""
        if self.ledger is None:
            raise RuntimeError("no run has started: there is nothing to resume from")
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume the next run from :meth:`state_dict`: ε counts the earlier rounds too.

        The earlier run's noise multiplier is kept (it must have been accounted with
        this strategy's δ, accountant and sampling rate).
        """
        self._resume = resumable_ledger(state, self.budget, self.placement)

    def _plan_distributed(self, arrays: ArrayRecord) -> None:
        """Calibrate each client's integer noise share for the target, before round 1."""
        assert self.secure is not None and self.budget.target_epsilon is not None
        plan = plan_distributed(
            self.mechanism,
            self.budget.target_epsilon,
            self.budget.delta,
            clip=self.clip_norm,
            dim=sum(int(np.prod(a.shape)) for a in arrays.values()),
            sampling_rate=self.accounted_sampling_rate,
            rounds=self.planned_rounds,
            min_clients=self.secure.min_train_replies,
            max_clients=self.secure.quantizer.max_clients,
            beta=BETA,
        )
        budget = DistributedBudget.of(
            plan, self.budget, self.clip_norm, self.secure.min_train_replies
        )
        self.distributed_plan, self.ledger = budget.plan, budget.ledger
        self.noise_multiplier, self._encoding = budget.noise_multiplier, budget.encoding

    def _fix_expected_clients(self, expected: float) -> None:
        """Fix m (the denominator and the count noise scale) once per run."""
        if not expected > 0:
            raise ValueError(
                f"the expected number of clients per round must be > 0, got {expected}"
            )
        self.expected_clients = float(expected)
        log(
            INFO,
            "ClientLevelDP: denominator m=%g expected clients per round, fixed for the run%s",
            expected,
            "" if self.fixed_expected_clients else " (the federation size is treated as public)",
        )
        if self.adaptive is not None:
            sigma_b = self.count_noise_std or self.expected_clients / 20
            self.count_noise_std_in_use = sigma_b
            self.update_noise_multiplier = adaptive_update_noise(self.noise_multiplier, sigma_b)
        else:
            self.update_noise_multiplier = self.noise_multiplier

    # -- Strategy ---------------------------------------------------------------------

    def summary(self) -> None:
        """Log the DP settings, then the inner strategy's."""
        log(
            INFO,
            "\t├──> ClientLevelDP: %s placement, %s clip norm %s, noise multiplier %.4f, "
            "δ=%g, sampling %s, %s accountant",
            self.placement,
            "adaptive" if self.adaptive else "fixed",
            self.initial_clip_norm,
            self.noise_multiplier,
            self.budget.delta,
            f"Poisson q={self.sampling_rate}"
            if self.sampling_rate
            else "by the inner strategy (no amplification claimed)",
            self.budget.accountant,
        )
        if float(getattr(self.innermost, "fraction_evaluate", 0.0)) > 0:
            log(
                WARNING,
                "ClientLevelDP: federated evaluation metrics come from clients' data without "
                "noise: they are outside the DP guarantee (evaluate on server-held data)",
            )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure, sample (Poisson) and send the clip norm."""
        config = ConfigRecord(dict(config))
        if self.placement == "client":
            config[wire.CLIP_NORM] = self.clip_norm
        if self.placement == "distributed" and self.distributed_plan is None:
            self._plan_distributed(arrays)
        self._clip_used = self.clip_norm
        if self.secure is not None:
            # Secure aggregation samples its cohort: m is its expected size, fixed once.
            if self.expected_clients is None:
                self._fix_expected_clients(
                    self.fixed_expected_clients or self.secure.expected_cohort_size()
                )
            assert self._encoding is not None
            config = wire_secagg.SumSettings(self._encoding.request_fields()).put(config)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global = arrays
        if self.secure is None:
            messages = self._configure_in_the_clear(server_round, arrays, messages, grid)
        if self.expected_clients is None:
            # Every node every round (or the distributed placement's cohort): its size
            # in round 1, a public figure, kept for the whole run.
            self._fix_expected_clients(self.fixed_expected_clients or len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (central), sum, add noise, divide by the expected count; then account."""
        assert self.ledger is not None
        if self.secure is not None:
            arrays, metrics = self._release_secure_sum(server_round, replies)
        else:
            arrays = self._aggregate_in_the_clear(server_round, replies)
            metrics = MetricRecord()
            # Charged before any check: the server has seen this round's release.
            self.ledger.charge()
        self._check_finite(server_round, arrays)
        metrics.update(
            {
                wire.METRIC_EPSILON: self.ledger.epsilon(self.released),
                wire.METRIC_DELTA: self.budget.delta,
                wire.METRIC_NOISE_MULTIPLIER: self.noise_multiplier,
                wire.METRIC_CLIP_NORM: self._clip_used,
            }
        )
        if self.adaptive is not None:
            metrics[wire.METRIC_UNCLIPPED_FRACTION] = self._unclipped_fraction
        log(
            INFO,
            "round %d: ε=%.4f at δ=%g after %d private round(s)",
            server_round,
            metrics[wire.METRIC_EPSILON],
            self.budget.delta,
            self.released,
        )
        return arrays, metrics

    def _release_secure_sum(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The distributed release: the noisy secure sum over the fixed count m."""
        assert self.secure is not None and self.ledger is not None and self._encoding
        try:
            secure_sum = self.secure.aggregate_sum(server_round, replies)
        except RoundFailedError as err:
            if err.revealed:
                # The server saw this round's noisy sum: it is a release all the same.
                self.ledger.charge()
                log(WARNING, "round %d failed after unmasking: charged", server_round)
            raise
        self.ledger.charge()
        with revealed_on_failure(server_round):  # charged once; failures stay rounds
            assert self.expected_clients is not None
            mean_delta = self._encoding.decode_sum(secure_sum.total, self.expected_clients)
            arrays, inner_metrics = self.secure.step(server_round, secure_sum, mean_delta)
        # Participation is public in the distributed placement (zero-out relation);
        # the clipped-value count is not released.
        public = {k: v for k, v in inner_metrics.items() if k in _PUBLIC_SECAGG_METRICS}
        return arrays, MetricRecord(public)

    @property
    def empty_rounds_aggregate(self) -> bool:
        """Under Poisson sampling in the clear, every round releases a noisy mean.

        Whether a round ran would otherwise depend on who was sampled (membership): a
        round with no sampled or no usable reply releases noise alone, as accounted.
        """
        return self.sampling_rate is not None
