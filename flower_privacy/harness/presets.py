"""Federation presets: flat TOML files of ``flwr run --federation-config`` keys."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

from flower_privacy import _flwr_compat as compat

# Where presets are looked up by name: the working directory, then the checkout.
_REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_KEY = "client-resources-num-gpus"
INIT_ARGS_PREFIX = "init-args-"


class GpuUnavailableError(RuntimeError):
    """A preset asks for GPUs on a machine that has none."""


def find_preset(name_or_path: str, kind: str = "federation") -> Path:
    """Resolve ``cpu-10`` to ``configs/federation/cpu-10.toml`` (or accept a path)."""
    direct = Path(name_or_path)
    if direct.suffix == ".toml" and direct.is_file():
        return direct
    for root in (Path.cwd(), _REPO_ROOT):
        candidate = root / "configs" / kind / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in (_REPO_ROOT / "configs" / kind).glob("*.toml"))
    raise FileNotFoundError(f"no {kind} preset {name_or_path!r}; available: {available}")


def load_federation_preset(path: Path) -> dict[str, object]:
    """Read a preset and check it parses exactly as ``flwr run`` would parse it."""
    values = tomllib.loads(Path(path).read_text())
    nested = [key for key, value in values.items() if isinstance(value, dict)]
    if nested:
        raise ValueError(f"{path}: presets are flat key = value files, found tables {nested}")
    compat.parse_federation_config([to_overrides(values)])
    return values


def to_overrides(values: dict[str, object]) -> str:
    """The ``--federation-config`` string for ``values``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f'"{value}"'
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def gpus_requested(values: dict[str, object]) -> float:
    """GPUs a preset asks for per client."""
    return float(values.get(GPU_KEY, 0.0) or 0.0)


def gpu_available() -> bool:
    """True when a CUDA GPU is visible (torch if installed, else nvidia-smi)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        pass
    if shutil.which("nvidia-smi") is None:
        return False
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return res.returncode == 0 and "GPU" in res.stdout


def check_gpu(values: dict[str, object], source: str) -> None:
    """Refuse at once a GPU preset on a machine without a GPU.

    Otherwise Ray finds no place for a client, Flower logs "ActorPool is empty" and
    the run waits for the strategy's timeout.
    """
    gpus = gpus_requested(values)
    if gpus > 0 and not gpu_available():
        raise GpuUnavailableError(
            f"{source} asks for {GPU_KEY}={gpus} per virtual client, but this machine has no "
            "CUDA GPU (torch.cuda.is_available() is False), so Ray could not place any client. "
            "Use a CPU preset such as 'cpu-10', or run on a machine with a GPU."
        )


def for_existing_ray_cluster(values: dict[str, object]) -> dict[str, object]:
    """Drop ``init-args-*`` keys: ``ray.init`` refuses them when joining a cluster."""
    return {k: v for k, v in values.items() if not k.startswith(INIT_ARGS_PREFIX)}
