"""EmbeddingBag's sum/mean and max pooling, built for several SIMD levels and picked at
run time (``_simd_pool.h``, ``_simd_max.h``), and the id range check it does on the
way (issue 6).

Every level this CPU supports is run and compared bit for bit with a numpy
reference that adds the rows in entry order, the order the kernel promises.
"""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import reference_bag as ref
from reference_optim import train
import sparsembed as se
from sparsembed import functional as F
from sparsembed import _cpu
from sparsembed._kernels import _backward, _bag, _lookup, _optim, _plan, _sum_pooling, _sum_pooling_avx512

LEVEL_NAMES = ("baseline", "avx2", "avx512")
# every chunk width (8, 4, 2, 1 vectors) and column tail at each level, float32 and float64,
# and every one-pass row of 2 to 16 vectors with the last one moved back (SE_CHUNK_LAST:
# 17-255 floats or 9-127 doubles that are not whole vectors; 90, 150, 170, 180, 215,
# 230 and 250 floats give those of 6 and 10-16 vectors that the others miss)
DIMS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 90, 100, 127,
        128, 129, 150, 170, 180, 200, 215, 230, 250, 256, 257, 300, 520]


def _levels():
    """The levels this CPU runs (asking for more is capped at the top one)."""
    before = _bag.simd_level()
    try:
        return sorted({_bag.set_simd_level(level) for level in range(len(LEVEL_NAMES))})
    finally:
        _bag.set_simd_level(before)


# every module built on _simd_pool.h keeps its own level
LEVEL_MODULES = (_bag, _backward, _optim)
# the modules whose kernels read the last-level cache's size (small_cache sets it)
CACHE_MODULES = LEVEL_MODULES + (_lookup, _plan)


@pytest.fixture
def at_level():
    before = [mod.simd_level() for mod in LEVEL_MODULES]

    def set_level(level):
        got = {mod.set_simd_level(level) for mod in LEVEL_MODULES}
        assert len(got) == 1
        return got.pop()

    yield set_level
    for mod, level in zip(LEVEL_MODULES, before):
        mod.set_simd_level(level)


def _sequential_sums(weight, flat, starts, pad, mode, psw):
    """Each bag's sum in weight's dtype, adding rows in entry order (numpy rounds each
    product and each sum once, like the kernel, which never fuses a multiply-add)."""
    dt = weight.dtype.type
    out = np.zeros((starts.size - 1, weight.shape[1]), dtype=weight.dtype)
    counts = np.zeros(starts.size - 1, dtype=np.int64)
    for b in range(starts.size - 1):
        acc = np.zeros(weight.shape[1], dtype=weight.dtype)
        for e in range(starts[b], starts[b + 1]):
            if flat[e] == pad:
                continue
            row = weight[flat[e]]
            acc = acc + (row if psw is None else dt(psw[e]) * row)
            counts[b] += 1
        if mode == 1 and counts[b] > 1:
            acc = acc / dt(counts[b])
        out[b] = acc
    return out, counts


def _batch(rng, V, n_bags, dtype, idx_dtype, max_len=40):
    lengths = rng.integers(0, max_len, size=n_bags)
    lengths[::7] = 0  # empty bags too
    starts = np.zeros(n_bags + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    flat = rng.integers(0, V, size=int(starts[-1]) + 5).astype(idx_dtype)  # + unbagged tail
    flat[::5] = 3  # duplicates of a hot row
    return flat, starts


@pytest.mark.parametrize("level", range(len(LEVEL_NAMES)))
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("mode,weighted", [(0, False), (0, True), (1, False)])
def test_every_level_gives_the_sequential_sum_bit_for_bit(level, idx_dtype, mode, weighted,
                                                          dtype, rng, at_level):
    if level not in _levels():
        pytest.skip(f"this CPU lacks {LEVEL_NAMES[level]}")
    assert at_level(level) == level
    V = 50
    for dim in DIMS:
        weight = rng.standard_normal((V, dim)).astype(dtype)
        flat, starts = _batch(rng, V, 23, dtype, idx_dtype)
        psw = rng.standard_normal(flat.size).astype(dtype) if weighted else None
        for pad in (-1, 3, V + 5):  # no padding, a padding row, a padding id no row has
            expected, expected_counts = _sequential_sums(weight, flat, starts, pad, mode, psw)
            # plain stores, and streamed ones (large outputs) into a line-aligned output
            # and into one a single element off (rows staged, then stored whole)
            for stream, skew in ((False, 0), (True, 0), (True, 1)):
                out = _aligned_full((starts.size - 1, dim), dtype, skew)
                counts = np.full(starts.size - 1, -7, dtype=np.int64)
                n_bad = _bag.bag_forward(weight, flat, starts, pad, mode,
                                         np.empty(0, dtype) if psw is None else psw, out,
                                         np.empty((0, 0), np.int64), counts, 2, stream)
                assert n_bad == 0
                assert_array_equal(counts, expected_counts)
                assert out.tobytes() == expected.tobytes(), (dim, pad, stream, skew)


def _sequential_max(weight, flat, starts, pad):
    """Each bag's column maxima and the entry each came from, entry by entry: an
    entry wins a column only when strictly larger than every earlier one (the first
    occurrence wins ties; NaN only as the first entry); zeros and -1 for an empty bag."""
    n_bags, dim = starts.size - 1, weight.shape[1]
    out = np.zeros((n_bags, dim), dtype=weight.dtype)
    argmax = np.full((n_bags, dim), -1, dtype=np.int64)
    counts = np.zeros(n_bags, dtype=np.int64)
    for b in range(n_bags):
        for e in range(starts[b], starts[b + 1]):
            if flat[e] == pad:
                continue
            row = weight[flat[e]]
            if counts[b] == 0:
                out[b], argmax[b] = row, e
            else:
                wins = row > out[b]
                out[b, wins], argmax[b, wins] = row[wins], e
            counts[b] += 1
    return out, argmax, counts


@pytest.mark.parametrize("level", range(len(LEVEL_NAMES)))
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_max_pooling_at_every_level_bit_for_bit(level, idx_dtype, dtype, rng, at_level):
    # the maxima and winners of _simd_max.h, chunk widths and column tails alike,
    # with ties (a row repeated, +0.0 against -0.0), NaN first and later, padding
    # first, last and everywhere, empty bags and a bag of padding only
    if level not in _levels():
        pytest.skip(f"this CPU lacks {LEVEL_NAMES[level]}")
    assert at_level(level) == level
    V = 50
    for dim in DIMS:
        weight = rng.standard_normal((V, dim)).astype(dtype)
        weight[4] = weight[5]  # ties between distinct rows
        weight[6, ::2] = 0.0
        weight[7, ::2] = -0.0
        weight[8, ::3] = np.nan
        weight[9] = np.round(weight[9])  # ties with rows of small integers
        weight[10] = np.round(weight[10])
        flat, starts = _batch(rng, V, 23, dtype, idx_dtype)
        long_bags = np.flatnonzero(np.diff(starts) >= 4)
        b0, b1, b2, b3 = starts[long_bags[:3]].tolist() + [long_bags[-1]]
        flat[b0:b0 + 4] = [8, 1, 2, 3]  # NaN first
        flat[b1:b1 + 3] = [1, 8, 2]  # NaN later: loses
        flat[b2:b2 + 4] = [7, 6, 9, 10]
        flat[starts[b3]:starts[b3 + 1]] = 3
        for pad in (-1, 3, V + 5):
            expected, expected_argmax, expected_counts = _sequential_max(weight, flat, starts,
                                                                         pad)
            out = _aligned_full((starts.size - 1, dim), dtype, 0)
            argmax = np.full((starts.size - 1, dim), -7, dtype=np.int64)
            counts = np.full(starts.size - 1, -7, dtype=np.int64)
            for T in (1, 2):
                n_bad = _bag.bag_forward(weight, flat, starts, pad, 2, np.empty(0, dtype), out,
                                         argmax, counts, T)
                assert n_bad == 0
                assert_array_equal(counts, expected_counts)
                assert out.tobytes() == expected.tobytes(), (dim, pad)
                assert_array_equal(argmax, expected_argmax)


@pytest.mark.parametrize("level", range(len(LEVEL_NAMES)))
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("mode,weighted", [(0, False), (0, True), (1, False)])
def test_float16_pooling_at_every_level_bit_for_bit(level, idx_dtype, mode, weighted, rng,
                                                    at_level):
    # _simd_half.h reads the float16 rows as they are: the float32 sums of the rows
    # converted exactly, in entry order, rounded once to float16 (numpy's rounding),
    # with subnormal, infinite and NaN halves, sums past float16's range, padding,
    # empty bags, every chunk width and column tail
    if level not in _levels():
        pytest.skip(f"this CPU lacks {LEVEL_NAMES[level]}")
    assert at_level(level) == level
    V = 50
    for dim in DIMS:
        weight = (rng.standard_normal((V, dim)) * 3).astype(np.float16)
        weight[5] = np.float16(6e-5) * rng.random(dim)  # subnormal halves
        weight[6, ::3] = np.inf
        weight[7, ::4] = np.nan
        weight[8] = 60000.0  # sums overflow float16
        weight[9] = -0.0
        flat, starts = _batch(rng, V, 23, np.float16, idx_dtype)
        psw = rng.standard_normal(flat.size).astype(np.float32) if weighted else None
        as32 = weight.astype(np.float32)
        for pad in (-1, 3, V + 5):
            with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, past float16
                sums, expected_counts = _sequential_sums(as32, flat, starts, pad, mode, psw)
                expected = sums.astype(np.float16)
            out = np.full((starts.size - 1, dim), 0x7777, np.uint16)
            counts = np.full(starts.size - 1, -7, dtype=np.int64)
            for T in (1, 2):
                n_bad = _bag.half_bag_forward(weight.view(np.uint16), flat, starts, pad, mode == 1,
                                              np.empty(0, np.float32) if psw is None else psw,
                                              out, counts, T)
                assert n_bad == 0
                assert_array_equal(counts, expected_counts)
                assert out.tobytes() == expected.view(np.uint16).tobytes(), (dim, pad, T)
    # a bad id: the bag's count names its first bad entry (after a valid one: the
    # first pass over the columns checks the ids as it sums), its row is left as it
    # was, the other bags are pooled
    for dim in (4, 64, 300):
        flat = np.array([1, 2, 3, 4, 60, -1, 5, 6], dtype=idx_dtype)
        starts = np.array([0, 3, 7, 8], dtype=np.int64)
        out = np.full((3, dim), 0x7777, np.uint16)
        counts = np.zeros(3, np.int64)
        weight = np.ones((V, dim), np.float16)
        assert _bag.half_bag_forward(weight.view(np.uint16), flat, starts, -1, False,
                                     np.empty(0, np.float32), out, counts, 2) == 1
        assert counts.tolist() == [3, -(4 + 1), 1]
        assert_array_equal(out[0].view(np.float16), 3.0)
        assert (out[1] == 0x7777).all()
        assert_array_equal(out[2].view(np.float16), 1.0)


def _aligned_full(shape, dtype, skew):
    """A NaN-filled C-contiguous array starting ``skew`` elements past a 64-byte line."""
    itemsize = np.dtype(dtype).itemsize
    n = int(np.prod(shape))
    buf = np.empty((n + skew) * itemsize + 64, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + skew * itemsize
    out = buf[start:start + n * itemsize].view(dtype).reshape(shape)
    out.fill(np.nan)
    return out


@pytest.mark.parametrize("dim", [64, 256, 96])
def test_levels_agree_on_a_skewed_batch_with_the_public_function(dim, dtype, rng, at_level):
    V = 5000
    weight = rng.standard_normal((V, dim)).astype(dtype)
    ids = np.minimum(rng.zipf(1.2, size=(512, 32)) - 1, V - 1)
    psw = rng.random(ids.shape).astype(dtype)
    results = []
    for level in _levels():
        at_level(level)
        results.append([F.embedding_bag(ids, weight, mode="sum").tobytes(),
                        F.embedding_bag(ids, weight, mode="mean", padding_idx=0).tobytes(),
                        F.embedding_bag(ids, weight, mode="sum",
                                        per_sample_weights=psw).tobytes()])
    assert all(r == results[0] for r in results)
    expected = ref.embedding_bag(weight, ids.reshape(-1),
                                 ref.bag_starts(ids.size, shape2d=ids.shape), "sum")
    np.testing.assert_allclose(F.embedding_bag(ids, weight, mode="sum"), expected,
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4)


def test_level_is_reported_and_capped_by_the_environment(run_python):
    code = ("import sparsembed as se; from sparsembed._kernels import _bag; "
            "print(_bag.simd_level(), se.show_config()['simd'])")
    top = _levels()[-1]
    out = run_python(code).stdout.split()
    assert out == [str(top), LEVEL_NAMES[top]]
    for cap, level in (("baseline", 0), ("avx2", min(1, top)), ("avx512", top)):
        out = run_python(code, env={"SPARSEMBED_SIMD": cap}).stdout.split()
        assert out == [str(level), LEVEL_NAMES[level]], cap
    # an unknown name leaves the CPU's level (the variable only ever lowers it)
    assert run_python(code, env={"SPARSEMBED_SIMD": "sse9"}).stdout.split()[0] == str(top)


def test_one_compiled_pooling_each_module_at_its_own_level():
    # _bag, _backward and _optim run the bodies compiled in _sum_pooling (AVX-512F:
    # in _sum_pooling_avx512), at the level each of them is set to
    top = _levels()[-1]
    assert set(_levels()) <= set(_sum_pooling.compiled_levels())
    assert _sum_pooling.compiled_levels()[0] == 0
    assert _sum_pooling.compiled_levels()[2:] == _sum_pooling_avx512.compiled_levels()
    before = [mod.simd_level() for mod in LEVEL_MODULES]
    try:
        for mod in LEVEL_MODULES:
            mod.set_simd_level(top)
        assert _bag.set_simd_level(0) == 0
        assert (_bag.simd_level(), _backward.simd_level(), _optim.simd_level()) == (0, top, top)
    finally:
        for mod, level in zip(LEVEL_MODULES, before):
            mod.set_simd_level(level)


def test_set_level_is_capped(at_level):
    top = _levels()[-1]
    assert at_level(99) == top
    assert at_level(-3) == 0


def _sysfs_largest_cache():
    """The largest cache size cpu0 lists in sysfs, in bytes, or None."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        unit = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes) if sizes else None


def test_last_level_cache_size_is_sysfs_largest_cache_or_32_mib():
    want = _sysfs_largest_cache()
    if want is None or want < 2 ** 20:
        want = 32 * 2 ** 20
    assert _bag.last_level_cache_bytes() == want


def _cpu_is_intel():
    """Whether /proc/cpuinfo names an Intel CPU (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.split(":")[-1].strip() == "GenuineIntel"
                       for line in f if line.startswith("vendor_id"))
    except OSError:
        return False


def _rows_ahead_past_half_the_cache(row_bytes):
    """The pooling's distance for a table past half the last-level cache: 32 KiB of
    rows (8 to 64), but on an Intel CPU the in-cache one (8 KiB of rows, 8 to 32)."""
    if _cpu_is_intel():
        return min(32, max(8, 8192 // row_bytes))
    return min(64, max(8, 32768 // row_bytes))


@pytest.mark.parametrize("row_bytes", [4, 64, 200, 256, 400, 1024, 1200, 4096])
def test_prefetch_distance_is_short_for_a_table_in_cache(row_bytes):
    half = _bag.last_level_cache_bytes() // 2
    cached = min(32, max(8, 8192 // row_bytes))
    assert _bag.pool_rows_ahead(row_bytes, row_bytes) == cached
    assert _bag.pool_rows_ahead(row_bytes, half) == cached
    assert _bag.pool_rows_ahead(row_bytes, half + 1) == _rows_ahead_past_half_the_cache(row_bytes)
    assert _bag.pool_rows_ahead(row_bytes, 2 ** 40) == _rows_ahead_past_half_the_cache(row_bytes)


@pytest.fixture
def small_cache():
    """The pooling modules take the last-level cache to be 2 MiB while the test runs,
    so that an array of about a MiB stands for one past half of it on any machine
    (this one's L3 may hold hundreds of MiB)."""
    try:
        for mod in CACHE_MODULES:
            assert mod.set_last_level_cache_bytes(2 << 20) == 2 << 20
        yield 2 << 20
    finally:
        for mod in CACHE_MODULES:
            mod.set_last_level_cache_bytes(0)


def test_small_cache_stands_in_for_the_last_level_cache_and_is_undone():
    real = _bag.last_level_cache_bytes()
    for mod in CACHE_MODULES:
        try:
            assert mod.set_last_level_cache_bytes(2 << 20) == 2 << 20
            if mod is _bag:
                assert _bag.last_level_cache_bytes() == 2 << 20
                assert _bag.pool_rows_ahead(256, 1 << 20) == 32
                assert _bag.pool_rows_ahead(256, (1 << 20) + 1) == _rows_ahead_past_half_the_cache(256)
        finally:
            assert mod.set_last_level_cache_bytes(0) == real
    assert _bag.pool_rows_ahead(256, (1 << 20) + 1) == 32  # the real cache again
    with pytest.raises(ValueError, match="-1"):
        _bag.set_last_level_cache_bytes(-1)


def _rows_past_half_the_cache(row_bytes):
    """Rows of row_bytes that make an array just past half the last-level cache (the
    pooling's test of a cached source; the small_cache fixture's size where the test
    asks for it); skips where that would pass 80 MiB."""
    rows = _bag.last_level_cache_bytes() // 2 // row_bytes + 1
    if rows * row_bytes > 80 * 2 ** 20:
        pytest.skip("the last-level cache is too large for an array past half of it here")
    return rows


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("dim,dtype", [(17, np.float32), (64, np.float32),
                                       (100, np.float32), (200, np.float32),
                                       (256, np.float32), (100, np.float64)])
def test_pooling_of_a_table_past_half_the_cache_is_the_sequential_sum(dim, dtype, whole, rng,
                                                                       at_level, small_cache):
    # such a table gets the long prefetch distance but on Intel CPUs (up to 64 entries
    # ahead, more than most of these bags hold: the clamp at the batch's end) and, at
    # widths that are not whole vectors, two passes per bag (no SE_ONE_PASS); up to 80
    # MiB. One past the whole cache (``whole``) with rows of 512 bytes or more also
    # gets the first line of the row 16 KiB of rows on prefetched into L2
    # (SE_FAR_LINE: 16 to 20 entries ahead here)
    itemsize = np.dtype(dtype).itemsize
    num_rows = _rows_past_half_the_cache(itemsize * dim)
    if whole:
        num_rows = 2 * num_rows
    weight = np.empty((num_rows, dim), dtype)
    weight[:] = rng.standard_normal(dim).astype(dtype)  # one row everywhere: quick
    hot = rng.integers(0, num_rows, 300)
    weight[hot] = rng.standard_normal((hot.size, dim)).astype(dtype)
    row_bytes = dim * itemsize
    assert _bag.pool_rows_ahead(row_bytes, weight.nbytes) == _rows_ahead_past_half_the_cache(row_bytes)
    flat, starts = _batch(rng, hot.size, 40, dtype, np.int64, max_len=70)
    flat = hot[flat]
    for level in _levels():
        at_level(level)
        for pad in (-1, int(hot[3])):
            expected, expected_counts = _sequential_sums(weight, flat, starts, pad, 0, None)
            out = np.empty((starts.size - 1, dim), dtype)
            counts = np.empty(starts.size - 1, np.int64)
            for n_threads in (1, 2):
                assert _bag.bag_forward(weight, flat, starts, pad, 0, np.empty(0, dtype),
                                        out, np.empty((0, 0), np.int64), counts,
                                        n_threads) == 0
                assert_array_equal(counts, expected_counts)
                assert out.tobytes() == expected.tobytes(), (level, pad, n_threads)


# ------------------------------------------------- the range check of the pooling kernel

@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad", [10, -1, 2 ** 31 - 1, -(2 ** 31)])
def test_forward_names_the_first_bad_id(mode, idx_dtype, bad, rng):
    weight = rng.standard_normal((10, 6)).astype(np.float32)
    before = weight.copy()
    ids = rng.integers(0, 10, size=(400, 5)).astype(idx_dtype)
    ids[250, 1] = bad  # later bags hold other bad ids: the first in input order is named
    ids[300, 0] = 11
    ids[399, 4] = -5
    with pytest.raises(IndexError, match=rf"index {bad} at position {250 * 5 + 1} is out of "
                                         r"range for 10 embeddings \(valid: 0\.\.9\)"):
        F.embedding_bag(ids, weight, mode=mode)
    assert_array_equal(weight, before)

    layer = se.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode)
    good = np.array([[1, 2], [3, 3]])
    expected = layer(good)
    grad = layer.backward(np.ones((2, 6), np.float32)).copy()
    with pytest.raises(IndexError, match=rf"index {bad} at position {250 * 5 + 1}"):
        layer(ids)
    # nothing changed: the table, the gradient, and the batch the backward will use
    assert_array_equal(layer.weight, before)
    assert_array_equal(layer.grad, grad)
    assert_array_equal(layer(good), expected)


def test_forward_checks_entries_past_the_last_bag(rng):
    # include_last_offset: entries after the last offset belong to no bag and are never
    # read, but an id there is still an error (as it is for torch)
    weight = rng.standard_normal((10, 4))
    ids = np.array([1, 2, 3, 4, 77, 5])
    for fn in (lambda: F.embedding_bag(ids, weight, np.array([0, 2, 4]), mode="sum",
                                       include_last_offset=True),
               lambda: se.EmbeddingBag.from_pretrained(weight, include_last_offset=True)(
                   ids, np.array([0, 2, 4]))):
        with pytest.raises(IndexError, match="index 77 at position 4"):
            fn()
    # a bad id inside a bag is named before one past the last bag
    ids = np.array([1, 99, 3, 4, 77, 5])
    with pytest.raises(IndexError, match="index 99 at position 1"):
        F.embedding_bag(ids, weight, np.array([0, 2, 4]), include_last_offset=True)


def test_range_check_of_every_path(rng):
    # renorm, float16 and zero-width tables check the ids before the kernel runs
    ids = np.array([[0, 1], [2, 12]])
    weight = rng.standard_normal((5, 3))
    for kwargs in ({"max_norm": 1.0}, {}):
        with pytest.raises(IndexError, match="index 12 at position 3"):
            F.embedding_bag(ids, weight.copy(), **kwargs)
    with pytest.raises(IndexError, match="index 12 at position 3"):
        F.embedding_bag(ids, np.zeros((5, 0)))
    with pytest.raises(IndexError, match="index 12 at position 3"):
        F.embedding_bag(ids, weight.astype(np.float16))
    with pytest.raises(IndexError, match="index 12 at position 3"):
        se.EmbeddingBag.from_pretrained(weight.astype(np.float16))(ids)
    with pytest.raises(IndexError, match="index 12 at position 3"):
        se.EmbeddingBag(5, 0)(ids)


def test_kernel_counts_the_bags_with_bad_ids():
    weight = np.ones((4, 3), np.float32)
    flat = np.array([0, 9, 1, 2, -1, 3, 5], dtype=np.int64)
    starts = np.array([0, 2, 4, 7], dtype=np.int64)
    out = np.empty((3, 3), np.float32)
    counts = np.empty(3, np.int64)
    for mode in (0, 1, 2):
        argmax = np.empty((3, 3), np.int64) if mode == 2 else np.empty((0, 0), np.int64)
        n_bad = _bag.bag_forward(weight, flat, starts, -1, mode, np.empty(0, np.float32), out,
                                 argmax, counts, 2)
        assert n_bad == 2
        assert counts[0] == -(1 + 1) and counts[1] == 2 and counts[2] == -(4 + 1)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("n_bags", [1, 5, 31, 32, 33, 1000])
def test_bag_ranges_taken_in_turn_give_the_bits_of_one_thread(mode, n_bags, rng):
    """Sum and mean bags go out in ranges (16 per thread, taken as threads come
    free): every thread count gives the bytes, counts and bad-bag count of one
    thread, with bags of any length (empty ones too) and bad ids in several ranges."""
    V, dim = 70, 24
    weight = rng.standard_normal((V, dim)).astype(np.float32)
    lengths = rng.integers(0, 9, size=n_bags)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(0, V, size=int(starts[-1]) + 3).astype(np.int64)  # 3 past the bags
    if flat.size > 40:
        flat[[7, flat.size // 2, starts[-1] - 1]] = [V, -2, V + 9]
    results = []
    for threads in (1, 2, 3):
        for stream in (False, True):
            out = np.full((n_bags, dim), np.nan, np.float32)
            counts = np.full(n_bags, -7, np.int64)
            n_bad = _bag.bag_forward(weight, flat, starts, 4, mode, np.empty(0, np.float32),
                                     out, np.empty((0, 0), np.int64), counts, threads, stream)
            good = counts >= 0
            results.append((n_bad, counts, out[good].tobytes()))
    for r in results[1:]:
        assert r[0] == results[0][0]
        assert_array_equal(r[1], results[0][1])
        assert r[2] == results[0][2]
    expected, expected_counts = _sequential_sums(weight, np.clip(flat, 0, V - 1), starts, 4,
                                                 mode, None)
    good = results[0][1] >= 0
    assert_array_equal(results[0][1][good], expected_counts[good])
    assert results[0][2] == expected[good].tobytes()
    assert results[0][0] == (~good).sum() == (3 if flat.size > 40 else 0)
    # the float16 pooling hands out its ranges the same way
    half = weight.astype(np.float16)
    results16 = []
    for threads in (1, 2, 3):
        out = np.full((n_bags, dim), 0x7E00, np.uint16)  # float16 NaN bits
        counts = np.full(n_bags, -7, np.int64)
        n_bad = _bag.half_bag_forward(half.view(np.uint16), flat, starts, 4, mode == 1,
                                      np.empty(0, np.float32), out, counts, threads)
        results16.append((n_bad, counts, out[counts >= 0].tobytes()))
    for r in results16:
        assert r[0] == results[0][0]
        assert_array_equal(r[1], results[0][1])
        assert r[2] == results16[0][2]
    assert 0x7E00 not in np.frombuffer(results16[0][2], np.uint16)


@pytest.mark.parametrize("level", range(len(LEVEL_NAMES)))
@pytest.mark.parametrize("scale", [False, True])
def test_row_sums_and_dense_backward_at_every_level_are_sequential_sums_from_zero(
        level, scale, dtype, rng, at_level):
    """The backward's row sums run on the same pooling: each row is its entries'
    grad rows added to zero in input order (so a single -0.0 gives +0.0, as torch's
    sums into a zeroed gradient do), at every level, thread count and store kind."""
    if level not in _levels():
        pytest.skip(f"this CPU lacks {LEVEL_NAMES[level]}")
    assert at_level(level) == level
    V = 40
    for dim in [1, 3, 16, 17, 64, 100, 256, 257]:
        ids = rng.integers(0, V - 1, size=300)
        ids[::4] = 7  # a long segment
        ids[-1] = V - 1  # a lone row at the end, its only entry -0.0 in column 0
        grad = rng.standard_normal((ids.size, dim)).astype(dtype)
        grad[-1, 0] = -0.0
        plan = _cpu.plan_rows(ids, V)
        expected = np.zeros((plan.rows.size, dim), dtype=dtype)
        for u in range(plan.rows.size):
            acc = np.zeros(dim, dtype=dtype)
            for k in range(plan.starts[u], plan.starts[u + 1]):
                acc = acc + grad[plan.perm[k]]
            count = plan.starts[u + 1] - plan.starts[u]
            expected[u] = acc / np.dtype(dtype).type(count) if scale and count > 1 else acc
        assert expected[-1, 0] == 0 and not np.signbit(expected[-1, 0])
        for threads in (1, 2, 3):
            for stream in (False, True):
                sums = np.full((plan.rows.size, dim), np.nan, dtype=dtype)
                _backward.row_sums(grad, plan.perm, plan.starts, scale, sums, threads, stream)
                assert sums.tobytes() == expected.tobytes(), (dim, threads, stream)
                dense = np.full((V + 3, dim), np.nan, dtype=dtype)  # rows past the last id too
                _backward.dense_backward_fill(grad, plan.perm, plan.rows, plan.starts, scale,
                                              dense, threads, stream)
                want = np.zeros((V + 3, dim), dtype=dtype)
                want[plan.rows] = expected
                assert dense.tobytes() == want.tobytes(), (dim, threads, stream)


@pytest.mark.parametrize("dim", [17, 64, 100])
def test_float16_pooling_of_a_table_past_half_the_cache_is_the_sequential_sum(dim, rng,
                                                                               at_level,
                                                                               small_cache):
    # a float16 table past half the last-level cache: the long prefetch distance (the
    # float16 pooling takes one pass per bag at every table size)
    num_rows = _rows_past_half_the_cache(2 * dim)
    weight = np.empty((num_rows, dim), np.float16)
    weight[:] = rng.standard_normal(dim).astype(np.float16)
    hot = rng.integers(0, num_rows, 300)
    weight[hot] = (rng.standard_normal((hot.size, dim)) * 3).astype(np.float16)
    flat, starts = _batch(rng, hot.size, 40, np.float16, np.int64, max_len=70)
    flat = hot[flat]
    for level in _levels():
        at_level(level)
        for mode in (0, 1):
            sums, expected_counts = _sequential_sums(weight.astype(np.float32), flat, starts,
                                                     -1, mode, None)
            expected = sums.astype(np.float16)
            out = np.full((starts.size - 1, dim), 0x7777, np.uint16)
            counts = np.empty(starts.size - 1, np.int64)
            for n_threads in (1, 2):
                assert _bag.half_bag_forward(weight.view(np.uint16), flat, starts, -1,
                                             mode == 1, np.empty(0, np.float32), out, counts,
                                             n_threads) == 0
                assert_array_equal(counts, expected_counts)
                assert out.tobytes() == expected.view(np.uint16).tobytes(), (level, mode)


@pytest.mark.parametrize("dim", [17, 64, 100, 256])
@pytest.mark.parametrize("scale", [False, True])
def test_row_sums_of_a_grad_past_half_the_cache_are_sequential_sums(dim, scale, rng, at_level,
                                                                     small_cache):
    # a grad_output past half the last-level cache: each row is also prefetched into
    # L2 further ahead (SE_FAR, up to 256 entries: the clamp at the plan's end), and
    # rows that are not whole vectors are summed in two passes per row (no
    # SE_ONE_PASS), at every level; with the mean's division
    n = _rows_past_half_the_cache(4 * dim)
    V = 5000
    ids = rng.integers(0, V, size=n)
    ids[::3] = 11  # a long segment
    grad = rng.standard_normal((n, dim)).astype(np.float32)
    plan = _cpu.plan_rows(ids, V)
    want = np.zeros((V, dim), np.float32)
    np.add.at(want, ids, grad)  # in input order, from zero: the promised bits
    want = want[plan.rows]
    if scale:
        want = want / np.diff(plan.starts).astype(np.float32)[:, None]
    for level in _levels():
        at_level(level)
        for threads in (1, 2):
            sums = np.full((plan.rows.size, dim), np.nan, np.float32)
            _backward.row_sums(grad, plan.perm, plan.starts, scale, sums, threads, True)
            assert sums.tobytes() == want.tobytes(), (level, threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_lookup_of_a_table_past_the_cache_is_the_copy(dtype, idx_dtype, rng, small_cache):
    # a table past the last-level cache: the lookup also prefetches the first line of
    # the row 16 KiB of rows on into L2 (_memory.pxd: gather_far_distance; 64 rows
    # of 64 floats, 32 of 64 doubles), up to the end of each thread's range; batches
    # shorter and longer than that distance, with and without streamed stores, and
    # the lookup that plans on the side
    V, dim = 12_000, 64
    weight = rng.standard_normal((V, dim)).astype(dtype)
    assert weight.nbytes > small_cache
    weight.setflags(write=False)
    for n in (5, 63, 64, 65, 3001, 70_001):
        ids = rng.integers(0, V, size=n).astype(idx_dtype)
        ids[-1] = V - 1
        for threads in (1, 2):
            for stream in (False, True):
                out = np.full((n, dim), np.nan, dtype)
                assert _lookup.gather(weight, ids, out, threads, stream, None) == -1
                assert out.tobytes() == weight[ids].tobytes(), (n, threads, stream)
            if n < 2:
                continue
            out = np.full((n, dim), np.nan, dtype)
            perm, rows = np.empty(n, np.int64), np.empty(n, np.int64)
            starts = np.empty(n + 1, np.int64)
            scratch = np.empty(_plan.plan_scratch_size(n, V, 1), np.uint64)
            bad, m, u = _plan.gather_and_plan(weight, ids, out, True, None, -1, perm, rows,
                                              starts, scratch, threads)
            assert (bad, m) == (-1, n)
            assert out.tobytes() == weight[ids].tobytes(), (n, threads)
            assert_array_equal(rows[:u], np.unique(ids))
        bad_ids = ids.copy()
        bad_ids[n // 2] = 2 ** 31 - 1  # its row is never read (prefetched only): named
        out = np.empty((n, dim), dtype)
        assert _lookup.gather(weight, bad_ids, out, 2, False, None) == n // 2


@pytest.mark.parametrize("name", ["Adagrad", "SparseAdam"])
def test_fused_step_on_a_grad_past_half_the_cache_is_the_same_step(name, rng, small_cache):
    # the fused row sums read such a grad_output with the far L2 prefetches too: the
    # same bits as with the real cache (no far prefetch there: the grad is small), on
    # 1 and 2 threads, and the step of the csr gradient
    n, V, dim = 6000, 3000, 64  # a 1.5 MB grad_output: past half of the 2 MiB cache
    assert n * dim * 4 > small_cache // 2
    ids = rng.integers(0, V, size=n)
    ids[::5] = 7
    grad = rng.standard_normal((n, dim)).astype(np.float32)
    w0 = rng.standard_normal((V, dim)).astype(np.float32)
    results = {}
    before = se.get_num_threads()
    try:
        for cache in ("small", "real"):
            if cache == "real":
                for mod in CACHE_MODULES:
                    mod.set_last_level_cache_bytes(0)
            for threads in (1, 2):
                se.set_num_threads(threads)
                for fused in (True, False):
                    emb = se.Embedding(V, dim, sparse=True, weight=w0.copy())
                    train(emb, getattr(se.optim, name)([emb], lr=0.1), [(ids, grad)] * 2,
                          fused=fused)
                    results[cache, threads, fused] = emb.weight
    finally:
        se.set_num_threads(before)
    first = results["small", 1, True]
    assert not np.array_equal(first, w0)
    for key, weight in results.items():
        if key[2]:
            assert weight.tobytes() == first.tobytes(), key
        else:
            np.testing.assert_allclose(weight, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", range(len(LEVEL_NAMES)))
@pytest.mark.parametrize("scale", [False, True])
def test_bag_row_sums_through_the_plan_in_bags_at_every_level(level, scale, dtype, rng,
                                                              at_level):
    """Sum and mean bags' backward: the plan's entries mapped to their bags (and
    factors) by entry_grad_rows, then the backward's row sums with ``weights``: each
    row is w[k] * grad[bag of k] added to zero in plan order, at every level, thread
    count and store kind, for the row sums, the dense fill and the csr kernel."""
    if level not in _levels():
        pytest.skip(f"this CPU lacks {LEVEL_NAMES[level]}")
    assert at_level(level) == level
    V, pad = 40, 9
    for dim in [1, 3, 16, 17, 64, 100, 257]:
        ids = rng.integers(0, V - 1, size=300)
        ids[::4] = 7  # a long segment
        ids[::11] = pad
        starts = np.concatenate([[0], np.sort(rng.integers(0, ids.size, 25)), [ids.size]])
        entry_bag = _cpu.entry_bags(starts.astype(np.int64))
        grad = rng.standard_normal((starts.size - 1, dim)).astype(dtype)
        psw = rng.standard_normal(ids.size).astype(dtype)
        plan = _cpu.plan_rows(ids, V, pad)
        m = plan.perm.size
        bag_of = np.full(m, -5, np.int64)
        psw_of = np.full(m, np.nan, dtype)
        for threads in (1, 2):
            _bag.entry_grad_rows(plan.perm, entry_bag, psw, bag_of, psw_of, threads)
            assert_array_equal(bag_of, entry_bag[plan.perm])
            assert_array_equal(psw_of, psw[plan.perm])
        expected = np.zeros((plan.rows.size, dim), dtype=dtype)
        for u in range(plan.rows.size):
            acc = np.zeros(dim, dtype=dtype)
            for k in range(plan.starts[u], plan.starts[u + 1]):
                acc = acc + psw_of[k] * grad[bag_of[k]]
            count = plan.starts[u + 1] - plan.starts[u]
            expected[u] = acc / np.dtype(dtype).type(count) if scale and count > 1 else acc
        dense_want = np.zeros((V, dim), dtype=dtype)
        dense_want[plan.rows] = expected
        for threads in (1, 2, 3):
            for stream in (False, True):
                sums = np.full((plan.rows.size, dim), np.nan, dtype=dtype)
                _backward.row_sums(grad, bag_of, plan.starts, scale, sums, threads, stream,
                                   weights=psw_of)
                assert sums.tobytes() == expected.tobytes(), (dim, threads, stream)
                dense = np.full((V, dim), np.nan, dtype=dtype)
                _backward.dense_backward_fill(grad, bag_of, plan.rows, plan.starts, scale,
                                              dense, threads, stream, weights=psw_of)
                assert dense.tobytes() == dense_want.tobytes(), (dim, threads, stream)
                sums = np.full((plan.rows.size, dim), np.nan, dtype=dtype)
                ptr = np.empty(V + 1, np.int32)
                ind = np.empty(plan.rows.size * dim, np.int32)
                _backward.sparse_row_grad(grad, bag_of, plan.starts, plan.rows, scale, sums, V,
                                          ptr, ind, threads, stream, stream, weights=psw_of)
                assert sums.tobytes() == expected.tobytes(), (dim, threads, stream)
            # the fused update sums the same way: bit for bit the sums, then the update
            hyper = (_optim.KIND_ADAGRAD, 0.1, 0.0, 0.01, 1e-8, 0.0, 0.0, 0.0)
            w0 = rng.standard_normal((V, dim)).astype(dtype)
            s0 = np.abs(rng.standard_normal((V, dim))).astype(dtype)
            none = np.empty((0, dim), dtype)
            w_ref, s_ref = w0.copy(), s0.copy()
            _optim.update_rows(*hyper, w_ref, plan.rows, False, expected, s_ref, none, 1)
            w, s_ = w0.copy(), s0.copy()
            _optim.fused_update(*hyper, w, grad, bag_of, plan.rows, plan.starts,
                                np.empty(0, np.int64), np.empty(0, dtype),
                                np.empty((0, 0), np.uint64), scale, s_, none, threads,
                                weights=psw_of)
            assert w.tobytes() == w_ref.tobytes() and s_.tobytes() == s_ref.tobytes()
        with pytest.raises(ValueError, match=f"weights holds {m - 1} entries, the plan {m}"):
            _backward.row_sums(grad, bag_of, plan.starts, scale, sums, 1,
                               weights=psw_of[:-1])
    with pytest.raises(ValueError, match="weights must hold one factor per plan entry"):
        _optim.fused_update(*hyper, w, grad, bag_of, plan.rows, plan.starts,
                            np.empty(0, np.int64), np.empty(0, dtype),
                            np.empty((0, 0), np.uint64), False, s_, none, 1,
                            weights=psw_of[:-1])
    # no scale: the factors are left alone; lengths are checked before anything is written
    no = np.empty(0, dtype)
    _bag.entry_grad_rows(plan.perm, entry_bag, no, bag_of, no, 2)
    with pytest.raises(ValueError, match="bag_of and scale_of must hold"):
        _bag.entry_grad_rows(plan.perm, entry_bag, psw, bag_of, psw_of[:-1], 1)


@pytest.mark.parametrize("level", range(len(LEVEL_NAMES)))
def test_fused_update_at_every_level_equals_row_sums_then_update(level, dtype, rng, at_level):
    """The fused backward + update sums each row with the same pooling (in chunks of
    segments): bit for bit the row sums followed by the separate update."""
    if level not in _levels():
        pytest.skip(f"this CPU lacks {LEVEL_NAMES[level]}")
    assert at_level(level) == level
    V = 60
    for dim in [3, 16, 40, 256]:
        ids = rng.integers(0, V, size=500)
        ids[::3] = 11
        grad = rng.standard_normal((ids.size, dim)).astype(dtype)
        plan = _cpu.plan_rows(ids, V)
        hyper = (_optim.KIND_ADAGRAD, 0.1, 0.0, 0.01, 1e-8, 0.0, 0.0, 0.0)
        w0 = rng.standard_normal((V, dim)).astype(dtype)
        s0 = np.abs(rng.standard_normal((V, dim))).astype(dtype)
        none = np.empty((0, dim), dtype)
        for scale in (False, True):
            sums = np.empty((plan.rows.size, dim), dtype=dtype)
            _backward.row_sums(grad, plan.perm, plan.starts, scale, sums, 1)
            w_ref, s_ref = w0.copy(), s0.copy()
            _optim.update_rows(*hyper, w_ref, plan.rows, False, sums, s_ref, none, 1)
            for threads in (1, 2):
                w, s = w0.copy(), s0.copy()
                _optim.fused_update(*hyper, w, grad, plan.perm, plan.rows, plan.starts,
                                    np.empty(0, np.int64), np.empty(0, dtype),
                                    np.empty((0, 0), np.uint64), scale, s, none, threads)
                assert w.tobytes() == w_ref.tobytes(), (dim, scale, threads)
                assert s.tobytes() == s_ref.tobytes(), (dim, scale, threads)


HYPERS = {  # (kind, lr, momentum, weight_decay, eps, c1, c2, c3)
    "sgd": (_optim.KIND_SGD, 0.1, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0),
    "sgd_momentum_wd": (_optim.KIND_SGD, 0.1, 0.9, 0.01, 0.0, 0.75, 0.0, 0.0),
    "sgd_first_step": (_optim.KIND_SGD, 0.1, 0.9, 0.0, 0.0, 1.0, 1.0, 0.0),
    "sgd_nesterov": (_optim.KIND_SGD, 0.1, 0.9, 0.0, 0.0, 1.0, 0.0, 1.0),
    "adagrad": (_optim.KIND_ADAGRAD, 0.1, 0.0, 0.0, 1e-10, 0.0, 0.0, 0.0),
    "adagrad_wd": (_optim.KIND_ADAGRAD, 0.1, 0.0, 0.05, 1e-6, 0.0, 0.0, 0.0),
    "sparse_adam": (_optim.KIND_SPARSE_ADAM, 0.01, 0.0, 0.0, 1e-8, 0.1, 0.001, 0.0),
    "rowwise_adagrad": (_optim.KIND_ROWWISE_ADAGRAD, 0.1, 0.0, 0.02, 1e-8, 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(HYPERS))
def test_optimizer_updates_give_the_same_bits_at_every_level(name, dtype, rng, at_level):
    """The row updates are compiled per SIMD level too (_simd_update.h): every level
    gives the baseline's bits, for every kind and a dim with a column tail."""
    hyper = HYPERS[name]
    rowwise = hyper[0] == _optim.KIND_ROWWISE_ADAGRAD
    V = 30
    for dim in [1, 7, 16, 33, 100]:
        rows = np.sort(rng.choice(V, 12, replace=False)).astype(np.int64)
        values = rng.standard_normal((rows.size, dim)).astype(dtype)
        w0 = rng.standard_normal((V, dim)).astype(dtype)
        s1_0 = np.abs(rng.standard_normal((V, 1 if rowwise else dim))).astype(dtype)
        s2_0 = np.abs(rng.standard_normal((V, dim))).astype(dtype)
        if hyper[0] != _optim.KIND_SPARSE_ADAM:
            s2_0 = np.empty((0, dim), dtype)
        if hyper[0] == _optim.KIND_SGD and hyper[2] == 0.0:
            s1_0 = np.empty((0, dim), dtype)
        results = {}
        for level in _levels():
            assert at_level(level) == level
            w, s1, s2 = w0.copy(), s1_0.copy(), s2_0.copy()
            for threads in (1, 2):
                _optim.update_rows(*hyper, w, rows, False, values, s1, s2, threads)
            results[level] = (w.tobytes(), s1.tobytes(), s2.tobytes())
            assert not np.array_equal(w, w0)
        assert len(set(results.values())) == 1, (dim, sorted(results))


def test_bag_sum_prefetches_far_ahead_where_a_sample_of_ids_is_mostly_distinct(rng):
    # rows under 512 bytes of a table past 32 MiB: the first line of each row goes
    # to L2 far ahead when a sample of the batch's ids is mostly distinct (rows read
    # from memory), not for a few hot rows (Zipf ids: cached)
    V, n, big = 1_000_000, 1 << 16, 256 << 20
    uniform = rng.integers(0, V, size=n)
    skewed = np.minimum(rng.zipf(1.2, size=n) - 1, V - 1)
    for idx in (uniform, uniform.astype(np.int32)):
        assert _bag.far_line_prefetch(idx, big, 256)
    assert not _bag.far_line_prefetch(skewed, big, 256)
    assert not _bag.far_line_prefetch(uniform[:-1], big, 256)  # a batch too small to sample
    assert not _bag.far_line_prefetch(uniform, 16 << 20, 256)  # a table of 16 MiB
    assert not _bag.far_line_prefetch(uniform[:0], big, 256)
    # rows of 512 bytes and more: past the last-level cache, whatever the ids
    past = 2 * _bag.last_level_cache_bytes()
    assert _bag.far_line_prefetch(skewed, past, 512)


def test_bag_sum_with_far_prefetches_gives_the_same_bits(rng, small_cache):
    # (the 2 MiB cache makes a 6.4 MB table a far one here: its bag sums prefetch far
    # ahead, and must give the sums without)
    V, D, n = 100_000, 16, 1 << 16
    weight = rng.standard_normal((V, D)).astype(np.float32)
    ids = rng.integers(0, V, size=(n // 32, 32))
    assert _bag.far_line_prefetch(ids.ravel(), weight.nbytes, D * 4)
    far = se.functional.embedding_bag(ids, weight, mode="sum")
    bad = ids.copy()
    bad[1000, 7] = V
    with pytest.raises(IndexError, match=str(V)):  # a bad id's row is prefetched, not read
        se.functional.embedding_bag(bad, weight, mode="sum")
    for mod in CACHE_MODULES:
        mod.set_last_level_cache_bytes(0)
    assert not _bag.far_line_prefetch(ids.ravel(), weight.nbytes, D * 4)
    near = se.functional.embedding_bag(ids, weight, mode="sum")
    assert far.tobytes() == near.tobytes()
