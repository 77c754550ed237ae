"""Every use of Flower internals (anything outside flwr's public API) lives here.

flower-privacy supports flwr 1.41 and 1.42. When Flower changes one of these
internals, this is the one file to update.
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from flwr.app import Message
from flwr.common.config import parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.utils import simulation_config_from_json

__all__ = [
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "assign_message_id",
    "wire_roundtrip",
    "wire_size",
    "empty_run",
    "parse_federation_config",
    "set_task_identity",
]


def set_task_identity(run_id: int, node_id: int, task_id: int = 1) -> None:
    """Set the process-wide identity that ``Message(...)`` reads for new messages."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def empty_run(run_id: int) -> Run:
    """A ``Run`` with no FAB, as an in-process grid needs."""
    return Run.create_empty(run_id)


def assign_message_id(message: Message) -> str:
    """Give a message the unique id a SuperLink would assign on arrival."""
    message_id = str(uuid4())
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


def parse_run_config(overrides: list[str]) -> dict:
    """Parse ``--run-config`` overrides ('k=v k=v' or a TOML path) as ``flwr run`` does."""
    return dict(parse_config_args(overrides))


def parse_federation_config(overrides: list[str]) -> Any:
    """Parse ``--federation-config`` overrides exactly as ``flwr run`` does.

    Returns Flower's ``SimulationConfig`` protobuf; raises ``ValueError`` naming
    the problem when a key or value is not accepted.
    """
    values = parse_config_args(overrides)
    values = {key.replace("-", "_"): value for key, value in values.items()}
    try:
        return simulation_config_from_json(values)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"invalid federation config {overrides!r}: {err}") from err


def wire_roundtrip(message: Message) -> Message:
    """``message`` after Flower's protobuf encoding and decoding, as over a network."""
    return message_from_proto(message_to_proto(message))


def wire_size(message: Message) -> int:
    """Bytes of ``message`` in Flower's protobuf encoding."""
    return int(message_to_proto(message).ByteSize())


def flower_fixed_clipping_epsilon(
    noise_multiplier: float, rounds: int, delta: float, sample_size: int, population_size: int
) -> float:
    """ε by Flower 1.41's accountant as its fixed-clipping DP wrappers use it.

    Those wrappers accept only ``sampling_method="no-amplification"`` (RDP backend).
    """
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population_size,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(
        GaussianPrivacyEvent(noise_multiplier, sample_size, population_size), count=rounds
    )
    return float(accountant.get_epsilon(delta))


def is_simulation_grid(grid: object) -> bool:
    """Whether ``grid`` is the in-memory grid of Flower's simulation engine."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # another Flower layout: never claim a simulation
        return False
    return isinstance(grid, InMemoryGrid)
