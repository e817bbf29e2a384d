"""Tables and optimizer states that sparsembed allocates start on a 64-byte boundary."""

from pathlib import Path

import numpy as np
import pytest

import sparsembed as se
from sparsembed import _aligned
from sparsembed import io as sio

GLOVE = Path(__file__).parent / "data" / "test_glove.txt"


def is_aligned(a):
    return a.ctypes.data % 64 == 0


def misaligned(shape, dtype):
    """A C-contiguous array 16 bytes past a 64-byte boundary (what malloc often gives)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + 128, np.uint8)
    off = (-buf.ctypes.data) % 64 + 16
    return buf[off:off + n].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64, np.uint8])
@pytest.mark.parametrize("shape", [(0,), 7, (3, 5), (1000, 64), (0, 4), (2, 0, 3)])
def test_helpers_give_aligned_c_contiguous_arrays(shape, dtype):
    arrays = [_aligned.empty(shape, dtype), _aligned.zeros(shape, dtype),
              _aligned.full(shape, 3, dtype), _aligned.full(shape, 0, dtype)]
    want = (shape,) if isinstance(shape, int) else shape
    for a in arrays:
        assert a.shape == want and a.dtype == dtype
        assert a.flags.c_contiguous and a.flags.writeable
        assert a.size == 0 or is_aligned(a)  # an empty array has no data to align
    np.testing.assert_array_equal(arrays[1], np.zeros(want, dtype))
    np.testing.assert_array_equal(arrays[2], np.full(want, 3, dtype))
    np.testing.assert_array_equal(arrays[3], np.zeros(want, dtype))


def test_copy_converts_and_does_not_share():
    src = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]  # not contiguous
    out = _aligned.copy(src, np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous and is_aligned(out)
    np.testing.assert_array_equal(out, src.astype(np.float32))
    assert not np.shares_memory(out, src)
    same = _aligned.copy(src)
    assert same.dtype == np.float64 and is_aligned(same)


def test_negative_shape_is_refused():
    with pytest.raises(ValueError, match=r"-1"):
        _aligned.empty((3, -1), np.float32)


@pytest.mark.parametrize("shape", [(2 ** 61 + 1, 8), (2 ** 40, 2 ** 40), (2 ** 63, 1)])
def test_sizes_past_the_address_space_are_named(shape):
    # the byte count was numpy's int64 product, which wraps: (2**61 + 1, 8) floats
    # "took" 32 bytes and failed in a reshape that named neither
    for make in (_aligned.empty, _aligned.zeros):
        with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\) and dtype "
                                             r"float32 would take \d+ bytes"):
            make(shape, np.float32)
    with pytest.raises(ValueError, match=str(shape[0])):
        se.Embedding(*shape)


def test_zeros_are_lazy_like_np_zeros():
    """A big zero state takes memory only for the pages that get written."""
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc")
    before = rss()
    a = _aligned.zeros((1 << 26,), np.float32)  # 256 MiB
    a[::1 << 22] = 1.0  # touch 16 pages, 16 MiB apart (2 MiB each if huge pages)
    grown = rss() - before
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for 16 touched pages"
    assert a.sum() == 16


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("cls", [se.Embedding, se.EmbeddingBag])
def test_tables_allocated_here_are_aligned(cls, dtype):
    layer = cls(1000, 24, dtype=dtype, random_state=0)
    assert is_aligned(layer.weight) and layer.weight.dtype == dtype
    # same values as a table drawn by reset_parameters into a plain array
    assert np.isfinite(layer.weight.astype(np.float64)).all()
    conv = cls(10, 6, weight=np.arange(60).reshape(10, 6), dtype=dtype)  # converted: a copy
    assert is_aligned(conv.weight)
    np.testing.assert_array_equal(conv.weight, np.arange(60).reshape(10, 6).astype(dtype))


def test_user_tables_are_shared_as_they_are():
    w = misaligned((50, 8), np.float32)
    w[...] = np.random.default_rng(0).standard_normal((50, 8))
    emb = se.Embedding.from_pretrained(w, freeze=False, sparse=True)
    assert emb.weight is w or np.shares_memory(emb.weight, w)
    ids = np.array([[3, 3, 49], [0, 7, 3]])
    np.testing.assert_array_equal(emb(ids), w[ids])  # kernels are right at any alignment


@pytest.mark.parametrize("make", [
    lambda p: se.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: se.optim.Adagrad(p, lr=0.1),
    lambda p: se.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5),
    lambda p: se.optim.SparseAdam(p, lr=0.1),
])
def test_optimizer_states_are_aligned_and_match_an_unaligned_run(make):
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((40, 20)).astype(np.float32)
    ids = rng.integers(0, 40, size=(6, 5))
    go = rng.standard_normal((6, 5, 20)).astype(np.float32)
    results = []
    for table in (w0.copy(), misaligned(w0.shape, w0.dtype)):
        table[...] = w0
        emb = se.Embedding(40, 20, sparse=True, weight=table)
        opt = make([emb])
        for _ in range(3):
            emb.zero_grad()
            emb(ids)
            emb.backward(go)
            opt.step()
        states = [v for v in opt.state[0].values() if isinstance(v, np.ndarray)]
        assert states and all(is_aligned(s) for s in states)
        results.append(emb.weight.copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_loaded_tables_are_aligned(tmp_path):
    vocab, vectors = sio.load_word2vec_format(GLOVE, no_header=True)
    assert is_aligned(vectors)
    vocab2, vectors2 = sio.add_special_tokens(vocab, vectors, pad_token="<pad>", oov_token="<unk>")
    assert is_aligned(vectors2) and vectors2.shape == (78, 50)
    np.testing.assert_array_equal(vectors2[2:], vectors)
    np.testing.assert_array_equal(vectors2[0], 0)
    path = tmp_path / "v.bin"
    sio.save_word2vec_format(path, vocab, vectors, binary=True)
    _, vb = sio.load_word2vec_format(path, binary=True)
    assert is_aligned(vb)
    np.testing.assert_array_equal(vb, vectors)
    emb = se.Embedding.from_pretrained(misaligned((76, 50), np.float32))
    se.save(emb, tmp_path / "e.se")
    back = se.load(tmp_path / "e.se")
    assert is_aligned(back.weight)
