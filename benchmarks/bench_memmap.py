"""Train an embedding table bigger than RAM, backed by numpy.memmap.

The table is a float32 file of ``--size-gb`` GB created sparse (``ftruncate``: all
zeros, no time and no disk blocks to create). Each step looks up ``--batch`` random
ids (uniform over the table: the worst case for locality), back-propagates a squared
loss against random targets as a row-sparse gradient, and applies a sparse update
(``se.optim`` SGD/Adagrad when this sparsembed has them, else an in-place row update
``weight[rows] -= lr * grad_rows``). Only the touched rows are read and written.

Reports the median and mean time per step and the memory the process used: peak
resident set (VmHWM: everything, including the table's file pages mapped so far, which
are page cache the kernel can write back and drop), and, after the last step, how much
of that is table pages (RssFile) and how much anonymous memory (RssAnon).

    python benchmarks/bench_memmap.py --size-gb 32 --steps 50 --json out.json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np


def proc_status():
    """VmRSS, VmHWM, RssAnon, RssFile in bytes (Linux); {} elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def peak_rss_bytes():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def make_optimizer(se, name, layer, lr):
    optim = getattr(se, "optim", None)
    if name == "manual" or optim is None:
        return None, "manual"
    cls = {"sgd": "SGD", "adagrad": "Adagrad"}[name]
    if not hasattr(optim, cls):
        return None, "manual"
    return getattr(optim, cls)([layer], lr=lr), cls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=32.0, help="table size on disk (1e9 bytes)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096, help="ids per step")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizer", choices=("sgd", "adagrad", "manual"), default="sgd",
                        help="se.optim class if available on this build, else manual")
    parser.add_argument("--fused", action="store_true",
                        help="fused backward + update (layer.backward(g, optimizer=opt)): no "
                             "gradient matrix is built (needs se.optim)")
    parser.add_argument("--dir", default=None, help="where to create the table file (default: cwd)")
    parser.add_argument("--keep", action="store_true", help="keep the table file afterwards")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    import sparsembed as se
    from sparsembed import _rowsparse
    from sparsembed.serialization import advise_random

    if args.threads:
        se.set_num_threads(args.threads)
    row_bytes = 4 * args.dim
    n_rows = int(args.size_gb * 1e9) // row_bytes
    nbytes = n_rows * row_bytes
    directory = args.dir or os.getcwd()
    fd, path = tempfile.mkstemp(prefix="bench_memmap_", suffix=".f32", dir=directory)
    baseline = proc_status()
    extra_files = []
    try:
        os.ftruncate(fd, nbytes)  # sparse: costs no time and no disk blocks
        os.close(fd)
        weight = np.memmap(path, dtype=np.float32, mode="r+", shape=(n_rows, args.dim))
        advise_random(weight)
        emb = se.Embedding(n_rows, args.dim, sparse=True, weight=weight)
        assert emb.weight is weight, "Embedding copied the memmap"
        opt, opt_name = make_optimizer(se, args.optimizer, emb, args.lr)
        if opt_name == "Adagrad":
            # the accumulator is as big as the table: back it by a sparse file too (the
            # optimizer would otherwise allocate it in RAM on its first step)
            sfd, state_path = tempfile.mkstemp(prefix="bench_memmap_state_", suffix=".f32", dir=directory)
            extra_files.append(state_path)
            os.ftruncate(sfd, nbytes)
            os.close(sfd)
            acc = np.memmap(state_path, dtype=np.float32, mode="r+", shape=(n_rows, args.dim))
            advise_random(acc)
            opt.state[0] = {"step": 0, "sum": acc}  # initial_accumulator_value = 0
        rng = np.random.default_rng(args.seed)
        if args.fused and opt is None:
            raise SystemExit("--fused needs se.optim (SGD/Adagrad)")
        times, anon_peak, rss_peak = [], 0, 0
        for step in range(args.warmup + args.steps):
            ids = rng.integers(0, n_rows, args.batch)
            target = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
            t0 = time.perf_counter()
            out = emb(ids)
            if opt is not None and args.fused:
                emb.backward(out - target, optimizer=opt)
            elif opt is not None:
                emb.backward(out - target)
                opt.step()
                opt.zero_grad()
            else:
                emb.backward(out - target)
                rows, values = _rowsparse.row_values(emb.grad)
                weight[rows] -= args.lr * values
                emb.zero_grad()
            dt = time.perf_counter() - t0
            st = proc_status()
            anon_peak = max(anon_peak, st.get("RssAnon", 0))
            rss_peak = max(rss_peak, st.get("VmRSS", 0))
            if step >= args.warmup:
                times.append(dt)
        t0 = time.perf_counter()
        weight.flush()
        if opt_name == "Adagrad":
            opt.state[0]["sum"].flush()
        flush_s = time.perf_counter() - t0
        final = proc_status()
        disk_used = sum(os.stat(p).st_blocks for p in [path] + extra_files) * 512
    finally:
        if not args.keep:
            for p in [path] + extra_files:
                os.unlink(p)
    result = {
        "benchmark": "memmap_training",
        "size_bytes": nbytes,
        "rows": n_rows,
        "dim": args.dim,
        "batch": args.batch,
        "steps": args.steps,
        "optimizer": opt_name + (" (fused)" if args.fused else ""),
        "threads": se.get_num_threads(),
        "step_s_median": statistics.median(times),
        "step_s_mean": statistics.fmean(times),
        "flush_s": flush_s,
        "baseline_rss_bytes": baseline.get("VmRSS", 0),
        "baseline_anon_bytes": baseline.get("RssAnon", 0),
        # VmHWM is reset by exec; ru_maxrss is not (it can report the parent's peak)
        "peak_rss_bytes": final.get("VmHWM") or peak_rss_bytes(),
        "rss_after_step_max_bytes": rss_peak,
        # sampled between steps: misses the transient arrays of a step (VmHWM does not)
        "anon_after_step_max_bytes": anon_peak,
        "final_rss_file_bytes": final.get("RssFile", 0),
        "disk_blocks_bytes_after": disk_used,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "sparsembed": se.__version__,
    }
    gib = 2 ** 30
    print(f"table {nbytes / 1e9:.2f} GB ({n_rows:,} x {args.dim} float32), batch {args.batch}, "
          f"{args.steps} steps, optimizer {result['optimizer']}, {result['threads']} threads")
    print(f"  time per step: median {result['step_s_median'] * 1e3:.2f} ms, "
          f"mean {result['step_s_mean'] * 1e3:.2f} ms; flush {flush_s * 1e3:.1f} ms")
    print(f"  peak RSS (VmHWM) {result['peak_rss_bytes'] / gib:.3f} GiB (baseline "
          f"{result['baseline_rss_bytes'] / gib:.3f}); after the last step: table pages mapped "
          f"{final.get('RssFile', 0) / gib:.3f} GiB, anonymous {final.get('RssAnon', 0) / gib:.3f} GiB; "
          f"table on disk after training {disk_used / gib:.3f} GiB allocated")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
