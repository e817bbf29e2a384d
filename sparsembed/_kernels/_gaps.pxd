# Dense gradients written into unzeroed memory: a dense (num_rows, dim) gradient has
# a few rows with sums and many without, and writing the zeros between the summed
# rows in the same pass (streamed for a large table) costs one write per row where
# zero-filling first cost two (and a fresh block's page faults). Shared by the
# Embedding backward (_backward) and the EmbeddingBag one (_bag).

from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memset

from sparsembed._kernels._memory cimport stream_fence, stream_zero

cdef enum:
    # a dense output's work per grad entry (a row read in plan order) and per output
    # row (streamed), in the same unit, for block_start_spanned: measured ~17 and
    # ~11 ns per row-thread at D = 64 (row sums of 262,144 entries vs a zero-fill of
    # 1e6 rows)
    ENTRY_COST = 3
    ROW_COST = 2


cdef inline void zero_rows(floating* out, int64_t dim, int64_t lo, int64_t hi,
                           bint stream) noexcept nogil:
    """Zero rows [lo, hi) of ``out`` (``stream``: non-temporal stores; the caller
    fences them once it is done)."""
    if hi <= lo:
        return
    if stream:
        stream_zero(out + lo * dim, (hi - lo) * dim * sizeof(floating))
    else:
        memset(out + lo * dim, 0, (hi - lo) * dim * sizeof(floating))


cdef inline void zero_gaps(
    floating* out,             # (*, dim)
    int64_t dim,
    const int64_t* rows,       # (n_rows,) sorted distinct rows
    int64_t u_lo,              # the gaps just before rows[u_lo .. u_hi - 1]
    int64_t u_hi,
    int64_t tail_upto,         # >= 0 for the last block only (u_hi = number of rows):
                               #    also rows[u_hi - 1] + 1 .. tail_upto - 1
    bint stream,
) noexcept nogil:
    """Zero the rows of ``out`` that no segment writes, for one block of segments."""
    cdef int64_t u, nxt
    for u in range(u_lo, u_hi + 1):
        if u < u_hi:
            nxt = rows[u]
        elif tail_upto >= 0:
            nxt = tail_upto
        else:
            break
        zero_rows(out, dim, rows[u - 1] + 1 if u > 0 else 0, nxt, stream)
    if stream:
        stream_fence()
