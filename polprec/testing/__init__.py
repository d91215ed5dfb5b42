"""Tools for testing mixed-precision code: hypothesis strategies and dtype-aware assertions.

The strategies need ``hypothesis`` (``pip install polprec[testing]``); the assertions do not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from polprec.testing._assertions import (
    assert_matches_full_precision,
    assert_trees_all_close,
    assert_trees_all_equal_dtypes,
    default_tolerance,
)

if TYPE_CHECKING:
    from polprec.testing import strategies

__all__ = [
    "assert_matches_full_precision",
    "assert_trees_all_close",
    "assert_trees_all_equal_dtypes",
    "default_tolerance",
    "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":  # imported lazily: hypothesis is an optional dependency
        return importlib.import_module("polprec.testing.strategies")
    raise AttributeError(f"module 'polprec.testing' has no attribute {name!r}")
