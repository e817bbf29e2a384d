"""Configurations outside the headline workloads where sparsembed once trailed torch.

Session 31's sweep of 855 configurations against torch 2.13 CPU (widths 1-1,024,
float16/32/64 tables, 1-D/2-D/offset bags of 1-256, every bag mode, optimizers,
strided tables, batches of 64-262,144 ids) found these cells slower than torch,
or than numpy; each is timed here side by side with its peers, as ``run.py`` times
its workloads (same process, same thread count, round-robin, median). See
``README.md`` ("Beyond the headline workloads") for the figures before and after.

    python benchmarks/bench_cliffs.py [--threads 2] [--repeat 9] [--json out.json]
    python benchmarks/bench_cliffs.py --smoke      # tiny sizes, 1 repeat (the tests)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import aligned_empty, set_threads, time_round_robin, torch  # noqa: E402 (sets OMP_WAIT_POLICY)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import sparsembed as se  # noqa: E402
from sparsembed import functional as F  # noqa: E402


def _table(rng, V, D, dtype=np.float32, off=0):
    """A (V, D) table of N(0, 1) values starting ``off`` bytes past a line."""
    itemsize = np.dtype(dtype).itemsize
    raw = aligned_empty((V * D * itemsize + 64,), np.uint8)
    out = raw[off:off + V * D * itemsize].view(dtype).reshape(V, D)
    out[...] = rng.standard_normal((V, D))
    return out


def cells(rng, small):
    """{name: {candidate: callable}}; ``small``: tiny sizes for the smoke test."""
    V = 1_000 if small else 100_000
    n = 512 if small else 65_536        # ids of a bag batch
    B = 1_024 if small else 262_144     # ids of a lookup
    out = {}
    T = torch

    w = _table(rng, V, 64, np.float16)
    x = rng.integers(0, V, (n // 32, 32))
    layer = se.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum")
    tb = T.nn.EmbeddingBag.from_pretrained(T.from_numpy(w), mode="sum")
    xt = T.from_numpy(x)
    out["float16 bag layer, sum, D = 64, bags of 32"] = {
        "sparsembed": lambda x=x: layer(x), "torch": lambda xt=xt: _no_grad(tb, xt)}

    w = _table(rng, V, 300, np.float16)
    ids = rng.integers(0, V, n // 4)
    g = rng.standard_normal((ids.size, 300)).astype(np.float16)
    out["float16 sparse fwd + bwd, float16 grad_output, D = 300"] = _sparse_steps(
        w, w.copy(), ids, g)

    for D in (1, 3):
        w = _table(rng, V, D)
        ids = rng.integers(0, V, B)
        wt, it = T.from_numpy(w), T.from_numpy(ids)
        out[f"lookup, D = {D}"] = {
            "sparsembed": lambda w=w, ids=ids: F.embedding(ids, w),
            "torch": lambda wt=wt, it=it: _no_grad(T.nn.functional.embedding, it, wt),
            "numpy": lambda w=w, ids=ids: np.take(w, ids, axis=0)}

    w = _table(rng, V, 8, off=16)
    ids = rng.integers(0, V, B)
    wt, it = T.from_numpy(w), T.from_numpy(ids)
    out["lookup, D = 8, table 16 bytes off a line"] = {
        "sparsembed": lambda w=w, ids=ids: F.embedding(ids, w),
        "torch": lambda wt=wt, it=it: _no_grad(T.nn.functional.embedding, it, wt),
        "numpy": lambda w=w, ids=ids: np.take(w, ids, axis=0)}

    w = _table(rng, V, 8)
    x = rng.integers(0, V, (n // 256, 256))
    g = rng.standard_normal((x.shape[0], 8)).astype(np.float32)
    max_bag = se.EmbeddingBag.from_pretrained(w, freeze=False, mode="max")
    tw_max = T.from_numpy(w.copy()).requires_grad_()
    xt, gt = T.from_numpy(x), T.from_numpy(g)

    def ours_max(x=x, g=g):
        max_bag(x)
        return max_bag.backward(g)

    def torch_max(xt=xt, gt=gt):
        tw_max.grad = None
        T.nn.functional.embedding_bag(xt, tw_max, mode="max").backward(gt)
        return tw_max.grad
    out["max bag fwd + dense bwd, D = 8, bags of 256"] = {
        "sparsembed": ours_max, "torch": torch_max}

    for D in (4, 8, 12):
        w = _table(rng, V, D)
        x = rng.integers(0, V, (n // 32, 32))
        wt, xt = T.from_numpy(w), T.from_numpy(x)
        out[f"bag sum forward, D = {D}, bags of 32"] = {
            "sparsembed": lambda w=w, x=x: F.embedding_bag(x, w, mode="sum"),
            "torch": lambda wt=wt, xt=xt: _no_grad(T.nn.functional.embedding_bag, xt, wt,
                                                   mode="sum")}

    w = _table(rng, V, 8, np.float16)
    x = rng.integers(0, V, (n // 32, 32))
    wt, xt = T.from_numpy(w), T.from_numpy(x)
    out["float16 bag sum forward, D = 8, bags of 32"] = {
        "sparsembed": lambda w=w, x=x: F.embedding_bag(x, w, mode="sum"),
        "torch": lambda wt=wt, xt=xt: _no_grad(T.nn.functional.embedding_bag, xt, wt,
                                               mode="sum")}

    big = _table(rng, V, 32)
    w = big[:, :16]
    ids = rng.integers(0, V, B)
    wt, it = T.from_numpy(big)[:, :16], T.from_numpy(ids)
    out["lookup, column slice of a wider table, D = 16"] = {
        "sparsembed": lambda w=w, ids=ids: F.embedding(ids, w),
        "torch": lambda wt=wt, it=it: _no_grad(T.nn.functional.embedding, it, wt),
        "numpy": lambda w=w, ids=ids: np.take(w, ids, axis=0)}

    w = _table(rng, 10_000 if small else 10_000_000, 8)
    ids = rng.integers(0, w.shape[0], 64)
    g = rng.standard_normal((64, 8)).astype(np.float32)
    out["sparse fwd + bwd, 64 ids, V = 1e7, D = 8"] = _sparse_steps(w, w, ids, g)
    return out


def _sparse_steps(w, w_torch, ids, g):
    """A sparse layer's forward + backward on ``w`` and torch's on ``w_torch``
    (coalesced, as ours is)."""
    emb = se.Embedding.from_pretrained(w, freeze=False, sparse=True)
    te = torch.nn.Embedding.from_pretrained(torch.from_numpy(w_torch), freeze=False,
                                            sparse=True)
    it, gt = torch.from_numpy(ids), torch.from_numpy(g)

    def ours():
        emb.zero_grad()
        emb(ids)
        return emb.backward(g)

    def theirs():
        te.weight.grad = None
        te(it).backward(gt)
        return te.weight.grad.coalesce()
    return {"sparsembed": ours, "torch": theirs}


def _no_grad(f, *args, **kwargs):
    with torch.no_grad():
        return f(*args, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if torch is None:
        sys.exit("bench_cliffs needs torch 2.13 (the peer every figure is a ratio to)")
    set_threads(a.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, cases in cells(rng, a.smoke).items():
        ms = {k: v * 1e3 for k, v in time_round_robin(
            cases, 1 if a.smoke else a.repeat, settle=0 if a.smoke else 3).items()}
        ratios = {f"vs_{k}": ms["sparsembed"] / v for k, v in ms.items() if k != "sparsembed"}
        rows.append({"cell": name, "times_ms": ms, "ratios": ratios})
        print(f"{name:<58s} " + "  ".join(f"{k} {v:8.3f} ms" for k, v in ms.items()) + "  "
              + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                       "machine": platform.processor() or platform.machine(),
                       "n_threads": a.threads, "mode": "smoke" if a.smoke else "full",
                       "cells": rows}, f, indent=1)


if __name__ == "__main__":
    main()
