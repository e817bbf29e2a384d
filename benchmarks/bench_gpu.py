"""GPU benchmark: sparsembed's CUDA backend against torch on the same GPU.

Operations (one table of ``--num-embeddings`` x ``--dim``, a batch of ``--batch`` ids):

- forward: ``emb(ids)`` (ids already on the device), against ``torch.nn.Embedding``
  and against the memory-bandwidth bound (a device copy of the output);
- sparse backward: ``emb.backward(grad_output)`` to a canonical CSR gradient (sort,
  per-row segment sums, CSR assembly), against torch's sparse backward followed by
  ``coalesce()`` (the same canonical form);
- SparseAdam step: ``se.optim.SparseAdam.step()`` on that gradient, against
  ``torch.optim.SparseAdam.step()`` (skipped when se.optim has no GPU path);
- bag sum forward: ``se.functional.embedding_bag(ids, weight, offsets, mode="sum")``
  over the same ids cut into bags of ``--bag-size``, against torch's
  ``F.embedding_bag`` (ids and offsets already on the device for both).

Each time is the median of ``--repeat`` runs after ``--warmup`` runs, measured with
CUDA events around the operation only.

``--breakdown`` also times the pieces of sparsembed's operations: the id range check
on its own, the lookup kernel, the lookup with its range check and read of the flag,
the row plan, its sort (and a stable sort of the ids alone) and its other steps, the
row sums, the CSR assembly (and its column indices and row pointer apart), a
backward that adds to a gradient not zeroed (and two of its pieces), the bag checks,
the pooling kernel, and the pooling with its range check: where the time goes. It
calls the backend's internals, so it follows them.

Usage::

    python benchmarks/bench_gpu.py                       # V=1e7, D=128, B=2**20
    python benchmarks/bench_gpu.py --batch 65536 --json results/gpu.json

Exits with a message (status 1) when CuPy or a CUDA device is missing.
"""

import argparse
import json
import platform
import statistics
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-embeddings", type=float, default=1e7, help="V (default 1e7)")
    p.add_argument("--dim", type=int, default=128, help="D (default 128)")
    p.add_argument("--batch", type=int, default=2**20, help="B ids per batch (default 2**20)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--dist", choices=["uniform", "zipf"], default="uniform",
                   help="id distribution (zipf: a=1.2, clipped to V)")
    p.add_argument("--bag-size", type=int, default=32, help="ids per bag (default 32)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the pieces of sparsembed's operations")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cuda_timer(cp):
    """time_ms(fn, setup=None, repeat, warmup): median milliseconds of fn() on the GPU."""

    def time_ms(fn, repeat, warmup, setup=None):
        times = []
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for i in range(warmup + repeat):
            if setup is not None:
                setup()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            if i >= warmup:
                times.append(cp.cuda.get_elapsed_time(start, stop))
        return statistics.median(times)

    return time_ms


def make_ids(args, V, rng):
    if args.dist == "uniform":
        return rng.integers(0, V, size=args.batch, dtype=np.int64)
    return np.minimum(rng.zipf(1.2, size=args.batch) - 1, V - 1).astype(np.int64)


def bench_sparsembed(args, cp, ids_host, time_ms):
    import sparsembed as se
    import sparsembed.functional  # noqa: F401 - se.functional

    V, D = int(args.num_embeddings), args.dim
    res = {}
    emb = se.Embedding(V, D, sparse=True, dtype=args.dtype, device="cuda",
                       weight=cp.random.standard_normal((V, D), dtype=args.dtype))
    ids = cp.asarray(ids_host)
    out = emb(ids)
    res["forward_ms"] = time_ms(lambda: emb(ids), args.repeat, args.warmup)
    offsets = cp.arange(0, args.batch, args.bag_size, dtype=cp.int64)
    res["bag_sum_forward_ms"] = time_ms(
        lambda: se.functional.embedding_bag(ids, emb.weight, offsets, mode="sum"),
        args.repeat, args.warmup)
    copy_dst = cp.empty_like(out)
    res["copy_bound_ms"] = time_ms(lambda: cp.copyto(copy_dst, out), args.repeat, args.warmup)
    grad_out = cp.random.standard_normal(out.shape, dtype=args.dtype)
    out = copy_dst = None  # free them before the backward
    # each backward after a fresh forward, so the sort is timed too
    res["sparse_backward_ms"] = time_ms(lambda: emb.backward(grad_out), args.repeat, args.warmup,
                                        setup=lambda: (emb(ids), emb.zero_grad()))
    res["touched_rows"] = int(cp.count_nonzero(cp.diff(emb.grad.indptr)))
    try:
        opt = se.optim.SparseAdam([emb], lr=1e-3)
        opt.step()
    except (AttributeError, ValueError, TypeError) as exc:
        res["sparse_adam_step_ms"] = None
        res["sparse_adam_note"] = f"se.optim has no GPU path here: {exc}"
    else:
        res["sparse_adam_step_ms"] = time_ms(opt.step, args.repeat, args.warmup)
    return res


def bench_breakdown(args, cp, ids_host, time_ms):
    """Milliseconds of the pieces of sparsembed's forward, sparse backward and bag forward
    (the CUDA backend's internals, called directly)."""
    import sparsembed as se
    from sparsembed import _bags
    from sparsembed._cuda import backend

    be = backend._impl
    V, D, B = int(args.num_embeddings), args.dim, args.batch
    dtype = np.dtype(args.dtype)
    weight = cp.random.standard_normal((V, D), dtype=dtype)
    grad = cp.random.standard_normal((B, D), dtype=dtype)
    flat = cp.asarray(ids_host)
    out = cp.empty((B, D), dtype=dtype)

    def t(fn):
        return time_ms(fn, args.repeat, args.warmup)

    bad = cp.zeros(1, dtype=cp.int64)
    res = {"check_range": t(lambda: be.check_index_range(flat, V)),
           "lookup_kernel": t(lambda: be.kernels.gather(weight, flat, out, bad)),
           "lookup_checked": t(lambda: be.gather(weight, flat, check_range=True)),
           "device_copy_of_output": t(lambda: cp.copyto(out, grad)),
           "plan_rows": t(lambda: be.plan_rows(flat, V))}
    keys = flat * B + cp.arange(B, dtype=flat.dtype)
    res["plan_argsort"] = t(lambda: cp.argsort(keys))
    # the plan's sort if it ordered the ids alone (CuPy's argsort is always stable),
    # on 32-bit keys where the table has fewer than 2**31 rows
    ids32 = flat.astype(cp.int32)
    res["plan_argsort_ids32_stable"] = t(lambda: cp.argsort(ids32))
    # the plan's steps after the sort as CuPy operations (what plan_rows did before
    # se_plan_heads / se_plan_segments): the two gathers by the order, then the
    # segment heads and their positions (flatnonzero: a scan and a read of its size)
    order = cp.argsort(keys)
    pos = cp.arange(B, dtype=cp.int64)
    res["plan_gathers"] = t(lambda: (pos[order], flat[order]))
    sorted_ids = flat[order]

    def segment_heads():
        head = cp.ones(B, dtype=bool)
        head[1:] = sorted_ids[1:] != sorted_ids[:-1]
        return cp.flatnonzero(head)

    res["plan_segment_heads"] = t(segment_heads)
    # ... and as plan_rows does it now: two kernels, a scan and one read of its total
    ids64 = cp.ascontiguousarray(flat, dtype=cp.int64)

    def plan_segments_kernels():
        sorted_out = cp.empty(B, dtype=cp.int64)
        head = cp.empty(B, dtype=cp.int32)
        be.kernels.plan_heads(ids64, order, sorted_out, head)
        at = cp.cumsum(head, dtype=cp.int64)
        k = int(at[-1])
        starts, rows = cp.empty(k + 1, dtype=cp.int64), cp.empty(k, dtype=cp.int64)
        be.kernels.plan_segments(head, at, sorted_out, starts, rows)

    res["plan_segments_kernels"] = t(plan_segments_kernels)
    plan = be.plan_rows(flat, V)
    res["row_sums"] = t(lambda: be.row_grad(grad, plan, False))
    values = be.row_grad(grad, plan, False)
    res["csr_assembly"] = t(lambda: be.from_rows(plan.rows, values, V))
    cols = cp.empty(values.size, dtype=cp.int32)

    def columns_broadcast():  # what from_rows did before se_fill_columns
        cols.reshape(-1, D)[...] = cp.arange(D, dtype=cp.int32)

    def indptr_scan():  # what from_rows did before se_row_pointer
        steps = cp.zeros(V + 1, dtype=cp.int32)
        steps[plan.rows + 1] = D
        return cp.cumsum(steps, dtype=cp.int32)

    indptr = cp.empty(V + 1, dtype=cp.int32)
    res["csr_columns_kernel"] = t(lambda: be.kernels.fill_columns(cols, D))
    res["csr_columns_broadcast"] = t(columns_broadcast)
    res["csr_indptr_kernel"] = t(lambda: be.kernels.row_pointer(plan.rows, V, D, indptr))
    res["csr_indptr_scan"] = t(indptr_scan)
    emb = se.Embedding(V, D, sparse=True, dtype=dtype, device="cuda", weight=weight)
    emb(flat)
    emb.backward(grad)
    res["backward_adding_to_grad"] = time_ms(lambda: emb.backward(grad), 3, 1)
    # its pieces: reading one gradient's rows back (checks included), their union
    g1 = be.from_rows(plan.rows, values, V)
    res["add_grad_row_values"] = t(lambda: be.row_values(g1))
    res["add_grad_row_union"] = t(lambda: cp.unique(cp.concatenate([plan.rows, plan.rows])))
    emb = values = g1 = None
    offsets = cp.arange(0, B, args.bag_size, dtype=cp.int64)

    def bags():  # as the forward calls it: the ids are checked by the pooling
        return _bags.bags_of(flat, offsets, None, "sum", False, V, dtype, be, check_range=False)

    res["bag_checks"] = t(bags)
    b = bags()
    n_bags = b.starts.shape[0] - 1
    pooled, counts = cp.empty((n_bags, D), dtype=dtype), cp.empty(n_bags, dtype=cp.int64)
    res["bag_pool_kernel"] = t(lambda: be.kernels.bag_forward(weight, b.flat, b.starts, -1, 0,
                                                              None, pooled, None, counts, bad))
    res["bag_pool_checked"] = t(lambda: be.bag_forward(weight, b.flat, b.starts, "sum", None,
                                                       check_range=True))
    return res


def bench_torch(args, ids_host, cp):
    import torch

    V, D = int(args.num_embeddings), args.dim
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    emb = torch.nn.Embedding(V, D, sparse=True, device=dev, dtype=dtype)
    ids = torch.as_tensor(ids_host, device=dev)
    res = {"torch_version": torch.__version__}

    def time_ms(fn, setup=None):
        times = []
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(args.warmup + args.repeat):
            if setup is not None:
                setup()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            if i >= args.warmup:
                times.append(start.elapsed_time(stop))
        return statistics.median(times)

    with torch.no_grad():
        res["forward_ms"] = time_ms(lambda: emb(ids))
        offsets = torch.arange(0, args.batch, args.bag_size, device=dev)
        res["bag_sum_forward_ms"] = time_ms(lambda: torch.nn.functional.embedding_bag(
            ids, emb.weight, offsets, mode="sum"))
    grad_out = torch.randn(args.batch, D, device=dev, dtype=dtype)
    state = {}

    def setup():
        emb.weight.grad = None
        state["out"] = emb(ids)

    def backward():
        state["out"].backward(grad_out)
        emb.weight.grad = emb.weight.grad.coalesce()

    res["sparse_backward_ms"] = time_ms(backward, setup)
    opt = torch.optim.SparseAdam([emb.weight], lr=1e-3)
    setup()
    backward()
    opt.step()
    res["sparse_adam_step_ms"] = time_ms(opt.step)
    return res


def _fmt(value, width, digits=3):
    return f"{value:{width}.{digits}f}" if value else "-".rjust(width)


def main(argv=None):
    args = parse_args(argv)
    from sparsembed import _cuda

    if not _cuda.cupy_available():
        sys.exit("bench_gpu.py: no GPU to benchmark on (needs CuPy and a CUDA device; "
                 "pip install cupy-cuda12x). Nothing was measured.")
    import cupy as cp

    rng = np.random.default_rng(args.seed)
    V = int(args.num_embeddings)
    ids_host = make_ids(args, V, rng)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    results = {
        "machine": {"gpu": gpu_name, "cupy": cp.__version__, "python": platform.python_version()},
        "config": {"num_embeddings": V, "dim": args.dim, "batch": args.batch,
                   "dtype": args.dtype, "dist": args.dist, "bag_size": args.bag_size,
                   "repeat": args.repeat,
                   "warmup": args.warmup},
        "sparsembed": bench_sparsembed(args, cp, ids_host, cuda_timer(cp)),
    }
    if args.breakdown:
        results["breakdown"] = bench_breakdown(args, cp, ids_host, cuda_timer(cp))
    if not args.no_torch:
        try:
            results["torch"] = bench_torch(args, ids_host, cp)
        except ImportError:
            results["torch"] = None
    s, t = results["sparsembed"], results.get("torch")
    out_bytes = args.batch * args.dim * np.dtype(args.dtype).itemsize
    print(f"GPU: {gpu_name}  V={V:.0e} D={args.dim} B={args.batch} {args.dtype} ({args.dist} ids)")
    print(f"{'operation':<22}{'sparsembed ms':>15}{'torch ms':>12}{'torch/se':>10}")
    for key, label in [("forward_ms", "forward"), ("sparse_backward_ms", "sparse backward"),
                       ("sparse_adam_step_ms", "SparseAdam step"),
                       ("bag_sum_forward_ms", f"bag sum forward ({args.bag_size})")]:
        a = s.get(key)
        b = t.get(key) if t else None
        print(f"{label:<22}{_fmt(a, 15)}{_fmt(b, 12)}{_fmt(b / a if a and b else None, 10, 2)}")
    print(f"forward bandwidth: {2 * out_bytes / s['forward_ms'] / 1e6:.0f} GB/s "
          f"(device copy of the output: {2 * out_bytes / s['copy_bound_ms'] / 1e6:.0f} GB/s)")
    if s.get("sparse_adam_note"):
        print(s["sparse_adam_note"])
    for key, ms in results.get("breakdown", {}).items():
        print(f"  {key:<28}{ms:9.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
