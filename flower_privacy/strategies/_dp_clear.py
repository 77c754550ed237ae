"""Client-level DP in the clear (central and client placements): clip, sum, noise, adapt.

A mixin of :class:`~flower_privacy.strategies.client_level_dp.ClientLevelDP`: the server
sees each update, clips it (or checks the client's clipping), adds Gaussian noise to the
sum over the fixed denominator m, and moves the clip norm (adaptive clipping).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from flower_privacy._arrays import add_flat
from flower_privacy.dp.clipping import clip_l2, noisy_unclipped_fraction
from flower_privacy.dp.noise import add_gaussian_noise, snap
from flower_privacy.wire import dp as wire

# Relative slack for a client-clipped update whose weights went through float32.
_CLIP_SLACK = 1e-3


class InTheClear:
    """The placements in which the server sees updates: sampling, checks and release."""

    def _configure_in_the_clear(
        self, server_round: int, arrays: ArrayRecord, messages: list[Message], grid: Grid
    ) -> list[Message]:
        """Keep the global model to check updates against; Poisson-sample the messages."""
        # Updates are computed (and, client placement, checked) against these.
        self._global_flat = np.concatenate(
            [a.numpy().astype(np.float64).reshape(-1) for a in arrays.values()]
        )
        self._global_norm = float(np.linalg.norm(self._global_flat))
        self._checked_deltas: dict[int, tuple[np.ndarray, bool]] = {}
        connected = sorted(grid.get_node_ids())
        addressed = sorted(m.metadata.dst_node_id for m in messages)
        if addressed != connected:
            raise ValueError(
                f"the inner strategy addressed {len(addressed)} of {len(connected)} "
                "connected nodes; ClientLevelDP needs every node (fraction_train=1.0): "
                "it samples itself with sampling_rate (Poisson), and a fixed-size sample "
                "would let one client push another out, doubling the sensitivity"
            )
        if self.sampling_rate is None:
            return messages
        # Each node independently with probability q (CSPRNG-seeded generator).
        keep = {n for n in addressed if self._rng.random() < self.sampling_rate}
        self._sent_to[server_round] = sorted(keep)
        log(INFO, "ClientLevelDP: Poisson sample of %d of %d nodes", len(keep), len(addressed))
        return [m for m in messages if m.metadata.dst_node_id in keep]

    def _reply_problem(self, reply: Message) -> str | None:
        problem = super()._reply_problem(reply)
        if problem is not None or self.placement != "client":
            return problem
        metrics = [r for r in reply.content.metric_records.values() if wire.UNCLIPPED in r]
        if not metrics or metrics[0][wire.UNCLIPPED] not in (0, 1):
            return (
                f"no {wire.UNCLIPPED!r} metric of 0 or 1: is client_clipping_mod in the "
                "ClientApp, as ClientApp(mods=[client_clipping_mod])?"
            )
        delta = self._delta(reply)
        self._checked_deltas[id(reply)] = (delta, bool(metrics[0][wire.UNCLIPPED]))
        norm = float(np.linalg.norm(delta))
        if norm > self.clip_norm * (1 + _CLIP_SLACK) + 1e-6 * self._global_norm:
            return f"update norm {norm:.6g} exceeds the clip norm {self.clip_norm:.6g}"
        return None

    def _delta(self, reply: Message) -> np.ndarray:
        """The reply's update: its weights minus the global ones, flat, in float64."""
        assert self._global is not None
        local = next(iter(reply.content.array_records.values()))
        flat = np.concatenate(
            [local[k].numpy().astype(np.float64).reshape(-1) for k in self._global.keys()]
        )
        return flat - self._global_flat

    def _aggregate_in_the_clear(self, server_round: int, replies: Iterable[Message]) -> ArrayRecord:
        usable = self._usable_replies(
            server_round, replies, minimum=0 if self.empty_rounds_aggregate else None
        )
        assert self._global is not None
        total = np.zeros(self._global_flat.size)
        unclipped = 0
        for reply in usable:
            if self.placement == "client":
                # Checked by _reply_problem; re-clipping only removes float32 slack.
                delta, fitted = self._checked_deltas.pop(id(reply))
                clipped, _ = clip_l2(delta, self.clip_norm)
            else:
                clipped, was_clipped = clip_l2(self._delta(reply), self.clip_norm)
                fitted = not was_clipped
            unclipped += fitted
            total += clipped
        mean_delta = self._noisy_mean(total / self.expected_clients)
        # The inner strategy's own metrics are aggregates of clients' un-noised
        # metrics: they are not released.
        arrays, _ = self._aggregate_as_one_reply(
            server_round, add_flat(self._global, mean_delta), weight=1
        )
        self._update_clip(unclipped, len(usable))
        return arrays

    def _noisy_mean(self, mean_delta: np.ndarray) -> np.ndarray:
        """Mean of clipped updates (sum over m) plus N(0, (z_Δ·C/m)²) per coordinate."""
        assert self.expected_clients is not None and self.update_noise_multiplier is not None
        std = self.update_noise_multiplier * self.clip_norm / self.expected_clients
        return add_gaussian_noise(mean_delta, std, self._rng)

    def _update_clip(self, unclipped: int, participants: int) -> None:
        if self.adaptive is None:
            return
        sigma_b = self.count_noise_std_in_use
        noise = float(snap(np.array([self._rng.normal(0.0, sigma_b)]), sigma_b)[0])
        assert self.expected_clients is not None
        fraction = noisy_unclipped_fraction(unclipped, participants, self.expected_clients, noise)
        self._unclipped_fraction = fraction
        self.clip_norm = self.adaptive.next_clip_norm(self.clip_norm, fraction)
