"""Attacks on secure aggregation, one class at a time, each driven as its attacker would.

Numbers follow the round-scoped secure-aggregation issue: 0 honest-but-curious server
with ordinary dropouts, 1 stale keys, 2 per-node cohorts, 3 server-chosen parameters,
4 groups the client does not enforce, 5 different models to different clients,
6 malicious clients, 7 downgrade. The server is played through ``InProcessGrid``'s
transcript (what it saw) and ``intercept`` (what it sends); a malicious client is a mod
wrapped around ``secagg_mod``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import stage_filter as _stage
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from test_secure_aggregation import SHAPES, _expected_mean, _fedavg, _updates_app, _zeros

from flower_privacy.errors import RunHaltedError
from flower_privacy.mods import secagg_mod
from flower_privacy.secagg import groups, keys, shamir
from flower_privacy.secagg.floors import MIN_GROUP_SIZE, REQUIRED
from flower_privacy.secagg.protocol import Refusal
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.strategies import SecureAggregation
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import secagg as wire

VICTIM = 1003


def _secagg(n: int, **kwargs) -> SecureAggregation:  # noqa: ANN003
    kwargs.setdefault("min_train_replies", 3)
    return SecureAggregation(_fedavg(n), max_weight=100, **kwargs)


def _seen(
    grid: InProcessGrid, direction: str, stage: str, rnd: int, since: int = 0
) -> dict[int, dict]:
    """Payloads of ``stage`` for round ``rnd`` that crossed the grid, by node."""
    out = {}
    for entry in grid.transcript[since:]:
        content = entry.message.content if entry.message.has_content() else None
        if (
            entry.direction == direction
            and content is not None
            and stage in wire.stages_of(content)
        ):
            payload = wire.payload_of(content, stage)
            if payload.get("round") == rnd:
                out[entry.node_id] = payload
    return out


def _codes(strategy: SecureAggregation) -> set[tuple[int, str]]:
    return {(e.node, e.code) for e in strategy.refusals}


def _victim_update() -> np.ndarray:
    rng = np.random.default_rng([11, VICTIM])
    return np.concatenate([rng.uniform(-0.5, 0.5, s).reshape(-1) for s in SHAPES.values()])


# -- 0: honest-but-curious server, ordinary dropout ------------------------------------


def test_0_a_later_dropout_reveals_nothing_that_unmasks_an_earlier_round() -> None:
    grid = InProcessGrid(_updates_app(11), num_nodes=6)
    grid.drop_node(VICTIM, when=_stage(wire.TRAIN, 2), only_matching=True)
    _secagg(6).start(grid, _zeros(), num_rounds=2)
    length = sum(int(np.prod(s)) for s in SHAPES.values())
    upload = _seen(grid, "from-node", wire.UPLOAD, 1)[VICTIM]
    prepared = {
        1: _seen(grid, "from-node", wire.PREPARE, 1),
        2: _seen(grid, "from-node", wire.PREPARE, 2),
    }
    # Everything the protocol hands the server: the victim's round-1 self seed (it
    # survived) and its round-2 key (it dropped), rebuilt from the revealed shares.
    revealed = {
        1: _seen(grid, "from-node", wire.UNMASK, 1),
        2: _seen(grid, "from-node", wire.UNMASK, 2),
    }

    def rebuild(rnd: int, kind: str) -> bytes:
        shares = [
            share
            for reply in revealed[rnd].values()
            for owner, share in zip(reply[f"{kind}-of"], reply[f"{kind}-shares"], strict=True)
            if owner == VICTIM
        ]
        return shamir.combine(shares, len(shares))

    round2_key = rebuild(2, "sk")
    assert keys.public_key(round2_key) == prepared[2][VICTIM]["mask-key"]  # the attack's input
    assert keys.public_key(round2_key) != prepared[1][VICTIM]["mask-key"]  # not round 1's key
    # The old attack: strip the round-1 pairwise masks with the rebuilt key.
    from flower_privacy.secagg.prg import expand_mask
    from flower_privacy.secagg.views import RoundPairs

    nonce = _seen(grid, "to-node", wire.PREPARE, 1)[VICTIM]["nonce"]
    vector = np.frombuffer(upload["masked"], dtype="<u4").copy()
    vector -= expand_mask(rebuild(1, "b"), b"self-mask|" + _nonce_round(nonce, 1), vector.size)
    for peer in upload["tags-to"]:
        pair = RoundPairs(round2_key, VICTIM, nonce, 1).with_peer(
            prepared[1][peer]["mask-key"], peer
        )
        mask = expand_mask(pair.mask_seed(upload["view"]), b"pair-mask|", vector.size)
        vector = vector - mask if VICTIM < peer else vector + mask
    quant = Quantizer(clip_range=1.0, max_weight=100, max_clients=100)
    guess = quant.decode_sum(vector[:length], 1.0) / 100  # at most the weight cap
    # A recovered update lies in the clip range within rounding; the guess is noise of
    # the ring's size (each coordinate off by far more than the whole clip range).
    assert np.median(np.abs(guess - _victim_update())) > 10


def _nonce_round(nonce: bytes, rnd: int) -> bytes:
    from flower_privacy.secagg import canonical

    return canonical.encode([nonce, rnd])


# -- 1: stale or substituted keys (consistency option) ----------------------------------


def _signed_grid(tmp_path, n: int, seed: int = 1) -> InProcessGrid:  # noqa: ANN001
    from flower_privacy.secagg.signing import write_signing_keys

    paths, roster = write_signing_keys(tmp_path / "keys", n)
    configs = [{wire.NODE_SIGNING_KEY: str(p), wire.NODE_ROSTER: str(roster)} for p in paths]
    return InProcessGrid(_updates_app(seed), num_nodes=n, node_configs=configs)


def test_1_a_key_signed_for_an_earlier_protocol_run_is_refused(tmp_path) -> None:  # noqa: ANN001
    grid = _signed_grid(tmp_path, 5)
    strategy = _secagg(5, consistency_check=True)
    strategy.start(grid, _zeros(), num_rounds=1)
    old = _seen(grid, "to-node", wire.PREPARE, 1)[VICTIM]  # run 1's keys and signatures

    def stale(msg: Message) -> Message:
        if msg.metadata.dst_node_id == VICTIM and wire.PREPARE in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.PREPARE)
            payload.update(keys=old["keys"], signatures=old["signatures"])
            wire.put(msg.content, wire.PREPARE, payload)
        return msg

    grid.intercept(stale)
    mark = len(grid.transcript)
    strategy.start(grid, _zeros(), num_rounds=1)
    assert (VICTIM, Refusal.UNSIGNED) in _codes(strategy)
    assert VICTIM not in _seen(grid, "from-node", wire.UPLOAD, 1, since=mark)


def test_1_a_server_made_key_for_a_neighbour_is_refused(tmp_path) -> None:  # noqa: ANN001
    grid = _signed_grid(tmp_path, 5)

    def substitute(msg: Message) -> Message:
        if msg.metadata.dst_node_id == VICTIM and wire.PREPARE in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.PREPARE)
            payload["keys"] = [keys.public_key(keys.generate_private_key()), *payload["keys"][1:]]
            wire.put(msg.content, wire.PREPARE, payload)
        return msg

    grid.intercept(substitute)
    strategy = _secagg(5, consistency_check=True)
    strategy.start(grid, _zeros(), num_rounds=1)
    assert (VICTIM, Refusal.UNSIGNED) in _codes(strategy)


# -- 2: per-node views of who survived --------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_2_split_survivor_views_never_release_both_secrets_of_one_node(tmp_path, signed) -> None:  # noqa: ANN001
    n = 12
    grid = _signed_grid(tmp_path, n) if signed else InProcessGrid(_updates_app(1), num_nodes=n)
    split: set[int] = set()

    def lie(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if wire.UNMASK not in wire.stages_of(msg.content) or node == VICTIM:
            return msg
        payload = wire.payload_of(msg.content, wire.UNMASK)
        if VICTIM not in payload["tags-from"] or (len(split) % 2 and node not in split):
            return msg
        split.add(node)  # every other holder of the victim hears "the victim dropped"
        keep = [i for i, v in enumerate(payload["tags-from"]) if v != VICTIM]
        payload.update(
            survivors=[v for v in payload["survivors"] if v != VICTIM],
            dropped=sorted([*payload["dropped"], VICTIM]),
            **{"tags-from": [payload["tags-from"][i] for i in keep]},
            tags=[payload["tags"][i] for i in keep],
        )
        wire.put(msg.content, wire.UNMASK, payload)
        return msg

    grid.intercept(lie)
    strategy = _secagg(n, degree=6, consistency_check=signed)
    try:
        strategy.start(grid, _zeros(), num_rounds=1)
    except RunHaltedError:
        pass  # the round may fail: that is the server's loss, not the victim's
    replies = _seen(grid, "from-node", wire.UNMASK, 1).values()
    b_count = sum(VICTIM in r["b-of"] for r in replies)
    sk_count = sum(VICTIM in r["sk-of"] for r in replies)
    t = _seen(grid, "to-node", wire.PREPARE, 1)[VICTIM]["threshold"]
    assert split, "the attack never ran"
    assert not (b_count >= t and sk_count >= t)
    if signed:  # the signed view stops the split outright
        assert sk_count == 0 and {code for _, code in _codes(strategy)} == {Refusal.UNSIGNED}


# -- 3: the server picks the security parameters -----------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 1), ("degree", 1), ("cohort", "shrink")],
)
def test_3_parameters_below_the_clients_floors_are_refused(field, value) -> None:  # noqa: ANN001
    grid = InProcessGrid(_updates_app(1), num_nodes=6)

    def weaken(msg: Message) -> Message:
        if msg.metadata.dst_node_id == VICTIM and wire.PREPARE in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.PREPARE)
            payload[field] = [VICTIM, VICTIM + 1] if value == "shrink" else value
            wire.put(msg.content, wire.PREPARE, payload)
        return msg

    grid.intercept(weaken)
    strategy = _secagg(6)
    strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for node, code in _codes(strategy) if node == VICTIM} == {Refusal.BELOW_FLOOR}
    assert VICTIM not in _seen(grid, "from-node", wire.UPLOAD, 1)


def test_3_a_node_floor_on_colluders_raises_the_threshold_it_accepts() -> None:
    configs = [{"secagg-max-colluders": 3}] + [{}] * 5
    grid = InProcessGrid(_updates_app(1), num_nodes=6, node_configs=configs)
    strategy = _secagg(6)  # the server's threshold for c=0 is 3 of 5 holders; 1001 needs 5
    strategy.start(grid, _zeros(), num_rounds=1)
    assert (1001, Refusal.BELOW_FLOOR) in _codes(strategy)
    assert 1001 not in _seen(grid, "from-node", wire.UPLOAD, 1)


# -- 4: groups the client enforces -------------------------------------------------------


def test_4_once_grouped_a_node_refuses_rounds_without_groups_or_with_new_groups() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=6)
    _secagg(6, group_size=3).start(grid, _zeros(), num_rounds=1)
    ungrouped = _secagg(6)  # another server object: no groups at all
    with pytest.raises(RunHaltedError):
        ungrouped.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(ungrouped)} == {Refusal.GROUPS}
    regrouped = _secagg(6, group_size=3)  # a fresh group seed: a new partition
    with pytest.raises(RunHaltedError):
        regrouped.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(regrouped)} == {Refusal.GROUPS}


def test_4_a_node_config_group_floor_refuses_ungrouped_rounds() -> None:
    configs = [{MIN_GROUP_SIZE: 3}] * 6
    grid = InProcessGrid(_updates_app(1), num_nodes=6, node_configs=configs)
    strategy = _secagg(6)
    with pytest.raises(RunHaltedError):
        strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(strategy)} == {Refusal.GROUPS}
    assert _secagg(6, group_size=3).start(grid, _zeros(), num_rounds=1).arrays is not None


# -- 5: different models or configs to different clients ----------------------------------


def test_5_a_model_changed_for_all_but_the_victim_yields_no_aggregate() -> None:
    grid = InProcessGrid(_updates_app(11), num_nodes=6)

    def isolate(msg: Message) -> Message:
        if msg.metadata.dst_node_id != VICTIM and wire.TRAIN in wire.stages_of(msg.content):
            arrays = msg.content["arrays"]
            msg.content["arrays"] = ArrayRecord(
                {k: Array(arrays[k].numpy() + 1.0) for k in arrays}  # Pasquini et al.
            )
        return msg

    grid.intercept(isolate)
    strategy = _secagg(6)
    with pytest.raises(RunHaltedError) as info:
        strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(strategy)} == {Refusal.INCONSISTENT_VIEW}
    assert 1 in info.value.result.failed_rounds
    assert not _seen(grid, "from-node", wire.UNMASK, 1)  # nothing was revealed


def test_5_a_config_or_run_config_changed_for_one_node_is_caught() -> None:
    grid = InProcessGrid(_updates_app(11), num_nodes=6, run_config={"lr": 0.1})
    grid.contexts[VICTIM].run_config = {"lr": 0.0}  # a deviating SuperLink
    strategy = _secagg(6)
    with pytest.raises(RunHaltedError):
        strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(strategy)} == {Refusal.INCONSISTENT_VIEW}


def test_5_an_inner_strategy_with_per_node_configs_is_refused() -> None:
    class PerNode(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN202
            messages = list(super().configure_train(server_round, arrays, config, grid))
            for message in messages:
                lr = 0.1 if message.metadata.dst_node_id == VICTIM else 0.0
                message.content = RecordDict(
                    {"arrays": message.content["arrays"], "config": ConfigRecord({"lr": lr})}
                )
            return messages

    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    inner = PerNode(min_available_nodes=5, min_train_nodes=5, fraction_evaluate=0.0)
    strategy = SecureAggregation(inner, trust_inner_is_mean=True, max_weight=100)
    per_node = r"other content than node \d+ \(records \['config'\]\)"
    with pytest.raises(RunHaltedError, match=per_node):
        strategy.start(grid, _zeros(), num_rounds=1)


# -- 6: malicious clients -----------------------------------------------------------------


def _shifting_mod(cheater: int):  # noqa: ANN202
    def mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        reply = secagg_mod(msg, context, call_next)
        if context.node_id == cheater and wire.UNMASK in wire.stages_of(reply.content):
            payload = wire.payload_of(reply.content, wire.UNMASK)
            payload["b-shares"] = [
                s[:4] + bytes(x ^ 1 for x in s[4:8]) + s[8:] for s in payload["b-shares"]
            ]
            wire.put(reply.content, wire.UNMASK, payload)
        return reply

    return mod


def test_6_shifted_shares_are_named_and_the_round_completes_with_the_true_mean(caplog) -> None:  # noqa: ANN001
    n = 9
    grid = InProcessGrid(_updates_app(4, mods=[_shifting_mod(1002)]), num_nodes=n)
    result = _secagg(n).start(grid, _zeros(), num_rounds=1)
    assert "nodes [1002] revealed shares that fail their commitments" in caplog.text
    expected = _expected_mean(4, list(grid.contexts))
    for key in SHAPES:
        np.testing.assert_allclose(result.arrays[key].numpy(), expected[key], atol=1e-3)


def test_6_a_corrupt_share_package_is_refused_by_its_holder_naming_the_owner() -> None:
    def corrupt(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN202
        reply = secagg_mod(msg, context, call_next)
        if context.node_id == VICTIM and wire.PREPARE in wire.stages_of(reply.content):
            payload = wire.payload_of(reply.content, wire.PREPARE)
            payload["commit-b"] = [bytes(32)] * len(payload["commit-b"])
            wire.put(reply.content, wire.PREPARE, payload)
        return reply

    grid = InProcessGrid(_updates_app(1, mods=[corrupt]), num_nodes=6)
    strategy = _secagg(6)
    with pytest.raises(RunHaltedError):
        strategy.start(grid, _zeros(), num_rounds=1)
    events = [e for e in strategy.refusals if e.code == Refusal.BAD_SHARE]
    assert events and all(f"node {VICTIM}" in e.detail for e in events)


# -- 7: downgrade -------------------------------------------------------------------------


def _plain_request(grid: InProcessGrid, node: int) -> Message:
    content = RecordDict({"arrays": _zeros(), "config": ConfigRecord({"server-round": 9})})
    (reply,) = grid.send_and_receive([Message(content, node, "train")])
    return reply


def test_7_a_node_that_requires_secure_aggregation_never_sends_a_plain_update() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=3, node_configs=[{REQUIRED: True}, {}, {}])
    refused = _plain_request(grid, 1001)
    assert refused.has_error() and Refusal.DOWNGRADE in refused.error.reason
    assert not _plain_request(grid, 1002).has_error()  # nothing required, nothing taken part


def test_7_a_node_that_took_part_refuses_a_plain_request_later_in_the_run() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=4)
    _secagg(4).start(grid, _zeros(), num_rounds=1)
    reply = _plain_request(grid, 1002)
    assert reply.has_error() and Refusal.DOWNGRADE in reply.error.reason
    assert not reply.content.array_records if reply.has_content() else True


def test_plain_apps_are_untouched_by_the_mod_when_nothing_is_required() -> None:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    grid = InProcessGrid(app, num_nodes=1)
    assert not _plain_request(grid, 1001).has_error()


# -- 3 (continued): the distributed-DP noise floor belongs to the client ------------------


def test_3_a_node_noise_floor_refuses_a_server_that_scales_the_noise_down() -> None:
    from test_client_level_dp import _distributed, _unchanged_app

    from flower_privacy.dp.distributed import DistributedNoiseEncoding
    from flower_privacy.secagg.floors import MAX_COLLUDERS, MIN_NOISE_MULTIPLIER

    n = 8
    honest = InProcessGrid(_unchanged_app([secagg_mod]), num_nodes=n)
    strategy = _distributed(n, 5)
    strategy.start(honest, _zeros(), num_rounds=1)
    masking = next(
        wire.payload_of(e.message.content, wire.MASKING)
        for e in honest.transcript
        if e.direction == "to-node" and wire.TRAIN in wire.stages_of(e.message.content)
    )
    dim = sum(int(np.prod(shape)) for shape in SHAPES.values())
    z = DistributedNoiseEncoding.from_request(masking).noise_multiplier(5, dim)
    configs = [{MIN_NOISE_MULTIPLIER: 0.9 * z}] * n
    grid = InProcessGrid(_unchanged_app([secagg_mod]), num_nodes=n, node_configs=configs)
    assert _distributed(n, 5).start(grid, _zeros(), num_rounds=1).arrays is not None  # honest

    def less_noise(msg: Message) -> Message:
        if wire.MASKING in wire.stages_of(msg.content) or wire.TRAIN in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.MASKING)
            payload["dp-share-variance"] = payload["dp-share-variance"] / 100  # z / 10
            wire.put(msg.content, wire.MASKING, payload)
        return msg

    grid = InProcessGrid(_unchanged_app([secagg_mod]), num_nodes=n, node_configs=configs)
    grid.intercept(less_noise)
    attacked = _distributed(n, 5)
    with pytest.raises(RunHaltedError):
        attacked.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(attacked.strategy)} == {Refusal.BELOW_FLOOR}
    assert not _seen(grid, "from-node", wire.UPLOAD, 1)  # no node masked under less noise

    # Found in review: a smaller scale with a matching share variance keeps the server's
    # nominal figure sqrt(n v) / (scale C) but drowns the noise in rounding; the node
    # counts against the rounded update's L2 bound, so it refuses.
    def coarse(msg: Message) -> Message:
        if wire.TRAIN in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.MASKING)
            # Scale the clipped update down to a tenth of sqrt(d): rounding dominates.
            factor = payload["dp-scale"] * payload["dp-clip-norm"] / (0.1 * dim**0.5)
            payload["dp-scale"] = payload["dp-scale"] / factor
            payload["dp-share-variance"] = payload["dp-share-variance"] / factor**2
            wire.put(msg.content, wire.MASKING, payload)
        return msg

    grid = InProcessGrid(_unchanged_app([secagg_mod]), num_nodes=n, node_configs=configs)
    grid.intercept(coarse)
    attacked = _distributed(n, 5)
    with pytest.raises(RunHaltedError):
        attacked.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(attacked.strategy)} == {Refusal.BELOW_FLOOR}
    # Colluders the node declares add no noise: the same honest request falls short.
    wary = [{MIN_NOISE_MULTIPLIER: 0.9 * z, MAX_COLLUDERS: 2}] * n
    grid = InProcessGrid(_unchanged_app([secagg_mod]), num_nodes=n, node_configs=wary)
    with pytest.raises(RunHaltedError):
        _distributed(n, 5).start(grid, _zeros(), num_rounds=1)


# -- found in review: replayed runs, unbound masking settings, train.<action>, groups ---


def test_1_an_ended_protocol_run_cannot_be_replayed() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=5)
    strategy = _secagg(5)
    strategy.start(grid, _zeros(), num_rounds=1)
    first_nonce = strategy.protocol.nonce
    strategy.start(grid, _zeros(), num_rounds=1)  # a second protocol run

    def rollback(msg: Message) -> Message:
        for stage in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, stage)
            wire.put(msg.content, stage, {**payload, "nonce": first_nonce})
        return msg

    grid.intercept(rollback)
    with pytest.raises(RunHaltedError):
        strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(strategy)} == {Refusal.REPLAY}
    # Each run had its own sealing keys: run 1's packages open under no later key.
    sealing: dict[int, list[bytes]] = {}
    for entry in grid.transcript:
        content = entry.message.content if entry.message.has_content() else None
        if entry.direction == "from-node" and content and wire.ADVERTISE in wire.stages_of(content):
            payload = wire.payload_of(content, wire.ADVERTISE)
            if "lt-key" in payload:
                sealing.setdefault(entry.node_id, []).append(payload["lt-key"])
    assert all(len(v) == 2 and v[0] != v[1] for v in sealing.values()) and len(sealing) == 5


def test_5_masking_settings_shown_to_one_node_only_are_caught() -> None:
    grid = InProcessGrid(_updates_app(11), num_nodes=6)

    def coarsen(msg: Message) -> Message:
        if msg.metadata.dst_node_id != VICTIM and wire.TRAIN in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.MASKING)
            wire.put(msg.content, wire.MASKING, {**payload, "max-clients": 2**20})
        return msg

    grid.intercept(coarsen)
    strategy = _secagg(6)
    with pytest.raises(RunHaltedError):
        strategy.start(grid, _zeros(), num_rounds=1)
    assert {code for _, code in _codes(strategy)} == {Refusal.INCONSISTENT_VIEW}
    assert not _seen(grid, "from-node", wire.UNMASK, 1)


def test_7_a_train_action_message_is_training_too() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=3, node_configs=[{REQUIRED: True}, {}, {}])
    content = RecordDict({"arrays": _zeros(), "config": ConfigRecord({"server-round": 9})})
    (reply,) = grid.send_and_receive([Message(content, 1001, "train.default")])
    assert reply.has_error() and Refusal.DOWNGRADE in reply.error.reason


def _seed_for_another_partition(payload: dict) -> bytes:
    """A seed whose groups differ from the server's: some seeds give the same partition."""
    generations = groups.unflatten(
        list(payload["generation-nodes"]), list(payload["generation-sizes"])
    )
    size = payload["group-size"]

    def partition(seed: bytes) -> set[frozenset[int]]:
        return {frozenset(g) for g in groups.groups_from_generations(generations, size, seed)}

    real = partition(payload["group-seed"])
    for i in range(100):
        seed = b"another partition %d" % i
        if partition(seed) != real:
            return seed
    raise AssertionError("no seed gives another partition")


def test_4_one_node_shown_another_partition_cannot_be_aggregated_with_the_rest() -> None:
    grid = InProcessGrid(_updates_app(1), num_nodes=9)

    def other_partition(msg: Message) -> Message:
        if msg.metadata.dst_node_id == VICTIM and wire.PREPARE in wire.stages_of(msg.content):
            payload = wire.payload_of(msg.content, wire.PREPARE)
            seed = _seed_for_another_partition(payload)
            wire.put(msg.content, wire.PREPARE, {**payload, "group-seed": seed})
        return msg

    grid.intercept(other_partition)
    strategy = _secagg(9, group_size=3, max_failed_rounds=2)
    try:
        strategy.start(grid, _zeros(), num_rounds=2)
    except RunHaltedError:
        pass
    assert {code for _, code in _codes(strategy)} <= {Refusal.GROUPS, Refusal.INCONSISTENT_VIEW}
    assert strategy.refusals
    assert all(VICTIM not in members for members in strategy.plan.history)
