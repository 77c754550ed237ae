"""EncryptedFedAvg + encryption_mod on the in-process grid: results, leaks, refusals."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_APP, initial_arrays, make_toy_client_app, run_cli
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from flower_privacy import _he_wire as wire
from flower_privacy import he
from flower_privacy.errors import RunHaltedError
from flower_privacy.he.envelope import Envelope
from flower_privacy.mods import EncryptionMod
from flower_privacy.strategies import EncryptedFedAvg, StrictRounds
from flower_privacy.strategies.encrypted_fedavg import encrypted_model_bytes
from flower_privacy.testing import InProcessGrid

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
    # The key holder's command recovers the same model.
    out = tmp_path / "model.npz"
    cli = run_cli("he", "decrypt", str(saved), "--context", str(client_ctx), "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    assert np.array_equal(np.load(out)["w"], decrypted.arrays["w"])
    refused = run_cli("he", "decrypt", str(saved), "--context", str(server_ctx), "--out", str(out))
    assert refused.returncode == 2 and "cannot decrypt" in refused.stderr


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
    with pytest.raises(RunHaltedError, match="no secret context: give the node config he-context"):
        _strategy(server_ctx).start(InProcessGrid(no_key, 3), initial_arrays())
    other_client, _ = he.generate_keys(tmp_path, he.derive_parameters("bfv", LIMITS))
    with pytest.raises(RunHaltedError, match="encryption_mod refused .* made under another key"):
        _strategy(server_ctx).start(InProcessGrid(_app(other_client), 3), initial_arrays())


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

    with pytest.raises(RunHaltedError, match="node 1003 sent a plaintext model"):
        _strategy(server_ctx).start(
            InProcessGrid(_app(client_ctx, only_node_1003), 3), initial_arrays(DIM)
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
            blob = Envelope(
                env.scheme,
                env.fingerprint,
                env.layout,
                env.limits,
                1,
                (env.chunks[0][:200] + bytes(200) + env.chunks[0][400:], *env.chunks[1:]),
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


def test_a_tampered_global_model_is_refused_by_every_client(keys) -> None:
    client_ctx, server_ctx = keys
    grid = InProcessGrid(_app(client_ctx), 3)
    zero = he.HEContext.load(client_ctx)

    def swap_a_chunk(msg: Message) -> Message:
        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 2:
            env = Envelope.from_bytes(msg.content["arrays"][wire.CIPHERTEXT].data)
            fake = he.encrypt_model(zero, {"w": np.zeros(DIM, np.float32)}, 1, LIMITS).envelope
            forged = Envelope(
                env.scheme,
                env.fingerprint,
                env.layout,
                env.limits,
                env.contributors,
                (fake.chunks[0], *env.chunks[1:]),
            )
            msg.content["arrays"] = wire.ciphertext_record(forged.to_bytes())
        return msg

    grid.intercept(swap_a_chunk)
    with pytest.raises(
        RunHaltedError, match="round 2 failed .*canary check failed in 1 of 2 chunks"
    ):
        _strategy(server_ctx).start(grid, initial_arrays(DIM), num_rounds=2)
    trained_round_2 = [
        e
        for e in grid.transcript
        if e.direction == "from-node" and e.message_type == "train" and e.message.has_error()
    ]
    assert len(trained_round_2) >= 1


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

    defaults = tomllib.loads((DIGITS_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]
    monkeypatch.setattr(server_app, "SERVER_SEES_MODEL", set())  # plain: federated too

    def accuracy(privacy: str) -> float:
        caplog.clear()
        cfg = {**defaults, "privacy": privacy, "seed": 7}
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
