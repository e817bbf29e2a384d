import json

import numpy as np
import pytest

import sparsembed as se
from sparsembed.vocabulary import Vocabulary


def test_ids_specials_first_and_duplicates_keep_first_id():
    v = Vocabulary(["a", "b", "a", "<pad>", "c"], pad_token="<pad>", oov_token="<unk>")
    assert v.pad_id == 0 and v.oov_id == 1
    assert v.tokens == ["<pad>", "<unk>", "a", "b", "c"]
    assert len(v) == 5
    assert [v.id_of(t) for t in ("a", "b", "c")] == [2, 3, 4]
    assert v["zzz"] == 1 and v.token_of(3) == "b"
    assert "a" in v and "zzz" not in v
    only_oov = Vocabulary(["x"], oov_token="<unk>")
    assert only_oov.oov_id == 0 and only_oov.pad_id is None and only_oov.id_of("x") == 1


def test_encode_flat_and_batch():
    v = Vocabulary(["the", "cat", "sat"], pad_token="<pad>", oov_token="<unk>")
    ids = v.encode(["the", "dog", "sat"])
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [2, 1, 4])
    ids, offsets = v.encode([["the", "cat"], [], ["sat", "x", "the"]])
    np.testing.assert_array_equal(ids, [2, 3, 4, 1, 2])
    np.testing.assert_array_equal(offsets, [0, 2, 2])
    assert offsets.dtype == np.int64
    _, last = v.encode([["the"], ["cat", "sat"]], include_last_offset=True)
    np.testing.assert_array_equal(last, [0, 1, 3])
    assert v.encode([]).shape == (0,)
    assert v.decode(np.array([2, 3, 0])) == ["the", "cat", "<pad>"]
    # encoded batches feed an embedding directly
    emb = se.Embedding(len(v), 4, padding_idx=v.pad_id, random_state=0)
    out = emb(v.encode(["the", "cat"]))
    np.testing.assert_array_equal(out, emb.weight[[2, 3]])


def test_unknown_token_without_oov_is_key_error_naming_it():
    v = Vocabulary(["a", "b"])
    with pytest.raises(KeyError, match="'zebra'"):
        v.encode(["a", "zebra"])
    with pytest.raises(KeyError, match="'zebra'"):
        v.encode([["a"], ["zebra"]])
    with pytest.raises(KeyError, match="'q'"):
        v["q"]
    with pytest.raises(TypeError, match="str"):
        v.encode("ab")
    # bytes were taken as a bag of ints (b"ab" -> [97, 98]), out of vocabulary
    with pytest.raises(TypeError, match="got bytes b'a' at position 0; decode them"):
        Vocabulary(["a"], oov_token="<unk>").encode([b"a"])
    # ... anywhere in the batch, with or without an oov token (a non-str token is
    # never a miss to map to oov)
    for vocab in (v, Vocabulary(["a"], oov_token="<unk>")):
        with pytest.raises(TypeError, match="got bytes b'b' at position 1; decode them"):
            vocab.encode(["a", b"b"])
        with pytest.raises(TypeError, match="got NoneType None at position 2"):
            vocab.encode(["a", "a", None])
        with pytest.raises(TypeError, match="got list \\['b'\\] at position 1"):
            vocab.encode(["a", ["b"]])
        with pytest.raises(TypeError, match="got bytes b'b' at position 2 of the batch's tokens"):
            vocab.encode([["a"], ["a", b"b"]])
        with pytest.raises(TypeError, match="batch element 0 is int 1"):
            vocab.encode([1, 2])
    assert v.decode([]) == [] and v.decode(np.zeros(0, np.int64)) == []
    with pytest.raises(IndexError, match="id 7"):
        v.token_of(7)
    with pytest.raises(IndexError, match="id -1 at position 1"):
        v.decode([0, -1])
    with pytest.raises(TypeError):
        Vocabulary([1, 2])
    with pytest.raises(ValueError, match="differ"):
        Vocabulary([], pad_token="x", oov_token="x")


def test_from_corpus_order_min_count_max_size():
    corpus = [["b", "a", "c"], ["a", "d", "b"], ["e", "a", "c", "b", "d"], ["f"]]
    # counts: a 3, b 3, c 2, d 2, e 1, f 1; ties by first appearance: b before a, c before d
    v = Vocabulary.from_corpus(corpus)
    assert v.tokens == ["b", "a", "c", "d", "e", "f"]
    assert v.counts == {"b": 3, "a": 3, "c": 2, "d": 2, "e": 1, "f": 1}
    v = Vocabulary.from_corpus(iter(corpus), min_count=2, pad_token="<pad>", oov_token="<unk>")
    assert v.tokens == ["<pad>", "<unk>", "b", "a", "c", "d"]
    v = Vocabulary.from_corpus(corpus, max_size=4, oov_token="<unk>")
    assert v.tokens == ["<unk>", "b", "a", "c"] and len(v) == 4
    # special tokens appearing in the corpus are not duplicated
    v = Vocabulary.from_corpus([["<unk>", "x", "x"]], oov_token="<unk>")
    assert v.tokens == ["<unk>", "x"]
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.from_corpus(corpus, min_count=0)
    with pytest.raises(ValueError, match="max_size"):
        Vocabulary.from_corpus(corpus, max_size=1, pad_token="p", oov_token="o")
    with pytest.raises(TypeError, match="str"):
        Vocabulary.from_corpus(["abc", "def"])


def test_save_load_roundtrip_and_bad_files(tmp_path):
    v = Vocabulary(["héllo", "世界", "a b"], pad_token="<pad>", oov_token="<unk>")
    path = tmp_path / "vocab.json"
    v.save(path)
    w = Vocabulary.load(path)
    assert w == v and w.pad_id == 0 and w.oov_id == 1 and w.tokens == v.tokens
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temp file left
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe not json")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not a sparsembed vocabulary file"):
        Vocabulary.load(deep)
    with pytest.raises(ValueError, match="not a sparsembed vocabulary"):
        Vocabulary.load(bad)
    cfg = v.to_config()
    cfg["format_version"] = 99
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99"):
        Vocabulary.load(bad)
    cfg = v.to_config()
    cfg["tokens"] = ["a", "a"]
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="duplicates"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a sparsembed vocabulary"):
        Vocabulary.load(bad)


def test_encoded_batches_feed_embedding_bag():
    v = Vocabulary.from_corpus([["a", "b"], ["b", "c"]], pad_token="<pad>", oov_token="<unk>")
    bag = se.EmbeddingBag(len(v), 3, mode="sum", padding_idx=v.pad_id, random_state=0)
    docs = [["a", "b", "zz"], [], ["c", "<pad>"]]
    ids, offsets = v.encode(docs)
    out = bag(ids, offsets)
    w = bag.weight
    expected = np.stack([w[v["a"]] + w[v["b"]] + w[v.oov_id], np.zeros(3, w.dtype), w[v["c"]]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    ids, offsets = v.encode(docs, include_last_offset=True)
    last = se.EmbeddingBag(len(v), 3, mode="sum", padding_idx=v.pad_id, include_last_offset=True,
                           weight=bag.weight)
    np.testing.assert_allclose(last(ids, offsets), expected, rtol=1e-6)
