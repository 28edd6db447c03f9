"""The examples in umig's docstrings (``>>>``) run with the suite, so that they stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

from conftest import REPO

MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for p in (REPO / "umig").rglob("*.py")
    if ">>>" in p.read_text(encoding="utf-8")
)


def test_the_doctests_are_found():
    assert {"umig.graph", "umig.heads", "umig.store"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"
