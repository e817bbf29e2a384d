"""The examples in the package's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import sparsembed

# the compiled kernels carry no examples; the CUDA backend needs CuPy
MODULES = sorted(m.name for m in pkgutil.walk_packages(sparsembed.__path__, "sparsembed.")
                 if not m.name.startswith(("sparsembed._kernels", "sparsembed._cuda")))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "sparsembed.sklearn":
        pytest.importorskip("sklearn")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"


def test_the_examples_are_found():
    # the modules that show usage in their docstrings (a test that found none would
    # pass without checking anything)
    attempted = {}
    for name in ("sparsembed.io", "sparsembed.embedding", "sparsembed.vocabulary"):
        attempted[name] = doctest.testmod(importlib.import_module(name), report=False).attempted
    assert all(n > 0 for n in attempted.values()), attempted
