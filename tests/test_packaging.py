"""Packaging checks: what the installed package carries and reports about itself.

These run against whatever ``import sparsembed`` finds (the installed wheel in CI, the
in-place build during development): type stubs and the ``py.typed`` marker shipped
next to the compiled modules, stubs in step with the compiled functions, metadata
version, ``show_config()`` and the thread-count setters. The source-tree check (every
``.pyx`` has a ``.pyi``) runs only where the checkout is next to this file.
"""

import ast
import importlib
import importlib.machinery
import importlib.metadata
import importlib.resources
import inspect
import pathlib

import numpy as np
import pytest
import scipy

import sparsembed as se

SOURCE_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sparsembed"
KERNELS = "sparsembed._kernels"


def _installed_compiled_modules():
    """Names of the compiled modules in the imported ``sparsembed._kernels``."""
    suffixes = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)
    names = set()
    for entry in importlib.resources.files(KERNELS).iterdir():
        for suffix in suffixes:  # longest first: ".cpython-311-x86_64-linux-gnu.so" before ".so"
            if entry.name.endswith(suffix):
                names.add(entry.name[: -len(suffix)])
                break
    return sorted(names)


COMPILED = _installed_compiled_modules()


def _stub_tree(module_name):
    stub = importlib.resources.files(KERNELS) / f"{module_name}.pyi"
    return ast.parse(stub.read_text(encoding="utf-8"), filename=f"{module_name}.pyi")


def _public_stub_functions(tree):
    """{name: [parameter names]} of the public functions (and classes) a stub declares."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            args = node.args
            out[node.name] = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            out[node.name] = None
    return out


def _public_compiled_functions(module):
    out = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            out[name] = None
        elif callable(obj):
            out[name] = list(inspect.signature(obj).parameters)
    return out


# --------------------------------------------------------------------------- stubs


def test_the_core_kernels_are_compiled_modules():
    # guards the checks below against an empty or wrong listing
    assert {"_openmp_helpers", "_lookup", "_plan", "_backward"} <= set(COMPILED)


@pytest.mark.skipif(not SOURCE_PACKAGE.is_dir(), reason="no source checkout next to the tests")
def test_every_pyx_in_the_source_tree_has_a_stub():
    pyx = sorted(SOURCE_PACKAGE.rglob("*.pyx"))
    assert pyx, f"no .pyx found under {SOURCE_PACKAGE}"
    missing = [str(p.relative_to(SOURCE_PACKAGE.parent)) for p in pyx if not p.with_suffix(".pyi").is_file()]
    assert not missing, f"compiled modules without a .pyi type stub next to them: {missing}"


def test_installed_package_carries_py_typed():
    assert (importlib.resources.files("sparsembed") / "py.typed").is_file()


@pytest.mark.parametrize("module_name", COMPILED)
def test_installed_compiled_module_has_a_stub(module_name):
    assert (importlib.resources.files(KERNELS) / f"{module_name}.pyi").is_file(), (
        f"{KERNELS}.{module_name} is compiled but ships no {module_name}.pyi"
    )


@pytest.mark.parametrize("module_name", COMPILED)
def test_stub_declares_exactly_the_compiled_functions(module_name):
    module = importlib.import_module(f"{KERNELS}.{module_name}")
    compiled = _public_compiled_functions(module)
    declared = _public_stub_functions(_stub_tree(module_name))
    assert compiled, f"{module.__name__} exposes no public function"
    assert sorted(declared) == sorted(compiled), f"{module_name}.pyi is out of step with the module"
    for name, params in compiled.items():
        assert declared[name] == params, f"{module_name}.{name}: stub {declared[name]} vs compiled {params}"


def test_stub_checker_sees_a_mismatch():
    # the comparison above can fail: a stub missing a parameter is caught
    tree = ast.parse("def gather(weight, idx, out) -> None: ...\ndef _private(x): ...\n")
    assert _public_stub_functions(tree) == {"gather": ["weight", "idx", "out"]}
    from sparsembed._kernels import _lookup

    assert _public_compiled_functions(_lookup)["gather"] == ["weight", "idx", "out", "n_threads",
                                                             "stream", "ids_out"]


# ------------------------------------------------------------------------ metadata


def _installed_distribution():
    """The distribution that owns the imported package, or None (e.g. in-place build)."""
    try:
        dist = importlib.metadata.distribution("sparsembed")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = pathlib.Path(se.__file__).resolve()
    if pathlib.Path(dist.locate_file("sparsembed/__init__.py")).resolve() != init:
        return None
    return dist


def test_version_matches_the_metadata():
    dist = _installed_distribution()
    if dist is None:
        pytest.skip("the imported sparsembed is not the installed distribution (in-place build)")
    assert se.__version__ == dist.version
    # the wheel's file list has the stubs and the marker too
    files = {str(f).replace("\\", "/") for f in dist.files or ()}
    assert "sparsembed/py.typed" in files
    for name in COMPILED:
        assert f"sparsembed/_kernels/{name}.pyi" in files


def test_version_is_a_release_string():
    parts = se.__version__.split(".")
    assert len(parts) >= 3 and all(p.isdigit() for p in parts[:2]), se.__version__


# --------------------------------------------------------------------- show_config


def test_show_config_keys_and_types():
    config = se.show_config()
    assert {"version", "openmp", "max_threads", "num_threads", "cupy", "numpy", "scipy"} <= set(config)
    assert config["version"] == se.__version__
    assert type(config["openmp"]) is bool
    assert type(config["cupy"]) is bool
    assert type(config["max_threads"]) is int and config["max_threads"] >= 1
    assert type(config["num_threads"]) is int and config["num_threads"] >= 1
    assert config["numpy"] == np.__version__
    assert config["scipy"] == scipy.__version__
    if not config["openmp"]:
        assert config["max_threads"] == 1 and config["num_threads"] == 1


def test_show_config_prints_every_key(capsys):
    config = se.show_config(print_out=True)
    printed = capsys.readouterr().out
    for key, value in config.items():
        assert f"{key}: {value}" in printed


def test_show_config_without_print_is_silent(capsys):
    se.show_config()
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- threads


@pytest.fixture
def restore_threads():
    yield
    se.set_num_threads(None)


@pytest.mark.parametrize("bad", [0, -1, -8, np.int64(0), 1025, 100_000, 2**31 - 1, 2**40])
def test_set_num_threads_rejects_counts_out_of_range(bad, restore_threads):
    # above 1024 libgomp itself crashed (100,000) or aborted (2**31 - 1), and 2**40
    # overflowed the kernels' C int after a step had begun
    before = se.get_num_threads()
    with pytest.raises(ValueError, match=rf"an int in \[1, 1024\] or None, got {int(bad)}"):
        se.set_num_threads(bad)
    assert se.get_num_threads() == before


def test_set_num_threads_accepts_the_limit(restore_threads):
    se.set_num_threads(1024)
    assert se.get_num_threads() == (1024 if se.show_config()["openmp"] else 1)


def test_openmp_default_is_capped(run_python):
    code = "import sparsembed as se; print(se.get_num_threads(), se.show_config()['openmp'])"
    out = run_python(code, env={"OMP_NUM_THREADS": "5000"}).stdout.split()
    assert out[0] == ("1024" if out[1] == "True" else "1")


@pytest.mark.parametrize("bad", [True, False, 1.5, 2.0, "2", [2], np.float64(2.0)])
def test_set_num_threads_rejects_non_integers(bad, restore_threads):
    before = se.get_num_threads()
    with pytest.raises(TypeError, match="positive int or None, got"):
        se.set_num_threads(bad)
    assert se.get_num_threads() == before


def test_set_num_threads_round_trip(restore_threads):
    default = se.get_num_threads()
    assert type(default) is int and default >= 1
    se.set_num_threads(3)
    assert se.get_num_threads() == (3 if se.show_config()["openmp"] else 1)
    assert type(se.get_num_threads()) is int
    se.set_num_threads(np.int32(2))  # any integer with __index__
    assert se.get_num_threads() == (2 if se.show_config()["openmp"] else 1)
    assert se.show_config()["num_threads"] == se.get_num_threads()
    se.set_num_threads(None)
    assert se.get_num_threads() == default


def test_import_warns_exactly_when_built_without_openmp(run_python):
    # a fresh interpreter, so that the once-per-process warning is seen
    code = (
        "import warnings, json\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import sparsembed\n"
        "print(json.dumps([sparsembed.__file__, sparsembed.show_config()['openmp'],"
        " [str(x.message) for x in w if 'OpenMP' in str(x.message)]]))\n"
    )
    out = run_python(code)
    import json

    path, openmp, warned = json.loads(out.stdout.strip().splitlines()[-1])
    assert pathlib.Path(path).resolve() == pathlib.Path(se.__file__).resolve()
    assert openmp == se.show_config()["openmp"]
    if openmp:
        assert warned == []
    else:
        assert len(warned) == 1 and "built without OpenMP" in warned[0]
