import os
from pathlib import Path

import numpy as np
import pytest

import sparsembed as se
from sparsembed import io as sio

GLOVE = Path(__file__).parent / "data" / "test_glove.txt"


def write_binary(path, words, vectors, newline=True, header=None):
    """A word2vec binary file written by hand (independent of save_word2vec_format)."""
    vectors = np.asarray(vectors, dtype="<f4")
    with open(path, "wb") as f:
        f.write((header or f"{len(words)} {vectors.shape[1]}\n").encode())
        for w, row in zip(words, vectors):
            f.write(w.encode("utf-8") + b" " + row.tobytes() + (b"\n" if newline else b""))


def test_glove_sample_values_and_from_pretrained():
    vocab, vectors = sio.load_word2vec_format(GLOVE, no_header=True)
    assert vectors.shape == (76, 50) and vectors.dtype == np.float32
    assert len(vocab) == 76 and vocab.token_of(0) == "the" and vocab.pad_id is None
    first = GLOVE.read_text(encoding="utf-8").split("\n")[0].split(" ")
    np.testing.assert_array_equal(vectors[0], np.array(first[1:], dtype=np.float64).astype(np.float32))
    assert "ö" in vocab and "हु" in vocab  # non-ASCII words are decoded
    emb = se.Embedding.from_pretrained(vectors)
    assert np.shares_memory(emb.weight, vectors) and not emb.requires_grad
    np.testing.assert_array_equal(emb(vocab.encode(["the", "ö"])), vectors[[0, 1]])
    v64, x64 = sio.load_word2vec_format(GLOVE, no_header=True, dtype=np.float64, limit=5)
    assert x64.dtype == np.float64 and x64.shape == (5, 50) and v64.tokens == vocab.tokens[:5]
    np.testing.assert_array_equal(x64[0], np.array(first[1:], dtype=np.float64))


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_roundtrip_is_exact(tmp_path, binary, dtype):
    rng = np.random.default_rng(0)
    words = ["the", "ünïcödé", "日本語", "emoji😀", "x"]
    vectors = (rng.standard_normal((5, 7)) * 10.0 ** rng.integers(-6, 6, (5, 7))).astype(dtype)
    path = tmp_path / "vec"
    sio.save_word2vec_format(path, words, vectors, binary=binary)
    vocab, back = sio.load_word2vec_format(path, binary=binary, dtype=dtype)
    assert vocab.tokens == words
    expected = vectors.astype(np.float32).astype(dtype) if binary else vectors
    np.testing.assert_array_equal(back, expected)
    assert sorted(os.listdir(tmp_path)) == ["vec"]
    if not binary:
        sio.save_word2vec_format(tmp_path / "glove", se.Vocabulary(words), vectors, header=False)
        vocab2, back2 = sio.load_word2vec_format(tmp_path / "glove", no_header=True, dtype=dtype)
        assert vocab2.tokens == words
        np.testing.assert_array_equal(back2, vectors)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.longdouble])
def test_text_of_other_dtypes_reads_back_as_their_float64_values(tmp_path, dtype):
    # integers and longdouble were written with float32's 9 digits (1234567891 came
    # back as 1234567890): they are written as float64, exactly
    values = np.array([[1234567891, 7, 0], [2**53 - 1 if dtype == np.int64 else 40000, 3, 1]])
    vectors = values.astype(dtype)
    if dtype == np.longdouble:
        vectors = vectors / np.longdouble(3)
    sio.save_word2vec_format(tmp_path / "v", ["a", "b"], vectors)
    _, back = sio.load_word2vec_format(tmp_path / "v", dtype=np.float64)
    np.testing.assert_array_equal(back, vectors.astype(np.float64))


@pytest.mark.parametrize("newline", [True, False])
def test_binary_with_and_without_trailing_newlines(tmp_path, newline):
    rng = np.random.default_rng(1)
    words = ["a", "bé", "ç", "dd", "a", "e"]  # "a" repeats: the first vector is kept
    vectors = rng.standard_normal((6, 4)).astype(np.float32)
    path = tmp_path / "w.bin"
    write_binary(path, words, vectors, newline=newline)
    vocab, back = sio.load_word2vec_format(path, binary=True)
    assert vocab.tokens == ["a", "bé", "ç", "dd", "e"]
    np.testing.assert_array_equal(back, vectors[[0, 1, 2, 3, 5]])
    vocab, back = sio.load_word2vec_format(path, binary=True, limit=2)
    assert vocab.tokens == ["a", "bé"]
    np.testing.assert_array_equal(back, vectors[:2])


def test_fasttext_vec_with_header_trailing_spaces_crlf_duplicates_and_limit(tmp_path):
    path = tmp_path / "wiki.vec"
    path.write_bytes(
        "4 3\r\n"
        "</s> 0.1 0.2 0.3 \r\n"
        "größe -1 2.5e-3 4 \r\n"
        "\r\n"
        "</s> 9 9 9 \r\n"
        "猫 1e2 -0 7 \r\n".encode("utf-8")
    )
    vocab, vectors = sio.load_word2vec_format(path)
    assert vocab.tokens == ["</s>", "größe", "猫"]
    np.testing.assert_array_equal(vectors, np.array([[0.1, 0.2, 0.3], [-1, 2.5e-3, 4], [100, 0, 7]],
                                                    dtype=np.float32))
    vocab, vectors = sio.load_word2vec_format(path, limit=2)
    assert vocab.tokens == ["</s>", "größe"] and vectors.shape == (2, 3)
    vocab, vectors = sio.load_word2vec_format(path, limit=0)
    assert len(vocab) == 0 and vectors.shape == (0, 3)


def test_glove_limit_and_empty_file(tmp_path):
    vocab, vectors = sio.load_word2vec_format(GLOVE, no_header=True, limit=3)
    assert len(vocab) == 3 and vectors.shape == (3, 50)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    vocab, vectors = sio.load_word2vec_format(empty, no_header=True)
    assert len(vocab) == 0 and vectors.shape[0] == 0
    with pytest.raises(ValueError, match="empty file"):
        sio.load_word2vec_format(empty)
    with pytest.raises(ValueError, match="empty file"):
        sio.load_word2vec_format(empty, binary=True)


@pytest.mark.parametrize("content, match", [
    ("2 3\na 1 2 3\nb 1 2\n", r"line 3: expected a word and 3 numbers, got 2"),
    ("2 3\na 1 2 3\nb 1 2 3 4\n", r"line 3: .*got 4 .*spaces"),
    ("2 3\na 1 2 3\nb 1 zz 3\n", r"line 3: bad number"),
    ("3 3\na 1 2 3\nb 1 2 3\n", r"announces 3 vectors but the file ends after 2"),
    ("1 3\na 1 2 3\nb 1 2 3\n", r"line 3: the header announces 1 vectors, but the file has more"),
    ("a 1 2 3\nb 1 2 3\n", r"line 1: expected a header .*no_header=True"),
    ("2 x\na 1 2 3\n", r"line 1: expected a header '<count> <dim>' of two integers"),
    ("2 0\n", r"bad header"),
    ("0 3\na 1 2 3\n", r"line 2: the header announces 0 vectors, but the file has more"),
    ("2 3\n 1 2 3\nb 1 2 3\n", r"line 2: empty word"),
])
def test_malformed_text_names_the_line(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        sio.load_word2vec_format(path)


def test_malformed_glove_and_bad_float_far_into_the_file(tmp_path):
    lines = [f"w{i} {i}.5 {i}.25" for i in range(20000)]
    lines[15001] = "w15001 1.0 1,5"
    lines[17000] = "w17000 1_000 2"  # Python's float() would take it, the format does not
    path = tmp_path / "g.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 15002: bad number '1,5'"):
        sio.load_word2vec_format(path, no_header=True)
    lines[15001] = "w15001 1.0 1.5"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 17001: bad number '1_000'"):
        sio.load_word2vec_format(path, no_header=True)
    path.write_text("a 1 2\nb 1  2\n")
    with pytest.raises(ValueError, match="line 2: expected a word and 2 numbers, got 3"):
        sio.load_word2vec_format(path, no_header=True)
    path.write_text("a 1 2 3\nb 1  2\n")
    with pytest.raises(ValueError, match="line 2: bad number ''"):
        sio.load_word2vec_format(path, no_header=True)
    path.write_text("a 1 2\nb 1 2 3\n")
    with pytest.raises(ValueError, match="line 2: expected a word and 2 numbers, got 3"):
        sio.load_word2vec_format(path, no_header=True)


def test_invalid_utf8_strict_and_replace(tmp_path):
    path = tmp_path / "u.txt"
    path.write_bytes(b"2 2\nok 1 2\nbad\xff 3 4\n")
    with pytest.raises(ValueError, match="line 3: invalid UTF-8"):
        sio.load_word2vec_format(path)
    vocab, vectors = sio.load_word2vec_format(path, unicode_errors="replace")
    assert vocab.tokens == ["ok", "bad\ufffd"]
    np.testing.assert_array_equal(vectors, [[1, 2], [3, 4]])
    binpath = tmp_path / "u.bin"
    write_binary(binpath, ["ok", "x"], np.ones((2, 2)))
    data = bytearray(binpath.read_bytes())
    pos = data.index(b"x ")
    data[pos] = 0xFF
    binpath.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"byte offset {pos}: invalid UTF-8"):
        sio.load_word2vec_format(binpath, binary=True)
    vocab, _ = sio.load_word2vec_format(binpath, binary=True, unicode_errors="ignore")
    assert vocab.tokens == ["ok", ""]


@pytest.mark.parametrize("limit", [None, 1])
def test_binary_header_promising_gigabytes_allocates_nothing_large(tmp_path, limit):
    # found by a fuzz: 17 bytes announcing 2 vectors of 10**9 floats made the loader
    # allocate 8 GB before reading the first record (killed for memory where the
    # allocation is touched, e.g. under MALLOC_PERTURB_)
    import tracemalloc

    path = tmp_path / "w.bin"
    path.write_bytes(b"2 1000000000\na 1\n")
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"byte offset 15: truncated file: vector 0 \('a'\) "
                                             r"needs 4000000000 bytes, 2 left"):
            sio.load_word2vec_format(path, binary=True, limit=limit)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("binary", [False, True])
def test_header_dim_past_any_array_is_named(tmp_path, binary):
    # not even an empty table of such rows has a numpy shape: numpy's "array is too
    # big" named neither the file nor the header
    path = tmp_path / "w.vec"
    path.write_bytes(b"2 2305843009213693952\na 1 2\n")
    with pytest.raises(ValueError, match=r"w.vec.*bad header '2 2305843009213693952': "
                                         r"dim 2305843009213693952 is past"):
        sio.load_word2vec_format(path, binary=binary)


def test_truncated_and_mismatched_binary_names_the_byte_offset(tmp_path):
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((3, 5)).astype(np.float32)
    path = tmp_path / "w.bin"
    write_binary(path, ["aa", "bb", "cc"], vectors)
    full = path.read_bytes()
    header_len = len(b"3 5\n")
    rec = 3 + 20 + 1  # "aa " + 5 floats + newline
    # cut inside the last vector
    path.write_bytes(full[: header_len + 2 * rec + 3 + 7])
    with pytest.raises(ValueError, match=rf"byte offset {header_len + 2 * rec + 3}: truncated .*needs 20 bytes, 7 left"):
        sio.load_word2vec_format(path, binary=True)
    # cut before the last word
    path.write_bytes(full[: header_len + 2 * rec])
    with pytest.raises(ValueError, match=rf"byte offset {header_len + 2 * rec}: truncated .*found 2"):
        sio.load_word2vec_format(path, binary=True)
    # the header announces fewer vectors than the file holds
    write_binary(path, ["aa", "bb", "cc"], vectors, header="2 5\n")
    with pytest.raises(ValueError, match=rf"byte offset {header_len + 2 * rec}: the header announces 2"):
        sio.load_word2vec_format(path, binary=True)
    # but limit=2 reads only what it needs
    vocab, back = sio.load_word2vec_format(path, binary=True, limit=2)
    np.testing.assert_array_equal(back, vectors[:2])
    # a wrong dim in the header makes the records misaligned
    write_binary(path, ["aa", "bb", "cc"], vectors, header="3 4\n")
    with pytest.raises(ValueError, match="byte offset"):
        sio.load_word2vec_format(path, binary=True)
    path.write_bytes(b"3 5")
    with pytest.raises(ValueError, match="byte offset 0: no header"):
        sio.load_word2vec_format(path, binary=True)
    # a text file read as binary
    path.write_text("2 3\na 1 2 3\nb 4 5 6\n")
    with pytest.raises(ValueError, match="byte offset"):
        sio.load_word2vec_format(path, binary=True)


def test_save_rejects_bad_input_and_keeps_old_file(tmp_path):
    path = tmp_path / "v.txt"
    sio.save_word2vec_format(path, ["a"], np.ones((1, 2)))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="whitespace"):
        sio.save_word2vec_format(path, ["a b"], np.ones((1, 2)))
    with pytest.raises(ValueError, match="2 words but vectors has 1 rows"):
        sio.save_word2vec_format(path, ["a", "b"], np.ones((1, 2)))
    with pytest.raises(ValueError, match="repeated"):
        sio.save_word2vec_format(path, ["a", "a"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="header"):
        sio.save_word2vec_format(path, ["a"], np.ones((1, 2)), binary=True, header=False)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="limit"):
        sio.load_word2vec_format(path, limit=-1)
    with pytest.raises(ValueError, match="no_header"):
        sio.load_word2vec_format(path, binary=True, no_header=True)
    # a bare string was taken as its characters: the words "a", "b"
    with pytest.raises(TypeError, match="got a single str"):
        sio.save_word2vec_format(path, "ab", np.ones((2, 2)))
    assert path.read_bytes() == before
    # an unknown handler was only refused once a bad byte needed it
    with pytest.raises(ValueError, match="unicode_errors must be an error handler.*'nope'"):
        sio.load_word2vec_format(path, unicode_errors="nope")


@pytest.mark.parametrize("no_header", [False, True])
def test_utf8_byte_order_mark_is_skipped(tmp_path, no_header):
    # editors on Windows start UTF-8 files with one: it broke the header, or became
    # part of a GloVe file's first word
    body = "é 1.5 2\nb 3 4\n"
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + ((body if no_header else "2 2\n" + body).encode()))
    vocab, vectors = sio.load_word2vec_format(path, no_header=no_header)
    assert list(vocab.tokens) == ["é", "b"]
    np.testing.assert_array_equal(vectors, [[1.5, 2], [3, 4]])


def test_add_special_tokens_lines_up_with_from_pretrained():
    vocab, vectors = sio.load_word2vec_format(GLOVE, no_header=True)
    v2, x2 = sio.add_special_tokens(vocab, vectors, pad_token="<pad>", oov_token="<unk>")
    assert v2.pad_id == 0 and v2.oov_id == 1 and len(v2) == 78 and x2.shape == (78, 50)
    assert x2.dtype == np.float32
    np.testing.assert_array_equal(x2[0], 0)
    np.testing.assert_allclose(x2[1], vectors.mean(axis=0, dtype=np.float64), rtol=1e-6)
    np.testing.assert_array_equal(x2[2:], vectors)
    emb = se.Embedding.from_pretrained(x2, padding_idx=v2.pad_id)
    out = emb(v2.encode(["the", "no-such-word", "<pad>"]))
    np.testing.assert_array_equal(out, np.stack([vectors[0], x2[1], np.zeros(50, np.float32)]))
    v3, x3 = sio.add_special_tokens(vocab, vectors, oov_token="<unk>", oov_vector="zeros")
    assert v3.pad_id is None and v3.oov_id == 0 and not x3[0].any()
    v4, x4 = sio.add_special_tokens(vocab, vectors, oov_token="<unk>", oov_vector=np.full(50, 2.0))
    np.testing.assert_array_equal(x4[0], 2.0)
    with pytest.raises(ValueError, match="already a word"):
        sio.add_special_tokens(vocab, vectors, pad_token="the")
    with pytest.raises(ValueError, match="shape"):
        sio.add_special_tokens(vocab, vectors[:3], pad_token="<pad>")
    with pytest.raises(ValueError, match="already has special tokens"):
        sio.add_special_tokens(v2, x2, pad_token="<p>")
    with pytest.raises(ValueError, match="oov_vector"):
        sio.add_special_tokens(vocab, vectors, oov_token="<unk>", oov_vector="random")
