"""The GPU path's CPU-side logic, tested without a GPU (and without CuPy).

- backend selection and the errors for device="cuda" without CuPy / without a device;
- the GPU backend itself (``sparsembed._cuda.backend`` and its ``ArrayBackend``),
  imported and run with numpy standing in for CuPy (``reference_gpu``): plans,
  segment sums, CSR assembly, validation and accumulation are compared with the CPU
  backend, and every kernel launch is checked against the kernel's C signature;
- the layer seam: Embedding(device="cuda"), .to(), pickling, through that backend;
- the kernels themselves: each test using ``fake_gpu`` runs twice, with the kernels'
  numpy emulations and with the CUDA source compiled for the CPU against
  tests/warp_emulator.h (warps of 32 lanes in lockstep at their shuffles); the source
  also compiles as strict C++ and with NVRTC, CUDA's own compiler. Speed and the
  hardware's own behaviour are checked on a GPU only, in tests/test_gpu.py.
"""

import copy
import inspect
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import reference_gpu
import sparsembed as se
import sparsembed.functional as F
from sparsembed import _backend, _cpu, _rowsparse
from sparsembed import _cuda as cuda_pkg
from sparsembed._cuda import _kernels, _ops


# ----------------------------------------------------------------- fixtures

def _drop_backend_module():
    sys.modules.pop("sparsembed._cuda.backend", None)
    if "backend" in vars(cuda_pkg):
        delattr(cuda_pkg, "backend")


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy made unimportable (``import cupy`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    _drop_backend_module()
    yield
    _drop_backend_module()


def _install_fake(monkeypatch, device_count=1):
    for name, module in reference_gpu.fake_cupy_modules(device_count).items():
        monkeypatch.setitem(sys.modules, name, module)
    _drop_backend_module()


class _DeviceArgs:
    """``sparsembed._cuda.backend`` whose functions get host ndarray arguments as device
    views (no copy, so in-place functions still act on the caller's arrays): the
    backend-level tests below pass numpy arrays as a caller would pass CuPy ones."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            return attr(*map(_view, args), **{k: _view(v) for k, v in kwargs.items()})

        return call


def _view(x):
    if isinstance(x, np.ndarray) and not isinstance(x, reference_gpu.FakeDeviceArray):
        return x.view(reference_gpu.FakeDeviceArray)
    return x


@pytest.fixture(params=["numpy-kernels", "cuda-source-kernels"])
def fake_gpu(monkeypatch, request):
    """numpy standing in for CuPy, one "device": yields ``sparsembed._cuda.backend``
    (wrapped in :class:`_DeviceArgs`; ``.module`` is the module itself). The kernels
    run as their numpy emulations, and again as the CUDA source itself, compiled by
    the host C++ compiler against tests/warp_emulator.h (each warp's 32 lanes in
    lockstep at its shuffles): every test below checks the kernels' own code too."""
    if request.param == "cuda-source-kernels":
        if reference_gpu.CudaSourceOnCpu.compiler() is None:
            pytest.skip("no working C++ compiler to build the CUDA source for the CPU")
        monkeypatch.setattr(reference_gpu.FakeRawModule, "on_cpu",
                            reference_gpu.CudaSourceOnCpu.of)
    _install_fake(monkeypatch)
    reference_gpu.FakeRawModule.instances.clear()
    be = _backend.get_backend("cuda")
    assert be.name == "cuda" and be.__name__ == "sparsembed._cuda.backend"
    yield _DeviceArgs(be)
    _drop_backend_module()


# ----------------------------------------------------------------- backend selection

@pytest.mark.parametrize("device, expected", [
    ("cpu", "cpu"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda"), ("CUDA", "cuda"),
    ("Cuda:1", "cuda"), ("cpu:0", "cpu"),
])
def test_normalize_device(device, expected):
    assert _backend.normalize_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "tpu", "", None, 0, "mps", "cu da",
                                    # once all taken as "cuda" (then an error about CuPy)
                                    "cudaXYZ", "cuda:abc", "cuda:-7", " cuda", "cuda:",
                                    "cpux"])
def test_normalize_device_rejects(device):
    match = (r"device must be 'cpu' or 'cuda' \(optionally with an index, 'cuda:0'\), got "
             + repr(device).replace("(", r"\("))
    with pytest.raises(ValueError, match=match):
        _backend.normalize_device(device)


def test_cpu_backend_is_cpu_module():
    assert _backend.get_backend("cpu") is _cpu
    assert _backend.get_backend("CPU") is _cpu  # the fast "cpu" answer is not the only one
    assert _backend.backend_of(np.zeros(2)) is _cpu
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        _backend.get_backend(np.zeros(2))  # not a string: parsed, and refused


def test_backend_of_routes_by_the_array_types_module(no_cupy):
    # cupy's own types go to the CUDA backend (here: no CuPy, so its import error);
    # anything else, even a module whose name starts like it, stays on the CPU
    cupy_like = type("ndarray", (), {"__module__": "cupy._core.core"})
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x"):
        _backend.backend_of(cupy_like())
    for module in ("cupyx.scipy.sparse", "cupyish", "numpy"):
        other = type("ndarray", (), {"__module__": module})
        assert _backend.backend_of(other()) is _cpu


def test_missing_cupy_is_an_import_error_naming_the_extra(no_cupy):
    assert cuda_pkg.cupy_available() is False
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x"):
        _backend.get_backend("cuda")
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x"):
        _backend.get_backend("cuda:0")


@pytest.mark.parametrize("count", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device")])
def test_cupy_without_device_is_a_runtime_error(monkeypatch, count):
    _install_fake(monkeypatch, device_count=count)
    try:
        assert cuda_pkg.cupy_available() is False
        with pytest.raises(RuntimeError, match="CuPy sees no CUDA device"):
            _backend.get_backend("cuda")
        with pytest.raises(RuntimeError, match="CuPy sees no CUDA device"):
            se.Embedding(4, 2, device="cuda")
    finally:
        _drop_backend_module()


def _assert_layer_unchanged(layer, weight, values, grad):
    assert layer.device == "cpu"
    assert layer.weight is weight
    assert_array_equal(layer.weight, values)
    assert layer.grad is grad


@pytest.mark.parametrize("make_env", ["no_cupy", "no_device"])
def test_to_cuda_failure_leaves_layer_unchanged(monkeypatch, request, make_env):
    emb = se.Embedding(6, 3, sparse=True, random_state=0)
    emb(np.array([1, 2, 2]))
    emb.backward(np.ones((3, 3), dtype=np.float32))
    weight, values, grad = emb.weight, emb.weight.copy(), emb.grad
    saved = emb._saved
    if make_env == "no_cupy":
        request.getfixturevalue("no_cupy")
        err = ImportError
    else:
        _install_fake(monkeypatch, device_count=0)
        err = RuntimeError
    try:
        with pytest.raises(err):
            emb.to("cuda")
        with pytest.raises(err):
            emb.to("cuda:0")
        _assert_layer_unchanged(emb, weight, values, grad)
        assert emb._saved is saved
        # still usable on the CPU: backward of the same forward
        emb.backward(np.ones((3, 3), dtype=np.float32))
    finally:
        _drop_backend_module()


def test_a_gpu_index_must_be_cupys_current_device(monkeypatch):
    # torch honours "cuda:1"; sparsembed uses CuPy's current device: another index is
    # an error saying how to select it (it was dropped silently), the layer unchanged
    _install_fake(monkeypatch, device_count=2)  # the fake's current device is 0
    try:
        message = (r"device 'cuda:1': sparsembed runs on CuPy's current device, cuda:0; "
                   r"select device 1 first with cupy.cuda.Device\(1\).use\(\)")
        with pytest.raises(ValueError, match=message):
            se.Embedding(4, 2, device="cuda:1")
        with pytest.raises(ValueError, match=message.replace("'cuda:1'", "'CUDA:1'")):
            se.EmbeddingBag(4, 2, device="CUDA:1")
        emb = se.Embedding(4, 2, random_state=0)
        weight, values = emb.weight, emb.weight.copy()
        with pytest.raises(ValueError, match=message):
            emb.to("cuda:1")
        _assert_layer_unchanged(emb, weight, values, None)
        assert se.Embedding(4, 2, device="cuda:0").device == "cuda"
        assert emb.to("cuda:0").device == "cuda"
        assert emb.to("cpu:3").device == "cpu"  # (the host has one device, any index)
    finally:
        _drop_backend_module()


def test_embedding_cuda_constructor_errors(no_cupy):
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x"):
        se.Embedding(4, 2, device="cuda")
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x"):
        se.Embedding(4, 2, device="cuda", weight=np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="device must be"):
        se.Embedding(4, 2, device="gpu")


def test_show_config_cupy_key(no_cupy):
    assert se.show_config()["cupy"] is False


def test_show_config_cupy_key_here():
    import importlib.util

    assert se.show_config()["cupy"] is (importlib.util.find_spec("cupy") is not None)


# ----------------------------------------------------------------- interface parity

def test_backend_functions_match_cpu_signatures():
    # (the bag functions are compared once EmbeddingBag's CPU backend is there)
    names = [n for n in _ops.BACKEND_FUNCTIONS if hasattr(_cpu, n)]
    assert {"plan_rows", "gather", "sparse_grad", "as_index_array"} <= set(names)
    for name in names:
        cpu_sig = inspect.signature(getattr(_cpu, name))
        method = getattr(_ops.ArrayBackend, name)
        params = list(inspect.signature(method).parameters.values())[1:]  # drop self
        assert [(p.name, p.default) for p in params] == \
            [(p.name, p.default) for p in cpu_sig.parameters.values()], name


def test_every_cpu_function_is_in_the_cuda_backend(fake_gpu):
    public = {n for n, v in vars(_cpu).items()
              if callable(v) and not n.startswith("_")
              and getattr(v, "__module__", "") in ("sparsembed._cpu", "sparsembed._validation")}
    public |= {"xp", "name", "RowPlan"}
    missing = [n for n in sorted(public) if not hasattr(fake_gpu, n)]
    assert not missing, f"the CUDA backend lacks {missing}"
    assert hasattr(fake_gpu, "from_host")
    assert _ops.RowPlan is _cpu.RowPlan  # one plan type for both backends


# ----------------------------------------------------------------- the backend vs CPU

def _ids(rng, n, V, shape=None):
    ids = rng.integers(0, V, size=n if shape is None else shape)
    return ids


@pytest.mark.parametrize("skip", [None, 0, 3])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_plan_rows_equals_cpu(fake_gpu, rng, skip, idx_dtype):
    # (3,000 ids: more than the CPU's emulated launch has threads, 3 blocks of 256)
    for n, V in [(0, 5), (1, 5), (7, 5), (200, 13), (500, 1000), (3000, 5000)]:
        flat = _ids(rng, n, V).astype(idx_dtype)
        if n:
            flat[: n // 3] = 3  # a hot id
        a = _cpu.plan_rows(flat, V, skip)
        b = fake_gpu.plan_rows(flat, V, skip)
        assert_array_equal(b.perm, a.perm)
        assert_array_equal(b.rows, a.rows)
        assert_array_equal(b.starts, a.starts)
        assert_array_equal(b.counts, a.counts)
        assert b.skipped == a.skipped and b.n == a.n
        for arr in (b.perm, b.rows, b.starts):
            assert arr.dtype == np.int64


def test_plan_is_stable(fake_gpu):
    flat = np.array([4, 1, 4, 4, 1, 0, 4], dtype=np.int64)
    plan = fake_gpu.plan_rows(flat, 5, None)
    assert_array_equal(plan.perm, [5, 1, 4, 0, 2, 3, 6])
    assert_array_equal(plan.rows, [0, 1, 4])
    assert_array_equal(plan.starts, [0, 1, 3, 7])


def test_plan_all_skipped(fake_gpu):
    plan = fake_gpu.plan_rows(np.array([2, 2, 2]), 4, 2)
    assert plan.perm.size == 0 and plan.rows.size == 0
    assert_array_equal(plan.starts, [0])
    assert plan.skipped


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("skip", [None, 2])
def test_dense_and_row_grad_bitwise_equal_cpu(fake_gpu, rng, dtype, scale, skip):
    V, D = 40, 7
    flat = _ids(rng, 300, V)
    flat[::4] = 5
    grad = rng.standard_normal((300, D)).astype(dtype)
    pa = _cpu.plan_rows(flat, V, skip)
    pb = fake_gpu.plan_rows(flat, V, skip)
    dense = fake_gpu.dense_grad(grad, pb, V, scale)
    assert dense.dtype == dtype and dense.shape == (V, D)
    assert_array_equal(dense, _cpu.dense_grad(grad, pa, V, scale))
    assert_array_equal(fake_gpu.row_grad(grad, pb, scale), _cpu.row_grad(grad, pa, scale))


def _assert_same_csr(gpu, cpu):
    assert isinstance(gpu, sp.csr_matrix)  # the fake's cupyx.scipy.sparse.csr_matrix
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    assert gpu.has_canonical_format and gpu.has_sorted_indices
    assert_array_equal(gpu.indptr, cpu.indptr)
    assert_array_equal(gpu.indices, cpu.indices)
    assert_array_equal(gpu.data, cpu.data)
    assert gpu.indices.dtype == np.int32 and gpu.indptr.dtype == np.int32


@pytest.mark.parametrize("scale", [False, True])
def test_sparse_grad_equals_cpu(fake_gpu, rng, dtype, scale):
    V, D = 50, 4
    flat = _ids(rng, 120, V)
    grad = rng.standard_normal((120, D)).astype(dtype)
    grad[flat == 7] = 0  # an explicit zero row stays stored
    flat[:3] = 7
    for skip in (None, 7):
        a = _cpu.sparse_grad(grad, _cpu.plan_rows(flat, V, skip), V, scale)
        b = fake_gpu.sparse_grad(grad, fake_gpu.plan_rows(flat, V, skip), V, scale)
        _assert_same_csr(b, a)


def test_sparse_grad_empty(fake_gpu):
    plan = fake_gpu.plan_rows(np.zeros(0, np.int64), 6, None)
    g = fake_gpu.sparse_grad(np.zeros((0, 3), np.float32), plan, 6, False)
    assert g.shape == (6, 3) and g.nnz == 0
    assert_array_equal(g.indptr, np.zeros(7))


@pytest.mark.parametrize("pick", ["random", "none", "first", "last", "ends", "all"])
def test_from_rows_row_pointer_equals_cpu(fake_gpu, rng, pick):
    # more table rows than the CPU's emulated launch has threads (3 blocks of 256),
    # so each thread's search goes round the grid-stride loop from its last answer
    V, D = 2000 if pick != "all" else 900, 3
    rows = {"random": np.flatnonzero(rng.random(V) < 0.05), "none": [], "first": [0],
            "last": [V - 1], "ends": [0, 1, V - 2, V - 1], "all": np.arange(V)}[pick]
    rows = np.asarray(rows, dtype=np.int64)
    data = rng.standard_normal((rows.shape[0], D)).astype(np.float32)
    gpu = _DeviceArgs(fake_gpu.module._impl).from_rows(rows, data, V)  # (not exported)
    _assert_same_csr(gpu, _rowsparse.from_rows(rows, data, V))


def test_gather_equals_cpu(fake_gpu, rng, dtype):
    w = rng.standard_normal((30, 5)).astype(dtype)
    for idx_dtype in (np.int32, np.int64):
        flat = _ids(rng, 64, 30).astype(idx_dtype)
        assert_array_equal(fake_gpu.gather(w, flat), _cpu.gather(w, flat))
    assert fake_gpu.gather(w, np.zeros(0, np.int64)).shape == (0, 5)
    assert fake_gpu.gather(np.zeros((3, 0), dtype), np.array([1, 2])).shape == (2, 0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.0, 3.5, 0.5, -1.5, np.inf, -np.inf])
def test_renorm_equals_cpu(fake_gpu, rng, dtype, norm_type):
    w = (rng.standard_normal((20, 6)) * 3).astype(dtype)
    w[4] = 0
    w[5, :3] = 0
    rows = np.array([0, 3, 4, 5, 9, 19], dtype=np.int64)
    a, b = w.copy(), w.copy()
    _cpu.renorm_rows_(a, rows, 1.5, norm_type)
    fake_gpu.renorm_rows_(b, rows, 1.5, norm_type)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert_allclose(b, a, rtol=rtol, atol=0)
    untouched = np.setdiff1d(np.arange(20), rows)
    assert_array_equal(b[untouched], w[untouched])


@pytest.mark.parametrize("p, kind", [(2.0, 0), (1.0, 1), (np.inf, 2), (-np.inf, 3), (0.0, 4),
                                     (3.0, 5), (-1.5, 5), (2, 0)])
def test_norm_kind(p, kind):
    assert _ops.norm_kind(p) == kind


def test_add_grad_equals_cpu(fake_gpu, rng):
    V, D = 30, 3
    def grads(flat, g):
        return (_cpu.sparse_grad(g, _cpu.plan_rows(flat, V), V, False),
                fake_gpu.sparse_grad(g, fake_gpu.plan_rows(flat, V), V, False))
    a_cpu, a_gpu = grads(np.array([1, 5, 5, 9]), rng.standard_normal((4, D)))
    b_cpu, b_gpu = grads(np.array([0, 5, 29]), rng.standard_normal((3, D)))
    z_cpu, z_gpu = grads(np.array([7]), np.zeros((1, D)))
    s_gpu = fake_gpu.add_grad(a_gpu, b_gpu)
    _assert_same_csr(s_gpu, _cpu.add_grad(a_cpu, b_cpu))
    assert s_gpu.has_canonical_format
    # explicit zeros survive accumulation (scipy's + would drop them)
    s_gpu = fake_gpu.add_grad(s_gpu, z_gpu)
    assert_array_equal(fake_gpu._impl.stored_rows(s_gpu), [0, 1, 5, 7, 9, 29])
    dense = rng.standard_normal((V, D))
    assert_array_equal(fake_gpu.add_grad(dense, a_gpu), _cpu.add_grad(dense, a_cpu))
    assert_array_equal(fake_gpu.add_grad(a_gpu, dense), _cpu.add_grad(a_cpu, dense))
    assert_array_equal(fake_gpu.add_grad(dense, dense), dense + dense)


def test_row_values_of_a_non_canonical_csr(fake_gpu):
    # duplicates and a partial row: summed and zero-filled, as on the CPU
    m = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([1, 1, 0]), np.array([0, 0, 2, 3])),
                      shape=(3, 2))
    rows, vals = fake_gpu._impl.row_values(m)
    assert_array_equal(rows, [1, 2])
    assert_array_equal(vals, [[0.0, 3.0], [3.0, 0.0]])


@pytest.mark.parametrize("edit, message", [
    (lambda m: setattr(m, "indptr", np.zeros(40, np.int32)), r"row pointer has 40 entries"),
    (lambda m: m.indptr.__setitem__(-1, 10**6), r"row pointer runs from 0 to 1000000"),
    (lambda m: m.indptr.__setitem__(1, 3), r"row pointer decreases at row 1"),
    (lambda m: m.indices.__setitem__(0, 10**6), r"holds index 1000000, outside \[0, 2\)"),
])
@pytest.mark.parametrize("host", [False, True], ids=["device csr", "scipy csr"])
def test_an_edited_csr_grad_is_refused(fake_gpu, edit, message, host):
    # the update kernels index the table by the stored rows: an edited row pointer
    # (which neither scipy nor cupyx rechecks) must not reach them
    impl = fake_gpu._impl
    parts = (np.array([1.0, 2.0, 3.0]), np.array([1, 1, 0], np.int32),
             np.array([0, 0, 2, 3], np.int32))
    m = sp.csr_array(parts, shape=(3, 2)) if host else impl.csr_type(parts, shape=(3, 2))
    assert host or impl.is_sparse(m)
    edit(m)
    with pytest.raises(ValueError, match=message):
        impl.optim_grad(m, np.zeros((3, 2)))
    if not host:
        with pytest.raises(ValueError, match=message):
            impl.add_grad(m, m)


def test_a_gradients_own_rows_are_read_back_without_a_scan(fake_gpu, rng, monkeypatch):
    # from_rows' matrices carry their row list, as the CPU's do: an optimizer step or
    # a backward adding into the gradient checks it in O(rows), not by scanning the
    # row pointer of every table row; the columns are trusted while the matrix's own
    # flags say canonical (as cupyx and, on the CPU, scipy trust them)
    impl = fake_gpu._impl
    V, D = 40, 2
    flat = _ids(rng, 30, V)
    grad = rng.standard_normal((30, D))
    g = fake_gpu.sparse_grad(grad, fake_gpu.plan_rows(flat, V), V, False)
    expected = _rowsparse.row_values(_cpu.sparse_grad(grad, _cpu.plan_rows(flat, V), V, False))

    def no_scan(*args, **kwargs):
        raise AssertionError("the row pointer was scanned")

    with monkeypatch.context() as m:
        m.setattr(_rowsparse, "_check_pointer_order", no_scan)
        rows, values = impl.row_values(g)
        assert_array_equal(rows, expected[0])
        assert_array_equal(values, expected[1])
        assert np.shares_memory(values, g.data)
        g.indices[:] = 0  # an edit the flags do not know of: still read as full rows
        assert_array_equal(impl.row_values(g)[1], expected[1])
    g.indices.reshape(-1, D)[:] = [1, 0]  # a legal csr, each row's columns swapped ...
    g.has_canonical_format = False  # ... and said so: now the columns are read
    assert_array_equal(impl.row_values(g)[1], expected[1][:, ::-1])
    # a row pointer edited in place (same array) fails the O(rows) check: the scan
    # finds it and names it
    g = fake_gpu.sparse_grad(grad, fake_gpu.plan_rows(flat, V), V, False)
    r = int(expected[0][1])
    g.indptr[r] = g.indptr[r + 1] + 1
    with pytest.raises(ValueError, match=f"row pointer decreases at row {r}"):
        impl.optim_grad(g, np.zeros((V, D)))


def test_from_host_and_to_numpy_round_trip(fake_gpu, rng):
    impl = fake_gpu._impl
    plan = _cpu.plan_rows(np.array([4, 1, 4]), 6)
    g = _cpu.sparse_grad(rng.standard_normal((3, 2)), plan, 6, False)
    on_dev = impl.from_host(g)
    assert isinstance(on_dev, sp.csr_matrix) and on_dev.has_canonical_format
    back = impl.to_numpy(on_dev)
    assert isinstance(back, sp.csr_array)
    assert_array_equal(back.toarray(), g.toarray())
    nc = rng.standard_normal((4, 6))[:, ::2]
    dev = impl.from_host(nc)
    assert dev.flags.c_contiguous
    assert_array_equal(dev, nc)


# ----------------------------------------------------------------- validation

@pytest.mark.parametrize("idx_dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8,
                                       np.uint16, np.uint32, np.uint64])
def test_device_index_array_dtypes(idx_dtype):
    arr = np.array([[1, 2], [3, 0]], dtype=idx_dtype)
    out = _ops.device_index_array(np, arr)
    assert out.dtype in (np.int32, np.int64) and out.flags.c_contiguous
    assert out.dtype == (idx_dtype if np.dtype(idx_dtype) in (np.int32, np.int64) else np.int64)
    assert_array_equal(out, arr)
    assert _ops.device_index_array(np, np.int64(3)).shape == ()


@pytest.mark.parametrize("bad, match", [
    (np.array([1.0]), "must be an array of integers, got dtype float64"),
    (np.array([True]), r"bool is not an index type"),
    (np.array([1 + 0j]), "complex"),
])
def test_device_index_array_type_errors(bad, match):
    with pytest.raises(TypeError, match=match):
        _ops.device_index_array(np, bad)


def test_device_index_array_uint64_overflow():
    arr = np.array([1, 2, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(IndexError, match=r"index 9223372036854775813 at position 2"):
        _ops.device_index_array(np, arr)
    with pytest.raises(IndexError, match=r"index 9223372036854775813 at position 2"):
        _ops.device_index_array(np, arr.astype(">u8"))
    with pytest.raises(IndexError, match=r"position 2 is out of range for 7 embeddings "
                                         r"\(valid: 0..6\)"):
        _ops.device_index_array(np, arr, "input", 7)


@pytest.mark.parametrize("ids, pos", [([0, 1, 10, 2, -1], 2), ([-3, 0], 0), ([0, 9, 9, 12], 3)])
def test_index_range_message_equals_cpu(fake_gpu, ids, pos):
    flat = np.array(ids, dtype=np.int64)
    with pytest.raises(IndexError) as cpu_err:
        _cpu.check_index_range(flat, 10)
    with pytest.raises(IndexError) as gpu_err:
        fake_gpu.check_index_range(flat, 10)
    assert str(gpu_err.value) == str(cpu_err.value)
    assert f"at position {pos}" in str(gpu_err.value)
    impl = fake_gpu.module._impl
    for dtype in (np.int32, np.int64):
        assert impl.first_out_of_range(_view(flat.astype(dtype)), 10) == pos
    assert impl.first_out_of_range(_view(np.array([0, 9])), 10) == -1
    assert impl.first_out_of_range(_view(np.zeros(0, np.int64)), 10) == -1


def test_check_weight_and_grad_output(fake_gpu):
    with pytest.raises(TypeError, match="must be a cupy ndarray on device 'cuda'"):
        fake_gpu.check_weight([[1.0]])
    with pytest.raises(ValueError, match="must be 2-D"):
        fake_gpu.check_weight(np.zeros(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        fake_gpu.check_weight(np.zeros((2, 2), np.int64))
    ro = np.zeros((2, 2))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fake_gpu.check_writable(ro)
    with pytest.raises(ValueError, match=r"grad_output has shape \(2, 3\), expected \(2, 4\)"):
        fake_gpu.as_grad_output(np.zeros((2, 3)), (2, 4), np.float32)
    with pytest.raises(TypeError, match="real array"):
        fake_gpu.as_grad_output(np.zeros((2, 4), complex), (2, 4), np.float32)
    g = fake_gpu.as_grad_output(np.ones((4, 2), np.float64).T, (2, 4), np.float32)
    assert g.dtype == np.float32 and g.flags.c_contiguous


# ----------------------------------------------------------------- the layer seam

@pytest.fixture
def counted(monkeypatch):
    """Count kernel launches by name."""
    counts = {}
    original = reference_gpu.FakeKernel.__call__

    def call(self, grid, block, args, **kw):
        counts[self.name] = counts.get(self.name, 0) + 1
        return original(self, grid, block, args, **kw)

    monkeypatch.setattr(reference_gpu.FakeKernel, "__call__", call)
    return counts


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx, max_norm, scale", [
    (None, None, False), (0, None, True), (3, 1.0, False), (None, 0.5, True)])
def test_embedding_on_fake_cuda_equals_cpu(fake_gpu, counted, rng, dtype, sparse, padding_idx,
                                           max_norm, scale):
    kw = dict(padding_idx=padding_idx, max_norm=max_norm, scale_grad_by_freq=scale,
              sparse=sparse, dtype=dtype, random_state=7)
    cpu = se.Embedding(25, 6, **kw)
    gpu = se.Embedding(25, 6, device="cuda", **kw)
    assert gpu.device == "cuda" and gpu._backend is fake_gpu.module
    assert_array_equal(gpu.weight, cpu.weight)  # same seeded init, drawn on the host
    for step in range(3):
        ids = rng.integers(0, 25, size=(4, 5))
        ids[0, :2] = 3
        out_c, out_g = cpu(ids), gpu(ids)
        assert_allclose(out_g, out_c, rtol=1e-6 if dtype == np.float32 else 1e-12)
        go = rng.standard_normal(out_c.shape).astype(dtype)
        g_c, g_g = cpu.backward(go), gpu.backward(go)
        if sparse:
            assert isinstance(g_g, sp.csr_matrix)
            assert_array_equal(g_g.indptr, g_c.indptr)
            assert_allclose(g_g.toarray(), g_c.toarray(), rtol=1e-6)
        else:
            assert_allclose(g_g, g_c, rtol=1e-6)
    assert_allclose(fake_gpu.to_numpy(gpu.grad).toarray() if sparse else gpu.grad,
                    cpu.grad.toarray() if sparse else cpu.grad, rtol=1e-5)
    assert counted.get("se_gather") == 3
    assert counted.get("se_segment_sum") == 3
    assert counted.get("se_renorm", 0) == (3 if max_norm is not None else 0)


def test_embedding_on_fake_cuda_index_error_changes_nothing(fake_gpu, counted):
    emb = se.Embedding(10, 3, max_norm=0.1, device="cuda", random_state=0)
    before = emb.weight.copy()
    msg = r"index 10 at position 3 is out of range for 10 embeddings"
    with pytest.raises(IndexError, match=msg):
        emb(np.array([1, 2, 3, 10]))
    assert_array_equal(emb.weight, before)
    assert counted == {"se_check_ids": 1}  # the range check (it writes its flag only)
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([1.0]))


def test_to_and_pickle_through_the_seam(fake_gpu, rng):
    emb = se.Embedding(8, 3, padding_idx=1, sparse=True, random_state=3)
    ref_w = emb.weight.copy()
    emb(np.array([2, 2, 5]))
    emb.backward(np.ones((3, 3), np.float32))
    assert emb.to("cuda:0") is emb
    assert emb.device == "cuda" and isinstance(emb.grad, sp.csr_matrix)
    assert repr(emb) == "Embedding(8, 3, padding_idx=1, sparse=True, device='cuda')"
    emb(np.array([5, 7]))
    emb.backward(np.ones((2, 3), np.float32))
    for clone in (pickle.loads(pickle.dumps(emb)), copy.deepcopy(emb)):
        assert clone.device == "cuda"
        assert_array_equal(clone.weight, ref_w)
        assert_array_equal(fake_gpu.to_numpy(clone.grad).toarray(),
                           fake_gpu.to_numpy(emb.grad).toarray())
    state = emb.__getstate__()
    assert isinstance(state["weight"], np.ndarray) and state["_saved"] is None
    assert isinstance(state["grad"], sp.csr_array)
    emb.to("cpu")
    assert emb.device == "cpu" and isinstance(emb.grad, sp.csr_array)
    assert emb.grad.has_canonical_format
    expected = np.zeros((8, 3), np.float32)
    expected[[2, 5, 7]] = [[2, 2, 2], [2, 2, 2], [1, 1, 1]]
    assert_array_equal(emb.grad.toarray(), expected)
    # and the CPU layer goes on training
    emb(np.array([0]))
    emb.backward(np.ones((1, 3), np.float32))


def test_functional_on_fake_cuda(fake_gpu, rng, counted):
    # functional forms pick the backend from the arrays; a CuPy weight goes to the CUDA
    # backend. With numpy standing in, call the backend's pieces as F does.
    w = rng.standard_normal((12, 4)).astype(np.float32)
    ids = np.array([[1, 2], [11, 1]])
    idx, flat = F.lookup_ids(ids, fake_gpu, 12)
    out = fake_gpu.gather(w, flat).reshape(idx.shape + (4,))
    assert_array_equal(out, F.embedding(ids, w))
    plan = fake_gpu.plan_rows(flat, 12)
    w2 = w.copy()
    F.renorm_(w2, plan, 0.5, 2.0, None, fake_gpu)
    assert_allclose(w2, F.embedding_renorm_(w.copy(), ids, 0.5), rtol=1e-6)
    go = rng.standard_normal((4, 4)).astype(np.float32)
    g = F.weight_grad(go, plan, 12, False, True, fake_gpu)
    expected = F.embedding_backward(go.reshape(2, 2, 4), ids, 12, sparse=True)
    assert_array_equal(g.toarray(), expected.toarray())


def test_from_pretrained_device_array_dtypes(fake_gpu, rng):
    # an integer device table becomes float32 and a float64 one stays (as with numpy)
    w = reference_gpu.to_device(rng.integers(0, 5, size=(5, 2)))
    emb = se.Embedding.from_pretrained(w)
    assert emb.device == "cuda" and emb.weight.dtype == np.float32
    w64 = reference_gpu.to_device(rng.standard_normal((5, 2)))
    emb = se.Embedding.from_pretrained(w64)
    assert emb.weight.dtype == np.float64 and np.shares_memory(emb.weight, w64)  # no copy


def test_float16_tables_stay_on_the_cpu(fake_gpu, rng):
    with pytest.raises(TypeError, match="float16 tables are CPU-only"):
        se.Embedding.from_pretrained(reference_gpu.to_device(np.ones((4, 2), np.float16)))
    with pytest.raises(TypeError, match="float16 tables are CPU-only"):
        se.Embedding(4, 2, dtype=np.float16, device="cuda")
    emb = se.Embedding(4, 2, dtype=np.float16, random_state=0)
    weight, values = emb.weight, emb.weight.copy()
    with pytest.raises(TypeError, match="float16 tables are CPU-only"):
        emb.to("cuda")
    _assert_layer_unchanged(emb, weight, values, None)


# ----------------------------------------------------------------- the CUDA source

@pytest.mark.parametrize("t_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("i_dtype", [np.int32, np.int64])
def test_cuda_source_compiles_as_cpp(tmp_path, t_dtype, i_dtype):
    # strict C++ (-Wall -Werror) against the CUDA environment the CPU runs it in
    cxx = reference_gpu.CudaSourceOnCpu.compiler()
    if cxx is None:
        pytest.skip("no working C++ compiler")
    src = tmp_path / "kernels.cpp"
    header = Path(reference_gpu.__file__).with_name("warp_emulator.h")
    src.write_text(f'#include "{header}"\n' + _kernels.module_source(t_dtype, i_dtype))
    # (#pragma unroll is nvcc's)
    res = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
                          "-Wno-unused-function", "-Wno-unknown-pragmas", str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


_WARP_PROBES = r"""
typedef long long i64;
extern "C" __global__ void whole_warp(double* out, const int offset) {
    out[threadIdx.y * 32 + threadIdx.x] =
        __shfl_xor_sync(0xffffffffu, (double)(threadIdx.y * 32 + threadIdx.x), offset);
}
extern "C" __global__ void half_warp(double* out, const int offset) {
    double v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, offset);
    out[threadIdx.x] = v;
}
extern "C" __global__ void flag_max(i64* bad, const int offset) {
    atomicMax(bad, (i64)(blockIdx.x * 1000 + threadIdx.y * 32 + threadIdx.x + offset));
}
"""


@pytest.mark.slow
def test_the_gpu_suite_passes_with_the_kernels_run_on_the_cpu(tmp_path):
    # tests/test_gpu.py, every test, with the CUDA source run on the CPU (the plugin
    # tests/gpu_suite_on_cpu.py stands in for CuPy and the device); where the
    # compiler has AddressSanitizer, the kernels are built with it and every memory
    # access they make is checked (the CPU's compute-sanitizer memcheck)
    import os

    on_cpu = reference_gpu.CudaSourceOnCpu
    if on_cpu.compiler() is None:
        pytest.skip("no working C++ compiler")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests)] + [p for p in sys.path if p]))
    asan = on_cpu.asan_runtime()
    log = tmp_path / "asan"
    if asan:
        env.update(LD_PRELOAD=asan, CUDA_ON_CPU_CFLAGS="-fsanitize=address -fno-omit-frame-pointer",
                   ASAN_OPTIONS=f"detect_leaks=0:log_path={log}")
    res = subprocess.run([sys.executable, "-m", "pytest", str(tests / "test_gpu.py"),
                          "-p", "gpu_suite_on_cpu", "-p", "no:cacheprovider", "-q"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert "ERROR: AddressSanitizer" not in reports, reports[:6000]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 290 and "skipped" not in summary and "failed" not in summary, summary


def test_warp_emulator_shuffles_in_lockstep_and_refuses_divergence():
    # the CPU's CUDA environment that the cuda-source-kernels tests run the kernels in
    if reference_gpu.CudaSourceOnCpu.compiler() is None:
        pytest.skip("no working C++ compiler")
    runner = reference_gpu.CudaSourceOnCpu.of(_WARP_PROBES)
    out = np.zeros(64)
    for offset in (1, 16, 5):
        runner.launch("whole_warp", (1,), (32, 2), [out, np.int32(offset)])
        assert_array_equal(out, np.arange(64) ^ offset)  # each warp within itself
    with pytest.raises(AssertionError, match="half_warp on the CPU: a warp collective that "
                                             "not every lane reaches"):
        runner.launch("half_warp", (1,), (32, 1), [out, np.int32(1)])
    bad = np.zeros(1, np.int64)
    runner.launch("flag_max", (2,), (32, 2), [bad, np.int32(7)])
    assert bad[0] == 1000 + 63 + 7  # every block and warp ran


@pytest.fixture(scope="module")
def nvrtc():
    compile_ = reference_gpu.nvrtc_compiler()
    if compile_ is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc; Linux)")
    return compile_


@pytest.mark.parametrize("arch", ["compute_75", "compute_90"])  # CUDA 13's oldest; Hopper
@pytest.mark.parametrize("t_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("i_dtype", [np.int32, np.int64])
def test_cuda_source_compiles_with_nvrtc(nvrtc, arch, t_dtype, i_dtype):
    # the compiler CuPy uses, with the backend's options: no GPU needed to compile
    ok, log, ptx = nvrtc(_kernels.module_source(t_dtype, i_dtype),
                         [*_kernels.COMPILE_OPTIONS, f"-arch={arch}"])
    assert ok, log
    assert "warning" not in log.lower(), log
    for name in reference_gpu.parse_signatures(_kernels.SOURCE):
        assert f".entry {name}(" in ptx, f"{name} is not an unmangled kernel in the PTX"


def test_every_kernel_is_launched_by_a_launcher():
    sigs = reference_gpu.parse_signatures(_kernels.SOURCE)
    assert set(sigs) == set(reference_gpu.EMULATIONS)
    import inspect as _inspect

    launcher_src = _inspect.getsource(_kernels.CudaKernels)
    for name in sigs:
        assert f'"{name}"' in launcher_src


def test_launch_shape():
    assert _ops.launch_shape(0) == ((1,), (32, 8))
    assert _ops.launch_shape(8) == ((1,), (32, 8))
    assert _ops.launch_shape(9) == ((2,), (32, 8))
    assert _ops.launch_shape(10**12)[0] == (_ops.MAX_BLOCKS,)


# ----------------------------------------------------------------- EmbeddingBag backend

needs_bag = pytest.mark.skipif(not hasattr(_cpu, "bag_forward"),
                               reason="EmbeddingBag's CPU backend is not merged yet")


def _bag_batch(rng, V=30, n=60, n_bags=9):
    flat = rng.integers(0, V, size=n)
    flat[::5] = 4
    cuts = np.sort(rng.integers(0, n, size=n_bags - 1))
    starts = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    starts[3] = starts[2]  # an empty bag
    return flat, starts


@needs_bag
@pytest.mark.parametrize("mode, with_psw", [("sum", False), ("sum", True), ("mean", False),
                                             ("max", False)])
@pytest.mark.parametrize("padding_idx", [None, 4])
def test_bag_forward_equals_cpu(fake_gpu, rng, dtype, mode, padding_idx, with_psw):
    w = rng.standard_normal((30, 5)).astype(dtype)
    w[7, 2] = w[8, 2] = 9  # a tie in max mode: the first occurrence wins
    flat, starts = _bag_batch(rng)
    flat[starts[1]:starts[1] + 2] = [7, 8]
    psw = rng.standard_normal(flat.shape[0]).astype(dtype) if with_psw else None
    for idx in (flat.astype(np.int64), flat.astype(np.int32)):
        a = _cpu.bag_forward(w, idx, starts, mode, padding_idx, psw)
        b = fake_gpu.bag_forward(w, idx, starts, mode, padding_idx, psw)
        assert_array_equal(b[0], a[0])  # same arithmetic in the same order: bitwise
        assert_array_equal(b[2], a[2])
        if mode == "max":
            assert_array_equal(b[1], a[1])
        else:
            assert b[1] is None and a[1] is None


@needs_bag
def test_bag_forward_no_bags_and_no_columns(fake_gpu):
    w = np.ones((4, 3), np.float32)
    out, am, counts = fake_gpu.bag_forward(w, np.array([1, 2]), np.zeros(1, np.int64), "max", None)
    assert out.shape == (0, 3) and am.shape == (0, 3) and counts.shape == (0,)
    a = _cpu.bag_forward(np.ones((4, 0), np.float32), np.array([1]), np.array([0, 1]), "sum", None)
    b = fake_gpu.bag_forward(np.ones((4, 0), np.float32), np.array([1]), np.array([0, 1]), "sum",
                             None)
    assert b[0].shape == a[0].shape
    assert_array_equal(b[2], a[2])


@needs_bag
@pytest.mark.parametrize("padding_idx", [None, 4])
def test_bag_helpers_equal_cpu(fake_gpu, rng, dtype, padding_idx):
    flat, starts = _bag_batch(rng)
    starts[-1] = starts[-2] + 1  # entries past the last bag belong to none
    assert_array_equal(fake_gpu.bag_counts(flat, starts, padding_idx),
                       _cpu.bag_counts(flat, starts, padding_idx))
    eb = fake_gpu.entry_bags(starts)
    assert_array_equal(eb, _cpu.entry_bags(starts))
    counts = _cpu.bag_counts(flat, starts, padding_idx)
    assert_array_equal(fake_gpu.mean_scale(counts, eb, dtype), _cpu.mean_scale(counts, eb, dtype))
    w = rng.standard_normal((30, 5)).astype(dtype)
    g = rng.standard_normal((starts.shape[0] - 1, 5)).astype(dtype)
    assert_allclose(fake_gpu.per_sample_weights_grad(g, w, flat, eb, padding_idx),
                    _cpu.per_sample_weights_grad(g, w, flat, eb, padding_idx),
                    rtol=1e-6 if dtype == np.float32 else 1e-12)


def _bag_backward_inputs(rng, dtype, mode, hot=None):
    """A bag batch (padding id 4; ``hot``: an id at every third entry) and what its
    backward takes: (V, flat, pad, grad, argmax, entry_bag, scale)."""
    V, D = 30, 5
    w = rng.standard_normal((V, D)).astype(dtype)
    flat, starts = _bag_batch(rng, V, n=60 if hot is None else 120)
    if hot is not None:
        flat[1::3] = hot  # 40 entries of one row: 14 chunks of 3
    pad = 4
    grad = rng.standard_normal((starts.shape[0] - 1, D)).astype(dtype)
    real_mode = "sum" if mode == "psw" else mode
    psw = rng.standard_normal(flat.shape[0]).astype(dtype) if mode == "psw" else None
    _, argmax, counts = _cpu.bag_forward(w, flat, starts, real_mode, pad, psw)
    eb = _cpu.entry_bags(starts)
    scale_e = _cpu.mean_scale(counts, eb, dtype) if mode == "mean" else psw
    return V, flat, pad, grad, argmax, eb, scale_e


def test_split_segments():
    starts = np.array([0, 1, 8, 9, 15], dtype=np.int64)
    assert _ops.split_segments(np, starts, 7) is None
    sub, first = _ops.split_segments(np, starts, 3)
    assert_array_equal(sub, [0, 1, 4, 7, 8, 9, 12, 15])
    assert_array_equal(first, [0, 1, 4, 5, 7])
    assert _ops.split_segments(np, np.zeros(1, np.int64), 3) is None


@pytest.fixture
def small_chunks(fake_gpu):
    impl = fake_gpu.module._impl
    impl.segment_chunk = 3
    yield fake_gpu
    impl.segment_chunk = _ops.SEGMENT_CHUNK


@pytest.mark.parametrize("scale", [False, True])
def test_long_segments_are_summed_in_chunks(small_chunks, rng, dtype, scale):
    V, D, n = 20, 3, 200
    flat = rng.integers(0, V, size=n)
    flat[::2] = 5  # row 5: over 100 entries, 34 and more chunks of 3
    grad = rng.standard_normal((n, D)).astype(dtype)
    plan = small_chunks.plan_rows(flat, V)
    expected = np.zeros((V, D), dtype)
    for r in np.unique(flat):
        terms = grad[np.flatnonzero(flat == r)]
        expected[r] = reference_gpu.chunked_sum(terms, 3, False)
        if scale and len(terms) > 1:
            expected[r] = expected[r] / dtype.type(len(terms))
    assert_array_equal(small_chunks.dense_grad(grad, plan, V, scale), expected)
    assert_array_equal(small_chunks.row_grad(grad, plan, scale), expected[np.unique(flat)])
    _assert_same_csr(small_chunks.sparse_grad(grad, plan, V, scale),
                     sp.csr_array(expected * (np.isin(np.arange(V), flat))[:, None]))
    # the same sums up to rounding
    assert_allclose(expected, _cpu.dense_grad(grad, _cpu.plan_rows(flat, V), V, scale),
                    rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-5)


@needs_bag
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "psw"])
@pytest.mark.parametrize("scale", [False, True])
def test_long_bag_segments_are_summed_in_chunks(small_chunks, rng, dtype, mode, scale):
    V, flat, pad, grad, argmax, eb, scale_e = _bag_backward_inputs(rng, dtype, mode, hot=7)
    expected = np.zeros((V, grad.shape[1]), dtype)
    for r in np.unique(flat[flat != pad]):
        entries = np.flatnonzero(flat == r)
        g = grad[eb[entries]]
        if mode == "max":
            g = np.where(argmax[eb[entries]] == entries[:, None], g, dtype.type(0))
        elif scale_e is not None:
            g = scale_e[entries][:, None] * g
        expected[r] = reference_gpu.chunked_sum(g, 3, True)
        if scale and len(entries) > 1:
            expected[r] = expected[r] / dtype.type(len(entries))
    plan = small_chunks.plan_rows(flat, V, pad)
    assert_array_equal(small_chunks.bag_dense_grad(grad, plan, eb, scale_e, argmax, V, scale),
                       expected)
    assert_array_equal(small_chunks.bag_row_grad(grad, plan, eb, scale_e, argmax, scale),
                       expected[np.unique(flat[flat != pad])])
    assert_allclose(expected,
                    _cpu.bag_dense_grad(grad, _cpu.plan_rows(flat, V, pad), eb, scale_e,
                                        argmax, V, scale),
                    rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-5)


@needs_bag
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "psw"])
@pytest.mark.parametrize("scale", [False, True])
def test_bag_backward_equals_cpu(fake_gpu, rng, dtype, mode, scale):
    V, flat, pad, grad, argmax, eb, scale_e = _bag_backward_inputs(rng, dtype, mode)
    pa = _cpu.plan_rows(flat, V, pad)
    pb = fake_gpu.plan_rows(flat, V, pad)
    assert_array_equal(fake_gpu.bag_dense_grad(grad, pb, eb, scale_e, argmax, V, scale),
                       _cpu.bag_dense_grad(grad, pa, eb, scale_e, argmax, V, scale))
    assert_array_equal(fake_gpu.bag_row_grad(grad, pb, eb, scale_e, argmax, scale),
                       _cpu.bag_row_grad(grad, pa, eb, scale_e, argmax, scale))
    _assert_same_csr(fake_gpu.bag_sparse_grad(grad, pb, eb, scale_e, argmax, V, scale),
                     _cpu.bag_sparse_grad(grad, pa, eb, scale_e, argmax, V, scale))


@needs_bag
@pytest.mark.parametrize("mode, with_psw", [("sum", False), ("sum", True), ("mean", False),
                                             ("max", False)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("layout", ["offsets", "2d", "csr"])
def test_embedding_bag_on_fake_cuda_equals_cpu(fake_gpu, counted, rng, mode, with_psw, sparse,
                                               layout):
    if layout == "csr" and mode != "sum" and with_psw:
        pytest.skip("not a valid combination")
    kw = dict(mode=mode, sparse=sparse, padding_idx=2, scale_grad_by_freq=True, max_norm=2.0,
              random_state=4)
    cpu = se.EmbeddingBag(20, 4, **kw)
    gpu = se.EmbeddingBag(20, 4, device="cuda", **kw)
    assert gpu._backend is fake_gpu.module
    for _ in range(2):
        ids = rng.integers(0, 20, size=(5, 6))
        ids[0, :3] = 2
        psw = rng.standard_normal(ids.shape) if with_psw else None
        if layout == "offsets":
            args = (ids.reshape(-1), np.array([0, 6, 6, 20, 25]))
            kwargs = {"per_sample_weights": None if psw is None else psw.reshape(-1)}
        elif layout == "2d":
            args, kwargs = (ids,), {"per_sample_weights": psw}
        else:
            data = psw if with_psw else np.ones(ids.shape)
            if mode != "sum":
                data = np.ones(ids.shape)
            args = (sp.csr_array((data.reshape(-1), ids.reshape(-1), np.arange(0, 31, 6))),)
            kwargs = {}
        out_c, out_g = cpu(*args, **kwargs), gpu(*args, **kwargs)
        assert_allclose(out_g, out_c, rtol=1e-6)
        go = rng.standard_normal(out_c.shape).astype(np.float32)
        g_c, g_g = cpu.backward(go), gpu.backward(go)
        if sparse:
            assert isinstance(g_g, sp.csr_matrix)
            assert_array_equal(g_g.indptr, g_c.indptr)
            g_g, g_c = g_g.toarray(), g_c.toarray()
        assert_allclose(g_g, g_c, rtol=1e-6, atol=1e-7)
        if with_psw and layout != "csr":
            assert_allclose(gpu.per_sample_weights_grad, cpu.per_sample_weights_grad, rtol=1e-5)
    assert counted.get("se_bag_forward") == 2
    assert counted.get("se_bag_segment_sum") == 2
    assert counted.get("se_renorm") == 2
    gpu.to("cpu")
    assert_allclose(gpu.weight, cpu.weight, rtol=1e-6)


@needs_bag
def test_embedding_bag_functional_on_fake_cuda(fake_gpu, rng):
    w = rng.standard_normal((15, 3)).astype(np.float32)
    ids = rng.integers(0, 15, size=12)
    off = np.array([0, 4, 4, 9])
    be = fake_gpu
    from sparsembed import _bags

    bags = _bags.bags_of(ids, off, None, "max", False, 15, w.dtype, be)
    out, argmax, _ = be.bag_forward(w, bags.flat, bags.starts, "max", None)
    assert_array_equal(out, F.embedding_bag(ids, w, off, mode="max"))
    with pytest.raises(IndexError, match="index 15 at position 3"):
        _bags.bags_of(np.array([1, 2, 3, 15]), np.array([0]), None, "sum", False, 15, w.dtype, be)


@needs_bag
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_bag_checks_on_fake_cuda_equal_cpu(fake_gpu, counted, rng, mode):
    # offsets checked by se_bag_starts, ids by the pooling kernel: the CPU's errors
    dev = reference_gpu.to_device
    w = rng.standard_normal((reference_gpu.BAG_CHECK_ROWS, 4)).astype(np.float32)
    wd = dev(w)
    for ids, off, last in reference_gpu.bag_check_cases():
        def on_cpu():
            F.embedding_bag(ids, w, off, mode=mode, include_last_offset=last)

        for ids_g, off_g in ((dev(ids), dev(off)), (dev(ids.astype(np.int32)),
                                                    dev(off.astype(np.int32))),
                             (ids, list(off))):
            reference_gpu.assert_same_error(on_cpu, lambda: F.embedding_bag(
                ids_g, wd, off_g, mode=mode, include_last_offset=last), (ids, off, last))
    assert counted.get("se_bag_starts", 0) >= 3 * 12  # device offsets: checked there
    assert_array_equal(wd, w)


@needs_bag
def test_bag_checks_with_renorm_on_fake_cuda_change_nothing(fake_gpu, rng):
    kw = dict(mode="sum", max_norm=0.5, random_state=3)
    cpu = se.EmbeddingBag(reference_gpu.BAG_CHECK_ROWS, 4, **kw)
    gpu = se.EmbeddingBag(reference_gpu.BAG_CHECK_ROWS, 4, device="cuda", **kw)
    before = gpu.weight.copy()
    for ids, off, last in reference_gpu.bag_check_cases():
        cpu.include_last_offset = gpu.include_last_offset = last
        reference_gpu.assert_same_error(lambda: cpu(ids, off), lambda: gpu(ids, off),
                                        (ids, off, last))
    assert_array_equal(gpu.weight, before)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_first_bad_id_named_among_many_on_fake_cuda(fake_gpu, rng, idx_dtype):
    ids, first = reference_gpu.ids_with_bad(rng, 3000, 50)
    ids = reference_gpu.to_device(ids.astype(idx_dtype))
    msg = f"index {int(ids[first])} at position {first} is out of range"
    w = reference_gpu.to_device(rng.standard_normal((50, 4)).astype(np.float32))
    for call in (lambda: se.Embedding(50, 4, device="cuda")(ids),
                 lambda: se.Embedding(50, 4, max_norm=1.0, device="cuda")(ids),
                 lambda: F.embedding_bag(ids, w, reference_gpu.to_device(
                     np.arange(0, 3000, 30)), mode="mean"),
                 lambda: F.embedding_bag(ids.reshape(100, 30), w, mode="max")):
        with pytest.raises(IndexError, match=msg):
            call()


# ----------------------------------------------------------------- optimizer kernels

try:
    from sparsembed._kernels import _optim
except ImportError:  # the optimizers are not merged yet
    _optim = None

needs_optim = pytest.mark.skipif(_optim is None, reason="se.optim is not merged yet")

# (kind, hyper, state widths) per optimizer: hyper = (lr, momentum, wd, eps, c1, c2, c3),
# the CPU kernel's doubles (SGD: c1 = 1 - dampening, c2 = first step, c3 = Nesterov)
OPTIM_CASES = {
    "sgd": (0, (0.1, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0), ()),
    "sgd_momentum_wd": (0, (0.1, 0.9, 0.01, 0.0, 1.0, 0.0, 0.0), ("dim",)),
    "sgd_first_step": (0, (0.1, 0.9, 0.0, 0.0, 1.0, 1.0, 0.0), ("dim",)),
    "sgd_dampening_nesterov": (0, (0.1, 0.9, 0.0, 0.0, 0.7, 0.0, 1.0), ("dim",)),
    "adagrad": (1, (0.05, 0.0, 0.0, 1e-10, 0.0, 0.0, 0.0), ("dim",)),
    "adagrad_wd": (1, (0.05, 0.0, 0.1, 1e-10, 0.0, 0.0, 0.0), ("dim",)),
    "sparse_adam": (2, (1e-3 * 0.3, 0.0, 0.0, 1e-8, 0.1, 0.001, 0.0), ("dim", "dim")),
    "rowwise": (3, (0.05, 0.0, 0.0, 1e-10, 0.0, 0.0, 0.0), (1,)),
    "rowwise_wd": (3, (0.05, 0.0, 0.1, 1e-10, 0.0, 0.0, 0.0), (1,)),
}


def _states(rng, widths, V, D, dtype):
    out = [np.abs(rng.standard_normal((V, D if w == "dim" else 1))).astype(dtype) for w in widths]
    return out + [None] * (2 - len(out))


def _cpu_state(s, dtype):
    return np.empty((0, 1), dtype=dtype) if s is None else s


@needs_optim
@pytest.mark.parametrize("case", sorted(OPTIM_CASES))
@pytest.mark.parametrize("sparse_rows", [False, True])
def test_optim_update_rows_equals_cpu(fake_gpu, rng, dtype, case, sparse_rows):
    kind, hyper, widths = OPTIM_CASES[case]
    V, D = 40, 6
    w = rng.standard_normal((V, D)).astype(dtype)
    states = _states(rng, widths, V, D, dtype)
    if sparse_rows:
        rows = np.array([0, 3, 4, 17, 39], dtype=np.int64)
        values = rng.standard_normal((rows.size, D)).astype(dtype)
    else:
        rows, values = None, rng.standard_normal((V, D)).astype(dtype)
    w_c, w_g = w.copy(), w.copy()
    st_c = [None if s is None else s.copy() for s in states]
    st_g = [None if s is None else s.copy() for s in states]
    for _ in range(3):
        _optim.update_rows(kind, *hyper, w_c, np.empty(0, np.int64) if rows is None else rows,
                           rows is None, values, _cpu_state(st_c[0], dtype),
                           _cpu_state(st_c[1], dtype), 2)
        fake_gpu.optim_update_rows(kind, hyper, w_g, rows, values, st_g[0], st_g[1])
    if kind == 3:  # the mean of squares is a warp reduction on the GPU: rounding may differ
        rtol = 1e-6 if dtype == np.float32 else 1e-12
        assert_allclose(w_g, w_c, rtol=rtol, atol=rtol)
        assert_allclose(st_g[0], st_c[0], rtol=rtol)
    else:
        assert_array_equal(w_g, w_c)
        for a, b in zip(st_g, st_c):
            if a is not None:
                assert_array_equal(a, b)


@needs_optim
@pytest.mark.parametrize("case", ["sgd_dampening_nesterov", "adagrad", "sparse_adam", "rowwise"])
@pytest.mark.parametrize("with_src", [False, True, "max"])
@pytest.mark.parametrize("scale", [False, True])
def test_optim_fused_update_equals_cpu(fake_gpu, rng, case, with_src, scale):
    kind, hyper, widths = OPTIM_CASES[case]
    dtype = np.dtype(np.float64)
    V, D, n = 30, 5, 50
    w = rng.standard_normal((V, D)).astype(dtype)
    states = _states(rng, widths, V, D, dtype)
    flat = rng.integers(0, V, size=n)
    flat[::3] = 2
    argmax = None
    if with_src:  # a bag batch: entry e reads grad row src[e], times scale_e[e]
        src = np.sort(rng.integers(0, 7, size=n)).astype(np.int64)
        grad = rng.standard_normal((7, D)).astype(dtype)
        scale_e = rng.standard_normal(n).astype(dtype)
        if with_src == "max":  # max mode: entry e sends the columns it won
            scale_e = None
            bag_starts = np.searchsorted(src, np.arange(8)).astype(np.int64)
            _, argmax, _ = _cpu.bag_forward(w, flat, bag_starts, "max", 5)
    else:
        src, scale_e, grad = None, None, rng.standard_normal((n, D)).astype(dtype)
    w_c, w_g = w.copy(), w.copy()
    st_c = [None if s is None else s.copy() for s in states]
    st_g = [None if s is None else s.copy() for s in states]
    _optim.fused_update(kind, *hyper, w_c, grad, *(lambda p: (p.perm, p.rows, p.starts))(
                            _cpu.plan_rows(flat, V, 5)),
                        np.empty(0, np.int64) if src is None else src,
                        np.empty(0, dtype) if scale_e is None else scale_e,
                        _cpu._won_masks(argmax, src),
                        scale,
                        _cpu_state(st_c[0], dtype), _cpu_state(st_c[1], dtype), 2)
    fake_gpu.optim_fused_update(kind, hyper, w_g, grad, fake_gpu.plan_rows(flat, V, 5), src,
                                scale_e, scale, st_g[0], st_g[1], argmax=argmax)
    assert_allclose(w_g, w_c, rtol=1e-12, atol=1e-14)
    for a, b in zip(st_g, st_c):
        if a is not None:
            assert_allclose(a, b, rtol=1e-12)
    untouched = np.setdiff1d(np.arange(V), np.append(flat[flat != 5], []))
    assert_array_equal(w_g[untouched], w[untouched])


# ----------------------------------------------------------------- se.optim on "cuda"

needs_optim_seam = pytest.mark.skipif(not hasattr(_cpu, "optim_update_rows"),
                                      reason="se.optim does not go through the backend yet")

OPTIMIZERS = {
    "sgd": lambda p: se.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adagrad": lambda p: se.optim.Adagrad(p, lr=0.05, lr_decay=0.01, weight_decay=0.1),
    "sparse_adam": lambda p: se.optim.SparseAdam(p, lr=0.01),
    "rowwise": lambda p: se.optim.RowWiseAdagrad(p, lr=0.05, weight_decay=0.01),
}


@needs_optim_seam
@pytest.mark.parametrize("name, sparse", [(n, s) for n in sorted(OPTIMIZERS) for s in (False, True)
                                          if s or n != "sparse_adam"])  # SparseAdam: sparse only
@pytest.mark.parametrize("fused", [False, True])
def test_optimizers_on_fake_cuda_equal_cpu(fake_gpu, counted, rng, name, sparse, fused):
    kw = dict(sparse=sparse, padding_idx=0, dtype=np.float64, random_state=2)
    cpu, gpu = se.Embedding(30, 4, **kw), se.Embedding(30, 4, device="cuda", **kw)
    opt_c, opt_g = OPTIMIZERS[name]([cpu]), OPTIMIZERS[name]([gpu])
    for _ in range(4):
        ids = rng.integers(0, 30, size=(6, 5))
        go = rng.standard_normal((6, 5, 4))
        for layer, opt in ((cpu, opt_c), (gpu, opt_g)):
            layer(ids)
            if fused:
                layer.backward(go, optimizer=opt)
            else:
                layer.backward(go)
                opt.step()
                opt.zero_grad()
        assert_allclose(gpu.weight, cpu.weight, rtol=1e-12, atol=1e-14)
    st_c, st_g = opt_c.state_dict(), opt_g.state_dict()
    for key, value in st_c["state"][0].items():
        assert_allclose(st_g["state"][0][key], value, rtol=1e-12)
    assert counted.get("se_update_rows", 0) == 4
    # the state goes through state_dict / load_state_dict on the device
    again = OPTIMIZERS[name]([gpu])
    again.load_state_dict(copy.deepcopy(st_g))
    for key, value in again.state[0].items():
        if key != "step":
            assert_array_equal(value, st_g["state"][0][key])


@needs_optim_seam
def test_optimizer_grad_errors_on_fake_cuda(fake_gpu):
    emb = se.Embedding(5, 2, device="cuda", sparse=True)
    opt = se.optim.Adagrad([emb])
    emb.grad = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"grad has shape \(4, 2\), expected \(5, 2\)"):
        opt.step()
    emb.grad = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(TypeError, match="float array"):
        opt.step()
    emb.grad = sp.csr_array(np.ones((5, 2)))  # a host gradient is moved once
    before = emb.weight.copy()
    opt.step()
    assert not np.array_equal(emb.weight, before)


def test_to_numpy_brings_device_arrays_home(fake_gpu):
    dev = reference_gpu.to_device(np.arange(6.0).reshape(2, 3))
    host = fake_gpu.module.to_numpy(dev)
    assert type(host) is np.ndarray
    assert_array_equal(host, np.arange(6.0).reshape(2, 3))
    assert fake_gpu.module.to_numpy(np.ones(2)).dtype == np.float64


@needs_optim_seam
@needs_bag
@pytest.mark.parametrize("mode, with_psw", [("sum", True), ("mean", False), ("max", False)])
def test_bag_fused_optimizer_on_fake_cuda_equals_cpu(fake_gpu, counted, rng, mode, with_psw):
    kw = dict(mode=mode, sparse=True, padding_idx=1, dtype=np.float64, random_state=9)
    cpu, gpu = se.EmbeddingBag(25, 4, **kw), se.EmbeddingBag(25, 4, device="cuda", **kw)
    opt_c, opt_g = se.optim.SparseAdam([cpu], lr=0.01), se.optim.SparseAdam([gpu], lr=0.01)
    for _ in range(3):
        ids = rng.integers(0, 25, size=(5, 6))
        psw = rng.standard_normal(ids.shape) if with_psw else None
        go = rng.standard_normal((5, 4))
        for layer, opt in ((cpu, opt_c), (gpu, opt_g)):
            layer(ids, per_sample_weights=psw)
            layer.backward(go, optimizer=opt)
    assert_allclose(gpu.weight, cpu.weight, rtol=1e-12, atol=1e-14)
    assert counted.get("se_update_rows") == 3


# ----------------------------------------------------------------- the GPU benchmark

def _load_benchmark_script(name):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.exists():
        pytest.skip("benchmarks/ is not next to the tests")
    spec = importlib.util.spec_from_file_location(name[:-3] + "_under_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_memcheck_script_runs_on_the_stand_in(fake_gpu):
    # gpu_check.sh runs it under compute-sanitizer on a GPU: here every error it
    # expects must be raised, through the same launches (checked against the kernels'
    # signatures)
    import sys

    memcheck = _load_benchmark_script("gpu_memcheck.py")
    assert memcheck.main(sys.modules["cupy"]) == 2 * 2 * (2 + 3 * 3 + 2)


def test_bench_gpu_breakdown_runs_on_the_stand_in(fake_gpu, monkeypatch):
    # the breakdown calls the backend's internals: run it (tiny sizes, numpy standing
    # in for CuPy, every kernel launch checked) so that it follows them
    import types

    bench = _load_benchmark_script("bench_gpu.py")
    cp = sys.modules["cupy"]

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(cp, "cuda", types.SimpleNamespace(
        runtime=cp.cuda.runtime, Event=Event, get_elapsed_time=lambda a, b: 0.5))
    rng = np.random.default_rng(0)
    monkeypatch.setattr(cp, "random", types.SimpleNamespace(
        standard_normal=lambda shape, dtype: cp.asarray(
            rng.standard_normal(shape).astype(dtype))))
    args = bench.parse_args(["--num-embeddings", "50", "--dim", "8", "--batch", "64",
                             "--bag-size", "4", "--repeat", "2", "--warmup", "1",
                             "--breakdown"])
    ids = np.minimum(rng.zipf(1.2, size=64) - 1, 49).astype(np.int64)
    res = bench.bench_breakdown(args, cp, ids, bench.cuda_timer(cp))
    assert set(res) == {"check_range", "lookup_kernel", "lookup_checked",
                        "device_copy_of_output", "plan_rows", "plan_argsort",
                        "plan_argsort_ids32_stable", "plan_gathers", "plan_segment_heads",
                        "plan_segments_kernels",
                        "row_sums",
                        "csr_assembly", "csr_columns_kernel", "csr_columns_broadcast",
                        "csr_indptr_kernel", "csr_indptr_scan", "backward_adding_to_grad",
                        "add_grad_row_values", "add_grad_row_union", "bag_checks",
                        "bag_pool_kernel", "bag_pool_checked"}
    assert all(v == 0.5 for v in res.values())


def test_bench_gpu_without_a_gpu_says_so():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    if not script.exists():
        pytest.skip("benchmarks/ is not next to the tests")
    if cuda_pkg.cupy_available():
        pytest.skip("a GPU is here: the benchmark would run")
    res = subprocess.run([sys.executable, str(script), "--batch", "8"], capture_output=True,
                         text=True)
    assert res.returncode == 1
    assert "no GPU to benchmark on" in res.stderr and "Nothing was measured" in res.stderr
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--json" in res.stdout
