"""Every ``Examples:`` block in graftnet's docstrings runs as written (doctest), module by module."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import graftnet

# Modules that need an optional extra (RL environments) are skipped, not failed, where it is not installed.
OPTIONAL = ("gymnasium", "ale_py", "minatar", "optuna")
# graftnet.__main__ is `python -m graftnet`: importing it runs the CLI.
MODULES = sorted(m.name for m in pkgutil.walk_packages(graftnet.__path__, "graftnet.") if m.name != "graftnet.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_run(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {e.name}")
        raise
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples in {name} failed (the output above says which)"


def test_the_modules_are_found_and_some_have_examples() -> None:
    assert "graftnet.spec" in MODULES and "graftnet.training.optim" in MODULES
    spec_examples = doctest.DocTestFinder().find(importlib.import_module("graftnet.spec"), "graftnet.spec")
    assert sum(len(t.examples) for t in spec_examples) > 0
