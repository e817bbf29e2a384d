"""Plain numpy references for EmbeddingBag (per-bag Python loops: slow, obvious)."""

import numpy as np


def bag_starts(n, offsets=None, include_last_offset=False, shape2d=None):
    """Bag bounds as a list of (lo, hi)."""
    if shape2d is not None:
        n_bags, bag_len = shape2d
        return [(b * bag_len, (b + 1) * bag_len) for b in range(n_bags)]
    offsets = [int(o) for o in offsets]
    if not include_last_offset:
        offsets = offsets + [n] if offsets else [0]
    return list(zip(offsets[:-1], offsets[1:]))


def _entries(flat, lo, hi, padding_idx):
    return [e for e in range(lo, hi) if padding_idx is None or flat[e] != padding_idx]


def embedding_bag(weight, flat, bounds, mode, padding_idx=None, psw=None):
    """(n_bags, dim) output in float64."""
    w = np.asarray(weight, dtype=np.float64)
    out = np.zeros((len(bounds), w.shape[1]))
    for b, (lo, hi) in enumerate(bounds):
        es = _entries(flat, lo, hi, padding_idx)
        if not es:
            continue
        rows = w[[flat[e] for e in es]]
        if mode == "max":
            out[b] = rows.max(axis=0)
            continue
        if psw is not None:
            rows = rows * np.asarray([psw[e] for e in es], dtype=np.float64)[:, None]
        out[b] = rows.sum(axis=0)
        if mode == "mean":
            out[b] /= len(es)
    return out


def embedding_bag_grad(grad, weight, flat, bounds, mode, padding_idx=None, psw=None,
                       scale_grad_by_freq=False):
    """(grad_weight (num_embeddings, dim), grad_psw (n,) or None) in float64.

    Max mode: each column goes to the first entry holding the bag's maximum.
    scale_grad_by_freq: each row divided by its own count among the bagged,
    non-padding entries (the correct rule, not torch CPU's).
    """
    w = np.asarray(weight, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    gw = np.zeros_like(w)
    count = np.zeros(w.shape[0])
    gp = None if psw is None else np.zeros(len(flat))
    for b, (lo, hi) in enumerate(bounds):
        es = _entries(flat, lo, hi, padding_idx)
        for e in es:
            count[flat[e]] += 1
        if not es:
            continue
        if mode == "max":
            rows = w[[flat[e] for e in es]]
            winner = rows.argmax(axis=0)  # first occurrence of the maximum
            for j in range(w.shape[1]):
                gw[flat[es[winner[j]]], j] += g[b, j]
            continue
        for e in es:
            s = 1.0 / len(es) if mode == "mean" else (1.0 if psw is None else float(psw[e]))
            gw[flat[e]] += s * g[b]
            if gp is not None:
                gp[e] = g[b] @ w[flat[e]]
    if scale_grad_by_freq:
        nz = count > 0
        gw[nz] /= count[nz][:, None]
    return gw, gp


def renorm(weight, ids, max_norm, norm_type=2.0):
    """torch's embedding_renorm_ on a float64 copy."""
    w = np.array(weight, dtype=np.float64)
    for r in np.unique(ids):
        norm = np.linalg.norm(w[r], ord=norm_type)
        if norm > max_norm:
            w[r] *= max_norm / (norm + 1e-7)
    return w
