"""Plain numpy references for the core kernels: slow, obvious, written from the
definitions (torch's documented semantics), never from our kernels."""

import numpy as np

RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
ATOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


def tol(dtype):
    dtype = np.dtype(dtype)
    return {"rtol": RTOL[dtype], "atol": ATOL[dtype]}


def row_norm(row, p):
    a = np.abs(row.astype(np.float64))
    if p == np.inf:
        return a.max(initial=0.0)
    if p == -np.inf:
        return a.min(initial=np.inf)
    if p == 0:
        return float(np.count_nonzero(a))
    with np.errstate(divide="ignore"):
        return float(np.sum(a**p) ** (1.0 / p))


def renorm(weight, ids, max_norm, p):
    """torch.embedding_renorm_: each distinct referenced row, once."""
    out = weight.copy()
    for r in np.unique(np.asarray(ids).reshape(-1)):
        norm = row_norm(out[r], p)
        if norm > max_norm:
            out[r] = out[r] * np.asarray(max_norm / (norm + 1e-7), dtype=out.dtype)
    return out


def embedding(weight, ids):
    return weight[np.asarray(ids)]


def dense_backward(grad_output, ids, num_embeddings, padding_idx=None, scale_grad_by_freq=False):
    ids = np.asarray(ids).reshape(-1)
    g = np.asarray(grad_output)
    g = g.reshape(ids.size, g.shape[-1])
    out = np.zeros((num_embeddings, g.shape[1]), dtype=g.dtype)
    np.add.at(out, ids, g)
    if scale_grad_by_freq:
        counts = np.bincount(ids, minlength=num_embeddings).astype(g.dtype)
        out /= np.maximum(counts, 1)[:, None]
    if padding_idx is not None:
        out[padding_idx] = 0
    return out


def touched_rows(ids, padding_idx=None):
    rows = np.unique(np.asarray(ids).reshape(-1)).astype(np.int64)
    if padding_idx is not None:
        rows = rows[rows != padding_idx]
    return rows
