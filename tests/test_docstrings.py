"""The runnable examples in the docstrings of the public entry points run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["vwn_transform", "vwn_transform.config", "vwn_transform.widen", "vwn_transform.modules",
           "vwn_transform.persist", "vwn_transform.training", "vwn_transform.onnx", "vwn_transform.passes.pipeline",
           "vwn_transform.passes.fusion", "vwn_transform.backend", "vwn_transform.widenet",
           "vwn_transform.adaptive_width"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    assert tests, f"{name} has no docstring examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
