"""Flower internals are used in exactly one module, so an upgrade touches one file."""

from __future__ import annotations

import ast

from conftest import REPO_ROOT

# Flower's documented public API: the Message API, plus the legacy API that the
# benchmark uses to run Flower's own SecAgg+ as a baseline.
PUBLIC_FLWR_MODULES = {
    "flwr.app",
    "flwr.clientapp",
    "flwr.clientapp.mod",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.common",
    "flwr.simulation",
    "flwr.client",
    "flwr.client.mod",
    "flwr.server",
    "flwr.server.strategy",
    "flwr.server.workflow",
}
COMPAT_MODULE = REPO_ROOT / "flower_privacy" / "_flwr_compat.py"


def _flwr_imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flwr":
                    yield alias.name, node.lineno


def test_only_the_compat_module_imports_flower_internals() -> None:
    offenders = []
    for root in ("flower_privacy", "apps"):
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            if path == COMPAT_MODULE:
                continue
            for module, line in _flwr_imports(path):
                if module not in PUBLIC_FLWR_MODULES:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
    assert not offenders, "Flower internals outside _flwr_compat.py:\n" + "\n".join(offenders)


def test_the_compat_module_really_uses_internals() -> None:
    # Guards the guard: if this ever fails, the list above is stale.
    assert any(m not in PUBLIC_FLWR_MODULES for m, _ in _flwr_imports(COMPAT_MODULE))


def test_compat_helpers_work_against_the_installed_flower() -> None:
    from flwr.app import Message, RecordDict

    from flower_privacy import _flwr_compat as compat

    compat.set_task_identity(run_id=7, node_id=compat.SUPERLINK_NODE_ID)
    msg = Message(RecordDict(), 1234, "train")
    assert msg.metadata.run_id == 7 and msg.metadata.src_node_id == compat.SUPERLINK_NODE_ID
    assert compat.assign_message_id(msg) == msg.metadata.message_id != ""
    assert compat.empty_run(7).run_id == 7
    config = compat.parse_federation_config(["num-supernodes=3 client-resources-num-cpus=1"])
    assert config.num_supernodes == 3
