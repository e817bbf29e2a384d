import runpy
import types
from pathlib import Path

import numpy as np
import pytest

import sparsembed as se


@pytest.fixture
def threads():
    """Run a body with a given thread count; restores the default afterwards.

    The size-aware thread choice (``threads_for``) is turned down to a grain of 16
    element operations meanwhile, so that the small inputs of a test really run on
    the threads asked for (otherwise a "1 vs 2 threads" test could compare one
    thread with one thread).
    """
    previous = se._threads._num_threads
    se._threads.GRAIN_OVERRIDE = 16

    def set_(n):
        se.set_num_threads(n)

    yield set_
    se._threads._num_threads = previous
    se._threads.GRAIN_OVERRIDE = None


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def run_python(tmp_path):
    """Run ``code`` in a fresh interpreter that imports the sparsembed under test.

    The child starts in an empty folder: ``python -c`` puts its working directory first
    on sys.path, and from the repository root that would be the unbuilt sources. The
    parent's sys.path (with the installed or in-place package) is handed down.
    Returns the CompletedProcess (text mode, output captured); ``check`` by default.
    """
    import os
    import subprocess
    import sys

    def run(code, *, env=None, check=True, timeout=120):
        full_env = dict(os.environ, **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        out = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    return run


@pytest.fixture
def load_example(monkeypatch):
    """``load_example("quickstart")``: run examples/quickstart.py as a module (not as
    ``__main__``, so nothing runs but definitions) and return its namespace."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))  # examples may import their neighbours

    def load(name):
        return types.SimpleNamespace(**runpy.run_path(str(examples / f"{name}.py"), run_name=name))

    return load
