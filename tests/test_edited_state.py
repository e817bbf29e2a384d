"""State a user edits by hand: a clear error and nothing changed, never a crash.

Every public attribute can be reassigned or edited in place -- a layer's ``weight``
and ``num_embeddings``, a ``grad`` (often a scipy matrix, whose arrays scipy itself
never rechecks), an optimizer's state. The kernels run with bounds checks off, so
each case here once read or wrote past an array (found by a fuzz of the public
API); now each is caught at the Python boundary. Every test checks that the error
leaves every array as it was.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

import sparsembed as se
from sparsembed import _cpu

OPTIMIZERS = [("SGD", dict(lr=0.5)), ("Adagrad", dict(lr=0.5)),
              ("SparseAdam", dict(lr=0.5)), ("RowWiseAdagrad", dict(lr=0.5))]
V, D = 6, 3


def snapshot(*arrays):
    """Byte copies of arrays and of the arrays inside scipy matrices."""
    out = []
    for a in arrays:
        if sp.issparse(a):
            for name in ("data", "indices", "indptr", "row", "col"):
                if isinstance(getattr(a, name, None), np.ndarray):
                    out.append((getattr(a, name), getattr(a, name).tobytes()))
        elif isinstance(a, np.ndarray):
            out.append((a, a.tobytes()))
    return out


def assert_unchanged(snap):
    for arr, data in snap:
        assert arr.tobytes() == data


def state_snapshot(opt):
    return {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
            for i, st in opt.state.items()}


def assert_state_equal(opt, before):
    assert set(opt.state) == set(before)
    for i, st in before.items():
        assert set(opt.state[i]) == set(st)
        for k, v in st.items():
            if isinstance(v, np.ndarray):
                assert_array_equal(opt.state[i][k], v)
            else:
                assert opt.state[i][k] == v


def trained_sparse_layer(ids=(0, 2, 2, 5)):
    emb = se.Embedding(V, D, sparse=True, random_state=0)
    emb(np.array(ids))
    emb.backward(np.ones((len(ids), D), np.float32))
    return emb


# -- sparse gradients edited by hand --------------------------------------------------

def _longer_pointer(g):
    ptr = np.zeros(V + 50, g.indptr.dtype)
    ptr[-1] = g.nnz
    g.indptr = ptr


def _pointer_past_data(g):
    g.indptr[-1] = g.indptr[-1] + 1000


def _decreasing_pointer(g):
    g.indptr[2] = g.indptr[-1] + 1


def _pointer_not_from_zero(g):
    g.indptr[0] = -5


EDITS = {
    "longer row pointer": (_longer_pointer, r"row pointer has 56 entries, expected 7"),
    "pointer past the data": (_pointer_past_data, r"row pointer runs from 0 to \d+"),
    "decreasing pointer": (_decreasing_pointer, r"row pointer decreases at row 2"),
    "pointer from -5": (_pointer_not_from_zero, r"row pointer runs from -5"),
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_step_refuses_an_edited_csr_grad(name, kw, edit):
    emb = trained_sparse_layer()
    opt = getattr(se.optim, name)([emb], **kw)
    opt.step()  # state exists: it must be left as it is too
    emb(np.array([1, 1, 4]))
    emb.zero_grad()
    emb.backward(np.ones((3, D), np.float32))
    mutate, message = EDITS[edit]
    mutate(emb.grad)
    snap, state = snapshot(emb.weight, emb.grad), state_snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(snap)
    assert_state_equal(opt, state)


@pytest.mark.parametrize("edit", EDITS)
def test_backward_refuses_to_add_into_an_edited_csr_grad(edit):
    emb = trained_sparse_layer()
    mutate, message = EDITS[edit]
    mutate(emb.grad)
    grad, snap = emb.grad, snapshot(emb.weight, emb.grad)
    emb(np.array([1, 3]))
    with pytest.raises(ValueError, match=message):
        emb.backward(np.ones((2, D), np.float32))
    assert emb.grad is grad
    assert_unchanged(snap)


@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_a_hyper_parameter_edited_in_a_later_group_changes_nothing(name, kw, fused):
    # step() updated group 0's layer, then failed on group 1's lr with a TypeError
    # from inside the arithmetic
    a, b = trained_sparse_layer(), trained_sparse_layer()
    opt = getattr(se.optim, name)([{"params": [a]}, {"params": [b]}], **kw)
    opt.step()
    for layer in (a, b):
        out = layer(np.array([1, 4]))
        if not fused:
            layer.backward(np.ones_like(out))
    opt.param_groups[1]["lr"] = None
    snap, state = snapshot(a.weight, b.weight), state_snapshot(opt)
    with pytest.raises(ValueError, match="Invalid learning rate value: None"):
        if fused:
            b.backward(np.ones((2, D), np.float32), optimizer=opt)
        else:
            opt.step()
    assert_unchanged(snap)
    assert_state_equal(opt, state)


@pytest.mark.parametrize("name, kw", OPTIMIZERS)
@pytest.mark.parametrize("step", [None, "x", -1, 1.5, True])
def test_a_step_counter_edited_in_a_later_table_changes_nothing(name, kw, step):
    # step() updated table 0, then failed on table 1's counter (a TypeError from
    # its increment; SparseAdam at -1: a bare ZeroDivisionError)
    a, b = trained_sparse_layer(), trained_sparse_layer()
    opt = getattr(se.optim, name)([a, b], **kw)
    opt.step()
    for layer in (a, b):
        layer.backward(np.ones((4, D), np.float32))
    opt.state[1]["step"] = step
    snap, state = snapshot(a.weight, b.weight), state_snapshot(opt)
    with pytest.raises(RuntimeError, match=f"optimizer state 'step' of param 1 must be a "
                                           f"non-negative integer, got {step!r}"):
        opt.step()
    assert_unchanged(snap)
    assert_state_equal(opt, state)


@pytest.mark.parametrize("flag", ["has_sorted_indices", "has_canonical_format"])
def test_edited_column_indices_count_once_the_flags_say_so(flag):
    # the columns of a matrix flagged canonical are trusted as scipy trusts them; a
    # has_sorted_indices reset after an edit was ignored (only the canonical flag
    # was read), so permuted columns were applied in their old order
    emb = se.Embedding(V, D, sparse=True, random_state=0, dtype=np.float64)
    opt = se.optim.SGD([emb], lr=1.0)
    emb(np.array([1, 2]))
    emb.backward(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    emb.grad.indices = emb.grad.indices.copy()  # the shared column indices are read-only
    emb.grad.indices[:3] = [2, 1, 0]  # a legal csr, unsorted
    setattr(emb.grad, flag, False)
    w0 = emb.weight.copy()
    opt.step()
    assert_array_equal(w0[1] - emb.weight[1], [3.0, 2.0, 1.0])
    emb.grad.indices[0] = 99  # out of range: refused once the flags are reset
    setattr(emb.grad, flag, False)
    snap = snapshot(emb.weight, emb.grad)
    with pytest.raises(ValueError, match=r"holds index 99, outside \[0, 3\)"):
        opt.step()
    assert_unchanged(snap)


def _bsr_with_pointer(shape, indptr):
    m = sp.bsr_array(np.zeros(shape, np.float32), blocksize=(1, 1))  # no stored block
    m.indptr = np.array(indptr, dtype=np.int32)
    return m


def _lil_with_long_values(shape):
    m = sp.lil_array(np.eye(*shape, dtype=np.float32))
    m.data[0] = [1.0] * 100_000  # row 0 still lists one column
    return m


def _csr_with_int16_pointer(shape):
    # a drop of 60,000 wraps to a step of +5,536 in int16
    m = sp.csr_array((np.ones(2, np.float32), np.array([0, 1]), [0, 1] + [2] * (shape[0] - 1)),
                     shape=shape)
    m.indptr = np.array([0, 30_000, -30_000] + [2] * (shape[0] - 2), dtype=np.int16)
    return m


def _csc_with_int16_pointer(shape):
    m = sp.csc_array((np.ones(2, np.float32), np.array([0, 1]), [0, 1] + [2] * (shape[1] - 1)),
                     shape=shape)
    m.indptr = np.array([0, 30_000, -30_000] + [2] * (shape[1] - 2), dtype=np.int16)
    return m


# each once wrote past scipy's own arrays in its compiled conversion (heap corruption,
# then an abort or a segfault), found by a fuzz of the public API
SCIPY_OVERRUNS = {
    "bsr pointer past its blocks": (
        lambda shape: _bsr_with_pointer(shape, [0, 100_000] + [0] * (shape[0] - 1)),
        r"block row pointer decreases at block row 1 \(100000 -> 0\)"),
    "lil values longer than columns": (
        _lil_with_long_values, r"row 0 lists 1 columns but 100000 values"),
    "int16 pointer wrapping": (
        _csr_with_int16_pointer, r"row pointer decreases at row 1 \(30000 -> -30000\)",
        # (a csr bag input's row pointer is its offsets, checked as such)
        r"row pointer \(indptr\) does not bound its bags: offsets must be non-decreasing, "
        r"got offsets\[2\] = -30000 after offsets\[1\] = 30000"),
    "int16 csc pointer wrapping": (
        _csc_with_int16_pointer, r"column pointer decreases at column 1 \(30000 -> -30000\)"),
}


@pytest.mark.parametrize("case", list(SCIPY_OVERRUNS))
@pytest.mark.parametrize("use", ["step", "backward into it", "bag input"])
def test_edited_scipy_structures_that_overran_scipy_are_refused(case, use):
    make, message, *as_bags = SCIPY_OVERRUNS[case]
    if use == "bag input":
        bag = se.EmbeddingBag(V, D, mode="sum", random_state=0)
        x = make((3, V))
        snap = snapshot(bag.weight, x)
        with pytest.raises(ValueError, match="sparse input's " + (as_bags or [message])[0]):
            bag(x)
        assert_unchanged(snap)
        return
    emb = se.Embedding(V, D, sparse=True, random_state=0)
    opt = se.optim.SGD([emb], lr=0.1)
    emb.grad = make((V, D))
    snap = snapshot(emb.weight, emb.grad)
    with pytest.raises(ValueError, match="gradient's " + message):
        if use == "step":
            opt.step()
        else:
            emb(np.array([1, 2]))
            emb.backward(np.ones((2, D), np.float32))
    assert_unchanged(snap)


def test_column_index_out_of_range_in_a_partial_row():
    # not full rows: the slow path converts through scipy, after a full check
    emb = se.Embedding(V, D, sparse=True, random_state=0)
    g = sp.csr_array((np.ones(2, np.float32), np.array([0, 1]), np.array([0, 1, 2, 2, 2, 2, 2])),
                     shape=(V, D))
    g.indices[1] = 10**6
    emb.grad = g
    opt = se.optim.SGD([emb], lr=1.0)
    snap = snapshot(emb.weight, g)
    with pytest.raises(ValueError, match=r"holds index 1000000, outside \[0, 3\)"):
        opt.step()
    assert_unchanged(snap)
    assert opt.state == {}


def _formats(dense):
    return {"csc_array": sp.csc_array(dense), "csc_matrix": sp.csc_matrix(dense),
            "coo_array": sp.coo_array(dense), "lil_array": sp.lil_array(dense),
            "dok_array": sp.dok_array(dense), "bsr_array": sp.bsr_array(dense)}


@pytest.mark.parametrize("fmt", list(_formats(np.eye(2))))
def test_backward_adds_into_a_grad_of_any_sparse_format(fmt, rng):
    # a csc grad was read as if it were csr: its column pointer taken for rows
    dense = rng.standard_normal((V, D)).astype(np.float32)
    dense[[1, 4]] = 0
    emb = se.Embedding(V, D, sparse=True, random_state=0)
    emb.grad = _formats(dense)[fmt]
    emb(np.array([0, 2, 2]))
    new = emb.backward(np.ones((3, D), np.float32))
    assert emb.grad.format == "csr"
    assert_allclose(emb.grad.toarray(), dense + new.toarray(), rtol=1e-6)


@pytest.mark.parametrize("fmt", list(_formats(np.eye(2))))
def test_step_takes_a_grad_of_any_sparse_format(fmt, rng):
    dense = rng.standard_normal((V, D)).astype(np.float32)
    dense[[1, 4]] = 0
    a, b = (se.Embedding(V, D, sparse=True, random_state=0) for _ in range(2))
    a.grad, b.grad = _formats(dense)[fmt], sp.csr_array(dense)
    for layer in (a, b):
        se.optim.Adagrad([layer], lr=0.5).step()
    assert_array_equal(a.weight, b.weight)


def test_coo_grad_with_an_edited_row_index():
    emb = se.Embedding(V, D, sparse=True, random_state=0)
    g = sp.coo_array(np.ones((V, D), np.float32))
    g.row[3] = V + 7
    emb.grad = g
    snap = snapshot(emb.weight, g)
    with pytest.raises(ValueError, match=r"holds row index 13, outside \[0, 6\)"):
        se.optim.SGD([emb], lr=1.0).step()
    assert_unchanged(snap)


def test_dense_grad_of_another_shape_is_not_broadcast():
    emb = se.Embedding(V, D, random_state=0)
    emb.grad = np.zeros((1, D), np.float32)  # numpy would broadcast it silently
    emb(np.array([1]))
    with pytest.raises(ValueError, match=r"grad has shape \(1, 3\), expected \(6, 3\)"):
        emb.backward(np.ones((1, D), np.float32))
    assert emb.grad.shape == (1, D)


def test_integer_dense_grad_is_a_type_error():
    emb = se.Embedding(V, D, sparse=True, random_state=0)
    emb.grad = np.zeros((V, D), np.int64)
    emb(np.array([1]))
    with pytest.raises(TypeError, match="grad must hold floats"):
        emb.backward(np.ones((1, D), np.float32))
    assert_array_equal(emb.grad, 0)


# -- a table replaced by one of another shape ------------------------------------------

def _layers():
    return {
        "Embedding": lambda: se.Embedding(1000, 4, random_state=0),
        "Embedding max_norm": lambda: se.Embedding(1000, 4, max_norm=1.0, random_state=0),
        "EmbeddingBag sum": lambda: se.EmbeddingBag(1000, 4, mode="sum", random_state=0),
        "EmbeddingBag max": lambda: se.EmbeddingBag(1000, 4, mode="max", random_state=0),
        "EmbeddingBag float16": lambda: se.EmbeddingBag(1000, 4, mode="sum",
                                                        dtype=np.float16, random_state=0),
        "EmbeddingBag max_norm": lambda: se.EmbeddingBag(1000, 4, max_norm=1.0,
                                                         random_state=0),
    }


def _ids(layer):
    return np.array([[999, 3]]) if isinstance(layer, se.EmbeddingBag) else np.array([999, 3])


@pytest.mark.parametrize("make", list(_layers()))
def test_forward_refuses_a_smaller_table(make):
    # ids were checked against num_embeddings and then read (or renormed) rows past
    # the end of the new table
    layer = _layers()[make]()
    layer.weight = np.full((2, 4), 5.0, layer.weight.dtype)
    snap = snapshot(layer.weight)
    with pytest.raises(ValueError, match=r"weight has shape \(2, 4\), expected \(1000, 4\)"):
        layer(_ids(layer))
    assert_unchanged(snap)


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_options_edited_by_hand_are_checked_again(bag):
    # as the constructor checks them (torch's F.embedding checks padding_idx at every
    # call): max_norm 0 zeroed rows in place, -1 flipped them; padding_idx -1 counted
    # from the front, one past the table was taken for "no padding"
    def layer(**kw):
        table = np.array([[3.0, 4.0], [6.0, 8.0], [1.0, 1.0]], np.float32)
        if bag:
            return se.EmbeddingBag.from_pretrained(table, freeze=False, mode="sum", **kw)
        return se.Embedding.from_pretrained(table, freeze=False, **kw)

    ids = np.array([[1, 2]])
    for name, value, message in (("max_norm", 0.0, "max_norm must be > 0, got 0.0"),
                                 ("max_norm", -1.0, "max_norm must be > 0, got -1.0"),
                                 ("norm_type", float("nan"), "norm_type must be a real"),
                                 ("padding_idx", 3, r"padding_idx 3 must be within \[-3, 3\)"),
                                 ("padding_idx", 1.5, "padding_idx must be an int or None"),
                                 # equal to 2: passed the shape check, failed after the
                                 # renorm had written the table
                                 ("embedding_dim", 2.0,
                                  "embedding_dim must be a non-negative int, got 2.0"),
                                 ("num_embeddings", True,
                                  "num_embeddings must be a non-negative int, got True")):
        emb = layer(max_norm=1.0)
        setattr(emb, name, value)
        snap = snapshot(emb.weight)
        with pytest.raises(ValueError, match=message):
            emb(ids)
        assert_unchanged(snap)
    emb = layer(padding_idx=0)
    emb.padding_idx = -1  # torch's rule: the last row
    out = emb(ids)
    assert emb.padding_idx == 2
    grad = emb.backward(np.ones_like(out))
    assert_array_equal(grad[2], [0, 0])
    assert_array_equal(grad[1], [1, 1])
    emb.max_norm = 5.0  # a valid edit takes effect
    emb(np.array([[0, 1]]))
    assert_allclose(np.linalg.norm(emb.weight[1]), 5.0, rtol=1e-6)


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_a_subclass_forward_is_what_calling_the_layer_runs(bag):
    base = se.EmbeddingBag if bag else se.Embedding

    class Doubled(base):
        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    layer = Doubled(5, 2, random_state=0)
    ids = np.array([[1, 3]])
    assert_array_equal(layer(ids), 2 * base.forward(layer, ids))


@pytest.mark.parametrize("make", list(_layers()))
def test_a_big_endian_table_is_refused_by_name(make):
    # a dtype's char ignores byte order: '>f4' passed the check and Cython's buffer
    # code refused it with "Big-endian buffer not supported" or a dispatch error
    layer = _layers()[make]()
    dtype = layer.weight.dtype.newbyteorder(">")
    layer.weight = layer.weight.astype(dtype)
    snap = snapshot(layer.weight)
    with pytest.raises(ValueError, match=f"weight must be a C-contiguous float16, float32 or "
                                         f"float64 array, got a {dtype.str} one"):
        layer(_ids(layer))
    assert_unchanged(snap)


@pytest.mark.parametrize("fused", [False, True], ids=["backward", "fused"])
def test_backward_refuses_a_table_of_another_dtype_since_the_forward(fused):
    # the forward's per-sample weights are of the old dtype: Cython's "Buffer dtype
    # mismatch" from the per-sample weights' gradient
    bag = se.EmbeddingBag(V, D, mode="sum", sparse=True, random_state=0)
    opt = se.optim.SGD([bag], lr=1.0)
    out = bag(np.array([[1, 2]]), per_sample_weights=np.ones((1, 2), np.float32))
    bag.weight = bag.weight.astype(np.float64)
    snap = snapshot(bag.weight)
    with pytest.raises(ValueError, match="the table's dtype changed from float32 to float64 "
                                         "since the last forward"):
        bag.backward(np.ones_like(out), optimizer=opt if fused else None)
    assert_unchanged(snap)
    assert bag.grad is None and bag.per_sample_weights_grad is None


def test_forward_refuses_num_embeddings_edited_by_hand():
    emb = se.Embedding(4, 2, max_norm=1.0, random_state=0)
    emb.num_embeddings = 1000
    snap = snapshot(emb.weight)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 2\), expected \(1000, 2\)"):
        emb(np.array([999]))
    assert_unchanged(snap)


@pytest.mark.parametrize("fused", [False, True], ids=["backward", "fused"])
@pytest.mark.parametrize("make", list(_layers()))
def test_backward_refuses_a_table_replaced_after_the_forward(make, fused):
    layer = _layers()[make]()
    layer.sparse = True
    opt = se.optim.SGD([layer], lr=1.0)
    out = layer(_ids(layer))
    layer.weight = np.zeros((2, 4), layer.weight.dtype)
    snap = snapshot(layer.weight)
    with pytest.raises(ValueError, match=r"weight has shape \(2, 4\)"):
        layer.backward(np.ones_like(out), optimizer=opt if fused else None)
    assert_unchanged(snap)
    assert layer.grad is None and opt.state == {}


def test_backward_refuses_a_forward_on_another_table_shape():
    # the layer's sizes edited along with the table: consistent now, but the last
    # forward's ids were checked against the old, larger table
    emb = se.Embedding(1000, 4, sparse=True, random_state=0)
    opt = se.optim.SGD([emb], lr=1.0)
    emb(np.array([999]))
    emb.weight = np.zeros((2, 4), np.float32)
    emb.num_embeddings = 2
    with pytest.raises(ValueError, match=r"changed from \(1000, 4\) to \(2, 4\) since the last"):
        emb.backward(np.ones((1, 4), np.float32), optimizer=opt)
    assert_array_equal(emb.weight, 0)
    emb(np.array([1]))  # a new forward on the new table works
    emb.backward(np.ones((1, 4), np.float32), optimizer=opt)
    assert_array_equal(emb.weight[1], -1)


def test_a_table_of_the_same_shape_may_be_put_in_place():
    emb = se.Embedding(5, 2, sparse=True, random_state=0)
    out = emb(np.array([4]))
    emb.weight = np.zeros((5, 2), np.float32)
    g = emb.backward(np.ones_like(out))
    assert_array_equal(g.toarray()[4], 1)


def _same_shape_tables_the_kernels_cannot_take(dtype):
    table = np.arange(1000 * 4, dtype=dtype).reshape(1000, 4) % 7 + 2
    return {
        "F-order": np.asfortranarray(table),
        "strided": np.repeat(table, 2, axis=1)[:, ::2],
        "int32": table.astype(np.int32),
    }


@pytest.mark.parametrize("kind", ["F-order", "strided", "int32"])
@pytest.mark.parametrize("make", list(_layers()))
def test_forward_refuses_a_same_shape_table_the_kernels_cannot_take(make, kind):
    # a non-contiguous table failed inside the kernel call -- after a max_norm renorm
    # had already rescaled its rows; an integer one with a message about signatures
    layer = _layers()[make]()
    layer.weight = _same_shape_tables_the_kernels_cannot_take(layer.weight.dtype)[kind]
    snap = snapshot(layer.weight)
    with pytest.raises(ValueError, match=r"weight must be a C-contiguous float16, float32 "
                                         r"or float64 array.*ascontiguousarray"):
        layer(_ids(layer))
    assert_unchanged(snap)
    layer.weight = np.ascontiguousarray(layer.weight, dtype=np.float32)
    layer(_ids(layer))  # the fix the message names works


def test_hash_embedding_refuses_edited_sizes():
    emb = se.HashEmbedding(8, 3, mode="weighted", random_state=0)
    emb.num_buckets = 10**6  # buckets past the 8-row table
    with pytest.raises(ValueError, match=r"weight has shape \(8, 3\), expected \(1000000, 3\)"):
        emb(np.array([1, 2, 3]))
    emb.num_buckets = 8
    out = emb(np.array([1, 2, 3]))
    emb.importance.weight = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"importance.weight has shape \(1, 2\), expected \(8, 2\)"):
        emb.backward(np.ones_like(out))


# -- errors after validation leave nothing behind ------------------------------------

def test_bag_backward_keeps_the_psw_grad_when_the_fused_update_fails():
    bag = se.EmbeddingBag(10, 4, mode="sum", sparse=True, random_state=0)
    opt = se.optim.Adagrad([bag], lr=0.1)
    ids, psw = np.array([[1, 2], [3, 4]]), np.ones((2, 2), np.float32)
    out = bag(ids, per_sample_weights=psw)
    bag.backward(np.ones_like(out), optimizer=opt)
    opt.state[0]["sum"] = np.zeros((11, 4), np.float32)  # no longer fits the table
    out = bag(ids, per_sample_weights=2 * psw)
    snap = snapshot(bag.weight)
    with pytest.raises(RuntimeError, match="does not fit its table"):
        bag.backward(np.ones_like(out), optimizer=opt)
    assert bag.per_sample_weights_grad is None
    assert_unchanged(snap)


@pytest.mark.parametrize("fresh", [True, False], ids=["new state", "existing state"])
@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
def test_an_update_the_kernel_refuses_leaves_the_state_as_it_was(monkeypatch, fused, fresh):
    emb = trained_sparse_layer()
    opt = se.optim.SparseAdam([emb], lr=0.1)
    if not fresh:
        opt.step()
    before = state_snapshot(opt)

    def refuse(*args, **kwargs):
        raise TypeError("refused")

    monkeypatch.setattr(_cpu, "optim_fused_update" if fused else "optim_update_rows", refuse)
    emb(np.array([1, 2]))
    with pytest.raises(TypeError, match="refused"):
        if fused:
            emb.backward(np.ones((2, D), np.float32), optimizer=opt)
        else:
            opt.step()
    assert_state_equal(opt, before)


# -- scipy sparse input to EmbeddingBag ----------------------------------------------

def _bag_input():
    return sp.csr_array((np.ones(3, np.float32), np.array([1, 2, 3]), np.array([0, 2, 3])),
                        shape=(2, 10))


BAD_POINTERS = {
    "from -1e8": (lambda X: X.indptr.__setitem__(0, -10**8), r"row pointer runs from -100000000"),
    "past the ids": (lambda X: X.indptr.__setitem__(-1, 10**8), r"runs from 0 to 100000000"),
    "decreasing": (lambda X: X.indptr.__setitem__(1, 4), r"offsets must be non-decreasing"),
    "too long": (lambda X: setattr(X, "indptr", np.array([0, 1, 2, 3], np.int32)),
                 r"row pointer has 4 entries, expected 3"),
}


@pytest.mark.parametrize("functional", [False, True], ids=["layer", "functional"])
@pytest.mark.parametrize("edit", BAD_POINTERS)
def test_bag_input_with_an_edited_row_pointer(edit, functional):
    # the row pointer became the bag bounds unchecked: reads before and past the ids
    bag = se.EmbeddingBag(10, 4, mode="sum", random_state=0)
    X = _bag_input()
    mutate, message = BAD_POINTERS[edit]
    mutate(X)
    snap = snapshot(bag.weight, X)
    with pytest.raises(ValueError, match=message):
        if functional:
            se.functional.embedding_bag(X, bag.weight, mode="sum")
        else:
            bag(X)
    assert_unchanged(snap)


def test_bag_input_in_other_formats_pools_like_csr():
    bag = se.EmbeddingBag(10, 4, mode="sum", random_state=0)
    X = sp.csr_array(np.array([[0, 1, 2, 0], [3, 0, 0, 0.5]], np.float32))
    ref = bag(X)
    for fmt in (sp.csc_array, sp.coo_array, sp.lil_array, sp.bsr_array):
        assert_array_equal(bag(fmt(X)), ref)
    coo = sp.coo_array(X)
    coo.col[0] = 99
    with pytest.raises(ValueError, match=r"sparse input holds column index 99"):
        bag(coo)
