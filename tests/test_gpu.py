"""The CUDA backend on a real GPU, compared operation by operation with the CPU path.

Marked ``gpu`` and skipped unless CuPy imports and sees a device (CI has none).
Run on a GPU machine with ``pytest -m gpu tests/test_gpu.py`` (see
benchmarks/gpu_check.sh). Without a GPU, ``pytest -p gpu_suite_on_cpu
tests/test_gpu.py`` runs it on the numpy stand-in for CuPy with the CUDA kernels'
own code run on the CPU (tests/gpu_suite_on_cpu.py; test_gpu_cpu_side runs it).
"""

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import sparsembed as se
import sparsembed.functional as F
from sparsembed import _cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda.cupy_available(), reason="needs CuPy and a CUDA device"),
]

if _cuda.cupy_available():
    import cupy as cp
    import cupyx.scipy.sparse as cusp
else:  # the module is skipped; keep the names defined
    cp = cusp = None

NORM_TYPES = [2.0, 1.0, 0.0, 3.5, 0.5, -1.5, np.inf, -np.inf]
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
needs_bag = pytest.mark.skipif(not hasattr(se, "EmbeddingBag"), reason="no EmbeddingBag yet")


def host(a):
    if isinstance(a, np.ndarray) or sp.issparse(a):
        return a
    if cusp is not None and cusp.issparse(a):
        return sp.csr_array(a.get())
    return cp.asnumpy(a)


def pair(dtype=np.float32, **kw):
    """The same layer on the CPU and on the GPU (same seeded init)."""
    return (se.Embedding(50, 8, dtype=dtype, random_state=11, **kw),
            se.Embedding(50, 8, dtype=dtype, random_state=11, device="cuda", **kw))


def _ids(rng, shape, V=50):
    ids = rng.integers(0, V, size=shape)
    ids.reshape(-1)[: max(1, ids.size // 4)] = 3  # a hot id: long segments
    return ids


# --------------------------------------------------------------------- forward

@pytest.mark.parametrize("int_dtype", [np.int8, np.uint16, np.int32, np.int64, np.uint64])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 0, 3), (4, 33, 2)])
@pytest.mark.parametrize("on_device", [False, True])
def test_forward_equals_cpu(rng, dtype, int_dtype, shape, on_device):
    cpu, gpu = pair(dtype)
    assert isinstance(gpu.weight, cp.ndarray) and gpu.weight.dtype == dtype
    assert_array_equal(host(gpu.weight), cpu.weight)
    ids = rng.integers(0, 50, size=shape).astype(int_dtype)
    out = gpu(cp.asarray(ids) if on_device else ids)
    assert isinstance(out, cp.ndarray)
    assert out.shape == shape + (8,) and out.dtype == dtype
    assert_array_equal(host(out), cpu(ids))


def test_forward_large_dim_and_batch(rng):
    w = rng.standard_normal((1000, 300)).astype(np.float32)
    ids = rng.integers(0, 1000, size=100_000)
    emb = se.Embedding.from_pretrained(cp.asarray(w))
    assert emb.device == "cuda"
    assert_array_equal(host(emb(ids)), w[ids])


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_renorm_equals_cpu(rng, dtype, norm_type, padding_idx):
    cpu, gpu = pair(dtype, max_norm=1.2, norm_type=norm_type, padding_idx=padding_idx)
    for _ in range(2):
        ids = _ids(rng, (6, 9))
        assert_allclose(host(gpu(ids)), cpu(ids), rtol=RTOL[np.dtype(dtype)] * 10)
    assert_allclose(host(gpu.weight), cpu.weight, rtol=RTOL[np.dtype(dtype)] * 10)


def test_functional_forms(rng, dtype):
    w = rng.standard_normal((40, 6)).astype(dtype)
    ids = _ids(rng, (5, 7), 40)
    wd = cp.asarray(w)
    assert_array_equal(host(F.embedding(ids, wd)), F.embedding(ids, w))
    assert_array_equal(host(F.embedding(cp.asarray(ids), wd)), F.embedding(ids, w))
    F.embedding_renorm_(wd, ids, 0.7)
    F.embedding_renorm_(w, ids, 0.7)
    assert_allclose(host(wd), w, rtol=RTOL[np.dtype(dtype)] * 10)
    go = rng.standard_normal((5, 7, 6)).astype(dtype)
    for sparse in (False, True):
        a = F.embedding_backward(go, ids, 40, padding_idx=3, sparse=sparse)
        b = F.embedding_backward(cp.asarray(go), ids, 40, padding_idx=3, sparse=sparse)
        assert_array_equal(host(b).toarray() if sparse else host(b),
                           a.toarray() if sparse else a)


# --------------------------------------------------------------------- backward

@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 3, 0])
@pytest.mark.parametrize("scale", [False, True])
def test_backward_bitwise_equals_cpu(rng, dtype, sparse, padding_idx, scale):
    # the GPU sums each row's gradient in input order, as the CPU does: bitwise equal
    cpu, gpu = pair(dtype, sparse=sparse, padding_idx=padding_idx, scale_grad_by_freq=scale)
    for _ in range(3):
        ids = _ids(rng, (16, 20))
        cpu(ids), gpu(ids)
        go = rng.standard_normal((16, 20, 8)).astype(dtype)
        g_c = cpu.backward(go)
        g_g = gpu.backward(cp.asarray(go))
        if sparse:
            assert isinstance(g_g, cusp.csr_matrix)
            assert g_g.has_canonical_format
            h = host(g_g)
            assert_array_equal(h.indptr, g_c.indptr)
            assert_array_equal(h.indices, g_c.indices)
            assert_array_equal(h.data, g_c.data)
        else:
            assert isinstance(g_g, cp.ndarray)
            assert_array_equal(host(g_g), g_c)
    acc_c = cpu.grad.toarray() if sparse else cpu.grad
    acc_g = host(gpu.grad).toarray() if sparse else host(gpu.grad)
    assert_allclose(acc_g, acc_c, rtol=RTOL[np.dtype(dtype)])


def test_sparse_grad_keeps_explicit_zero_rows():
    emb = se.Embedding(10, 3, sparse=True, device="cuda", random_state=0)
    emb(np.array([4, 7]))
    g = host(emb.backward(np.array([[0, 0, 0], [1, 2, 3]], dtype=np.float32)))
    assert_array_equal(np.flatnonzero(np.diff(g.indptr)), [4, 7])
    assert g.nnz == 6


def test_backward_is_deterministic(rng):
    emb = se.Embedding(1000, 64, device="cuda", sparse=True, random_state=0)
    ids = rng.integers(0, 30, size=200_000)  # long segments
    go = cp.asarray(rng.standard_normal((200_000, 64)).astype(np.float32))
    emb(ids)
    a = host(emb.backward(go))
    b = host(emb.backward(go))
    assert_array_equal(a.data, b.data)


def test_long_segments_are_summed_in_chunks(rng, dtype, monkeypatch):
    # rows with more entries than the backend's chunk are summed chunk by chunk, then
    # the chunk sums in order (deterministic; the CPU's sums up to rounding)
    from reference_gpu import chunked_sum
    from sparsembed._cuda import backend

    monkeypatch.setattr(backend._impl, "segment_chunk", 3)
    V, D, n = 20, 8, 200
    flat = rng.integers(0, V, size=n)
    flat[::2] = 5
    go = rng.standard_normal((n, D)).astype(dtype)
    expected = np.zeros((V, D), dtype)
    for r in np.unique(flat):
        expected[r] = chunked_sum(go[flat == r], 3, False)
    assert_array_equal(host(F.embedding_backward(cp.asarray(go), flat, V)), expected)
    got = host(F.embedding_backward(cp.asarray(go), flat, V, sparse=True))
    assert_array_equal(got.toarray(), expected)
    off = np.arange(0, n, 4)
    bag_go = rng.standard_normal((off.shape[0], D)).astype(dtype)
    bag_of = np.arange(n) // 4
    for r in np.unique(flat):
        expected[r] = chunked_sum(bag_go[bag_of[flat == r]], 3, True)
    w = cp.asarray(rng.standard_normal((V, D)).astype(dtype))
    got, _ = F.embedding_bag_backward(cp.asarray(bag_go), flat, w, off, mode="sum", sparse=True)
    assert_array_equal(host(got).toarray(), expected)


def test_finite_differences_float64(rng):
    emb = se.Embedding(12, 4, dtype=np.float64, device="cuda", random_state=1)
    ids = rng.integers(0, 12, size=(3, 5))
    c = rng.standard_normal((3, 5, 4))
    emb(ids)
    g = host(emb.backward(c))
    w0 = host(emb.weight).copy()
    eps = 1e-6
    for r, j in [(ids[0, 0], 0), (ids[1, 2], 3), (ids[2, 4], 1)]:
        wp, wm = w0.copy(), w0.copy()
        wp[r, j] += eps
        wm[r, j] -= eps
        num = ((wp[ids] * c).sum() - (wm[ids] * c).sum()) / (2 * eps)
        assert_allclose(g[r, j], num, rtol=1e-6)


@pytest.mark.parametrize("dim", [8, 7])
def test_unaligned_and_odd_width_tables_equal_cpu(rng, dtype, dim):
    # a table view 4 bytes off a 16-byte boundary (or of an odd width) takes the
    # kernels' scalar loops instead of the 16-byte vector ones: same results
    w = rng.standard_normal((40, dim)).astype(dtype)
    big = cp.zeros(40 * dim + 1, dtype=dtype)
    wd = big[1:].reshape(40, dim)
    wd[...] = cp.asarray(w)
    assert wd.flags.c_contiguous and wd.__cuda_array_interface__["data"][0] % 16 != 0
    ids = _ids(rng, (6, 9), 40)  # a hot id: segments longer than the kernels' batch
    assert_array_equal(host(F.embedding(ids, wd)), F.embedding(ids, w))
    go = rng.standard_normal((6, 9, dim)).astype(dtype)
    a = F.embedding_backward(go, ids, 40, sparse=True)
    gd = cp.zeros(6 * 9 * dim + 1, dtype=dtype)[1:].reshape(6, 9, dim)
    gd[...] = cp.asarray(go)
    b = F.embedding_backward(gd, ids, 40, sparse=True)
    assert_array_equal(host(b).toarray(), a.toarray())
    off = np.array([0, 20, 20, 51])
    for mode in ("sum", "mean", "max"):
        assert_array_equal(host(F.embedding_bag(ids.reshape(-1), wd, off, mode=mode)),
                           F.embedding_bag(ids.reshape(-1), w, off, mode=mode))


# --------------------------------------------------------------------- errors

def test_index_error_same_message_and_nothing_written(rng):
    cpu, gpu = pair(max_norm=0.1)
    before = host(gpu.weight).copy()
    bad = np.array([1, 2, 50, 3])
    with pytest.raises(IndexError) as e_cpu:
        cpu(bad)
    for ids in (bad, cp.asarray(bad)):
        with pytest.raises(IndexError) as e_gpu:
            gpu(ids)
        assert str(e_gpu.value) == str(e_cpu.value)
    assert_array_equal(host(gpu.weight), before)
    with pytest.raises(TypeError, match="integers"):
        gpu(cp.asarray([1.0]))
    with pytest.raises(TypeError, match="integers"):
        gpu(cp.asarray([True]))
    gpu(np.array([1, 2]))
    with pytest.raises(ValueError, match="grad_output has shape"):
        gpu.backward(cp.zeros((3, 8), cp.float32))


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dim", [8, 7])  # vector and scalar lookup loops
def test_first_bad_id_named_among_many(rng, idx_dtype, dim):
    # many bad ids over many blocks: the kernels' flag (an atomic max) names the first
    from reference_gpu import ids_with_bad

    n, V = 300_000, 1000
    for _ in range(3):
        ids, first = ids_with_bad(rng, n, V)
        ids_d = cp.asarray(ids.astype(idx_dtype))
        msg = f"index {ids[first]} at position {first} is out of range for {V} embeddings"
        wd = cp.asarray(rng.standard_normal((V, dim)).astype(np.float32))
        for call in (lambda: se.Embedding(V, dim, device="cuda")(ids_d),
                     lambda: se.Embedding(V, dim, max_norm=1.0, device="cuda")(ids_d),
                     lambda: F.embedding_bag(ids_d, wd, cp.arange(0, n, 30), mode="sum"),
                     lambda: F.embedding_bag(ids_d.reshape(-1, 40), wd, mode="max")):
            with pytest.raises(IndexError, match=msg):
                call()


@needs_bag
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_bag_checks_equal_cpu(rng, mode):
    from reference_gpu import BAG_CHECK_ROWS, assert_same_error, bag_check_cases

    w = rng.standard_normal((BAG_CHECK_ROWS, 8)).astype(np.float32)
    wd = cp.asarray(w)
    for ids, off, last in bag_check_cases():
        def on_cpu():
            F.embedding_bag(ids, w, off, mode=mode, include_last_offset=last)

        for ids_g, off_g in ((cp.asarray(ids), cp.asarray(off)),
                             (cp.asarray(ids, dtype=cp.int32), cp.asarray(off, dtype=cp.int32)),
                             (ids, off)):
            assert_same_error(on_cpu, lambda: F.embedding_bag(
                ids_g, wd, off_g, mode=mode, include_last_offset=last), (ids, off, last))
    assert_array_equal(host(wd), w)
    cpu = se.EmbeddingBag(BAG_CHECK_ROWS, 8, mode=mode, max_norm=0.5, random_state=3)
    gpu = se.EmbeddingBag(BAG_CHECK_ROWS, 8, mode=mode, max_norm=0.5, random_state=3,
                          device="cuda")
    before = host(gpu.weight).copy()
    for ids, off, last in bag_check_cases():
        cpu.include_last_offset = gpu.include_last_offset = last
        assert_same_error(lambda: cpu(ids, off),
                          lambda: gpu(cp.asarray(ids), cp.asarray(off)), (ids, off, last))
    assert_array_equal(host(gpu.weight), before)


@needs_bag
@pytest.mark.parametrize("off_dtype", [np.int32, np.int64])
def test_device_offsets_equal_cpu(rng, off_dtype):
    # offsets checked and turned into bag starts on the device (se_bag_starts)
    w = rng.standard_normal((40, 8)).astype(np.float32)
    wd = cp.asarray(w)
    ids = rng.integers(0, 40, size=50)
    for off in ([0, 7, 7, 30, 45], [0, 0, 50], [0]):
        for last in (False, True):
            o = np.array(off, dtype=off_dtype)
            a = F.embedding_bag(ids, w, o, mode="sum", include_last_offset=last)
            b = F.embedding_bag(cp.asarray(ids), wd, cp.asarray(o), mode="sum",
                                include_last_offset=last)
            assert_array_equal(host(b), a)
    # entries past the last bag (include_last_offset): the backward leaves them out
    kw = dict(mode="mean", sparse=True, include_last_offset=True, random_state=2)
    cpu, gpu = se.EmbeddingBag(40, 8, **kw), se.EmbeddingBag(40, 8, device="cuda", **kw)
    o = np.array([0, 7, 7, 30], dtype=off_dtype)
    out_c, out_g = cpu(ids, o), gpu(cp.asarray(ids), cp.asarray(o))
    assert_array_equal(host(out_g), out_c)
    go = rng.standard_normal(out_c.shape).astype(np.float32)
    assert_array_equal(host(gpu.backward(cp.asarray(go))).toarray(),
                       cpu.backward(go).toarray())


# --------------------------------------------------------------------- the seam

def test_to_and_back_and_pickle(rng):
    emb = se.Embedding(20, 4, sparse=True, padding_idx=2, random_state=5)
    w0 = emb.weight.copy()
    emb(np.array([1, 2, 3]))
    emb.backward(np.ones((3, 4), np.float32))
    assert emb.to("cuda") is emb
    assert isinstance(emb.weight, cp.ndarray) and isinstance(emb.grad, cusp.csr_matrix)
    emb(np.array([3, 4]))
    emb.backward(np.ones((2, 4), np.float32))
    for clone in (pickle.loads(pickle.dumps(emb)), copy.deepcopy(emb)):
        assert clone.device == "cuda" and isinstance(clone.weight, cp.ndarray)
        assert_array_equal(host(clone.weight), w0)
    emb.to("cpu")
    assert isinstance(emb.weight, np.ndarray) and isinstance(emb.grad, sp.csr_array)
    expected = np.zeros((20, 4), np.float32)
    expected[[1, 4]] = 1
    expected[3] = 2
    assert_array_equal(emb.grad.toarray(), expected)
    sd = se.Embedding(20, 4, device="cuda")
    sd.load_state_dict({"weight": w0})
    assert_array_equal(host(sd.weight), w0)


# --------------------------------------------------------------------- EmbeddingBag



@needs_bag
@pytest.mark.parametrize("mode, with_psw", [("sum", False), ("sum", True), ("mean", False),
                                             ("max", False)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("layout", ["offsets", "2d"])
def test_embedding_bag_equals_cpu(rng, dtype, mode, with_psw, sparse, padding_idx, layout):
    kw = dict(mode=mode, sparse=sparse, padding_idx=padding_idx, dtype=dtype, random_state=4)
    cpu = se.EmbeddingBag(60, 16, **kw)
    gpu = se.EmbeddingBag(60, 16, device="cuda", **kw)
    for _ in range(3):
        ids = _ids(rng, (12, 9), 60)
        ids[1, :4] = 2
        psw = rng.standard_normal(ids.shape).astype(dtype) if with_psw else None
        if layout == "offsets":
            off = np.array([0, 9, 9, 30, 31, 100])
            args_c = (ids.reshape(-1), off)
            args_g = (cp.asarray(ids.reshape(-1)), cp.asarray(off))
            psw_c = None if psw is None else psw.reshape(-1)
        else:
            args_c, args_g, psw_c = (ids,), (cp.asarray(ids),), psw
        out_c = cpu(*args_c, per_sample_weights=psw_c)
        out_g = gpu(*args_g, per_sample_weights=None if psw_c is None else cp.asarray(psw_c))
        assert isinstance(out_g, cp.ndarray)
        assert_array_equal(host(out_g), out_c)  # same order, no fma: bitwise
        go = rng.standard_normal(out_c.shape).astype(dtype)
        g_c, g_g = cpu.backward(go), gpu.backward(cp.asarray(go))
        if sparse:
            assert isinstance(g_g, cusp.csr_matrix)
            h = host(g_g)
            assert_array_equal(h.indptr, g_c.indptr)
            assert_array_equal(h.data, g_c.data)
        else:
            assert_array_equal(host(g_g), g_c)
        if with_psw:
            assert_allclose(host(gpu.per_sample_weights_grad), cpu.per_sample_weights_grad,
                            rtol=RTOL[np.dtype(dtype)] * 10, atol=RTOL[np.dtype(dtype)])


@needs_bag
def test_embedding_bag_renorm_and_functional(rng):
    w = rng.standard_normal((30, 8)).astype(np.float32) * 3
    ids = rng.integers(0, 30, size=40)
    off = np.array([0, 10, 10, 25])
    wd = cp.asarray(w)
    for mode in ("sum", "mean", "max"):
        a = F.embedding_bag(ids, w.copy(), off, max_norm=1.0, mode=mode)
        b = F.embedding_bag(ids, wd.copy(), off, max_norm=1.0, mode=mode)
        assert_allclose(host(b), a, rtol=1e-5)
        go = rng.standard_normal(a.shape).astype(np.float32)
        ga, pa = F.embedding_bag_backward(go, ids, w, off, mode=mode, sparse=True)
        gb, pb = F.embedding_bag_backward(cp.asarray(go), ids, wd, off, mode=mode, sparse=True)
        assert_array_equal(host(gb).toarray(), ga.toarray())
        assert pa is None and pb is None
    with pytest.raises(IndexError, match="index 30 at position 2"):
        F.embedding_bag(np.array([1, 2, 30]), wd, np.array([0]))
    assert_array_equal(host(wd), w)


def test_strided_tables_read_only_the_named_rows(rng):
    # a table that is not C-contiguous has only the rows a call names copied
    # (functional.compact_rows), with ids and padding renumbered: the same results
    base = rng.standard_normal((60, 16)).astype(np.float32) * 2
    w = base[:30, ::2]
    wd = cp.asarray(base)[:30, ::2]
    assert not wd.flags.c_contiguous
    ids = rng.integers(0, 30, size=40)
    ids[:3] = 5
    off = np.array([0, 10, 10, 25])
    psw = rng.standard_normal(40).astype(np.float32)
    assert_array_equal(host(F.embedding(ids, wd)), F.embedding(ids, w))
    for mode, weights in (("sum", None), ("sum", psw), ("mean", None), ("max", None)):
        kw = dict(mode=mode, padding_idx=5, per_sample_weights=weights)
        assert_allclose(host(F.embedding_bag(ids, wd, off, **kw)),
                        F.embedding_bag(ids, w, off, **kw), rtol=1e-6)
        go = rng.standard_normal((4, 8)).astype(np.float32)
        ga, pa = F.embedding_bag_backward(go, ids, w, off, sparse=True, **kw)
        gb, pb = F.embedding_bag_backward(cp.asarray(go), ids, wd, off, sparse=True, **kw)
        assert_allclose(host(gb).toarray(), ga.toarray(), rtol=1e-6)
        assert (pa is None) == (pb is None)
        if pa is not None:
            assert_allclose(host(pb), pa, rtol=1e-5)
    F.embedding(ids, wd, max_norm=1.0)
    F.embedding(ids, w, max_norm=1.0)
    assert_allclose(host(wd), w, rtol=1e-5)
    with pytest.raises(IndexError, match="index 30 at position 1"):
        F.embedding(np.array([1, 30]), wd)


# --------------------------------------------------------------------- optimizers

needs_optim = pytest.mark.skipif(not hasattr(se, "optim"), reason="no se.optim yet")

OPTIMIZERS = {
    "sgd": lambda p: se.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: se.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adagrad": lambda p: se.optim.Adagrad(p, lr=0.05, lr_decay=0.01, weight_decay=0.1),
    "sparse_adam": lambda p: se.optim.SparseAdam(p, lr=0.01),
    "rowwise": lambda p: se.optim.RowWiseAdagrad(p, lr=0.05, weight_decay=0.01),
}


@needs_optim
@pytest.mark.parametrize("name, sparse", [(n, s) for n in sorted(OPTIMIZERS) for s in (False, True)
                                          if s or n != "sparse_adam"])  # SparseAdam: sparse only
@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_steps_equal_cpu(rng, dtype, name, sparse, fused):
    cpu, gpu = pair(dtype, sparse=sparse, padding_idx=0)
    opt_c, opt_g = OPTIMIZERS[name]([cpu]), OPTIMIZERS[name]([gpu])
    for _ in range(5):
        ids = _ids(rng, (8, 12))
        go = rng.standard_normal((8, 12, 8)).astype(dtype)
        for layer, opt, g in ((cpu, opt_c, go), (gpu, opt_g, cp.asarray(go))):
            layer(ids)
            if fused:
                layer.backward(g, optimizer=opt)
            else:
                layer.backward(g)
                opt.step()
                opt.zero_grad()
    # the same arithmetic as the CPU kernel (no fma); row-wise Adagrad's mean of
    # squares is a warp reduction, so allow rounding
    if name == "rowwise":
        assert_allclose(host(gpu.weight), cpu.weight, rtol=RTOL[np.dtype(dtype)] * 100,
                        atol=RTOL[np.dtype(dtype)] * 10)
    else:
        assert_array_equal(host(gpu.weight), cpu.weight)
    state = opt_g.state_dict()["state"][0]
    for key, value in opt_c.state_dict()["state"][0].items():
        if key != "step":
            assert isinstance(state[key], cp.ndarray)
            assert_allclose(host(state[key]), value, rtol=RTOL[np.dtype(dtype)] * 100)


@needs_optim
@needs_bag
def test_optimizer_on_a_bag(rng):
    cpu = se.EmbeddingBag(40, 8, mode="mean", sparse=True, random_state=1)
    gpu = se.EmbeddingBag(40, 8, mode="mean", sparse=True, random_state=1, device="cuda")
    opt_c, opt_g = se.optim.SparseAdam([cpu], lr=0.01), se.optim.SparseAdam([gpu], lr=0.01)
    for _ in range(4):
        ids = rng.integers(0, 40, size=(6, 5))
        go = rng.standard_normal((6, 8)).astype(np.float32)
        for layer, opt in ((cpu, opt_c), (gpu, opt_g)):
            layer(ids)
            layer.backward(go)
            opt.step()
            opt.zero_grad()
    assert_array_equal(host(gpu.weight), cpu.weight)


def test_float16_tables_are_refused_on_the_gpu():
    with pytest.raises(TypeError, match="float16 tables are CPU-only"):
        se.Embedding(4, 2, dtype=np.float16, device="cuda")
    with pytest.raises(TypeError, match="float16 tables are CPU-only"):
        se.Embedding.from_pretrained(cp.ones((4, 2), dtype=cp.float16))
