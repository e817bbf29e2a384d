"""Plain numpy references of the optimizer updates (one step, in place), and the
training loop (:func:`train`) the tests drive a layer and its optimizer with.

``rows`` is None for a dense gradient (every row updated) or the sorted distinct rows
of a row-sparse one, ``g`` the matching (n_rows, dim) gradient rows. Arithmetic runs in
the table's dtype with scalars rounded to it, in torch's order of operations.
"""

import math

import numpy as np


def _sel(rows, n):
    return np.arange(n) if rows is None else np.asarray(rows)


def sgd(w, state, rows, g, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
    """Lazy for row-sparse gradients: only the given rows' buffers move; the table's
    first momentum step sets ``buf = d`` (torch's rule)."""
    t = w.dtype.type
    r = _sel(rows, w.shape[0])
    d = g.astype(w.dtype, copy=True)
    if weight_decay:
        d = d + t(weight_decay) * w[r]
    if momentum:
        first = "momentum_buffer" not in state
        buf = state.setdefault("momentum_buffer", np.zeros_like(w))
        if first:
            buf[r] = d
        elif dampening:
            buf[r] = t(momentum) * buf[r] + t(1 - dampening) * d
        else:
            buf[r] = t(momentum) * buf[r] + d
        d = d + t(momentum) * buf[r] if nesterov else buf[r]
    w[r] = w[r] - t(lr) * d


def adagrad(w, state, rows, g, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            initial_accumulator_value=0.0, eps=1e-10):
    t = w.dtype.type
    r = _sel(rows, w.shape[0])
    s = state.setdefault("sum", np.full_like(w, initial_accumulator_value))
    state["step"] = state.get("step", 0) + 1
    clr = t(lr / (1 + (state["step"] - 1) * lr_decay))
    d = g.astype(w.dtype, copy=True)
    if weight_decay:
        d = d + t(weight_decay) * w[r]
    s[r] = s[r] + d * d
    w[r] = w[r] - clr * (d / (np.sqrt(s[r]) + t(eps)))


def sparse_adam(w, state, rows, g, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    t = w.dtype.type
    r = np.asarray(rows)
    m = state.setdefault("exp_avg", np.zeros_like(w))
    v = state.setdefault("exp_avg_sq", np.zeros_like(w))
    state["step"] = state.get("step", 0) + 1
    step = state["step"]
    b1, b2 = betas
    m_old, v_old = m[r].copy(), v[r].copy()
    um = (g - m_old) * t(1 - b1)
    uv = (g * g - v_old) * t(1 - b2)
    m[r] = m_old + um
    v[r] = v_old + uv
    step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    w[r] = w[r] + t(-step_size) * ((um + m_old) / (np.sqrt(uv + v_old) + t(eps)))


def rowwise_adagrad(w, state, rows, g, lr=1e-2, eps=1e-10, weight_decay=0.0):
    t = w.dtype.type
    r = _sel(rows, w.shape[0])
    s = state.setdefault("sum", np.zeros(w.shape[0], dtype=w.dtype))
    d = g.astype(w.dtype, copy=True)
    if weight_decay:
        d = d + t(weight_decay) * w[r]
    s[r] = s[r] + np.mean(d.astype(np.float64) ** 2, axis=1).astype(w.dtype)
    w[r] = w[r] - t(lr) * (d / (np.sqrt(s[r]) + t(eps))[:, None])


REFERENCE = {"SGD": sgd, "Adagrad": adagrad, "SparseAdam": sparse_adam,
             "RowWiseAdagrad": rowwise_adagrad}


def row_grad(idx, grad_output, num_embeddings, padding_idx=None, scale_grad_by_freq=False):
    """(rows, values) of the embedding gradient: sums over occurrences, padding dropped."""
    flat = np.asarray(idx).reshape(-1)
    g = np.asarray(grad_output)
    g = g.reshape(flat.size, g.shape[-1])
    keep = flat != (-1 if padding_idx is None else padding_idx)
    rows, inverse, counts = np.unique(flat[keep], return_inverse=True, return_counts=True)
    values = np.zeros((rows.size, g.shape[1]), dtype=g.dtype)
    np.add.at(values, inverse, g[keep])
    if scale_grad_by_freq:
        values /= counts[:, None].astype(g.dtype)
    return rows, values


def train(emb, opt, data, fused=False):
    """Steps of ``opt`` on ``emb`` over ``data``, (ids, grad_output) pairs: backward
    then ``opt.step()``, or the fused backward (``fused``)."""
    for idx, go in data:
        emb.zero_grad()
        emb(idx)
        if fused:
            assert emb.backward(go, optimizer=opt) is None
        else:
            emb.backward(go)
            opt.step()
