"""The bag-of-words example runs at tiny size and pools what it says it pools."""

from importlib.resources import files

import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

def test_glove_sample_ships_with_the_package():
    data = files("sparsembed.datasets")
    assert (data / "test_glove.txt").is_file()
    assert "PDDL" in (data / "NOTICE_glove.txt").read_text()


def test_bag_of_words_main_runs(capsys, load_example):
    ex = load_example("bag_of_words")
    sentences = ["he said that", "she said", "zzz unknown words"]
    sim = ex.main(sentences)
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "closest to [0]" in out
    assert sim.shape == (3, 3)
    assert_allclose(sim, sim.T, rtol=1e-6)
    assert_allclose(np.diag(sim)[:2], 1.0, rtol=1e-5)
    assert sim[2, 2] == 0  # a sentence of unknown words only pools to zeros

    # sentence 0's vector is the plain mean of its words' GloVe rows
    vocab, table = ex.load_vocab_and_table()
    assert table.shape == (77, 50) and vocab.pad_id == 0 and vocab.id_of("the") == 1
    assert_array_equal(table[0], 0)
    glove = np.loadtxt(files("sparsembed.datasets") / "test_glove.txt", usecols=range(1, 51),
                       encoding="utf-8", comments=None, dtype=np.float32)
    assert_array_equal(table[1:], glove)
    mean0 = table[vocab.encode("he said that".split())].mean(axis=0)
    mean1 = table[vocab.encode("she said".split())].mean(axis=0)
    expected = mean0 @ mean1 / (np.linalg.norm(mean0) * np.linalg.norm(mean1))
    assert_allclose(sim[0, 1], expected, rtol=1e-5)
