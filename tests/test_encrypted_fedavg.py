"""EncryptedFedAvg + encryption_mod on the in-process grid: results, leaks, refusals."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import initial_arrays, make_toy_client_app, run_cli
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg
from test_digits_app import DEFAULTS

from flower_privacy import he
from flower_privacy.errors import RunHaltedError
from flower_privacy.he.envelope import Envelope
from flower_privacy.mods import EncryptionMod
from flower_privacy.mods.encryption_mod import CANNOT_ENCRYPT
from flower_privacy.strategies import EncryptedFedAvg, StrictRounds
from flower_privacy.strategies.encrypted_fedavg import encrypted_model_bytes
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import he as wire

LIMITS = he.DeclaredLimits(max_clients=10, max_weight=100, clip_range=16.0, precision_bits=16)
DIM = 6000  # two BFV chunks


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("he-keys")
    return he.generate_keys(folder, he.derive_parameters("bfv", LIMITS))


def _strategy(server_ctx, **kwargs) -> EncryptedFedAvg:
    limits = {**LIMITS.to_dict(), **kwargs.pop("limits", {})}
    inner = kwargs.pop("inner", None) or FedAvg(min_available_nodes=3, fraction_evaluate=1.0)
    return EncryptedFedAvg(inner, server_context=server_ctx, **limits, **kwargs)


def _app(client_ctx, *extra_mods) -> ClientApp:
    return make_toy_client_app(app=ClientApp(mods=[*extra_mods, EncryptionMod(client_ctx)]))


def test_encrypted_fedavg_matches_plain_fedavg_and_saves_the_model(keys, tmp_path) -> None:
    client_ctx, server_ctx = keys
    plain = StrictRounds(FedAvg(min_available_nodes=3)).start(
        InProcessGrid(make_toy_client_app(), 3), initial_arrays(DIM), num_rounds=2
    )
    saved = tmp_path / "model.fphe"
    strategy = _strategy(server_ctx, save_path=saved)
    result = strategy.start(InProcessGrid(_app(client_ctx), 3), initial_arrays(DIM), num_rounds=2)
    assert sorted(result.train_metrics_clientapp) == [1, 2] and not result.failed_rounds
    assert result.train_metrics_clientapp[2]["he-clients"] == 3
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]  # federated evaluation
    blob = encrypted_model_bytes(result.arrays)
    assert saved.read_bytes() == blob
    decrypted = he.decrypt_model(he.HEContext.load(client_ctx), blob)
    # Weighted mean of global + (pid + 1) with weights pid + 1, two rounds: 2 * 14/6.
    expected = plain.arrays["w"].numpy()
    assert np.allclose(expected, 2 * 14 / 6)
    assert np.max(np.abs(decrypted.arrays["w"] - expected)) <= 1 / 2**16
    assert decrypted.total_weight == 6 and decrypted.contributors == 3
    # The key holder's command recovers the same model, into a file only they can read.
    out = tmp_path / "model.npz"
    cli = run_cli("he", "decrypt", str(saved), "--context", str(client_ctx), "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    assert np.array_equal(np.load(out)["w"], decrypted.arrays["w"])
    assert out.stat().st_mode & 0o777 == 0o600
    other = tmp_path / "other.npz"
    refused = run_cli(
        "he", "decrypt", str(saved), "--context", str(server_ctx), "--out", str(other)
    )
    assert refused.returncode == 2 and "cannot decrypt" in refused.stderr
    assert not other.exists()


def test_he_decrypt_never_overwrites_without_force(keys, tmp_path) -> None:
    client_ctx, server_ctx = keys
    saved = tmp_path / "model.fphe"
    _strategy(server_ctx, save_path=saved).start(
        InProcessGrid(_app(client_ctx), 3), initial_arrays(), num_rounds=1
    )
    out = tmp_path / "model.npz"
    out.write_bytes(b"precious")
    out.chmod(0o644)
    args = ("he", "decrypt", str(saved), "--context", str(client_ctx), "--out", str(out))
    kept = run_cli(*args)
    assert kept.returncode == 2 and "exists already (pass --force" in kept.stderr
    assert out.read_bytes() == b"precious"
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "w" in np.load(out) and out.stat().st_mode & 0o777 == 0o600


def test_the_server_never_sees_an_update_a_count_or_the_model(keys) -> None:
    client_ctx, server_ctx = keys
    grid = InProcessGrid(_app(client_ctx), 3)
    strategy = _strategy(server_ctx)
    strategy.start(grid, initial_arrays(DIM), num_rounds=2)
    assert not strategy.context.is_private
    for entry in grid.transcript:
        content = entry.message.content if entry.message.has_content() else RecordDict()
        for record in content.array_records.values():
            assert list(record.keys()) == [wire.CIPHERTEXT], entry  # never a plain array
            Envelope.from_bytes(record[wire.CIPHERTEXT].data)  # an envelope, nothing else
        if entry.direction == "from-node" and entry.message_type == "train":
            assert not content.metric_records  # no num-examples, no metrics
            assert set(content.keys()) == {wire.RECORD, "arrays"}


def test_contexts_and_inner_strategies_that_cannot_work_are_refused(keys) -> None:
    client_ctx, server_ctx = keys
    with pytest.raises(he.KeyRoleError, match="holds the secret key"):
        _strategy(client_ctx)
    with pytest.raises(TypeError, match="FedAdam cannot run on encrypted updates"):
        _strategy(server_ctx, inner=FedAdam())
    with pytest.raises(he.CapacityError, match="max_clients=50"):
        _strategy(server_ctx, limits={"max_clients": 50})
    with pytest.raises(ValueError, match="evaluate_fn is not possible"):
        _strategy(server_ctx).start(
            InProcessGrid(_app(client_ctx), 3), initial_arrays(), evaluate_fn=lambda r, a: None
        )
    # Under another layer too: the run's input and output pass down the stack.
    with pytest.raises(ValueError, match="evaluate_fn is not possible"):
        StrictRounds(_strategy(server_ctx)).start(
            InProcessGrid(_app(client_ctx), 3), initial_arrays(), evaluate_fn=lambda r, a: None
        )


def test_more_nodes_than_max_clients_fail_the_round_before_anyone_encrypts(keys) -> None:
    client_ctx, server_ctx = keys
    grid = InProcessGrid(_app(client_ctx), 3)
    with pytest.raises(RunHaltedError, match="3 nodes selected but max_clients=2"):
        _strategy(server_ctx, limits={"max_clients": 2}).start(grid, initial_arrays(), num_rounds=1)
    assert not any(e.message_type == "train" for e in grid.transcript)


def test_a_client_without_the_mod_or_the_key_fails_loudly(keys, tmp_path) -> None:
    _, server_ctx = keys
    with pytest.raises(RunHaltedError, match="0 usable encrypted uploads"):
        _strategy(server_ctx).start(InProcessGrid(make_toy_client_app(), 3), initial_arrays())
    no_key = make_toy_client_app(app=ClientApp(mods=[EncryptionMod()]))
    with pytest.raises(RunHaltedError, match="no usable secret context"):
        _strategy(server_ctx).start(InProcessGrid(no_key, 3), initial_arrays())
    other_client, _ = he.generate_keys(tmp_path, he.derive_parameters("bfv", LIMITS))
    with pytest.raises(RunHaltedError, match="encryption_mod refused .* failed verification"):
        _strategy(server_ctx).start(InProcessGrid(_app(other_client), 3), initial_arrays())


def test_refusals_tell_the_server_nothing_the_client_log_has_the_detail(keys, caplog) -> None:
    """A refusal is a bit for the server; which check failed stays in the node's log."""
    client_ctx, server_ctx = keys
    no_key = make_toy_client_app(app=ClientApp(mods=[EncryptionMod()]))
    with pytest.raises(RunHaltedError) as halted:
        _strategy(server_ctx).start(InProcessGrid(no_key, 3), initial_arrays())
    assert "he-context" not in str(halted.value)
    assert "no secret context: give the node config he-context" in caplog.text

    def fractional_weight(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            reply.content["metrics"]["num-examples"] = 12.5
        return reply

    # Inside the encryption mod: the app reports a fractional example count.
    app = make_toy_client_app(app=ClientApp(mods=[EncryptionMod(client_ctx), fractional_weight]))
    grid = InProcessGrid(app, 3)
    caplog.clear()
    with pytest.raises(RunHaltedError) as halted:
        _strategy(server_ctx).start(grid, initial_arrays())
    replies = [e.message for e in grid.transcript if e.direction == "from-node"]
    reasons = {m.error.reason for m in replies if m.has_error()}
    assert reasons == {"flower_privacy.mods.encryption_mod refused (train): " + CANNOT_ENCRYPT}
    assert "12.5" not in str(halted.value) and "whole number" not in str(halted.value)
    assert "num-examples must be a whole number, got 12.5" in caplog.text


def _leak_plaintext(msg: Message, context, call_next) -> Message:  # noqa: ANN001
    """A misconfigured node: its reply is the plaintext model."""
    call_next(msg, context)
    return Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(DIM, np.float32))})}),
        reply_to=msg,
    )


def test_a_plaintext_reply_fails_the_round_and_is_not_aggregated(keys) -> None:
    client_ctx, server_ctx = keys

    def only_node_1003(msg, context, call_next):  # noqa: ANN001, ANN202
        if context.node_id == 1003 and msg.metadata.message_type == "train":
            return _leak_plaintext(msg, context, call_next)
        return call_next(msg, context)

    with pytest.raises(RunHaltedError, match=r"node 1003 sent plaintext records \['arrays'\]"):
        _strategy(server_ctx).start(
            InProcessGrid(_app(client_ctx, only_node_1003), 3), initial_arrays(DIM)
        )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"metrics": MetricRecord({"num-examples": 7})}, "metrics (MetricRecord)"),
        ({"config": ConfigRecord({"note": "x"})}, "config (ConfigRecord)"),
        ({wire.RECORD: ConfigRecord({wire.STAGE: wire.UPDATE, "loss": 0.5})}, "he (ConfigRecord)"),
    ],
    ids=["metric-record", "config-record", "marker-with-extra-keys"],
)
def test_plaintext_records_next_to_the_ciphertext_fail_the_round(keys, extra, named) -> None:
    """Exactly the marker and the ciphertext, or the reply counts as plaintext."""
    client_ctx, server_ctx = keys

    def add_records(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if context.node_id == 1002 and msg.metadata.message_type == "train":
            for key, record in extra.items():
                reply.content[key] = record
        return reply

    with pytest.raises(
        RunHaltedError, match=rf"node 1002 sent plaintext records \[.{re.escape(named)}"
    ):
        _strategy(server_ctx).start(
            InProcessGrid(_app(client_ctx, add_records), 3), initial_arrays(DIM)
        )


def test_a_node_with_a_key_refuses_a_server_that_does_not_encrypt(keys, tmp_path) -> None:
    """H1: a plain FedAvg server gets refusals from keyed nodes, never a plaintext model."""
    client_ctx, _ = keys
    apps = {
        "constructor path": (_app(client_ctx), None),
        "node config": (
            make_toy_client_app(app=ClientApp(mods=[EncryptionMod()])),
            [{"he-context": str(client_ctx)}] * 3,
        ),
        "locator and rule": (
            make_toy_client_app(
                app=ClientApp(
                    mods=[EncryptionMod(lambda c: client_ctx, require_encryption=lambda c: True)]
                )
            ),
            None,
        ),
    }
    for name, (app, node_configs) in apps.items():
        grid = InProcessGrid(app, 3, node_configs=node_configs)
        with pytest.raises(RunHaltedError, match="requires encryption"):
            StrictRounds(FedAvg(min_available_nodes=3)).start(grid, initial_arrays(DIM))
        replies = [e.message for e in grid.transcript if e.direction == "from-node"]
        assert len(replies) == 3, name
        assert all(m.has_error() and "requires encryption" in m.error.reason for m in replies)
    # Evaluate messages too (a server that only evaluates a plaintext model).
    app = _app(client_ctx)
    grid = InProcessGrid(app, 3)
    message = Message(RecordDict({"arrays": initial_arrays()}), 1001, "evaluate")
    replies = list(grid.send_and_receive([message]))
    assert replies[0].has_error() and "requires encryption" in replies[0].error.reason
    # A locator without a rule, and no he-context in any config: plain runs pass through.
    passthrough = make_toy_client_app(app=ClientApp(mods=[EncryptionMod(lambda c: client_ctx)]))
    StrictRounds(FedAvg(min_available_nodes=3)).start(
        InProcessGrid(passthrough, 3), initial_arrays(), num_rounds=1
    )


def _corrupt(kind: str, other_ctx: he.HEContext):  # noqa: ANN202
    """An outer mod that corrupts node 1003's encrypted upload in one way."""

    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if context.node_id != 1003 or msg.metadata.message_type != "train":
            return reply
        blob = bytes(reply.content["arrays"][wire.CIPHERTEXT].data)
        if kind == "truncated":
            blob = blob[: len(blob) - 1000]
        elif kind == "tampered":
            env = Envelope.from_bytes(blob)
            blob = replace(
                env,
                chunks=(env.chunks[0][:200] + bytes(200) + env.chunks[0][400:], *env.chunks[1:]),
            ).to_bytes()
        elif kind == "other-key":
            model = {"w": np.zeros(DIM, np.float32)}
            blob = he.encrypt_model(other_ctx, model, 1, LIMITS).envelope.to_bytes()
        elif kind == "wrong-shape":
            model = {"w": np.zeros(DIM + 1, np.float32)}
            ctx = he.HEContext.load(context.node_config["he-context"])
            blob = he.encrypt_model(ctx, model, 1, LIMITS).envelope.to_bytes()
        return Message(wire.update_content("arrays", blob), reply_to=msg)

    return mod


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated or padded ciphertext"),
        ("tampered", "chunk 0 is not a valid ciphertext"),
        ("other-key", "made under another key"),
        ("wrong-shape", r"shape does not match the model: .*wrong shape or dtype \['w'\]"),
    ],
)
def test_a_bad_upload_is_named_and_left_out(keys, tmp_path, caplog, kind, message) -> None:
    client_ctx, server_ctx = keys
    other_client, _ = he.generate_keys(tmp_path, he.derive_parameters("bfv", LIMITS))
    app = make_toy_client_app(
        app=ClientApp(mods=[_corrupt(kind, he.HEContext.load(other_client)), EncryptionMod()])
    )
    grid = InProcessGrid(app, 3, node_configs=[{"he-context": str(client_ctx)}] * 3)
    result = _strategy(server_ctx).start(grid, initial_arrays(DIM), num_rounds=1)
    assert re.search(f"rejected the upload of node 1003: {message}", caplog.text)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["he-clients"] == 2 and metrics["he-rejected"] == 1
    model = he.decrypt_model(he.HEContext.load(client_ctx), encrypted_model_bytes(result.arrays))
    assert model.contributors == 2 and model.total_weight == 1 + 2  # nodes 1001 and 1002


def _swap_first_chunk(msg: Message, key: he.HEContext) -> None:
    """Replace the global model's first chunk by an encryption of zeros (same key)."""
    env = Envelope.from_bytes(msg.content["arrays"][wire.CIPHERTEXT].data)
    fake = he.encrypt_model(key, {"w": np.zeros(DIM, np.float32)}, 1, LIMITS).envelope
    forged = replace(env, chunks=(fake.chunks[0], *env.chunks[1:]))
    msg.content["arrays"] = wire.ciphertext_record(forged.to_bytes())


def test_a_tampered_global_model_is_refused_by_every_client(keys, tmp_path, caplog) -> None:
    client_ctx, server_ctx = keys
    grid = InProcessGrid(_app(client_ctx), 3)
    zero = he.HEContext.load(client_ctx)

    def swap_a_chunk(msg: Message) -> Message:
        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 2:
            _swap_first_chunk(msg, zero)
        return msg

    grid.intercept(swap_a_chunk)
    saved = tmp_path / "model.fphe"
    with pytest.raises(RunHaltedError, match="round 2 failed .*failed verification"):
        _strategy(server_ctx, save_path=saved).start(grid, initial_arrays(DIM), num_rounds=2)
    refusals = [
        e
        for e in grid.transcript
        if e.direction == "from-node" and e.message_type == "train" and e.message.has_error()
    ]
    sent = [e for e in grid.transcript if e.direction == "to-node" and e.message_type == "train"]
    assert len(sent) == 6  # 3 nodes, 2 rounds
    assert sorted(e.node_id for e in refusals) == [1001, 1002, 1003]  # every client
    assert caplog.text.count("canary check failed in 1 of 2 chunks") == 3  # client logs
    # The model the clients refused is not saved.
    assert not saved.exists()


def test_a_global_model_refused_at_evaluation_fails_the_round_and_is_not_saved(
    keys, tmp_path
) -> None:
    client_ctx, server_ctx = keys
    grid = InProcessGrid(_app(client_ctx), 3)
    key = he.HEContext.load(client_ctx)

    def forge_evaluate(msg: Message) -> Message:
        if msg.metadata.message_type == "evaluate":
            _swap_first_chunk(msg, key)
        return msg

    grid.intercept(forge_evaluate)
    saved = tmp_path / "model.fphe"
    # Recorded as a failed round by StrictRounds, which then halts the run.
    with pytest.raises(RunHaltedError, match="evaluation refused: .*failed verification"):
        _strategy(server_ctx, save_path=saved).start(grid, initial_arrays(DIM), num_rounds=1)
    assert not saved.exists()


def test_the_keys_command_writes_a_usable_pair(tmp_path) -> None:
    out = tmp_path / "keys"
    done = run_cli(
        "keys", "generate", "--out", str(out), "--max-clients", "10", "--max-weight", "100"
    )
    assert done.returncode == 0, done.stderr
    assert "BFV N=4096" in done.stdout and "mode 0600" in done.stdout
    assert (out / "client.ctx").stat().st_mode & 0o777 == 0o600
    assert not he.HEContext.load(out / "server.ctx").is_private
    again = run_cli("keys", "generate", "--out", str(out))
    assert again.returncode == 2 and "key files exist already" in again.stderr
    bad = run_cli("keys", "generate", "--out", str(tmp_path / "x"), "--max-clients", "0")
    assert (
        bad.returncode == 2 and "max_clients must be an integer in [1, 100000], got 0" in bad.stderr
    )


def test_digits_with_he_matches_plain_fedavg_under_federated_evaluation(
    caplog, monkeypatch, tmp_path
) -> None:
    """Same seed, federated evaluation for both: within 1 point of accuracy."""
    import tempfile

    from digits_app import server_app
    from digits_app.client_app import app as client_app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the simulated run's keys

    monkeypatch.setattr(server_app, "SERVER_SEES_MODEL", set())  # plain: federated too
    # Reproducible stochastic rounding (tests only): the comparison is one fixed sample,
    # not a draw that lands within the bound most of the time.
    from flower_privacy.he import codec

    draws = iter(range(1_000_000))
    original = codec.uniform_01
    monkeypatch.setattr(
        codec, "uniform_01", lambda n, test_seed=None: original(n, test_seed=next(draws))
    )

    def accuracy(privacy: str) -> float:
        caplog.clear()
        cfg = {**DEFAULTS, "privacy": privacy, "seed": 7}
        InProcessGrid(client_app, 10, run_config=cfg, run_id=7_000_001).run_server_app(
            server_app.app
        )
        lines = [r.getMessage() for r in caplog.records if "final accuracy" in r.getMessage()]
        return float(lines[-1].split(":")[1])

    plain = accuracy("none")
    encrypted = accuracy("he")
    assert "added 10 encrypted updates" in caplog.text
    key_dir = next(tmp_path.glob("flower-privacy-*/he-run-7000001"))
    assert (key_dir / "final-model.fphe").exists() and (key_dir / "client.ctx").exists()
    assert abs(encrypted - plain) <= 0.01, f"he {encrypted:.3f} vs plain {plain:.3f}"


def test_metrics_record_is_not_forwarded(keys) -> None:
    """The app's train metrics (loss, num-examples) stay on the client."""
    client_ctx, server_ctx = keys
    grid = InProcessGrid(_app(client_ctx), 3)
    result = _strategy(server_ctx).start(grid, initial_arrays(), num_rounds=1)
    assert set(result.train_metrics_clientapp[1]) == {"he-clients", "he-rejected"}
    assert isinstance(result.train_metrics_clientapp[1], MetricRecord)


def test_digits_deals_keys_only_in_a_declared_simulation(monkeypatch, tmp_path) -> None:
    """H2: no he-server-context outside a simulation (or with the switch off) is an error;
    nodes fall back to the simulation keys only with the switch on."""
    import tempfile

    from digits_app import he_keys, server_app
    from digits_app.client_app import app as client_app
    from flwr.app import Context
    from flwr.superlink.grid import InMemoryGrid

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    inner = FedAvg(min_available_nodes=3)
    for simulation, cfg in [
        (False, {"he-simulation-keys": True}),
        (True, {}),
        (True, {"he-simulation-keys": False}),
    ]:
        with pytest.raises(he.HEConfigError, match="he-server-context required .*keys generate"):
            he_keys.build_strategy(inner, cfg, run_id=5, simulation=simulation)
    assert not list(tmp_path.glob("flower-privacy-*/he-run-5"))  # no key was made
    assert he_keys.is_simulation(InProcessGrid(make_toy_client_app(), 1))
    assert he_keys.is_simulation(InMemoryGrid.__new__(InMemoryGrid))
    assert not he_keys.is_simulation(object())  # e.g. a deployment's grid

    def node(run_config: dict) -> Context:
        return Context(
            run_id=5, node_id=1, node_config={}, state=RecordDict(), run_config=run_config
        )

    with pytest.raises(he.HEConfigError, match="no secret context: give this node"):
        he_keys.locate_client_context(node({"privacy": "he"}))
    assert he_keys.locate_client_context(node({"he-simulation-keys": True})) == (
        he_keys.simulation_key_dir(5) / he.CLIENT_CONTEXT
    )
    # The ServerApp in a "deployment" run config (switch off): refuses before round 1.
    assert DEFAULTS["he-simulation-keys"] is True  # `flwr run` simulations work as shipped
    cfg = {**DEFAULTS, "privacy": "he", "he-simulation-keys": False}
    with pytest.raises(he.HEConfigError, match="he-server-context required"):
        InProcessGrid(client_app, 2, run_config=cfg).run_server_app(server_app.app)
    # A digits node in an "he" run refuses a plaintext model (H1, the fallback locator).
    grid = InProcessGrid(client_app, 1, run_config={**DEFAULTS, "privacy": "he"})
    message = Message(RecordDict({"arrays": initial_arrays()}), 1001, "train")
    (reply,) = grid.send_and_receive([message])
    assert reply.has_error() and "requires encryption" in reply.error.reason


def test_bench_he_prints_one_json_object_with_every_figure() -> None:
    import json

    done = run_cli("bench", "he", "--quick", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is the JSON object alone
    for name in ("ours", "ckks", "nvflare_style"):
        for key in ("expansion", "encrypt_s", "aggregate_s", "decrypt_s", "max_abs_error"):
            assert result[name][key] > 0, (name, key)
    assert result["pool_start_s"] > 0
    assert result["ours"]["max_abs_error"] <= 1e-4
