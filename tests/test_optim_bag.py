"""se.optim with EmbeddingBag: the fused backward+update, and a torch trajectory."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import sparsembed as se

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

RTOL = {np.float32: 1e-6, np.float64: 1e-13}
N, D = 19, 6
CONFIGS = [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.3, weight_decay=0.1)),
    ("SparseAdam", dict(lr=0.01, betas=(0.8, 0.99))),
    ("RowWiseAdagrad", dict(lr=0.1, weight_decay=0.02)),
]


def bag_batches(rng, steps, mode):
    """1-D ids with offsets (some bags empty, padding id 3 inside), psw in sum mode."""
    out = []
    for _ in range(steps):
        ids = rng.integers(0, 9, size=30)
        ids[::7] = 3
        offsets = np.sort(rng.integers(0, 31, size=7))
        offsets[0] = 0
        psw = rng.uniform(-1, 2, size=30) if mode == "sum" else None
        out.append((ids, offsets, psw, rng.standard_normal((7, D))))
    return out


def train(bag, opt, data, fused):
    for ids, offsets, psw, go in data:
        bag.zero_grad()
        bag(ids, offsets, per_sample_weights=psw)
        if fused:
            assert bag.backward(go, optimizer=opt) is None
        else:
            bag.backward(go)
            opt.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("name, kw", CONFIGS)
def test_bag_fused_equals_backward_then_step(name, kw, mode, dtype):
    rng = np.random.default_rng(0)
    data = bag_batches(rng, 5, mode)
    results = []
    for fused in (False, True):
        bag = se.EmbeddingBag(N, D, mode=mode, sparse=True, padding_idx=3,
                              scale_grad_by_freq=True, random_state=1, dtype=dtype)
        opt = getattr(se.optim, name)([bag], **kw)
        train(bag, opt, data, fused)
        results.append((bag, opt))
    (a, oa), (b, ob) = results
    assert b.grad is None
    assert_allclose(b.weight, a.weight, rtol=RTOL[dtype], atol=RTOL[dtype])
    if mode == "sum":
        assert_allclose(b.per_sample_weights_grad, a.per_sample_weights_grad,
                        rtol=RTOL[dtype], atol=RTOL[dtype])
    for key, value in oa.state_dict()["state"][0].items():
        assert_allclose(ob.state_dict()["state"][0][key], value,
                        rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_fused_thread_determinism(mode, threads):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 200, size=(300, 20))
    go = rng.standard_normal((300, 16))
    out = []
    for n in (1, 2):
        threads(n)
        bag = se.EmbeddingBag(200, 16, mode=mode, sparse=True, random_state=0)
        opt = se.optim.SparseAdam([bag])
        for _ in range(2):
            bag(ids)
            bag.backward(go, optimizer=opt)
        out.append(bag.weight)
    assert_array_equal(out[0], out[1])


def test_bag_fused_frozen_and_foreign():
    bag = se.EmbeddingBag(N, D, mode="sum", sparse=True, random_state=0)
    opt = se.optim.Adagrad([se.EmbeddingBag(N, D, sparse=True)])
    w0 = bag.weight.copy()
    bag(np.array([[1, 2], [2, 2]]))
    with pytest.raises(ValueError, match="not among"):
        bag.backward(np.ones((2, D)), optimizer=opt)
    opt = se.optim.Adagrad([bag])
    bag.requires_grad = False
    assert bag.backward(np.ones((2, D)), optimizer=opt) is None
    assert_array_equal(bag.weight, w0)
    assert bag.grad is None and opt.state == {}


@pytest.mark.parametrize("name, kw", [("SparseAdam", dict(lr=0.01)),
                                      ("Adagrad", dict(lr=0.1, lr_decay=0.1))])
def test_bag_trajectory_matches_torch(name, kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((N, D))
    data = [(rng.integers(0, N, size=(8, 5)), rng.standard_normal((8, D))) for _ in range(6)]
    tbag = torch.nn.EmbeddingBag(N, D, mode="mean", sparse=True, padding_idx=0,
                                 _weight=torch.tensor(w0))
    topt = getattr(torch.optim, name)(tbag.parameters(), **kw)
    bag = se.EmbeddingBag(N, D, mode="mean", sparse=True, padding_idx=0, weight=w0.copy(),
                          dtype=np.float64)
    opt = getattr(se.optim, name)([bag], **kw)
    for ids, go in data:
        topt.zero_grad()
        tbag(torch.as_tensor(ids)).backward(torch.as_tensor(go))
        topt.step()
        bag(ids)
        bag.backward(go, optimizer=opt)
    assert_allclose(bag.weight, tbag.weight.detach().numpy(), rtol=1e-12, atol=1e-12)
