"""Every public name of `thinkscale.relax` and `thinkscale.reflect` carries a short example in its
docstring, and the example runs (doctest, on tiny models and without a process group: seconds)."""
from __future__ import annotations

import doctest
import importlib

import pytest

PACKAGES = ("thinkscale.relax", "thinkscale.reflect")
# tables cannot carry a docstring: their example lives in the function that reads them
SHOWN_IN = {"STRATEGIES": "select", "EFFORT_K": "effort_to_k", "HEAD_STRATEGIES": "choosing_strategy",
            "HEAD_FALLBACK": "choosing_strategy"}


def public_names() -> list[tuple[str, str]]:
    names = [(package, name) for package in PACKAGES for name in importlib.import_module(package).__all__]
    return names + [("thinkscale.tasks.policy", "tiny_policy"),  # what the examples build on
                    ("thinkscale.spec", "Registry")]


def examples(package: str, name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(package)
    obj = getattr(module, SHOWN_IN.get(name, name))
    return [t for t in doctest.DocTestFinder(recurse=False).find(obj, f"{package}.{name}",
                                                                 globs={"__name__": "__main__"})
            if t.examples]


@pytest.mark.parametrize("package, name", public_names(), ids=lambda v: v.split(".")[-1])
def test_the_example_runs(package, name):
    tests = examples(package, name)
    assert tests, f"{package}.{name} has no example in its docstring"
    if name in SHOWN_IN:
        assert any(name in e.source for t in tests for e in t.examples), f"the example does not show {name}"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{package}.{name}: {runner.failures} of {runner.tries} example lines failed"
