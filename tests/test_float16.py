"""float16 tables: float16 storage, float32 arithmetic (sparsembed._half).

Every float16 result is checked three ways where it applies:

- bitwise against the same operation on a float32 copy of the table, rounded to
  float16 where the float16 path stores (that is the design: one float32 computation,
  one rounding);
- against a float64 numpy reference, within float16's rounding (a few ulps);
- against torch 2.13 CPU where torch agrees (gathers, float32 gradients of a float32
  copy). torch accumulates float16 in float16 on the CPU; we deliberately do not.
"""

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from reference import dense_backward, renorm as ref_renorm, touched_rows
from reference_bag import bag_starts, embedding_bag as ref_bag, embedding_bag_grad as ref_bag_grad
from reference_optim import REFERENCE, row_grad

import sparsembed as se
from sparsembed import _half
from sparsembed import functional as F

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
N, D = 29, 6
ULP = 2.0**-10  # float16's relative spacing; round to nearest is within half of it

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def table(rng, n=N, dim=D, scale=1.0):
    return (rng.standard_normal((n, dim)) * scale).astype(F16)


def assert_f16_close(actual, exact, ulps=1.0):
    """``actual`` (float16) within ``ulps`` float16 ulps of the float64 ``exact``."""
    exact = np.asarray(exact, dtype=F64)
    bound = ulps * ULP * np.maximum(np.abs(exact), 2.0**-14) + 1e-7
    err = np.abs(actual.astype(F64) - exact)
    assert np.all(err <= bound), f"max error {err.max()} (bound {bound[err > bound].min()})"


def bag_batch(rng, n_ids=40, n_bags=7, n=N, padding_idx=None):
    ids = rng.integers(0, n, size=n_ids)
    if padding_idx is not None:
        ids[rng.random(n_ids) < 0.2] = padding_idx
    offsets = np.sort(rng.integers(0, n_ids, size=n_bags))
    offsets[0] = 0
    offsets[2] = offsets[1]  # an empty bag
    return ids, offsets


# ------------------------------------------------------------------ storage

def test_layers_store_float16(rng):
    for cls in (se.Embedding, se.EmbeddingBag):
        layer = cls(N, D, dtype=np.float16, random_state=0)
        assert layer.weight.dtype == F16 and layer.dtype == F16
        assert layer.weight.nbytes == N * D * 2 and layer.weight.flags.c_contiguous
        assert "dtype=float16" in repr(layer)
    emb = se.Embedding(N, D, padding_idx=3, dtype=np.float16, random_state=0)
    ref = se.Embedding(N, D, padding_idx=3, dtype=np.float64, random_state=0)
    assert_array_equal(emb.weight, ref.weight.astype(F16))  # same draw, rounded
    assert not emb.weight[3].any()


def test_from_pretrained_and_weight_share_memory(rng):
    w = table(rng)
    for cls in (se.Embedding, se.EmbeddingBag):
        layer = cls.from_pretrained(w, freeze=False)
        assert layer.weight is w or np.shares_memory(layer.weight, w)
        assert layer.weight.dtype == F16
        layer2 = cls(N, D, weight=w, dtype=np.float16)
        assert np.shares_memory(layer2.weight, w)
    # float16 input with the default dtype is converted (the contract's rule)
    assert se.Embedding(N, D, weight=w).weight.dtype == F32
    # a training step writes through to the caller's array
    emb = se.Embedding.from_pretrained(w, freeze=False, sparse=True)
    before = w.copy()
    opt = se.optim.SGD([emb], lr=0.5)
    emb(np.array([1, 2]))
    emb.backward(np.ones((2, D), dtype=np.float32))
    opt.step()
    assert emb.weight.dtype == F16 and np.shares_memory(emb.weight, w)
    assert not np.array_equal(w[[1, 2]], before[[1, 2]])
    assert_array_equal(np.delete(w, [1, 2], axis=0), np.delete(before, [1, 2], axis=0))


# ------------------------------------------------------------------ forward

@pytest.mark.parametrize("dim", [1, 2, 3, 64, 65, 256])
def test_forward_moves_every_bit_pattern(rng, dim):
    # an even-width contiguous table goes through the compiled gather (rows as float32
    # pairs), an odd or strided one through numpy: both copy the halves as they are,
    # NaN payloads and signalling NaNs included; a bad id is named before any write
    bits = rng.permutation(np.tile(np.arange(65536, dtype=np.uint16), 4))[: 500 * dim]
    w = bits.reshape(500, dim).view(F16)
    ids = rng.integers(0, 500, size=3000)
    for table_ in (w, np.asfortranarray(w)):
        out = F.embedding(ids, table_)
        assert out.view(np.uint16).tobytes() == w[ids].view(np.uint16).tobytes()
    ids[1700] = 500
    with pytest.raises(IndexError, match="index 500 at position 1700"):
        F.embedding(ids, w)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64, np.uint8])
def test_forward_gathers_exactly(rng, index_dtype):
    torch = pytest.importorskip("torch")
    w = table(rng)
    ids = rng.integers(0, N, size=(4, 5)).astype(index_dtype)
    emb = se.Embedding.from_pretrained(w, padding_idx=2)
    out = emb(ids)
    assert out.dtype == F16 and out.shape == (4, 5, D)
    assert_array_equal(out, w[ids.astype(np.int64)])
    assert_array_equal(F.embedding(ids, w), out)
    t = torch.nn.functional.embedding(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(w))
    assert_array_equal(out, t.numpy())
    assert emb(np.zeros((0, 3), dtype=np.int64)).shape == (0, 3, D)
    # a non-contiguous float16 table in the functional form
    wide = table(rng, dim=2 * D)
    assert_array_equal(F.embedding(ids, wide[:, ::2]), wide[:, ::2][ids.astype(np.int64)])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, 3.0])
def test_max_norm_renorm_in_float32(rng, norm_type):
    w = table(rng, scale=2.0)
    ids = rng.integers(0, N, size=30)
    ids[:3] = 4  # padding occurs, and is renormalised like torch
    emb = se.Embedding.from_pretrained(w.copy(), max_norm=1.5, norm_type=norm_type, padding_idx=4)
    out = emb(ids)
    # exactly the float32 renorm, rounded once
    w32 = w.astype(F32)
    F.embedding_renorm_(w32, ids, 1.5, norm_type)
    assert_array_equal(emb.weight, w32.astype(F16))
    assert_array_equal(out, emb.weight[ids])
    # within float16 rounding of the float64 renorm; untouched rows unchanged
    exact = ref_renorm(w.astype(F64), ids, 1.5, norm_type)
    assert_f16_close(emb.weight, exact, ulps=0.5 + 1e-3)
    untouched = np.setdiff1d(np.arange(N), ids)
    assert_array_equal(emb.weight[untouched], w[untouched])
    # the functional form does the same in place
    w2 = w.copy()
    assert F.embedding_renorm_(w2, ids, 1.5, norm_type) is w2
    assert_array_equal(w2, emb.weight)
    w3 = w.copy()
    assert_array_equal(F.embedding(ids, w3, max_norm=1.5, norm_type=norm_type), out)
    assert_array_equal(w3, emb.weight)


# ------------------------------------------------------------------ backward

@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx,scale", [(None, False), (5, False), (5, True)])
def test_backward_float32_gradients(rng, sparse, padding_idx, scale):
    torch = pytest.importorskip("torch")
    w = table(rng)
    ids = rng.integers(0, N, size=(6, 4))
    ids[0, :2] = 5
    go = rng.standard_normal((6, 4, D)).astype(F32)
    emb = se.Embedding.from_pretrained(w, freeze=False, padding_idx=padding_idx,
                                       scale_grad_by_freq=scale, sparse=sparse)
    emb(ids)
    g = emb.backward(go.astype(F16) if scale else go)  # a float16 grad_output is accepted
    if scale:
        go = go.astype(F16).astype(F32)
    dense = g.toarray() if sparse else g
    assert dense.dtype == F32 and g.dtype == F32
    assert_allclose(dense, dense_backward(go.astype(F64), ids, N, padding_idx, scale),
                    rtol=1e-6, atol=1e-6)
    # torch: the float32 gradient of a float32 copy of the table
    t = torch.nn.Embedding(N, D, padding_idx=padding_idx, scale_grad_by_freq=scale)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w.astype(F32)))
    t(torch.from_numpy(ids)).backward(torch.from_numpy(go))
    assert_allclose(dense, t.weight.grad.numpy(), rtol=1e-6, atol=1e-6)
    if sparse:
        assert_array_equal(sp.csr_array(g).indptr, g.indptr)
        assert_array_equal(np.flatnonzero(np.diff(g.indptr)), touched_rows(ids, padding_idx))
    # the float32 layer gives the same gradient bitwise; grad accumulates in float32
    ref = se.Embedding.from_pretrained(w.astype(F32), freeze=False, padding_idx=padding_idx,
                                       scale_grad_by_freq=scale, sparse=sparse)
    ref(ids)
    g32 = ref.backward(go)
    assert_array_equal(dense, g32.toarray() if sparse else g32)
    emb.backward(go)
    acc = emb.grad.toarray() if sparse else emb.grad
    assert acc.dtype == F32
    assert_allclose(acc, 2 * dense, rtol=1e-6)
    assert emb.weight.dtype == F16 and emb.weight is w


def test_functional_backward_float16_grad_output(rng):
    ids = rng.integers(0, N, size=12)
    go = rng.standard_normal((12, D)).astype(F16)
    g = F.embedding_backward(go, ids, N, padding_idx=1)
    assert g.dtype == F32
    assert_allclose(g, dense_backward(go.astype(F64), ids, N, 1), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ EmbeddingBag

BAG_CASES = [("sum", False), ("sum", True), ("mean", False), ("max", False)]


@pytest.mark.parametrize("mode,weighted", BAG_CASES)
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("sparse", [False, True])
def test_bag_pools_in_float32(rng, mode, weighted, padding_idx, sparse):
    w = table(rng)
    ids, offsets = bag_batch(rng, padding_idx=padding_idx)
    psw = rng.standard_normal(ids.shape).astype(F32) if weighted else None
    go = rng.standard_normal((len(offsets), D)).astype(F32)
    kw = dict(mode=mode, padding_idx=padding_idx, sparse=sparse)
    bag = se.EmbeddingBag.from_pretrained(w, freeze=False, **kw)
    ref = se.EmbeddingBag.from_pretrained(w.astype(F32), freeze=False, **kw)
    out = bag(ids, offsets, per_sample_weights=psw)
    out32 = ref(ids, offsets, per_sample_weights=psw)
    assert out.dtype == F16 and out.shape == (len(offsets), D)
    assert_array_equal(out, out32.astype(F16))  # pooled in float32, rounded once
    bounds = bag_starts(len(ids), offsets)
    exact = ref_bag(w, ids, bounds, mode, padding_idx, psw)
    assert_f16_close(out, exact, ulps=0.5 + 1e-3)
    assert not out[1].any()  # the empty bag
    g = bag.backward(go)
    g32 = ref.backward(go)
    dense, dense32 = (g.toarray(), g32.toarray()) if sparse else (g, g32)
    assert dense.dtype == F32
    assert_array_equal(dense, dense32)
    exact_g, exact_psw = ref_bag_grad(go, w, ids, bounds, mode, padding_idx, psw)
    assert_allclose(dense, exact_g, rtol=1e-5, atol=1e-5)
    if weighted:
        assert bag.per_sample_weights_grad.dtype == F32
        assert_array_equal(bag.per_sample_weights_grad, ref.per_sample_weights_grad)
        assert_allclose(bag.per_sample_weights_grad, exact_psw, rtol=1e-5, atol=1e-5)
    # the functional forms
    fw = w.copy()
    assert_array_equal(F.embedding_bag(ids, fw, offsets, mode=mode, padding_idx=padding_idx,
                                       per_sample_weights=psw), out)
    fg, fpsw = F.embedding_bag_backward(go, ids, fw, offsets, mode=mode, padding_idx=padding_idx,
                                        per_sample_weights=psw, sparse=sparse)
    assert_array_equal(fg.toarray() if sparse else fg, dense)
    if weighted:
        assert_array_equal(fpsw, bag.per_sample_weights_grad)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_layer_pools_float16_rows_without_planning_them(rng, mode):
    # the layer sorted each batch's ids before pooling float16 rows that the kernel
    # reads as they are (a frozen layer at inference too): 2-3x the functional
    # form's time (s31 sweep: D = 64, 2,048 bags of 32, 1.30 against 0.45 ms)
    bag = se.EmbeddingBag.from_pretrained(table(rng), freeze=False, mode=mode)
    ids = rng.integers(0, N, (6, 4))
    out = bag(ids)
    assert bag._saved["plan"] is None
    assert_array_equal(out, F.embedding_bag(ids, bag.weight, mode=mode))
    go = rng.standard_normal(out.shape).astype(F32)
    assert_allclose(bag.backward(go), ref_bag_grad(go, bag.weight, ids.reshape(-1),
                                                   [(b, b + 4) for b in range(0, 24, 4)], mode)[0],
                    rtol=1e-5, atol=1e-5)
    bad = ids.copy()
    bad[2, 1] = N
    with pytest.raises(IndexError, match=str(N)):
        bag(bad)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_2d_csr_input_and_max_norm(rng, mode):
    w = table(rng, scale=2.0)
    ids = rng.integers(0, N, size=(5, 4))
    ids[1, 0] = 0  # padding, renormalised like torch
    bag = se.EmbeddingBag.from_pretrained(w.copy(), mode=mode, max_norm=1.0, padding_idx=0)
    ref = se.EmbeddingBag.from_pretrained(w.astype(F32), mode=mode, max_norm=1.0, padding_idx=0)
    out = bag(ids)
    ref(ids)
    assert_array_equal(bag.weight, ref.weight.astype(F16))  # renormed in float32, rounded
    # pooled (in float32) from the rounded, renormed table
    assert_array_equal(out, F.embedding_bag(ids, bag.weight.astype(F32), mode=mode,
                                            padding_idx=0).astype(F16))
    assert_f16_close(bag.weight, ref_renorm(w.astype(F64), ids, 1.0, 2.0), ulps=0.5 + 1e-3)
    if mode == "sum":
        m = sp.csr_array((rng.random(6).astype(F32), [1, 4, 4, 7, 2, 9], [0, 2, 2, 6]),
                         shape=(3, N))
        bag2 = se.EmbeddingBag.from_pretrained(w, mode="sum")
        ref2 = se.EmbeddingBag.from_pretrained(w.astype(F32), mode="sum")
        assert_array_equal(bag2(m), ref2(m).astype(F16))


def test_bag_against_torch_float16(rng):
    """torch CPU pools float16 sums and maxima as we do; its mean (and renorm) round
    in float16 on the way, so there we only check that we are at least as accurate."""
    torch = pytest.importorskip("torch")
    w = table(rng, n=50, dim=8)
    ids = rng.integers(0, 50, size=400)
    offsets = np.arange(0, 400, 40)
    for mode in ("sum", "mean", "max"):
        ours = F.embedding_bag(ids, w, offsets, mode=mode)
        theirs = torch.nn.functional.embedding_bag(
            torch.from_numpy(ids), torch.from_numpy(w), torch.from_numpy(offsets), mode=mode
        ).numpy()
        assert theirs.dtype == ours.dtype == F16
        exact = F.embedding_bag(ids, w.astype(F64), offsets, mode=mode)
        if mode == "mean":
            err, terr = np.abs(ours - exact), np.abs(theirs.astype(F64) - exact)
            assert err.max() <= terr.max()
        else:
            assert_f16_close(ours, theirs.astype(F64), ulps=1.0)
            if mode == "max":
                assert_array_equal(ours, theirs)


def test_bag_sum_is_more_accurate_than_float16_accumulation(rng):
    """A long bag: one float32 sum rounded once stays within half an ulp of the exact
    sum; summing in float16 (torch CPU's way) drifts by many ulps."""
    w = (rng.random((N, D)) + 0.5).astype(F16)
    ids = rng.integers(0, N, size=2000)
    out = se.functional.embedding_bag(ids, w, np.array([0]), mode="sum")
    exact = w.astype(F64)[ids].sum(axis=0)
    assert_f16_close(out, exact, ulps=0.5 + 1e-3)
    naive = np.zeros(D, dtype=F16)
    for row in w[ids]:  # what low-precision accumulation gives
        naive = (naive + row).astype(F16)
    assert np.abs(naive.astype(F64) - exact).max() > 4 * ULP * np.abs(exact).max()


# ------------------------------------------------------------------ optimizers

CONFIGS = [
    ("SGD", dict(lr=0.1), False),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01), False),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), True),
    ("Adagrad", dict(lr=0.1), False),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3, weight_decay=0.01),
     True),
    ("SparseAdam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6), True),
    ("RowWiseAdagrad", dict(lr=0.1, weight_decay=0.02), False),
    ("RowWiseAdagrad", dict(lr=0.1), True),
]
STEPS = 3


def emb_batches(rng, steps=STEPS):
    return [(rng.integers(0, N, size=(5, 4)), rng.standard_normal((5, 4, D)).astype(F32))
            for _ in range(steps)]


def run(layer, opt, data, fused=False, round_to_f16=False, inputs=None):
    for ids, go in data:
        layer.zero_grad()
        layer(ids) if inputs is None else layer(*inputs(ids))
        if fused:
            assert layer.backward(go, optimizer=opt) is None
        else:
            layer.backward(go)
            opt.step()
        if round_to_f16:
            layer.weight[...] = layer.weight.astype(F16)


def state_arrays(opt):
    return {k: v for k, v in opt.state[0].items() if isinstance(v, np.ndarray)}


@pytest.mark.parametrize("name,kw,sparse", CONFIGS)
def test_optimizer_steps(rng, name, kw, sparse):
    w = table(rng)
    data = emb_batches(rng)
    emb = se.Embedding.from_pretrained(w.copy(), freeze=False, sparse=sparse, padding_idx=2)
    opt = getattr(se.optim, name)([emb], **kw)
    run(emb, opt, data)
    assert emb.weight.dtype == F16
    states = state_arrays(opt)
    assert len(states) == {"SGD": int("momentum" in kw), "SparseAdam": 2}.get(name, 1)
    assert all(a.dtype == F32 for a in states.values())
    # the same steps on a float32 copy of the table, rounded to float16 after each step
    ref = se.Embedding.from_pretrained(w.astype(F32), freeze=False, sparse=sparse, padding_idx=2)
    ref_opt = getattr(se.optim, name)([ref], **kw)
    run(ref, ref_opt, data, round_to_f16=True)
    assert_array_equal(emb.weight, ref.weight.astype(F16))
    for key, arr in state_arrays(ref_opt).items():
        assert_array_equal(states[key], arr)
    # a float64 numpy reference without any rounding: each step rounds once, by at most
    # half an ulp of the weight at that step
    w64, st = w.astype(F64), {}
    largest = np.abs(w64)
    for ids, go in data:
        rows, vals = row_grad(ids, go.astype(F64), N, padding_idx=2)
        if sparse:
            REFERENCE[name](w64, st, rows, vals, **kw)
        else:
            full = np.zeros((N, D))
            full[rows] = vals
            REFERENCE[name](w64, st, None, full, **kw)
        largest = np.maximum(largest, np.abs(w64))
    err = np.abs(emb.weight.astype(F64) - w64)
    assert np.all(err <= STEPS * ULP / 2 * largest * 1.01 + 1e-7), err.max()


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.5)), ("Adagrad", dict(lr=0.1)),
                                     ("RowWiseAdagrad", dict(lr=0.1))])
def test_dense_step_converts_in_blocks(rng, monkeypatch, name, kw):
    monkeypatch.setattr(_half, "BLOCK_ROWS", 4)  # N = 29: 8 blocks, the last partial
    w = table(rng)
    data = emb_batches(rng, steps=2)
    emb = se.Embedding.from_pretrained(w.copy(), freeze=False)
    run(emb, getattr(se.optim, name)([emb], **kw), data)
    ref = se.Embedding.from_pretrained(w.astype(F32), freeze=False)
    run(ref, getattr(se.optim, name)([ref], **kw), data, round_to_f16=True)
    assert_array_equal(emb.weight, ref.weight.astype(F16))


@pytest.mark.parametrize("name,kw,sparse", [c for c in CONFIGS if c[2]])
def test_fused_equals_two_step(rng, name, kw, sparse):
    w = table(rng)
    data = emb_batches(rng)
    a = se.Embedding.from_pretrained(w.copy(), freeze=False, sparse=True, scale_grad_by_freq=True)
    b = se.Embedding.from_pretrained(w.copy(), freeze=False, sparse=True, scale_grad_by_freq=True)
    opt_a, opt_b = getattr(se.optim, name)([a], **kw), getattr(se.optim, name)([b], **kw)
    run(a, opt_a, data)
    run(b, opt_b, data, fused=True)
    assert_array_equal(a.weight, b.weight)
    sa, sb = state_arrays(opt_a), state_arrays(opt_b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sb[key].dtype == F32
        assert_array_equal(sa[key], sb[key])


@pytest.mark.parametrize("mode,weighted", BAG_CASES)
def test_bag_fused_equals_two_step(rng, mode, weighted):
    w = table(rng)
    batches = [bag_batch(rng, padding_idx=0) for _ in range(STEPS)]
    psws = [rng.standard_normal(ids.shape).astype(F32) if weighted else None for ids, _ in batches]
    gos = [rng.standard_normal((len(off), D)).astype(F32) for _, off in batches]
    layers, opts = [], []
    for fused in (False, True):
        bag = se.EmbeddingBag.from_pretrained(w.copy(), freeze=False, mode=mode, sparse=True,
                                              padding_idx=0)
        opt = se.optim.SparseAdam([bag], lr=0.01)
        psw_grads = []
        for (ids, off), psw, go in zip(batches, psws, gos):
            bag.zero_grad()
            bag(ids, off, per_sample_weights=psw)
            if fused:
                bag.backward(go, optimizer=opt)
            else:
                bag.backward(go)
                opt.step()
            psw_grads.append(bag.per_sample_weights_grad)
        layers.append((bag, psw_grads))
        opts.append(opt)
    (a, pa), (b, pb) = layers
    assert_array_equal(a.weight, b.weight)
    assert a.weight.dtype == F16
    for key, arr in state_arrays(opts[0]).items():
        assert_array_equal(arr, state_arrays(opts[1])[key])
    for x, y in zip(pa, pb):
        assert_array_equal(x, y) if weighted else (x is None and y is None)
    # and equal to the float32 table rounded after every step
    ref = se.EmbeddingBag.from_pretrained(w.astype(F32), freeze=False, mode=mode, sparse=True,
                                          padding_idx=0)
    ref_opt = se.optim.SparseAdam([ref], lr=0.01)
    for (ids, off), psw, go in zip(batches, psws, gos):
        ref(ids, off, per_sample_weights=psw)
        ref.backward(go, optimizer=ref_opt)
        ref.weight[...] = ref.weight.astype(F16)
    assert_array_equal(b.weight, ref.weight.astype(F16))


def test_optimizer_state_dict_and_pickle(rng):
    w = table(rng)
    data = emb_batches(rng)
    emb = se.Embedding.from_pretrained(w.copy(), freeze=False, sparse=True)
    opt = se.optim.SparseAdam([emb], lr=0.01)
    run(emb, opt, data[:2])
    # pickle round trip of the layer and the optimizer together
    emb2, opt2 = pickle.loads(pickle.dumps((emb, opt)))
    assert emb2.weight.dtype == F16 and state_arrays(opt2)["exp_avg"].dtype == F32
    # state_dict / load_state_dict into fresh objects (a float64 state is cast to float32)
    emb3 = se.Embedding(N, D, sparse=True, dtype=np.float16)
    emb3.load_state_dict(copy.deepcopy(emb.state_dict()))
    assert emb3.weight.dtype == F16
    assert_array_equal(emb3.weight, emb.weight)
    opt3 = se.optim.SparseAdam([emb3], lr=0.01)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = {k: (v.astype(F64) if isinstance(v, np.ndarray) else v)
                      for k, v in sd["state"][0].items()}
    opt3.load_state_dict(sd)
    assert all(a.dtype == F32 for a in state_arrays(opt3).values())
    emb4 = copy.deepcopy(emb)
    opt4 = se.optim.SparseAdam([emb4], lr=0.01)
    opt4.load_state_dict(opt.state_dict())
    for e, o in ((emb, opt), (emb2, opt2), (emb3, opt3), (emb4, opt4)):
        run(e, o, data[2:])
    for e in (emb2, emb3, emb4):
        assert_array_equal(e.weight, emb.weight)


# ------------------------------------------------------------------ errors

def test_errors_leave_everything_unchanged(rng):
    w = table(rng, scale=3.0)
    emb = se.Embedding.from_pretrained(w.copy(), freeze=False, max_norm=1.0, sparse=True)
    before = emb.weight.copy()
    with pytest.raises(IndexError, match=f"index {N} at position 2 is out of range"):
        emb(np.array([0, 1, N]))
    assert_array_equal(emb.weight, before)
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([0.0, 1.0]))
    bag = se.EmbeddingBag.from_pretrained(w.copy(), max_norm=1.0)
    with pytest.raises(IndexError, match="index -1 at position 1"):
        bag(np.array([[0, -1]]))
    assert_array_equal(bag.weight, w)
    with pytest.raises(IndexError):
        F.embedding_renorm_(w, np.array([1, N + 3]), 1.0)
    with pytest.raises(ValueError, match="per_sample_weights"):
        F.embedding_bag(np.array([[1, 2]]), w, mode="mean", per_sample_weights=np.ones((1, 2)))
    emb(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="grad_output has shape"):
        emb.backward(np.ones((2, 2, D)))
    ro = w.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        se.Embedding.from_pretrained(ro, max_norm=1.0)(np.array([1]))
    with pytest.raises(ValueError, match="dtype must be float16, float32 or float64, got int16"):
        se.Embedding(3, 2, dtype=np.int16)
    # an optimizer step with a bad gradient writes nothing, to any layer
    opt = se.optim.Adagrad([emb], lr=0.1)
    emb.backward(np.ones((1, 2, D)))
    state_before = copy.deepcopy(opt.state)
    weight_before = emb.weight.copy()
    emb.grad = np.ones((N + 1, D), dtype=F32)
    with pytest.raises(ValueError, match="grad has shape"):
        opt.step()
    assert_array_equal(emb.weight, weight_before)
    assert opt.state == state_before
    # a float16 state array does not fit a float16 table (its state is float32)
    emb.grad = sp.csr_array(np.ones((N, D), dtype=F32))
    opt.step()
    opt.state[0]["sum"] = opt.state[0]["sum"].astype(F16)
    weight_before = emb.weight.copy()
    with pytest.raises(RuntimeError, match="float32"):
        opt.step()
    assert_array_equal(emb.weight, weight_before)


# ------------------------------------------------------------------ threads

def test_small_float16_jobs_run_on_one_thread(monkeypatch, rng):
    # the float16 helpers asked OpenMP for every thread, whatever the size: on a
    # virtual machine each wake-up of a sleeping worker costs ~0.1 ms, and a step of
    # 16 ids took 0.55 ms against float32's 0.08
    from sparsembed._kernels import _bag, _f16, _lookup, _plan

    seen = []
    for mod, name in ((_f16, "rows_to_float"), (_f16, "rows_from_float"), (_f16, "to_half"),
                      (_lookup, "gather"), (_lookup, "scatter_rows"), (_lookup, "renorm_rows"),
                      (_plan, "segment_of_entries"), (_bag, "per_sample_weights_grad")):
        kernel = getattr(mod, name)

        def spy(*args, _kernel=kernel, _name=name, **kwargs):
            seen.append((_name, args[-1] if isinstance(args[-1], int) else None))
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    se.set_num_threads(2)
    try:
        emb = se.Embedding(1000, 8, dtype=np.float16, sparse=True, max_norm=1.0, random_state=0)
        opt = se.optim.Adagrad([emb], lr=0.1)
        ids = rng.integers(0, 1000, 16)
        emb(ids)
        emb.backward(np.ones((16, 8), F32))
        opt.step()
        emb(ids)
        emb.backward(np.ones((16, 8), F32), optimizer=opt)
        bag = se.EmbeddingBag(1000, 8, mode="sum", dtype=np.float16, random_state=0)
        out = bag(ids.reshape(4, 4), per_sample_weights=np.ones((4, 4), F32))
        bag.backward(np.ones_like(out, dtype=F32))
        se.EmbeddingBag(1000, 8, mode="max", dtype=np.float16, random_state=0)(ids.reshape(4, 4))
    finally:
        se.set_num_threads(None)
    names = {name for name, _ in seen}
    assert {"rows_to_float", "rows_from_float", "to_half", "segment_of_entries",
            "renorm_rows", "per_sample_weights_grad"} <= names
    assert [t for _, t in seen if t is not None] and all(t == 1 for _, t in seen if t is not None)


def test_bitwise_equal_for_1_and_2_threads(rng, threads):
    w = table(rng, n=500, dim=32, scale=2.0)
    ids = rng.integers(0, 500, size=3000)
    offsets = np.sort(rng.integers(0, 3000, size=200))
    offsets[0] = 0
    psw = rng.standard_normal(3000).astype(F32)
    go = rng.standard_normal((3000, 32)).astype(F32)
    gob = rng.standard_normal((200, 32)).astype(F32)
    results = []
    for n in (1, 2):
        threads(n)
        out = {}
        emb = se.Embedding.from_pretrained(w.copy(), freeze=False, max_norm=2.0, sparse=True,
                                           padding_idx=7)
        opt = se.optim.Adagrad([emb], lr=0.1)
        out["emb"] = emb(ids)
        out["grad"] = emb.backward(go).toarray()
        opt.step()
        emb(ids)
        emb.backward(go, optimizer=opt)
        out["emb_w"], out["emb_s"] = emb.weight.copy(), opt.state[0]["sum"].copy()
        for mode, p in (("sum", psw), ("mean", None), ("max", None)):
            bag = se.EmbeddingBag.from_pretrained(w.copy(), freeze=False, mode=mode, sparse=True,
                                                  padding_idx=7, max_norm=2.0)
            bopt = se.optim.RowWiseAdagrad([bag], lr=0.1)
            out[mode] = bag(ids, offsets, per_sample_weights=p)
            out[mode + "_g"] = bag.backward(gob).toarray()
            out[mode + "_p"] = bag.per_sample_weights_grad
            bopt.step()
            bag(ids, offsets, per_sample_weights=p)
            bag.backward(gob, optimizer=bopt)
            out[mode + "_w"] = bag.weight.copy()
        dense = se.Embedding.from_pretrained(w.copy(), freeze=False)
        dopt = se.optim.SGD([dense], lr=0.1, momentum=0.9)
        dense(ids)
        dense.backward(go)
        dopt.step()
        out["dense_w"] = dense.weight.copy()
        results.append(out)
    for key in results[0]:
        a, b = results[0][key], results[1][key]
        if a is None:
            assert b is None
        else:
            assert a.dtype in (F16, F32), key
            assert_array_equal(a, b, err_msg=key)


# ------------------------------------------------------------------ conversion kernels

def _conversion_levels():
    """Every SIMD level of the _f16 conversions this CPU runs (portable C, F16C,
    AVX-512F), each set in turn; the level in use is restored after."""
    from sparsembed._kernels import _f16

    before = _f16.simd_level()
    try:
        for level in sorted({_f16.set_simd_level(lv) for lv in range(3)}):
            _f16.set_simd_level(level)
            yield level
    finally:
        _f16.set_simd_level(before)


@pytest.mark.parametrize("dim", [256, 7, 40])
def test_half_to_float_kernel_is_exact_for_every_bit_pattern(dim):
    # at every level (whole vectors and the portable tail), signalling NaNs included:
    # the hardware conversion would quiet them, so their vectors are not given to it
    from sparsembed._kernels import _f16

    bits = np.concatenate([np.arange(65536, dtype=np.uint16),
                           np.zeros(-65536 % dim, np.uint16)]).reshape(-1, dim)
    rows = np.arange(bits.shape[0] - 1, -1, -1, dtype=np.int64)
    expected = bits[::-1].view(F16).astype(F32)
    for level in _conversion_levels():
        out = np.empty(bits.shape, dtype=F32)
        _f16.rows_to_float(bits, rows, out, 2)
        assert_array_equal(out.view(np.uint32), expected.view(np.uint32), err_msg=str(level))


@pytest.mark.parametrize("n", [0, 5, 4096, 65536 + 4099])
def test_whole_array_half_to_float_kernel_is_exact(n):
    # every bit pattern (NaNs with payloads too) at every level, blocks and tails
    from sparsembed._kernels import _f16

    bits = np.resize(np.arange(65536, dtype=np.uint16)[::-1], n)
    expected = bits.view(F16).astype(F32)
    for level in _conversion_levels():
        for threads in (1, 2):
            out = np.empty(n, dtype=F32)
            _f16.to_float(bits, out, threads)
            assert_array_equal(out.view(np.uint32), expected.view(np.uint32),
                               err_msg=str((level, threads)))
    with pytest.raises(ValueError, match="must hold"):
        _f16.to_float(bits, np.empty(n + 1, F32), 1)


@pytest.mark.parametrize("sparse", [False, True])
def test_float16_grad_output_gives_the_float32_results(rng, sparse):
    # numpy's astype converted a float16 grad_output on one thread: most of a D = 300
    # backward's time (s31 sweep: 5.5 of 6.9 ms); the kernel gives the same bits
    ids = rng.integers(0, N, size=(7, 5))
    go = rng.integers(0, 65536, (7, 5, D)).astype(np.uint16).view(F16)
    go[np.isnan(go)] = 1.5
    for g in (go, go[:, ::-1], np.asfortranarray(go)):
        emb = se.Embedding.from_pretrained(table(rng), freeze=False, sparse=sparse, padding_idx=2)
        ref = copy.deepcopy(emb)
        emb(ids)
        ref(ids)
        got, want = emb.backward(g), ref.backward(g.astype(F32))
        if sparse:
            got, want = got.toarray(), want.toarray()
        assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    bag = se.EmbeddingBag.from_pretrained(table(rng), freeze=False, mode="mean")
    bag(ids)
    g = go[:, 0]
    assert_array_equal(bag.backward(g), copy.deepcopy(bag).backward(g.astype(F32)))


def test_float_to_half_kernel_matches_numpy_rounding(rng):
    from sparsembed._kernels import _f16

    # every float16 value, the float32 midpoints between neighbours (ties: to even) and
    # their float32 neighbours, the overflow and underflow edges, and a sweep of float32
    # bit patterns (subnormals, NaNs and infinities included)
    halves = np.arange(0x7c00, dtype=np.uint16).view(F16).astype(F64)
    mid = ((halves[:-1] + halves[1:]) / 2).astype(F32)
    edges = np.array([65504, 65519.99, 65520, 1e5, np.inf, np.nan, 2.0**-24, 2.0**-25,
                      2.0**-25 * 1.0000001, 2.0**-26, 1e-45, 0.0], dtype=F32)
    sweep = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(F32)
    x = np.concatenate([halves.astype(F32), mid, np.nextafter(mid, np.inf),
                        np.nextafter(mid, np.float32(0)), edges, sweep])
    # signalling NaNs with their payloads in the high and the low bits
    snan = np.array([0x7f800001, 0x7fa00000, 0x7fbfffff, 0xff800010], np.uint32).view(F32)
    x = np.concatenate([snan, x, -x])
    x = x[: x.size - x.size % 64].reshape(-1, 64)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(F16).view(np.uint16)
    assert np.isin(snan.view(np.uint32), x.view(np.uint32)).all()
    for level in _conversion_levels():
        out = np.empty(x.shape, dtype=np.uint16)
        _f16.to_half(x, out, 2)
        assert_array_equal(out, expected, err_msg=str(level))
        rows = rng.permutation(x.shape[0])
        dst = np.zeros(x.shape, dtype=np.uint16)
        _f16.rows_from_float(x, rows.astype(np.int64), dst, 2)
        assert_array_equal(dst[rows], expected, err_msg=str(level))
        odd = np.ascontiguousarray(x[:, :37])  # a tail past the last whole vector
        out = np.empty(odd.shape, dtype=np.uint16)
        _f16.to_half(odd, out, 2)
        assert_array_equal(out, expected[:, :37], err_msg=str(level))


@pytest.mark.parametrize("rows, shape, message", [
    ([0, 5], (2, 4), r"row 5 at position 1 is outside \[0, 5\)"),
    ([-1, 2], (2, 4), r"row -1 at position 0 is outside \[0, 5\)"),
    ([0, 1], (3, 4), r"float32 rows must be \(2, 4\), got \(3, 4\)"),
    ([0, 1], (2, 3), r"float32 rows must be \(2, 4\), got \(2, 3\)"),
])
def test_conversion_kernels_refuse_rows_outside_the_table(rows, shape, message):
    # they trusted their callers' rows and shapes; a bad row read or wrote past the
    # table with bounds checks off
    from sparsembed._kernels import _f16

    rows = np.array(rows, np.int64)
    bits = np.arange(20, dtype=np.uint16).reshape(5, 4)
    work = np.full(shape, 7.0, F32)
    with pytest.raises(ValueError, match=message):
        _f16.rows_to_float(bits, rows, work, 2)
    with pytest.raises(ValueError, match=message):
        _f16.rows_from_float(work, rows, bits, 2)
    assert_array_equal(bits, np.arange(20).reshape(5, 4))
    assert_array_equal(work, 7.0)
    with pytest.raises(ValueError, match=r"out must be \(3, 4\), got \(2, 4\)"):
        _f16.to_half(np.ones((3, 4), F32), bits[:2], 2)


def test_non_contiguous_tables_take_the_numpy_path(rng):
    wide = table(rng, dim=2 * D, scale=3.0)
    odd = wide[:, 1::2].copy()
    view = wide[:, ::2]
    rows = np.array([0, 3, 4, 9], dtype=np.int64)
    dense = view.copy()
    _half.renorm_rows_(view, rows, 1.0, 2.0)
    _half.renorm_rows_(dense, rows, 1.0, 2.0)
    assert_array_equal(view, dense)
    assert_array_equal(wide[:, 1::2], odd)
    assert np.all(np.linalg.norm(view[rows].astype(F64), axis=1) <= 1.0 + 2 * ULP)


def test_state_rows_move_through_kernels_or_numpy_alike():
    # the float32 state rows of a float16 table's step: compiled gather / scatter for
    # C-contiguous states, numpy for any other layout, the same rows either way
    s = np.arange(400, dtype=F32).reshape(100, 4)
    rows = np.array([1, 97, 3, 50], dtype=np.int64)
    work = -np.arange(16, dtype=F32).reshape(4, 4)
    for state in (s.copy(), np.asfortranarray(s)):
        assert_array_equal(_half._state_rows(state, rows), s[rows])
        _half._put_state(state, rows, work)
        expected = s.copy()
        expected[rows] = work
        assert_array_equal(state, expected)
    dummy = np.empty((0, 4), F32)
    assert _half._state_rows(dummy, rows) is dummy
