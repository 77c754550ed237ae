"""Presets parse as flwr parses them; GPU presets fail fast without a GPU; the CLI works."""

from __future__ import annotations

import time
import tomllib

import pytest
from conftest import DIGITS_APP, REPO_ROOT, run_cli

from flower_privacy.harness import presets

FEDERATION_PRESETS = sorted((REPO_ROOT / "configs" / "federation").glob("*.toml"))
RUN_PRESETS = sorted((REPO_ROOT / "configs" / "run").glob("*.toml"))
APP_KEYS = set(
    tomllib.loads((DIGITS_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
)


def test_presets_exist() -> None:
    assert len(FEDERATION_PRESETS) >= 4 and RUN_PRESETS
    gpu = [
        p for p in FEDERATION_PRESETS if presets.gpus_requested(presets.load_federation_preset(p))
    ]
    assert {presets.gpus_requested(presets.load_federation_preset(p)) for p in gpu} >= {0.5, 0.25}


@pytest.mark.parametrize("path", FEDERATION_PRESETS, ids=lambda p: p.stem)
def test_federation_preset_parses_like_flwr_run(path) -> None:
    values = presets.load_federation_preset(path)
    assert isinstance(values["num-supernodes"], int) and values["num-supernodes"] >= 10
    assert isinstance(values["client-resources-num-cpus"], int)


@pytest.mark.parametrize("path", RUN_PRESETS, ids=lambda p: p.stem)
def test_run_preset_keys_exist_in_the_app(path) -> None:
    keys = set(tomllib.loads(path.read_text()))
    assert keys <= APP_KEYS, f"{path.name}: unknown run-config keys {keys - APP_KEYS}"


def test_flwr_rejects_what_a_preset_must_not_contain(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("num-supernodes = 'ten'\n")
    with pytest.raises(ValueError, match="num-supernodes"):
        presets.load_federation_preset(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[options]\nnum-supernodes = 3\n")
    with pytest.raises(ValueError, match="flat key = value"):
        presets.load_federation_preset(nested)
    with pytest.raises(FileNotFoundError, match="available: .*cpu-10"):
        presets.find_preset("no-such-preset")


def test_gpu_preset_is_refused_at_once_without_a_gpu(monkeypatch) -> None:
    values = presets.load_federation_preset(presets.find_preset("gpu-quarter"))
    monkeypatch.setattr(presets, "gpu_available", lambda: False)
    with pytest.raises(
        presets.GpuUnavailableError, match="client-resources-num-gpus=0.25 .* no CUDA GPU"
    ):
        presets.check_gpu(values, "gpu-quarter")
    monkeypatch.setattr(presets, "gpu_available", lambda: True)
    presets.check_gpu(values, "gpu-quarter")  # accepted where a GPU exists
    presets.check_gpu(presets.load_federation_preset(presets.find_preset("cpu-10")), "cpu-10")


def test_joining_a_ray_cluster_drops_init_args() -> None:
    values = presets.load_federation_preset(presets.find_preset("cpu-10"))
    joined = presets.for_existing_ray_cluster(values)
    assert "init-args-num-cpus" in values and not any(k.startswith("init-args-") for k in joined)
    assert joined["num-supernodes"] == values["num-supernodes"]


def test_cli_help_lists_the_commands() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for name in ("simulate", "demo", "deploy", "preset"):
        assert name in res.stdout


def test_cli_preset_prints_the_federation_config_string() -> None:
    res = run_cli("preset", "cpu-10")
    assert res.returncode == 0
    assert res.stdout.strip() == (
        "num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        "init-args-num-cpus=2"
    )


def test_cli_simulate_with_a_gpu_preset_fails_within_seconds_naming_the_gpu() -> None:
    # Hiding every GPU makes this the GPU-less path on any machine.
    t0 = time.monotonic()
    res = run_cli(
        "simulate", str(DIGITS_APP), "--preset", "gpu-half", env={"CUDA_VISIBLE_DEVICES": ""}
    )
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr
    assert time.monotonic() - t0 < 30


def test_cli_bench_secagg_prints_one_json_object_with_every_figure() -> None:
    import json

    res = run_cli("bench", "secagg", "--json", "--quick", "--no-deployment", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert [c["clients"] for c in result["cases"]] == [5, 10]
    for row in result["cases"]:
        assert row["fedavg_s"] > 0 and row["flower_secaggplus_s"] > 0 and row["secagg_s"] > 0
    assert 4.0 <= result["upload_bytes_per_param"] < 4.01
    assert result["message_bytes_per_param"] >= result["upload_bytes_per_param"]
    assert result["mask_throughput_ratio"] > 0 and result["unmask_s_100_clients"] > 0
