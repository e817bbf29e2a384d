"""Quickstart: a table, a batch lookup, a backward, and a few hand-written SGD steps.

The task: move the vectors of the ids in a batch towards fixed targets (mean squared
error). The gradient is row-sparse, so each step touches only the rows the batch used.

Run: python examples/quickstart.py
"""

import argparse

import numpy as np

import sparsembed as se


def main(steps=8, lr=2.0):
    rng = np.random.default_rng(0)
    emb = se.Embedding(10_000, 256, padding_idx=0, sparse=True, random_state=0)
    print(emb)

    # a batch of two sequences; id 0 is padding
    batch = np.array([[4, 18, 7, 0, 0], [9, 9, 512, 3, 2047]])
    targets = rng.standard_normal(batch.shape + (256,)).astype(np.float32)
    targets[batch == 0] = 0.0

    out = emb(batch)
    print("input", batch.shape, "-> output", out.shape, out.dtype)

    losses = []
    for step in range(steps):
        out = emb(batch)
        diff = out - targets
        loss = 0.5 * float(np.sum(diff**2)) / batch.size   # per token
        losses.append(loss)
        grad = emb.backward(diff / batch.size)
        # canonical csr: sorted distinct rows, each stored as a full row
        rows = np.flatnonzero(np.diff(grad.indptr))
        values = grad.data.reshape(rows.size, emb.embedding_dim)
        emb.weight[rows] -= lr * values
        emb.zero_grad()
        print(f"step {step}: loss {loss:.4f}   rows updated: {rows.tolist()}")
    print("gradient:", type(grad).__name__, grad.shape, "non-empty rows:", rows.size)
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    main(args.steps)
