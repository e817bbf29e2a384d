"""Pretrained vectors: word2vec (text and binary), GloVe and fastText ``.vec`` files.

>>> import sparsembed as se
>>> from importlib.resources import files
>>> path = files("sparsembed.datasets") / "test_glove.txt"  # or your glove.6B.50d.txt
>>> vocab, vectors = se.io.load_word2vec_format(path, no_header=True)
>>> vocab, vectors = se.io.add_special_tokens(vocab, vectors, pad_token="<pad>",
...                                           oov_token="<unk>")
>>> emb = se.Embedding.from_pretrained(vectors, freeze=False, sparse=True,
...                                    padding_idx=vocab.pad_id)
>>> emb(vocab.encode(["the", "cat", "qwxzzy"])).shape
(3, 50)

Formats
-------
text (word2vec ``-binary 0``, fastText ``.vec``)
    A header line ``"<count> <dim>"``, then one line per word: the word, then ``dim``
    numbers, separated by single spaces (a trailing space, as fastText writes, and
    ``\\r\\n`` line ends are fine). Lines that are empty or hold only whitespace are
    skipped. Words may not contain spaces.
GloVe
    The text format without the header (``no_header=True``); ``dim`` is taken from
    the first line and the count from the file.
binary (word2vec ``-binary 1``)
    The text header line, then per word: its UTF-8 bytes, one space, ``dim``
    little-endian float32 values, and optionally a newline (the original C tool writes
    one; some writers do not).
"""

import codecs
import mmap
import os
import sys

import numpy as np

from sparsembed import _aligned
from sparsembed.vocabulary import Vocabulary

__all__ = ["load_word2vec_format", "save_word2vec_format", "add_special_tokens"]

_CHUNK_LINES = 8192
_TRIM = "\r\n\t "


def _parse_header(line, where):
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{where}: expected a header '<count> <dim>', got {line[:80]!r} "
                         "(a GloVe file has no header: pass no_header=True)")
    try:
        count, dim = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"{where}: expected a header '<count> <dim>' of two integers, got "
                         f"{line[:80]!r} (a GloVe file has no header: pass no_header=True)") from None
    if count < 0 or dim < 1:
        raise ValueError(f"{where}: bad header {line.strip()!r}: need count >= 0 and dim >= 1")
    if dim * 8 > sys.maxsize:  # not even an empty table of such rows has a numpy shape
        raise ValueError(f"{where}: bad header {line.strip()!r}: dim {dim} is past what "
                         "an array can hold")
    return count, dim


def _check_limit(limit):
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    return int(limit)


class _Collector:
    """Collects (word, row) pairs, keeping the first vector of a repeated word."""

    def __init__(self, dim, dtype):
        self.dim = dim
        self.dtype = dtype
        self.words = []
        self.index = {}
        self.blocks = []
        self.n_rows = 0

    def add_block(self, words, values):
        """``values``: (len(words), dim); duplicates (of earlier words or in-block) dropped."""
        keep = []
        index = self.index
        for i, w in enumerate(words):
            if w in index:
                continue
            index[w] = len(self.words)
            self.words.append(w)
            keep.append(i)
        if len(keep) != len(words):
            values = values[np.asarray(keep, dtype=np.intp)]
        if len(keep):
            self.blocks.append(values)

    def result(self):
        vectors = _aligned.empty((sum(len(b) for b in self.blocks), self.dim), self.dtype)
        if self.blocks:
            np.concatenate(self.blocks, out=vectors, casting="unsafe")
        return Vocabulary(self.words), vectors


def _is_number(token):
    try:
        return np.fromstring(token, dtype=np.float64, sep=" ").size == 1 and token.strip() == token != ""
    except ValueError:
        return False


def _parse_block(lines, dim, dtype, path):
    """Parse ``[(lineno, word, numbers_text)]`` into an (n, dim) array in one C call
    (``numpy.fromstring``); on failure, find and name the bad line."""
    try:
        values = np.fromstring(" ".join([rest for _, _, rest in lines]), dtype=np.float64, sep=" ")
    except ValueError:
        values = None
    if values is None or values.size != len(lines) * dim:
        for lineno, _, rest in lines:
            for token in rest.split(" "):
                if not _is_number(token):
                    raise ValueError(f"{path}: line {lineno}: bad number {token[:40]!r}")
        raise ValueError(f"{path}: lines {lines[0][0]}-{lines[-1][0]}: could not parse the numbers")
    with np.errstate(over="ignore"):
        return values.reshape(len(lines), dim).astype(dtype)


def _load_text(path, no_header, limit, dtype, unicode_errors):
    table = None
    count = dim = None
    pending = []
    n_vectors = 0
    with open(path, "rb") as f:
        lineno = 0
        for raw in f:
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark (editors on Windows write one)
            try:
                line = raw.decode("utf-8", errors=unicode_errors)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: invalid UTF-8 ({exc.reason} at byte "
                                 f"{exc.start} of the line); pass unicode_errors='replace' or "
                                 "'ignore' to accept it") from None
            if lineno == 1 and not no_header:
                count, dim = _parse_header(line, f"{path}: line 1")
                table = _Collector(dim, dtype)
                if limit == 0:
                    break
                continue
            line = line.rstrip(_TRIM)
            if not line.strip():
                continue
            word, _, rest = line.partition(" ")
            n_fields = rest.count(" ") + 1 if rest else 0
            if dim is None:  # GloVe: the first line fixes the dimension
                dim = n_fields
                if dim < 1:
                    raise ValueError(f"{path}: line {lineno}: a word with no numbers: {line[:80]!r}")
                table = _Collector(dim, dtype)
            if limit is not None and n_vectors >= limit:
                break
            if n_fields != dim:
                raise ValueError(f"{path}: line {lineno}: expected a word and {dim} numbers, got "
                                 f"{n_fields} fields after {word[:40]!r}"
                                 + (" (words cannot contain spaces)" if n_fields > dim else ""))
            if not word:
                raise ValueError(f"{path}: line {lineno}: empty word (line starts with a space)")
            if count is not None and n_vectors >= count:
                raise ValueError(f"{path}: line {lineno}: the header announces {count} vectors, "
                                 "but the file has more")
            pending.append((lineno, word, rest))
            n_vectors += 1
            if len(pending) >= _CHUNK_LINES:
                table.add_block([w for _, w, _ in pending], _parse_block(pending, dim, dtype, path))
                pending = []
            if limit is not None and count is not None and n_vectors >= limit:
                break  # with a header nothing more is needed; GloVe stops at the next line
    if pending:
        table.add_block([w for _, w, _ in pending], _parse_block(pending, dim, dtype, path))
    if table is None:
        if no_header:
            return Vocabulary([]), np.zeros((0, 0), dtype=dtype)
        raise ValueError(f"{path}: empty file (expected a header '<count> <dim>')")
    target = count if limit is None or count is None else min(count, limit)
    if target is not None and n_vectors < target:
        raise ValueError(f"{path}: the header announces {count} vectors but the file ends after "
                         f"{n_vectors} (line {lineno}); truncated?")
    return table.result()


def _load_binary(path, limit, dtype, unicode_errors):
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: empty file (expected a header '<count> <dim>')")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        end = mm.find(b"\n")
        if end < 0:
            raise ValueError(f"{path}: byte offset 0: no header line '<count> <dim>'")
        try:
            header = mm[:end].decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: byte offset 0: the header is not ASCII '<count> <dim>'") from None
        count, dim = _parse_header(header, f"{path}: byte offset 0")
        target = count if limit is None else min(count, limit)
        # each record is at least a one-byte word, a space and its floats: the table
        # is allocated for no more records than the file can hold, not from the
        # header alone (a few bytes could otherwise ask for gigabytes); a file that
        # holds fewer than announced fails below, naming the record it ends in
        fits = (size - end - 1) // (4 * dim + 2)
        vectors = _aligned.empty((min(target, fits), dim), dtype)
        words = []
        index = {}
        row_bytes = 4 * dim
        pos = end + 1
        for i in range(target):
            while pos < size and mm[pos] in b"\n\r":  # the newline ending the previous record
                pos += 1
            sp = mm.find(b" ", pos)
            if sp < 0:
                raise ValueError(f"{path}: byte offset {pos}: truncated file: the header announces "
                                 f"{count} vectors, found {i} (no word for vector {i})")
            raw = mm[pos:sp]
            if b"\n" in raw:
                raise ValueError(f"{path}: byte offset {pos}: malformed record {i}: a newline inside "
                                 f"the word {raw[:40]!r} (is this a text file? pass binary=False)")
            if not raw:
                raise ValueError(f"{path}: byte offset {pos}: malformed record {i}: empty word")
            try:
                word = raw.decode("utf-8", errors=unicode_errors)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: byte offset {pos + exc.start}: invalid UTF-8 in word {i} "
                                 f"({exc.reason}); pass unicode_errors='replace' or 'ignore'") from None
            start = sp + 1
            if start + row_bytes > size:
                raise ValueError(f"{path}: byte offset {start}: truncated file: vector {i} "
                                 f"({word[:40]!r}) needs {row_bytes} bytes, {size - start} left")
            if word not in index:
                index[word] = len(words)
                vectors[len(words)] = np.frombuffer(mm, dtype="<f4", count=dim, offset=start)
                words.append(word)
            pos = start + row_bytes
        if limit is None or limit > count:
            while pos < size and mm[pos] in b"\n\r":
                pos += 1
            rest = mm[pos:pos + 64]
            if rest.strip(b"\n\r\t "):
                raise ValueError(f"{path}: byte offset {pos}: the header announces {count} vectors, "
                                 "but more data follows (header count mismatch, or a wrong dim)")
    vectors = vectors[: len(words)]
    if len(words) < target:
        vectors = np.ascontiguousarray(vectors)
    return Vocabulary(words), vectors


def load_word2vec_format(path, *, binary=False, no_header=False, limit=None, dtype=np.float32,
                         unicode_errors="strict"):
    """Read word vectors in word2vec text/binary, GloVe or fastText ``.vec`` format.

    Parameters
    ----------
    path : str or os.PathLike
    binary : bool, default False
        The word2vec binary format (float32 rows).
    no_header : bool, default False
        No ``"<count> <dim>"`` first line (GloVe). Text only.
    limit : int, optional
        Read only the first ``limit`` vectors of the file.
    dtype : numpy dtype, default float32
        dtype of the returned vectors (text is parsed in float64, then cast).
    unicode_errors : str, default "strict"
        How to decode words that are not valid UTF-8 (``bytes.decode``'s ``errors``):
        "strict" raises ValueError, "replace" or "ignore" accept them (the word2vec C
        tool can cut multi-byte characters).

    Returns
    -------
    vocab : Vocabulary
        The words, in file order; a word that repeats keeps its first vector (so
        ``len(vocab)`` can be less than the vector count). No pad or oov token.
    vectors : ndarray of shape (len(vocab), dim), ``dtype``
        Row ``i`` is the vector of ``vocab.token_of(i)``; pass it to
        ``Embedding.from_pretrained``.

    Raises
    ------
    ValueError
        A bad header, a line with the wrong number of fields, a bad number, invalid
        UTF-8 (with ``unicode_errors="strict"``), a truncated binary file, or fewer or
        more vectors than the header announces. The message names the line (text) or
        byte offset (binary). Nothing partial is ever returned.
    """
    limit = _check_limit(limit)
    try:
        codecs.lookup_error(unicode_errors)
    except (LookupError, TypeError):
        raise ValueError(f"unicode_errors must be an error handler of bytes.decode "
                         f"('strict', 'replace', 'ignore', ...), got {unicode_errors!r}") from None
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if binary and no_header:
        raise ValueError("the word2vec binary format always has a header; no_header=True is for text")
    path = os.fspath(path)
    if binary:
        return _load_binary(path, limit, dtype, unicode_errors)
    return _load_text(path, no_header, limit, dtype, unicode_errors)


def _check_word(word, i):
    if not isinstance(word, str):
        raise TypeError(f"word {i} must be a str, got {type(word).__name__}")
    if not word or any(c in word for c in " \n\r\t"):
        raise ValueError(f"word {i} ({word!r}) is empty or contains whitespace; the "
                         "word2vec formats cannot store it")


def save_word2vec_format(path, vocab, vectors, *, binary=False, header=True):
    """Write word vectors that :func:`load_word2vec_format` reads back exactly.

    Parameters
    ----------
    path : str or os.PathLike
        Written atomically (temp file, fsync, rename).
    vocab : Vocabulary or sequence of str
        One word per row of ``vectors``, in id order (a Vocabulary's pad and oov
        tokens are written as ordinary words). Words must be distinct, non-empty and
        free of whitespace.
    vectors : array of shape (len(vocab), dim)
    binary : bool, default False
        word2vec binary (float32, a newline after every vector) instead of text.
    header : bool, default True
        Write the ``"<count> <dim>"`` line; False gives GloVe's layout (text only).

    Notes
    -----
    Text values are written with enough digits to round-trip exactly: 9 significant
    digits for float32 (and float16), 17 for float64 and every other dtype (integer
    and longdouble vectors are written as float64: exact where float64 holds the
    value, e.g. integers up to 2**53; read them back with ``dtype=np.float64``).
    """
    from sparsembed.serialization import _atomic_write

    if isinstance(vocab, (str, bytes)):  # list("ab") would be the words "a", "b"
        raise TypeError("vocab must be a Vocabulary or a sequence of words, got a single "
                        f"{type(vocab).__name__}")
    words = vocab.tokens if isinstance(vocab, Vocabulary) else list(vocab)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.dtype.kind not in "fiu":
        raise ValueError(f"vectors must be a 2-D real array, got shape {vectors.shape} dtype {vectors.dtype}")
    if len(words) != vectors.shape[0]:
        raise ValueError(f"vocab has {len(words)} words but vectors has {vectors.shape[0]} rows")
    if vectors.shape[1] < 1:
        raise ValueError("vectors must have at least one column")
    if binary and not header:
        raise ValueError("the word2vec binary format always has a header (header=False is for text)")
    for i, w in enumerate(words):
        _check_word(w, i)
    if len(set(words)) != len(words):
        raise ValueError("vocab has repeated words")
    n, dim = vectors.shape

    def write(f):
        if header:
            f.write(f"{n} {dim}\n".encode("ascii"))
        if binary:
            rows = np.ascontiguousarray(vectors, dtype="<f4")
            for w, row in zip(words, rows):
                f.write(w.encode("utf-8") + b" " + row.tobytes() + b"\n")
            return
        digits = 9 if vectors.dtype.kind == "f" and vectors.dtype.itemsize <= 4 else 17
        fmt = " ".join([f"%.{digits}g"] * dim)
        values = vectors.astype(np.float64, copy=False)
        for start in range(0, n, _CHUNK_LINES):
            block = values[start:start + _CHUNK_LINES].tolist()
            f.write("".join(f"{w} {fmt % tuple(row)}\n"
                            for w, row in zip(words[start:start + _CHUNK_LINES], block)).encode("utf-8"))

    _atomic_write(path, write)


def add_special_tokens(vocab, vectors, *, pad_token=None, oov_token=None, oov_vector="mean"):
    """Prepend padding and out-of-vocabulary rows to pretrained vectors.

    The usual next step after :func:`load_word2vec_format`: the returned vocabulary has
    ``pad_token`` at id 0 and ``oov_token`` next (see :class:`Vocabulary`), and the
    returned table has matching rows, so that
    ``Embedding.from_pretrained(vectors, padding_idx=vocab.pad_id)`` and
    ``vocab.encode(tokens)`` line up.

    Parameters
    ----------
    vocab : Vocabulary without special tokens
    vectors : ndarray of shape (len(vocab), dim)
    pad_token, oov_token : str, optional
        A token that is already a regular word of ``vocab`` is a ValueError.
    oov_vector : {"mean", "zeros"} or array of shape (dim,), default "mean"
        The out-of-vocabulary row: the mean of all vectors, zeros, or the given vector.
        The padding row is always zeros.

    Returns
    -------
    vocab : Vocabulary
    vectors : ndarray of shape (len(vocab), dim), same dtype (a new array)
    """
    if vocab.pad_token is not None or vocab.oov_token is not None:
        raise ValueError("vocab already has special tokens")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(vocab):
        raise ValueError(f"vectors must have shape ({len(vocab)}, dim), got {vectors.shape}")
    for token in (pad_token, oov_token):
        if token is not None and token in vocab:
            raise ValueError(f"special token {token!r} is already a word of the vocabulary")
    dim = vectors.shape[1]
    rows = []
    if pad_token is not None:
        rows.append(np.zeros(dim, dtype=vectors.dtype))
    if oov_token is not None:
        if isinstance(oov_vector, str):
            if oov_vector == "mean":
                oov = vectors.mean(axis=0, dtype=np.float64) if len(vectors) else np.zeros(dim)
            elif oov_vector == "zeros":
                oov = np.zeros(dim)
            else:
                raise ValueError(f"oov_vector must be 'mean', 'zeros' or an array, got {oov_vector!r}")
        else:
            oov = np.asarray(oov_vector)
            if oov.shape != (dim,):
                raise ValueError(f"oov_vector must have shape ({dim},), got {oov.shape}")
        rows.append(oov.astype(vectors.dtype))
    out = _aligned.empty((len(rows) + vectors.shape[0], dim), vectors.dtype)
    out[:len(rows)] = np.asarray(rows, dtype=vectors.dtype).reshape(len(rows), dim)
    out[len(rows):] = vectors
    return Vocabulary(vocab.tokens, pad_token=pad_token, oov_token=oov_token), out
