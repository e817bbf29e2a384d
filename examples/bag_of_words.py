"""Bag of words: sentence vectors as the mean of pretrained word vectors.

Loads the GloVe sample bundled with sparsembed (the first 76 rows of glove.6B.50d,
seven of them relabelled with other words: see sparsembed/datasets/NOTICE_glove.txt),
pools each sentence with an EmbeddingBag in mode "mean", and
prints the cosine similarities between the sentence vectors. Words missing from the
vocabulary map to the zero padding row, which the mean leaves out.

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


def load_vocab_and_table():
    """The bundled GloVe sample as a Vocabulary and a table with a zero padding row.

    Unknown words are encoded as the padding id, so the mean leaves them out.
    """
    path = files("sparsembed.datasets") / "test_glove.txt"
    vocab, vectors = se.io.load_word2vec_format(path, no_header=True)
    return se.io.add_special_tokens(vocab, vectors, pad_token="<pad>")


def encode(sentences, vocab):
    """Flat word ids and bag offsets (one bag per sentence); unknown words -> padding."""
    batch = [[w if w in vocab else "<pad>" for w in s.lower().split()] for s in sentences]
    return vocab.encode(batch)


def main(sentences=SENTENCES, verbose=True):
    vocab, table = load_vocab_and_table()
    bag = se.EmbeddingBag.from_pretrained(table, mode="mean", padding_idx=vocab.pad_id)

    ids, offsets = encode(sentences, vocab)
    sent = bag(ids, offsets)  # (n_sentences, 50)
    norms = np.linalg.norm(sent, axis=1, keepdims=True)
    unit = sent / np.where(norms == 0, 1, norms)
    sim = unit @ unit.T

    if verbose:
        print(bag)
        print(f"{len(vocab) - 1} words x {table.shape[1]} dims; "
              f"{int(np.sum(ids == vocab.pad_id))} of {ids.size} tokens out of vocabulary")
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
