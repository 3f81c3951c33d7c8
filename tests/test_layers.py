"""The package's layers, checked from the source: who may import whom.

Every import statement counts, those inside functions too (the CLI imports edges
lazily, but it still depends on them).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import quotaflow

PACKAGE = Path(quotaflow.__file__).parent

# A layer may import the stdlib, these third-party packages, and the layers named.
LAYERS: dict[str, tuple[set[str], set[str]]] = {
    "quotaflow.core": (
        {"pydantic", "pydantic_core", "pydantic_settings", "orjson"}, {"quotaflow.core"}
    ),
    "quotaflow.producers": (
        # yarl and multidict: aiohttp's URL and header types (its own dependencies)
        {"pydantic", "orjson", "kafka", "grpc", "google", "aiohttp", "yarl", "multidict",
         "prometheus_client"},
        {"quotaflow.core", "quotaflow.producers", "quotaflow.admin", "quotaflow.logs"},
    ),
    "quotaflow.streams": (
        {"pydantic", "orjson", "faust", "mode", "kafka", "aiokafka"},
        {"quotaflow.core", "quotaflow.streams", "quotaflow.admin", "quotaflow.logs",
         "quotaflow.metrics"},
    ),
    "quotaflow.dashboards": (
        {"grafana_foundation_sdk", "grafana_client", "matplotlib"},
        {"quotaflow.core", "quotaflow.dashboards", "quotaflow.sinks"},
    ),
    "quotaflow.sinks": (
        {"pydantic", "orjson", "aiokafka", "influxdb_client"},
        {"quotaflow.core", "quotaflow.sinks", "quotaflow.logs", "quotaflow.metrics"},
    ),
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "quotaflow":  # from quotaflow import logs: the module logs
                found.update(f"quotaflow.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def _modules(layer: str) -> list[Path]:
    folder = PACKAGE.joinpath(*layer.split(".")[1:])
    return sorted(p for p in folder.rglob("*.py") if "_pb" not in p.parts)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    third_party, own = LAYERS[layer]
    wrong: list[str] = []
    for path in _modules(layer):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "quotaflow":
                if not any(name == o or name.startswith(o + ".") for o in own):
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
            elif top not in sys.stdlib_module_names and top not in third_party:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_core_does_no_io() -> None:
    """No module of the core opens files, sockets or processes."""
    banned = {"socket", "subprocess", "urllib", "http", "sqlite3", "asyncio", "os", "shutil"}
    for path in _modules("quotaflow.core"):
        used = {name.split(".")[0] for name in _imports(path)} & banned
        assert not used, f"{path.name} imports {used}"
