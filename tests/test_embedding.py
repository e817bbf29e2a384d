"""se.Embedding and se.functional.embedding*: numpy references and torch parity."""

import array
import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import reference as ref
import sparsembed as se
import sparsembed.functional as F

NORM_TYPES = [2.0, 1.0, 0.0, 3.5, 0.5, -1.5, np.inf, -np.inf]
ALL_INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def _table(rng, V, D, dtype, scale=1.0):
    return (rng.standard_normal((V, D)) * scale).astype(dtype)


def _assert_canonical(g, rows, num_embeddings, dim):
    assert isinstance(g, sp.csr_array)
    assert g.shape == (num_embeddings, dim)
    assert_array_equal(np.flatnonzero(np.diff(g.indptr)), rows)
    assert_array_equal(np.diff(g.indptr)[rows], dim)
    assert g.nnz == rows.size * dim
    assert_array_equal(g.indices.reshape(rows.size, dim), np.broadcast_to(np.arange(dim), (rows.size, dim)))
    assert g.has_canonical_format


# --------------------------------------------------------------------- forward

@pytest.mark.parametrize("int_dtype", ALL_INT_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_forward_matches_take(rng, dtype, int_dtype, shape):
    weight = _table(rng, 20, 6, dtype)
    ids = rng.integers(0, 20, size=shape).astype(int_dtype)
    emb = se.Embedding(20, 6, weight=weight, dtype=dtype)
    out = emb(ids)
    assert out.shape == shape + (6,)
    assert out.dtype == dtype
    assert_array_equal(out, ref.embedding(weight, ids.astype(np.int64)))
    assert_array_equal(F.embedding(ids, weight), out)


def test_forward_non_contiguous_and_read_only(rng, dtype):
    weight = _table(rng, 30, 5, dtype)
    big = rng.integers(0, 30, size=(6, 8))
    ids = big[::2, 1::3]
    assert not ids.flags.c_contiguous
    ro = big.copy()
    ro.flags.writeable = False
    emb = se.Embedding.from_pretrained(weight)
    assert_array_equal(emb(ids), weight[ids])
    assert_array_equal(emb(ro), weight[ro])
    # a non-contiguous table in the functional form
    wide = _table(rng, 30, 10, dtype)
    assert_array_equal(F.embedding(ids, wide[:, ::2]), wide[:, ::2][ids])
    # a read-only table looks up fine
    weight.flags.writeable = False
    assert_array_equal(se.Embedding.from_pretrained(weight)(ids), weight[ids])


def test_forward_accepts_python_lists():
    emb = se.Embedding(5, 2, random_state=0)
    assert_array_equal(emb([[1, 2], [3, 4]]), emb.weight[[[1, 2], [3, 4]]])
    assert emb([]).shape == (0, 2)


def test_forward_returns_a_new_array(rng):
    emb = se.Embedding(5, 3, random_state=0)
    out = emb(np.array([1, 1]))
    out[0] = 99
    assert not np.any(emb.weight == 99)


# ---------------------------------------------------------------------- renorm

@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_renorm_matches_reference(rng, dtype, norm_type):
    weight = _table(rng, 25, 7, dtype, scale=2.0)
    weight[3, :3] = 0
    ids = rng.integers(0, 25, size=(4, 9))
    ids[0, 0] = 3
    expected = ref.renorm(weight, ids, 1.5, norm_type)
    emb = se.Embedding(25, 7, max_norm=1.5, norm_type=norm_type, weight=weight.copy(), dtype=dtype)
    out = emb(ids)
    assert_allclose(emb.weight, expected, **ref.tol(dtype))
    assert_array_equal(out, emb.weight[ids])
    w2 = weight.copy()
    assert F.embedding_renorm_(w2, ids, 1.5, norm_type) is w2
    assert_allclose(w2, expected, **ref.tol(dtype))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_renorm_of_rows_holding_nan_matches_torch(dtype, norm_type):
    # a row holding a NaN has a NaN norm for every p (torch's max and min reductions
    # propagate it too): no NaN > max_norm, so the row is left as it is. The inf and
    # -inf norms once skipped the NaN and rescaled the row's other entries.
    torch = pytest.importorskip("torch")
    weight = np.array([[2.0, np.nan, 3.0], [np.nan, 0.5, 4.0], [3.0, 4.0, 0.1]], dtype)
    ids = np.array([0, 1, 2])
    got = F.embedding_renorm_(weight.copy(), ids, 1.0, norm_type)
    expected = torch.from_numpy(weight.copy())
    torch.embedding_renorm_(expected, torch.from_numpy(ids), 1.0, float(norm_type))
    assert_allclose(got, expected.numpy(), **ref.tol(dtype))
    if norm_type != 0:  # (p = 0 counts the entries that are not 0, NaN among them)
        assert_array_equal(got[:2], weight[:2])  # NaN rows untouched
    assert_allclose(got, ref.renorm(weight, ids, 1.0, norm_type), **ref.tol(dtype))


def test_renorm_includes_padding_row_like_torch(rng):
    weight = _table(rng, 6, 4, np.float64, scale=5.0)
    emb = se.Embedding(6, 4, padding_idx=2, max_norm=1.0, weight=weight.copy(), dtype=np.float64)
    emb(np.array([2, 2, 5]))
    assert_allclose(emb.weight, ref.renorm(weight, [2, 5], 1.0, 2.0), rtol=1e-12)


def test_renorm_non_contiguous_weight(rng):
    wide = _table(rng, 10, 8, np.float64, scale=3.0)
    view = wide[:, ::2]
    expected = ref.renorm(view, [1, 4, 4], 0.5, 2.0)
    F.embedding([1, 4, 4], view, max_norm=0.5)
    assert_allclose(view, expected, rtol=1e-12)


# -------------------------------------------------------------------- backward

@pytest.mark.parametrize("padding_idx", [None, 3, -2])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_backward_matches_reference(rng, dtype, padding_idx, scale, sparse):
    V, D = 12, 5
    ids = rng.integers(0, V, size=(7, 6))
    ids[0, :3] = 3
    ids[1, :2] = V - 2
    grad_out = rng.standard_normal(ids.shape + (D,)).astype(dtype)
    emb = se.Embedding(V, D, padding_idx=padding_idx, scale_grad_by_freq=scale, sparse=sparse,
                       dtype=dtype, random_state=0)
    emb(ids)
    g = emb.backward(grad_out)
    pad = emb.padding_idx
    expected = ref.dense_backward(grad_out, ids, V, pad, scale)
    if sparse:
        _assert_canonical(g, ref.touched_rows(ids, pad), V, D)
        dense = g.toarray()
    else:
        assert isinstance(g, np.ndarray) and g.shape == (V, D)
        dense = g
    assert dense.dtype == dtype
    assert_allclose(dense, expected, **ref.tol(dtype))
    f = F.embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                             scale_grad_by_freq=scale, sparse=sparse)
    assert_array_equal(f.toarray() if sparse else f, dense)


def test_sparse_keeps_explicit_zero_rows():
    emb = se.Embedding(6, 3, sparse=True, random_state=0)
    emb(np.array([1, 4]))
    g = emb.backward(np.zeros((2, 3), dtype=np.float32))
    _assert_canonical(g, np.array([1, 4]), 6, 3)
    assert_array_equal(g.data, 0)


@pytest.mark.parametrize("sparse", [False, True])
def test_backward_empty_and_scalar_input(sparse):
    emb = se.Embedding(5, 3, sparse=sparse, random_state=0)
    emb(np.zeros((0, 2), dtype=np.int64))
    g = emb.backward(np.zeros((0, 2, 3), dtype=np.float32))
    dense = g.toarray() if sparse else g
    assert_array_equal(dense, 0)
    if sparse:
        assert g.nnz == 0
    emb.zero_grad()
    out = emb(np.int64(4))
    assert out.shape == (3,)
    g = emb.backward(np.ones(3))
    dense = g.toarray() if sparse else g
    assert_array_equal(dense[4], 1)
    assert_array_equal(np.delete(dense, 4, axis=0), 0)


@pytest.mark.parametrize("sparse", [False, True])
def test_grad_accumulates_over_backwards(rng, sparse):
    emb = se.Embedding(10, 4, padding_idx=0, sparse=sparse, dtype=np.float64, random_state=0)
    a = np.array([[1, 2, 0], [2, 2, 5]])
    b = np.array([7, 1])
    ga = rng.standard_normal((2, 3, 4))
    gb = rng.standard_normal((2, 4))
    emb(a)
    first = emb.backward(ga)
    assert first is emb.grad  # documented: the first result is grad itself, no copy
    first_copy = first.copy()
    second = emb.backward(ga)  # again for the same forward: adds once more
    assert second is not emb.grad and first is not emb.grad
    emb(b)
    emb.backward(gb)
    expected = 2 * ref.dense_backward(ga, a, 10, 0) + ref.dense_backward(gb, b, 10, 0)
    total = emb.grad.toarray() if sparse else emb.grad
    assert_allclose(total, expected, rtol=1e-12)
    if sparse:
        _assert_canonical(emb.grad, np.array([1, 2, 5, 7]), 10, 4)
    # what backward returned is not changed by later accumulation
    assert_array_equal(first.toarray() if sparse else first,
                       first_copy.toarray() if sparse else first_copy)
    emb.zero_grad()
    assert emb.grad is None


@pytest.mark.parametrize("streamed", [False, True])
def test_sparse_grad_accumulation_is_an_exact_elementwise_sum(rng, dtype, streamed,
                                                              monkeypatch):
    """Two backwards with overlapping rows: the accumulated grad is the dense a + b
    bit for bit (one addition per element), canonical, the same with 1 and 2 threads;
    ``streamed``: the sum written with non-temporal stores, as a large one is."""
    from sparsembed import _rowsparse

    if streamed:
        monkeypatch.setattr(_rowsparse, "ROW_SUMS_STREAM_BYTES", 0)
    V, D = 5000, 64
    emb = se.Embedding(V, D, sparse=True, dtype=dtype, random_state=0)
    ids_a = rng.integers(0, V, 3000)
    ids_b = np.concatenate([ids_a[:1000], rng.integers(0, V, 2000)])
    ga = rng.standard_normal((ids_a.size, D)).astype(dtype)
    gb = rng.standard_normal((ids_b.size, D)).astype(dtype)
    runs = _two_backwards_per_thread_count(emb, ids_a, ga, ids_b, gb)
    (_, _, _, total), (a, _, b, again) = runs
    assert total.dtype == dtype
    assert_array_equal(total.toarray(), a.toarray() + b.toarray())
    _assert_canonical(total, np.union1d(ids_a, ids_b), V, D)
    assert total.data.tobytes() == again.data.tobytes()


def _two_backwards_per_thread_count(emb, ids_a, ga, ids_b, gb):
    """``[(a, a's copy, b, grad)]`` with 1, then 2 threads: the gradients of two
    forward + backward pairs from no grad (a copied right after its backward) and
    the grad they accumulate."""
    runs = []
    try:
        for threads in (1, 2):
            se.set_num_threads(threads)
            emb.zero_grad()
            emb(ids_a)
            a = emb.backward(ga)
            a_before = a.copy()
            emb(ids_b)
            b = emb.backward(gb)
            runs.append((a, a_before, b, emb.grad))
    finally:
        se.set_num_threads(None)
    return runs


@pytest.mark.parametrize("streamed", [False, True])
def test_dense_grad_accumulation_is_numpys_sum_on_every_thread(rng, dtype, streamed,
                                                               monkeypatch):
    """Dense gradients accumulate in a new array (the ones returned before stay as they
    were), numpy's a + b bit for bit, with 1 and 2 threads; ``streamed``: written with
    non-temporal stores, as a large one is. A gradient set by hand in another dtype
    or layout is summed by numpy."""
    from sparsembed import _cpu

    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0 if streamed else 1 << 62)
    V, D = 3001, 7
    emb = se.Embedding(V, D, dtype=dtype, random_state=0)
    ids_a, ids_b = rng.integers(0, V, 4000), rng.integers(0, V, 999)
    ga = rng.standard_normal((ids_a.size, D)).astype(dtype)
    gb = rng.standard_normal((ids_b.size, D)).astype(dtype)
    gb[::3] = -0.0
    runs = _two_backwards_per_thread_count(emb, ids_a, ga, ids_b, gb)
    for a, a_before, b, total in runs:
        assert total is not a and total is not b
        assert a.tobytes() == a_before.tobytes()
        assert total.tobytes() == (a + b).tobytes()
    assert runs[0][3].tobytes() == runs[1][3].tobytes()
    for by_hand in (np.ones((V, D), np.float16), np.asfortranarray(np.ones((V, D), dtype))):
        emb.grad = by_hand
        emb(ids_b)
        b = emb.backward(gb)
        assert emb.grad.dtype == np.result_type(by_hand.dtype, dtype)
        assert emb.grad.tobytes() == (by_hand + b).tobytes()


def test_add_dense_kernel_edges(rng, dtype):
    # the flat sum at sizes around a line and a buffer, misaligned outputs, specials
    from sparsembed._kernels import _backward

    for n in (0, 1, 15, 16, 17, 511, 512, 513, 4099, 100_003):
        a = rng.standard_normal(n).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        if n > 10:
            a[:6] = [np.inf, -np.inf, np.nan, -0.0, 0.0, 1e30]
            b[:6] = [1.0, np.inf, 1.0, -0.0, -0.0, 1e30]
        for skew in (0, 1):  # a line-aligned output and one off it
            for T in (1, 2, 3):
                for stream in (False, True):
                    raw = np.full(n + 16, 7, dtype)
                    off = (-raw.ctypes.data // raw.itemsize) % (64 // raw.itemsize) + skew
                    out = raw[off:off + n]
                    _backward.add_dense(a, b, out, T, stream)
                    with np.errstate(invalid="ignore"):
                        expected = a + b
                    assert out.tobytes() == expected.tobytes(), (n, skew, T, stream)
                    assert (raw[:off] == 7).all() and (raw[off + n:] == 7).all()
    with pytest.raises(ValueError, match="as many elements, got 3, 4 and 3"):
        _backward.add_dense(np.ones(3, dtype), np.ones(4, dtype), np.ones(3, dtype), 2)


def test_zero_fill_kernel_edges(dtype):
    from sparsembed._kernels import _backward

    for n in (0, 1, 15, 16, 17, 511, 512, 513, 4099, 100_003):
        for skew in (0, 1):
            for T in (1, 2, 3):
                for stream in (False, True):
                    raw = np.full(n + 16, -0.0 if n % 2 else 7, dtype)
                    off = (-raw.ctypes.data // raw.itemsize) % (64 // raw.itemsize) + skew
                    before = raw.copy()
                    _backward.zero_fill(raw[off:off + n], T, stream)
                    assert raw[off:off + n].tobytes() == bytes(n * raw.itemsize)
                    assert raw[:off].tobytes() == before[:off].tobytes()
                    assert raw[off + n:].tobytes() == before[off + n:].tobytes()


def test_sparse_grad_accumulation_of_hand_made_grads():
    """Mixed dtypes, a non-canonical csr set by hand, integers and explicit zeros."""
    emb = se.Embedding(6, 3, sparse=True, random_state=0)
    emb(np.array([1, 4]))
    emb.backward(np.zeros((2, 3), np.float32))  # rows 1 and 4, explicit zeros
    # duplicates and unsorted columns, float64: summed, promoted
    emb._accumulate(sp.csr_array(
        (np.array([1.0, 2.0, 3.0, 0.5]), np.array([2, 0, 2, 1]), np.array([0, 0, 0, 3, 3, 3, 4])),
        shape=(6, 3)))
    g = emb.grad
    assert g.dtype == np.float64
    expected = np.zeros((6, 3))
    expected[2] = [2.0, 0.0, 4.0]
    expected[5] = [0.0, 0.5, 0.0]
    assert_array_equal(g.toarray(), expected)
    _assert_canonical(g, np.array([1, 2, 4, 5]), 6, 3)  # the zero rows 1 and 4 are kept
    ints = sp.csr_array(np.eye(6, 3, dtype=np.int64))  # not a float: the generic path
    h = se._cpu.add_grad(ints, ints)
    assert h.dtype == np.int64
    assert_array_equal(h.toarray(), 2 * np.eye(6, 3))


def test_requires_grad_false_returns_none():
    emb = se.Embedding.from_pretrained(np.eye(4, dtype=np.float32))
    assert emb.requires_grad is False
    emb(np.array([1, 2]))
    assert emb.backward(np.ones((2, 4))) is None
    assert emb.grad is None
    unfrozen = se.Embedding.from_pretrained(np.eye(4, dtype=np.float32), freeze=False)
    assert unfrozen.requires_grad is True


def test_backward_uses_the_ids_of_the_forward(rng):
    emb = se.Embedding(8, 2, dtype=np.float64, random_state=0)
    ids = np.array([1, 2, 3])
    emb(ids)
    ids[:] = 7  # the caller reuses its buffer
    g = emb.backward(np.ones((3, 2)))
    assert_array_equal(g[[1, 2, 3]], 1)
    assert_array_equal(g[7], 0)


class _ArrayLike:
    """An id container that hands numpy its own memory (as pandas or xarray do)."""

    def __init__(self, values):
        self.values = values

    def __array__(self, dtype=None, copy=None):
        return self.values


def _writable_id_containers(ids):
    """(container, overwrite) pairs of objects numpy converts without copying:
    a buffer, a memoryview, an ``__array__`` object and a torch tensor if present."""
    buf = array.array("q", ids)
    view_src = np.array(ids, dtype=np.int32)
    holder = _ArrayLike(np.array(ids, dtype=np.int64))
    out = [(buf, lambda v: buf.__setitem__(slice(None), array.array("q", [v] * len(buf)))),
           (memoryview(view_src), lambda v: view_src.fill(v)),
           (holder, lambda v: holder.values.fill(v))]
    try:
        import torch
    except ImportError:
        return out
    tensor = torch.tensor(ids)
    out.append((tensor, lambda v: tensor.fill_(v)))
    return out


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("n", [3, 70_000])
def test_backward_uses_the_ids_of_the_forward_from_any_buffer(rng, sparse, n, threads):
    # numpy views a buffer or an __array__ object's memory instead of copying it:
    # the layer keeps its own copy of those ids too, on the small and the planned
    # paths alike
    threads(2)
    V = 6000
    ids = rng.integers(0, V - 1, size=n).tolist()
    grad_out = rng.standard_normal((n, 2)).astype(np.float32)
    expected = F.embedding_backward(grad_out, np.array(ids), V, sparse=sparse)
    for container, overwrite in _writable_id_containers(ids):
        emb = se.Embedding(V, 2, sparse=sparse, random_state=0)
        for _ in range(2):  # the second forward plans on the side (a large batch)
            emb.zero_grad()
            emb(container)
            overwrite(V - 1)
            g = emb.backward(grad_out)
            got = g.toarray() if sparse else g
            assert_array_equal(got, expected.toarray() if sparse else expected,
                               err_msg=type(container).__name__)
            overwrite(0)
            container_ids = np.asarray(container)
            container_ids[...] = np.array(ids, dtype=container_ids.dtype)


def test_finite_differences_float64(rng):
    """The backward is the gradient of sum(out * R) w.r.t. the table."""
    V, D = 7, 3
    ids = np.array([[0, 3, 3], [6, 1, 3]])
    R = rng.standard_normal(ids.shape + (D,))
    weight = rng.standard_normal((V, D))
    emb = se.Embedding(V, D, weight=weight.copy(), dtype=np.float64)
    emb(ids)
    analytic = emb.backward(R)
    eps = 1e-6
    numeric = np.zeros_like(weight)
    for r in range(V):
        for c in range(D):
            wp, wm = weight.copy(), weight.copy()
            wp[r, c] += eps
            wm[r, c] -= eps
            numeric[r, c] = (np.sum(F.embedding(ids, wp) * R) - np.sum(F.embedding(ids, wm) * R)) / (2 * eps)
    assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-8)
    sparse = F.embedding_backward(R, ids, V, sparse=True).toarray()
    assert_allclose(sparse, numeric, rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------ thread determinism

@pytest.mark.parametrize("sparse", [False, True])
def test_bitwise_identical_for_1_and_2_threads(threads, sparse):
    rng = np.random.default_rng(7)
    V, D = 5000, 33
    ids = rng.zipf(1.3, size=(300, 70)) % V   # skewed: many duplicates
    grad_out = rng.standard_normal(ids.shape + (D,)).astype(np.float32)
    weight = _table(rng, V, D, np.float32, scale=2.0)
    results = []
    for n in (1, 2):
        threads(n)
        emb = se.Embedding(V, D, padding_idx=1, max_norm=3.0, scale_grad_by_freq=True,
                           sparse=sparse, weight=weight.copy())
        out = emb(ids)
        g = emb.backward(grad_out)
        results.append((out, emb.weight.copy(), g.toarray() if sparse else g))
    for a, b in zip(*results):
        assert_array_equal(a, b)


# ------------------------------------------------------------------ torch parity

def _torch():
    return pytest.importorskip("torch")


def _torch_run(weight, ids, grad_out, **kw):
    torch = _torch()
    t = torch.nn.Embedding(weight.shape[0], weight.shape[1], **kw).to(
        torch.float64 if weight.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(weight))
    out = t(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
    out.backward(torch.from_numpy(grad_out))
    g = t.weight.grad
    g = g.coalesce().to_dense() if g.is_sparse else g
    return out.detach().numpy(), t.weight.detach().numpy(), g.numpy()


@pytest.mark.parametrize("padding_idx", [None, 0, 4, -1])
@pytest.mark.parametrize("max_norm,norm_type", [(None, 2.0), (1.0, 2.0), (0.7, 1.0),
                                                (2.0, np.inf), (1.1, 3.0), (5.0, 0.0),
                                                (0.3, -1.5)])
@pytest.mark.parametrize("sparse", [False, True])
def test_torch_parity(rng, dtype, padding_idx, max_norm, norm_type, sparse):
    V, D = 9, 6
    weight = _table(rng, V, D, dtype, scale=1.5)
    ids = rng.integers(0, V, size=(5, 7))
    ids[0, :4] = 4
    ids[1, 0] = V - 1
    grad_out = rng.standard_normal(ids.shape + (D,)).astype(dtype)
    kw = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type, sparse=sparse)
    t_out, t_weight, t_grad = _torch_run(weight, ids, grad_out, **kw)
    emb = se.Embedding(V, D, weight=weight.copy(), dtype=dtype, **kw)
    out = emb(ids)
    g = emb.backward(grad_out)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert_allclose(out, t_out, **tol)
    assert_allclose(emb.weight, t_weight, **tol)
    assert_allclose(g.toarray() if sparse else g, t_grad, **tol)
    if sparse:
        _assert_canonical(g, ref.touched_rows(ids, emb.padding_idx), V, D)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_torch_parity_scale_grad_by_freq(rng, dtype, padding_idx):
    V, D = 8, 3
    weight = _table(rng, V, D, dtype)
    ids = rng.integers(0, V, size=(40,))
    grad_out = rng.standard_normal((40, D)).astype(dtype)
    _, _, t_grad = _torch_run(weight, ids, grad_out, padding_idx=padding_idx, scale_grad_by_freq=True)
    dense = F.embedding_backward(grad_out, ids, V, padding_idx=padding_idx, scale_grad_by_freq=True)
    sparse = F.embedding_backward(grad_out, ids, V, padding_idx=padding_idx,
                                  scale_grad_by_freq=True, sparse=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert_allclose(dense, t_grad, **tol)
    # torch refuses sparse + scale_grad_by_freq; we give the dense result as csr
    assert_allclose(sparse.toarray(), t_grad, **tol)


def test_torch_parity_padding_normalisation():
    torch = _torch()
    for pad in (-1, -5, 0, 4):
        assert se.Embedding(5, 2, padding_idx=pad).padding_idx == torch.nn.Embedding(5, 2, padding_idx=pad).padding_idx


def test_repr_like_torch():
    torch = _torch()
    cases = [dict(), dict(padding_idx=0, max_norm=1.0, sparse=True),
             dict(norm_type=3.0, scale_grad_by_freq=True), dict(padding_idx=-1)]
    for kw in cases:
        assert repr(se.Embedding(10, 3, **kw)) == repr(torch.nn.Embedding(10, 3, **kw))
    assert repr(se.Embedding(10, 3, dtype=np.float64)) == "Embedding(10, 3, dtype=float64)"


def test_options_read_back_and_print_as_given_like_torch(tmp_path):
    torch = _torch()
    cases = [dict(max_norm=1), dict(max_norm=2, norm_type=1), dict(max_norm=0.5, norm_type=3),
             dict(norm_type=float("inf")), dict(max_norm=1.0, norm_type=2)]
    for kw in cases:
        for ours, theirs in ((se.Embedding, torch.nn.Embedding),
                             (se.EmbeddingBag, torch.nn.EmbeddingBag)):
            layer, reference = ours(10, 3, **kw), theirs(10, 3, **kw)
            assert repr(layer) == repr(reference)
            for name in kw:
                value = getattr(layer, name)
                assert type(value) is type(getattr(reference, name)) and value == kw[name]
            path = tmp_path / "layer.npz"
            se.save(layer, path)
            assert repr(se.load(path)) == repr(reference)
    # a numpy scalar is kept as a float (a checkpoint's JSON takes no numpy scalars)
    layer = se.Embedding(10, 3, max_norm=np.float32(1.5), norm_type=np.int64(3))
    assert (type(layer.max_norm), type(layer.norm_type)) == (float, float)
    assert repr(layer) == "Embedding(10, 3, max_norm=1.5, norm_type=3.0)"
    # an int max_norm renormalises as its float does
    ids = np.array([1, 4, 4, 7])
    a, b = (se.Embedding(10, 3, max_norm=m, random_state=0) for m in (1, 1.0))
    assert_array_equal(a(ids), b(ids))
    assert_array_equal(a.weight, b.weight)


# ---------------------------------------------------------- construction & state

def test_default_init_is_seeded_normal_with_zero_padding():
    a = se.Embedding(1000, 16, padding_idx=3, random_state=42)
    b = se.Embedding(1000, 16, padding_idx=3, random_state=42)
    assert_array_equal(a.weight, b.weight)
    assert a.weight.dtype == np.float32 and a.weight.flags.c_contiguous
    assert_array_equal(a.weight[3], 0)
    values = np.delete(a.weight, 3, axis=0)
    assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
    expected = np.random.default_rng(42).standard_normal((1000, 16)).astype(np.float32)
    expected[3] = 0
    assert_array_equal(a.weight, expected)
    a.reset_parameters(random_state=1)
    assert not np.array_equal(a.weight, b.weight)
    assert_array_equal(a.weight[3], 0)


def test_weight_argument_used_as_is():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    emb = se.Embedding(4, 3, padding_idx=1, weight=w)
    assert emb.weight is w                      # no copy
    assert_array_equal(emb.weight[1], [3, 4, 5])  # padding row not zeroed
    converted = se.Embedding(4, 3, weight=w.astype(np.float64))
    assert converted.weight.dtype == np.float32
    assert not np.shares_memory(converted.weight, w)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\), expected \(4, 3\)"):
        se.Embedding(4, 3, weight=w.reshape(3, 4))


def test_from_pretrained_shares_memory():
    w = np.random.default_rng(0).standard_normal((6, 2))
    emb = se.Embedding.from_pretrained(w, freeze=False, padding_idx=0)
    assert np.shares_memory(emb.weight, w)
    assert emb.weight.dtype == np.float64
    assert_array_equal(emb.weight[0], w[0])
    assert emb.num_embeddings == 6 and emb.embedding_dim == 2 and emb.padding_idx == 0


def test_attributes():
    emb = se.Embedding(10, 4, padding_idx=-3, max_norm=2, norm_type=1, sparse=1)
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (10, 4, 7)
    assert emb.max_norm == 2.0 and emb.norm_type == 1.0 and emb.sparse is True
    assert emb.scale_grad_by_freq is False and emb.device == "cpu"
    assert emb.grad is None and emb.requires_grad is True


def test_state_dict_round_trip():
    a = se.Embedding(5, 3, random_state=0)
    b = se.Embedding(5, 3, random_state=1)
    b.load_state_dict(a.state_dict())
    assert_array_equal(a.weight, b.weight)
    assert not np.shares_memory(a.weight, b.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        b.load_state_dict({"weight": np.zeros((4, 3))})
    with pytest.raises(RuntimeError, match="unexpected keys \\['bias'\\]"):
        b.load_state_dict({"weight": a.weight, "bias": 1})
    assert_array_equal(a.weight, b.weight)
    # torch's strict=False: what fits is loaded, the rest listed, not refused
    c = se.Embedding(5, 3, random_state=2)
    assert c.load_state_dict({"weight": a.weight, "bias": 1}, strict=False) == ([], ["bias"])
    assert_array_equal(c.weight, a.weight)
    keys = c.load_state_dict({}, strict=False)
    assert keys.missing_keys == ["weight"] and keys.unexpected_keys == []
    assert_array_equal(c.weight, a.weight)
    assert b.load_state_dict(a.state_dict()) == ([], [])


@pytest.mark.parametrize("clone", [lambda e: pickle.loads(pickle.dumps(e)), copy.deepcopy])
def test_pickle_and_deepcopy(clone):
    emb = se.Embedding(8, 3, padding_idx=2, max_norm=1.5, sparse=True, random_state=0)
    ids = np.array([1, 2, 5, 5])
    emb(ids)
    emb.backward(np.ones((4, 3)))
    other = clone(emb)
    assert repr(other) == repr(emb)
    assert_array_equal(other.weight, emb.weight)
    assert_array_equal(other.grad.toarray(), emb.grad.toarray())
    # the clone carries the saved forward: a second backward works the same on both
    assert_array_equal(other.backward(np.ones((4, 3))).toarray(), emb.backward(np.ones((4, 3))).toarray())
    other.weight[0] = 100
    assert not np.any(emb.weight == 100)


def test_to_cpu_is_identity():
    emb = se.Embedding(3, 2)
    w = emb.weight
    assert emb.to("cpu") is emb and emb.weight is w
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'.*, got 'tpu'"):
        emb.to("tpu")
    # it dropped the last forward ("backward() called before any forward()")
    out = emb(np.array([1, 1]))
    emb.to("cpu:0")
    assert_array_equal(emb.backward(np.ones_like(out))[1], 2)


@pytest.mark.parametrize("make", [
    lambda: se.Embedding(6, 3, random_state=0),
    lambda: se.EmbeddingBag(6, 3, mode="mean", random_state=0),
    lambda: se.HashEmbedding(6, 3, random_state=0),
], ids=["Embedding", "EmbeddingBag", "HashEmbedding"])
def test_backward_uses_the_options_of_its_forward_like_torch(make):
    # options edited between a forward and its backward were read at the backward
    # (a "mean" forward then mode="max" gave a sum-mode gradient); torch records them
    # in the autograd graph at the forward
    ids = np.array([[1, 2, 2, 5]])
    reference = make()
    out = reference(ids)
    expected = reference.backward(np.ones_like(out))
    layer = make()
    out = layer(ids)
    if hasattr(layer, "padding_idx") and not isinstance(layer, se.HashEmbedding):
        layer.padding_idx = 2
        layer.scale_grad_by_freq = True
    if isinstance(layer, se.EmbeddingBag):
        layer.mode = "max"
    layer.sparse = True
    got = layer.backward(np.ones_like(out))
    assert isinstance(got, np.ndarray)  # dense, as the forward's sparse=False
    assert_array_equal(got, expected)
    out = layer(ids)  # a new forward takes the new options
    got = layer.backward(np.ones_like(out))
    assert sp.issparse(got)
    if not isinstance(layer, se.HashEmbedding):
        assert_array_equal(got.toarray()[2], 0)  # padding row now


# ------------------------------------------------------------------------ errors

def _snapshot(emb):
    return emb.weight.copy(), None if emb.grad is None else (
        emb.grad.toarray() if sp.issparse(emb.grad) else emb.grad.copy())


def _assert_unchanged(emb, snap):
    assert_array_equal(emb.weight, snap[0])
    if snap[1] is None:
        assert emb.grad is None
    else:
        assert_array_equal(emb.grad.toarray() if sp.issparse(emb.grad) else emb.grad, snap[1])


@pytest.mark.parametrize("bad,pos", [(10, 2), (-1, 2), (2**40, 2), (11, 3)])
def test_out_of_range_index_changes_nothing(bad, pos):
    emb = se.Embedding(10, 3, max_norm=0.1, sparse=True, random_state=0)
    emb(np.array([1, 2]))
    emb.backward(np.ones((2, 3)))
    snap = _snapshot(emb)
    ids = np.array([4, 5, 6, 7])
    ids[pos] = bad
    with pytest.raises(IndexError, match=rf"index {bad} at position {pos} is out of range for 10 embeddings \(valid: 0..9\)"):
        emb(ids)
    _assert_unchanged(emb, snap)
    with pytest.raises(IndexError, match=rf"index {bad} at position {pos}"):
        F.embedding_renorm_(emb.weight, ids, 0.1)
    with pytest.raises(IndexError, match=rf"index {bad} at position {pos}"):
        F.embedding_backward(np.ones((4, 3)), ids, 10)
    _assert_unchanged(emb, snap)


@pytest.mark.parametrize("max_norm", [None, 0.1])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad", [10, -1, 2**31 - 1, -(2**31)])
def test_lookup_names_the_first_bad_id_in_every_path(max_norm, idx_dtype, bad, threads):
    # without max_norm the ids are checked by the copy kernel itself (threaded),
    # with it before the renorm: same error, same position, nothing changed
    threads(2)
    emb = se.Embedding(10, 3, max_norm=max_norm, sparse=True, random_state=0)
    emb(np.array([1, 2]))
    emb.backward(np.ones((2, 3)))
    snap = _snapshot(emb)
    ids = np.arange(3000, dtype=idx_dtype) % 10
    ids[1700] = bad  # later bad ids, in another thread's block, are not named
    ids[2900] = 12
    ids[2999] = -3
    msg = rf"index {bad} at position 1700 is out of range for 10 embeddings"
    with pytest.raises(IndexError, match=msg):
        emb(ids)
    _assert_unchanged(emb, snap)
    w = emb.weight.copy()
    with pytest.raises(IndexError, match=msg):
        F.embedding(ids, w, max_norm=max_norm)
    assert_array_equal(w, emb.weight)
    with pytest.raises(IndexError, match=msg):
        F.embedding(ids.reshape(30, 100), w.astype(np.float16))
    with pytest.raises(IndexError, match=msg):
        F.embedding(ids, np.zeros((10, 0)))


def test_gather_kernel_reports_the_first_bad_position(rng, dtype):
    from sparsembed._kernels import _lookup

    weight = rng.standard_normal((50, 7)).astype(dtype)
    for n_threads in (1, 2, 3):
        ids = rng.integers(0, 50, size=1000)
        out = np.empty((1000, 7), dtype)
        assert _lookup.gather(weight, ids, out, n_threads) == -1
        assert_array_equal(out, weight[ids])
        ids[[400, 990]] = [50, -1]
        assert _lookup.gather(weight, ids, out, n_threads) == 400
        assert _lookup.gather(weight, ids, out, n_threads, True) == 400
        ids[400] = 3
        assert _lookup.gather(weight, ids, out, n_threads) == 990
        # fewer ids than ranges, and a bad id in the last one only
        for n in (1, 2, 5, 47):
            small = rng.integers(0, 50, size=n)
            out = np.full((n, 7), np.nan, dtype)
            assert _lookup.gather(weight, small, out, n_threads) == -1
            assert_array_equal(out, weight[small])
            small[-1] = 50
            assert _lookup.gather(weight, small, out, n_threads) == n - 1
    assert _lookup.gather(np.zeros((0, 3), dtype), np.array([0]), np.empty((1, 3), dtype), 1) == 0


def test_gather_kernel_copies_the_ids_it_reads(rng, dtype):
    from sparsembed._kernels import _lookup

    weight = rng.standard_normal((50, 7)).astype(dtype)
    for idx_dtype in (np.int32, np.int64):
        ids = rng.integers(0, 50, size=1001).astype(idx_dtype)
        for n_threads in (1, 2, 3):
            for stream in (False, True):
                out = np.empty((1001, 7), dtype)
                kept = np.full(1001, -9, dtype=idx_dtype)
                assert _lookup.gather(weight, ids, out, n_threads, stream, kept) == -1
                assert_array_equal(kept, ids)
                assert_array_equal(out, weight[ids])
        kept = np.full(1001, -9, dtype=idx_dtype)
        no_cols = np.empty((1001, 0), dtype)
        assert _lookup.gather(np.zeros((50, 0), dtype), ids, no_cols, 2, False, kept) == -1
        assert_array_equal(kept, ids)
        with pytest.raises(ValueError, match="ids_out has 1000 entries, expected 1001"):
            _lookup.gather(weight, ids, np.empty((1001, 7), dtype), 2, False,
                           np.empty(1000, dtype=idx_dtype))


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("table", ["float32", "float16", "renorm"])
def test_backward_uses_the_ids_of_the_forward_on_every_path(rng, idx_dtype, table, threads):
    # a forward of the caller's own id buffer keeps a copy, written by the lookup
    # kernel as it reads the ids (each thread its block; the float16 and renorm
    # paths alike): reusing the buffer before the backward changes nothing
    threads(2)
    V, n, D = 5000, 300_001, 4
    emb = se.Embedding(V, D, sparse=True, random_state=0,
                       dtype=np.float16 if table == "float16" else np.float32,
                       max_norm=1.0 if table == "renorm" else None)
    ids = rng.integers(0, V, size=n).astype(idx_dtype)
    original = ids.copy()
    emb(ids)
    ids[:] = 7
    grad_out = rng.standard_normal((n, D)).astype(np.float32)
    g = emb.backward(grad_out)
    expected = F.embedding_backward(grad_out, original, V, sparse=True)
    assert_array_equal(g.toarray(), expected.toarray())


def test_uint64_beyond_int64_is_an_index_error():
    emb = se.Embedding(10, 3)
    with pytest.raises(IndexError, match=f"index {2**63 + 5} at position 1"):
        emb(np.array([1, 2**63 + 5], dtype=np.uint64))


@pytest.mark.parametrize("bad", [np.array([1.0, 2.0]), np.array([True, False]),
                                 np.array([1, "a"], dtype=object), np.array([1 + 0j])])
def test_non_integer_ids_are_type_errors(bad):
    emb = se.Embedding(10, 3, max_norm=1.0, random_state=0)
    w = emb.weight.copy()
    with pytest.raises(TypeError, match="must be an array of integers, got dtype"):
        emb(bad)
    assert_array_equal(emb.weight, w)


def test_grad_output_shape_error_changes_nothing():
    emb = se.Embedding(10, 3, random_state=0)
    emb(np.array([[1, 2]]))
    emb.backward(np.ones((1, 2, 3)))
    snap = _snapshot(emb)
    with pytest.raises(ValueError, match=r"grad_output has shape \(2, 3\), expected \(1, 2, 3\)"):
        emb.backward(np.ones((2, 3)))
    _assert_unchanged(emb, snap)
    with pytest.raises(TypeError, match="grad_output must be a real array"):
        emb.backward(np.full((1, 2, 3), "x"))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match=r"backward\(\) called before any forward\(\)"):
        se.Embedding(3, 2).backward(np.ones((1, 2)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_embeddings=-1, embedding_dim=3), "num_embeddings must be a non-negative int, got -1"),
    (dict(num_embeddings=3, embedding_dim=-2), "embedding_dim must be a non-negative int, got -2"),
    (dict(num_embeddings=2.5, embedding_dim=3), "num_embeddings must be a non-negative int, got 2.5"),
    (dict(num_embeddings=5, embedding_dim=3, padding_idx=5), r"padding_idx 5 must be within \[-5, 5\)"),
    (dict(num_embeddings=5, embedding_dim=3, padding_idx=-6), r"padding_idx -6 must be within \[-5, 5\)"),
    (dict(num_embeddings=5, embedding_dim=3, max_norm=0.0), "max_norm must be > 0, got 0.0"),
    (dict(num_embeddings=5, embedding_dim=3, max_norm=-1), "max_norm must be > 0, got -1"),
    (dict(num_embeddings=5, embedding_dim=3, dtype=np.int32), "dtype must be float16, float32 or float64, got int32"),
    (dict(num_embeddings=5, embedding_dim=3, device="tpu"), "device must be 'cpu' or 'cuda'.*, got 'tpu'"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        se.Embedding(**kwargs)


def test_read_only_table_with_max_norm_is_refused():
    w = np.ones((4, 2), dtype=np.float32) * 10
    w.flags.writeable = False
    emb = se.Embedding.from_pretrained(w, max_norm=1.0)
    with pytest.raises(ValueError, match="read-only"):
        emb(np.array([1]))


def test_cuda_without_cupy_is_a_clear_error():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x"):
        se.Embedding(3, 2, device="cuda")


# --------------------------------------------------------------- property-based

def test_property_sparse_equals_dense():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st
    from hypothesis.extra.numpy import arrays

    @settings(max_examples=60, deadline=None)
    @given(V=st.integers(1, 20), D=st.integers(0, 5), data=st.data(),
           pad=st.one_of(st.none(), st.integers(0, 19)), scale=st.booleans())
    def check(V, D, data, pad, scale):
        if pad is not None and pad >= V:
            pad = None
        shape = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple))
        ids = data.draw(arrays(np.int64, shape, elements=st.integers(0, V - 1)))
        g = data.draw(arrays(np.float64, shape + (D,), elements=st.floats(-10, 10)))
        dense = F.embedding_backward(g, ids, V, padding_idx=pad, scale_grad_by_freq=scale)
        sparse = F.embedding_backward(g, ids, V, padding_idx=pad, scale_grad_by_freq=scale, sparse=True)
        _assert_canonical(sparse, ref.touched_rows(ids, pad) if D else np.flatnonzero(np.diff(sparse.indptr)), V, D)
        assert_allclose(sparse.toarray(), dense, rtol=1e-12, atol=1e-12)
        assert_allclose(dense, ref.dense_backward(g, ids, V, pad, scale), rtol=1e-12, atol=1e-12)

    assert hypothesis
    check()


@pytest.mark.parametrize("table, dtype", [
    (np.array([[1, None]], dtype=object), "object"),   # numpy made it [1, nan]
    (np.ones((1, 2), np.complex64), "complex64"),      # imaginary part dropped, a warning
    (np.array([["1", "x"]]), "<U1"),                   # numpy's own message
])
def test_a_table_of_anything_but_real_numbers_is_a_type_error(table, dtype):
    message = f"weight must hold real numbers \\(a float or integer array\\), got dtype {dtype}"
    with pytest.raises(TypeError, match=message):
        se.Embedding.from_pretrained(table)
    with pytest.raises(TypeError, match=message):
        se.Embedding(1, 2, weight=table)
    emb = se.Embedding(1, 2, random_state=0)
    before = emb.weight.copy()
    with pytest.raises(TypeError, match="state_dict\\['weight'\\] must hold real numbers"):
        emb.load_state_dict({"weight": table})
    assert_array_equal(emb.weight, before)
    emb.load_state_dict({"weight": [[1, 2]]})  # a nested list, as np.asarray takes it
    assert_array_equal(emb.weight, [[1, 2]])


@pytest.mark.parametrize("ids, value", [
    (np.array([1, 2**63 + 5], dtype=np.uint64), 2**63 + 5),
    (np.array([1, 2**64 - 1], dtype=">u8"), 2**64 - 1),  # any byte order
    ([1, 2**70], 2**70),        # numpy falls back to an object array
    ([1, -2**70], -2**70),
    ([1, 2**63], 2**63),        # ... or to float64 (int64 and uint64 mixed)
])
def test_ids_past_int64_name_the_value_position_and_range(ids, value):
    emb = se.Embedding(10, 2, max_norm=1.0, random_state=0)
    before = emb.weight.copy()
    message = f"input: index {value} at position 1 is out of range for 10 embeddings " \
              f"\\(valid: 0..9\\)"
    for call in (emb, lambda i: F.embedding(i, emb.weight, max_norm=1.0),
                 lambda i: F.embedding_backward(np.ones((2, 2), np.float32), i, 10),
                 lambda i: F.embedding_renorm_(emb.weight, i, 1.0),
                 lambda i: F.embedding_bag(i, emb.weight, [0], mode="sum"),
                 lambda i: se.EmbeddingBag(10, 2)(i, [0])):
        with pytest.raises(IndexError, match=message):
            call(ids)
    assert_array_equal(emb.weight, before)
    # without a table to name, the message says why no table has such a row
    with pytest.raises(IndexError, match=f"\\(ids are int64: no table has a row {value}\\)"):
        se._validation.as_index_array(ids)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_slice_lookup_reads_the_table_in_place(rng, monkeypatch, dtype):
    # a column slice of a wider table is read where it is (the s31 sweep: copying the
    # named rows first cost 3-8x torch); other layouts still copy the rows named
    big = rng.standard_normal((50, 12)).astype(dtype)
    ids = rng.integers(0, 50, (7, 9))
    expected = {"cols": big[:, 3:11][ids], "F": big[:, :5][ids]}

    def no_copy(*args):
        raise AssertionError("compact_rows called for a column slice")

    with monkeypatch.context() as m:
        m.setattr(F, "compact_rows", no_copy)
        w = big[:, 3:11]
        assert not w.flags.c_contiguous
        assert_array_equal(F.embedding(ids, w), expected["cols"])
        bad = ids.copy()
        bad[2, 4] = 50
        with pytest.raises(IndexError) as e_slice:
            F.embedding(bad, w)
        with pytest.raises(IndexError) as e_copy:
            F.embedding(bad, np.ascontiguousarray(w))
        assert str(e_slice.value) == str(e_copy.value)
    fortran = np.asfortranarray(big[:, :5])
    assert_array_equal(F.embedding(ids, fortran), expected["F"])
