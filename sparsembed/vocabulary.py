"""Token <-> id mappings for feeding text to Embedding and EmbeddingBag."""

import json
from collections import Counter

import numpy as np

__all__ = ["Vocabulary"]

_FORMAT = "sparsembed.Vocabulary"
_FORMAT_VERSION = 1


def _check_token(token, what="token"):
    if not isinstance(token, str):
        raise TypeError(f"{what} must be a str, got {type(token).__name__} {token!r}")
    return token


def _not_a_token(token, where):
    """The TypeError for a token that is not a str, at ``where``."""
    if isinstance(token, (bytes, bytearray)):
        return TypeError(f"tokens are str, got bytes {bytes(token)[:40]!r} at {where}; "
                         "decode them first")
    return TypeError(f"tokens are str, got {type(token).__name__} {token!r} at {where}")


class Vocabulary:
    """A fixed mapping between string tokens and the ids ``0 .. len(vocab) - 1``.

    Ids are assigned in this order: ``pad_token`` (id 0) when given, then
    ``oov_token`` (id 1 with a pad token, else id 0) when given, then ``tokens`` in
    the order given. A token that repeats (or equals a special token) keeps its first
    id. Use ``padding_idx=vocab.pad_id`` on the layer so the padding row gets no
    gradient.

    Parameters
    ----------
    tokens : iterable of str, default ()
        The regular tokens.
    pad_token : str, optional
        Token of the padding id (``pad_id``, always 0).
    oov_token : str, optional
        Token standing for every unknown token: :meth:`encode` maps tokens it does
        not know to ``oov_id``. Without it an unknown token is a ``KeyError``.

    Attributes
    ----------
    pad_token, oov_token : str or None
    pad_id, oov_id : int or None
        Ids of the special tokens (None when not given).

    Examples
    --------
    >>> import sparsembed as se
    >>> vocab = se.Vocabulary(["the", "cat"], pad_token="<pad>", oov_token="<unk>")
    >>> vocab.encode(["the", "dog", "cat"]).tolist()
    [2, 1, 3]
    >>> ids, offsets = vocab.encode([["the", "cat"], [], ["cat"]])
    >>> ids.tolist(), offsets.tolist()
    ([2, 3, 3], [0, 2, 2])
    """

    def __init__(self, tokens=(), *, pad_token=None, oov_token=None):
        if pad_token is not None and oov_token is not None and pad_token == oov_token:
            raise ValueError(f"pad_token and oov_token must differ, both are {pad_token!r}")
        self.pad_token = None if pad_token is None else _check_token(pad_token, "pad_token")
        self.oov_token = None if oov_token is None else _check_token(oov_token, "oov_token")
        self._tokens = []
        self._index = {}
        self.pad_id = None if pad_token is None else self._add(pad_token)
        self.oov_id = None if oov_token is None else self._add(oov_token)
        if isinstance(tokens, str):
            raise TypeError("tokens must be an iterable of str, got a single str")
        for token in tokens:
            self._add(_check_token(token))

    def _add(self, token):
        idx = self._index.get(token)
        if idx is None:
            idx = len(self._tokens)
            self._index[token] = idx
            self._tokens.append(token)
        return idx

    @classmethod
    def from_corpus(cls, corpus, min_count=1, max_size=None, *, pad_token=None, oov_token=None):
        """Build a vocabulary from tokenised documents.

        Tokens are ordered by count (most frequent first), ties broken by first
        appearance in ``corpus``, so the result is deterministic.

        Parameters
        ----------
        corpus : iterable of iterables of str
            Documents, each a sequence of tokens (read once).
        min_count : int, default 1
            Keep tokens occurring at least this often.
        max_size : int, optional
            Upper bound on ``len(vocab)``, special tokens included (the least
            frequent tokens are dropped).
        pad_token, oov_token : str, optional
            As in the constructor.
        """
        if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        n_special = (pad_token is not None) + (oov_token is not None)
        if max_size is not None:
            if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < n_special:
                raise ValueError(
                    f"max_size must be an int >= {n_special} (the number of special tokens), got {max_size!r}"
                )
        counts = Counter()
        if isinstance(corpus, str):
            raise TypeError("corpus must be an iterable of token lists, got a str")
        for doc in corpus:
            if isinstance(doc, str):
                raise TypeError(f"each document must be a sequence of tokens, got the str {doc!r}")
            counts.update(doc)
        specials = {t for t in (pad_token, oov_token) if t is not None}
        # Counter keeps first-insertion order and sorted() is stable: ties keep first appearance.
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_count and t not in specials),
            key=lambda t: -counts[t],
        )
        if max_size is not None:
            ranked = ranked[: max_size - n_special]
        vocab = cls(ranked, pad_token=pad_token, oov_token=oov_token)
        vocab.counts = {t: counts[t] for t in ranked}
        return vocab

    # -- mapping --------------------------------------------------------------------
    def __len__(self):
        return len(self._tokens)

    def __contains__(self, token):
        return token in self._index

    def __iter__(self):
        return iter(self._tokens)

    def __getitem__(self, token):
        """Id of ``token`` (``oov_id`` for an unknown token when there is an oov token)."""
        return self.id_of(token)

    def __eq__(self, other):
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (self._tokens == other._tokens and self.pad_token == other.pad_token
                and self.oov_token == other.oov_token)

    def __repr__(self):
        opts = "".join(f", {k}={getattr(self, k)!r}" for k in ("pad_token", "oov_token")
                       if getattr(self, k) is not None)
        return f"Vocabulary(size={len(self)}{opts})"

    @property
    def tokens(self):
        """list of str: every token, in id order (a copy)."""
        return list(self._tokens)

    def id_of(self, token):
        """Id of ``token``.

        Raises
        ------
        KeyError
            Unknown token and no ``oov_token``; the message names the token.
        """
        idx = self._index.get(token)
        if idx is None:
            if self.oov_id is None:
                raise KeyError(f"token {token!r} is not in the vocabulary (and it has no oov_token)")
            return self.oov_id
        return idx

    def token_of(self, id):
        """Token of ``id`` (IndexError naming the id when outside ``[0, len)``)."""
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise TypeError(f"id must be an int, got {type(id).__name__} {id!r}")
        if not 0 <= id < len(self._tokens):
            raise IndexError(f"id {id} is out of range for a vocabulary of {len(self)} tokens "
                             f"(valid: 0..{len(self) - 1})")
        return self._tokens[int(id)]

    def _encode_flat(self, tokens, where="position {}"):
        """Ids of the flat list ``tokens``; ``where`` names a token's place in errors."""
        get = self._index.get
        try:
            ids = np.fromiter((get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
        except TypeError:  # an unhashable token
            pos = next(i for i, t in enumerate(tokens) if not isinstance(t, str))
            raise _not_a_token(tokens[pos], where.format(pos)) from None
        missing = np.flatnonzero(ids < 0)
        for pos in missing.tolist():  # (the misses only: the type of a found key is str)
            if not isinstance(tokens[pos], str):
                raise _not_a_token(tokens[pos], where.format(pos))
        if missing.size:
            if self.oov_id is None:
                raise KeyError(f"token {tokens[missing[0]]!r} is not in the vocabulary (and it "
                               "has no oov_token)")
            ids[missing] = self.oov_id
        return ids

    def encode(self, tokens, *, include_last_offset=False):
        """Map tokens to ids.

        Parameters
        ----------
        tokens : sequence of str, or sequence of sequences of str
            One sequence of tokens, or a batch of them (bags).
        include_last_offset : bool, default False
            For a batch: also append ``len(ids)`` to the offsets (EmbeddingBag's
            ``include_last_offset=True`` convention).

        Returns
        -------
        ids : ndarray of shape (n_tokens,), int64
            For a flat sequence.
        (ids, offsets) : tuple of int64 ndarrays
            For a batch: the concatenated ids and the start of each bag
            (``offsets[0] == 0``, empty bags allowed), ready for
            ``EmbeddingBag(ids, offsets)``.

        Raises
        ------
        KeyError
            An unknown token and no ``oov_token``.
        TypeError
            A single str (ambiguous: wrap it in a list); bytes tokens.
        """
        if isinstance(tokens, str):
            raise TypeError(f"encode takes a sequence of tokens, got the str {tokens!r}; "
                            f"use encode([{tokens!r}])")
        if isinstance(tokens, np.ndarray) and tokens.ndim == 1 and tokens.dtype.kind == "U":
            tokens = tokens.tolist()
        tokens = list(tokens)
        nested = len(tokens) > 0 and not isinstance(tokens[0], str)
        if not nested:
            return self._encode_flat(tokens)
        docs = []
        for i, doc in enumerate(tokens):
            if isinstance(doc, (bytes, bytearray)):  # list(b"ab") would be [97, 98]
                raise _not_a_token(doc, f"position {i}")
            if isinstance(doc, str):
                raise TypeError(f"batch element {i} is a str; expected every element to be "
                                "a sequence of tokens (or pass one flat sequence)")
            try:
                docs.append(doc if isinstance(doc, (list, tuple)) else list(doc))
            except TypeError:
                raise TypeError(f"batch element {i} is {type(doc).__name__} {doc!r}: expected "
                                "str tokens, or a batch of sequences of them") from None
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + include_last_offset, dtype=np.int64)
        np.cumsum(lengths[:-1] if not include_last_offset else lengths, out=offsets[1:])
        ids = self._encode_flat([t for d in docs for t in d], "position {} of the batch's tokens")
        return ids, offsets

    def decode(self, ids):
        """Tokens of ``ids`` (list of str)."""
        if isinstance(ids, (list, tuple)) and len(ids) == 0:
            return []
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        flat = arr.reshape(-1)
        bad = (flat < 0) | (flat >= len(self._tokens))
        if bad.any():
            pos = int(np.argmax(bad))
            raise IndexError(f"id {int(flat[pos])} at position {pos} is out of range for a "
                             f"vocabulary of {len(self)} tokens (valid: 0..{len(self) - 1})")
        toks = self._tokens
        return [toks[i] for i in flat.tolist()]

    # -- persistence ----------------------------------------------------------------
    def to_config(self):
        """JSON-ready dict (what :meth:`save` writes)."""
        specials = {self.pad_token, self.oov_token} - {None}
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "pad_token": self.pad_token,
            "oov_token": self.oov_token,
            "tokens": [t for t in self._tokens if t not in specials],
        }

    @classmethod
    def from_config(cls, config):
        """Inverse of :meth:`to_config` (ValueError on anything malformed)."""
        if not isinstance(config, dict) or config.get("format") != _FORMAT:
            raise ValueError(f"not a sparsembed vocabulary (expected format {_FORMAT!r})")
        if config.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported vocabulary format_version {config.get('format_version')!r} "
                             f"(this version reads {_FORMAT_VERSION})")
        tokens = config.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("vocabulary 'tokens' must be a list of str")
        for key in ("pad_token", "oov_token"):
            if config.get(key) is not None and not isinstance(config[key], str):
                raise ValueError(f"vocabulary {key!r} must be a str or null")
        vocab = cls(tokens, pad_token=config.get("pad_token"), oov_token=config.get("oov_token"))
        if len(vocab) != len(tokens) + (vocab.pad_id is not None) + (vocab.oov_id is not None):
            raise ValueError("vocabulary 'tokens' holds duplicates or special tokens")
        return vocab

    def save(self, path):
        """Write the vocabulary as UTF-8 JSON (atomically: temp file, fsync, rename)."""
        from sparsembed.serialization import _atomic_write

        data = json.dumps(self.to_config(), ensure_ascii=False).encode("utf-8")
        _atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path):
        """Read a vocabulary written by :meth:`save` (ValueError when malformed)."""
        with open(path, "rb") as f:
            raw = f.read()
        try:
            config = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            # (RecursionError: json's parser on arrays nested thousands deep)
            raise ValueError(f"{path}: not a sparsembed vocabulary file: "
                             f"{exc or type(exc).__name__}") from None
        return cls.from_config(config)
