"""se.optim: parity with torch 2.13, numpy references, the fused path, state, threads, errors."""

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from reference_optim import REFERENCE, row_grad, train

import sparsembed as se

RTOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]
N, D = 23, 5

# torch warns about its own sparse tensors' invariant checks
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

# (optimizer name, kwargs) for every optimizer; SparseAdam only takes sparse layers
CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, nesterov=False)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3, eps=1e-6)),
    ("SparseAdam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
    ("RowWiseAdagrad", dict(lr=0.1, weight_decay=0.02)),
]


def batches(rng, steps, shape=(6, 7), n=N, dim=D):
    """Random batches over few ids (many duplicates) with their grad_outputs."""
    return [(rng.integers(0, n, size=shape), rng.standard_normal(shape + (dim,)))
            for _ in range(steps)]


def make(name, layers, **kw):
    return getattr(se.optim, name)(layers, **kw)


# -- parity with torch -------------------------------------------------------------

def _torch_run(torch, name, kw, w0, data, sparse, padding_idx, dtype):
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    temb = torch.nn.Embedding(N, D, padding_idx=padding_idx, sparse=sparse,
                              _weight=torch.tensor(w0, dtype=tdtype))
    topt = getattr(torch.optim, name)(temb.parameters(), **kw)
    for idx, go in data:
        topt.zero_grad()
        temb(torch.as_tensor(idx)).backward(torch.as_tensor(go, dtype=tdtype))
        topt.step()
    return temb.weight.detach().numpy()


TORCH_CASES = [
    ("SGD", dict(lr=0.1), True),
    ("SGD", dict(lr=0.1), False),
    ("SGD", dict(lr=0.05, momentum=0.9), False),
    ("SGD", dict(lr=0.05, momentum=0.5, weight_decay=0.1), False),
    ("SGD", dict(lr=0.05, momentum=0.7, dampening=0.4, weight_decay=0.1), False),
    ("SGD", dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.1), False),
    ("Adagrad", dict(lr=0.1), True),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5), True),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5,
                     weight_decay=0.05), False),
    ("SparseAdam", dict(lr=0.01), True),
    ("SparseAdam", dict(lr=0.02, betas=(0.5, 0.9), eps=1e-5), True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kw, sparse", TORCH_CASES)
def test_trajectory_matches_torch(name, kw, sparse, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((N, D)).astype(dtype)
    data = batches(rng, 7)
    for idx, _ in data[::2]:
        idx[0, :3] = 2  # padding entries
    expected = _torch_run(torch, name, kw, w0, data, sparse, 2, dtype)
    emb = se.Embedding(N, D, padding_idx=2, sparse=sparse, weight=w0.copy(), dtype=dtype)
    train(emb, make(name, [emb], **kw), data)
    assert_allclose(emb.weight, expected, rtol=RTOL[dtype], atol=RTOL[dtype])
    assert not np.array_equal(emb.weight, w0)


def test_sparse_adam_leaves_untouched_rows_alone():
    rng = np.random.default_rng(2)
    emb = se.Embedding(N, D, sparse=True, random_state=0, dtype=np.float64)
    w0 = emb.weight.copy()
    opt = se.optim.SparseAdam([emb], lr=0.1)
    data = [(rng.integers(0, 10, size=(4, 6)), rng.standard_normal((4, 6, D))) for _ in range(6)]
    data[3][0][...] = 0  # a batch touching row 0 only, between others
    train(emb, opt, data)
    touched = np.unique(np.concatenate([i.ravel() for i, _ in data]))
    untouched = np.setdiff1d(np.arange(N), touched)
    assert untouched.size > 5
    assert_array_equal(emb.weight[untouched], w0[untouched])
    assert not (emb.weight[touched] == w0[touched]).any(axis=1).all()
    st = opt.state_dict()["state"][0]
    assert st["step"] == 6
    assert (st["exp_avg"][untouched] == 0).all() and (st["exp_avg_sq"][untouched] == 0).all()


# -- numpy references ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kw, sparse", [(n, k, s) for n, k in CONFIGS for s in (True, False)
                                              if s or n != "SparseAdam"])
def test_steps_match_numpy_reference(name, kw, sparse, dtype):
    rng = np.random.default_rng(3)
    emb = se.Embedding(N, D, padding_idx=0, sparse=sparse, random_state=1, dtype=dtype,
                       scale_grad_by_freq=True)
    w = emb.weight.copy()
    opt = make(name, [emb], **kw)
    state = {}
    for idx, go in batches(rng, 6):
        go = go.astype(dtype)
        emb.zero_grad()
        emb(idx)
        emb.backward(go)
        opt.step()
        rows, values = row_grad(idx, go, N, padding_idx=0, scale_grad_by_freq=True)
        if not sparse:
            dense = np.zeros((N, D), dtype=dtype)
            dense[rows] = values
            rows, values = None, dense
        REFERENCE[name](w, state, rows, values, **kw)
    assert_allclose(emb.weight, w, rtol=RTOL[dtype], atol=RTOL[dtype])
    saved = opt.state_dict()["state"][0]
    for key, ref in state.items():
        assert_allclose(saved[key], ref, rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kw", CONFIGS)
def test_grad_inputs_noncontiguous_readonly_noncanonical(name, kw, dtype):
    """A hand-set grad: non-contiguous / read-only dense, or a non-canonical csr."""
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((N, D)).astype(dtype)
    big = rng.standard_normal((N, 2 * D))
    if name != "SparseAdam":
        layer = se.Embedding(N, D, weight=w0.copy(), dtype=dtype)
        g = big[:, ::2]  # float64, strided
        g.flags.writeable = False
        layer.grad = g
        make(name, [layer], **kw).step()
        w = w0.copy()
        REFERENCE[name](w, {}, None, g.astype(dtype), **kw)
        assert_allclose(layer.weight, w, rtol=RTOL[dtype], atol=RTOL[dtype])
        assert_array_equal(layer.grad, big[:, ::2])
    # csr with duplicate entries, missing columns, unsorted rows, read-only data
    r = np.array([7, 3, 7, 12, 3, 3])
    c = np.array([0, 4, 0, 2, 1, 4])
    v = rng.standard_normal(r.size)
    g = sp.csr_matrix((v, (r, c)), shape=(N, D))
    g.data.flags.writeable = False
    layer = se.Embedding(N, D, weight=w0.copy(), dtype=dtype, sparse=True)
    layer.grad = g
    make(name, [layer], **kw).step()
    dense = np.zeros((N, D))
    np.add.at(dense, (r, c), v)
    rows = np.array([3, 7, 12])
    w = w0.copy()
    REFERENCE[name](w, {}, rows, dense[rows].astype(dtype), **kw)
    assert_allclose(layer.weight, w, rtol=RTOL[dtype], atol=RTOL[dtype])


def test_lazy_sparse_sgd_and_decay_touch_only_batch_rows():
    rng = np.random.default_rng(5)
    emb = se.Embedding(N, D, sparse=True, random_state=0, dtype=np.float64)
    w0 = emb.weight.copy()
    opt = se.optim.SGD([emb], lr=0.1, momentum=0.9, weight_decay=0.1)
    data = [(rng.integers(0, 8, size=(5,)), rng.standard_normal((5, D))) for _ in range(2)]
    data.append((np.array([20, 20]), rng.standard_normal((2, D))))
    train(emb, opt, data)
    untouched = np.setdiff1d(np.arange(N), np.concatenate([i for i, _ in data]))
    assert_array_equal(emb.weight[untouched], w0[untouched])
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert (buf[untouched] == 0).all()


# -- the fused path --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kw", CONFIGS)
def test_fused_equals_backward_then_step(name, kw, dtype):
    rng = np.random.default_rng(6)
    data = batches(rng, 6)
    for idx, _ in data:
        idx[1, :2] = 4  # padding
    layers = []
    for fused in (False, True):
        emb = se.Embedding(N, D, padding_idx=4, scale_grad_by_freq=True, sparse=True,
                           random_state=3, dtype=dtype)
        opt = make(name, [emb], **kw)
        train(emb, opt, data, fused=fused)
        layers.append((emb, opt))
    (a, oa), (b, ob) = layers
    assert b.grad is None
    assert_allclose(b.weight, a.weight, rtol=RTOL[dtype] / 10, atol=RTOL[dtype] / 10)
    sa, sb = oa.state_dict()["state"][0], ob.state_dict()["state"][0]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_allclose(sb[key], sa[key], rtol=RTOL[dtype] / 10, atol=RTOL[dtype] / 10)


@pytest.mark.parametrize("name, kw", [c for c in CONFIGS if c[0] != "SparseAdam"])
def test_fused_on_dense_layer_is_the_sparse_update(name, kw):
    """A dense layer's fused update equals a step on the same gradient in sparse form."""
    rng = np.random.default_rng(7)
    data = batches(rng, 4)
    a = se.Embedding(N, D, random_state=5, dtype=np.float64)
    b = se.Embedding(N, D, random_state=5, dtype=np.float64, sparse=True)
    old = np.ones((N, D))
    a.grad = old
    oa, ob = make(name, [a], **kw), make(name, [b], **kw)
    for idx, go in data:
        a(idx)
        assert a.backward(go, optimizer=oa) is None
        b.zero_grad()
        b(idx)
        b.backward(go)
        ob.step()
    assert a.grad is old and (old == 1).all()  # grad left untouched
    assert_allclose(a.weight, b.weight, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("not_an_optimizer", ["sgd", object(), se.optim.SGD],
                         ids=["str", "object", "class"])
@pytest.mark.parametrize("make", [
    lambda: se.Embedding(N, D, sparse=True, random_state=0),
    lambda: se.EmbeddingBag(N, D, mode="sum", sparse=True, random_state=0),
    lambda: se.HashEmbedding(N, D, random_state=0),
], ids=["Embedding", "EmbeddingBag", "HashEmbedding"])
def test_fused_backward_refuses_what_is_not_an_optimizer(make, not_an_optimizer):
    # was an AttributeError about a private method (HashEmbedding alone checked)
    layer = make()
    out = layer(np.array([[1, 2]]))
    w0 = layer.weight.copy()
    with pytest.raises(TypeError, match=r"optimizer must be a sparsembed.optim optimizer "
                                        r"\(SGD, Adagrad, SparseAdam, RowWiseAdagrad\), got"):
        layer.backward(np.ones_like(out), optimizer=not_an_optimizer)
    assert_array_equal(layer.weight, w0)
    assert layer.grad is None


def test_fused_skips_frozen_and_checks_membership():
    rng = np.random.default_rng(8)
    idx, go = batches(rng, 1)[0]
    emb = se.Embedding(N, D, sparse=True, random_state=0)
    other = se.Embedding(N, D, sparse=True, random_state=1)
    opt = se.optim.Adagrad([emb])
    w0 = other.weight.copy()
    other(idx)
    with pytest.raises(ValueError, match="not among"):
        other.backward(go, optimizer=opt)
    assert_array_equal(other.weight, w0)
    assert other.grad is None
    emb.requires_grad = False
    w0 = emb.weight.copy()
    emb(idx)
    assert emb.backward(go, optimizer=opt) is None
    assert_array_equal(emb.weight, w0)
    assert opt.state == {}
    with pytest.raises(ValueError, match="shape"):
        emb.backward(go[:, :2], optimizer=opt)


def test_fused_kernel_src_and_scale():
    """The kernel's entry->source map and per-entry scale (the bag layers' hooks)."""
    from sparsembed import _cpu

    rng = np.random.default_rng(9)
    ids = np.array([3, 1, 3, 3, 7, 1])
    src = np.array([0, 0, 1, 2, 2, 2])  # entry -> grad row (bag of each entry)
    scale = rng.uniform(0.5, 2.0, size=6)
    grad = rng.standard_normal((3, D))
    for count, with_src in ((False, True), (True, True), (False, False), (True, False)):
        emb = se.Embedding(N, D, sparse=True, random_state=2, dtype=np.float64)
        w = emb.weight.copy()
        opt = se.optim.Adagrad([emb], lr=0.5)
        plan = _cpu.plan_rows(ids, N)
        g = grad if with_src else grad[src]
        opt._fused_update(emb, g, plan, count, src=src if with_src else None, scale=scale)
        vals = grad[src] * scale[:, None]
        rows, values = row_grad(ids, vals, N, scale_grad_by_freq=count)
        REFERENCE["Adagrad"](w, {}, rows, values, lr=0.5)
        assert_allclose(emb.weight, w, rtol=1e-13)


# -- frozen / no grad / zero_grad --------------------------------------------------------

def test_frozen_and_gradless_layers_are_skipped():
    a = se.Embedding(N, D, random_state=0)
    b = se.Embedding(N, D, random_state=1)
    c = se.Embedding(N, D, random_state=2)
    a.grad = np.ones((N, D), np.float32)
    b.grad = np.ones((N, D), np.float32)
    b.requires_grad = False
    w = [x.weight.copy() for x in (a, b, c)]
    opt = se.optim.SGD([a, b, c], lr=0.5)
    opt.step()
    assert_allclose(a.weight, w[0] - 0.5)
    assert_array_equal(b.weight, w[1])
    assert_array_equal(c.weight, w[2])
    assert list(opt.state) == [0]
    opt.zero_grad()
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("streamed", [False, True])
def test_zero_grad_keeps_dense_gradients_zeroed_in_place(streamed, monkeypatch):
    # set_to_none=False: a dense grad is zeroed in place (the same array, any dtype
    # and layout), a sparse one dropped, as torch drops sparse grads
    from sparsembed import _cpu

    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0 if streamed else 1 << 62)
    layers = [se.Embedding(N, D, random_state=i) for i in range(5)]
    grads = [np.full((N, D), 3, np.float32), np.full((N, D), -2.5, np.float64),
             np.asfortranarray(np.full((N, D), 1, np.float32)),
             np.full((N, D), 1, np.float16)]
    for layer, g in zip(layers, grads):
        layer.grad = g
    layers[4].grad = sp.csr_array(np.ones((N, D), np.float32))
    opt = se.optim.SGD(layers, lr=0.5)
    for threads in (1, 2):
        se.set_num_threads(threads)
        try:
            for g in grads:
                g[...] = 7
            opt.zero_grad(set_to_none=False)
        finally:
            se.set_num_threads(None)
        for layer, g in zip(layers, grads):
            assert layer.grad is g and not g.any() and not np.signbit(g).any()
        assert layers[4].grad is None
    opt.zero_grad()
    assert all(layer.grad is None for layer in layers)


def test_step_closure_and_param_groups():
    a = se.Embedding(N, D, random_state=0, dtype=np.float64)
    b = se.Embedding(N, D, random_state=1, dtype=np.float64)
    wa, wb = a.weight.copy(), b.weight.copy()
    opt = se.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.25}], lr=0.5)
    a.grad = np.ones((N, D))
    b.grad = np.ones((N, D))
    assert opt.step(lambda: 3.0) == 3.0
    assert_allclose(a.weight, wa - 0.5)
    assert_allclose(b.weight, wb - 0.25)
    opt.param_groups[1]["lr"] = 1.0  # schedules change hyper-parameters between steps
    opt.step()
    assert_allclose(b.weight, wb - 1.25)
    assert "Parameter Group 1" in repr(opt)


# -- state_dict / pickle / resume -------------------------------------------------------

@pytest.mark.parametrize("how", ["state_dict", "pickle"])
@pytest.mark.parametrize("name, kw", CONFIGS)
def test_resume_equals_uninterrupted(name, kw, how):
    rng = np.random.default_rng(10)
    data = batches(rng, 8)

    def fresh():
        emb = se.Embedding(N, D, sparse=True, random_state=4)
        return emb, make(name, [emb], **kw)

    ref, ref_opt = fresh()
    train(ref, ref_opt, data)

    emb, opt = fresh()
    train(emb, opt, data[:4], fused=True)
    if how == "state_dict":
        saved = pickle.loads(pickle.dumps((emb.state_dict(), opt.state_dict())))
        emb, opt = fresh()
        opt.param_groups[0]["lr"] = 123.0  # restored from the state dict
        emb.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
        assert opt.param_groups[0]["lr"] == kw["lr"]
    else:
        emb, opt = pickle.loads(pickle.dumps((emb, opt)))
        emb.zero_grad()
    train(emb, opt, data[4:])
    assert_array_equal(emb.weight, ref.weight)
    for key, value in ref_opt.state_dict()["state"][0].items():
        assert_array_equal(opt.state_dict()["state"][0][key], value)


def test_state_dict_layout_and_deepcopy():
    emb = se.Embedding(N, D, sparse=True, random_state=0)
    opt = se.optim.Adagrad([emb], lr=0.1, initial_accumulator_value=0.5)
    assert opt.state_dict() == {"state": {}, "param_groups": [
        {"lr": 0.1, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.5,
         "eps": 1e-10, "params": [0]}]}
    emb(np.array([1, 2, 2]))
    emb.backward(np.ones((3, D)))
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 1
    s = sd["state"][0]["sum"]
    assert s.dtype == np.float32 and s.shape == (N, D)
    assert_allclose(s[[0, 1, 2]], [[0.5] * D, [1.5] * D, [4.5] * D])
    snap = copy.deepcopy(sd)
    opt.step()
    assert not np.array_equal(snap["state"][0]["sum"], opt.state_dict()["state"][0]["sum"])
    r = se.optim.RowWiseAdagrad([emb])
    r.step()
    assert r.state_dict()["state"][0]["sum"].shape == (N,)


def test_load_state_dict_errors_change_nothing():
    emb = se.Embedding(N, D, sparse=True, random_state=0)
    opt = se.optim.SparseAdam([emb])
    emb(np.array([1, 2]))
    emb.backward(np.ones((2, D)))
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg"] = np.zeros((N + 1, D))
    with pytest.raises(ValueError, match=r"shape \(24, 5\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["params"] = [0, 1]
    with pytest.raises(ValueError, match="doesn't match"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="1.5"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["maximize"] = True  # torch's, not ours: not dropped silently
    with pytest.raises(ValueError, match=r"unknown hyper-parameters in a parameter group: "
                                         r"\['maximize'\]"):
        opt.load_state_dict(bad)
    assert "maximize" not in opt.param_groups[0]
    assert_array_equal(opt.state[0]["exp_avg"], good["state"][0]["exp_avg"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


# -- threads ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw", CONFIGS)
def test_bitwise_equal_for_1_and_2_threads(name, kw, threads):
    rng = np.random.default_rng(11)
    data = batches(rng, 4, shape=(40, 30), n=300, dim=16)
    results = []
    for n in (1, 2):
        threads(n)
        out = []
        for fused, sparse in ((False, True), (True, True), (False, name == "SparseAdam")):
            emb = se.Embedding(300, 16, sparse=sparse, random_state=7,
                               scale_grad_by_freq=True)
            train(emb, make(name, [emb], **kw), data, fused=fused)
            out.append(emb.weight)
        results.append(out)
    for a, b in zip(*results):
        assert_array_equal(a, b)


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, match", [
    ("SGD", dict(lr=-0.1), "-0.1"),
    ("SGD", dict(lr=0.1, momentum=-0.5), "-0.5"),
    ("SGD", dict(lr=0.1, weight_decay=-1.0), "-1.0"),
    ("SGD", dict(lr=float("nan")), "nan"),
    ("SGD", dict(lr="0.1"), "'0.1'"),
    ("SGD", dict(lr=0.1, dampening=-0.1), "-0.1"),
    ("SGD", dict(lr=0.1, nesterov=True), "Nesterov.*momentum=0.0"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov="yes"), "'yes'"),
    ("Adagrad", dict(lr=-1.0), "-1.0"),
    ("Adagrad", dict(lr_decay=-0.25), "-0.25"),
    ("Adagrad", dict(weight_decay=-2.0), "-2.0"),
    ("Adagrad", dict(eps=-1e-3), "-0.001"),
    ("Adagrad", dict(initial_accumulator_value=-3.0), "-3.0"),
    ("SparseAdam", dict(lr=-1e-3), "-0.001"),
    ("SparseAdam", dict(lr=0.0), "0.0"),
    ("SparseAdam", dict(eps=-1.0), "-1.0"),
    ("SparseAdam", dict(betas=(1.0, 0.9)), "1.0"),
    ("SparseAdam", dict(betas=(0.9, -0.1)), "-0.1"),
    ("SparseAdam", dict(betas=0.9), "0.9"),
    ("RowWiseAdagrad", dict(lr=-5.0), "-5.0"),
    ("RowWiseAdagrad", dict(eps=-1.0), "-1.0"),
    ("RowWiseAdagrad", dict(weight_decay=-0.5), "-0.5"),
])
def test_bad_hyperparameters(name, kw, match):
    emb = se.Embedding(N, D, sparse=True)
    with pytest.raises(ValueError, match=match):
        make(name, [emb], **kw)


@pytest.mark.parametrize("params, match", [
    ([], "empty"),
    ([object()], "object"),
    ([np.zeros((3, 2))], "ndarray"),
    (5, "int"),
    (None, "NoneType"),
])
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        se.optim.SGD(params, lr=0.1)


def test_bad_params_layer_and_duplicates():
    emb = se.Embedding(N, D)
    with pytest.raises(ValueError, match="single"):
        se.optim.SGD(emb, lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        se.optim.SGD([emb, emb], lr=0.1)
    with pytest.raises(ValueError, match="SparseAdam does not support dense gradients"):
        se.optim.SparseAdam([emb])


def test_bad_grads_change_nothing():
    a = se.Embedding(N, D, sparse=True, random_state=0)
    b = se.Embedding(N, D, sparse=True, random_state=1)
    opt = se.optim.SparseAdam([a, b])
    a(np.array([1, 2]))
    a.backward(np.ones((2, D)))
    wa, wb = a.weight.copy(), b.weight.copy()
    b.grad = np.ones((N, D), np.float32)  # dense grad on a SparseAdam layer
    with pytest.raises(ValueError, match="SparseAdam does not support dense gradients"):
        opt.step()
    b.grad = sp.csr_array((N + 1, D))
    with pytest.raises(ValueError, match=r"shape \(24, 5\)"):
        opt.step()
    b.grad = "grad"
    with pytest.raises(TypeError, match="str"):
        opt.step()
    for dtype in (np.int64, np.complex64):  # as a dense grad is refused (complex: not
        # cast with only a warning that drops its imaginary part)
        b.grad = sp.csr_array(np.ones((N, D), dtype))
        with pytest.raises(TypeError, match=f"grad must be a float array, got dtype "
                                            f"{np.dtype(dtype)}"):
            opt.step()
    assert_array_equal(a.weight, wa)
    assert_array_equal(b.weight, wb)
    assert opt.state == {}
    c = se.Embedding(N, D)
    c.weight.flags.writeable = False
    c.grad = np.ones((N, D), np.float32)
    with pytest.raises(ValueError, match="writable"):
        se.optim.SGD([c], lr=1.0).step()


@pytest.mark.parametrize("name, kw", CONFIGS)
def test_empty_tables_and_all_padding_batches(name, kw):
    for n, d in ((0, 3), (4, 0)):
        emb = se.Embedding(n, d, sparse=True)
        opt = make(name, [emb], **kw)
        idx = np.array([1, 2]) if n else np.zeros(0, np.int64)
        emb(idx)
        emb.backward(np.ones(idx.shape + (d,)))
        opt.step()
        emb(idx)
        emb.backward(np.ones(idx.shape + (d,)), optimizer=opt)
    emb = se.Embedding(N, D, sparse=True, padding_idx=0, random_state=0)
    w0 = emb.weight.copy()
    opt = make(name, [emb], **kw)
    emb(np.zeros((3, 2), np.int64))
    emb.backward(np.ones((3, 2, D)))
    opt.step()
    emb(np.zeros(4, np.int64))
    emb.backward(np.ones((4, D)), optimizer=opt)
    assert_array_equal(emb.weight, w0)
    assert opt.state_dict()["state"][0]["step"] == 2  # torch counts empty steps too


def test_property_fused_equals_two_step_and_reference():
    """Random shapes, duplicates, padding and empty batches (hypothesis)."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=20, deadline=None, derandomize=True)
    @hyp.given(n=st.integers(1, 12), d=st.integers(1, 7), batch=st.integers(0, 25),
               padding=st.one_of(st.none(), st.integers(0, 11)), freq=st.booleans(),
               which=st.integers(0, len(CONFIGS) - 1), seed=st.integers(0, 2**16))
    def check(n, d, batch, padding, freq, which, seed):
        if padding is not None and padding >= n:
            padding = None
        name, kw = CONFIGS[which]
        rng = np.random.default_rng(seed)
        w0 = rng.standard_normal((n, d))
        layers = [se.Embedding(n, d, padding_idx=padding, scale_grad_by_freq=freq,
                               sparse=True, weight=w0.copy(), dtype=np.float64)
                  for _ in range(2)]
        opts = [make(name, [layer], **kw) for layer in layers]
        w, state = w0.copy(), {}
        for _ in range(2):
            idx = rng.integers(0, n, size=batch)
            go = rng.standard_normal((batch, d))
            for layer, opt, fused in zip(layers, opts, (False, True)):
                layer.zero_grad()
                layer(idx)
                if fused:
                    layer.backward(go, optimizer=opt)
                else:
                    layer.backward(go)
                    opt.step()
            rows, values = row_grad(idx, go, n, padding, freq)
            REFERENCE[name](w, state, rows, values, **kw)
        assert_allclose(layers[0].weight, w, rtol=1e-12, atol=1e-12)
        assert_allclose(layers[1].weight, w, rtol=1e-12, atol=1e-12)

    check()


@pytest.mark.parametrize("name, kw", CONFIGS)
def test_apply_rows_equals_step_on_the_csr(name, kw):
    rng = np.random.default_rng(12)
    rows = np.array([1, 4, 5, 17])
    values = rng.standard_normal((4, D))
    a = se.Embedding(N, D, sparse=True, random_state=0, dtype=np.float64)
    b = se.Embedding(N, D, sparse=True, random_state=0, dtype=np.float64)
    oa, ob = make(name, [a], **kw), make(name, [b], **kw)
    a.grad = sp.csr_array((values.ravel(), np.tile(np.arange(D), 4),
                           np.repeat(np.searchsorted(rows, np.arange(N + 1)) * D, 1)),
                          shape=(N, D))
    oa.step()
    ob._apply_rows(b, rows, values)
    assert_array_equal(b.weight, a.weight)
    with pytest.raises(ValueError, match="do not fit"):
        ob._apply_rows(b, np.array([3, N]), values[:2])
    with pytest.raises(ValueError, match="argmax needs src"):
        from sparsembed import _cpu
        ob._fused_update(b, values, _cpu.plan_rows(rows, N), argmax=np.zeros((4, D), np.int64))


def test_state_that_does_not_fit_changes_nothing():
    a = se.Embedding(N, D, random_state=0)
    b = se.Embedding(N, D, random_state=1)
    opt = se.optim.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad = np.ones((N, D), np.float32)
    b.grad = np.ones((N, D), np.float32)
    opt.step()
    opt.state[1]["momentum_buffer"] = np.zeros((N, D))  # float64 for a float32 table
    wa, wb, buf = a.weight.copy(), b.weight.copy(), opt.state[0]["momentum_buffer"].copy()
    with pytest.raises(RuntimeError, match="momentum_buffer.*param 1"):
        opt.step()
    assert_array_equal(a.weight, wa)
    assert_array_equal(b.weight, wb)
    assert_array_equal(opt.state[0]["momentum_buffer"], buf)
    assert opt.state[0]["step"] == 1


@pytest.mark.parametrize("name, kw", [c for c in CONFIGS if c[0] != "SGD" or "momentum" in c[1]])
@pytest.mark.parametrize("fail_at", [0, 1])
def test_state_that_cannot_be_allocated_changes_nothing(name, kw, fail_at, monkeypatch):
    # step() made each table's state just before updating that table, so a
    # MemoryError for the second table's state came after the first had been
    # updated: a retry then updated it twice
    layers = [se.Embedding(N, D, sparse=True, random_state=0),
              se.Embedding(2 * N, D, sparse=True, random_state=1)]
    twins = copy.deepcopy(layers)
    opt, twin_opt = make(name, layers, **kw), make(name, twins, **kw)
    for emb in layers + twins:
        emb(np.array([1, 3, 3, 7]))
        emb.backward(np.ones((4, D), np.float32))
    calls = []
    real = type(opt)._new_state_array

    def allocate(self, key, group, shape, dtype, xp=np):
        calls.append(key)
        if shape[0] == layers[1].num_embeddings and len(calls) > fail_at:
            raise MemoryError("no room for the state")
        return real(self, key, group, shape, dtype, xp)

    monkeypatch.setattr(type(opt), "_new_state_array", allocate)
    weights = [emb.weight.copy() for emb in layers]
    with pytest.raises(MemoryError):
        opt.step()
    for emb, w in zip(layers, weights):
        assert_array_equal(emb.weight, w)
    assert opt.state == {}
    monkeypatch.undo()
    opt.step()
    twin_opt.step()
    for emb, twin in zip(layers, twins):
        assert_array_equal(emb.weight, twin.weight)
    assert opt.state[0]["step"] == opt.state[1]["step"] == 1


def test_a_failed_update_drops_the_new_state_of_the_tables_after_it(monkeypatch):
    # step() allocated every table's state first; when the first table's update then
    # raised, the second kept fresh state it never used, and a retry took its
    # momentum buffer as an old one (SGD's first step with dampening is buf = g)
    from sparsembed import _cpu

    def layer(seed):
        emb = se.Embedding(N, D, sparse=True, random_state=seed)
        emb(np.array([1, 2, 3]))
        emb.backward(np.ones((3, D), np.float32))
        return emb

    a, b, twin = layer(0), layer(1), layer(1)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    opt = se.optim.SGD([a, b], **kw)
    se.optim.SGD([twin], **kw).step()
    real, calls = _cpu.optim_update_rows, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("the first table's temporaries")
        return real(*args, **kwargs)

    monkeypatch.setattr(_cpu, "optim_update_rows", fails_once)
    with pytest.raises(MemoryError):
        opt.step()
    assert opt.state == {}
    opt.step()
    assert_array_equal(b.weight, twin.weight)


def test_hash_fused_backward_allocates_both_states_before_writing(monkeypatch):
    # the importance table was updated before the bucket table's state was made: a
    # MemoryError there left a half-applied update (a retry updated importance twice)
    def make():
        h = se.HashEmbedding(50, 4, num_hashes=2, mode="weighted", sparse=True,
                             random_state=0)
        return h, se.optim.Adagrad([h, h.importance], lr=0.1)

    (h, opt), (twin, twin_opt) = make(), make()
    ids, weights = np.array([1, 2, 3, 7]), h.weight.copy()
    importance = h.importance.weight.copy()
    real = se.optim.Adagrad._new_state_array

    def no_room_for_buckets(self, key, group, shape, dtype, xp=np):
        if shape == h.weight.shape:
            raise MemoryError("the bucket table's state")
        return real(self, key, group, shape, dtype, xp)

    out = h(ids)
    monkeypatch.setattr(se.optim.Adagrad, "_new_state_array", no_room_for_buckets)
    with pytest.raises(MemoryError):
        h.backward(np.ones_like(out), optimizer=opt)
    assert_array_equal(h.weight, weights)
    assert_array_equal(h.importance.weight, importance)
    assert opt.state == {}
    monkeypatch.undo()
    h.backward(np.ones_like(out), optimizer=opt)
    twin.backward(np.ones_like(twin(ids)), optimizer=twin_opt)
    assert_array_equal(h.weight, twin.weight)
    assert_array_equal(h.importance.weight, twin.importance.weight)


@pytest.mark.parametrize("name, kw", CONFIGS)
@pytest.mark.parametrize("alias", ["weight", "state"])
def test_fused_grad_output_sharing_the_table_or_state(name, kw, alias):
    # the fused update read grad_output's rows after it had written them when they
    # were the table's (or a state array's) own memory: not backward + step
    V, D = 64, 8
    results = []
    for fused in (False, True):
        w = np.random.default_rng(0).standard_normal((V, D)).astype(np.float32)
        emb = se.Embedding.from_pretrained(w, freeze=False, sparse=True)
        opt = make(name, [emb], **kw)
        emb(np.arange(V))
        emb.backward(np.ones((V, D), np.float32))
        opt.step()  # the state exists now
        emb.zero_grad()
        emb(np.roll(np.arange(V), 1))
        state = [a for a in opt.state[0].values() if isinstance(a, np.ndarray)
                 and a.shape == (V, D)]
        if alias == "state" and not state:
            pytest.skip("no (V, D) state array to share")
        g = emb.weight if alias == "weight" else state[0]
        if fused:
            emb.backward(g, optimizer=opt)
        else:
            emb.backward(g.copy())
            opt.step()
        results.append(emb.weight.copy())
    assert_array_equal(results[1], results[0])
