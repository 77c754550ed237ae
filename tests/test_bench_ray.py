"""The training synthetic app on Flower's Ray backend, through ``bench secagg --ray``'s code."""

from __future__ import annotations

import pytest

from flower_privacy.bench import ray_sim

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
RAY_FIELDS = {"clients", "per_round", "fedavg_round_s", "secagg_round_s", "peak_rss_mib"}


def test_training_clients_complete_secagg_with_groups_and_dropouts_on_ray(
    no_leftover_processes,  # noqa: ANN001
) -> None:
    # Node ids (and so who drops) are random per Ray run. 15 groups of 2 a round, 20%
    # dropping: a round fails only if every sampled group loses a member (0.36^15 =
    # 2e-7 a round); no secure round sees a dropout with probability 0.8^60 = 1.5e-6.
    result = ray_sim.run(
        clients=40, per_round=30, rounds=2, dropout=0.2, group_size=2, local_epochs=1
    )
    assert RAY_FIELDS <= set(result)
    assert (result["clients"], result["per_round"]) == (40, 30)
    timed = ("fedavg_round_s", "secagg_round_s", "client_train_s", "client_solo_train_s")
    assert all(result[k] > 0 for k in timed)
    assert len(result["fedavg_rounds_s"]) == len(result["secagg_rounds_s"]) == 2
    # Round 2's exchanges: FedAvg trains; ours trains and unmasks (no next round to prepare).
    assert set(result["fedavg_exchanges"]) == {"train"}
    assert set(result["secagg_exchanges"]) == {"train", "unmask"}
    # Each secure round summed whole groups of survivors; the rest of the 30 sampled
    # dropped (simulated dropouts, and their group partners, left out).
    for survivors, dropped, excluded in zip(
        result["secagg_survivors"], result["secagg_dropped"], result["secagg_excluded"], strict=True
    ):
        assert survivors >= 2 and survivors % 2 == 0
        assert survivors + dropped == 30 and excluded <= dropped
    assert sum(result["secagg_dropped"]) > 0
    # The sampler saw the Ray workers, not just this process.
    assert any("ClientAppActor" in p for p in result["peak_rss_processes"])
    assert result["peak_rss_mib"] > 200
