"""Matrix factorization: one SGD epoch over explicit ratings, in compiled code.

The update is Funk's / Surprise's ``SVD`` rule, applied rating by rating::

    err  = r - (mu + b_u + b_i + p_u . q_i)
    b_u += lr * (err - reg * b_u)
    b_i += lr * (err - reg * b_i)
    p_u += lr * (err * q_i - reg * p_u)      # with the old q_i
    q_i += lr * (err * p_u - reg * q_i)      # with the old p_u

Parallel epochs follow the stratified schedule of DSGD (Gemulla et al., KDD 2011):
users are split into ``B`` blocks and items into ``B`` blocks; stratum ``s`` is the
set of blocks ``(t, (t + s) mod B)``, ``t = 0 .. B-1``, which share no user and no
item. The strata run one after the other; inside a stratum each block is processed
by one thread, serially, in the order given. No two threads ever touch the same row
(no Hogwild races), so an epoch is a deterministic function of the input order and
``B``, whatever the OpenMP schedule. With ``B = 1`` it is plain serial SGD.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t

from sparsembed._kernels._types cimport index_t

cdef extern from "_lines.h":
    void prefetch "SE_PREFETCH"(const void* p) noexcept nogil


cdef inline floating _dot(const floating* p, const floating* q, int64_t k) noexcept nogil:
    """p . q with four partial sums (a fixed order: deterministic, and vectorizable)."""
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef int64_t f, k4 = k - k % 4
    for f in range(0, k4, 4):
        s0 = s0 + p[f] * q[f]
        s1 = s1 + p[f + 1] * q[f + 1]
        s2 = s2 + p[f + 2] * q[f + 2]
        s3 = s3 + p[f + 3] * q[f + 3]
    for f in range(k4, k):
        s0 = s0 + p[f] * q[f]
    return (s0 + s1) + (s2 + s3)


cdef double _sgd_range(
    const index_t* users,      # IN (n,) user rows
    const index_t* items,      # IN (n,) item rows
    const floating* ratings,   # IN (n,)
    int64_t lo,
    int64_t hi,
    floating* P,               # IN/OUT (n_users, k) user factors
    floating* Q,               # IN/OUT (n_items, k) item factors
    floating* bu,              # IN/OUT (n_users,) user biases
    floating* bi,              # IN/OUT (n_items,) item biases
    int64_t k,
    floating mu,
    floating lr,
    floating reg,
    bint biased,
) noexcept nogil:
    """SGD over ratings ``lo .. hi-1``; returns their sum of squared errors (pre-update)."""
    cdef int64_t n, f, u, i
    cdef floating* p
    cdef floating* q
    cdef floating est, err, pf, qf
    cdef double sse = 0.0
    cdef int64_t line = 64 // sizeof(floating)  # one prefetch per cache line
    cdef const floating* pa
    cdef const floating* qa
    for n in range(lo, hi):
        u = users[n]
        i = items[n]
        p = P + u * k
        q = Q + i * k
        if n + 2 < hi:  # the rows two ratings ahead: hides the cache misses of random order
            pa = P + users[n + 2] * k
            qa = Q + items[n + 2] * k
            f = 0
            while f < k:
                prefetch(pa + f)
                prefetch(qa + f)
                f += line
        est = _dot(p, q, k)
        if biased:
            est = est + mu + bu[u] + bi[i]
        err = ratings[n] - est
        sse += <double> err * err
        if biased:
            bu[u] += lr * (err - reg * bu[u])
            bi[i] += lr * (err - reg * bi[i])
        for f in range(k):
            pf = p[f]
            qf = q[f]
            p[f] = pf + lr * (err * qf - reg * pf)
            q[f] = qf + lr * (err * pf - reg * qf)
    return sse


def sgd_epoch(
    const index_t[::1] users,        # IN (n,) user rows, grouped by block
    const index_t[::1] items,        # IN (n,) item rows, same order
    const floating[::1] ratings,     # IN (n,) ratings, same order
    const int64_t[::1] starts,       # IN (B * B + 1,) block s * B + t is starts[s*B+t] .. starts[s*B+t+1]
    floating[:, ::1] P,              # IN/OUT (n_users, k)
    floating[:, ::1] Q,              # IN/OUT (n_items, k)
    floating[::1] bu,                # IN/OUT (n_users,)
    floating[::1] bi,                # IN/OUT (n_items,)
    double mu,
    double lr,
    double reg,
    bint biased,
    double[::1] sse,                 # OUT (B * B,) squared error of each block
    int n_threads,
):
    """One epoch of SGD; block ``s * B + t`` holds stratum ``s``, user block ``t``.

    Strata run in order; the ``B`` blocks of a stratum run in parallel (disjoint users
    and items). ``B = 1`` is a serial pass over the ratings in the given order.
    """
    cdef int64_t n_blocks2 = starts.shape[0] - 1
    cdef int64_t B = 1
    cdef int64_t s, t, b
    cdef int64_t k = P.shape[1]
    while B * B < n_blocks2:
        B += 1
    if B * B != n_blocks2:
        raise ValueError(f"starts must have B*B + 1 entries, got {starts.shape[0]}")
    if sse.shape[0] != n_blocks2:
        raise ValueError("sse must have B*B entries")
    if Q.shape[1] != k or bu.shape[0] != P.shape[0] or bi.shape[0] != Q.shape[0]:
        raise ValueError("inconsistent factor and bias shapes")
    if users.shape[0] != items.shape[0] or users.shape[0] != ratings.shape[0]:
        raise ValueError("users, items and ratings must have the same length")
    if starts[n_blocks2] != users.shape[0]:
        raise ValueError("starts must end at the number of ratings")
    sse[:] = 0.0
    if users.shape[0] == 0 or k == 0:
        return
    with nogil:
        for s in range(B):
            for t in prange(B, schedule="static", num_threads=n_threads):
                b = s * B + t
                sse[b] = _sgd_range(&users[0], &items[0], &ratings[0], starts[b], starts[b + 1],
                                    &P[0, 0], &Q[0, 0], &bu[0], &bi[0], k,
                                    <floating> mu, <floating> lr, <floating> reg, biased)
