"""sparsembed benchmark suite: sparsembed vs torch CPU vs numpy vs the bandwidth bound.

Every workload is timed side by side in one process, with the same thread count for
sparsembed and torch (``--threads``, default 2), as the median of ``--repeat`` runs
(default 5) after one warm-up. The candidates of a workload are timed round-robin
(run r of every candidate, then run r + 1 ...) so that noise from a shared machine
hits all of them alike. Each sparsembed time is reported as a ratio to each peer
(lower is better):

- ``torch``: torch 2.13 CPU doing the same thing (``torch.nn.functional``,
  ``torch.ops.aten.embedding_dense_backward``, autograd with ``sparse=True`` and
  ``coalesce()``, ``torch.optim``);
- ``numpy``: the plain numpy way (``np.take``, ``np.add.at``, ``np.unique``), one
  thread, as numpy is;
- ``bound``: ``np.copyto`` between two preallocated arrays the size of the
  operation's output -- the memory-bandwidth floor of anything that writes that
  output.

Usage::

    python benchmarks/run.py                  # full suite, writes results/latest.{json,png}
    python benchmarks/run.py --quick          # D=64 workloads, threads, memory, bag tables
    python benchmarks/run.py --smoke          # tiny sizes, 1 repeat (used by the tests)
    python benchmarks/run.py --json out.json --threads 2 --repeat 5
"""

import os

# torch brings its own OpenMP runtime and sparsembed links the system one: two thread
# pools in one process. With OpenMP's default active waiting, each pool's idle threads
# spin on the cores the other pool needs next (on a 2-core machine every ratio becomes
# noise). Both therefore wait passively here, unless the caller chose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import sparsembed as se  # noqa: E402
from sparsembed import functional as SF  # noqa: E402
from sparsembed._kernels import _backward  # noqa: E402 - the streamed fill reference

try:  # torch is a peer, not a requirement
    import torch
    import torch.nn.functional as TF
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------
# sizes


def config(mode):
    # bag_widths: (dtype, D) of the bag sum forward beside torch over a cached table
    # (bag_V) and the full one (V): widths that are not powers of two, float16
    if mode == "smoke":
        return dict(V=1000, B=512, dims=(8,), bag=8, repeat=1,
                    scale_B=[2 ** 6, 2 ** 8], scale_V=[10 ** 2, 10 ** 3], scale_D=8,
                    mem_V=[10 ** 3, 10 ** 4], mem_B=256,
                    bag_widths=[("float32", 20), ("float16", 8)], bag_V=100)
    if mode == "quick":
        return dict(V=1_000_000, B=262_144, dims=(64,), bag=32, repeat=5,
                    scale_B=None, scale_V=None, scale_D=64,
                    mem_V=[10 ** 4, 10 ** 6], mem_B=65_536,
                    bag_widths=[("float32", 100), ("float16", 64)], bag_V=10_000)
    return dict(V=1_000_000, B=262_144, dims=(64, 256), bag=32, repeat=5,
                scale_B=[2 ** k for k in range(12, 21)],
                scale_V=[10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7], scale_D=64,
                mem_V=[10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7], mem_B=65_536,
                bag_widths=[("float32", 32), ("float32", 50), ("float32", 100),
                            ("float32", 300), ("float16", 64), ("float16", 100)],
                bag_V=10_000)


def aligned_empty(shape, dtype):
    """A C-contiguous array whose data starts on a 64-byte boundary.

    The benchmark's tables (shared by every candidate, so all read the same memory)
    are aligned as each library aligns the tables it allocates itself (torch's
    allocator and sparsembed both use 64 bytes). numpy puts a large array 16 bytes
    past a page boundary, where every row straddles cache lines: that made both
    libraries' bag forward and lookup 5-25% slower, torch's as much as ours."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def aligned_copy(a):
    out = aligned_empty(a.shape, a.dtype)
    np.copyto(out, a)
    return out


def make_table(rng, V, D):
    """A (V, D) float32 table of N(0, 1) values, 64-byte aligned."""
    out = aligned_empty((V, D), np.float32)
    rng.standard_normal(out=out, dtype=np.float32)
    return out


def make_ids(rng, dist, V, B):
    """``B`` ids in ``[0, V)``: uniform, or Zipf(1.2) ranks (truncated at ``V``) mapped
    through a random permutation, so popular rows are scattered over the table."""
    if dist == "uniform":
        return rng.integers(0, V, B, dtype=np.int64)
    w = np.arange(1, V + 1, dtype=np.float64) ** -1.2
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(B)), V - 1)
    return rng.permutation(V)[ranks].astype(np.int64)


# --------------------------------------------------------------------------------------
# timing


def _balanced_orders(n):
    """Orders of ``n`` candidates in which each one directly follows every other one
    equally often (a Williams design: ``n`` orders for even ``n``, ``2 n`` for odd)."""
    base, lo, hi = [0], 1, n - 1
    for i in range(1, n):
        if i % 2:
            base.append(lo)
            lo += 1
        else:
            base.append(hi)
            hi -= 1
    orders = [[(b + r) % n for b in base] for r in range(n)]
    if n % 2:
        orders += [order[::-1] for order in orders]
    return orders


def time_round_robin(cases, repeat, warmup=1, settle=3):
    """Median seconds of each callable in ``cases`` (dict name -> f), timed round-robin.

    Fairness between candidates: on the machine these figures come from the L3 (260
    MiB) holds a whole 1e6 x 64 float32 table, so a call's time depends on what ran
    before it. Measured (EmbeddingBag sum, D=64, uniform): right after numpy's
    ``take().sum()`` (64 MB of fresh pages and dirty lines) both sparsembed and
    torch need about 4 calls to get back to their steady time (1.9x slower on the
    first); timed straight after each other, the same two kernels swapped a 1.7x lead
    depending on the order. So each timed call follows ``settle`` untimed calls of
    the same candidate (the steady state of a loop calling it), and the rounds go
    through orders in which each candidate follows every other one equally often
    (``repeat`` is rounded up to a whole number of such cycles). The result of a call
    is released after the clock stops, so freeing it is not timed.
    """
    names = list(cases)
    orders = _balanced_orders(len(names))
    rounds = -(-repeat // len(orders)) * len(orders)
    times = {name: [] for name in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for f in cases.values():
                res = f()
                del res
        for r in range(rounds):
            for i in orders[r % len(orders)]:
                name = names[i]
                f = cases[name]
                for _ in range(settle):  # this candidate's own steady state
                    res = f()
                    del res
                t0 = time.perf_counter()
                res = f()
                t1 = time.perf_counter()
                del res
                times[name].append(t1 - t0)
    finally:
        if gc_was:
            gc.enable()
    return {name: float(np.median(ts)) for name, ts in times.items()}


def set_threads(n):
    se.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------
# workloads: each returns {candidate: callable}; "sparsembed" is the one compared


def _bound(shape, dtype):
    src = np.ones(shape, dtype=dtype)
    dst = np.zeros(shape, dtype=dtype)
    return lambda: np.copyto(dst, src)


def wl_forward(W, idx, g):
    Wt, it = torch.from_numpy(W) if torch else None, torch.from_numpy(idx) if torch else None
    cases = {
        "sparsembed": lambda: SF.embedding(idx, W),
        "numpy": lambda: np.take(W, idx, axis=0),
        "bound": _bound((idx.size, W.shape[1]), W.dtype),
    }
    if torch is not None:
        cases["torch"] = lambda: TF.embedding(it, Wt)
    return cases


def wl_dense_backward(W, idx, g):
    V, D = W.shape
    cases = {"sparsembed": lambda: SF.embedding_backward(g, idx, V)}

    def np_addat():
        out = np.zeros((V, D), dtype=g.dtype)
        np.add.at(out, idx, g)
        return out

    cases["numpy"] = np_addat
    cases["bound"] = _bound((V, D), W.dtype)
    # the floor of any dense gradient: writing every element of a (V, D) array once,
    # with plain stores (numpy's fill, one thread) and with non-temporal ones (no
    # read of each line before it is written: sparsembed's dense kernel with no id,
    # i.e. a streamed zero-fill on every thread, the least a (V, D) output can cost)
    zeros = aligned_empty((V, D), W.dtype)  # as the kernels' own outputs: line-aligned
    zeros.fill(1)
    cases["fill"] = lambda: zeros.fill(0)
    no_ids = np.zeros(0, dtype=np.int64)
    no_grad = np.zeros((0, D), dtype=W.dtype)
    cases["stream_fill"] = lambda: _backward.dense_backward_fill(
        no_grad, no_ids, no_ids, np.zeros(1, np.int64), False, zeros, se.get_num_threads(), True)
    if idx.size <= V:
        # ... and the same streamed fill while reading grad_output once, in order (ids
        # spread evenly, one per row: the kernel's sum of each is 0 + its grad row): the
        # whole traffic of a dense backward (write (V, D), read (B, D)) with no plan and
        # no random reads. Reads and streamed writes share each core's line buffers, so
        # this is more than the write alone.
        order = np.arange(idx.size, dtype=np.int64)  # the plan of those ids: perm, starts
        spread, starts = order * (V // idx.size), np.arange(idx.size + 1, dtype=np.int64)
        cases["stream_fill_read"] = lambda: _backward.dense_backward_fill(
            g, order, spread, starts, False, zeros, se.get_num_threads(), True)
    if torch is not None:
        gt, it = torch.from_numpy(g), torch.from_numpy(idx)
        cases["torch"] = lambda: torch.ops.aten.embedding_dense_backward(gt, it, V, -1, False)
    return cases


def _layer_steps(W, idx, g, sparse):
    """The training step of a layer over ``W`` (forward, then the backward into a
    fresh gradient), ours and torch's (None without torch), as timed cases."""
    V, D = W.shape
    emb = se.Embedding(V, D, sparse=sparse, weight=W)

    def se_step():
        emb.zero_grad()
        emb(idx)
        return emb.backward(g)

    if torch is None:
        return se_step, None
    wt = torch.nn.Parameter(torch.from_numpy(W))
    it, gt = torch.from_numpy(idx), torch.from_numpy(g)

    def torch_step():
        wt.grad = None
        TF.embedding(it, wt, sparse=sparse).backward(gt)
        return wt.grad.coalesce() if sparse else wt.grad

    return se_step, torch_step


def wl_sparse_fwd_bwd(W, idx, g):
    V, D = W.shape
    se_step, torch_step = _layer_steps(W, idx, g, sparse=True)

    def np_step():
        out = np.take(W, idx, axis=0)
        rows, inv = np.unique(idx, return_inverse=True)
        vals = np.zeros((rows.size, D), dtype=g.dtype)
        np.add.at(vals, inv, g)
        return out, rows, vals

    cases = {"sparsembed": se_step, "numpy": np_step,
             "bound": _bound((idx.size, D), W.dtype)}
    # for the least this can cost (report.py: "floor"): a streamed write of a (B, D)
    # array of table data (the lookup of one id B times: its row stays in L1, so only
    # the writes cost) and a sequential read of one (the bag sum of consecutive rows
    # of g, which writes a 32nd of it). Not a zero-fill: on the AMD EPYC machine
    # streamed zeros go out 2.1 x faster than other data (268 MB from one thread, a C
    # loop of _mm512_stream_ps: 2.9 ms for 0.0f, 6.2 ms for 1.5f), and the output and
    # row sums this prices are not zeros.
    one_row = np.zeros(idx.size, dtype=idx.dtype)
    cases["stream_write"] = lambda: SF.embedding(one_row, W)
    consecutive = np.arange(idx.size - idx.size % 32, dtype=np.int64).reshape(-1, 32)
    cases["seq_read"] = lambda: SF.embedding_bag(consecutive, g, mode="sum")
    if torch_step is not None:
        cases["torch"] = torch_step
    return cases


def wl_sparse_accumulate(W, idx, g):
    """Two lookups into one table (the batch's two halves, as two id fields sharing
    a table), each with its sparse backward: the second grad is added into the
    first (torch: autograd accumulates into ``.grad``, then ``coalesce()``)."""
    V, D = W.shape
    h = idx.size // 2
    ids_a, ids_b, g_a, g_b = idx[:h], idx[h:], g[:h], g[h:]
    emb = se.Embedding(V, D, sparse=True, weight=W)

    def se_step():
        emb.zero_grad()
        emb(ids_a)
        emb.backward(g_a)
        emb(ids_b)
        emb.backward(g_b)
        return emb.grad

    cases = {"sparsembed": se_step}
    if torch is not None:
        wt = torch.nn.Parameter(torch.from_numpy(W))
        it_a, it_b = torch.from_numpy(ids_a), torch.from_numpy(ids_b)
        gt_a, gt_b = torch.from_numpy(g_a), torch.from_numpy(g_b)

        def torch_step():
            wt.grad = None
            TF.embedding(it_a, wt, sparse=True).backward(gt_a)
            TF.embedding(it_b, wt, sparse=True).backward(gt_b)
            return wt.grad.coalesce()

        cases["torch"] = torch_step
    return cases


def wl_dense_fwd_bwd(W, idx, g):
    """A dense layer's step: forward, then the (V, D) gradient (``sparse=False``;
    torch: ``nn.Embedding``'s forward and autograd backward into ``.grad``)."""
    V, D = W.shape
    se_step, torch_step = _layer_steps(W, idx, g, sparse=False)

    def np_step():
        out = np.take(W, idx, axis=0)
        grad = np.zeros((V, D), dtype=g.dtype)
        np.add.at(grad, idx, g)
        return out, grad

    cases = {"sparsembed": se_step, "numpy": np_step}
    if torch_step is not None:
        cases["torch"] = torch_step
    return cases


def _has_optim():
    return hasattr(se, "optim")


def _train_cases(W, idx, g, opt_name):
    """forward + sparse backward + optimizer step; plus the fused path."""
    V, D = W.shape
    kwargs = {"SparseAdam": dict(lr=1e-3), "Adagrad": dict(lr=1e-2)}[opt_name]
    # the plain and the fused step share one table copy and one optimizer state
    # (timing only; it keeps the D = 256 runs within memory)
    W_se = aligned_copy(W)
    emb = se.Embedding(V, D, sparse=True, weight=W_se)
    opt = getattr(se.optim, opt_name)([emb], **kwargs)
    emb_f = emb
    opt_f = opt

    def se_step():
        emb.zero_grad()
        emb(idx)
        emb.backward(g)
        opt.step()

    def se_fused():
        emb_f(idx)
        emb_f.backward(g, optimizer=opt_f)

    cases = {"sparsembed": se_step, "fused": se_fused}
    if torch is not None:
        wt = torch.nn.Parameter(torch.from_numpy(aligned_copy(W)))
        topt = getattr(torch.optim, opt_name)([wt], **kwargs)
        it, gt = torch.from_numpy(idx), torch.from_numpy(g)

        def torch_step():
            topt.zero_grad()
            TF.embedding(it, wt, sparse=True).backward(gt)
            topt.step()

        cases["torch"] = torch_step
    return cases


def wl_step_sparseadam(W, idx, g):
    return _train_cases(W, idx, g, "SparseAdam")


def wl_step_adagrad(W, idx, g):
    return _train_cases(W, idx, g, "Adagrad")


def _has_bag():
    return hasattr(se, "EmbeddingBag") and hasattr(SF, "embedding_bag")


def _bag_inputs(idx, bag):
    n_bags = idx.size // bag
    return np.ascontiguousarray(idx[: n_bags * bag].reshape(n_bags, bag))


def wl_bag_forward(W, idx, g, bag=32):
    ids = _bag_inputs(idx, bag)
    D = W.shape[1]
    cases = {
        "sparsembed": lambda: SF.embedding_bag(ids, W, mode="sum"),
        "numpy": lambda: np.take(W, ids, axis=0).sum(axis=1),
        "bound": _bound((ids.size, D), W.dtype),  # the rows it must read, as one copy
    }
    if torch is not None:
        Wt, it = torch.from_numpy(W), torch.from_numpy(ids)
        cases["torch"] = lambda: TF.embedding_bag(it, Wt, mode="sum")
    return cases


def wl_bag_backward(W, idx, g, bag=32):
    """Sparse (row-sparse csr / coalesced) gradient of a sum bag."""
    ids = _bag_inputs(idx, bag)
    V, D = W.shape
    go = np.ascontiguousarray(g[: ids.shape[0]])
    cases = {
        "sparsembed": lambda: SF.embedding_bag_backward(go, ids, W, mode="sum", sparse=True)[0],
        "bound": _bound((ids.size, D), W.dtype),
    }

    def np_bwd():
        rows, inv = np.unique(ids, return_inverse=True)
        vals = np.zeros((rows.size, D), dtype=go.dtype)
        np.add.at(vals, inv.reshape(-1), np.repeat(go, ids.shape[1], axis=0))
        return rows, vals

    cases["numpy"] = np_bwd
    if torch is not None:
        wt = torch.nn.Parameter(torch.from_numpy(W))
        it, gt = torch.from_numpy(ids), torch.from_numpy(go)

        def torch_bwd():
            wt.grad = None
            TF.embedding_bag(it, wt, mode="sum", sparse=True).backward(gt)
            return wt.grad.coalesce()

        cases["torch"] = torch_bwd
    return cases


def _bag_mode_cases(W, ids, go, mode, kind):
    """sparsembed and torch on one bag mode: ``kind`` "forward", or forward +
    "dense" / "sparse" backward (the layer's own, its gradient dropped each time)."""
    V, D = W.shape
    if kind == "forward":
        cases = {"sparsembed": lambda: SF.embedding_bag(ids, W, mode=mode)}
    else:
        layer = se.EmbeddingBag(V, D, mode=mode, sparse=kind == "sparse", weight=W)

        def se_step():
            layer.zero_grad()
            layer(ids)
            return layer.backward(go)

        cases = {"sparsembed": se_step}
    if torch is not None:
        it, gt = torch.from_numpy(ids), torch.from_numpy(go)
        if kind == "forward":
            Wt = torch.from_numpy(W)
            cases["torch"] = lambda: TF.embedding_bag(it, Wt, mode=mode)
        else:
            wt = torch.nn.Parameter(torch.from_numpy(W))

            def torch_step():
                wt.grad = None
                TF.embedding_bag(it, wt, mode=mode, sparse=kind == "sparse").backward(gt)
                return wt.grad.coalesce() if kind == "sparse" else wt.grad

            cases["torch"] = torch_step
    return cases


def run_bag_modes(cfg, threads, repeat, log):
    """EmbeddingBag's three modes at the first D, uniform ids, bags of cfg["bag"]:
    forward, forward + dense backward, forward + sparse backward (sum and mean:
    torch has no sparse gradient for max), sparsembed beside torch."""
    if not _has_bag():
        return []
    rng = np.random.default_rng(4)
    V, B, D, bag = cfg["V"], cfg["B"], cfg["dims"][0], cfg["bag"]
    set_threads(threads)
    W = make_table(rng, V, D)
    ids = _bag_inputs(make_ids(rng, "uniform", V, B), bag)
    go = rng.standard_normal((ids.shape[0], D), dtype=np.float32)
    out = []
    for mode in ("sum", "mean", "max"):
        for kind in ("forward", "dense", "sparse"):
            if kind == "sparse" and mode == "max":
                continue
            times = time_round_robin(_bag_mode_cases(W, ids, go, mode, kind), repeat)
            gc.collect()
            rec = dict(mode=mode, kind=kind, V=V, D=D, n_bags=ids.shape[0], bag=bag,
                       times_ms={k: v * 1e3 for k, v in times.items()})
            out.append(rec)
            log(f"bag {mode:<4} {kind:<8} " + "  ".join(f"{k}={v * 1e3:.2f}ms"
                                                        for k, v in times.items()))
    return out


def run_bag_widths(cfg, threads, repeat, log):
    """The bag sum forward beside torch at other widths and dtypes (GloVe's 50, 100
    and 300; float16 tables), over a table that fits in cache (cfg["bag_V"] rows)
    and the full one, uniform and Zipf ids: no target, the cases users meet."""
    if not _has_bag() or torch is None:
        return []
    rng = np.random.default_rng(5)
    set_threads(threads)
    out = []
    for dtype, D in cfg["bag_widths"]:
        for V in (cfg["bag_V"], cfg["V"]):
            W = make_table(rng, V, D)
            if dtype != "float32":
                W = aligned_copy(W.astype(dtype))
            Wt = torch.from_numpy(W)
            for dist in ("uniform", "zipf"):
                ids = _bag_inputs(make_ids(rng, dist, V, cfg["B"]), cfg["bag"])
                it = torch.from_numpy(ids)
                cases = {"sparsembed": lambda ids=ids, W=W: SF.embedding_bag(ids, W, mode="sum"),
                         "torch": lambda it=it, Wt=Wt: TF.embedding_bag(it, Wt, mode="sum")}
                times = time_round_robin(cases, repeat)
                rec = dict(dtype=dtype, D=D, V=V, dist=dist, n_bags=ids.shape[0],
                           bag=cfg["bag"], times_ms={k: v * 1e3 for k, v in times.items()})
                out.append(rec)
                log(f"bag width {dtype} D={D} V={V} {dist:<7} " + "  ".join(
                    f"{k}={v * 1e3:.2f}ms" for k, v in times.items())
                    + f"  ratio={times['sparsembed'] / times['torch']:.3f}")
            del W, Wt
            gc.collect()
    return out


def workloads():
    wls = [("forward", wl_forward), ("dense_backward", wl_dense_backward),
           ("sparse_fwd_bwd", wl_sparse_fwd_bwd), ("sparse_accumulate", wl_sparse_accumulate),
           ("dense_fwd_bwd", wl_dense_fwd_bwd)]
    if _has_optim():
        wls += [("step_sparseadam", wl_step_sparseadam), ("step_adagrad", wl_step_adagrad)]
    if _has_bag():
        wls += [("bag_sum_forward", wl_bag_forward), ("bag_sum_backward", wl_bag_backward)]
    return wls


# --------------------------------------------------------------------------------------
# the parts


def ratios(times):
    se_t = times["sparsembed"]
    out = {f"vs_{k}": se_t / v for k, v in times.items() if k != "sparsembed" and v > 0}
    if "fused" in times and "torch" in times:
        out["fused_vs_torch"] = times["fused"] / times["torch"]
    return out


def run_main(cfg, threads, repeat, log):
    rng = np.random.default_rng(0)
    V, B = cfg["V"], cfg["B"]
    results = []
    set_threads(threads)
    for D in cfg["dims"]:
        W = make_table(rng, V, D)
        for dist in ("uniform", "zipf"):
            idx = make_ids(rng, dist, V, B)
            unique_rows = int(np.unique(idx).size)
            g = rng.standard_normal((B, D), dtype=np.float32)
            for name, wl in workloads():
                kw = {"bag": cfg["bag"]} if name.startswith("bag") else {}
                cases = wl(W, idx, g, **kw)
                times = time_round_robin(cases, repeat)
                del cases
                gc.collect()
                row = dict(workload=name, V=V, D=D, B=B, dist=dist, threads=threads,
                           unique_rows=unique_rows,
                           times_ms={k: v * 1e3 for k, v in times.items()},
                           ratios=ratios(times))
                results.append(row)
                log(_fmt_row(row))
        del W
        gc.collect()
    return results


def _fmt_row(row):
    t = row["times_ms"]
    r = row["ratios"]
    rs = "  ".join(f"{k}={v:.3f}" for k, v in r.items())
    ts = "  ".join(f"{k}={v:.1f}ms" for k, v in t.items())
    return f"{row['workload']:<18} D={row['D']:<4} {row['dist']:<8} {ts} | {rs}"


# The scaling points give each call a new batch, as a training loop does: this many
# batches (uniform ids, their grad_outputs) taken in turn by both candidates. With
# one batch repeated, a batch of a few thousand ids finds its rows in the caches
# from the call before, which no training step does (and which favoured torch's
# static split of the ids over threads: lookups of 4,096 ids 0.64 x torch with one
# batch repeated, 0.86 x with a new one each call).
SCALING_BATCHES = 4


def _rotating(cases_per_batch):
    """One case per candidate that runs the next batch's case at each call."""
    out = {}
    for name in cases_per_batch[0]:
        calls = [cases[name] for cases in cases_per_batch]
        turn = itertools.cycle(range(len(calls)))
        out[name] = lambda calls=calls, turn=turn: calls[next(turn)]()
    return out


def _scaling_point(rng, W, B, repeat, label, log):
    """sparsembed and torch timed on forward and sparse_fwd_bwd for one (V, B) point,
    a new batch each call (``SCALING_BATCHES`` in turn)."""
    V, D = W.shape
    batches = [(make_ids(rng, "uniform", V, B), rng.standard_normal((B, D), dtype=np.float32))
               for _ in range(SCALING_BATCHES)]
    points = []
    for name, wl in (("forward", wl_forward), ("sparse_fwd_bwd", wl_sparse_fwd_bwd)):
        cases = _rotating([{k: v for k, v in wl(W, idx, g).items() if k in ("sparsembed", "torch")}
                           for idx, g in batches])
        times = time_round_robin(cases, repeat)
        points.append(dict(workload=name, V=V, B=B, batches=SCALING_BATCHES,
                           times_ms={k: v * 1e3 for k, v in times.items()}))
        log(f"scaling {label} {name:<15} " + "  ".join(f"{k}={v * 1e3:.2f}ms" for k, v in times.items()))
    return points


def run_scaling(cfg, threads, repeat, log):
    """Time vs batch size and vs vocabulary size (D fixed), sparsembed and torch."""
    if cfg["scale_B"] is None:
        return {}
    rng = np.random.default_rng(1)
    D = cfg["scale_D"]
    out = {"D": D, "threads": threads, "vs_B": [], "vs_V": []}
    set_threads(threads)
    V = cfg["V"]
    W = make_table(rng, V, D)
    for B in cfg["scale_B"]:
        out["vs_B"] += _scaling_point(rng, W, B, repeat, f"B={B:<8}", log)
    del W
    B = cfg["scale_B"][len(cfg["scale_B"]) * 2 // 3]
    for V in cfg["scale_V"]:
        W = make_table(rng, V, D)
        out["vs_V"] += _scaling_point(rng, W, B, repeat, f"V={V:<9}", log)
        del W
        gc.collect()
    return out


def run_threads(cfg, repeat, log):
    """sparsembed with 1 thread vs 2 threads on the same data (torch alongside)."""
    rng = np.random.default_rng(2)
    V, B, D = cfg["V"], cfg["B"], cfg["dims"][0]
    W = make_table(rng, V, D)
    idx = make_ids(rng, "uniform", V, B)
    g = rng.standard_normal((B, D), dtype=np.float32)
    emb = se.Embedding(V, D, sparse=True, weight=W)
    emb(idx)
    ops = {
        "forward": lambda: SF.embedding(idx, W),
        "dense_backward": lambda: SF.embedding_backward(g, idx, V),
        "sparse_backward": lambda: SF.embedding_backward(g, idx, V, sparse=True),
    }
    if _has_optim():
        for opt_name, kw in (("SparseAdam", dict(lr=1e-3)), ("Adagrad", dict(lr=1e-2))):
            e = se.Embedding(V, D, sparse=True, weight=aligned_copy(W))
            e(idx)
            e.backward(g)
            grad = e.grad
            o = getattr(se.optim, opt_name)([e], **kw)

            def step(e=e, o=o, grad=grad):
                e.grad = grad
                o.step()

            ops[f"{opt_name.lower()}_step"] = step

            ef = se.Embedding(V, D, sparse=True, weight=aligned_copy(W))
            of = getattr(se.optim, opt_name)([ef], **kw)
            ef(idx)
            ops[f"{opt_name.lower()}_fused"] = (
                lambda ef=ef, of=of: ef.backward(g, optimizer=of))
    # the machine's own scaling: filling a (V, D) array (the dense gradient's write)
    # and copying a (B, D) one (the forward's traffic), split over n Python threads
    import threading

    big = np.ones((V, D), dtype=np.float32)
    src = np.ones((B, D), dtype=np.float32)
    dst = np.empty_like(src)

    def split(n, work):
        parts = [(k * big.shape[0] // n, (k + 1) * big.shape[0] // n) for k in range(n)]
        th = [threading.Thread(target=work, args=p) for p in parts]
        for x in th:
            x.start()
        for x in th:
            x.join()

    def fill_rows(lo, hi):
        big[lo:hi].fill(0)

    def copy_rows(lo, hi):
        lo, hi = lo * B // V, hi * B // V
        np.copyto(dst[lo:hi], src[lo:hi])

    machine_ops = {
        "numpy fill (V, D) [machine]": lambda: split(se.get_num_threads(), fill_rows),
        "numpy copy (B, D) [machine]": lambda: split(se.get_num_threads(), copy_rows),
    }
    out = []
    for name, f in list(ops.items()) + list(machine_ops.items()):
        per = {}
        # alternate thread counts run by run
        for n in (1, 2):
            per[n] = []
        f()
        for _ in range(repeat):
            for n in (1, 2):
                se.set_num_threads(n)
                t0 = time.perf_counter()
                res = f()
                t1 = time.perf_counter()
                del res
                per[n].append(t1 - t0)
        t1m, t2m = float(np.median(per[1])), float(np.median(per[2]))
        out.append(dict(op=name, V=V, D=D, B=B, t1_ms=t1m * 1e3, t2_ms=t2m * 1e3,
                        speedup=t1m / t2m))
        log(f"threads {name:<18} 1t={t1m * 1e3:.1f}ms 2t={t2m * 1e3:.1f}ms "
            f"speedup={t1m / t2m:.2f}x")
    se.set_num_threads(2)
    return out


def _clear_cache():
    try:
        from sparsembed._kernels import _pool
    except ImportError:  # an older build without the buffer cache
        return
    _pool.clear()


def _peak_tracemalloc(f):
    gc.collect()
    _clear_cache()
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        res = f()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del res
    return peak


def _peak_rss_delta(f):
    """Peak RSS growth during ``f`` (Linux: reset the high-water mark first), or None."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    _clear_cache()

    def rss(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return None

    base = rss("VmRSS:")
    res = f()
    peak = rss("VmHWM:")
    del res
    return None if base is None or peak is None else peak - base


def run_memory(cfg, log):
    """Peak memory of one sparse backward, and of one fused step (forward included),
    at a fixed batch
    (fixed number of unique rows) as the table grows: it follows the unique rows, not V
    (the only O(V) part is the csr ``indptr``, 4 bytes per table row, and only once
    something reads it: see ``_rowsparse._DeferredPointerCSR``; the optimizer's own
    state is allocated once, outside the measured step)."""
    rng = np.random.default_rng(3)
    D, B = cfg["scale_D"], cfg["mem_B"]
    out = []
    base_ids = rng.integers(0, min(cfg["mem_V"]), B, dtype=np.int64)
    g = rng.standard_normal((B, D), dtype=np.float32)
    for V in cfg["mem_V"]:
        idx = (base_ids * (V // min(cfg["mem_V"]))).astype(np.int64)  # same uniques, spread
        W = np.zeros((V, D), dtype=np.float32)  # lazily zeroed: costs no RSS until touched
        emb = se.Embedding(V, D, sparse=True, weight=W)
        emb(idx)
        rec = dict(V=V, B=B, D=D, unique=int(np.unique(idx).size))
        f = lambda: SF.embedding_backward(g, idx, V, sparse=True)  # noqa: E731
        f()
        rec["sparse_backward_tracemalloc"] = _peak_tracemalloc(f)
        rec["sparse_backward_rss"] = _peak_rss_delta(f)
        if _has_optim():
            opt = se.optim.SparseAdam([emb], lr=1e-3)
            emb.backward(g, optimizer=opt)  # creates the optimizer state of these rows

            def fused():
                # a whole step: the forward (its (B, D) output included), the batch's
                # row plan, the fused backward + update
                emb(idx)
                return emb.backward(g, optimizer=opt)

            rec["fused_step_tracemalloc"] = _peak_tracemalloc(fused)
            rec["fused_step_rss"] = _peak_rss_delta(fused)
        rec["dense_grad_bytes"] = V * D * 4
        out.append(rec)
        log("memory " + "  ".join(f"{k}={v}" for k, v in rec.items()))
        del W, emb
        gc.collect()
    return out


def machine_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "sparsembed": se.__version__, "openmp": se.show_config()["openmp"],
            "platform": platform.platform(), "cpus": os.cpu_count()}
    if torch is not None:
        info["torch"] = torch.__version__
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                               "L2 cache", "L3 cache"):
                info[key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result.get("scaling") or {}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, xlabel in ((axes[0], "vs_B", "batch size B (V = 1e6)"),
                            (axes[1], "vs_V", "table rows V")):
        pts = sc.get(key, [])
        for wl, style in (("forward", "-"), ("sparse_fwd_bwd", "--")):
            rows = [p for p in pts if p["workload"] == wl]
            if not rows:
                continue
            xs = [p["B" if key == "vs_B" else "V"] for p in rows]
            for cand, color in (("sparsembed", "C0"), ("torch", "C3")):
                ys = [p["times_ms"].get(cand) for p in rows]
                if all(y is not None for y in ys):
                    ax.plot(xs, ys, style, marker="o", color=color, label=f"{cand} {wl}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    th = result.get("threads") or []
    if th:
        names = [t["op"] for t in th]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [t["t1_ms"] for t in th], 0.4, label="1 thread")
        ax.bar(x + 0.2, [t["t2_ms"] for t in th], 0.4, label="2 threads")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("median time (ms)")
        ax.legend(fontsize=8)
        ax.set_title("sparsembed, 1 vs 2 threads")
    fresh = ", a new batch each call" if (sc.get("vs_B") or [{}])[0].get("batches", 1) > 1 else ""
    axes[0].set_title(f"time vs batch size (D = {sc.get('D', '')}{fresh})")
    axes[1].set_title(f"time vs table size{fresh}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="D = 64 workloads, the thread comparison, the memory check and the bag tables")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat (for tests)")
    p.add_argument("--json", default=None, help="write the results here "
                   "(default: benchmarks/results/latest.json for a full run)")
    p.add_argument("--plot", default=None, help="write the PNG plot here "
                   "(default: benchmarks/results/scaling.png for a full run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=None, help="runs per candidate (default 5)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = config(mode_name)
    repeat = args.repeat if args.repeat is not None else cfg["repeat"]
    if mode_name != "smoke" and repeat < 5:
        print("note: fewer than 5 runs per candidate", file=sys.stderr)
    json_path = args.json
    plot_path = args.plot
    if mode_name == "full":
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        json_path = json_path or os.path.join(HERE, "results", "latest.json")
        plot_path = plot_path or os.path.join(HERE, "results", "scaling.png")

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    result = {"mode": mode_name, "threads": None, "repeat": repeat, "machine": machine_info(),
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    log(f"sparsembed benchmarks ({mode_name}), {args.threads} threads, median of {repeat}")
    result["main"] = run_main(cfg, args.threads, repeat, log)
    result["bag_modes"] = run_bag_modes(cfg, args.threads, repeat, log)
    result["bag_widths"] = run_bag_widths(cfg, args.threads, repeat, log)
    result["threads"] = run_threads(cfg, repeat, log) if args.threads >= 2 or args.smoke else []
    result["scaling"] = {} if args.no_scaling else run_scaling(cfg, args.threads, repeat, log)
    result["memory"] = [] if args.no_memory else run_memory(cfg, log)
    result["n_threads"] = args.threads
    result["seconds"] = time.perf_counter() - t_start
    log(f"done in {result['seconds']:.1f} s")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
        log(f"wrote {json_path}")
    if plot_path and (result["scaling"] or result["threads"]):
        try:
            plot(result, plot_path)
            log(f"wrote {plot_path}")
        except ImportError:
            log("matplotlib is not installed: no plot (pip install matplotlib)")
    return result


if __name__ == "__main__":
    main()
