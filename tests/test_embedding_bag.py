"""EmbeddingBag and functional.embedding_bag[_backward]: torch parity, numpy
references, gradient checks, determinism and every error path."""

import array
import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import reference_bag as ref
import sparsembed as se
from sparsembed import functional as F

RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
ATOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
MODES = ["sum", "mean", "max"]


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def close(actual, expected, dtype, scale=1.0):
    dtype = np.dtype(dtype)
    assert_allclose(actual, expected, rtol=RTOL[dtype] * 10, atol=ATOL[dtype] * 10 * scale)


def dense(g):
    return g.toarray() if sp.issparse(g) else np.asarray(g)


# A batch with duplicates (within and across bags), empty bags, padding-only bags.
IDS = np.array([1, 2, 0, 3, 3, 5, 0, 6, 1, 0, 0, 4, 4, 2])
OFFSETS = np.array([0, 3, 3, 5, 9, 11, 11])  # bags: 3, 0, 2, 4, 2 (padding only), 0, 3


# ---------------------------------------------------------------- torch parity

def _torch_bag(torch, weight, mode, padding_idx, include_last_offset=False, max_norm=None,
               scale_grad_by_freq=False, sparse=False):
    return torch.nn.EmbeddingBag.from_pretrained(
        torch.tensor(weight), freeze=False, mode=mode, padding_idx=padding_idx,
        include_last_offset=include_last_offset, max_norm=max_norm,
        scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("idx_dtype,off_dtype", [(np.int64, np.int64), (np.int32, np.int32),
                                                 (np.int32, np.int64), (np.uint8, np.int16)])
def test_layer_matches_torch(mode, padding_idx, include_last_offset, idx_dtype, off_dtype,
                             dtype, rng):
    torch = pytest.importorskip("torch")
    weight = rng.standard_normal((7, 5)).astype(dtype)
    offsets = OFFSETS if not include_last_offset else np.append(OFFSETS, len(IDS))
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode,
                                          padding_idx=padding_idx,
                                          include_last_offset=include_last_offset)
    tb = _torch_bag(torch, weight, mode, padding_idx, include_last_offset)
    out = bag(IDS.astype(idx_dtype), offsets.astype(off_dtype))
    t_out = tb(torch.tensor(IDS.astype(np.int64)), torch.tensor(offsets.astype(np.int64)))
    assert out.dtype == dtype and out.shape == (len(OFFSETS), 5)
    close(out, t_out.detach().numpy(), dtype)
    grad = rng.standard_normal(out.shape).astype(dtype)
    t_out.backward(torch.tensor(grad))
    close(bag.backward(grad), tb.weight.grad.numpy(), dtype)
    # the functional form agrees with the layer
    f_out = F.embedding_bag(IDS.astype(idx_dtype), weight, offsets.astype(off_dtype), mode=mode,
                            padding_idx=padding_idx, include_last_offset=include_last_offset)
    assert_array_equal(f_out, out)
    gw, gp = F.embedding_bag_backward(grad, IDS.astype(idx_dtype), weight, offsets, mode=mode,
                                      padding_idx=padding_idx,
                                      include_last_offset=include_last_offset)
    assert gp is None
    assert_array_equal(gw, bag.grad)


@pytest.mark.parametrize("mode", MODES)
def test_functional_matches_torch_2d_input(mode, dtype, rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    weight = rng.standard_normal((9, 4)).astype(dtype)
    ids = rng.integers(0, 9, size=(6, 5))
    out = F.embedding_bag(ids, weight, mode=mode, padding_idx=2)
    tw = torch.tensor(weight, requires_grad=True)
    t_out = tf.embedding_bag(torch.tensor(ids), tw, mode=mode, padding_idx=2)
    close(out, t_out.detach().numpy(), dtype)
    grad = rng.standard_normal(out.shape).astype(dtype)
    t_out.backward(torch.tensor(grad))
    gw, _ = F.embedding_bag_backward(grad, ids, weight, mode=mode, padding_idx=2)
    close(gw, tw.grad.numpy(), dtype)


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_per_sample_weights_match_torch(padding_idx, dtype, rng):
    torch = pytest.importorskip("torch")
    weight = rng.standard_normal((7, 6)).astype(dtype)
    ids = np.array([1, 3, 3, 0, 6, 3, 2, 5])
    offsets = np.array([0, 2, 2, 5, 7])
    psw = rng.random(len(ids)).astype(dtype)
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="sum",
                                          padding_idx=padding_idx)
    out = bag(ids, offsets, per_sample_weights=psw)
    tb = _torch_bag(torch, weight, "sum", padding_idx)
    tp = torch.tensor(psw, requires_grad=True)
    t_out = tb(torch.tensor(ids), torch.tensor(offsets), per_sample_weights=tp)
    close(out, t_out.detach().numpy(), dtype)
    grad = rng.standard_normal(out.shape).astype(dtype)
    t_out.backward(torch.tensor(grad))
    close(bag.backward(grad), tb.weight.grad.numpy(), dtype)
    assert bag.per_sample_weights_grad.shape == psw.shape
    close(bag.per_sample_weights_grad, tp.grad.numpy(), dtype)
    if padding_idx is not None:
        assert np.all(bag.per_sample_weights_grad[ids == padding_idx] == 0)
    gw, gp = F.embedding_bag_backward(grad, ids, weight, offsets, mode="sum",
                                      per_sample_weights=psw, padding_idx=padding_idx)
    close(gp, tp.grad.numpy(), dtype)
    # 2-D input: the weights' gradient keeps their 2-D shape
    ids2 = ids[:6].reshape(3, 2)
    psw2 = psw[:6].reshape(3, 2)
    bag(ids2, per_sample_weights=psw2)
    bag.backward(np.ones((3, 6), dtype=dtype))
    assert bag.per_sample_weights_grad.shape == (3, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_max_norm_matches_torch(mode, norm_type, dtype, rng):
    torch = pytest.importorskip("torch")
    weight = (3 * rng.standard_normal((8, 4))).astype(dtype)
    ids = np.array([1, 0, 4, 4, 7, 0, 2])
    offsets = np.array([0, 3, 5])
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode, max_norm=1.5,
                                          norm_type=norm_type, padding_idx=0)
    tb = _torch_bag(torch, weight, mode, 0, max_norm=1.5)
    tb.norm_type = norm_type
    out = bag(ids, offsets)
    t_out = tb(torch.tensor(ids), torch.tensor(offsets))
    close(bag.weight, tb.weight.detach().numpy(), dtype)  # padding row renormed too
    close(out, t_out.detach().numpy(), dtype)
    untouched = np.setdiff1d(np.arange(8), ids)
    assert_array_equal(bag.weight[untouched], weight[untouched])
    grad = rng.standard_normal(out.shape).astype(dtype)
    t_out.backward(torch.tensor(grad))
    close(bag.backward(grad), tb.weight.grad.numpy(), dtype)
    # functional renorms in place too
    w = weight.copy()
    close(F.embedding_bag(ids, w, offsets, max_norm=1.5, norm_type=norm_type, mode=mode,
                          padding_idx=0), out, dtype)
    close(w, bag.weight, dtype)


def test_include_last_offset_ignores_trailing_entries_like_torch(rng):
    """Entries past offsets[-1] belong to no bag. torch's float32 CPU path does the
    same; its float64 path lets the last bag run to the end of input instead (an
    inconsistency of torch, whose documentation wants offsets[-1] == len(input)), so
    parity is checked in float32 only. torch's per-sample-weight gradient gives the
    unbagged entries the last bag's gradient; the output does not depend on them, so
    ours is 0 there."""
    torch = pytest.importorskip("torch")
    weight = rng.standard_normal((6, 3)).astype(np.float32)
    ids = np.array([1, 2, 3, 4, 5])
    offsets = np.array([0, 2, 3])  # entries 3, 4 belong to no bag
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="sum",
                                          include_last_offset=True, max_norm=0.5)
    tb = _torch_bag(torch, weight, "sum", None, include_last_offset=True, max_norm=0.5)
    psw = rng.random(5).astype(np.float32)
    tp = torch.tensor(psw, requires_grad=True)
    out = bag(ids, offsets, per_sample_weights=psw)
    t_out = tb(torch.tensor(ids), torch.tensor(offsets), per_sample_weights=tp)
    close(out, t_out.detach().numpy(), np.float32)
    close(bag.weight, tb.weight.detach().numpy(), np.float32)  # all of input renormed
    t_out.sum().backward()
    gw = bag.backward(np.ones_like(out))
    close(gw[:4], tb.weight.grad.numpy()[:4], np.float32)
    # rows only referenced past the last bag get no gradient (torch CPU 2.13 leaves
    # uninitialised memory in them here)
    assert_array_equal(gw[4:], 0)
    close(bag.per_sample_weights_grad[:3], tp.grad.numpy()[:3], np.float32)
    # the output does not depend on the unbagged entries, so their weights' gradient is
    # 0 (torch's backward gives them the last bag's instead)
    assert_array_equal(bag.per_sample_weights_grad[3:], 0)
    bounds = ref.bag_starts(5, offsets, include_last_offset=True)
    close(F.embedding_bag(ids, weight.astype(np.float64), offsets, mode="mean",
                          include_last_offset=True),
          ref.embedding_bag(weight, ids, bounds, "mean"), np.float64)


def test_empty_offsets_give_no_bags_like_torch(rng):
    weight = rng.standard_normal((4, 3))
    out = F.embedding_bag(np.array([0, 1, 2]), weight, np.array([], dtype=np.int64))
    assert out.shape == (0, 3)
    gw, _ = F.embedding_bag_backward(np.zeros((0, 3)), np.array([0, 1, 2]), weight,
                                     np.array([], dtype=np.int64), sparse=True)
    assert gw.shape == (4, 3) and gw.nnz == 0
    assert F.embedding_bag(np.zeros(0, np.int64), weight, np.zeros(0, np.int64)).shape == (0, 3)


def test_max_ties_first_occurrence_wins_like_torch():
    torch = pytest.importorskip("torch")
    weight = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 5.0], [0.0, 2.0, 3.0]])
    ids = np.array([1, 2, 0, 1, 1, 2])
    offsets = np.array([0, 3])
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="max", sparse=True)
    out = bag(ids, offsets)
    grad = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    gw = bag.backward(grad)
    tb = _torch_bag(torch, weight, "max", None)
    t_out = tb(torch.tensor(ids), torch.tensor(offsets))
    t_out.backward(torch.tensor(grad))
    assert_array_equal(out, t_out.detach().numpy())
    assert_array_equal(gw.toarray(), tb.weight.grad.numpy())
    # column 0 of bag 0: rows 1 and 0 tie at 1.0, row 1 comes first (and wins bag 1's)
    assert gw.toarray()[1, 0] == 11.0 and gw.toarray()[0, 0] == 0.0


# ---------------------------------------------------------------- numpy references

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_against_numpy_reference(mode, padding_idx, sparse, scale_grad_by_freq, dtype, rng):
    weight = rng.standard_normal((7, 5)).astype(dtype)
    psw = rng.random(len(IDS)).astype(dtype) if mode == "sum" else None
    bounds = ref.bag_starts(len(IDS), OFFSETS)
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode,
                                          padding_idx=padding_idx, sparse=sparse,
                                          scale_grad_by_freq=scale_grad_by_freq)
    out = bag(IDS, OFFSETS, per_sample_weights=psw)
    close(out, ref.embedding_bag(weight, IDS, bounds, mode, padding_idx, psw), dtype)
    grad = rng.standard_normal(out.shape).astype(dtype)
    gw = bag.backward(grad)
    egw, egp = ref.embedding_bag_grad(grad, weight, IDS, bounds, mode, padding_idx, psw,
                                      scale_grad_by_freq)
    assert sp.issparse(gw) == sparse
    close(dense(gw), egw, dtype)
    if psw is not None:
        close(bag.per_sample_weights_grad, egp, dtype)
    if sparse:
        expected_rows = np.unique(IDS if padding_idx is None else IDS[IDS != padding_idx])
        assert_array_equal(np.flatnonzero(np.diff(gw.indptr)), expected_rows)
        assert gw.nnz == expected_rows.size * 5 and gw.has_canonical_format


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_scale_grad_by_freq_divides_each_row_by_its_own_count(mode, rng):
    """torch CPU divides by the wrong count here (pytorch#190063); we follow the
    numpy reference: row 0 occurs 3 times, rows 1, 2, 3 once."""
    weight = rng.standard_normal((5, 2))
    ids = np.array([0, 0, 1, 2, 0, 3])
    offsets = np.array([0, 3, 5])
    bag = se.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode,
                                          scale_grad_by_freq=True)
    bag(ids, offsets)
    grad = np.ones((3, 2))
    gw = bag.backward(grad)
    expected, _ = ref.embedding_bag_grad(grad, weight, ids, ref.bag_starts(6, offsets), mode,
                                         scale_grad_by_freq=True)
    assert_allclose(gw, expected, rtol=1e-12)
    if mode == "sum":
        # every occurrence got gradient 1, divided by the row's own count
        assert_allclose(gw[:4], np.ones((4, 2)), rtol=1e-12)
    torch = pytest.importorskip("torch")
    tb = _torch_bag(torch, weight, mode, None, scale_grad_by_freq=True)
    tb(torch.tensor(ids), torch.tensor(offsets)).sum().backward()
    # where torch's count happens to be right (rows 0 and 3) we agree with it
    assert_allclose(gw[[0, 3]], tb.weight.grad.numpy()[[0, 3]], rtol=1e-12)


def test_scale_grad_by_freq_in_max_mode_uses_occurrence_count(rng):
    """torch refuses max + scale_grad_by_freq; we divide each row by its count."""
    weight = rng.standard_normal((5, 3))
    ids = np.array([0, 0, 1, 2, 0, 3, 3])
    offsets = np.array([0, 3, 5])
    grad = rng.standard_normal((3, 3))
    gw, _ = F.embedding_bag_backward(grad, ids, weight, offsets, mode="max",
                                     scale_grad_by_freq=True, sparse=True)
    egw, _ = ref.embedding_bag_grad(grad, weight, ids, ref.bag_starts(7, offsets), "max",
                                    scale_grad_by_freq=True)
    assert_allclose(gw.toarray(), egw, rtol=1e-12)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_max_mode_dense_gradient_needs_no_plan(padding_idx, dtype, rng):
    # sums the winners only (s31 sweep: the planned path sorted every entry, 1.3-1.9
    # ms at 256 bags of 256, D = 8, against torch's whole step 0.8-2.6): the bits of
    # the planned sums, which the sparse gradient and scale_grad_by_freq still use
    weight = rng.integers(-2, 3, (40, 5)).astype(dtype)  # ties
    ids = rng.integers(0, 40, 90)
    offsets = np.sort(rng.integers(0, 90, 12))
    offsets[0] = 0
    grad = rng.standard_normal((12, 5)).astype(dtype)
    layer = se.EmbeddingBag.from_pretrained(weight, freeze=False, mode="max",
                                            padding_idx=padding_idx)
    layer(ids, offsets)
    dense = layer.backward(grad)
    assert layer._saved["plan"] is None
    planned = F.embedding_bag_backward(grad, ids, weight, offsets, mode="max",
                                       padding_idx=padding_idx, sparse=True)[0].toarray()
    assert dense.tobytes() == planned.tobytes()
    assert F.embedding_bag_backward(grad, ids, weight, offsets, mode="max",
                                    padding_idx=padding_idx)[0].tobytes() == dense.tobytes()
    expected, _ = ref.embedding_bag_grad(grad, weight, ids, ref.bag_starts(90, offsets), "max",
                                         padding_idx)
    assert_allclose(dense, expected, rtol=RTOL[np.dtype(dtype)], atol=ATOL[np.dtype(dtype)])
    layer.scale_grad_by_freq = True
    layer(ids, offsets)
    by_freq = layer.backward(grad)
    assert layer._saved["plan"] is not None
    expected, _ = ref.embedding_bag_grad(grad, weight, ids, ref.bag_starts(90, offsets), "max",
                                         padding_idx, scale_grad_by_freq=True)
    assert_allclose(by_freq, expected, rtol=RTOL[np.dtype(dtype)], atol=ATOL[np.dtype(dtype)])


@pytest.mark.parametrize("mode", MODES)
def test_equals_embedding_then_reduction(mode, dtype, rng):
    weight = rng.standard_normal((10, 4)).astype(dtype)
    ids = rng.integers(0, 10, size=(5, 3))
    emb = se.Embedding.from_pretrained(weight.copy(), freeze=False)
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode)
    looked = emb(ids)
    reduce = {"sum": np.sum, "mean": np.mean, "max": np.max}[mode]
    close(bag(ids), reduce(looked.astype(np.float64), axis=1), dtype)
    grad = rng.standard_normal((5, 4)).astype(dtype)
    if mode == "sum":
        g_looked = np.repeat(grad[:, None, :], 3, axis=1)
    elif mode == "mean":
        g_looked = np.repeat(grad[:, None, :], 3, axis=1) / 3
    else:
        first = looked.argmax(axis=1)  # first occurrence, as torch
        g_looked = np.zeros_like(looked)
        np.put_along_axis(g_looked, first[:, None, :], grad[:, None, :], axis=1)
    close(bag.backward(grad), emb.backward(g_looked.astype(dtype)), dtype)


# ---------------------------------------------------------------- gradient checks

def _numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f()
        flat[i] = old - eps
        lo = f()
        flat[i] = old
        gf[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("mode,with_psw", [("sum", False), ("sum", True), ("mean", False),
                                           ("max", False)])
def test_finite_difference_gradients(mode, with_psw, rng):
    weight = rng.standard_normal((6, 3))
    ids = np.array([1, 2, 0, 3, 3, 5, 0, 4, 1])
    offsets = np.array([0, 3, 3, 5])
    psw = rng.random(len(ids)) + 0.5 if with_psw else None
    proj = rng.standard_normal((4, 3))

    def loss():
        out = F.embedding_bag(ids, weight, offsets, mode=mode, padding_idx=0,
                              per_sample_weights=psw)
        return float(np.sum(out * proj))

    gw, gp = F.embedding_bag_backward(proj, ids, weight, offsets, mode=mode, padding_idx=0,
                                      per_sample_weights=psw)
    num = _numeric_grad(loss, weight)
    num[0] = 0  # the padding row gets no gradient by definition
    assert_allclose(gw, num, rtol=1e-6, atol=1e-8)
    if with_psw:
        assert_allclose(gp, _numeric_grad(loss, psw), rtol=1e-6, atol=1e-8)


def test_row_sum_kernel_against_numpy(dtype, rng):
    """The backend's per-row sum (the piece the fused optimizer reuses): rows in plan
    order, each the sum of grad[entry_bag[e]] * scale[e], or in max mode of the
    columns entry e won."""
    from sparsembed import _cpu

    ids = rng.integers(0, 6, size=30)
    starts = np.array([0, 4, 4, 11, 20, 30], dtype=np.int64)
    grad = rng.standard_normal((5, 3)).astype(dtype)
    entry_bag = _cpu.entry_bags(starts)
    assert_array_equal(entry_bag, np.repeat(np.arange(5), np.diff(starts)))
    plan = _cpu.plan_rows(ids, 6, 2)
    scale = rng.random(30).astype(dtype)
    weight = rng.standard_normal((6, 3)).astype(dtype)
    _, argmax, counts = _cpu.bag_forward(weight, ids, starts, "max", 2)
    assert_array_equal(counts, [np.sum(ids[a:b] != 2) for a, b in zip(starts[:-1], starts[1:])])
    for sc, am in [(None, None), (scale, None), (None, argmax)]:
        for by_freq in (False, True):
            got = _cpu.bag_row_grad(grad, plan, entry_bag, sc, am, by_freq)
            expected = np.zeros((6, 3))
            for e, r in enumerate(ids):
                if r == 2:
                    continue
                contrib = grad[entry_bag[e]].astype(np.float64)
                if sc is not None:
                    contrib = contrib * sc[e]
                if am is not None:
                    contrib = np.where(am[entry_bag[e]] == e, contrib, 0)
                expected[r] += contrib
            if by_freq:
                expected /= np.maximum(np.bincount(ids[ids != 2], minlength=6), 1)[:, None]
            assert_array_equal(plan.rows, np.setdiff1d(np.unique(ids), [2]))
            close(got, expected[plan.rows], dtype)
            dense_got = _cpu.bag_dense_grad(grad, plan, entry_bag, sc, am, 6, by_freq)
            assert_array_equal(dense_got[plan.rows], got)
            assert_array_equal(dense_got[2], 0)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("mode", MODES)
def test_bitwise_equal_for_1_and_2_threads(mode, threads):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((300, 16)).astype(np.float32)
    ids = rng.zipf(1.3, size=20000) % 300
    offsets = np.sort(rng.integers(0, len(ids), size=999))
    offsets[0] = 0
    psw = rng.random(len(ids)).astype(np.float32) if mode == "sum" else None
    grad = rng.standard_normal((999, 16)).astype(np.float32)
    results = []
    for n in (1, 2):
        threads(n)
        bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode,
                                              padding_idx=3, scale_grad_by_freq=True)
        out = bag(ids, offsets, per_sample_weights=psw)
        gd = bag.backward(grad)
        gs, gp = F.embedding_bag_backward(grad, ids, weight, offsets, mode=mode, padding_idx=3,
                                          per_sample_weights=psw, sparse=True)
        results.append((out, gd, gs.toarray(), gp))
    for a, b in zip(*results):
        if a is None:
            assert b is None
        else:
            assert_array_equal(a, b)


# ---------------------------------------------------------------- inputs

def test_csr_input_is_a_batch_of_weighted_bags(dtype, rng):
    weight = rng.standard_normal((8, 4)).astype(dtype)
    dense_x = np.array([[0, 1.5, 0, 0, 2, 0, 0, 0],
                        [0, 0, 0, 0, 0, 0, 0, 0],
                        [1, 0, 0, 0.5, 0, 0, 0, 3]])
    x = sp.csr_array(dense_x)
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="sum")
    out = bag(x)
    close(out, dense_x @ weight.astype(np.float64), dtype)
    # the same as 1-D ids + offsets + per-sample weights
    close(out, bag(x.indices, x.indptr[:-1], per_sample_weights=x.data), dtype)
    bag(x)
    grad = rng.standard_normal((3, 4)).astype(dtype)
    close(bag.backward(grad), dense_x.T @ grad.astype(np.float64), dtype)
    assert bag.per_sample_weights_grad.shape == (x.nnz,)
    close(bag.per_sample_weights_grad,
          np.einsum("ed,ed->e", grad[np.repeat(np.arange(3), np.diff(x.indptr))],
                    weight[x.indices]), dtype)
    gw, gp = F.embedding_bag_backward(grad, sp.csr_matrix(dense_x), weight, mode="sum")
    close(gp, bag.per_sample_weights_grad, dtype)
    # multi-hot (all ones) with mean pooling; any scipy format is converted
    hot = sp.coo_array((dense_x > 0).astype(np.float64))
    close(F.embedding_bag(hot, weight, mode="mean"),
          ref.embedding_bag(weight, x.indices, ref.bag_starts(0, x.indptr, True), "mean"), dtype)


def _entries(fmt):
    """A 3-bag batch of 6 stored entries in ``fmt``, out of row order (coo: with a
    duplicate entry (2, 5)), and the same entries as (row, col, data) lists."""
    row = np.array([2, 0, 2, 0, 2, 1])
    col = np.array([5, 3, 1, 6, 5, 3])
    data = np.array([0.5, 2.0, -1.0, 3.0, 4.0, 1.5])
    if fmt == "coo":
        return sp.coo_array((data, (row, col)), shape=(4, 8)), row, col, data
    csc = sp.csc_array((data[:5], (row[:5], col[:5])), shape=(4, 8))  # no duplicate
    c = csc.tocoo()  # the csc's own entry order (column-major)
    return csc, c.row, c.col, csc.data


@pytest.mark.parametrize("fmt", ["csc", "coo"])
def test_sparse_input_psw_grad_is_aligned_with_its_data(fmt, dtype, rng):
    # the csc / coo input was regrouped by row (and a coo's duplicates summed), and the
    # per-sample weights' gradient came back in that csr order: permuted against the
    # input's data (and shorter than it with a duplicate)
    x, row, col, data = _entries(fmt)
    weight = rng.standard_normal((8, 4)).astype(dtype)
    grad = rng.standard_normal((4, 4)).astype(dtype)
    expected = np.einsum("ed,ed->e", grad[row].astype(np.float64),
                         weight[col].astype(np.float64))
    bag = se.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode="sum")
    out = bag(x)
    dense_x = np.zeros((4, 8))
    np.add.at(dense_x, (row, col), data)
    close(out, dense_x @ weight.astype(np.float64), dtype)
    close(bag.backward(grad), dense_x.T @ grad.astype(np.float64), dtype)
    assert bag.per_sample_weights_grad.shape == data.shape
    close(bag.per_sample_weights_grad, expected, dtype)
    _, gp = F.embedding_bag_backward(grad, x, weight, mode="sum")
    close(gp, expected, dtype)
    # each bag pools its entries in their order in the matrix: the bits of the same
    # entries as 1-D ids + offsets + per-sample weights
    order = np.argsort(row, kind="stable")
    offsets = np.searchsorted(row[order], np.arange(4))
    assert_array_equal(out, F.embedding_bag(col[order], weight, offsets, mode="sum",
                                            per_sample_weights=data[order]))


def test_csr_input_errors(rng):
    weight = rng.standard_normal((4, 2))
    x = sp.csr_array(np.array([[0, 2.0, 0, 0], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="mode='mean'"):
        F.embedding_bag(x, weight, mode="mean")
    with pytest.raises(ValueError, match="offsets must be None"):
        F.embedding_bag(x, weight, np.array([0]), mode="sum")
    with pytest.raises(ValueError, match="per_sample_weights must be None"):
        F.embedding_bag(x, weight, mode="sum", per_sample_weights=np.ones(2))
    with pytest.raises(IndexError, match="index 4 at position 4"):
        F.embedding_bag(sp.csr_array(np.ones((1, 6))), weight, mode="sum")
    text = sp.csr_array((np.array([1, "a"], dtype=object), np.array([0, 1]), np.array([0, 2])),
                        shape=(1, 4))
    with pytest.raises(TypeError, match=r"a sparse input's data \(its per-sample weights\) "
                                        "must be a real array, got dtype object"):
        F.embedding_bag(text, weight, mode="sum")


def test_readonly_and_noncontiguous_inputs(rng):
    weight = rng.standard_normal((10, 3))
    ids = rng.integers(0, 10, size=24)[::2]
    offsets = np.array([0, 4, 4, 9])
    expected = F.embedding_bag(ids.copy(), weight, offsets, mode="sum")
    w_ro = weight.copy()
    w_ro.flags.writeable = False
    ids_ro = ids.copy()
    ids_ro.flags.writeable = False
    assert_array_equal(F.embedding_bag(ids, w_ro, offsets, mode="sum"), expected)
    assert_array_equal(F.embedding_bag(ids_ro, np.asfortranarray(weight), offsets[::1],
                                       mode="sum"), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["columns", "fortran", "rows"])
def test_strided_tables_read_only_the_named_rows_with_the_same_results(rng, dtype, layout):
    # every functional call copied a table that is not C-contiguous whole (a column
    # slice of a 2e6-row table: its memory per call); now only the rows named, with
    # the ids and the padding row renumbered into the copy
    V, D = 40, 6
    base = (rng.standard_normal((2 * V, 2 * D)) * 2).astype(dtype)
    table = {"columns": base[:V, ::2], "fortran": np.asfortranarray(base[:V, :D]),
             "rows": base[::2, :D]}[layout]
    dense = np.ascontiguousarray(table)
    assert not table.flags.c_contiguous
    ids = rng.integers(0, V, 30)
    ids[:4] = 7  # duplicates; 7 is the padding row below
    offsets = np.array([0, 5, 5, 12, 29])
    psw = rng.standard_normal(30).astype(dtype)
    grad = rng.standard_normal((5, D)).astype(np.float64)
    for pad in (None, 7, 39):  # 39 may be absent from the batch
        assert_array_equal(F.embedding(ids, table), dense[ids])
        for mode, w in (("sum", None), ("sum", psw), ("mean", None), ("max", None)):
            kw = dict(mode=mode, per_sample_weights=w, padding_idx=pad)
            assert_array_equal(F.embedding_bag(ids, table, offsets, **kw),
                               F.embedding_bag(ids, dense, offsets, **kw))
            got = F.embedding_bag_backward(grad, ids, table, offsets, **kw)
            want = F.embedding_bag_backward(grad, ids, dense, offsets, **kw)
            assert_array_equal(got[0], want[0])
            assert (got[1] is None) == (want[1] is None)
            if want[1] is not None:
                assert_array_equal(got[1], want[1])
    # renorm writes the named rows back into the strided table, and only them
    if dtype != np.float16:
        before = table.copy()
        expected = dense.copy()
        F.embedding(ids, expected, max_norm=0.5)
        F.embedding(ids, table, max_norm=0.5)
        assert_array_equal(table, expected)
        untouched = np.setdiff1d(np.arange(V), ids)
        assert_array_equal(table[untouched], before[untouched])
    # a bad id is named before anything is read, as for a contiguous table
    for bad in (V, -1):
        with pytest.raises(IndexError, match=f"{bad}"):
            F.embedding(np.array([1, bad]), table)
        with pytest.raises(IndexError, match=f"{bad}"):
            F.embedding_bag(np.array([1, bad]), table, np.array([0]), mode="sum")


def test_strided_table_lookup_takes_memory_of_the_batch_not_the_table(rng):
    import tracemalloc

    base = rng.standard_normal((400_000, 32)).astype(np.float32)
    table = base[:, :16]  # a column slice: 25.6 MB whole
    ids = rng.integers(0, 400_000, 100)
    offsets = np.array([0, 50])
    for call in (lambda: F.embedding(ids, table),
                 lambda: F.embedding_bag(ids, table, offsets, mode="max"),
                 lambda: F.embedding_bag_backward(np.ones((2, 16)), ids, table, offsets,
                                                  mode="max", sparse=True)):
        call()
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, peak


def test_layer_saves_its_own_copy_of_the_batch(rng):
    bag = se.EmbeddingBag(10, 3, mode="sum", random_state=0)
    ids = np.array([1, 2, 3, 4])
    offsets = np.array([0, 2])
    psw = np.ones(4, dtype=np.float32)
    bag(ids, offsets, per_sample_weights=psw)
    expected = bag.backward(np.ones((2, 3)))
    bag.zero_grad()
    ids[:] = 9
    offsets[1] = 0
    psw[:] = 5
    assert_array_equal(bag.backward(np.ones((2, 3))), expected)
    assert_allclose(bag.per_sample_weights_grad, bag.weight[[1, 2, 3, 4]].sum(axis=1),
                    rtol=1e-6)


class _ArrayLike:
    """A container that hands numpy its own memory (as pandas or xarray do)."""

    def __init__(self, values):
        self.values = values

    def __array__(self, dtype=None, copy=None):
        return self.values


@pytest.mark.parametrize("wrap", ["buffer", "memoryview", "array_like", "torch"])
def test_layer_saves_its_own_copy_of_a_batch_numpy_views(rng, wrap):
    # ids, offsets and per-sample weights that numpy converts without a copy: the
    # layer keeps its own, as for arrays
    if wrap == "torch":
        torch = pytest.importorskip("torch")
    ids, offsets, psw = [1, 2, 3, 4], [0, 2], [1.0, 2.0, 0.5, 1.0]
    bag = se.EmbeddingBag(10, 3, mode="sum", random_state=0)
    bag(np.array(ids), np.array(offsets), per_sample_weights=np.array(psw, np.float32))
    expected = bag.backward(np.ones((2, 3)))
    expected_psw = bag.per_sample_weights_grad.copy()
    bag.zero_grad()
    if wrap == "buffer":
        args = array.array("q", ids), array.array("q", offsets), array.array("f", psw)
    elif wrap == "memoryview":
        args = (memoryview(np.array(ids)), memoryview(np.array(offsets)),
                memoryview(np.array(psw, np.float32)))
    elif wrap == "array_like":
        args = (_ArrayLike(np.array(ids)), _ArrayLike(np.array(offsets)),
                _ArrayLike(np.array(psw, np.float32)))
    else:
        args = torch.tensor(ids), torch.tensor(offsets), torch.tensor(psw)
    bag(args[0], args[1], per_sample_weights=args[2])
    for arg, value in zip(args, (9, 0, 5)):
        np.asarray(arg)[...] = value
    assert_array_equal(bag.backward(np.ones((2, 3))), expected)
    assert_array_equal(bag.per_sample_weights_grad, expected_psw)


# ---------------------------------------------------------------- layer life cycle

def test_layer_basics(rng):
    bag = se.EmbeddingBag(10, 3, mode="max", padding_idx=-1, sparse=True, random_state=0)
    assert bag.padding_idx == 9 and np.all(bag.weight[9] == 0)
    assert repr(bag) == "EmbeddingBag(10, 3, mode='max', sparse=True, padding_idx=9)"
    assert repr(se.EmbeddingBag(4, 2)) == "EmbeddingBag(4, 2, mode='mean')"
    torch = pytest.importorskip("torch")
    for kw in (dict(), dict(mode="max", padding_idx=9), dict(norm_type=3.0, scale_grad_by_freq=True),
               dict(max_norm=1.0, mode="sum")):
        assert repr(se.EmbeddingBag(10, 3, **kw)) == repr(torch.nn.EmbeddingBag(10, 3, **kw))
    with pytest.raises(RuntimeError, match="before any forward"):
        bag.backward(np.ones((1, 3)))
    out = bag(np.array([[1, 2], [9, 9]]))
    assert_array_equal(out[1], 0)  # a bag of padding only
    g1 = bag.backward(np.ones((2, 3)))
    g2 = bag.backward(np.ones((2, 3)))
    assert_array_equal(bag.grad.toarray(), g1.toarray() + g2.toarray())
    with pytest.raises(ValueError, match=r"grad_output has shape \(3, 3\)"):
        bag.backward(np.ones((3, 3)))
    clone = pickle.loads(pickle.dumps(bag))
    assert_array_equal(clone.weight, bag.weight)
    assert_array_equal(clone.backward(np.ones((2, 3))).toarray(), g1.toarray())
    deep = copy.deepcopy(bag)
    assert deep.mode == "max" and deep.weight is not bag.weight
    frozen = se.EmbeddingBag.from_pretrained(bag.weight)
    assert frozen.weight is bag.weight and not frozen.requires_grad
    frozen(np.array([1, 2]), np.array([0]), )
    assert frozen.backward(np.ones((1, 3))) is None and frozen.grad is None
    assert se.EmbeddingBag(3, 2, dtype=np.float64).weight.dtype == np.float64


def test_frozen_layer_still_gives_per_sample_weight_grad(rng):
    weight = rng.standard_normal((5, 2))
    bag = se.EmbeddingBag.from_pretrained(weight, mode="sum")
    bag(np.array([1, 2]), np.array([0]), per_sample_weights=np.array([1.0, 2.0]))
    assert bag.backward(np.ones((1, 2))) is None
    assert_allclose(bag.per_sample_weights_grad, weight[[1, 2]].sum(axis=1))
    bag(np.array([1, 2]), np.array([0]))
    bag.backward(np.ones((1, 2)))
    assert bag.per_sample_weights_grad is None


# ---------------------------------------------------------------- errors

def _bad_calls():
    ids = np.array([1, 2, 3, 4])
    return [
        (dict(offsets=np.array([1, 2])), ValueError, r"offsets\[0\] must be 0.*got 1"),
        (dict(offsets=np.array([0, 3, 2])), ValueError, r"non-decreasing.*offsets\[2\] = 2"),
        (dict(offsets=np.array([0, 9])), ValueError, r"offsets\[-1\] = 9 .*length 4"),
        # past int64 (uint64 only): a bad offset, not an out-of-range id
        (dict(offsets=np.array([0, 2**63 + 5], np.uint64)), ValueError,
         r"offsets\[1\] = 9223372036854775813 is past the end of input \(length 4\)"),
        (dict(offsets=np.array([2**64 - 1], np.uint64)), ValueError,
         r"offsets\[0\] = 18446744073709551615 is past the end"),
        (dict(offsets=np.zeros((1, 2), np.uint64)), ValueError, r"1-D, got shape \(1, 2\)"),
        # ... and so are Python ints past int64, in a list or an object array
        (dict(offsets=np.array([0, 2**64 - 1], ">u8")), ValueError,
         r"offsets\[1\] = 18446744073709551615 is past the end of input \(length 4\)"),
        (dict(offsets=[0, 2**63]), ValueError,
         r"offsets\[1\] = 9223372036854775808 is past the end of input \(length 4\)"),
        (dict(offsets=[0, 2**64]), ValueError,
         r"offsets\[1\] = 18446744073709551616 is past the end of input \(length 4\)"),
        (dict(offsets=np.array([0, -2**70], dtype=object)), ValueError,
         r"offsets\[1\] = -1180591620717411303424 is negative"),
        (dict(input=ids.reshape(2, 2), offsets=np.array([0])), ValueError, "2-D input"),
        (dict(offsets=None), ValueError, "offsets is required"),
        (dict(mode="median"), ValueError, "'median'"),
        (dict(mode="mean", per_sample_weights=np.ones(4)), ValueError, "mode='mean'"),
        (dict(mode="sum", per_sample_weights=np.ones(3)), ValueError, r"shape \(3,\)"),
        (dict(input=np.array([1, 2, 30, 4])), IndexError, "index 30 at position 2"),
        (dict(input=np.array([1, 2, -1, 4])), IndexError, "index -1 at position 2"),
        (dict(input=np.array([1.0, 2.0])), TypeError, "integers"),
        (dict(offsets=np.array([0.0])), TypeError, "offsets must be an array of integers"),
        (dict(input=np.zeros((1, 1, 1), np.int64), offsets=None), ValueError, "1-D"),
        (dict(offsets=np.array([], np.int64), include_last_offset=True), ValueError,
         "at least one"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors_leave_everything_unchanged(case, rng):
    kwargs, exc, match = _bad_calls()[case]
    kwargs = dict(kwargs)
    input = kwargs.pop("input", np.array([1, 2, 3, 4]))
    kwargs.setdefault("offsets", np.array([0, 2]))
    mode = kwargs.pop("mode", "sum")
    last = kwargs.pop("include_last_offset", False)
    weight = (5 * rng.standard_normal((10, 3))).astype(np.float32)
    before = weight.copy()
    with pytest.raises(exc, match=match):
        F.embedding_bag(input, weight, max_norm=1.0, mode=mode, include_last_offset=last,
                        **kwargs)
    assert_array_equal(weight, before)
    if mode in ("sum", "mean", "max"):
        bag = se.EmbeddingBag.from_pretrained(weight, freeze=False, max_norm=1.0, mode=mode,
                                              include_last_offset=last)
        bag(np.array([1, 2]), np.array([0, 2]) if last else np.array([0]))
        bag.backward(np.ones((1, 3)))
        grad_before = bag.grad.copy()
        weight_before = bag.weight.copy()
        with pytest.raises(exc, match=match):
            bag(input, **kwargs)
        assert_array_equal(bag.weight, weight_before)
        assert_array_equal(bag.grad, grad_before)
        # the last good forward is still the one backward uses
        assert_array_equal(bag.backward(np.ones((1, 3))), grad_before)
    with pytest.raises(exc, match=match):
        F.embedding_bag_backward(np.ones((2, 3)), input, weight, mode=mode,
                                 include_last_offset=last, **kwargs)


def test_constructor_errors():
    with pytest.raises(ValueError, match="'avg'"):
        se.EmbeddingBag(4, 2, mode="avg")
    with pytest.raises(ValueError, match="max_norm must be > 0, got -1"):
        se.EmbeddingBag(4, 2, max_norm=-1.0)
    with pytest.raises(ValueError, match="padding_idx 4"):
        se.EmbeddingBag(4, 2, padding_idx=4)
    with pytest.raises(ValueError, match="num_embeddings"):
        se.EmbeddingBag(-1, 2)


def test_backward_grad_output_errors(rng):
    weight = rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match=r"grad_output has shape \(3, 2\)"):
        F.embedding_bag_backward(np.ones((3, 2)), np.array([1, 2]), weight, np.array([0, 1]))


# ---------------------------------------------------------------- property test

def test_property_random_bags_match_reference():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=50, deadline=None, derandomize=True)
    @hyp.given(
        num=st.integers(1, 6),
        dim=st.integers(0, 4),
        ids=st.lists(st.integers(0, 5), max_size=12),
        cuts=st.lists(st.integers(0, 12), max_size=5),
        layout=st.sampled_from(["offsets", "last_offset", "2d"]),
        mode=st.sampled_from(MODES),
        padding_idx=st.sampled_from([None, 0, 1]),
        weighted=st.booleans(),
        sparse=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def check(num, dim, ids, cuts, layout, mode, padding_idx, weighted, sparse, seed):
        ids = np.array([i % num for i in ids], dtype=np.int64)
        if padding_idx is not None and padding_idx >= num:
            padding_idx = None
        r = np.random.default_rng(seed)
        weight = r.standard_normal((num, dim))
        psw = r.random(ids.shape) if weighted and mode == "sum" else None
        offsets, last = None, layout == "last_offset"
        if layout == "2d":
            bag_len = max(1, len(cuts))
            ids = ids[: len(ids) // bag_len * bag_len]
            psw = None if psw is None else psw[: ids.size]
            bounds = ref.bag_starts(ids.size, shape2d=(ids.size // bag_len, bag_len))
            call_ids = ids.reshape(-1, bag_len)
            call_psw = None if psw is None else psw.reshape(-1, bag_len)
        else:
            offsets = np.array([0] + sorted(min(c, len(ids)) for c in cuts), dtype=np.int64)
            bounds = ref.bag_starts(len(ids), offsets, include_last_offset=last)
            call_ids, call_psw = ids, psw
        kw = dict(mode=mode, padding_idx=padding_idx, per_sample_weights=call_psw,
                  include_last_offset=last)
        out = F.embedding_bag(call_ids, weight, offsets, **kw)
        assert out.shape == (len(bounds), dim)
        assert_allclose(out, ref.embedding_bag(weight, ids, bounds, mode, padding_idx, psw),
                        rtol=1e-12, atol=1e-12)
        grad = r.standard_normal(out.shape)
        gw, gp = F.embedding_bag_backward(grad, call_ids, weight, offsets, sparse=sparse, **kw)
        egw, egp = ref.embedding_bag_grad(grad, weight, ids, bounds, mode, padding_idx, psw)
        assert_allclose(dense(gw), egw, rtol=1e-12, atol=1e-12)
        if psw is None:
            assert gp is None
        else:
            assert gp.shape == call_psw.shape
            assert_allclose(gp.reshape(-1), egp, rtol=1e-12, atol=1e-12)

    check()


def test_max_norm_on_a_read_only_table_is_an_error_before_any_write(rng):
    weight = 5 * rng.standard_normal((6, 2))
    weight.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.embedding_bag(np.array([1, 2]), weight, np.array([0]), max_norm=1.0)
    bag = se.EmbeddingBag.from_pretrained(weight, max_norm=1.0)
    with pytest.raises(ValueError, match="read-only"):
        bag(np.array([1, 2]), np.array([0]))
    # without max_norm a read-only table is fine
    assert_allclose(F.embedding_bag(np.array([1, 2]), weight, np.array([0]), mode="sum"),
                    weight[[1, 2]].sum(axis=0, keepdims=True))


def test_state_dict_round_trip_and_float64(rng):
    a = se.EmbeddingBag(6, 3, mode="sum", dtype=np.float64, random_state=1)
    b = se.EmbeddingBag(6, 3, mode="sum", dtype=np.float64, random_state=2)
    b.load_state_dict(a.state_dict())
    ids, offsets = np.array([0, 5, 5, 1]), np.array([0, 1])
    assert_array_equal(a(ids, offsets), b(ids, offsets))
    assert a(ids, offsets).dtype == np.float64
    with pytest.raises(RuntimeError, match="size mismatch"):
        b.load_state_dict({"weight": np.zeros((5, 3))})
