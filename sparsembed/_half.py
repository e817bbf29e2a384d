"""float16 tables: float16 storage, float32 arithmetic.

Two operations read a float16 table as it is: the lookup (a copy of bytes: an
even-width row goes through the compiled gather as float32 pairs, see
``_cpu.gather``) and the sum/mean bag pooling (``_bag.half_bag_forward``, which
converts the rows in registers and sums in float32). The arithmetic kernels are
otherwise written for float32 and float64, and their signatures stay as they are:
every other operation that reads or writes a float16 table works on a *compact
float32 working copy* of the rows the batch touches:

1. the batch's row plan (:class:`sparsembed._cpu.RowPlan`, computed once per batch)
   gives the ``U`` distinct rows and, through ``perm``/``starts``, the map from each
   entry to its distinct row, so the ids are remapped to ``0 .. U-1`` without another
   sort (:func:`compact`);
2. the touched rows are gathered into a float32 ``(U, dim)`` array (the conversion is
   exact) and, for the optimizers, the touched rows of the float32 state likewise;
3. the existing float32 kernel runs on the compact copy;
4. the rows it changed are rounded once to float16 (round to nearest even) and
   scattered back, and the state rows are written back unrounded.

The float16 <-> float32 row conversions are small compiled kernels
(``_kernels/_f16.pyx``: parallel over rows, 8 or 16 values per instruction where the
CPU has F16C or AVX-512F, bit for bit numpy's ``astype``); the state rows move
through the compiled row gather and scatter, the other gathers and scatters are
vectorised numpy.

So every sum, mean, norm, gradient and optimizer update is computed in float32 and
rounded once when stored; optimizer state is float32 and so are gradients (torch 2.13
CPU accumulates a float16 gradient in float16, keeps float16 optimizer state, takes
renorm's norm and a mean bag's sum in float16; we are deliberately more accurate). A stored value
beyond float16's range becomes +-inf, silently, as in torch. There is no per-row
Python work; memory stays ``O(rows touched x dim)`` per batch, except for a dense
(every-row) optimizer step, which converts the table in blocks of :data:`BLOCK_ROWS`
rows.

For float32 and float64 tables the wrappers here (:func:`update_rows`,
:func:`fused_update`) call the kernels directly.
"""

import numpy as np

from sparsembed._kernels import _bag, _f16, _lookup, _optim, _pool
from sparsembed._kernels import _plan as _plan_kernels
from sparsembed._threads import ROW_MOVE_GRAIN, threads_for

HALF = np.dtype(np.float16)

#: rows converted at a time by a dense optimizer step on a float16 table
BLOCK_ROWS = 1 << 16

_NO_PSW = np.empty(0, dtype=np.float32)


def is_half(a):
    """Whether ``a`` is a float16 numpy array (a CPU float16 table)."""
    return isinstance(a, np.ndarray) and a.dtype == HALF


def compute_dtype(dtype):
    """The arithmetic (and gradient, state) dtype of a table of ``dtype``: float32 for
    float16, else the dtype itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == HALF else dtype


def _bits(weight):
    """The uint16 view of a C-contiguous float16 array (what the _f16 kernels take)."""
    return weight.view(np.uint16)


def _rows_to(weight, rows, out):
    """``out[u] = float32(weight[rows[u]])`` (exact); ``rows`` int64."""
    if weight.flags.c_contiguous:
        _f16.rows_to_float(_bits(weight), rows, out, threads_for(out.size, ROW_MOVE_GRAIN))
    else:
        out[...] = np.take(weight, rows, axis=0)


def _rows32(weight, rows):
    """``weight[rows]`` as a new C-contiguous float32 array (exact for float16)."""
    out = _pool.empty((rows.shape[0], weight.shape[1]), np.float32)
    _rows_to(weight, rows, out)
    return out


def _store(weight, rows, work):
    """``weight[rows[u]] = float16(work[u])`` for distinct ``rows`` (round to nearest even)."""
    if weight.flags.c_contiguous and weight.flags.writeable:
        _f16.rows_from_float(work, rows, _bits(weight), threads_for(work.size, ROW_MOVE_GRAIN))
    else:
        weight[rows] = work


def to_float(a):
    """A float16 array of any shape converted to a new C-contiguous float32 array
    (exact; numpy's ``astype`` converts on one thread, ~4x slower on two here)."""
    a = np.ascontiguousarray(a)
    out = _pool.empty(a.shape, np.float32)
    _f16.to_float(a.reshape(-1).view(np.uint16), out.reshape(-1),
                  threads_for(a.size, ROW_MOVE_GRAIN))
    return out


def to_half(a):
    """A C-contiguous 2-D float32 array rounded to a new float16 array (nearest even)."""
    out = np.empty(a.shape, dtype=HALF)
    _f16.to_half(a, _bits(out), threads_for(a.size, ROW_MOVE_GRAIN))
    return out


def compact(weight, plan, n, padding_idx):
    """The compact float32 working copy of the rows a planned batch touches.

    Parameters
    ----------
    weight : ndarray of shape (num_embeddings, dim), float16
    plan : RowPlan
        The plan of the ``n`` entries (padding skipped when ``padding_idx`` is set).
    n : int
        Number of planned entries.
    padding_idx : int or None

    Returns
    -------
    table : ndarray of shape (U + 1, dim), float32
        ``table[u] = weight[plan.rows[u]]``; the last row holds the padding row (or
        zeros without padding).
    local : ndarray of shape (n,), int64
        Entry ``e``'s row in ``table``: ``local[perm[k]] = u`` for ``k`` in segment
        ``u``; padding entries (the ones the plan skipped) get ``U``.
    pad : int or None
        ``U`` when ``padding_idx`` is set, else None.
    """
    rows = plan.rows
    u = rows.shape[0]
    table = _pool.empty((u + 1, weight.shape[1]), np.float32)
    _rows_to(weight, rows, table[:u])
    if padding_idx is None:
        table[u] = 0
    else:
        table[u] = weight[padding_idx]
    local = _pool.empty((n,), np.int64)
    local.fill(u)
    _plan_kernels.segment_of_entries(plan.perm, plan.starts, local, threads_for(n))
    return table, local, (None if padding_idx is None else u)


def _plan(flat, num_rows, padding_idx):
    from sparsembed import _cpu  # _cpu imports this module

    return _cpu.plan_rows(flat, num_rows, padding_idx)


# ---------------------------------------------------------------- forward

def gather(weight, flat):
    """``weight[flat]``: a copy, so the float16 values are returned as they are."""
    return np.take(weight, flat, axis=0)


def renorm_rows_(weight, rows, max_norm, norm_type):
    """float16 ``embedding_renorm_`` on distinct ``rows``: norms and scaling in float32
    (the norm accumulated in float64, as for the other dtypes), rounded once."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.shape[0] == 0 or weight.shape[1] == 0:
        return
    work = _rows32(weight, rows)
    _lookup.renorm_rows(work, np.arange(rows.shape[0], dtype=np.int64), max_norm, norm_type,
                        threads_for(work.size))
    _store(weight, rows, work)


def pools_rows(weight, mode):
    """Whether :func:`bag_forward` pools ``weight``'s float16 rows as they are (and so
    range-checks the bagged ids itself) rather than a compact float32 copy."""
    return mode != "max" and weight.flags.c_contiguous


def bag_forward(weight, flat, starts, mode, padding_idx, per_sample_weights=None, plan=None,
                n_threads=None):
    """EmbeddingBag pooling of a float16 table, in float32, the result rounded once to
    float16. Same returns as ``_cpu.bag_forward``. Sum and mean read the float16 rows
    as they are (``_bag.half_bag_forward``: see :func:`pools_rows`), checking the ids
    on the way: a bag holding a bad id gets ``counts[b] = -(e + 1)``, ``e`` its first
    bad entry, and garbage values. Max pools the compact float32 copy (ids checked by
    the caller).

    ``plan`` is the plan of ``flat[:starts[-1]]`` (padding skipped); computed when None
    (max mode only).
    """
    from sparsembed import _cpu

    psw = None
    if per_sample_weights is not None:
        psw = np.ascontiguousarray(per_sample_weights, dtype=np.float32)
    if pools_rows(weight, mode):
        n_bags = starts.shape[0] - 1
        out = _pool.empty((n_bags, weight.shape[1]), HALF)
        counts = np.empty(n_bags, dtype=np.int64)
        _bag.half_bag_forward(_bits(weight), flat, starts,
                              -1 if padding_idx is None else int(padding_idx), mode == "mean",
                              _NO_PSW if psw is None else psw, _bits(out), counts,
                              threads_for(flat.shape[0] * weight.shape[1], ROW_MOVE_GRAIN)
                              if n_threads is None else n_threads)
        return out, None, counts
    end = int(starts[-1])
    if plan is None:
        plan = _plan(flat[:end], weight.shape[0], padding_idx)
    table, local, pad = compact(weight, plan, end, padding_idx)
    out, argmax, counts = _cpu.bag_forward(table, local, starts, mode, pad, psw)
    return to_half(out), argmax, counts


def per_sample_weights_grad(grad2d, weight, flat, entry_bag, padding_idx, plan=None):
    """``dot(grad2d[bag], weight[id])`` per entry for a float16 table, in float32
    (accumulated in float64 by the kernel); (n,) float32, 0 for padding and unbagged
    entries. ``plan`` as for :func:`bag_forward`."""
    end = entry_bag.shape[0]
    if plan is None:
        plan = _plan(flat[:end], weight.shape[0], padding_idx)
    table, local, pad = compact(weight, plan, end, padding_idx)
    grad2d = np.ascontiguousarray(grad2d, dtype=np.float32)
    out = np.zeros(flat.shape[0], dtype=np.float32)
    _bag.per_sample_weights_grad(grad2d, table, local, entry_bag, -1 if pad is None else pad,
                                 out, threads_for(flat.shape[0] * grad2d.shape[1]))
    return out


# ---------------------------------------------------------------- optimizers

def _state_rows(s, rows):
    """The touched rows of a float32 state array (a copy), or the (0, *) dummy as it is."""
    if s.shape[0] == 0:
        return s
    if not s.flags.c_contiguous:
        return np.take(s, rows, axis=0)
    out = _pool.empty((rows.shape[0], s.shape[1]), s.dtype)
    _lookup.gather(s, rows, out, threads_for(out.size, ROW_MOVE_GRAIN))
    return out


def _put_state(s, rows, work):
    """``s[rows] = work`` for the distinct touched rows."""
    if s.shape[0] == 0:
        return
    if s.flags.c_contiguous and s.flags.writeable:
        _lookup.scatter_rows(work, rows, s, threads_for(work.size, ROW_MOVE_GRAIN))
    else:
        s[rows] = work


def update_rows(kind, lr, momentum, weight_decay, eps, c1, c2, c3, weight, rows, all_rows,
                values, s1, s2, n_threads):
    """``_optim.update_rows`` for every table dtype (same arguments).

    A float16 ``weight`` is updated through a float32 copy of its touched rows (all
    rows, block by block, when ``all_rows``); ``values``, ``s1`` and ``s2`` are float32.
    """
    hyper = (kind, lr, momentum, weight_decay, eps, c1, c2, c3)
    if not is_half(weight):
        _optim.update_rows(*hyper, weight, rows, all_rows, values, s1, s2, n_threads)
        return
    n, dim = weight.shape
    if dim == 0:
        return
    none = np.empty(0, dtype=np.int64)
    if all_rows:
        for lo in range(0, n, BLOCK_ROWS):  # a loop over blocks, not rows
            hi = min(lo + BLOCK_ROWS, n)
            block = np.arange(lo, hi, dtype=np.int64)
            work = _rows32(weight, block)
            _optim.update_rows(*hyper, work, none, True, values[lo:hi],
                               s1[lo:hi] if s1.shape[0] else s1,
                               s2[lo:hi] if s2.shape[0] else s2, n_threads)
            _store(weight, block, work)
        return
    if rows.shape[0] == 0:
        return
    work = _rows32(weight, rows)
    w1, w2 = _state_rows(s1, rows), _state_rows(s2, rows)
    _optim.update_rows(*hyper, work, np.arange(rows.shape[0], dtype=np.int64), False, values,
                       w1, w2, n_threads)
    _store(weight, rows, work)
    _put_state(s1, rows, w1)
    _put_state(s2, rows, w2)


def fused_update(kind, lr, momentum, weight_decay, eps, c1, c2, c3, weight, grad, perm, rows,
                 starts, src, scale, won, scale_by_count, s1, s2, n_threads, weights=None):
    """``_optim.fused_update`` for every table dtype (same arguments).

    A float16 ``weight`` is updated through a float32 copy of the plan's rows (and of
    their state rows); ``grad``, ``scale``, ``s1`` and ``s2`` are float32.
    """
    hyper = (kind, lr, momentum, weight_decay, eps, c1, c2, c3)
    if not is_half(weight):
        _optim.fused_update(*hyper, weight, grad, perm, rows, starts, src, scale, won,
                            scale_by_count, s1, s2, n_threads, weights=weights)
        return
    if rows.shape[0] == 0 or weight.shape[1] == 0:
        return
    work = _rows32(weight, rows)
    w1, w2 = _state_rows(s1, rows), _state_rows(s2, rows)
    _optim.fused_update(*hyper, work, grad, perm, np.arange(rows.shape[0], dtype=np.int64),
                        starts, src, scale, won, scale_by_count, w1, w2, n_threads,
                        weights=weights)
    _store(weight, rows, work)
    _put_state(s1, rows, w1)
    _put_state(s2, rows, w2)
