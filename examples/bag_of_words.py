"""Bag of words: sentence vectors as the mean of pretrained word vectors.

Loads the GloVe sample bundled with sparsembed (76 words x 50 dimensions, the first
rows of glove.6B.50d), pools each sentence with an EmbeddingBag in mode "mean", and
prints the cosine similarities between the sentence vectors. Words missing from the
vocabulary map to a zero padding row, which the mean leaves out.

Run: python examples/bag_of_words.py
"""

import argparse
from importlib.resources import files

import numpy as np

import sparsembed as se

SENTENCES = [
    "he said that she was not there",
    "she said he was there",
    "people said that it was the first year",
    "the first year was new",
    "they have been with their people for two years",
    "we would have been there with them",
]


def load_glove(path):
    """Read GloVe's text format (``word v1 v2 ...`` per line, no header).

    Returns
    -------
    words : list of str
    vectors : ndarray of shape (n_words, dim), float32
    """
    words, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split(" ")
            if len(parts) < 2:
                continue
            words.append(parts[0])
            rows.append(np.asarray(parts[1:], dtype=np.float32))
    return words, np.stack(rows)


def encode(sentences, vocab, oov):
    """Flat word ids and bag offsets (one bag per sentence); unknown words -> ``oov``."""
    ids, offsets = [], []
    for sentence in sentences:
        offsets.append(len(ids))
        ids.extend(vocab.get(word, oov) for word in sentence.lower().split())
    return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def main(sentences=SENTENCES, verbose=True):
    words, vectors = load_glove(files("sparsembed.datasets") / "test_glove.txt")
    vocab = {word: i for i, word in enumerate(words)}
    oov = len(words)  # one extra all-zero row for unknown words, excluded from the mean
    table = np.vstack([vectors, np.zeros((1, vectors.shape[1]), dtype=np.float32)])
    bag = se.EmbeddingBag.from_pretrained(table, mode="mean", padding_idx=oov)

    ids, offsets = encode(sentences, vocab, oov)
    sent = bag(ids, offsets)  # (n_sentences, 50)
    norms = np.linalg.norm(sent, axis=1, keepdims=True)
    unit = sent / np.where(norms == 0, 1, norms)
    sim = unit @ unit.T

    if verbose:
        print(bag)
        print(f"{len(words)} words x {vectors.shape[1]} dims; "
              f"{int(np.sum(ids == oov))} of {ids.size} tokens out of vocabulary")
        for i, s in enumerate(sentences):
            print(f"[{i}] {s}")
        print("cosine similarity")
        print("     " + " ".join(f"[{j}]  " for j in range(len(sentences))))
        for i, row in enumerate(sim):
            print(f"[{i}] " + " ".join(f"{v:5.2f}" for v in row))
        for i in range(len(sentences)):
            others = np.argsort(-sim[i])
            best = next(j for j in others if j != i)
            print(f"closest to [{i}]: [{best}] ({sim[i, best]:.2f})")
    return sim


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="*", help="sentences to compare (default: built-in)")
    args = parser.parse_args()
    main(args.sentences or SENTENCES)
