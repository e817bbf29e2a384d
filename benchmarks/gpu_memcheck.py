"""The GPU kernels' error paths, for ``compute-sanitizer --tool memcheck``.

Out-of-range ids (negative and past the table, in int32 and int64, through the
vector and the scalar row loops) and bad offsets reach every kernel that checks
them: the lookup, the plan's check, the pooling in each mode (ids in a bag, past the
last bag, with padding), the offsets kernel. Each call must raise the CPU's error
type, and under memcheck no kernel may read or write out of bounds on the way; a
valid forward and backward of each layer runs too. ``gpu_check.sh`` runs it under
the sanitizer where one is installed::

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/gpu_memcheck.py

Exits 0 when every call raised as expected (the sanitizer's own exit code reports
memory errors); ``main(cupy)`` returns the number of errors raised.
"""

import sys

import numpy as np


def main(cp):
    import sparsembed as se
    import sparsembed.functional as F

    rng = np.random.default_rng(0)
    raised = 0

    def expect(exc, fn):
        nonlocal raised
        try:
            fn()
        except exc:
            raised += 1
            return
        raise AssertionError(f"no {exc.__name__} raised")

    V, n = 100, 5000
    for dim in (8, 7):  # 16-byte vector loops and scalar loops
        w = cp.asarray(rng.standard_normal((V, dim)).astype(np.float32))
        for idx_dtype in (np.int32, np.int64):
            ids = rng.integers(0, V, size=n)
            ids[[17, 4000]] = [V + 10**6, -10**6]
            d = cp.asarray(ids.astype(idx_dtype))
            expect(IndexError, lambda: se.Embedding(V, dim, device="cuda")(d))
            expect(IndexError, lambda: se.Embedding(V, dim, max_norm=1.0, device="cuda")(d))
            for mode in ("sum", "mean", "max"):
                expect(IndexError, lambda: F.embedding_bag(d, w, cp.arange(0, n, 25), mode=mode))
                expect(IndexError, lambda: F.embedding_bag(  # bad ids past the last bag
                    d, w, cp.arange(0, 20, 5), mode=mode, include_last_offset=True))
                expect(IndexError, lambda: F.embedding_bag(d.reshape(50, 100), w, mode=mode,
                                                           padding_idx=3))
            expect(ValueError, lambda: F.embedding_bag(d, w, cp.asarray([0, 9, 4, 10**9])))
            expect(ValueError, lambda: F.embedding_bag(d, w, cp.asarray([0, 10**9])))
            good = cp.asarray(rng.integers(0, V, size=n).astype(idx_dtype))
            emb = se.Embedding(V, dim, sparse=True, device="cuda")
            emb.backward(cp.ones_like(emb(good)))
            bag = se.EmbeddingBag(V, dim, mode="max", sparse=True, device="cuda")
            bag.backward(cp.ones_like(bag(good, cp.arange(0, n, 7, dtype=cp.int32))))
    return raised


if __name__ == "__main__":
    from sparsembed import _cuda

    if not _cuda.cupy_available():
        sys.exit("gpu_memcheck.py: needs CuPy and a CUDA device")
    import cupy

    count = main(cupy)
    cupy.cuda.Device().synchronize()
    print(f"gpu_memcheck: {count} errors raised as expected")
