"""Every docstring example in the installed `quotaflow` package runs and holds.

The examples are specifications (the `NodeLedger`'s doctest is its spec), so they
run from the package as it is imported, not from the source folders.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import quotaflow


def _modules() -> list[str]:
    names = [quotaflow.__name__]
    for info in pkgutil.walk_packages(quotaflow.__path__, prefix="quotaflow."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module: ModuleType = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_core_specifies_by_example() -> None:
    """The core's rules each carry runnable examples."""
    for name in (
        "ledger", "contracts", "partitioning", "periods", "settings", "topics", "plans", "quota",
        "health",
    ):
        module = importlib.import_module(f"quotaflow.core.{name}")
        assert doctest.testmod(module).attempted > 0, name
