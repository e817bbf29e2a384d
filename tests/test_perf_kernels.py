"""The fast paths of the core kernels (issue 6): the 32-bit row plan (counting and
radix sorts), work-balanced row sums, prefetching gather, against numpy."""

import os

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_array_equal

import sparsembed as se
from sparsembed import _cpu
from sparsembed._kernels import _backward, _bag, _lookup, _plan


def _expected_plan(ids, skip):
    order = np.argsort(ids, kind="stable")
    order = order[ids[order] != skip]
    rows, first = np.unique(ids[order], return_index=True)
    return order, rows, np.append(first, order.size)


def _zipf_ids(rng, n, V, dtype):
    ranks = np.minimum(rng.zipf(1.3, n) - 1, V - 1)
    return rng.permutation(V)[ranks].astype(dtype)


def _planned_batch(rng, dist, V, n, dim, dtype):
    """n ids over V rows (uniform or Zipf), a (n, dim) grad_output and their plan."""
    ids = rng.integers(0, V, size=n) if dist == "uniform" else _zipf_ids(rng, n, V, np.int64)
    grad = rng.standard_normal((n, dim)).astype(dtype)
    return ids, grad, _cpu.plan_rows(ids, V)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("num_rows", [1, 2, 100, 4096, 5000, 70_000, 3_000_000, 2 ** 31 - 1])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
@pytest.mark.parametrize("n", [3001, 5003])
def test_build_plan_is_a_stable_sort_with_segments(rng, idx_dtype, num_rows, n_threads, dist, n):
    # 1 to 4096 rows take the counting path (num_rows <= max(n, 4096)), more rows the
    # radix path: 3001 ids on digits of at most 8 bits, 5003 on wider ones
    if dist == "uniform":
        ids = rng.integers(0, num_rows, size=n).astype(idx_dtype)
    else:
        ids = _zipf_ids(rng, n, min(num_rows, 10 ** 7), idx_dtype)
    for skip in (-1, int(ids[3]), num_rows + 5):
        perm = np.full(n, -7, dtype=np.int64)
        rows = np.full(n, -7, dtype=np.int64)
        starts = np.full(n + 1, -7, dtype=np.int64)
        m, u = _plan.build_plan(ids, skip, num_rows, perm, rows, starts, n_threads)
        order, exp_rows, exp_starts = _expected_plan(ids, skip)
        assert m == order.size
        assert u == exp_rows.size
        assert_array_equal(perm[:m], order)
        assert_array_equal(rows[:u], exp_rows)
        assert_array_equal(starts[: u + 1], exp_starts)


def test_build_plan_large_batch_matches_numpy(rng):
    # long enough for every thread to own a real chunk, on both sort paths (on 2
    # threads counting up to n / 8 rows: 20,000; radix above: 50,000 and 1e6)
    for V in (20_000, 50_000, 1_000_000):
        ids = rng.integers(0, V, size=200_003)
        perm = np.empty(ids.size, dtype=np.int64)
        rows = np.empty(ids.size, dtype=np.int64)
        starts = np.empty(ids.size + 1, dtype=np.int64)
        m, u = _plan.build_plan(ids, 17, V, perm, rows, starts, 2)
        order, exp_rows, exp_starts = _expected_plan(ids, 17)
        assert_array_equal(perm[:m], order)
        assert_array_equal(rows[:u], exp_rows)
        assert_array_equal(starts[: u + 1], exp_starts)


@pytest.mark.parametrize("dist", ["uniform", "zipf", "one_hot_row"])
def test_build_plan_one_region_sort_any_team(rng, dist):
    # the radix plan runs its passes in one parallel region with spinning barriers;
    # more threads than cores (7) must neither hang nor change a bit, and a hot row
    # (more than 1/64 of the ids on one digit) takes the interleaved sub-chunk
    # scatter, an even spread the plain one
    V, n = 1_000_000, 50_001
    if dist == "uniform":
        ids = rng.integers(0, V, size=n)
    elif dist == "zipf":
        ids = _zipf_ids(rng, n, V, np.int64)
    else:
        ids = rng.integers(0, V, size=n)
        ids[rng.random(n) < 0.3] = 123_457
    order, exp_rows, exp_starts = _expected_plan(ids, 99)
    for T in (1, 2, 3, 7):
        for scratch in (None, np.empty(_plan.plan_scratch_size(n, V, T), dtype=np.uint64)):
            perm = np.full(n, -7, dtype=np.int64)
            rows = np.full(n, -7, dtype=np.int64)
            starts = np.full(n + 1, -7, dtype=np.int64)
            m, u = _plan.build_plan(ids, 99, V, perm, rows, starts, T, scratch)
            assert (m, u) == (order.size, exp_rows.size)
            assert_array_equal(perm[:m], order)
            assert_array_equal(rows[:u], exp_rows)
            assert_array_equal(starts[: u + 1], exp_starts)
    with pytest.raises(ValueError, match="plan_scratch_size"):
        _plan.build_plan(ids, -1, V, perm, rows, starts, 2, np.empty(2 * n, dtype=np.uint64))


def _regular_batches(rng, V, n):
    """Unsorted id arrays of the radix path whose digits are spread evenly (no hot
    digit): random, regular strides (every bucket's stream advancing in lockstep),
    and buckets too small to fill a line."""
    yield "uniform", rng.integers(0, V, size=n)
    step = max(V // n, 1)
    yield "reversed arange", (np.arange(n) * step)[::-1] % V
    yield "tiled arange", np.tile(np.arange(n // 4 + 1) * step, 4)[:n] % V
    yield "halves swapped", np.roll(np.arange(n) * step % V, n // 2)
    # 70 low digits (each under 1/64 of the ids) plus random ids scattered over
    # every bucket, 0-3 of them each: ranges that start and end inside one line
    few = (rng.integers(0, V >> 13, size=n) << 13) | rng.integers(0, 70, size=n)
    scattered = rng.integers(0, V, size=n // 100)
    few[rng.choice(n, size=scattered.size, replace=False)] = scattered
    yield "few digits", few % V


@pytest.mark.parametrize("V", [1_000_000, 2 ** 31 - 1])
def test_build_plan_write_combined_scatter(rng, V):
    # from WC_MIN_IDS (2**17) ids on, the scatter of spread-out digits collects each
    # bucket's words in a line of its own and stores whole lines; a bucket's first
    # and last lines, shared with its neighbours (other buckets, other threads'
    # ranges), go out word by word. Every alignment of the scratch moves where the
    # lines fall; 2**31 - 1 rows sort in 3 passes, 1e6 in 2.
    n = (1 << 17) + 13
    for name, ids in _regular_batches(rng, V, n):
        ids = ids.astype(np.int64)
        skip = int(ids[n // 3])
        order, exp_rows, exp_starts = _expected_plan(ids, skip)
        for T, offset in ((1, 0), (2, 1), (2, 6), (3, 3), (7, 5)):
            size = _plan.plan_scratch_size(n, V, T)
            scratch = np.full(size + offset, 2 ** 63, dtype=np.uint64)[offset:]
            perm = np.full(n, -7, dtype=np.int64)
            rows = np.full(n, -7, dtype=np.int64)
            starts = np.full(n + 1, -7, dtype=np.int64)
            m, u = _plan.build_plan(ids, skip, V, perm, rows, starts, T, scratch)
            assert (m, u) == (order.size, exp_rows.size), (name, T)
            assert_array_equal(perm[:m], order, err_msg=f"{name} T={T} offset={offset}")
            assert_array_equal(rows[:u], exp_rows, err_msg=f"{name} T={T}")
            assert_array_equal(starts[: u + 1], exp_starts, err_msg=f"{name} T={T}")


def _sorted_batches(rng, V, n):
    """Sorted id arrays of the radix path (and near misses that are not sorted)."""
    uniform = np.sort(rng.integers(0, V, size=n))
    yield "arange", np.arange(n) * (V // n)
    yield "sorted uniform", uniform
    yield "sorted zipf", np.sort(_zipf_ids(rng, n, V, np.int64))
    yield "one id", np.full(n, 777)
    yield "two runs", np.repeat([5, V - 1], [n // 3, n - n // 3])
    last_down = uniform.copy()
    last_down[-1] = 0                         # one descent, at the very end
    yield "last descends", last_down
    halves = np.roll(uniform, n // 2)        # each half sorted, not the whole
    yield "halves swapped", halves


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_build_plan_sorted_ids(rng, idx_dtype):
    # sorted ids skip the radix passes (their plan is the identity less skip_row's
    # run); arrays that are sorted in every chunk but one place must still sort
    V, n = 1_000_000, 50_001
    for name, ids in _sorted_batches(rng, V, n):
        ids = ids.astype(idx_dtype)
        skips = {-1, V + 5, 0, int(ids[0]), int(ids[n // 2]), int(ids[-1]), 777, 5, V - 1}
        for skip in sorted(skips):
            order, exp_rows, exp_starts = _expected_plan(ids, skip)
            for T in (1, 2, 3, 7):
                perm = np.full(n, -7, dtype=np.int64)
                rows = np.full(n, -7, dtype=np.int64)
                starts = np.full(n + 1, -7, dtype=np.int64)
                m, u = _plan.build_plan(ids, skip, V, perm, rows, starts, T)
                assert (m, u) == (order.size, exp_rows.size), (name, skip, T)
                assert_array_equal(perm[:m], order, err_msg=f"{name} skip={skip} T={T}")
                assert_array_equal(rows[:u], exp_rows, err_msg=f"{name} skip={skip} T={T}")
                assert_array_equal(starts[: u + 1], exp_starts, err_msg=f"{name} {skip} {T}")


@pytest.mark.parametrize("V", [3000, 1_000_000, 2 ** 31 - 1])
@pytest.mark.parametrize("n", [3001, (1 << 17) + 13])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_build_plan_reports_ids_out_of_range(rng, V, n, idx_dtype):
    # the plan checks the ids while it counts them, on every path: counting (where
    # a bad id would index the histogram), radix on sorted ids, radix with word by
    # word and with write-combined scatter; a bad id equal to skip_row is still bad
    base = rng.integers(0, V, size=n)
    info = np.iinfo(idx_dtype)
    bads = [b for b in (V, -1, V + 7, 2 ** 40) if info.min <= b <= info.max]
    perm = np.empty(n, dtype=np.int64)
    rows = np.empty(n, dtype=np.int64)
    starts = np.empty(n + 1, dtype=np.int64)
    for arr in (base, np.sort(base)):
        for bad in bads:
            for where in (0, n - 1):
                ids = arr.astype(idx_dtype)
                ids[where] = bad
                for skip in (-1, bad):
                    for T in (1, 2, 3):
                        got = _plan.build_plan(ids, skip, V, perm, rows, starts, T)
                        assert got == (-1, 0), (bad, where, skip, T)


def test_plan_rows_names_the_first_bad_id(rng):
    # through the Python layer: IndexError names the first bad id of the batch
    # (not the first one a thread happened to see), on both sort paths
    from sparsembed import _cpu

    for V in (5000, 1_000_000):
        ids = rng.integers(0, V, size=200_003)
        ids[150_001] = V
        ids[20_000] = -4
        ids[199_000] = V + 1
        with pytest.raises(IndexError, match=f"index -4 at position 20000 is out of range for {V}"):
            _cpu.plan_rows(ids, V, check_range=True)
        with pytest.raises(IndexError, match="index -4 at position 20000"):
            _cpu.plan_rows(ids, V)  # said to be checked: a bad id still never passes
    with pytest.raises(IndexError, match="index 0 at position 0 is out of range for 0"):
        _cpu.plan_rows(np.zeros(3, dtype=np.int64), 0, check_range=True)


def test_build_plan_sorted_tiny_batches():
    # fewer ids than threads, every id skipped, a skipped run at either end
    V = 10 ** 6
    for ids in ([3], [3, 3], [1, 2], [0, 999_999], [4, 4, 4, 9], [1, 9, 9, 9]):
        ids = np.asarray(ids, dtype=np.int64)
        for skip in (-1, 3, 4, 9, 1, 0):
            order, exp_rows, exp_starts = _expected_plan(ids, skip)
            for T in (1, 2, 7):
                perm = np.full(ids.size, -7, dtype=np.int64)
                rows = np.full(ids.size, -7, dtype=np.int64)
                starts = np.full(ids.size + 1, -7, dtype=np.int64)
                m, u = _plan.build_plan(ids, skip, V, perm, rows, starts, T)
                assert (m, u) == (order.size, exp_rows.size)
                assert_array_equal(perm[:m], order)
                assert_array_equal(rows[:u], exp_rows)
                assert_array_equal(starts[: u + 1], exp_starts)


def test_build_plan_edge_cases():
    out = np.empty(0, dtype=np.int64)
    starts = np.empty(1, dtype=np.int64)
    assert _plan.build_plan(out, -1, 10, out, out, starts, 2) == (0, 0)
    assert starts[0] == 0
    # every id is the skipped one
    ids = np.full(10, 3, dtype=np.int64)
    perm, rows, starts = np.empty(10, np.int64), np.empty(10, np.int64), np.empty(11, np.int64)
    for V in (5, 10 ** 6):
        assert _plan.build_plan(ids, 3, V, perm, rows, starts, 2) == (0, 0)
        assert starts[0] == 0
    with pytest.raises(ValueError, match="32 bits"):
        _plan.build_plan(ids, -1, 2 ** 33, perm, rows, starts, 2)


def test_plan_rows_paths_agree(rng):
    # the 32-bit plan and the int64 fallback give the same RowPlan
    ids = rng.integers(0, 5000, size=2000)
    fast = _cpu.plan_rows(ids, 5000, skip_row=int(ids[0]))
    keys = np.empty(ids.size, np.int64)
    perm = np.empty(ids.size, np.int64)
    m = _plan.argsort_rows(ids, int(ids[0]), 5000, keys, perm, 2)
    assert_array_equal(fast.perm, perm[:m])
    assert fast.skipped


@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_row_sums_balanced_partition_is_thread_independent(rng, dtype, dist, threads):
    # Zipf: one segment holds a large share of the batch; the per-thread blocks are
    # cut by grad rows, not by segments, and must not change a single bit
    V, n, dim = 3000, 20_000, 5
    ids, grad, plan = _planned_batch(rng, dist, V, n, dim, dtype)
    results = {}
    for T in (1, 2, 3, 7):
        sums = np.empty((plan.rows.size, dim), dtype=dtype)
        _backward.row_sums(grad, plan.perm, plan.starts, False, sums, T)
        dense = np.zeros((V, dim), dtype=dtype)
        _backward.dense_backward(grad, plan.perm, plan.rows, plan.starts, True, dense, T)
        # the fill variant cuts its blocks by entries and output rows together
        filled = np.full((V, dim), np.nan, dtype=dtype)
        _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, True, filled, T)
        assert filled.tobytes() == dense.tobytes()
        results[T] = (sums, dense)
    ref = np.zeros((V, dim), dtype=np.float64)
    np.add.at(ref, ids, grad.astype(np.float64))
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(results[1][0], ref[plan.rows], rtol=rtol, atol=rtol)
    counts = np.bincount(ids, minlength=V)[:, None]
    np.testing.assert_allclose(results[1][1], ref / np.maximum(counts, 1), rtol=rtol, atol=rtol)
    for T in (2, 3, 7):
        assert_array_equal(results[T][0], results[1][0])
        assert_array_equal(results[T][1], results[1][1])


@pytest.mark.parametrize("dim", [6, 40])
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "sparse_adam"])
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_fused_update_split_by_row_cost_is_thread_independent(rng, dtype, dist, kind, dim):
    # the fused update cuts the plan into per-thread blocks by entries + row_cost per
    # row; any cut (row_cost 0 = by entries only, huge = by rows only) and any thread
    # count must give the same bits, equal to the separate row sums + update (dim 40:
    # vector chunks and a column tail in the SIMD row sums)
    from sparsembed._kernels import _optim

    V, n = 2000, 12_000
    _, grad, plan = _planned_batch(rng, dist, V, n, dim, dtype)
    code = {"sgd": _optim.KIND_SGD, "adagrad": _optim.KIND_ADAGRAD,
            "sparse_adam": _optim.KIND_SPARSE_ADAM}[kind]
    hyper = (code, 0.05, 0.0, 0.0, 1e-8, 0.1, 0.001, 0.0)
    w0 = rng.standard_normal((V, dim)).astype(dtype)
    s_width = 0 if kind == "sgd" else V
    s1_0 = np.abs(rng.standard_normal((s_width, dim))).astype(dtype)
    s2_0 = np.abs(rng.standard_normal((V if kind == "sparse_adam" else 0, dim))).astype(dtype)
    empty_i, empty_f = np.empty(0, np.int64), np.empty(0, dtype)

    sums = np.empty((plan.rows.size, dim), dtype=dtype)
    _backward.row_sums(grad, plan.perm, plan.starts, False, sums, 1)
    w_ref, s1_ref, s2_ref = w0.copy(), s1_0.copy(), s2_0.copy()
    _optim.update_rows(*hyper, w_ref, plan.rows, False, sums, s1_ref, s2_ref, 1)
    assert not np.array_equal(w_ref, w0)
    for T in (1, 2, 3, 7):
        for row_cost in (0, 1, 4, 10 ** 6):
            w, s1, s2 = w0.copy(), s1_0.copy(), s2_0.copy()
            _optim.fused_update(*hyper, w, grad, plan.perm, plan.rows, plan.starts, empty_i,
                                empty_f, np.empty((0, 0), np.uint64), False, s1, s2, T,
                                row_cost)
            assert w.tobytes() == w_ref.tobytes()
            assert s1.tobytes() == s1_ref.tobytes()
            assert s2.tobytes() == s2_ref.tobytes()
    w = w0.copy()
    with pytest.raises(ValueError, match="row_cost must be >= 0, got -1"):
        _optim.fused_update(*hyper, w, grad, plan.perm, plan.rows, plan.starts, empty_i,
                            empty_f, np.empty((0, 0), np.uint64), False, s1_0.copy(),
                            s2_0.copy(), 2, -1)
    assert_array_equal(w, w0)


@pytest.mark.parametrize("dim", [1, 3, 16, 64, 300])
def test_gather_prefetch_tail_and_row_sizes(rng, dtype, dim):
    # every prefetch distance (4..32 rows) and the last rows of each chunk
    weight = rng.standard_normal((97, dim)).astype(dtype)
    for n in (1, 5, 33, 200):
        ids = rng.integers(0, 97, size=n)
        for T in (1, 2, 3):
            out = np.empty((n, dim), dtype=dtype)
            _lookup.gather(weight, ids, out, T)
            assert_array_equal(out, weight[ids])


def _at_alignment(count, dtype, misalign):
    """A NaN-filled 1-D array of ``count`` elements starting ``misalign`` bytes past a
    64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.full(count * itemsize + 128, 0xFF, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign
    return raw[start:start + count * itemsize].view(dtype)


@pytest.mark.parametrize("dim", [1, 3, 4, 5, 16, 24, 64, 300])
@pytest.mark.parametrize("misalign", [0, 16, 32, 48, 4])
def test_gather_with_streaming_stores(rng, dtype, dim, misalign):
    # 64-byte non-temporal stores on line-aligned rows (where the CPU has AVX-512F),
    # on 16-byte aligned rows 16-byte ones up to the next line and 64-byte ones from
    # there, plain copies for the rest (rows whose size is not a multiple of 16);
    # bits are copied as they are (-0.0, NaN payloads)
    weight = rng.standard_normal((97, dim)).astype(dtype)
    weight[3, 0] = -0.0
    payload_nan = {np.float32: np.uint32(0x7FC00001), np.float64: np.uint64(0x7FF8000000000001)}
    weight[5, :] = payload_nan[np.dtype(dtype).type].view(dtype)  # NaNs with a payload
    for n in (1, 5, 33, 200):
        ids = rng.integers(0, 97, size=n)
        ids[0] = 5
        ids[-1] = 3
        for T in (1, 2, 3):
            out = _at_alignment(n * dim, dtype, misalign).reshape(n, dim)
            _lookup.gather(weight, ids, out, T, True)
            assert out.tobytes() == weight[ids].tobytes()


def test_large_lookups_stream_and_match(rng, monkeypatch, dtype):
    from sparsembed import functional as F

    weight = rng.standard_normal((1000, 24)).astype(dtype)
    ids = rng.integers(0, 1000, size=(50, 7))
    plain = F.embedding(ids, weight)
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)  # every output streamed
    assert_array_equal(F.embedding(ids, weight), plain)
    assert_array_equal(plain, weight[ids])


def test_large_bag_outputs_stream_and_match(rng, monkeypatch, dtype):
    # many small bags make a large output: above STREAM_BYTES the pooling streams it
    from sparsembed import functional as F

    weight = rng.standard_normal((1000, 24)).astype(dtype)
    ids = rng.integers(0, 1000, size=90)
    offsets = np.arange(0, 90, 3)
    psw = rng.standard_normal(90).astype(dtype)
    calls = []
    kernel = _cpu._bag.bag_forward

    def spy(*args):
        calls.append(args[-1])
        return kernel(*args)

    monkeypatch.setattr(_cpu._bag, "bag_forward", spy)
    cases = [dict(mode="sum"), dict(mode="mean", padding_idx=int(ids[0])),
             dict(mode="sum", per_sample_weights=psw)]
    plain = [F.embedding_bag(ids, weight, offsets, **kw) for kw in cases]
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)  # every output streamed
    for kw, want in zip(cases, plain):
        assert F.embedding_bag(ids, weight, offsets, **kw).tobytes() == want.tobytes()
    assert calls == [False] * 3 + [True] * 3
    np.testing.assert_allclose(plain[0], weight[ids].reshape(30, 3, 24).sum(axis=1),
                               rtol=1e-5, atol=1e-5)


def test_threads_for():
    from sparsembed._threads import PARALLEL_GRAIN, threads_for

    if not se.show_config()["openmp"]:
        pytest.skip("a serial build always uses one thread")
    previous = se._threads._num_threads
    try:
        se.set_num_threads(4)
        assert threads_for(0) == 1
        assert threads_for(PARALLEL_GRAIN) == 1
        assert threads_for(2 * PARALLEL_GRAIN) == 2
        assert threads_for(100 * PARALLEL_GRAIN) == 4
        se.set_num_threads(1)
        assert threads_for(100 * PARALLEL_GRAIN) == 1
    finally:
        se._threads._num_threads = previous


@pytest.mark.parametrize("environ,spin", [
    ({}, True),                                        # libgomp's default spins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    ({"OMP_WAIT_POLICY": " passive "}, False),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, True),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}, True),  # count wins
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10k"}, True),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "infinite"}, True),
    ({"GOMP_SPINCOUNT": "0"}, False),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "lots"}, False),  # not a count
])
def test_workers_spin_reads_the_environment_as_libgomp(environ, spin):
    from sparsembed._threads import workers_spin

    assert workers_spin(environ) is spin


def test_grains_follow_the_wait_policy(tmp_path):
    # a fresh interpreter reads the policy at import, as libgomp does at start-up;
    # it imports the package under test (not a source tree in its working folder)
    import os
    import subprocess
    import sys

    code = ("from sparsembed import _cpu, _rowsparse, _threads; "
            "print(_cpu.ROW_MOVE_GRAIN, _cpu.ROW_GATHER_GRAIN, _rowsparse.CSR_FILL_GRAIN, "
            "_cpu.PLAN_RADIX_GRAIN, _cpu.OPTIM_GRAIN, _threads.ROW_WRITE_GRAIN)")
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(se.__file__)))
    grains = {}
    for policy in ("PASSIVE", "ACTIVE"):
        env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
        env["OMP_WAIT_POLICY"] = policy
        env["PYTHONPATH"] = package_parent
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True, cwd=tmp_path)
        grains[policy] = tuple(int(g) for g in done.stdout.split())
    assert grains == {"PASSIVE": (1 << 19, 1 << 20, 3 << 18, 1 << 16, 3 << 17, 1 << 18),
                      "ACTIVE": (1 << 17, 1 << 17, 1 << 17, 1 << 15, 1 << 16, 1 << 17)}


def test_row_sums_of_a_cached_grad_output_wait_longer_for_a_second_thread():
    from sparsembed._threads import ROW_MOVE_GRAIN

    prev = se.get_num_threads()
    se.set_num_threads(2)
    try:
        n = 3 * ROW_MOVE_GRAIN // 64  # entries of 64 columns: 1.5 x the two-thread line
        cached = np.empty((_cpu.CACHED_GRAD_BYTES // 256, 64), np.float32)
        large = np.empty((_cpu.CACHED_GRAD_BYTES // 256 + 1, 64), np.float32)
        two = se.get_num_threads()  # 1 in a build without OpenMP
        assert _cpu._row_sums_threads(cached, n) == 1
        assert _cpu._row_sums_threads(large, n) == two
        assert _cpu._row_sums_threads(cached, 4 * n) == two
    finally:
        se.set_num_threads(prev)


def test_update_work_counts_weight_grad_and_state_rows():
    none = np.empty((0, 1), np.float32)
    full, per_row = np.zeros((100, 8), np.float32), np.zeros((100, 1), np.float32)
    assert _cpu._update_work(10, 8, none, none) == 10 * 16  # SGD
    assert _cpu._update_work(10, 8, full, none) == 10 * 24  # Adagrad, momentum SGD
    assert _cpu._update_work(10, 8, full, full) == 10 * 32  # SparseAdam
    assert _cpu._update_work(10, 8, per_row, none) == 10 * 17  # RowWiseAdagrad


# --------------------------------------------------------------------------------------
# the output-buffer cache


def test_pool_reuses_released_buffers_and_arrays_behave():
    import copy
    import pickle

    from sparsembed._kernels import _pool

    _pool.clear()
    a = _pool.empty((1000, 300), np.float32)
    assert a.shape == (1000, 300) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    a[:] = 3.0
    addr = a.__array_interface__["data"][0]
    assert pickle.loads(pickle.dumps(a)).sum() == a.sum()
    assert copy.deepcopy(a).sum() == a.sum()
    v = a[10:20]
    del a
    assert _pool.stats()["idle_buffers"] == 0  # the view keeps the buffer alive
    del v
    assert _pool.stats()["idle_buffers"] == 1
    b = _pool.empty((1000, 299), np.float32)  # a similar size reuses it
    assert b.__array_interface__["data"][0] == addr
    assert _pool.stats()["idle_buffers"] == 0
    del b
    small = _pool.empty((3, 4), np.float64)  # small arrays are plain numpy arrays
    assert small.base is None
    _pool.clear()
    assert _pool.stats()["idle_bytes"] == 0


def test_pool_takes_any_integer_extents():
    # shapes arrive as tuples of Python or numpy ints (an array's .shape, n_rows from
    # a kernel's return, a dim from weight.shape), on both the cached and plain paths
    from sparsembed._kernels import _pool

    for shape in [(np.int64(1000), 300), [np.int32(3), np.uint8(4)], (np.intp(70_000),), ()]:
        a = _pool.empty(shape, np.float32)
        assert a.shape == tuple(int(s) for s in shape) and a.dtype == np.float32
    with pytest.raises(TypeError):
        _pool.empty((2.5, 4), np.float32)
    _pool.clear()


def test_pool_serves_mid_sized_outputs_in_small_blocks():
    # outputs from 128 KiB on come from the pool (glibc may return such blocks to
    # the OS between steps: a page fault per 4 KiB on every call); blocks under
    # 4 MiB are rounded up by at most a sixteenth, so many small live outputs do
    # not each hold 2 MiB
    from sparsembed._kernels import _pool

    _pool.clear()
    assert _pool.MIN_BYTES == 1 << 17
    below = _pool.empty((_pool.MIN_BYTES // 4 - 1,), np.float32)
    assert below.base is None
    arrays = [_pool.empty((1000, 33), np.float32) for _ in range(20)]  # 132,000 bytes
    assert all(a.base is not None for a in arrays)
    addrs = {a.__array_interface__["data"][0] for a in arrays}
    assert len(addrs) == 20
    del arrays
    stats = _pool.stats()
    assert stats["idle_buffers"] == 20
    assert stats["idle_bytes"] == 20 * 17 * 8192  # 132,000 bytes -> 17 x 8 KiB
    again = _pool.empty((1000, 34), np.float32)  # 136,000 bytes: fits an idle block
    assert again.__array_interface__["data"][0] in addrs
    del again
    big = _pool.empty((1 << 20,), np.float32)  # 4 MiB and up: whole 2 MiB granules
    del big
    assert _pool.stats()["idle_bytes"] == 20 * 17 * 8192 + (4 << 20)
    _pool.clear()


def test_pool_limit_and_off_switch():
    from sparsembed._kernels import _pool

    old = _pool.set_limit(3 << 20)
    try:
        _pool.clear()
        arrays = [_pool.empty((1 << 18,), np.float32) for _ in range(3)]  # 1 MiB each
        del arrays
        assert _pool.stats()["idle_bytes"] <= 3 << 20
        _pool.set_limit(0)
        assert _pool.stats()["idle_buffers"] == 0
        a = _pool.empty((1 << 20,), np.float32)
        assert a.base is None  # off: numpy's own allocation
    finally:
        _pool.set_limit(old)
        _pool.clear()


def test_pool_default_limit_scales_with_the_memory(run_python, monkeypatch):
    # a training step's outputs must fit in the cache, or each step faults in again
    # what the one before evicted: an eighth of the memory, from 1 GiB to 4 GiB
    from sparsembed._kernels import _pool

    GiB = 1 << 30
    assert _pool.default_limit(None) == GiB
    assert _pool.default_limit(2 * GiB) == GiB
    assert _pool.default_limit(24 * GiB) == 3 * GiB
    assert _pool.default_limit(512 * GiB) == 4 * GiB
    memory = _pool._memory_bytes()
    assert memory is None or 0 < memory <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    code = "from sparsembed._kernels import _pool; print(_pool.stats()['limit'])"
    for raw, expected in [("12345", 12345), ("0", 0), ("2e9", 2 * 10 ** 9), ("-5", 0),
                          ("lots", _pool.default_limit(memory)),
                          ("", _pool.default_limit(memory)),
                          # past any memory (the import failed with OverflowError)
                          ("1e30", 1 << 62), (str(1 << 64), 1 << 62), ("inf", None)]:
        out = run_python(code, env={"SPARSEMBED_POOL_BYTES": raw}).stdout
        assert int(out) == (_pool.default_limit(memory) if expected is None else expected), raw
    old = _pool.set_limit(1 << 64)
    try:
        assert _pool.stats()["limit"] == 1 << 62
    finally:
        _pool.set_limit(old)
    # idle buffers count against the process's address-space limit (ulimit -v)
    if memory is not None and memory > 16 * GiB:
        limited = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (12 << 30, "
                   "resource.getrlimit(resource.RLIMIT_AS)[1])); " + code)
        out = run_python(limited, env={"SPARSEMBED_POOL_BYTES": ""}).stdout
        assert int(out) == _pool.default_limit(12 * GiB) == 3 * GiB // 2
    # a container's limit, where lower than the machine's memory, is the memory
    monkeypatch.setattr(_pool, "_cgroup_limits", lambda: [3 * GiB, 1 << 62])
    if memory is not None and memory > 3 * GiB:
        assert _pool._memory_bytes() == 3 * GiB


def test_sparse_gradients_share_read_only_column_indices(rng):
    from sparsembed import _rowsparse
    from sparsembed import functional as F

    _rowsparse.clear_column_indices()
    V, dim = 1000, 5
    small = F.embedding_backward(np.ones((3, dim)), np.array([4, 1, 4]), V, sparse=True)
    grads = [F.embedding_backward(rng.standard_normal((n, dim)), rng.integers(0, V, n), V,
                                  sparse=True) for n in (50, 40, 400)]
    for g in [small] + grads:
        assert not g.indices.flags.writeable
        assert_array_equal(g.indices.reshape(-1, dim), np.broadcast_to(np.arange(dim),
                                                                      (g.nnz // dim, dim)))
    assert np.shares_memory(grads[0].indices, grads[1].indices)  # one pattern, kept
    # an edit through one gradient cannot reach the others: it is refused
    before = grads[1].indices.copy()
    with pytest.raises(ValueError, match="read-only"):
        grads[0].indices[0] = 3
    with pytest.raises(ValueError):
        grads[0].eliminate_zeros()
    assert_array_equal(grads[1].indices, before)
    own = grads[0].copy()
    own.indices[:dim] = own.indices[:dim][::-1]  # a copy owns its arrays
    assert own.indices.flags.writeable
    # a larger gradient grew a new pattern; the older gradients keep theirs
    assert_array_equal(small.toarray()[[1, 4]], [[1.0] * dim, [2.0] * dim])
    # accumulated gradients (merged rows) share the pattern too
    total = _rowsparse.add(grads[0], grads[2])
    assert not total.indices.flags.writeable
    assert_array_equal(total.indices.reshape(-1, dim)[-1], np.arange(dim))
    _rowsparse.clear_column_indices()


def test_column_index_patterns_stay_within_the_cache_limit():
    from sparsembed import _rowsparse
    from sparsembed import functional as F
    from sparsembed._kernels import _pool

    old = _pool.set_limit(1 << 20)
    try:
        _rowsparse.clear_column_indices()
        V = 100_000
        # 4 bytes x 1,000 rows x 300 columns x 9/8 does not fit in 1 MiB: own indices
        big = F.embedding_backward(np.ones((1000, 300), np.float32), np.arange(1000), V,
                                   sparse=True)
        assert big.indices.flags.writeable
        assert_array_equal(big.indices[-300:], np.arange(300))
        assert not _rowsparse._COLUMN_PATTERNS
        # patterns of several widths: together at most the limit, oldest dropped
        for dim in (200, 210, 220, 230):
            g = F.embedding_backward(np.ones((900, dim), np.float32), np.arange(900), V,
                                     sparse=True)
            assert not g.indices.flags.writeable
            assert sum(p.nbytes for p in _rowsparse._COLUMN_PATTERNS.values()) <= 1 << 20
        assert [k[0] for k in _rowsparse._COLUMN_PATTERNS] == [230]
        _pool.set_limit(0)  # the cache off: every gradient writes its own indices
        g = F.embedding_backward(np.ones((2, 4), np.float32), np.array([0, 9]), V, sparse=True)
        assert g.indices.flags.writeable
        assert_array_equal(g.indices, [0, 1, 2, 3] * 2)
    finally:
        _pool.set_limit(old)
        _rowsparse.clear_column_indices()


def test_dense_grad_in_reused_dirty_memory_is_zero_elsewhere(rng, dtype, threads):
    # a released gradient leaves garbage behind; the next dense gradient reuses the
    # memory and must still be exactly zero on every row no id touches
    from sparsembed import functional as F
    from sparsembed._kernels import _pool

    _pool.clear()
    V, dim = 20_000, 16
    junk = _pool.empty((V, dim), dtype)
    junk[:] = np.nan
    del junk
    for ids in (rng.integers(0, V, size=3000), np.array([V - 1, 0, 5]), np.array([], int),
                np.array([7, 7, 7])):
        grad = rng.standard_normal((ids.size, dim)).astype(dtype)
        for T in (1, 2):
            threads(T)
            out = F.embedding_backward(grad, ids, V, padding_idx=5)
            expected = np.zeros((V, dim), dtype=np.float64)
            np.add.at(expected, ids, grad.astype(np.float64))
            expected[5] = 0
            rtol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol)
            assert not np.isnan(out).any()
            out[:] = np.nan  # dirty it again for the next round
            del out
    _pool.clear()


@pytest.mark.parametrize("dim", [1, 3, 4, 16, 33])
@pytest.mark.parametrize("scale", [False, True])
def test_streamed_dense_backward_equals_the_plain_one(rng, dtype, dim, scale):
    V = 3000
    for ids in (rng.integers(0, V, size=2000), np.minimum(rng.zipf(1.3, 2000) - 1, V - 1),
                np.array([V - 1, 0, 0]), np.array([], np.int64)):
        grad = rng.standard_normal((ids.size, dim)).astype(dtype)
        plan = _cpu.plan_rows(ids, V, 7)
        plain = np.full((V, dim), np.nan, dtype=dtype)
        _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, scale, plain, 1)
        for T in (1, 2, 3):
            # line-aligned (64-byte streams), 16-byte aligned, and off alignment
            # (plain stores) outputs
            for offset in (0, 16, 4):
                out = _at_alignment(V * dim, dtype, offset).reshape(V, dim)
                _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, scale,
                                              out, T, True)
                assert out.tobytes() == plain.tobytes(), (T, offset)


@pytest.mark.parametrize("dim", [1, 3, 4, 16, 33])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_streamed_row_sums_and_csr_structure_equal_the_plain_ones(rng, dtype, dim,
                                                                   idx_dtype):
    V = 3000
    for ids in (rng.integers(0, V, size=2000), np.minimum(rng.zipf(1.3, 2000) - 1, V - 1),
                np.array([5])):
        grad = rng.standard_normal((ids.size, dim)).astype(dtype)
        plan = _cpu.plan_rows(ids, V, None)
        U = plan.rows.shape[0]
        plain = np.empty((U, dim), dtype=dtype)
        _backward.row_sums(grad, plan.perm, plan.starts, True, plain, 1)
        plain_ptr = np.empty(V + 1, idx_dtype)
        plain_idx = np.empty(U * dim, idx_dtype)
        _backward.fill_row_csr(plan.rows, V, plain_ptr, plain_idx, dim, 1)
        assert_array_equal(plain_idx.reshape(U, dim), np.broadcast_to(np.arange(dim), (U, dim)))
        for T in (1, 2, 3):
            out = np.full((U, dim), np.nan, dtype=dtype)
            _backward.row_sums(grad, plan.perm, plan.starts, True, out, T, True)
            assert out.tobytes() == plain.tobytes()
            ptr = np.full(V + 1, -1, idx_dtype)
            ind = np.full(U * dim, -1, idx_dtype)
            _backward.fill_row_csr(plan.rows, V, ptr, ind, dim, T, True)
            assert_array_equal(ptr, plain_ptr)
            assert_array_equal(ind, plain_idx)
            # both in one region (the sparse backward's kernel), every stream setting
            for stream_sums in (False, True):
                for stream_ind in (False, True):
                    out = np.full((U, dim), np.nan, dtype=dtype)
                    ptr = np.full(V + 1, -1, idx_dtype)
                    ind = np.full(U * dim, -1, idx_dtype)
                    _backward.sparse_row_grad(grad, plan.perm, plan.starts, plan.rows, True,
                                              out, V, ptr, ind, T, stream_sums, stream_ind)
                    assert out.tobytes() == plain.tobytes()
                    assert_array_equal(ptr, plain_ptr)
                    assert_array_equal(ind, plain_idx)


@pytest.mark.parametrize("dim", [1, 3, 5, 20, 28, 100, 300])
@pytest.mark.parametrize("scale", [False, True])
def test_streamed_rows_off_line_boundaries_equal_the_plain_ones(rng, dtype, dim, scale):
    # rows that are not whole lines, or that are divided by their count, are summed
    # into a stage and leave it line by line, carrying a line's first bytes over to
    # the next row (a row of 1-5 elements: several rows to a line); outputs on and
    # off line boundaries, every thread count, row sums and dense gradient alike
    V = 700
    ids = np.concatenate([rng.integers(0, V, size=900), np.full(60, 5), np.arange(40)])
    grad = rng.standard_normal((ids.size, dim)).astype(dtype)
    plan = _cpu.plan_rows(ids, V, 7)
    U = plan.rows.shape[0]
    plain = np.empty((U, dim), dtype=dtype)
    _backward.row_sums(grad, plan.perm, plan.starts, scale, plain, 1)
    plain_dense = np.empty((V, dim), dtype=dtype)
    _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, scale,
                                  plain_dense, 1)
    for T in (1, 2, 3):
        for offset in (0, 4, 8, 16, 48):
            out = _at_alignment(U * dim, dtype, offset).reshape(U, dim)
            _backward.row_sums(grad, plan.perm, plan.starts, scale, out, T, True)
            assert out.tobytes() == plain.tobytes(), (T, offset)
            dense = _at_alignment(V * dim, dtype, offset).reshape(V, dim)
            _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, scale,
                                          dense, T, True)
            assert dense.tobytes() == plain_dense.tobytes(), (T, offset)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_csr_row_pointer_of_any_row_set(rng, idx_dtype):
    # the row pointer is filled in blocks of 8 that may run past a gap into the next
    # one (rewritten after): never past the thread's share nor the array's end,
    # whatever the gaps at thread boundaries and at the end of the table. The parts
    # are cut by row pointer entries: rows crowded at either end, and tables with
    # fewer entries than parts, leave parts with no stored row or no entry at all
    dim = 3
    V = 500
    row_sets = [(V, np.arange(V)), (V, np.arange(V - 9, V)), (V, np.arange(9)),
                (V, np.array([V - 1])), (V, np.array([0])),
                (V, np.array([3, 4, 5, 200, 201, V - 2])),
                (V, np.sort(rng.choice(V, 400, replace=False))),
                (V, np.sort(rng.choice(V, 40, replace=False))), (V, np.array([], np.int64)),
                (1, np.array([0])), (1, np.array([], np.int64)), (2, np.array([1])),
                (7, np.array([0, 6])), (7, np.arange(7))]
    for V, rows in row_sets:
        rows = rows.astype(np.int64)
        expected = dim * np.searchsorted(rows, np.arange(V + 1), side="left")
        for T in (1, 2, 3, 7):
            guarded = np.full(V + 1 + 16, -5, dtype=idx_dtype)  # 16 sentinels past the end
            indptr = guarded[: V + 1]
            indices = np.full(rows.size * dim, -5, dtype=idx_dtype)
            _backward.fill_row_csr(rows, V, indptr, indices, dim, T)
            assert_array_equal(indptr, expected, err_msg=f"V={V} {rows[:5]} T={T}")
            assert (guarded[V + 1:] == -5).all()
            assert_array_equal(indices, np.tile(np.arange(dim), rows.size))


def test_sparse_row_grad_checks_its_arrays(rng):
    V, dim = 50, 3
    plan = _cpu.plan_rows(np.array([4, 9, 4]), V, None)
    grad = np.ones((3, dim))
    out = np.empty((2, dim))
    ptr, ind = np.empty(V + 1, np.int64), np.empty(2 * dim, np.int64)
    with pytest.raises(ValueError, match="out and starts"):
        _backward.sparse_row_grad(grad, plan.perm, plan.starts, plan.rows, False, out[:1], V,
                                  ptr, ind, 2)
    with pytest.raises(ValueError, match="indptr and indices"):
        _backward.sparse_row_grad(grad, plan.perm, plan.starts, plan.rows, False, out, V,
                                  ptr[:-1], ind, 2)
    _backward.sparse_row_grad(grad, plan.perm, plan.starts, plan.rows, False, out, V, ptr,
                              ind, 2)
    assert_array_equal(out, [[2, 2, 2], [1, 1, 1]])
    empty = _cpu.plan_rows(np.array([], np.int64), V, None)
    ptr0 = np.full(V + 1, -1, np.int64)
    _backward.sparse_row_grad(np.ones((0, dim)), empty.perm, empty.starts, empty.rows, False,
                              np.empty((0, dim)), V, ptr0, np.empty(0, np.int64), 2)
    assert not ptr0.any()


def test_large_dense_gradients_stream_and_match(rng, monkeypatch, dtype):
    from sparsembed import functional as F

    ids = rng.integers(0, 500, size=(40, 3))
    grad = rng.standard_normal((40, 3, 8)).astype(dtype)
    plain = F.embedding_backward(grad, ids, 500, scale_grad_by_freq=True).copy()
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
    assert F.embedding_backward(grad, ids, 500, scale_grad_by_freq=True).tobytes() == \
        plain.tobytes()
    counts = np.bincount(ids.ravel(), minlength=500)
    expected = np.zeros((500, 8))
    np.add.at(expected, ids.ravel(), grad.reshape(-1, 8).astype(np.float64))
    expected /= np.maximum(counts, 1)[:, None]
    np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-6)


def test_sparse_gradients_stream_their_sums_and_indices_and_match(rng, monkeypatch, dtype):
    from sparsembed import _rowsparse

    emb = se.Embedding(500, 40, sparse=True, dtype=dtype, random_state=0)
    ids = rng.integers(0, 500, size=(60, 3))
    grad = rng.standard_normal((60, 3, 40)).astype(dtype)
    emb(ids)
    plain = emb.backward(grad)
    emb.zero_grad()
    monkeypatch.setattr(_cpu, "ROW_SUMS_STREAM_BYTES", 0)
    monkeypatch.setattr(_rowsparse, "CSR_INDEX_STREAM_BYTES", 0)
    streamed = emb.backward(grad)
    assert streamed.data.tobytes() == plain.data.tobytes()
    assert_array_equal(streamed.indices, plain.indices)
    assert_array_equal(streamed.indptr, plain.indptr)


def test_row_values_trusts_the_canonical_flag_and_checks_otherwise(rng):
    import scipy.sparse as sp

    from sparsembed import _rowsparse

    rows = np.array([1, 4, 5], dtype=np.int64)
    vals = rng.standard_normal((3, 4)).astype(np.float32)
    mat = _rowsparse.from_rows(rows, vals.copy(), 7)
    r, v = _rowsparse.row_values(mat)
    assert_array_equal(r, rows)
    assert np.shares_memory(v, mat.data)  # read in place, no scan, no copy
    # the same structure without the flag is verified, and still read in place
    plain = sp.csr_array((mat.data, mat.indices.copy(), mat.indptr.copy()), shape=mat.shape)
    r2, v2 = _rowsparse.row_values(plain)
    assert_array_equal(r2, rows)
    assert_array_equal(v2, vals)
    # unsorted columns in a row (no flag): not full rows in order -> rebuilt, same values
    idx = plain.indices.copy()
    idx[:4] = idx[:4][::-1]
    data = plain.data.copy()
    data[:4] = data[:4][::-1]
    shuffled = sp.csr_array((data, idx, plain.indptr.copy()), shape=mat.shape)
    r3, v3 = _rowsparse.row_values(shuffled)
    assert_array_equal(r3, rows)
    assert_array_equal(v3, vals)


def test_stored_rows_uses_the_row_list_only_while_the_row_pointer_agrees(rng):
    from sparsembed import _rowsparse

    rows = np.array([0, 3, 6], dtype=np.int64)
    vals = rng.standard_normal((3, 2)).astype(np.float32)
    mat = _rowsparse.from_rows(rows, vals, 7)
    # the row pointer not written yet: the row list is the structure itself
    kept = _rowsparse.stored_rows(mat)
    assert np.shares_memory(kept, rows) and not kept.flags.writeable
    assert type(mat) is not sp.csr_array
    assert_array_equal(mat.indptr, [0, 2, 2, 2, 4, 4, 4, 6])  # now written
    assert type(mat) is sp.csr_array
    assert _rowsparse.stored_rows(mat) is kept  # no O(num_rows) scan
    # the row pointer rewritten in place, row 3's entries moved to row 4: the
    # cached list fails its check and the row pointer is scanned again
    mat.indptr[4] = 2
    mat.indptr[5] = 4  # rows: 0 (0..2), 3 (2..2, empty), 4 (2..4), 6 (4..6)
    assert_array_equal(_rowsparse.stored_rows(mat), [0, 4, 6])
    # a new row pointer array: the cached list no longer applies
    mat.indptr = mat.indptr.copy()
    assert_array_equal(_rowsparse.stored_rows(mat), [0, 4, 6])
    # empty gradient
    empty = _rowsparse.from_rows(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), 5)
    assert _rowsparse.stored_rows(empty).size == 0


@pytest.mark.parametrize("num_rows,rows", [(6, [0, 2, 5]), (4, []), (3, [0, 1, 2])])
def test_direct_csr_build_equals_scipys_constructor(num_rows, rows, dtype):
    from sparsembed import _rowsparse

    rows = np.array(rows, dtype=np.int64)
    data = np.arange(rows.size * 3, dtype=dtype).reshape(rows.size, 3) - 2
    if _rowsparse._CSR_TEMPLATE is None:
        pytest.skip("this scipy's csr constructor sets other attributes: the direct build is off")
    direct = _rowsparse.from_rows(rows, data, np.int64(num_rows))
    checked = sp.csr_array(direct.toarray())
    assert type(direct) is sp.csr_array
    assert direct.shape == (num_rows, 3) and all(type(n) is int for n in direct.shape)
    assert set(direct.__dict__) - {_rowsparse._ROWS_KEY} == set(_rowsparse._CSR_ATTRS)
    assert direct.has_canonical_format and direct.has_sorted_indices
    assert direct.nnz == rows.size * 3
    assert_array_equal(direct.toarray(), checked.toarray())
    assert_array_equal(direct @ np.ones(3, dtype), checked @ np.ones(3, dtype))
    assert_array_equal((direct + direct).toarray(), 2 * checked.toarray())
    direct.check_format(full_check=True)  # scipy's own validation passes


def test_direct_csr_build_falls_back_when_scipy_changes(monkeypatch, dtype):
    from sparsembed import _rowsparse

    # a constructor that sets an attribute we do not know: no direct builds
    monkeypatch.setattr(_rowsparse, "_CSR_ATTRS", _rowsparse._CSR_ATTRS | {"_new_cache"})
    assert _rowsparse._direct_csr_template() is None
    monkeypatch.setattr(_rowsparse, "_CSR_TEMPLATE", None)
    g = _rowsparse.from_rows(np.array([1, 3], np.int64), np.ones((2, 2), dtype), 5)
    assert type(g) is sp.csr_array  # built whole: no deferred row pointer either
    assert g.has_canonical_format and g.shape == (5, 2)
    assert_array_equal(g.toarray()[[1, 3]], 1)


def _deferred_grads(rng, dtype, V=50, D=3, n=40, padding_idx=None):
    """Two equal sparse gradients of one batch, from two layers over one table."""
    W = rng.standard_normal((V, D)).astype(dtype)
    ids = rng.integers(0, V, n)
    go = rng.standard_normal((n, D)).astype(dtype)
    layers = [se.Embedding(V, D, sparse=True, weight=W.copy(), padding_idx=padding_idx,
                           dtype=dtype)
              for _ in range(2)]
    grads = []
    for layer in layers:
        layer(ids)
        grads.append(layer.backward(go))
    return layers, grads, ids


def _pointer_reference(rows, V, D):
    return D * np.searchsorted(rows, np.arange(V + 1))


def test_sparse_grad_writes_its_row_pointer_only_when_read(rng, dtype):
    from sparsembed import _rowsparse

    layers, (g, twin), ids = _deferred_grads(rng, dtype)
    rows = np.unique(ids)
    assert isinstance(g, sp.csr_array) and type(g) is not sp.csr_array
    assert "indptr" not in g.__dict__
    # what a training loop reads does not write it
    assert g.shape == (50, 3) and g.dtype == dtype and g.format == "csr"
    assert g.has_canonical_format and g.has_sorted_indices
    assert_array_equal(g.indices, np.tile(np.arange(3), rows.size))
    assert_array_equal(_rowsparse.stored_rows(g), rows)
    # an optimizer step on it, and on its twin whose pointer was read first: same bits
    assert_array_equal(twin.indptr, _pointer_reference(rows, 50, 3))
    assert type(twin) is sp.csr_array and "indptr" in twin.__dict__
    twin.check_format(full_check=True)
    for layer in layers:
        se.optim.Adagrad([layer], lr=0.5).step()
    assert type(g) is not sp.csr_array  # still not written
    assert_array_equal(layers[0].weight, layers[1].weight)
    # then read (nnz is known without the pointer): scipy's own view of it agrees
    assert g.nnz == rows.size * 3 and type(g) is not sp.csr_array
    assert_array_equal(g.indptr, twin.indptr)
    assert type(g) is sp.csr_array and g.nnz == twin.nnz
    assert_array_equal(g.toarray(), twin.toarray())


@pytest.mark.parametrize("n_threads", [1, 2])
def test_deferred_row_pointer_bits_and_threads(rng, n_threads):
    prev = se.get_num_threads()
    se.set_num_threads(n_threads)
    try:
        for V, n in ((1, 5), (7, 0), (2000, 3), (300_000, 1000)):
            ids = rng.integers(0, V, n) if n else np.zeros(0, np.int64)
            g = se.functional.embedding_backward(np.ones((n, 2), np.float32), ids, V, sparse=True)
            assert "indptr" not in g.__dict__
            assert_array_equal(g.indptr, _pointer_reference(np.unique(ids), V, 2))
            assert g.indptr.dtype == np.int32
    finally:
        se.set_num_threads(prev)


def test_deferred_row_pointer_not_written_to_count_the_entries(rng):
    # nnz read the pointer, so logging it cost (V + 1) entries of memory
    V = 300_000
    for n, dim in ((1000, 4), (0, 3), (7, 1)):
        ids = rng.integers(0, V, n)
        g = se.functional.embedding_backward(np.ones((n, dim), np.float32), ids, V, sparse=True)
        assert g.nnz == np.unique(ids).size * dim == g.data.size
        assert "indptr" not in g.__dict__
        assert g.nnz == int(g.indptr[-1])  # and once written, the same


def test_deferred_row_pointer_read_by_several_threads_at_once(rng):
    import threading

    ids = rng.integers(0, 300_000, 5000)
    for _ in range(5):
        g = se.functional.embedding_backward(np.ones((ids.size, 4), np.float32), ids,
                                             300_000, sparse=True)
        got, start = [None] * 4, threading.Barrier(4)

        def read(i):
            start.wait()
            got[i] = g.indptr if i % 2 else g.copy().indptr

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = _pointer_reference(np.unique(ids), 300_000, 4)
        for p in got:
            assert_array_equal(p, expected)
        assert type(g) is sp.csr_array and g.__dict__["indptr"] is g.indptr


def test_deferred_row_pointer_copies_and_arithmetic_are_plain_csr(rng, dtype):
    import copy
    import pickle

    (_, (g, twin), _) = _deferred_grads(rng, dtype)
    dense = twin.toarray()
    for make in (lambda m: pickle.loads(pickle.dumps(m)), copy.copy, copy.deepcopy,
                 lambda m: m.copy(), lambda m: m * 2, lambda m: m + m, lambda m: m.T,
                 lambda m: sp.vstack([m, m])):
        _, (h, _), _ = _deferred_grads(np.random.default_rng(0), dtype)
        out = make(h)
        assert type(out) in (sp.csr_array, sp.csc_array, sp.coo_array)
        assert type(h) is sp.csr_array  # the original was read, so it is plain too
        assert out.format in ("csr", "csc", "coo")
    # the values go through unchanged
    assert_array_equal(pickle.loads(pickle.dumps(g)).toarray(), dense)


def test_deferred_row_pointer_sees_edits_of_the_gradient(rng, dtype):
    # in place (gradient clipping): the step reads the edited values, pointer unread
    layers, (g, twin), _ = _deferred_grads(rng, dtype)
    g.data *= 0.5
    twin.data = twin.data * 0.5  # a new data array: read through the full checks
    for layer in layers:
        se.optim.SGD([layer], lr=1.0).step()
    assert type(g) is not sp.csr_array and type(twin) is sp.csr_array
    assert_array_equal(layers[0].weight, layers[1].weight)
    # columns replaced and flagged unsorted: the structure is checked and read
    layers, (g, twin), ids = _deferred_grads(rng, dtype)
    for m in (g, twin):
        m.indices = m.indices.reshape(-1, 3)[:, ::-1].ravel().copy()
        m.has_sorted_indices = False
    _ = twin.indptr
    for layer in layers:
        se.optim.SGD([layer], lr=1.0).step()
    assert_array_equal(layers[0].weight, layers[1].weight)
    # a bad data array is named, nothing written, as for a built pointer
    layers, (g, _), _ = _deferred_grads(rng, dtype)
    before = layers[0].weight.copy()
    g.data = g.data[:2]
    with pytest.raises(ValueError, match="row pointer runs from"):
        se.optim.SGD([layers[0]], lr=1.0).step()
    assert_array_equal(layers[0].weight, before)


def test_deferred_row_pointer_with_padding_and_accumulation(rng, dtype):
    # all ids padding: no stored row
    W = rng.standard_normal((6, 2)).astype(dtype)
    layer = se.Embedding(6, 2, sparse=True, weight=W, padding_idx=2, dtype=dtype)
    layer(np.array([2, 2]))
    g = layer.backward(np.ones((2, 2), dtype))
    assert type(g) is not sp.csr_array
    assert_array_equal(g.indptr, np.zeros(7))
    # two backwards: the sum is deferred too, and right
    layers, (g1, _), ids = _deferred_grads(rng, dtype, padding_idx=0)
    layer = layers[0]
    go = rng.standard_normal((ids.size, 3)).astype(dtype)
    layer(ids)
    layer.backward(go)
    total = layer.grad
    assert type(total) is not sp.csr_array
    rows = np.unique(ids[ids != 0])
    assert_array_equal(total.indptr, _pointer_reference(rows, 50, 3))
    ref = np.zeros((50, 3))
    np.add.at(ref, ids, go.astype(np.float64))
    ref[0] = 0
    assert_allclose_grad = np.testing.assert_allclose
    assert_allclose_grad(total.toarray(), g1.toarray() + ref, rtol=1e-5, atol=1e-5)


def _won_reference(argmax, entry_bag, words):
    won = np.zeros((entry_bag.size, words), np.uint64)
    for b in range(argmax.shape[0]):
        for j in range(argmax.shape[1]):
            e = argmax[b, j]
            if 0 <= e < entry_bag.size and entry_bag[e] == b:
                won[e, j // 64] |= np.uint64(1) << np.uint64(j % 64)
    return won


@pytest.mark.parametrize("dim", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("sorted_bags", [True, False])
def test_won_masks_against_numpy(rng, dim, sorted_bags):
    # a bag batch's entry -> bag map is sorted; the fused update takes any map. An
    # argmax entry counts only for the entry it names when that entry is in the bag:
    # -1 (empty bag), positions past the entries and entries of other bags set nothing
    n_bags, n = 9, 60
    entry_bag = np.sort(rng.integers(0, n_bags, size=n)).astype(np.int64)
    if not sorted_bags:
        entry_bag = rng.permutation(entry_bag)
    argmax = rng.integers(-3, n + 5, size=(n_bags, dim)).astype(np.int64)
    for b in range(n_bags):  # and many true winners
        mine = np.flatnonzero(entry_bag == b)
        if mine.size:
            cols = rng.random(dim) < 0.7
            argmax[b, cols] = rng.choice(mine, size=int(cols.sum()))
    words = (dim + 63) // 64
    expected = _won_reference(argmax, entry_bag, words)
    assert expected.any()
    for T in (1, 2, 3, 7):
        won = np.full((n, words), np.uint64(2 ** 64 - 1))  # every bit dirty
        _bag.won_masks(argmax, entry_bag, won, T)
        assert_array_equal(won, expected)
    with pytest.raises(ValueError, match=r"won must have shape \(60, %d\)" % words):
        _bag.won_masks(argmax, entry_bag, np.zeros((n, words + 1), np.uint64), 1)


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "psw"])
@pytest.mark.parametrize("dim", [1, 3, 16, 33, 70])
def test_bag_dense_backward_fills_dirty_memory(rng, dtype, mode, dim):
    # every row is written (zeros where no id points) whatever the output held,
    # streamed or not, at every alignment and thread count; the planned rows equal
    # the row-sparse sums, bit for bit
    V, pad = 400, 7
    ids = np.concatenate([rng.integers(0, V, size=300), np.full(40, 3), np.full(9, pad),
                          [V - 1, 0]])
    starts = np.concatenate([[0], np.sort(rng.integers(0, ids.size, size=30)), [ids.size]])
    starts = starts.astype(np.int64)
    weight = rng.standard_normal((V, dim)).astype(dtype)
    grad = rng.standard_normal((starts.size - 1, dim)).astype(dtype)
    entry_bag = _cpu.entry_bags(starts)
    plan = _cpu.plan_rows(ids, V, pad)
    scale = argmax = None
    if mode == "max":
        _, argmax, _ = _cpu.bag_forward(weight, ids, starts, "max", pad)
    elif mode == "mean":
        counts = _cpu.bag_counts(ids, starts, pad)
        scale = _cpu.mean_scale(counts, entry_bag, dtype)
    elif mode == "psw":
        scale = rng.random(ids.size).astype(dtype)
    won = _cpu._won_masks(argmax, entry_bag)
    no_scale = np.empty(0, dtype)
    for by_freq in (False, True):
        sums = _cpu.bag_row_grad(grad, plan, entry_bag, scale, argmax, by_freq)
        expected = np.zeros((V, dim), dtype)
        expected[plan.rows] = sums
        for T in (1, 2, 3):
            for stream in (False, True):
                for offset in (0, 16, 4):
                    out = _at_alignment(V * dim, dtype, offset).reshape(V, dim)
                    _bag.bag_dense_backward(grad, plan.perm, plan.rows, plan.starts,
                                            entry_bag, no_scale if scale is None else scale,
                                            won, by_freq, out, T, stream)
                    assert out.tobytes() == expected.tobytes(), (by_freq, T, stream, offset)
    # no planned row (every entry padding): all zeros
    empty = _cpu.plan_rows(np.full(5, pad), V, pad)
    out = _at_alignment(V * dim, dtype, 0).reshape(V, dim)
    _bag.bag_dense_backward(grad, empty.perm, empty.rows, empty.starts, entry_bag[:5],
                            no_scale, _cpu._won_masks(None, None), False, out, 2, True)
    assert not out.any()


@pytest.mark.parametrize("dim", [1, 3, 16, 17, 33, 70])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_bag_max_dense_backward_sums_the_winners_in_bag_order(rng, dtype, dim, idx_dtype):
    # max mode's dense gradient without a plan: n_bags x dim adds into a zero-filled
    # table, bit for bit the planned path's (each element's sum in bag order), for
    # every thread count, streamed or not, dirty memory, ties, padding, empty bags,
    # duplicate ids and a read-only flat
    V, pad = 300, 7
    ids = np.concatenate([rng.integers(0, V, size=200), np.full(30, 3), np.full(9, pad),
                          [V - 1, 0]]).astype(idx_dtype)
    rng.shuffle(ids)
    ids.flags.writeable = False
    starts = np.concatenate([[0], np.sort(rng.integers(0, ids.size, size=40)),
                             [ids.size]]).astype(np.int64)
    weight = rng.integers(-2, 3, (V, dim)).astype(dtype)  # ties: the first entry wins
    grad = rng.standard_normal((starts.size - 1, dim)).astype(dtype)
    grad[rng.random(grad.shape) < 0.1] = -0.0
    _, argmax, _ = _cpu.bag_forward(weight, ids, starts, "max", pad)
    assert (argmax == -1).any()  # empty bags
    entry_bag = _cpu.entry_bags(starts)
    planned = _cpu.bag_dense_grad(grad, _cpu.plan_rows(ids, V, pad), entry_bag, None, argmax,
                                  V, False)
    expected = np.zeros((V, dim), dtype)
    for b in range(grad.shape[0]):  # the reference: bag by bag, column by column
        for j in range(dim):
            if argmax[b, j] >= 0:
                expected[ids[argmax[b, j]], j] += grad[b, j]
    assert planned.tobytes() == expected.tobytes()
    for T in (1, 2, 3):
        for stream in (False, True):
            for offset in (0, 16, 4):
                out = _at_alignment(V * dim, dtype, offset).reshape(V, dim)
                out[...] = np.nan
                assert _bag.bag_max_dense_backward(grad, argmax, ids, out, T, stream) == 0
                assert out.tobytes() == expected.tobytes(), (T, stream, offset)
    assert _cpu.bag_max_dense_grad(grad, argmax, ids, None, None, V).tobytes() == \
        expected.tobytes()
    # no bag: zeros; winners naming entries or rows outside are counted, not written
    out = np.full((V, dim), np.nan, dtype)
    assert _bag.bag_max_dense_backward(grad[:0], argmax[:0], ids, out, 2) == 0
    assert not out.any()
    bad = argmax.copy()
    bad[0, 0], bad[1, -1] = ids.size, ids.size + 5
    out = np.full((V, dim), np.nan, dtype)
    assert _bag.bag_max_dense_backward(grad, bad, ids, out, 2) == 2
    assert not np.isnan(out).any()
    assert _bag.bag_max_dense_backward(grad, argmax, ids, np.zeros((3, dim), dtype), 2) > 0
    with pytest.raises(ValueError, match="argmax must have shape"):
        _bag.bag_max_dense_backward(grad, argmax[1:], ids, np.zeros((V, dim), dtype), 1)
    with pytest.raises(ValueError, match="out must have"):
        _bag.bag_max_dense_backward(grad, argmax, ids, np.zeros((V, dim + 1), dtype), 1)


def _dot8(g, w):
    """The psw gradient's dot product as the kernel orders it: column j into partial
    sum j % 8 (in float64), the 8 sums added in a fixed tree."""
    acc = [0.0] * 8
    for j in range(g.size):
        acc[j % 8] = acc[j % 8] + float(g[j]) * float(w[j])
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 64, 100])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_per_sample_weights_grad_against_an_ordered_reference(rng, dtype, dim, idx_dtype):
    # every entry's dot product in the kernel's order, bit for bit, at every thread
    # count; padding entries and entries past the last bag get 0
    V, pad = 300, 5
    ids = rng.integers(0, V, size=500).astype(idx_dtype)
    ids[::9] = pad
    starts = np.concatenate([[0], np.sort(rng.integers(0, 480, 20)), [480]]).astype(np.int64)
    entry_bag = _cpu.entry_bags(starts)
    weight = rng.standard_normal((V, dim)).astype(dtype)
    grad = rng.standard_normal((starts.size - 1, dim)).astype(dtype)
    expected = np.zeros(ids.size, dtype)
    for e in range(entry_bag.size):
        if ids[e] != pad:
            expected[e] = _dot8(grad[entry_bag[e]], weight[ids[e]])
    for T in (1, 2, 3):
        out = np.zeros(ids.size, dtype)
        _bag.per_sample_weights_grad(grad, weight, ids, entry_bag, pad, out, T)
        assert out.tobytes() == expected.tobytes(), T
    np.testing.assert_allclose(expected[:480],
                               np.einsum("ij,ij->i", grad[entry_bag], weight[ids[:480]])
                               * (ids[:480] != pad), rtol=1e-5, atol=1e-5)


def _lookup_plan_batch(rng, dist, V, n, idx_dtype):
    if dist == "uniform":
        return rng.integers(0, V, size=n).astype(idx_dtype)
    if dist == "zipf":
        return _zipf_ids(rng, n, V, idx_dtype)
    return np.sort(rng.integers(0, V, size=n)).astype(idx_dtype)  # the sorted-ids path


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dist", ["uniform", "zipf", "sorted"])
@pytest.mark.parametrize("n", [3001, (1 << 17) + 13])  # plain and write-combined scatter
def test_gather_and_plan_equals_the_lookup_then_the_plan(rng, dtype, idx_dtype, n_threads,
                                                          dist, n):
    V, dim = 200_003, 5
    weight = rng.standard_normal((V, dim)).astype(dtype)
    weight.setflags(write=False)
    ids = _lookup_plan_batch(rng, dist, V, n, idx_dtype)
    ids.setflags(write=False)
    for skip, stream, keep in ((-1, False, True), (int(ids[7]), True, False),
                               (V + 3, False, False)):
        out = np.full((n, dim), np.nan, dtype=dtype)
        perm = np.full(n, -7, dtype=np.int64)
        rows = np.full(n, -7, dtype=np.int64)
        starts = np.full(n + 1, -7, dtype=np.int64)
        kept = np.full(n, -1, dtype=idx_dtype) if keep else None
        scratch = np.empty(_plan.plan_scratch_size(n, V, 1), dtype=np.uint64)
        bad, m, u = _plan.gather_and_plan(weight, ids, out, stream, kept, skip, perm, rows,
                                          starts, scratch, n_threads)
        assert bad == -1
        assert out.tobytes() == weight[ids].tobytes()
        if keep:
            assert_array_equal(kept, ids)
        order, exp_rows, exp_starts = _expected_plan(ids, skip)
        assert (m, u) == (order.size, exp_rows.size)
        assert_array_equal(perm[:m], order)
        assert_array_equal(rows[:u], exp_rows)
        assert_array_equal(starts[: u + 1], exp_starts)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_gather_and_plan_reports_the_first_id_out_of_range(rng, idx_dtype, n_threads):
    V, n, dim = 100_000, (1 << 17) + 13, 3
    weight = rng.standard_normal((V, dim)).astype(np.float32)
    for bad_at, bad_ids in ((n - 1, [V]), (5, [-1, V + 9]), (70_000, [2 ** 31 - 1, -5])):
        ids = rng.integers(0, V, size=n).astype(idx_dtype)
        ids[bad_at] = bad_ids[0]
        for k, b in enumerate(bad_ids[1:]):
            ids[bad_at + 1000 * (k + 1)] = b  # later bad ids do not win
        out = np.empty((n, dim), np.float32)
        perm, rows = np.empty(n, np.int64), np.empty(n, np.int64)
        starts = np.empty(n + 1, np.int64)
        scratch = np.empty(_plan.plan_scratch_size(n, V, 1), dtype=np.uint64)
        bad, m, u = _plan.gather_and_plan(weight, ids, out, False, None, -1, perm, rows,
                                          starts, scratch, n_threads)
        assert (bad, m, u) == (bad_at, 0, 0)


def test_gather_and_plan_checks_its_arrays(rng):
    V, n, dim = 10_000, 100, 4
    weight = rng.standard_normal((V, dim)).astype(np.float32)
    ids = rng.integers(0, V, size=n)
    out = np.empty((n, dim), np.float32)
    perm, rows, starts = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n + 1, np.int64)
    scratch = np.empty(_plan.plan_scratch_size(n, V, 1), dtype=np.uint64)
    args = (False, None, -1, perm, rows, starts)
    with pytest.raises(ValueError, match="scratch"):
        _plan.gather_and_plan(weight, ids, out, *args, scratch[:10], 2)
    with pytest.raises(ValueError, match="out must be"):
        _plan.gather_and_plan(weight, ids, out[:-1], *args, scratch, 2)
    with pytest.raises(ValueError, match="ids_out"):
        _plan.gather_and_plan(weight, ids, out, False, ids[:-1].copy(), -1, perm, rows,
                              starts, scratch, 2)
    with pytest.raises(ValueError, match="needs ids"):
        _plan.gather_and_plan(weight, ids[:0], out[:0], *args, scratch, 2)


@pytest.fixture
def plan_ahead_spy(monkeypatch):
    """Plan ahead from the smallest batch on; counts the lookups that plan on the side."""
    calls = []
    kernel = _cpu._plan.gather_and_plan

    def spy(*args):
        calls.append(args[1].shape[0])
        return kernel(*args)

    monkeypatch.setattr(_cpu, "PLAN_AHEAD_MIN_IDS", 1)
    monkeypatch.setattr(_cpu._plan, "gather_and_plan", spy)
    return calls


def _plans_ahead():
    """Whether a training lookup can plan on the side at the thread count now set: it
    needs 2 threads, which a build without OpenMP never runs."""
    return se.get_num_threads() > 1


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_training_lookups_plan_ahead_with_the_same_gradients(rng, dtype, threads,
                                                             plan_ahead_spy, sparse, scale,
                                                             n_threads):
    threads(n_threads)
    ahead = _plans_ahead()
    V, dim, n = 60_000, 6, 9000
    emb = se.Embedding(V, dim, padding_idx=11, sparse=sparse, scale_grad_by_freq=scale,
                       dtype=dtype, random_state=0)
    weight_before = emb.weight.copy()
    for step in range(4):
        ids = rng.integers(0, V, size=(n // 3, 3))
        ids[::50, 1] = 11
        out = emb(ids)
        assert out.tobytes() == weight_before[ids].tobytes()
        # the first lookup cannot know a backward follows; the later ones plan (with
        # two threads: on one the lookup has no second thread to plan on)
        assert len(plan_ahead_spy) == (step if ahead else 0)
        g = rng.standard_normal(out.shape).astype(dtype)
        grad = emb.backward(g)
        expected = se.functional.embedding_backward(g, ids, V, padding_idx=11,
                                                    scale_grad_by_freq=scale, sparse=sparse)
        if sparse:
            assert (grad != expected).nnz == 0
            assert_array_equal(grad.indptr, expected.indptr)
        else:
            assert grad.tobytes() == expected.tobytes()
        emb.zero_grad()


def test_lookups_without_a_backward_stop_planning_ahead(rng, threads, plan_ahead_spy):
    threads(2)
    planned = [6000] if _plans_ahead() else []
    V, n = 50_000, 6000
    emb = se.Embedding(V, 4, sparse=True, random_state=0)
    ids = rng.integers(0, V, size=n)
    emb(ids)
    emb.backward(np.ones((n, 4), np.float32))
    emb(ids)                       # after a backward: plans ahead
    assert plan_ahead_spy == planned
    emb(ids)                       # the last plan went unused: this one does not
    emb(ids)
    assert plan_ahead_spy == planned
    emb.requires_grad = False
    emb.backward(np.ones((n, 4), np.float32))
    emb(ids)                       # no gradient wanted: no plan
    assert plan_ahead_spy == planned


def test_a_lookup_that_plans_ahead_names_the_bad_id_and_changes_nothing(rng, threads,
                                                                      plan_ahead_spy):
    threads(2)
    V, n = 50_000, 6000
    emb = se.Embedding(V, 4, sparse=True, random_state=0)
    ids = rng.integers(0, V, size=n)
    emb(ids)
    grad = emb.backward(np.ones((n, 4), np.float32))
    weight = emb.weight.copy()
    bad = ids.copy()
    bad[4321] = V + 7
    with pytest.raises(IndexError, match=str(V + 7)):
        emb(bad)
    assert plan_ahead_spy == ([n] if _plans_ahead() else [])
    assert emb.weight.tobytes() == weight.tobytes()
    assert (emb.grad != grad).nnz == 0
    # the layer still holds the last good forward, whose backward works
    again = emb.backward(np.ones((n, 4), np.float32))
    assert (again != grad).nnz == 0


@pytest.mark.parametrize("dim", [6, 5])  # float16 rows copied as float32 pairs, and not
def test_float16_training_lookups_plan_ahead_with_the_same_gradients(rng, threads,
                                                                     plan_ahead_spy, dim):
    threads(2)
    V, n = 60_000, 8000
    emb = se.Embedding(V, dim, sparse=True, dtype=np.float16, random_state=0)
    for step in range(3):
        ids = rng.integers(0, V, size=n)
        out = emb(ids)
        assert out.tobytes() == emb.weight[ids].tobytes()
        assert len(plan_ahead_spy) == (step if dim % 2 == 0 and _plans_ahead() else 0)
        g = rng.standard_normal(out.shape).astype(np.float32)
        grad = emb.backward(g)
        expected = se.functional.embedding_backward(g, ids, V, sparse=True)
        assert (grad != expected).nnz == 0
        emb.zero_grad()


def _scatter_cases(rng, V):
    """Id batches for the dense backward without a plan: uniform, skewed (a few rows
    hit many times), one row only, the first and last rows, none."""
    return [rng.integers(0, V, size=3000), np.minimum(rng.zipf(1.3, 3000) - 1, V - 1),
            np.full(50, V // 2), np.array([V - 1, 0, V - 1, 0]), np.array([], np.int64)]


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("V", [1, 63, 64, 1000, 4099])
def test_dense_backward_scatter_equals_the_planned_kernel(rng, dtype, idx_dtype, V):
    # the same bits as the planned, streamed kernel (each row summed from zero in
    # input order, -0.0 grads included), on any thread count, in dirty memory
    lanes = 64 // np.dtype(dtype).itemsize
    for dim in (lanes, 4 * lanes):
        for ids in _scatter_cases(rng, V):
            ids = ids.astype(idx_dtype)
            grad = rng.standard_normal((ids.size, dim)).astype(dtype)
            grad[::5, 1] = -0.0
            for pad in (-1, int(ids[0]) if ids.size else V - 1):
                plan = _cpu.plan_rows(ids, V, None if pad < 0 else pad)
                planned = _at_alignment(V * dim, dtype, 0).reshape(V, dim)
                _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, False,
                                              planned, 2, True)
                expected = np.zeros((V, dim))
                keep = ids != pad
                np.add.at(expected, ids[keep], grad[keep].astype(np.float64))
                # (float32 sums of up to 3,000 rows in one: a looser bound)
                tol = 1e-3 if dtype == np.float32 else 1e-10
                np.testing.assert_allclose(planned, expected, rtol=tol, atol=tol)
                for T in (1, 2, 3):
                    out = _at_alignment(V * dim, dtype, 0).reshape(V, dim)  # NaN-filled
                    assert _backward.dense_backward_scatter(grad, ids, pad, out, T) == -1
                    assert out.tobytes() == planned.tobytes(), (dim, T, pad)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_dense_backward_scatter_reports_the_first_id_out_of_range(rng, idx_dtype):
    V, dim = 500, 16
    for bad_id in (V, -1, np.iinfo(idx_dtype).max, np.iinfo(idx_dtype).min):
        ids = rng.integers(0, V, size=300).astype(idx_dtype)
        ids[[77, 200]] = bad_id
        grad = rng.standard_normal((300, dim)).astype(np.float32)
        for T in (1, 2):
            out = _at_alignment(V * dim, np.float32, 0).reshape(V, dim)
            assert _backward.dense_backward_scatter(grad, ids, -1, out, T) == 77
        # no rows, or rows of no columns: still checked
        assert _backward.dense_backward_scatter(grad[:, :0], ids, -1, np.empty((V, 0), np.float32),
                                                2) == 77
        assert _backward.dense_backward_scatter(grad, ids, -1, np.empty((0, dim), np.float32),
                                                2) == 0


def test_dense_backward_scatter_checks_its_arrays(rng):
    ids = np.array([0, 1, 2])
    grad = np.ones((3, 16), np.float32)
    with pytest.raises(ValueError, match="whole lines"):
        _backward.dense_backward_scatter(np.ones((3, 15), np.float32), ids, -1,
                                         _at_alignment(10 * 15, np.float32, 0).reshape(10, 15), 1)
    with pytest.raises(ValueError, match="whole lines"):
        _backward.dense_backward_scatter(grad, ids, -1,
                                         _at_alignment(10 * 16, np.float32, 16).reshape(10, 16), 1)
    with pytest.raises(ValueError, match=r"grad must be \(3, 16\)"):
        _backward.dense_backward_scatter(np.ones((2, 16), np.float32), ids, -1,
                                         _at_alignment(10 * 16, np.float32, 0).reshape(10, 16), 1)


@pytest.fixture
def scatter_spy(monkeypatch):
    """Calls of the dense backward without a plan, counted; streamed from any size."""
    calls = []
    kernel = _backward.dense_backward_scatter

    def spy(*args):
        calls.append(args[3].shape)
        return kernel(*args)

    monkeypatch.setattr(_backward, "dense_backward_scatter", spy)
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
    return calls


def test_functional_dense_backward_without_a_plan_where_it_pays(rng, dtype, threads, scatter_spy):
    from sparsembed import functional as F

    torch = pytest.importorskip("torch")
    V = 700
    lanes = 64 // np.dtype(dtype).itemsize
    ids = np.minimum(rng.zipf(1.3, (40, 30)) - 1, V - 1)
    grad = rng.standard_normal((40, 30, 2 * lanes)).astype(dtype)
    for T in (1, 2):
        threads(T)
        for pad in (None, int(ids[0, 0])):
            got = F.embedding_backward(grad, ids, V, padding_idx=pad)
            expected = torch.ops.aten.embedding_dense_backward(
                torch.from_numpy(grad), torch.from_numpy(ids), V, -1 if pad is None else pad,
                False).numpy()
            rtol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
    assert len(scatter_spy) == 4
    # read-only, non-contiguous inputs as well
    ro_ids, ro_grad = ids[:, ::2], grad[:, ::2]
    ro_ids.flags.writeable = ro_grad.flags.writeable = False
    before = ro_grad.copy()
    got = F.embedding_backward(ro_grad, ro_ids, V)
    expected = np.zeros((V, 2 * lanes))
    np.add.at(expected, ro_ids.ravel(), ro_grad.reshape(-1, 2 * lanes).astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert_array_equal(ro_grad, before)
    assert len(scatter_spy) == 5
    # the planned kernel where the rows are not whole lines or longer than
    # SCATTER_MAX_ROW_BYTES, the counts scale them, or more threads than
    # SCATTER_MAX_THREADS would each read every id
    F.embedding_backward(grad[..., :lanes - 1], ids, V)
    wide = _cpu.SCATTER_MAX_ROW_BYTES // np.dtype(dtype).itemsize + lanes
    F.embedding_backward(np.ones((40, 30, wide), dtype), ids, V)
    F.embedding_backward(grad, ids, V, scale_grad_by_freq=True)
    threads(_cpu.SCATTER_MAX_THREADS + 1)
    T = _cpu.threads_for(grad.size + V * grad.shape[-1] // 8)
    F.embedding_backward(grad, ids, V)
    # (a build without OpenMP runs one thread whatever is asked: the kernel then pays)
    assert len(scatter_spy) == (5 if T > _cpu.SCATTER_MAX_THREADS else 6)
    if se.show_config()["openmp"]:
        assert T > _cpu.SCATTER_MAX_THREADS


def test_functional_dense_backward_without_a_plan_names_the_bad_id(rng, scatter_spy):
    from sparsembed import functional as F

    ids = rng.integers(0, 100, size=50)
    ids[31] = 100
    grad = rng.standard_normal((50, 16)).astype(np.float32)
    before = grad.copy()
    with pytest.raises(IndexError, match="index 100 at position 31"):
        F.embedding_backward(grad, ids, 100)
    assert scatter_spy and np.array_equal(grad, before)


@pytest.mark.parametrize("table_dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_dense_layer_sums_without_a_plan_and_stops_planning_ahead(
        rng, threads, scatter_spy, plan_ahead_spy, table_dtype, n_threads):
    threads(n_threads)
    V, n, pad = 5000, 3000, 7
    grad_dtype = np.float32 if table_dtype == np.float16 else np.dtype(table_dtype)
    dim = 128 // np.dtype(grad_dtype).itemsize  # rows of two lines
    # a sparse layer's training loop first: its lookups plan ahead
    emb = se.Embedding(V, dim, padding_idx=pad, sparse=True, dtype=table_dtype,
                       random_state=0)
    for step in range(6):
        if step == 2:
            emb.sparse = False
        ids = rng.integers(0, V, size=(n // 3, 3))
        ids[::40, 0] = pad
        out = emb(ids)
        assert out.tobytes() == emb.weight[ids].tobytes()
        g = rng.standard_normal(out.shape).astype(grad_dtype)
        grad = emb.backward(g)
        flat = ids.ravel()
        plan = _cpu.plan_rows(flat, V, pad, check_range=True)
        expected = _cpu.dense_grad(g.reshape(-1, dim), plan, V, False)
        if step < 2:
            assert (grad.toarray() == expected).all()
        else:
            # the same bits as the planned sum; the plan made ahead by the lookup
            # after a sparse backward (step 2) goes unused, and no lookup plans after
            assert grad.tobytes() == expected.tobytes()
            assert len(scatter_spy) == step - 1
        emb.zero_grad()
        # the lookups of steps 1 and 2 plan ahead (with two threads: on one the
        # lookup has no second thread to plan on)
        assert len(plan_ahead_spy) == (min(step, 2) if _plans_ahead() else 0)
    # a fused update and scaled counts still use the plan: the next lookup plans ahead
    optimizer = se.optim.SGD([emb], lr=0.1)
    emb(ids)
    emb.backward(g, optimizer=optimizer)
    emb.scale_grad_by_freq = True
    emb(ids)
    emb.backward(g)
    assert len(scatter_spy) == 4
    emb(ids)
    assert len(plan_ahead_spy) == (4 if _plans_ahead() else 0)
