"""Optimizer kernels: row updates of SGD, Adagrad, SparseAdam and row-wise Adagrad.

Two entry points share one per-row update (``_update_row``):

- ``update_rows``: apply the update to the rows of a gradient that is already built,
  either every row of a dense (num_embeddings, dim) gradient or the stored rows of a
  row-sparse one (``rows`` + ``values``). Work is O(rows x dim).
- ``fused_update``: the fused backward + update. For each distinct row of a batch's
  row plan, sum that row's ``grad_output`` rows into a thread-local buffer (in input
  order, as ``_backward.row_sums`` does), then update the weight row and its state
  rows. The gradient matrix is never built.

Every row is updated by exactly one thread and the per-row arithmetic does not depend
on the thread count, so results are bitwise identical for every number of threads.

Hyper-parameters reach the kernels as doubles and are rounded to the table's dtype
before use, as torch rounds Python scalars to the tensor's dtype.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

from sparsembed._kernels._bag cimport bag_row_sum
from sparsembed._kernels._memory cimport (
    checked_set_llc_bytes,
    llc_bytes,
    prefetch_distance,
    prefetch_row,
)
from sparsembed._kernels._simd cimport (
    SE_MEAN,
    pool_level,
    pool_read_once_flags,
    pool_set_level,
    pool_sum,
    pool_table,
)
from sparsembed._kernels._sum_pooling cimport pool_table_at
from sparsembed._kernels._openmp_helpers cimport claim_part, claimed_parts
from sparsembed._kernels._split cimport block_start_costed

# Segments summed per call of the SIMD pooling in the fused update, into a buffer
# of as many rows (16 KiB at dim 256 in float32: stays in L1 for the updates).
DEF FUSED_CHUNK = 16

# Elements per update call when a dense gradient updates every row with an update
# whose columns are all independent (all but row-wise Adagrad): a run of whole rows
# is one long row to it. One call per row cost 18% of a plain SGD step (V = 1e6,
# D = 64, float32, 2 threads, Intel Xeon VM: 21.1 ms per row, 18.0 in runs of 4,096
# elements; torch's add_ 17.5).
DEF DENSE_RUN = 4096

cdef extern from "_simd_update.h":
    cdef enum:
        SGD "SE_SGD"
        ADAGRAD "SE_ADAGRAD"
        SPARSE_ADAM "SE_SPARSE_ADAM"
        ROWWISE_ADAGRAD "SE_ROWWISE_ADAGRAD"
    ctypedef struct Hyper "se_hyper":
        int kind
        double lr
        double momentum
        double weight_decay
        double eps
        double c1
        double c2
        double c3
    ctypedef void (*update_f32_t)(const Hyper*, float*, const float*, float*, float*,
                                  int64_t) noexcept nogil
    ctypedef void (*update_f64_t)(const Hyper*, double*, const double*, double*, double*,
                                  int64_t) noexcept nogil
    ctypedef struct update_table "se_update_table":
        update_f32_t f32
        update_f64_t f64
    update_table update_table_at "sparsembed_update_table"(int level) noexcept nogil

KIND_SGD = SGD
KIND_ADAGRAD = ADAGRAD
KIND_SPARSE_ADAM = SPARSE_ADAM
KIND_ROWWISE_ADAGRAD = ROWWISE_ADAGRAD


cdef inline void _update_row(
    const update_table* fns,  # the update functions at the SIMD level in use
    const Hyper* h,
    floating* w,          # INOUT (dim,) weight row
    const floating* g,    # IN (dim,) gradient row
    floating* s1,         # INOUT momentum / sum / exp_avg row ((1,) for RowWise), or NULL
    floating* s2,         # INOUT exp_avg_sq row, or NULL
    int64_t dim,
) noexcept nogil:
    # the arithmetic (torch's, per kind) is in _simd_update.h
    if floating is float:
        fns.f32(h, w, g, s1, s2, dim)
    else:
        fns.f64(h, w, g, s1, s2, dim)


cdef inline Hyper _hyper(int kind, double lr, double momentum, double weight_decay,
                         double eps, double c1, double c2, double c3) noexcept:
    cdef Hyper h
    h.kind = kind
    h.lr = lr
    h.momentum = momentum
    h.weight_decay = weight_decay
    h.eps = eps
    h.c1 = c1
    h.c2 = c2
    h.c3 = c3
    return h


cdef inline void _prefetch_state(
    const floating* weight, const floating* s1, const floating* s2, int64_t r,
    int64_t dim, size_t row_bytes, size_t s1_bytes,
) noexcept nogil:
    # the table row r and its state rows, about to be updated
    prefetch_row(weight + r * dim, row_bytes)
    if s1 != NULL:
        prefetch_row(s1 + r * (s1_bytes // sizeof(floating)), s1_bytes)
    if s2 != NULL:
        prefetch_row(s2 + r * dim, row_bytes)


cdef _check_rows_and_state(int kind, int64_t num_rows, int64_t dim,
                           const int64_t[::1] rows, int64_t n_rows,
                           floating[:, ::1] s1, floating[:, ::1] s2):
    """ValueError, before any write, for rows or state that do not fit the table:
    the callers validate, and this catches any path that did not (O(1): ``rows`` is
    sorted, so its ends bound it). Kinds that keep state need it: Adagrad and row-wise
    Adagrad s1 (one value per row for the latter), SparseAdam s1 and s2; SGD's
    momentum s1 is optional."""
    cdef int64_t width = 1 if kind == ROWWISE_ADAGRAD else dim
    cdef bint needs_s1 = kind != SGD
    cdef bint needs_s2 = kind == SPARSE_ADAM
    if n_rows > 0 and (rows[0] < 0 or rows[n_rows - 1] >= num_rows):
        raise ValueError(f"rows run from {rows[0]} to {rows[n_rows - 1]}, outside a table "
                         f"of {num_rows} rows")
    if (s1.shape[0] > 0 or needs_s1) and (s1.shape[0] != num_rows or s1.shape[1] != width):
        raise ValueError(f"state s1 has shape ({s1.shape[0]}, {s1.shape[1]}), expected "
                         f"({num_rows}, {width})")
    if (s2.shape[0] > 0 or needs_s2) and (s2.shape[0] != num_rows or s2.shape[1] != dim):
        raise ValueError(f"state s2 has shape ({s2.shape[0]}, {s2.shape[1]}), expected "
                         f"({num_rows}, {dim})")
    if kind == SGD and s2.shape[0] > 0:
        raise ValueError("SGD keeps no second state")


# the last-level cache size, read here once holding the GIL: pool_read_once_flags (_simd.pxd)
# reads it again inside parallel regions
llc_bytes()


def update_rows(
    int kind,
    double lr, double momentum, double weight_decay, double eps,
    double c1, double c2, double c3,
    floating[:, ::1] weight,           # INOUT (num_embeddings, dim)
    const int64_t[::1] rows,           # IN (U,) sorted distinct rows (ignored if all_rows)
    bint all_rows,                     # IN values has one row per table row
    const floating[:, ::1] values,     # IN (U, dim) or (num_embeddings, dim) gradient rows
    floating[:, ::1] s1,               # INOUT (num_embeddings, dim or 1) state, or (0, *)
    floating[:, ::1] s2,               # INOUT (num_embeddings, dim) state, or (0, *)
    int n_threads,
):
    """Apply one optimizer update to the rows of a built gradient."""
    cdef Hyper h = _hyper(kind, lr, momentum, weight_decay, eps, c1, c2, c3)
    cdef update_table ufns = update_table_at(pool_level())
    cdef int64_t n_rows = values.shape[0]
    cdef int64_t dim = weight.shape[1]
    cdef bint has_s1 = s1.shape[0] > 0
    cdef bint has_s2 = s2.shape[0] > 0
    cdef int64_t u, r
    # the table and state rows are read at random: prefetch those of row u + ahead
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef size_t s1_bytes = (s1.shape[1] if has_s1 else 0) * sizeof(floating)
    cdef int64_t ahead = prefetch_distance(3 * row_bytes)
    if values.shape[1] != dim or values.shape[0] != (weight.shape[0] if all_rows
                                                      else rows.shape[0]):
        raise ValueError(f"values has shape ({values.shape[0]}, {values.shape[1]}), "
                         f"expected one row of {dim} per "
                         f"{'table row' if all_rows else 'row in rows'}")
    _check_rows_and_state(kind, weight.shape[0], dim, rows, 0 if all_rows else n_rows,
                          s1, s2)
    if n_rows == 0 or dim == 0:
        return
    cdef floating* s1_ptr = &s1[0, 0] if has_s1 else NULL
    cdef floating* s2_ptr = &s2[0, 0] if has_s2 else NULL
    cdef int64_t run = max(1, DENSE_RUN // dim)
    cdef int64_t n_runs = (n_rows + run - 1) // run
    if all_rows and kind != ROWWISE_ADAGRAD:
        # the same operations on each element as row by row: the same bits
        with nogil:
            for u in prange(n_runs, schedule="static", num_threads=n_threads):
                r = u * run
                _update_row(&ufns, &h, &weight[r, 0], &values[r, 0],
                            s1_ptr + r * dim if has_s1 else NULL,
                            s2_ptr + r * dim if has_s2 else NULL,
                            (min(r + run, n_rows) - r) * dim)
        return
    with nogil:
        for u in prange(n_rows, schedule="static", num_threads=n_threads):
            if u + ahead < n_rows and not all_rows:
                _prefetch_state(&weight[0, 0], s1_ptr, s2_ptr, rows[u + ahead], dim,
                                row_bytes, s1_bytes)
            r = u if all_rows else rows[u]
            _update_row(&ufns, &h, &weight[r, 0], &values[u, 0],
                        &s1[r, 0] if has_s1 else NULL,
                        &s2[r, 0] if has_s2 else NULL, dim)


def simd_level():
    """The SIMD level the fused update's row sums run at: 0 baseline, 1 AVX2,
    2 AVX-512F (this module's own, capped by SPARSEMBED_SIMD like the others)."""
    return pool_level()


def set_simd_level(int level):
    """Run the fused update's row sums at ``level`` (capped at what the CPU
    supports); returns the level now in use. For tests: every level gives the same
    bits."""
    return pool_set_level(level)

def set_last_level_cache_bytes(int64_t nbytes):
    """For tests: this module's kernels take the last-level cache to be ``nbytes``
    (0: read it again); returns the size now in use."""
    return checked_set_llc_bytes(nbytes)


def fused_update(
    int kind,
    double lr, double momentum, double weight_decay, double eps,
    double c1, double c2, double c3,
    floating[:, ::1] weight,           # INOUT (num_embeddings, dim)
    const floating[:, ::1] grad,       # IN (n_src, dim) grad_output rows
    const int64_t[::1] perm,           # IN (m,) plan: entries grouped by row
    const int64_t[::1] rows,           # IN (U,) plan: sorted distinct rows
    const int64_t[::1] starts,         # IN (U + 1,) plan: segment bounds into perm
    const int64_t[::1] src,            # IN (n,) entry -> grad row, or (0,): entry e reads row e
    const floating[::1] scale,         # IN (n,) per-entry factor, or (0,): none
    const uint64_t[:, ::1] won,        # IN (n, words) columns each entry won (EmbeddingBag's
                                       #    max mode: _bag.won_masks), or (0, 0); needs src
    bint scale_by_count,               # IN divide each row's sum by its occurrence count
    floating[:, ::1] s1,               # INOUT state as in update_rows, or (0, *)
    floating[:, ::1] s2,               # INOUT state as in update_rows, or (0, *)
    int n_threads,
    int64_t row_cost=4,                # IN work of one row update, in grad rows read
                                       #    (the thread split, see below)
    const floating[::1] weights=None,  # IN (m,) factor of each plan entry's grad row
                                       #    (without src and scale: a bag batch's plan
                                       #    in grad rows, _bag.entry_grad_rows)
):
    """Sum each planned row's gradient into a thread-local buffer, then update it.

    Row ``rows[u]`` gets ``sum_k scale[e] * grad[src[e]]`` over the entries
    ``e = perm[k]``, ``k in [starts[u], starts[u+1])`` (in that order; divided by the
    count with ``scale_by_count``), then one optimizer update. Without ``src`` and
    ``scale`` the sums are the SIMD pooling's, as in the backward's row sums (each grad
    row times ``weights[k]`` when given); otherwise
    EmbeddingBag's own ``bag_row_sum`` (``_bag.pxd``; with ``won``, an entry only
    sends the columns it won), so the result equals the bag backward's row gradient.
    """
    cdef Hyper h = _hyper(kind, lr, momentum, weight_decay, eps, c1, c2, c3)
    cdef update_table ufns = update_table_at(pool_level())
    cdef int64_t n_rows = rows.shape[0]
    cdef int64_t dim = weight.shape[1]
    # (a state of width 0, at dim 0, has no element to point at: nothing to update)
    cdef bint has_s1 = s1.shape[0] > 0 and s1.shape[1] > 0
    cdef bint has_s2 = s2.shape[0] > 0 and s2.shape[1] > 0
    cdef bint has_src = src.shape[0] > 0
    cdef bint has_scale = scale.shape[0] > 0
    cdef bint pooled = not has_src and not has_scale
    cdef const floating* weights_ptr = NULL
    cdef const floating* scale_ptr = &scale[0] if has_scale else NULL
    cdef const uint64_t* won_ptr = &won[0, 0] if won.shape[0] > 0 and won.shape[1] > 0 else NULL
    cdef int64_t words = won.shape[1]
    cdef int updated = 0
    cdef int* updated_ptr = &updated
    cdef int64_t u, r, lo, hi, u_lo, u_hi, u_end, i, c, n_blocks
    cdef long long next_block = 0
    cdef int64_t T = n_threads if n_threads > 0 else 1
    cdef size_t row_bytes = dim * sizeof(floating)
    cdef size_t s1_bytes = (s1.shape[1] if has_s1 else 0) * sizeof(floating)
    cdef int64_t ahead = prefetch_distance(row_bytes)          # grad rows, in plan order
    cdef int64_t ahead_rows = prefetch_distance(3 * row_bytes)  # table + state rows
    cdef int64_t m = 0
    cdef int64_t n_grad = grad.shape[0]
    cdef int flags = (SE_MEAN if scale_by_count else 0) | pool_read_once_flags(n_grad * row_bytes)
    cdef pool_table fns = pool_table_at(pool_level())
    cdef floating* buf = NULL
    cdef floating* s1_ptr = &s1[0, 0] if has_s1 else NULL
    cdef floating* s2_ptr = &s2[0, 0] if has_s2 else NULL
    if row_cost < 0:
        # the split's cost must grow with the segment index, or blocks could overlap
        raise ValueError(f"row_cost must be >= 0, got {row_cost}")
    if weights is not None and weights.shape[0] > 0:
        if not pooled or weights.shape[0] != perm.shape[0]:
            raise ValueError(f"weights must hold one factor per plan entry "
                             f"({perm.shape[0]}) and come without src and scale")
        weights_ptr = &weights[0]
    if won.shape[0] > 0 and (won.shape[0] != src.shape[0] or words != (dim + 63) // 64):
        raise ValueError(f"won must have shape ({src.shape[0]}, {(dim + 63) // 64}), "
                         f"got ({won.shape[0]}, {words})")
    if grad.shape[1] != dim:
        raise ValueError(f"grad has {grad.shape[1]} columns, the table {dim}")
    if starts.shape[0] != n_rows + 1 or (n_rows > 0 and (starts[0] < 0
                                                          or starts[n_rows] > perm.shape[0])):
        raise ValueError(f"starts must bound {n_rows} segments of perm's "
                         f"{perm.shape[0]} entries")
    if n_rows > 0:
        m = starts[n_rows]
    _check_rows_and_state(kind, weight.shape[0], dim, rows, n_rows, s1, s2)
    if n_rows == 0 or dim == 0:
        return
    if T > n_rows:
        T = n_rows
    # blocks of segments with about the same work each: entries summed plus row_cost
    # per row updated. Split by entries alone, a Zipf batch gave one thread the few
    # long segments and the other nearly all 30k row updates; row_cost 4 (measured,
    # 2 threads, V = 1e6, 262,144 Zipf ids, grad not cached): D = 256 SparseAdam
    # 25.6 -> 23.4 ms, Adagrad 23.1 -> 21.0 ms, D = 64 SparseAdam 9.0 -> 8.3 ms;
    # uniform batches unchanged. CLAIMED_PARTS_PER_THREAD blocks a thread, each
    # thread claiming the next as it comes free, as the backward's row sums do: the
    # cost model's misses and a thread slowed by the host even out.
    n_blocks = claimed_parts(n_rows, T)
    with nogil, parallel(num_threads=T):
        buf = <floating*> malloc((FUSED_CHUNK if pooled else 1) * dim * sizeof(floating))
        # a thread without a buffer claims nothing: the others take every block
        c = claim_part(&next_block, n_blocks, T) if buf != NULL else n_blocks
        if buf != NULL:
            updated_ptr[0] = 1
        while c < n_blocks:
            u_lo = block_start_costed(&starts[0], n_rows, n_blocks, c, row_cost)
            u_hi = block_start_costed(&starts[0], n_rows, n_blocks, c + 1, row_cost)
            if pooled:
                # FUSED_CHUNK segments at a time: their sums (from zero, in plan
                # order, in vector registers: the backward's row sums, same bits)
                # into buf, then their updates
                u = u_lo
                while u < u_hi:
                    u_end = min(u + FUSED_CHUNK, u_hi)
                    for i in range(u, min(u + ahead_rows, u_end)):
                        _prefetch_state(&weight[0, 0], s1_ptr, s2_ptr, rows[i], dim,
                                        row_bytes, s1_bytes)
                    pool_sum(&fns, &grad[0, 0], n_grad, dim, &perm[0], m, &starts[u], 0,
                             u_end - u, -1, weights_ptr, ahead, flags, buf, NULL, NULL)
                    for i in range(u, u_end):
                        if i + ahead_rows < u_end:
                            _prefetch_state(&weight[0, 0], s1_ptr, s2_ptr,
                                            rows[i + ahead_rows], dim, row_bytes, s1_bytes)
                        r = rows[i]
                        _update_row(&ufns, &h, &weight[r, 0], buf + (i - u) * dim,
                                    &s1[r, 0] if has_s1 else NULL,
                                    &s2[r, 0] if has_s2 else NULL, dim)
                    u = u_end
            else:
                for u in range(u_lo, u_hi):
                    lo = starts[u]
                    hi = starts[u + 1]
                    r = rows[u]
                    if u + ahead_rows < n_rows:
                        _prefetch_state(&weight[0, 0], s1_ptr, s2_ptr, rows[u + ahead_rows],
                                        dim, row_bytes, s1_bytes)
                    # EmbeddingBag's row sum (through src) or scaled entries: each
                    # added to zero, in input order
                    bag_row_sum(&grad[0, 0], dim, &perm[0], lo, hi,
                                &src[0] if has_src else NULL, scale_ptr, won_ptr, words,
                                scale_by_count, buf)
                    _update_row(&ufns, &h, &weight[r, 0], buf,
                                &s1[r, 0] if has_s1 else NULL,
                                &s2[r, 0] if has_s2 else NULL, dim)
            c = claim_part(&next_block, n_blocks, T)
        free(buf)
    if not updated:
        raise MemoryError("could not allocate the fused update's row buffer")
