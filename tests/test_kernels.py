"""The compiled kernels called directly, against the numpy references."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import reference as ref
from sparsembed._kernels import _backward, _lookup, _plan

INDEX_DTYPES = [np.int32, np.int64]


def _ids(rng, n, V, dtype):
    # many duplicates: a batch drawn from few rows
    return rng.integers(0, V, size=n).astype(dtype)


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_gather_matches_take(rng, dtype, idx_dtype, n):
    weight = rng.standard_normal((50, 9)).astype(dtype)
    ids = _ids(rng, n, 50, idx_dtype)
    out = np.full((n, 9), np.nan, dtype=dtype)
    _lookup.gather(weight, ids, out, 2)
    assert_array_equal(out, ref.embedding(weight, ids))


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5, 6, 7, 8, 12, 15, 16, 17, 32, 64, 128, 256, 300])
def test_gather_copies_rows_of_every_width(rng, dtype, dim):
    # rows of 4-32, 48, 64, 128, 256 and 512 bytes are copied by fixed-size moves,
    # the others by a plain memcpy: each row exactly, nothing written past it
    # (tables at and off a line boundary: narrow rows that may straddle two lines
    # are not prefetched)
    ids = _ids(rng, 333, 40, np.int64)
    for misalign in (0, 8, 16):
        raw = np.empty(40 * dim * np.dtype(dtype).itemsize + 128, np.uint8)
        start = (-raw.ctypes.data) % 64 + misalign
        weight = raw[start:start + 40 * dim * np.dtype(dtype).itemsize].view(dtype)
        weight = weight.reshape(40, dim)
        weight[...] = rng.standard_normal((40, dim))
        for threads in (1, 2):
            out = np.full((334, dim), np.nan, dtype=dtype)  # a guard row after the output
            _lookup.gather(weight, ids, out[:333], threads)
            assert out[:333].tobytes() == weight[ids].tobytes()
            assert np.isnan(out[333]).all()


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 8])
def test_gather_of_narrow_rows_from_a_large_table(rng, dtype, dim):
    # rows of up to 32 bytes from a table past 1 MiB are prefetched (a loop of its
    # own per width): every row exact, and a bad id met in the prefetched stretch or
    # in the last ids (which prefetch nothing) is reported at its position, the
    # rows before it copied
    V = (2 << 20) // (dim * np.dtype(dtype).itemsize) + 7
    weight = rng.standard_normal((V, dim)).astype(dtype)
    weight.setflags(write=False)
    ids = rng.integers(0, V, 5000)
    for threads in (1, 2):
        out = np.full((5001, dim), np.nan, dtype=dtype)
        assert _lookup.gather(weight, ids, out[:5000], threads) == -1
        assert out[:5000].tobytes() == weight[ids].tobytes()
        assert np.isnan(out[5000]).all()
        for pos, bad_id in ((1234, V), (4999, -1), (0, 2 * V)):
            bad = ids.copy()
            bad[pos] = bad_id
            out = np.full((5000, dim), np.nan, dtype=dtype)
            assert _lookup.gather(weight, bad, out, threads) == pos
            if threads == 1:
                assert out[:pos].tobytes() == weight[ids[:pos]].tobytes()


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dim", [1, 3, 8, 16, 64])
def test_gather_reads_row_strided_tables_in_place(rng, dtype, idx_dtype, dim):
    # a column slice of a wider table (rows contiguous, further apart than dim) is
    # read where it is; tables whose rows are not contiguous, overlap or run
    # backwards are refused, before any write
    big = rng.standard_normal((60, dim + 5)).astype(dtype)
    ids = _ids(rng, 200, 60, idx_dtype)
    for weight in (big[:, :dim], big[:, 5:], big[1:50, 2:2 + dim], big[:1, :dim]):
        small_ids = ids % weight.shape[0]
        assert _lookup.rows_apart(weight)
        for threads in (1, 2):
            for stream in (False, True):
                out = np.full((200, dim), np.nan, dtype=dtype)
                assert _lookup.gather(weight, small_ids, out, threads, stream) == -1
                assert out.tobytes() == np.ascontiguousarray(weight)[small_ids].tobytes()
    bad = ids.copy()
    bad[77] = 60
    out = np.zeros((200, dim), dtype=dtype)
    assert _lookup.gather(big[:, :dim], bad, out, 2) == 77
    refused = [big[::-1, :dim]]
    if dim > 1:  # rows one value apart overlap; every other column is not contiguous
        size = np.dtype(dtype).itemsize
        refused += [np.lib.stride_tricks.as_strided(big, (60, dim), (size, size)),
                    big[:, ::2][:, :2]]
    for weight in refused:
        assert not _lookup.rows_apart(weight)
        out = np.zeros((200, weight.shape[1]), dtype=dtype)
        with pytest.raises(ValueError, match="rows are contiguous and do not overlap"):
            _lookup.gather(weight, ids % weight.shape[0], out, 2)
        assert not out.any()


def test_gather_reads_read_only_arrays(rng, dtype):
    weight = rng.standard_normal((20, 4)).astype(dtype)
    ids = _ids(rng, 30, 20, np.int64)
    weight.flags.writeable = False
    ids.flags.writeable = False
    out = np.empty((30, 4), dtype=dtype)
    _lookup.gather(weight, ids, out, 2)
    assert_array_equal(out, weight[ids])


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
def test_first_out_of_range(idx_dtype):
    ids = np.arange(1000, dtype=idx_dtype)
    assert _lookup.first_out_of_range(ids, 1000, 2) == -1
    assert _lookup.first_out_of_range(ids, 999, 2) == 999
    ids[[10, 500]] = -3
    assert _lookup.first_out_of_range(ids, 1000, 2) == 10
    assert _lookup.first_out_of_range(ids, 1000, 1) == 10
    assert _lookup.first_out_of_range(ids[:0], 1000, 2) == -1


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 100, 5000, 3_000_000])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_argsort_rows_is_a_stable_sort(rng, idx_dtype, num_rows, n_threads):
    ids = rng.integers(0, num_rows, size=777).astype(idx_dtype)
    for skip in (-1, int(ids[3])):
        keys = np.empty(ids.size, dtype=np.int64)
        perm = np.empty(ids.size, dtype=np.int64)
        m = _plan.argsort_rows(ids, skip, num_rows, keys, perm, n_threads)
        expected = np.argsort(ids, kind="stable")
        expected = expected[ids[expected] != skip]
        assert m == expected.size
        assert_array_equal(perm[:m], expected)
        assert_array_equal(keys[:m], ids[expected])


def test_argsort_rows_empty():
    out = np.empty(0, dtype=np.int64)
    assert _plan.argsort_rows(np.empty(0, dtype=np.int64), -1, 10, out, out.copy(), 2) == 0


def test_segments(rng):
    keys = np.sort(rng.integers(0, 30, size=200)).astype(np.int64)
    rows = np.empty(200, dtype=np.int64)
    starts = np.empty(201, dtype=np.int64)
    u = _plan.segments(keys, rows, starts)
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    assert u == uniq.size
    assert_array_equal(rows[:u], uniq)
    assert_array_equal(starts[:u], first)
    assert starts[u] == 200
    assert_array_equal(np.diff(starts[: u + 1]), counts)


@pytest.mark.parametrize("p", [2.0, 1.0, 0.0, 3.5, 0.5, -1.5, np.inf, -np.inf])
def test_renorm_rows_matches_reference(rng, dtype, p):
    weight = rng.standard_normal((40, 6)).astype(dtype) * 3
    weight[5, 2] = 0  # zero entries matter for p <= 0
    rows = np.array([0, 5, 7, 39], dtype=np.int64)
    expected = ref.renorm(weight, rows, 1.25, p)
    _lookup.renorm_rows(weight, rows, 1.25, p, 2)
    assert_allclose(weight, expected, **ref.tol(dtype))


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 64, 100])
def test_renorm_rows_is_thread_independent(rng, dtype, dim):
    # many rows (each thread prefetches its own ahead, up to its share's end), any
    # thread count, more threads than rows: the same bits, only the listed rows
    weight0 = rng.standard_normal((3000, dim)).astype(dtype) * 3
    rows = np.sort(rng.choice(3000, 1200, replace=False)).astype(np.int64)
    results = []
    for T in (1, 2, 3, 5000):
        weight = weight0.copy()
        _lookup.renorm_rows(weight, rows, 1.5, 2.0, T)
        results.append(weight.tobytes())
    assert all(r == results[0] for r in results)
    weight = np.frombuffer(results[0], dtype).reshape(weight0.shape)
    untouched = np.setdiff1d(np.arange(3000), rows)
    assert_array_equal(weight[untouched], weight0[untouched])
    assert_allclose(weight, ref.renorm(weight0, rows, 1.5, 2.0), **ref.tol(dtype))


def _plan_of(ids, V, skip=-1):
    keys = np.empty(ids.size, dtype=np.int64)
    perm = np.empty(ids.size, dtype=np.int64)
    m = _plan.argsort_rows(ids, skip, V, keys, perm, 2)
    rows = np.empty(m, dtype=np.int64)
    starts = np.empty(m + 1, dtype=np.int64)
    u = _plan.segments(keys[:m], rows, starts)
    return perm[:m], rows[:u], starts[: u + 1]


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
def test_dense_backward_and_row_sums(rng, dtype, scale, idx_dtype):
    V, n, D = 30, 400, 5
    ids = _ids(rng, n, V, idx_dtype)
    grad = rng.standard_normal((n, D)).astype(dtype)
    perm, rows, starts = _plan_of(ids, V)
    out = np.zeros((V, D), dtype=dtype)
    _backward.dense_backward(grad, perm, rows, starts, scale, out, 2)
    expected = ref.dense_backward(grad, ids, V, None, scale)
    assert_allclose(out, expected, **ref.tol(dtype))
    sums = np.empty((rows.size, D), dtype=dtype)
    _backward.row_sums(grad, perm, starts, scale, sums, 2)
    assert_array_equal(sums, out[rows])


@pytest.mark.parametrize("idx_dtype", INDEX_DTYPES)
def test_fill_row_csr(idx_dtype):
    rows = np.array([0, 3, 4, 9], dtype=np.int64)
    indptr = np.empty(11, dtype=idx_dtype)
    indices = np.empty(8, dtype=idx_dtype)
    _backward.fill_row_csr(rows, 10, indptr, indices, 2, 2)
    assert_array_equal(indptr, [0, 2, 2, 2, 4, 6, 6, 6, 6, 6, 8])
    assert_array_equal(indices, [0, 1] * 4)
    empty_ptr = np.empty(4, dtype=idx_dtype)
    _backward.fill_row_csr(rows[:0], 3, empty_ptr, indices[:0], 2, 2)
    assert_array_equal(empty_ptr, 0)
    # no indices: the row pointer only (the column indices are a shared array)
    indptr[:] = -1
    _backward.fill_row_csr(rows, 10, indptr, indices[:0], 2, 2)
    assert_array_equal(indptr, [0, 2, 2, 2, 4, 6, 6, 6, 6, 6, 8])
    for bad_ptr, bad_ind in ((indptr, indices[:7]), (indptr[:-1], indices)):
        with pytest.raises(ValueError, match="indptr and indices"):
            _backward.fill_row_csr(rows, 10, bad_ptr, bad_ind, 2, 2)


def _row_lists(rng, case):
    if case == "disjoint":
        return np.array([0, 4, 9], np.int64), np.array([1, 2, 10, 11], np.int64)
    if case == "identical":
        r = np.array([2, 3, 7], np.int64)
        return r, r.copy()
    if case == "a_empty":
        return np.empty(0, np.int64), np.array([5, 6], np.int64)
    if case == "b_empty":
        return np.array([5, 6], np.int64), np.empty(0, np.int64)
    if case == "both_empty":
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # random overlap
    return (np.sort(rng.choice(500, 120, replace=False)).astype(np.int64),
            np.sort(rng.choice(500, 200, replace=False)).astype(np.int64))


@pytest.mark.parametrize("case", ["disjoint", "identical", "a_empty", "b_empty", "both_empty", "random"])
def test_merge_rows_and_add_merged_rows_match_a_dict_sum(rng, dtype, case):
    rows_a, rows_b = _row_lists(rng, case)
    D = 6
    va = rng.standard_normal((rows_a.size, D)).astype(dtype)
    vb = rng.standard_normal((rows_b.size, D)).astype(dtype)
    if rows_a.size:
        va[0] = -0.0  # a row held by one side only keeps its bits (-0.0 too)
    expected = {}
    for r, v in list(zip(rows_a, va)) + list(zip(rows_b, vb)):
        expected[r] = expected[r] + v if r in expected else v.copy()
    for arr in (rows_a, rows_b, va, vb):
        arr.setflags(write=False)  # inputs may be read-only
    cap = rows_a.size + rows_b.size
    rows, fa, fb = (np.full(cap, -7, np.int64) for _ in range(3))
    n = _backward.merge_rows(rows_a, rows_b, rows, fa, fb)
    assert n == len(expected)
    assert_array_equal(rows[:n], sorted(expected))
    outs = []
    for threads in (1, 2, 3):
        for stream in (False, True):  # plain stores, or streamed through a row buffer
            out = np.full((n, D), np.nan, dtype=dtype)
            _backward.add_merged_rows(va, vb, fa[:n], fb[:n], out, threads, stream)
            outs.append(out)
            for i, r in enumerate(rows[:n]):
                assert_array_equal(out[i], expected[r])
    assert len({out.tobytes() for out in outs}) == 1
    if rows_a.size and rows_a[0] not in set(rows_b.tolist()):
        i = int(np.searchsorted(rows[:n], rows_a[0]))
        assert np.signbit(outs[0][i]).all()


def _rows_hold_all_reference(indptr, rows):
    n = indptr.shape[0]
    if n == 0 or indptr[0] != 0 or (rows.size and (rows.min() < 0 or rows.max() + 1 >= n)):
        return False
    lengths = indptr[rows + 1].astype(np.int64) - indptr[rows]
    return bool((lengths > 0).all() and lengths.sum() == indptr[-1])


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_rows_hold_all_matches_numpy(rng, idx_dtype):
    for _ in range(400):
        V = int(rng.integers(1, 12))
        lengths = rng.integers(0, 3, V) * (rng.random(V) < 0.6)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(idx_dtype)
        rows = np.flatnonzero(lengths).astype(np.int64)
        assert _backward.rows_hold_all(indptr, rows) == _rows_hold_all_reference(indptr, rows)
        assert _backward.rows_hold_all(indptr, rows)  # the row list of a real pointer
        edit = rng.integers(0, 5)
        if edit == 0 and rows.size:      # a row dropped from the list
            rows = np.delete(rows, rng.integers(0, rows.size))
        elif edit == 1:                  # an entry of the pointer changed in place
            indptr[rng.integers(0, V + 1)] += rng.choice([-2, -1, 1, 2])
        elif edit == 2:                  # a row outside the pointer
            rows = np.append(rows, rng.choice([-1, V, V + 5]))
        elif edit == 3:                  # an empty row listed
            rows = np.unique(np.append(rows, rng.integers(0, V)))
        assert _backward.rows_hold_all(indptr, rows) == _rows_hold_all_reference(indptr, rows)
    assert not _backward.rows_hold_all(np.zeros(0, idx_dtype), np.zeros(0, np.int64))
    assert _backward.rows_hold_all(np.zeros(1, idx_dtype), np.zeros(0, np.int64))


def test_merge_rows_refuses_short_outputs_before_writing():
    a = np.array([1, 2], np.int64)
    b = np.array([2, 3], np.int64)
    rows, fa, fb = np.full(3, -7, np.int64), np.full(4, -7, np.int64), np.full(4, -7, np.int64)
    with pytest.raises(ValueError, match="hold 3 rows, need 4"):
        _backward.merge_rows(a, b, rows, fa, fb)
    assert (rows == -7).all() and (fa == -7).all() and (fb == -7).all()


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_offsets_to_starts_against_numpy(dtype, rng):
    from sparsembed._kernels import _bag

    def reference(off):
        steps = np.diff(off)
        return int(np.argmax(steps < 0)) + 1 if (steps < 0).any() else -1

    cases = [np.zeros(0), np.array([0]), np.array([0, 0, 0]), np.array([0, 5, 3]),
             np.array([0, 1, 2, 1, 0]), np.cumsum(rng.integers(0, 4, 1000)) - 1]
    walk = np.cumsum(rng.integers(0, 4, 5000))
    for pos in (1, 7, 4096, 4999):  # a single step down anywhere, first or last
        bad = walk.copy()
        bad[pos] = bad[pos - 1] - 1
        cases.append(bad)
    for off in cases:
        off = np.ascontiguousarray(off, dtype=dtype)
        off.setflags(write=False)  # inputs may be read-only
        starts = np.full(off.shape[0] + 2, -7, np.int64)
        assert _bag.offsets_to_starts(off, starts) == reference(off)
        assert_array_equal(starts[: off.shape[0]], off)
        assert (starts[off.shape[0]:] == -7).all()  # nothing past the copy
    with pytest.raises(ValueError, match="starts holds 2 entries, expected at least 3"):
        _bag.offsets_to_starts(np.arange(3, dtype=dtype), np.zeros(2, np.int64))


@pytest.mark.parametrize("dim", [1, 16, 33])
def test_scatter_rows_writes_only_the_listed_rows(rng, dtype, dim):
    dst0 = rng.standard_normal((50, dim)).astype(dtype)
    rows = rng.permutation(50)[:20].astype(np.int64)
    src = rng.standard_normal((20, dim)).astype(dtype)
    expected = dst0.copy()
    expected[rows] = src
    for T in (1, 2, 3):
        dst = dst0.copy()
        _lookup.scatter_rows(src, rows, dst, T)
        assert_array_equal(dst, expected)
    bad = rows.copy()
    bad[7] = 50
    dst = dst0.copy()
    with pytest.raises(ValueError, match=r"row 50 at position 7 is outside \[0, 50\)"):
        _lookup.scatter_rows(src, bad, dst, 2)
    assert_array_equal(dst, dst0)  # nothing written
    with pytest.raises(ValueError, match="src must be"):
        _lookup.scatter_rows(src[:3], rows, dst, 2)


def test_segment_of_entries_against_numpy(rng):
    # each planned entry gets its segment's index; entries the plan skipped (padding)
    # keep what the output held; every thread count writes the same
    ids = rng.integers(0, 40, size=500)
    ids[::7] = 3  # the padding id, left out of the plan
    perm, rows, starts = _plan_of(ids, 40, skip=3)
    expected = np.full(ids.size, -9, np.int64)
    expected[perm] = np.repeat(np.arange(rows.size), np.diff(starts))
    assert (expected[ids == 3] == -9).all() and (expected[ids != 3] >= 0).all()
    for T in (1, 2, 3, 100):
        out = np.full(ids.size, -9, np.int64)
        _plan.segment_of_entries(perm, starts, out, T)
        assert_array_equal(out, expected)
    bad = perm.copy()
    bad[5] = ids.size
    out = np.full(ids.size, -9, np.int64)
    with pytest.raises(ValueError, match=f"entry {ids.size} at plan position 5 is outside"):
        _plan.segment_of_entries(bad, starts, out, 2)
    assert (out == -9).all()
    for bad_starts in (starts[::-1].copy(), np.append(starts[:-1], perm.size + 1)):
        with pytest.raises(ValueError, match="starts must be an increasing range"):
            _plan.segment_of_entries(perm, bad_starts, out, 2)
        assert (out == -9).all()


def _optimizer_call(kind, V=6, D=4, dtype=np.float32, **bad):
    """update_rows and fused_update arguments that fit a (V, D) table, with any of
    them replaced by ``bad``."""
    from sparsembed._kernels import _optim

    code = getattr(_optim, "KIND_" + kind)
    width = 1 if kind == "ROWWISE_ADAGRAD" else D
    args = dict(
        weight=np.ones((V, D), dtype), rows=np.array([1, 4], np.int64),
        values=np.ones((2, D), dtype), grad=np.ones((3, D), dtype),
        perm=np.array([0, 2, 1], np.int64), starts=np.array([0, 2, 3], np.int64),
        s1=np.ones((V if kind != "SGD" else 0, width), dtype),
        s2=np.ones((V if kind == "SPARSE_ADAM" else 0, D), dtype))
    args.update(bad)
    hyper = (code, 0.1, 0.0, 0.0, 1e-8, 0.1, 0.001, 0.0)
    return _optim, hyper, args


OPTIMIZER_KINDS = ["SGD", "ADAGRAD", "SPARSE_ADAM", "ROWWISE_ADAGRAD"]


def _bad_update_args(kind, V=6, D=4):
    cases = {
        "row past the table": (dict(rows=np.array([1, V], np.int64)), r"rows run from 1 to 6"),
        "negative row": (dict(rows=np.array([-1, 4], np.int64)), r"rows run from -1 to 4"),
        "narrow values": (dict(values=np.ones((2, D - 1), np.float32), grad=np.ones((3, D - 1), np.float32)),
                          r"values has shape \(2, 3\)|grad has 3 columns"),
        "short s2": (dict(s2=np.ones((V - 1, D), np.float32)), r"state s2 has shape \(5, 4\)"),
    }
    if kind != "SGD":
        cases["short s1"] = (dict(s1=np.ones((V - 1, 1 if kind == "ROWWISE_ADAGRAD" else D),
                                             np.float32)), r"state s1 has shape \(5, ")
        cases["no s1"] = (dict(s1=np.ones((0, D), np.float32)), r"state s1 has shape \(0, 4\)")
        cases["s1 of the wrong width"] = (dict(s1=np.ones((V, 2), np.float32)),
                                          r"state s1 has shape \(6, 2\)")
    return cases


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
@pytest.mark.parametrize("fused", [False, True], ids=["update_rows", "fused_update"])
def test_optimizer_kernels_refuse_arguments_that_do_not_fit_the_table(kind, fused):
    # the Python layer validates; the kernels still refuse, in O(1), rows and state
    # that would send them past the table (a path that skipped the validation)
    for name, (bad, message) in _bad_update_args(kind).items():
        if kind == "SGD" and name == "short s2":
            message = r"state s2 has shape|SGD keeps no second state"
        _optim, hyper, a = _optimizer_call(kind, **bad)
        before = {k: v.copy() for k, v in a.items()}
        with pytest.raises(ValueError, match=message):
            if fused:
                _optim.fused_update(*hyper, a["weight"], a["grad"], a["perm"], a["rows"],
                                    a["starts"], np.empty(0, np.int64),
                                    np.empty(0, a["weight"].dtype), np.empty((0, 0), np.uint64),
                                    False, a["s1"], a["s2"], 2)
            else:
                _optim.update_rows(*hyper, a["weight"], a["rows"], False, a["values"], a["s1"],
                                   a["s2"], 2)
        for k, v in a.items():
            assert_array_equal(v, before[k], err_msg=f"{name}: {k} changed")
    _optim, hyper, a = _optimizer_call(kind)  # the fitting arguments run
    _optim.update_rows(*hyper, a["weight"], a["rows"], False, a["values"], a["s1"], a["s2"], 2)
    assert not np.array_equal(a["weight"][[1, 4]], 1) and np.array_equal(a["weight"][0], [1] * 4)


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
@pytest.mark.parametrize("D", [1, 5, 64, 4097])
def test_dense_update_of_every_row_equals_the_update_row_by_row(rng, dtype, kind, D):
    # every row of a dense gradient goes to the update in runs of rows (one long row
    # to it where columns are independent): the bits of one call per row, any
    # thread count; momentum, weight decay and the first step's branches included
    from sparsembed._kernels import _optim

    V = 1000
    code = getattr(_optim, f"KIND_{kind}")
    width = 1 if kind == "ROWWISE_ADAGRAD" else D
    hypers = [(code, 0.1, 0.0, 0.0, 1e-8, 0.1, 0.001, 0.0),
              (code, 0.05, 0.9, 0.01, 1e-6, 0.9, 0.0, 1.0),  # SGD: Nesterov, later step
              (code, 0.05, 0.9, 0.01, 1e-6, 0.9, 1.0, 0.0)]  # SGD: first step
    for hyper in hypers:
        momentum = kind != "SGD" or hyper[2] != 0
        weight = rng.standard_normal((V, D)).astype(dtype)
        values = rng.standard_normal((V, D)).astype(dtype)
        values[::7, 0] = -0.0
        s1 = np.abs(rng.standard_normal((V if momentum else 0, width))).astype(dtype)
        s2 = np.abs(rng.standard_normal((V if kind == "SPARSE_ADAM" else 0, D))).astype(dtype)
        ref = [a.copy() for a in (weight, s1, s2)]
        _optim.update_rows(*hyper, ref[0], np.arange(V, dtype=np.int64), False, values,
                           ref[1], ref[2], 1)
        for T in (1, 2, 3):
            got = [a.copy() for a in (weight, s1, s2)]
            _optim.update_rows(*hyper, got[0], np.empty(0, np.int64), True, values, got[1],
                               got[2], T)
            for a, b in zip(got, ref):
                assert a.tobytes() == b.tobytes(), (hyper, T)
        assert not np.array_equal(ref[0], weight)


def test_fused_update_refuses_segment_bounds_past_the_plan():
    _optim, hyper, a = _optimizer_call("ADAGRAD")
    empty = (np.empty(0, np.int64), np.empty(0, np.float32), np.empty((0, 0), np.uint64))
    for starts in (np.array([0, 2], np.int64), np.array([0, 2, 9], np.int64),
                   np.array([-1, 2, 3], np.int64)):
        with pytest.raises(ValueError, match="starts must bound 2 segments of perm's 3 entries"):
            _optim.fused_update(*hyper, a["weight"], a["grad"], a["perm"], a["rows"], starts,
                                *empty, False, a["s1"], a["s2"], 1)
    assert_array_equal(a["weight"], 1)

