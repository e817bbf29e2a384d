import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest

import sparsembed as se
from sparsembed import _rowsparse
from sparsembed.hashing import HashEmbedding, hash_ids

ROOT = Path(__file__).resolve().parents[1]
RTOL = {np.float32: 1e-6, np.float64: 1e-12}
MASK = 2**64 - 1


# -- plain-Python reference of the documented hash ------------------------------------
def ref_splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_key(seed, j):
    return ref_splitmix64((ref_splitmix64(seed % 2**64) + j) & MASK)


def ref_id(x):
    if isinstance(x, str):
        x = x.encode("utf-8")
    if isinstance(x, bytes):
        return int.from_bytes(hashlib.blake2b(x, digest_size=8, key=b"sparsembed").digest(), "little")
    return int(x) & MASK


def ref_buckets(x, num_buckets, num_hashes, seed):
    u = ref_id(x)
    return [ref_splitmix64(u ^ ref_key(seed, j)) % num_buckets for j in range(num_hashes)]


def ref_importance_id(x, num_weights, num_hashes, seed):
    return ref_splitmix64(ref_id(x) ^ ref_key(seed, num_hashes)) % num_weights


def ref_forward(layer, ids):
    ids = list(ids)
    out = np.zeros((len(ids), layer.embedding_dim), dtype=np.float64)
    for i, x in enumerate(ids):
        bs = ref_buckets(x, layer.num_buckets, layer.num_hashes, layer.seed)
        for j, b in enumerate(bs):
            p = 1.0
            if layer.mode == "weighted":
                p = layer.importance.weight[ref_importance_id(x, layer.num_weights, layer.num_hashes,
                                                              layer.seed), j]
            out[i] += p * layer.weight[b]
    return out


def ref_backward(layer, ids, grad):
    gw = np.zeros(layer.weight.shape)
    gp = None if layer.importance is None else np.zeros(layer.importance.weight.shape)
    for i, x in enumerate(ids):
        bs = ref_buckets(x, layer.num_buckets, layer.num_hashes, layer.seed)
        r = None
        if gp is not None:
            r = ref_importance_id(x, layer.num_weights, layer.num_hashes, layer.seed)
        for j, b in enumerate(bs):
            p = 1.0 if gp is None else layer.importance.weight[r, j]
            gw[b] += p * grad[i]
            if gp is not None:
                gp[r, j] += grad[i] @ layer.weight[b]
    return gw, gp


# -- tests ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 12345, -3, 2**70])
def test_buckets_match_the_documented_hash(seed):
    ints = [0, 1, -1, 2**63 - 1, -(2**63), 987654321987, 42]
    got = hash_ids(np.array(ints, dtype=np.int64), 1009, 3, seed)
    assert got.dtype == np.int64 and got.shape == (7, 3)
    assert got.tolist() == [ref_buckets(x, 1009, 3, seed) for x in ints]
    strings = ["", "a", "héllo wörld", "日本", "user:42"]
    got = hash_ids(np.array(strings), 97, 2, seed)
    assert got.tolist() == [ref_buckets(s, 97, 2, seed) for s in strings]
    assert hash_ids(strings, 97, 2, seed).tolist() == got.tolist()  # list of str
    assert hash_ids([s.encode() for s in strings], 97, 2, seed).tolist() == got.tolist()  # bytes
    big = np.array([2**64 - 1, 2**63], dtype=np.uint64)  # uint64 ids above int64's range
    assert hash_ids(big, 1009, 2, seed).tolist() == [ref_buckets(int(x), 1009, 2, seed) for x in big]
    # any integer dtype gives the same buckets for the same values
    small = np.array([1, 2, 200], dtype=np.uint8)
    np.testing.assert_array_equal(hash_ids(small, 50, 2, seed), hash_ids(small.astype(np.int64), 50, 2, seed))


def test_same_buckets_in_another_process(run_python):
    code = (
        "import sys, json, numpy as np\n"
        "from sparsembed.hashing import hash_ids\n"
        "print(json.dumps([hash_ids(np.arange(-5, 5), 1000, 2, 7).tolist(),"
        " hash_ids(['a', 'bé', 'cat'], 1000, 2, 7).tolist()]))\n"
    )
    results = []
    for hashseed in ("1", "2"):
        results.append(run_python(code, env={"PYTHONHASHSEED": hashseed}).stdout)
    import json

    here = [hash_ids(np.arange(-5, 5), 1000, 2, 7).tolist(), hash_ids(["a", "bé", "cat"], 1000, 2, 7).tolist()]
    assert json.loads(results[0]) == json.loads(results[1]) == here


def test_collisions_are_rare_at_the_documented_load():
    n = 100_000
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(-(2**63), 2**63 - 1, size=n + 100, dtype=np.int64))[:n]
    assert ids.size == n
    b = hash_ids(ids, 10 * n, 2, seed=0)
    # fraction of ids whose whole bucket pair is shared with another id
    key = b[:, 0] * (10 * n) + b[:, 1]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    frac_pair = np.mean(counts[inverse] > 1)
    assert frac_pair < 1e-3
    # each single hash behaves like a uniform one: ~1 - exp(-0.1) of ids share a bucket
    for j in range(2):
        _, inv, cnt = np.unique(b[:, j], return_inverse=True, return_counts=True)
        assert 0.085 < np.mean(cnt[inv] > 1) < 0.105
    # the two hashes are not the same function
    assert np.mean(b[:, 0] == b[:, 1]) < 1e-3
    # strings too
    words = [f"token-{i}" for i in range(20_000)]
    bs = hash_ids(words, 200_000, 2, seed=3)
    _, inv, cnt = np.unique(bs[:, 0] * 200_000 + bs[:, 1], return_inverse=True, return_counts=True)
    assert np.mean(cnt[inv] > 1) < 1e-3


@pytest.mark.parametrize("mode", ["sum", "weighted"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sparse", [False, True])
def test_forward_backward_vs_reference(mode, dtype, sparse):
    rng = np.random.default_rng(1)
    layer = HashEmbedding(13, 5, num_hashes=3, mode=mode, seed=9, sparse=sparse, dtype=dtype,
                          num_weights=7 if mode == "weighted" else None, random_state=0)
    if mode == "weighted":
        layer.importance.weight[...] = rng.standard_normal(layer.importance.weight.shape)
    ids = np.array([[5, -2, 5], [2**40, 0, 7]])
    out = layer(ids)
    assert out.shape == (2, 3, 5) and out.dtype == dtype
    np.testing.assert_allclose(out.reshape(6, 5), ref_forward(layer, ids.reshape(-1)), rtol=RTOL[dtype],
                               atol=RTOL[dtype])
    grad = rng.standard_normal(out.shape)
    g = layer.backward(grad)
    gw, gp = ref_backward(layer, ids.reshape(-1), grad.reshape(6, 5).astype(dtype).astype(np.float64))
    dense = g.toarray() if sparse else g
    np.testing.assert_allclose(dense, gw, rtol=RTOL[dtype], atol=RTOL[dtype] * 10)
    if sparse:
        rows, _ = _rowsparse.row_values(g)
        np.testing.assert_array_equal(rows, np.unique(layer.buckets(ids)))
        assert g.nnz == rows.size * 5
    if mode == "weighted":
        gi = layer.importance.grad.toarray() if sparse else layer.importance.grad
        np.testing.assert_allclose(gi, gp, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10)
    else:
        assert layer.importance is None
    # a second backward accumulates
    layer.backward(grad)
    total = layer.grad.toarray() if sparse else layer.grad
    np.testing.assert_allclose(total, 2 * gw, rtol=RTOL[dtype], atol=RTOL[dtype] * 10)
    # strings go through the same tables
    words = ["the", "cat", "the"]
    np.testing.assert_allclose(layer(words), ref_forward(layer, words), rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("mode", ["sum", "weighted"])
def test_gradients_vs_finite_differences(mode):
    rng = np.random.default_rng(2)
    layer = HashEmbedding(6, 3, num_hashes=2, mode=mode, seed=1, dtype=np.float64, random_state=0,
                          num_weights=4 if mode == "weighted" else None)
    if mode == "weighted":
        layer.importance.weight[...] = rng.standard_normal(layer.importance.weight.shape)
    ids = np.array([0, 3, 3, 11, -8])
    c = rng.standard_normal((5, 3))

    def loss():
        return float(np.sum(c * np.tanh(layer(ids))))

    out = layer(ids)
    layer.backward(c * (1 - np.tanh(out) ** 2))
    tables = [(layer.weight, layer.grad)]
    if mode == "weighted":
        tables.append((layer.importance.weight, layer.importance.grad))
    eps = 1e-6
    for table, grad in tables:
        numeric = np.zeros_like(table)
        for idx in np.ndindex(table.shape):
            old = table[idx]
            table[idx] = old + eps
            up = loss()
            table[idx] = old - eps
            down = loss()
            table[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["sum", "weighted"])
def test_threads_give_bitwise_equal_results(mode, threads):
    rng = np.random.default_rng(3)
    ids = rng.integers(-1000, 1000, size=(300, 4))
    results = []
    for n in (1, 2):
        threads(n)
        layer = HashEmbedding(50, 16, mode=mode, sparse=True, random_state=0)
        out = layer(ids)
        g = layer.backward(np.cos(out))
        imp = None if layer.importance is None else layer.importance.grad.toarray()
        results.append((out, g.toarray(), imp))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    if mode == "weighted":
        np.testing.assert_array_equal(results[0][2], results[1][2])


def test_requires_grad_empty_input_and_updates():
    layer = HashEmbedding(20, 4, mode="weighted", sparse=True, random_state=0)
    assert layer.parameters() == [layer, layer.importance]
    out = layer(np.zeros((0, 2), dtype=np.int64))
    assert out.shape == (0, 2, 4)
    g = layer.backward(np.zeros((0, 2, 4)))
    assert g.shape == (20, 4) and g.nnz == 0
    layer.zero_grad()
    assert layer.grad is None and layer.importance.grad is None
    layer.requires_grad = False
    layer(np.array([1, 2]))
    assert layer.backward(np.ones((2, 4))) is None and layer.grad is None
    assert layer.importance.grad is not None  # the importance table still learns
    # a sparse row update (what se.optim.SGD does) changes only the touched buckets
    layer.requires_grad = True
    layer.zero_grad()
    w0 = layer.weight.copy()
    layer(np.array([7]))
    g = layer.backward(np.ones((1, 4)))
    rows, vals = _rowsparse.row_values(g)
    layer.weight[rows] -= 0.1 * vals
    changed = np.flatnonzero((layer.weight != w0).any(axis=1))
    np.testing.assert_array_equal(changed, np.unique(layer.buckets(np.array([7]))))


@pytest.mark.skipif(not hasattr(se, "optim") or not hasattr(getattr(se, "optim", None), "SGD"),
                    reason="se.optim not on this branch yet")
def test_optimizer_updates_both_tables():
    layer = HashEmbedding(30, 4, mode="weighted", sparse=True, random_state=0)
    opt = se.optim.SGD(layer.parameters(), lr=0.5)
    w0, p0 = layer.weight.copy(), layer.importance.weight.copy()
    layer(np.array([3, 4]))
    layer.backward(np.ones((2, 4)))
    gw, gp = layer.grad.toarray(), layer.importance.grad.toarray()
    opt.step()
    np.testing.assert_allclose(layer.weight, w0 - 0.5 * gw, rtol=1e-6)
    np.testing.assert_allclose(layer.importance.weight, p0 - 0.5 * gp, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_buckets=0), "num_buckets must be >= 1, got 0"),
    (dict(num_buckets=-5), "num_buckets must be a non-negative int, got -5"),
    (dict(num_buckets=2.5), "num_buckets must be a non-negative int, got 2.5"),
    (dict(num_hashes=0), "num_hashes must be >= 1, got 0"),
    (dict(num_hashes=-1), "num_hashes must be a non-negative int, got -1"),
    (dict(seed=1.5), "seed must be an int, got 1.5"),
])
def test_hash_ids_checks_its_arguments_as_the_layer_does(kwargs, match):
    # hash_ids returned zeros (num_buckets=0), numpy's OverflowError (< 0) or an
    # (n, 0) array (num_hashes <= 0)
    args = dict(num_buckets=10, num_hashes=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        hash_ids(np.arange(3), **args)
    with pytest.raises(ValueError, match=match):
        HashEmbedding(args["num_buckets"], 2, num_hashes=args["num_hashes"], seed=args["seed"])


@pytest.mark.parametrize("seed", [0, 7, -3])
def test_layer_buckets_are_hash_ids(seed):
    # buckets() returned a tuple (buckets, uint64 keys) where its docstring promises
    # the int64 array
    layer = HashEmbedding(1009, 4, num_hashes=3, seed=seed, random_state=0)
    ids = np.array([[0, -1, 2**63 - 1], [42, 7, 7]])
    got = layer.buckets(ids)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == (2, 3, 3)
    np.testing.assert_array_equal(got, hash_ids(ids, 1009, 3, seed))
    assert layer.buckets(["a", "b"]).tolist() == hash_ids(["a", "b"], 1009, 3, seed).tolist()


def test_each_id_of_a_mixed_batch_hashes_as_itself():
    # numpy gives a list one dtype (ints beside strings become strings, ints beside
    # ints past int64 become floats): an id must get its rows whatever else the
    # batch holds
    for mixed in ([1, "user:alice"], [b"x", 7, "y"], [[3, "a"], ["b", -4]]):
        got = hash_ids(mixed, 1000, 3)
        flat = [hash_ids([t], 1000, 3)[0] for t in np.asarray(mixed, dtype=object).ravel()]
        np.testing.assert_array_equal(got.reshape(-1, 3), flat)
    np.testing.assert_array_equal(hash_ids([1, "a"], 1000)[0], hash_ids([1], 1000)[0])
    # 64-bit ids of either sign, in a list, an object array or a uint64 array alike
    expected = hash_ids(np.array([2**64 - 1, 2**63, 5], np.uint64), 1000)
    for ids in ([-1, 2**63, 5], np.array([-1, 2**63, 5], dtype=object)):
        np.testing.assert_array_equal(hash_ids(ids, 1000), expected)
    layer = HashEmbedding(1000, 4, random_state=0)
    np.testing.assert_array_equal(layer([1, "user:alice"])[0], layer([1])[0])
    with pytest.raises(ValueError, match="fit in 64 bits .* got 18446744073709551616"):
        hash_ids([1, 2**64], 10)
    with pytest.raises(TypeError, match="got float 1.5"):
        hash_ids([1.5, 2], 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        HashEmbedding(10, 2, mode="mean")
    with pytest.raises(ValueError, match="num_hashes must be >= 1, got 0"):
        HashEmbedding(10, 2, num_hashes=0)
    with pytest.raises(ValueError, match="num_buckets must be >= 1, got 0"):
        HashEmbedding(0, 2)
    with pytest.raises(ValueError, match="num_weights is only used"):
        HashEmbedding(10, 2, num_weights=5)
    with pytest.raises(ValueError, match="cpu"):
        HashEmbedding(10, 2, device="cuda")
    with pytest.raises(ValueError, match="seed"):
        HashEmbedding(10, 2, seed=1.5)
    layer = HashEmbedding(10, 2, random_state=0)
    w0 = layer.weight.copy()
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((1, 2)))
    with pytest.raises(TypeError, match="float"):
        layer(np.array([1.0]))
    with pytest.raises(TypeError, match="bool"):
        layer(np.array([True]))
    with pytest.raises(TypeError, match="single string"):
        layer("abc")
    with pytest.raises(TypeError, match="integers or strings"):
        layer(np.array([None, 1], dtype=object))
    layer(np.array([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        layer.backward(np.ones((3, 2)))
    assert layer.grad is None
    np.testing.assert_array_equal(layer.weight, w0)
    with pytest.raises(ValueError, match="weight has shape"):
        HashEmbedding(10, 2, weight=np.zeros((9, 2), np.float32))


@pytest.mark.parametrize("mmap_mode", [None, "r+"])
def test_save_load_roundtrip(tmp_path, mmap_mode):
    layer = HashEmbedding(40, 3, num_hashes=3, mode="weighted", seed=5, sparse=True, num_weights=11,
                          dtype=np.float64, random_state=0)
    layer.importance.weight[...] = np.arange(33, dtype=np.float64).reshape(11, 3)
    layer.importance.requires_grad = False
    path = tmp_path / "h.npz"
    se.save(layer, path)
    back = se.load(path, mmap_mode=mmap_mode)
    assert repr(back) == repr(layer) and back.importance.requires_grad is False
    np.testing.assert_array_equal(back.weight, layer.weight)
    np.testing.assert_array_equal(back.importance.weight, layer.importance.weight)
    ids = np.array([1, 99, -4])
    np.testing.assert_array_equal(back(ids), layer(ids))
    if mmap_mode:
        assert isinstance(back.weight, np.memmap) and isinstance(back.importance.weight, np.memmap)
    plain = HashEmbedding(8, 2, random_state=0)
    se.save(plain, path)
    back = se.load(path)
    assert back.importance is None and repr(back) == repr(plain)
    np.testing.assert_array_equal(back.weight, plain.weight)


@pytest.mark.skipif(not hasattr(se, "optim") or not hasattr(getattr(se, "optim", None), "Adagrad"),
                    reason="se.optim not on this branch yet")
@pytest.mark.parametrize("mode", ["sum", "weighted"])
def test_fused_backward_equals_backward_then_step(mode):
    ids = np.array([[3, 4, 3], [-9, 2**50, 4]])

    def run(fused):
        layer = HashEmbedding(17, 4, num_hashes=3, mode=mode, sparse=True, random_state=0,
                              dtype=np.float64)
        opt = se.optim.Adagrad(layer.parameters(), lr=0.3)
        for step in range(3):
            out = layer(ids)
            g = np.cos(out + step)
            if fused:
                assert layer.backward(g, optimizer=opt) is None
                assert layer.grad is None
            else:
                layer.backward(g)
                opt.step()
                opt.zero_grad()
        return layer

    a, b = run(True), run(False)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12, atol=1e-14)
    if mode == "weighted":
        np.testing.assert_allclose(a.importance.weight, b.importance.weight, rtol=1e-12, atol=1e-14)
    other = se.optim.SGD([se.Embedding(3, 4)], lr=0.1)
    a(ids)
    w0 = a.weight.copy()
    with pytest.raises(ValueError, match="not among"):
        a.backward(np.ones((2, 3, 4)), optimizer=other)
    np.testing.assert_array_equal(a.weight, w0)


def test_reset_copy_and_pickle():
    import copy
    import pickle

    layer = HashEmbedding(12, 3, mode="weighted", seed=4, random_state=0)
    layer.importance.weight[...] = 5
    layer.reset_parameters(random_state=1)
    np.testing.assert_array_equal(layer.importance.weight, np.ones((12, 2)))
    np.testing.assert_array_equal(layer.weight, np.random.default_rng(1).standard_normal((12, 3)).astype(np.float32))
    ids = np.array([1, -1, 2**33])
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert repr(clone) == repr(layer)
        np.testing.assert_array_equal(clone(ids), layer(ids))
        assert clone.importance is not layer.importance
    state = layer.state_dict()
    assert set(state) == {"weight", "importance"}
    other = HashEmbedding(12, 3, mode="weighted", seed=4, random_state=2)
    other.load_state_dict({k: v.copy() for k, v in state.items()})
    np.testing.assert_array_equal(other(ids), layer(ids))
    with pytest.raises(RuntimeError, match="missing keys"):
        other.load_state_dict({"weight": state["weight"]})
    before = other.importance.weight.copy()
    assert other.load_state_dict({"weight": state["weight"] * 2}, strict=False) == (
        ["importance"], [])
    np.testing.assert_array_equal(other.weight, state["weight"] * 2)
    np.testing.assert_array_equal(other.importance.weight, before)


@pytest.mark.parametrize("mode", ["sum", "weighted"])
@pytest.mark.parametrize("sparse", [False, True])
def test_float16_table_backward(mode, sparse):
    # a float16 table's gradients are float32, as Embedding's: the grad_output was
    # cast to float16 and no kernel took it (Cython's "No matching signature found")
    ids = np.array([[1, 2, 3], [3, 9, 1]])
    grads = []
    for dtype in (np.float16, np.float32):
        emb = HashEmbedding(10, 4, mode=mode, sparse=sparse, dtype=dtype, random_state=0)
        if dtype == np.float32:  # the same table values as the float16 one
            emb.weight[...] = HashEmbedding(10, 4, mode=mode, dtype=np.float16,
                                            random_state=0).weight
        out = emb(ids)
        g = emb.backward(np.full(out.shape, 0.5, np.float32))
        grads.append(g.toarray() if sparse else g)
    assert grads[0].dtype == np.float32
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-3, atol=1e-3)


def test_backward_uses_the_forwards_num_hashes():
    # num_hashes edited between forward and backward: the backward is the forward's
    # (a bare ZeroDivisionError at 0)
    emb = HashEmbedding(50, 4, random_state=0)
    out = emb(np.array([1, 2, 3]))
    expected = emb.backward(np.ones_like(out))
    emb.zero_grad()
    emb.num_hashes = 0
    np.testing.assert_array_equal(emb.backward(np.ones_like(out)), expected)


@pytest.mark.parametrize("fused", [False, True], ids=["backward", "fused"])
def test_a_refused_table_leaves_the_importance_table_as_it_was(fused):
    # both tables are checked before either is written: the importance table (its
    # weights and state, or its grad) was updated before the embedding table was
    # refused
    emb = HashEmbedding(50, 4, mode="weighted", sparse=True, random_state=0)
    opt = se.optim.Adagrad([emb, emb.importance], lr=0.5)
    out = emb(np.array([3, 4, 5]))
    emb.backward(np.ones_like(out), optimizer=opt)
    out = emb(np.array([3, 4, 5]))
    if fused:
        table = emb.weight.copy()
        table.flags.writeable = False
        emb.weight = table
        match = "HashEmbedding.weight must be a writable C-contiguous array"
    else:
        emb.grad = np.zeros((2, 2), np.float32)
        match = r"grad has shape \(2, 2\), expected \(50, 4\)"
    importance, state = emb.importance.weight.copy(), copy.deepcopy(opt.state)
    with pytest.raises(ValueError, match=match):
        emb.backward(np.ones_like(out), optimizer=opt if fused else None)
    np.testing.assert_array_equal(emb.importance.weight, importance)
    assert emb.importance.grad is None
    assert opt.state[1]["step"] == state[1]["step"]
    np.testing.assert_array_equal(opt.state[1]["sum"], state[1]["sum"])


def test_a_hand_set_importance_grad_of_another_shape_is_refused():
    # added into with numpy's broadcasting before (a (1, k) grad took any batch)
    emb = HashEmbedding(50, 4, mode="weighted", random_state=0)
    out = emb(np.array([3, 4, 5]))
    emb.importance.grad = np.zeros((1, emb.num_hashes), np.float32)
    with pytest.raises(ValueError, match=r"grad has shape \(1, 2\), expected \(50, 2\)"):
        emb.backward(np.ones_like(out))
    assert emb.grad is None
