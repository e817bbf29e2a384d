"""Saving and loading layers and optimizers: :func:`save` and :func:`load`.

No pickle anywhere: a checkpoint holds numbers and JSON only, so loading an untrusted
file cannot run code. Writes are atomic, and large tables can be memory-mapped.

File format (format_version 1)
------------------------------
A checkpoint is a ZIP archive that ``numpy.load(path, allow_pickle=False)`` reads as an
``.npz`` file (the name need not end in ``.npz``; :func:`save` writes exactly the path
it is given). Every member is *stored* (no compression) and is a ``.npy`` file (format
1.0) holding one C-ordered array:

``__sparsembed__.npy``
    A 1-D ``uint8`` array: the UTF-8 bytes of a JSON object (the *header*)::

        {"format": "sparsembed",          # always this string
         "format_version": 1,             # readers refuse versions they do not know
         "library_version": "0.1.0",      # informative only
         "root": RECORD}

    A RECORD describes one object::

        {"kind": "Embedding",             # what to rebuild, see below
         "config": {...},                 # constructor arguments (JSON values)
         "attrs": {...},                  # other plain attributes, e.g. requires_grad
         "arrays": {NAME: {"member": "weight.npy",
                           "shape": [10, 3], "dtype": "<f4"}, ...},
         "children": [RECORD, ...]}       # e.g. the layers an optimizer updates

``<member>.npy`` (one per entry of every record's ``arrays``)
    The array itself. Member names are the record's path plus the array name:
    ``weight.npy`` for a saved layer, ``layers/0/weight.npy`` and
    ``state/0/sum.npy`` for an optimizer checkpoint.

Kinds: ``"Embedding"`` (config: ``num_embeddings, embedding_dim, padding_idx,
max_norm, norm_type, scale_grad_by_freq, sparse, dtype``; attrs ``requires_grad``;
array ``weight``), ``"EmbeddingBag"`` (config: ``num_embeddings, embedding_dim,
max_norm, norm_type, scale_grad_by_freq, mode, sparse, include_last_offset,
padding_idx, dtype``; attrs ``requires_grad``; array ``weight``),
``"HashEmbedding"`` (config: ``num_buckets, embedding_dim,
num_hashes, mode, seed, sparse, num_weights, dtype``; attrs ``requires_grad`` and, in
weighted mode, ``importance_requires_grad``; arrays ``weight`` and, in weighted mode,
``importance``), ``"optim.SGD"``, ``"optim.Adagrad"``, ``"optim.SparseAdam"``,
``"optim.RowWiseAdagrad"`` (config: ``defaults`` and ``param_groups`` as in the
optimizer's ``state_dict()``, layers numbered in order across groups; attrs ``steps``:
each layer's step count, or null before its first update; arrays
``state/<i>/<name>`` and ``state/<i>/step``, the step count again as a one-entry
int64 array, which training on a checkpoint loaded with ``mmap_mode="r+"`` keeps up
to date in the file and which :func:`load` reads first; children: the layers, in
that order). A weighted HashEmbedding's
importance table, when it is one of an optimizer's params, is written as the child
``{"kind": "HashImportance", "config": {"owner": j}}``: the importance table of child
``j``. Further kinds register themselves with :func:`register_kind`.
``norm_type = inf`` is written as JSON ``Infinity`` (Python's
``json`` reads it back).

The array data of each member starts at a file offset that is a multiple of 64 (the
local ZIP header carries a padding extra field, id 0xD935), so :func:`load` with
``mmap_mode`` maps the data in place with ``numpy.memmap`` (the offset comes from the
ZIP local header plus the ``.npy`` header), and without it reads the data straight into
a new array.

Integrity: the JSON header member is read through ``zipfile`` and its CRC-32 is
checked. Array members are checked for structure (stored, a valid ``.npy`` header, no
object dtype, the exact size the header implies, shape and dtype equal to the JSON
header and to the configuration) but their CRC-32 is *not* checked, in either mode:
``load(path, mmap_mode="r+")`` lets training update rows in place, which leaves the
ZIP CRC of that member stale by design (recomputing it would read the whole table).
Such a file stays loadable by :func:`load`; ``numpy.load`` reports a CRC error on it
until it is saved again with :func:`save`.

Optimizers
----------
``save(optimizer, path)`` writes the optimizer's hyperparameters and state *together
with every layer it updates* (one self-contained checkpoint). ``load(path)`` rebuilds
both: the layers come back as the optimizer's parameters. ``load(path,
params=layers)`` instead restores the checkpoint *into* existing layers (their weights
are overwritten with the saved ones after a shape check, then the optimizer is built on
them), which is what resuming training of a live model needs; the given layers keep
their own configuration (padding_idx, sparse, ...). With ``mmap_mode`` the layers'
weights and the optimizer's state arrays are memory-mapped; in the writable modes the
mapped state arrays become the optimizer's own, so steps update the file in place (a
table and its Adagrad accumulator can both be larger than RAM), step counts included:
the file stays a checkpoint of the training so far. Only state that did not exist at
``save`` time (a layer's first update comes after it) lives in memory alone; ``save``
again, to another path, to keep it (saving over the mapped file is a ValueError: the
mapped arrays would stay on the replaced file).
"""

import io
import json
import math
import os
import stat
import struct
import sys
import tempfile
import tokenize
import zipfile

import numpy as np

from sparsembed import _aligned

__all__ = ["save", "load", "register_kind"]

FORMAT = "sparsembed"
FORMAT_VERSION = 1
HEADER_MEMBER = "__sparsembed__.npy"
_ALIGN = 64
_PAD_EXTRA_ID = 0xD935
_CHUNK_BYTES = 1 << 24
_MMAP_MODES = (None, "r", "r+", "c")
# what zipfile raises on a corrupt archive or member beside BadZipFile: a damaged
# "version needed" or compression field (NotImplementedError), an "encrypted" flag
# (RuntimeError, password required)
_ZIP_ERRORS = (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, EOFError)
# what numpy's .npy header parser raises on a corrupt header (it tokenizes and
# literal_evals the header's Python dict)
_NPY_HEADER_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError,
                      RecursionError)


# -- atomic writes --------------------------------------------------------------------
def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, then rename it
    over ``path``. On any failure the temp file is removed and ``path`` is untouched.

    A symbolic link at ``path`` stays one: the file it points to is replaced (a
    ``latest`` link keeps pointing where it did). A file written over keeps its
    permission bits; a new one gets ``0o666`` less the umask, as ``open`` would."""
    path = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (best effort: not every OS allows it)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# -- kinds ----------------------------------------------------------------------------
_KINDS: dict[str, tuple] = {}  # kind -> (class, to_record, from_record)


def register_kind(kind, cls, to_record, from_record):
    """Teach :func:`save`/:func:`load` a new kind of object.

    Parameters
    ----------
    kind : str
        The ``kind`` string written in the header.
    cls : type
        Objects of exactly this type are saved with ``to_record``.
    to_record : callable(obj) -> (config, attrs, arrays, children)
        ``config``/``attrs`` JSON-ready dicts, ``arrays`` a dict of name -> ndarray,
        ``children`` a list of objects saved as nested records.
    from_record : callable(config, attrs, arrays, children, params) -> obj
        ``arrays`` are loaded (or memory-mapped) ndarrays, ``children`` the rebuilt
        child objects, ``params`` the ``params=`` argument of :func:`load`.
        It should raise ``ValueError`` on a config/array mismatch.
    """
    _KINDS[kind] = (cls, to_record, from_record)


def _kind_of(obj):
    for kind, (cls, _, _) in _KINDS.items():
        if type(obj) is cls:
            return kind
    raise TypeError(f"cannot save an object of type {type(obj).__name__}; "
                    f"savable kinds: {sorted(_KINDS)}")


def _expect_array(arrays, name, shape, dtype):
    """Check a loaded array against what the config implies (ValueError otherwise)."""
    if name not in arrays:
        raise ValueError(f"missing array {name!r}")
    arr = arrays[name]
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"array {name!r} has shape {tuple(arr.shape)} and dtype {arr.dtype}, "
                         f"but the config implies shape {tuple(shape)} and dtype {np.dtype(dtype)}")
    return arr


def _as_weight(arr):
    """A loaded weight as the layer should hold it (memmaps stay memmaps)."""
    return arr


def _embedding_to_record(layer):
    config = {
        "num_embeddings": layer.num_embeddings,
        "embedding_dim": layer.embedding_dim,
        "padding_idx": layer.padding_idx,
        "max_norm": layer.max_norm,
        "norm_type": layer.norm_type,
        "scale_grad_by_freq": layer.scale_grad_by_freq,
        "sparse": layer.sparse,
        "dtype": np.dtype(layer.weight.dtype).name,
    }
    from sparsembed.embedding import _to_host

    return config, {"requires_grad": bool(layer.requires_grad)}, {"weight": _to_host(layer.weight)}, []


# a layer's yes/no options and attributes, which its constructor or setter would take
# as any truthy value
_BOOL_OPTIONS = ("scale_grad_by_freq", "sparse", "include_last_offset")
_BOOL_ATTRS = ("requires_grad", "importance_requires_grad")


def _check_flags(config, attrs):
    """ValueError unless a layer record's yes/no entries are JSON booleans."""
    flags = [(k, config[k]) for k in _BOOL_OPTIONS if k in config]
    flags += [(k, attrs[k]) for k in _BOOL_ATTRS if k in attrs]
    for key, value in flags:
        if not isinstance(value, bool):
            raise ValueError(f"the checkpoint's {key} must be true or false, got {value!r}")


def _layer_from_record(cls, config, attrs, arrays, extra_shape_checks=()):
    config = dict(config)
    _check_flags(config, attrs)
    weight = _expect_array(arrays, "weight", (config["num_embeddings"], config["embedding_dim"]),
                           config["dtype"])
    for name, shape, dtype in extra_shape_checks:
        _expect_array(arrays, name, shape, dtype)
    layer = cls(**config, weight=weight)
    if isinstance(weight, np.memmap):
        layer.weight = weight  # keep the memmap itself (flush(), filename)
    layer.requires_grad = bool(attrs.get("requires_grad", True))
    return layer


def _embedding_from_record(config, attrs, arrays, children, params):
    from sparsembed.embedding import Embedding

    return _layer_from_record(Embedding, config, attrs, arrays)


def _bag_to_record(bag):
    config = {
        "num_embeddings": bag.num_embeddings,
        "embedding_dim": bag.embedding_dim,
        "max_norm": bag.max_norm,
        "norm_type": bag.norm_type,
        "scale_grad_by_freq": bag.scale_grad_by_freq,
        "mode": bag.mode,
        "sparse": bag.sparse,
        "include_last_offset": bag.include_last_offset,
        "padding_idx": bag.padding_idx,
        "dtype": np.dtype(bag.weight.dtype).name,
    }
    from sparsembed.embedding import _to_host

    return config, {"requires_grad": bool(bag.requires_grad)}, {"weight": _to_host(bag.weight)}, []


def _bag_from_record(config, attrs, arrays, children, params):
    from sparsembed.embedding import EmbeddingBag

    return _layer_from_record(EmbeddingBag, config, attrs, arrays)


def _hash_to_record(layer):
    config = {
        "num_buckets": layer.num_buckets,
        "embedding_dim": layer.embedding_dim,
        "num_hashes": layer.num_hashes,
        "mode": layer.mode,
        "seed": layer.seed,
        "sparse": layer.sparse,
        "num_weights": layer.num_weights,
        "dtype": np.dtype(layer.weight.dtype).name,
    }
    attrs = {"requires_grad": bool(layer.requires_grad)}
    arrays = {"weight": layer.weight}
    if layer.importance is not None:
        arrays["importance"] = layer.importance.weight
        attrs["importance_requires_grad"] = bool(layer.importance.requires_grad)
    return config, attrs, arrays, []


def _hash_from_record(config, attrs, arrays, children, params):
    from sparsembed.hashing import HashEmbedding

    config = dict(config)
    _check_flags(config, attrs)
    weight = _expect_array(arrays, "weight", (config["num_buckets"], config["embedding_dim"]),
                           config["dtype"])
    weighted = config.get("mode") == "weighted"
    if weighted:
        importance = _expect_array(arrays, "importance", (config["num_weights"], config["num_hashes"]),
                                   config["dtype"])
    elif "importance" in arrays:
        raise ValueError("unexpected array 'importance' for mode 'sum'")
    layer = HashEmbedding(**config, weight=weight)
    if isinstance(weight, np.memmap):
        layer.weight = weight
    layer.requires_grad = bool(attrs.get("requires_grad", True))
    if weighted:
        layer.importance.weight = importance
        layer.importance.requires_grad = bool(attrs.get("importance_requires_grad", True))
    return layer


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _ImportanceRef:
    """Stands, in an optimizer checkpoint, for ``layers[owner].importance``."""

    def __init__(self, owner):
        self.owner = owner


def _importance_ref_to_record(ref):
    return {"owner": ref.owner}, {}, {}, []


def _importance_ref_from_record(config, attrs, arrays, children, params):
    owner = config.get("owner")
    if isinstance(owner, bool) or not isinstance(owner, int):
        raise ValueError(f"bad HashImportance owner {owner!r}")
    return _ImportanceRef(owner)


def _optimizer_children(layers):
    from sparsembed.hashing import HashImportance

    out = []
    for layer in layers:
        if isinstance(layer, HashImportance):
            owners = [j for j, other in enumerate(layers) if getattr(other, "importance", None) is layer]
            if not owners:
                raise TypeError("an optimizer holding a HashEmbedding's importance table can only be "
                                "saved when it also holds that HashEmbedding")
            out.append(_ImportanceRef(owners[0]))
        else:
            out.append(layer)
    return out


def _resolve_children(children):
    out = list(children)
    for i, child in enumerate(children):
        if isinstance(child, _ImportanceRef):
            owner = children[child.owner] if 0 <= child.owner < len(children) else None
            if getattr(owner, "importance", None) is None:
                raise ValueError(f"layer {i} refers to the importance table of layer {child.owner}, "
                                 "which has none")
            out[i] = owner.importance
    return out


def _optimizer_to_record(opt):
    sd = opt.state_dict()
    layers = [layer for group in opt.param_groups for layer in group["params"]]
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    config = {"defaults": {k: _jsonable(v) for k, v in opt.defaults.items()}, "param_groups": groups}
    steps, arrays = [], {}
    for i in range(len(layers)):
        st = sd["state"].get(i)
        if st is None:
            steps.append(None)
            continue
        steps.append(int(st.get("step", 0)))
        # also as an array: training on a checkpoint loaded with mmap_mode="r+" keeps
        # it up to date in the file, beside the state arrays it updates there
        arrays[f"state/{i}/step"] = np.array([steps[-1]], dtype=np.int64)
        for name, value in st.items():
            if name != "step" and value is not None:
                arrays[f"state/{i}/{name}"] = value
    return config, {"steps": steps}, arrays, _optimizer_children(layers)


def _optimizer_from_record_for(cls):
    def from_record(config, attrs, arrays, children, params):
        groups_cfg = config["param_groups"]
        steps = attrs.get("steps", [])
        children = _resolve_children(children)
        n = len(children)
        if len(steps) != n:
            raise ValueError(f"'steps' lists {len(steps)} layers, the checkpoint holds {n}")
        if params is None:
            layers = children
        else:
            layers = list(params)
            if len(layers) != n:
                raise ValueError(f"params has {len(layers)} layers, the checkpoint holds {n}")
            for i, (live, saved) in enumerate(zip(layers, children)):
                if type(live) is not type(saved) or live.weight.shape != saved.weight.shape \
                        or live.weight.dtype != saved.weight.dtype:
                    raise ValueError(
                        f"params[{i}] is a {type(live).__name__} with weight {live.weight.shape} "
                        f"{live.weight.dtype}, the checkpoint holds a {type(saved).__name__} with "
                        f"{saved.weight.shape} {saved.weight.dtype}")
        seen = sorted(i for g in groups_cfg for i in g["params"])
        if seen != list(range(n)):
            raise ValueError(f"param_groups list layers {seen}, expected 0..{n - 1} once each")
        groups = [dict({k: v for k, v in g.items() if k != "params"},
                       params=[layers[i] for i in g["params"]]) for g in groups_cfg]
        opt = cls(groups, **config["defaults"])
        state, step_files = {}, {}
        for i, step in enumerate(steps):
            if step is None:
                continue
            prefix = f"state/{i}/"
            st = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            step_file = st.pop("step", None)  # absent from files of older versions
            if step_file is not None:
                if step_file.shape != (1,) or step_file.dtype.kind not in "iu":
                    raise ValueError(f"state/{i}/step must hold one integer, got shape "
                                     f"{step_file.shape} and dtype {step_file.dtype}")
                step = int(step_file[0])  # the file's, if training updated it in place
                if isinstance(step_file, np.memmap) and step_file.flags.writeable:
                    step_files[i] = step_file
            st["step"] = step
            state[i] = st
        unknown = [k for k in arrays if int(k.split("/")[1]) not in state]
        if unknown:
            raise ValueError(f"state arrays {unknown} belong to no layer with state")
        opt.load_state_dict({"state": state, "param_groups": [dict(g) for g in groups_cfg]})
        # keep memory-mapped state arrays mapped (load_state_dict copies), and the step
        # counts in step with the file
        for i, st in state.items():
            for name, arr in st.items():
                if isinstance(arr, np.memmap) and arr.flags.writeable and name in opt.state.get(i, {}):
                    opt.state[i][name] = arr
        opt._step_files = step_files
        if params is not None:  # everything is checked: now overwrite the live weights
            for live, saved in zip(layers, children):
                if hasattr(live, "load_state_dict"):
                    live.load_state_dict(saved.state_dict())
                else:
                    live.weight[...] = saved.weight
        return opt

    return from_record


def _register_builtin_kinds():
    if "Embedding" in _KINDS:
        return
    from sparsembed.embedding import Embedding
    from sparsembed.hashing import HashEmbedding

    register_kind("Embedding", Embedding, _embedding_to_record, _embedding_from_record)
    try:
        from sparsembed.embedding import EmbeddingBag
    except ImportError:  # an older core without bags
        EmbeddingBag = None
    if EmbeddingBag is not None:
        register_kind("EmbeddingBag", EmbeddingBag, _bag_to_record, _bag_from_record)
    register_kind("HashEmbedding", HashEmbedding, _hash_to_record, _hash_from_record)
    register_kind("HashImportance", _ImportanceRef, _importance_ref_to_record, _importance_ref_from_record)
    try:
        from sparsembed import optim
    except ImportError:  # optimizers not built into this version
        optim = None
    for name in ("SGD", "Adagrad", "SparseAdam", "RowWiseAdagrad"):
        cls = getattr(optim, name, None)
        if cls is not None:
            register_kind(f"optim.{name}", cls, _optimizer_to_record, _optimizer_from_record_for(cls))


# -- writing --------------------------------------------------------------------------
def _build(obj, prefix, members):
    kind = _kind_of(obj)
    checked_table = getattr(obj, "_checked_table", None)
    if checked_table is not None:
        # a layer whose weight was replaced by a table of another shape or layout
        # would be written and then refused by load: refuse it before any write
        checked_table()
    config, attrs, arrays, children = _KINDS[kind][1](obj)
    record = {"kind": kind, "config": config, "attrs": attrs, "arrays": {}, "children": []}
    for name, arr in arrays.items():
        arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
        if arr.dtype.hasobject or arr.dtype.fields is not None:
            raise TypeError(f"array {name!r} has dtype {arr.dtype}; only plain numeric arrays are saved")
        member = f"{prefix}{name}.npy"
        record["arrays"][name] = {"member": member, "shape": list(arr.shape), "dtype": arr.dtype.str}
        members.append((member, arr))
    for i, child in enumerate(children):
        record["children"].append(_build(child, f"{prefix}{_child_dir(kind)}/{i}/", members))
    return record


def _child_dir(kind):
    return "layers"


def _npy_header(arr):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def _write_member(zf, f, name, arr):
    """Write ``arr`` as ``name`` (.npy), stored, with its data 64-byte aligned in the file."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    header = _npy_header(arr)
    zinfo = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zinfo.compress_type = zipfile.ZIP_STORED
    zinfo.external_attr = 0o644 << 16
    # local header = 30 bytes + name + our extra + the 20-byte zip64 extra zipfile adds
    base = f.tell() + 30 + len(name.encode("utf-8")) + 4 + 20 + len(header)
    pad = (-base) % _ALIGN
    zinfo.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"\0" * pad
    with zf.open(zinfo, "w", force_zip64=True) as m:
        m.write(header)
        flat = arr.reshape(-1)
        step = max(1, _CHUNK_BYTES // max(arr.itemsize, 1))
        for start in range(0, flat.shape[0], step):
            m.write(memoryview(flat[start:start + step]).cast("B"))


def _write_archive(f, header, members):
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        meta = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
        _write_member(zf, f, HEADER_MEMBER, meta)
        for name, arr in members:
            _write_member(zf, f, name, arr)


def save(obj, path):
    """Save a layer or an optimizer to ``path`` (see the module docstring for the format).

    The file is written to a temporary file in the same directory, flushed and
    fsynced, then renamed over ``path``: a failure or crash mid-save leaves any
    previous file at ``path`` intact.

    Parameters
    ----------
    obj : Embedding, EmbeddingBag, HashEmbedding or an se.optim optimizer
        An optimizer is saved with the layers it updates.
    path : str or os.PathLike
        Written exactly (no ``.npz`` suffix is added).

    Raises
    ------
    ValueError
        ``path`` is the file that ``obj``'s arrays are mapped from with
        ``mmap_mode="r+"``: training already updates it in place, and the rename
        would leave those arrays on the replaced file, so later steps would never
        reach ``path``. Save to another path (and load that one to go on).
    """
    _register_builtin_kinds()
    members = []
    root = _build(obj, "", members)
    _check_not_mapped_from(members, path)
    from sparsembed._version import __version__

    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "library_version": __version__, "root": root}
    _atomic_write(path, lambda f: _write_archive(f, header, members))


def _writable_map_file(arr):
    """The file that ``arr`` (or an array it views) is mapped from with mode "r+", or
    None."""
    while isinstance(arr, np.ndarray):
        if isinstance(arr, np.memmap) and arr.mode == "r+" and arr.filename:
            return arr.filename
        arr = arr.base
    return None


def _check_not_mapped_from(members, path):
    """ValueError if one of the arrays to save is mapped writable from ``path``."""
    target = os.fspath(path)
    if not os.path.exists(target):
        return
    for name, arr in members:
        mapped = _writable_map_file(arr)
        if mapped is not None and os.path.exists(mapped) and os.path.samefile(mapped, target):
            raise ValueError(
                f"{name[:-len('.npy')]} is mapped from {target} (mmap_mode='r+'), whose "
                "steps already update that file in place; saving over it would leave the "
                "mapped arrays on the replaced file, so later steps would not reach it: "
                "save to another path (and load that one to go on training)")


# -- reading --------------------------------------------------------------------------
def advise_random(arr):
    """Tell the kernel a memmap is read at random (``MADV_RANDOM``: no readahead).

    Embedding lookups touch scattered rows; readahead would pull in (and keep
    resident) pages nobody asked for. Best effort: a no-op where unsupported.
    """
    import mmap as _mmap

    mm = getattr(arr, "_mmap", None)
    advice = getattr(_mmap, "MADV_RANDOM", None)
    if mm is not None and advice is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(advice)
        except (OSError, ValueError):
            pass


class _Reader:
    def __init__(self, path, mmap_mode):
        self.path = os.fspath(path)
        self.mmap_mode = mmap_mode
        try:
            self.zf = zipfile.ZipFile(self.path, "r")
        except _ZIP_ERRORS as exc:
            raise ValueError(f"{self.path}: not a sparsembed checkpoint (not a valid zip "
                             f"archive; truncated or corrupt?): {exc}") from None
        self.file_size = os.path.getsize(self.path)

    def close(self):
        self.zf.close()

    def _fail(self, msg):
        raise ValueError(f"{self.path}: {msg}")

    def header(self):
        try:
            self.zf.getinfo(HEADER_MEMBER)
        except KeyError:
            self._fail(f"not a sparsembed checkpoint (no {HEADER_MEMBER} member)")
        meta = self.read_member(HEADER_MEMBER, mmap=False)
        if meta.dtype != np.uint8 or meta.ndim != 1:
            self._fail("corrupt header member (expected a 1-D uint8 array)")
        try:
            header = json.loads(meta.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            self._fail(f"corrupt header (not UTF-8 JSON): {exc}")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            self._fail("not a sparsembed checkpoint (header 'format' is not 'sparsembed')")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            self._fail(f"unsupported format_version {version!r} (this sparsembed reads "
                       f"version {FORMAT_VERSION}); written by sparsembed "
                       f"{header.get('library_version')!r}")
        if not isinstance(header.get("root"), dict):
            self._fail("corrupt header (no 'root' record)")
        return header

    def read_member(self, name, mmap):
        try:
            zinfo = self.zf.getinfo(name)
        except KeyError:
            self._fail(f"missing member {name!r}")
        if name == HEADER_MEMBER:  # small: read through zipfile, CRC checked
            try:
                return np.load(io.BytesIO(self.zf.read(zinfo)), allow_pickle=False)
            except _ZIP_ERRORS + _NPY_HEADER_ERRORS as exc:
                self._fail(f"corrupt member {name!r}: {exc}")
        shape, fortran, dtype, offset = self._locate(zinfo)
        order = "F" if fortran else "C"
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype=dtype, order=order)
        if mmap:
            arr = np.memmap(self.path, dtype=dtype, mode=self.mmap_mode, offset=offset,
                            shape=shape, order=order)
            advise_random(arr)
            return arr
        flat = _aligned.empty(count, dtype)  # tables load 64-byte aligned, as saved
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(flat).cast("B"))
        if got != flat.nbytes:
            self._fail(f"member {name!r} is truncated at byte offset {offset + got}")
        return flat.reshape(shape, order=order)

    def _locate(self, zinfo):
        """(shape, fortran_order, dtype, data offset) of a stored .npy member, checked."""
        name = zinfo.filename
        if zinfo.compress_type != zipfile.ZIP_STORED:
            self._fail(f"member {name!r} is compressed; sparsembed checkpoints store members "
                       "uncompressed (so that they can be memory-mapped)")
        with open(self.path, "rb") as f:
            f.seek(zinfo.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                self._fail(f"corrupt local header of member {name!r} at byte offset {zinfo.header_offset}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = zinfo.header_offset + 30 + name_len + extra_len
            f.seek(start)
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except _NPY_HEADER_ERRORS as exc:
                self._fail(f"member {name!r}: corrupt .npy header at byte offset {start}: {exc}")
            if dtype.hasobject:
                self._fail(f"member {name!r} holds Python objects; refusing to load (no pickle)")
            if any(n < 0 for n in shape):
                self._fail(f"member {name!r}: corrupt .npy header at byte offset {start}: "
                           f"negative shape {shape}")
            # numpy refuses such a shape even when another size is 0
            if math.prod(n for n in shape if n) * dtype.itemsize > sys.maxsize:
                self._fail(f"member {name!r}: corrupt .npy header at byte offset {start}: "
                           f"shape {shape} is past what an array can hold")
            offset = f.tell()
        nbytes = math.prod(shape) * dtype.itemsize  # exact: numpy's int64 product wraps
        if offset - start + nbytes != zinfo.file_size or offset + nbytes > self.file_size:
            self._fail(f"member {name!r} is truncated or corrupt: {nbytes} data bytes expected at "
                       f"byte offset {offset}, member size {zinfo.file_size - (offset - start)}, "
                       f"file size {self.file_size}")
        return shape, fortran, dtype, offset

    def rebuild(self, record, where, params):
        if not isinstance(record, dict):
            self._fail(f"corrupt header: record {where} is not an object")
        kind = record.get("kind")
        if not isinstance(kind, str) or kind not in _KINDS:
            self._fail(f"unknown kind {kind!r} in record {where} (known: {sorted(_KINDS)})")
        config, attrs = record.get("config"), record.get("attrs", {})
        specs, children = record.get("arrays"), record.get("children", [])
        if not isinstance(config, dict) or not isinstance(attrs, dict) or not isinstance(specs, dict) \
                or not isinstance(children, list):
            self._fail(f"corrupt header: record {where} lacks config/attrs/arrays/children")
        arrays = {}
        for name, spec in specs.items():
            member = spec.get("member") if isinstance(spec, dict) else None
            if not isinstance(member, str):
                self._fail(f"corrupt header: array {name!r} of record {where} names no member")
            arr = self.read_member(member, mmap=self.mmap_mode is not None)
            if list(arr.shape) != spec.get("shape") or arr.dtype.str != spec.get("dtype"):
                self._fail(f"member {member!r} has shape {list(arr.shape)} and dtype {arr.dtype.str}, "
                           f"the header says {spec.get('shape')} and {spec.get('dtype')}")
            arrays[name] = arr
        kids = [self.rebuild(c, f"{where}/{i}", None) for i, c in enumerate(children)]
        try:
            return _KINDS[kind][2](config, attrs, arrays, kids, params)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            self._fail(f"record {where} ({kind}) does not match its config: {exc}")


def load(path, mmap_mode=None, *, params=None):
    """Load what :func:`save` wrote.

    Parameters
    ----------
    path : str or os.PathLike
    mmap_mode : {None, "r", "r+", "c"}, default None
        None reads every array into memory. Otherwise the arrays (weights and
        optimizer state) are ``numpy.memmap`` views of the file with this mode (see
        ``numpy.memmap``): with "r+" lookups read only the rows they touch and in-place
        updates (sparse optimizer steps) write only those rows back to the file
        (call ``layer.weight.flush()`` to force them to disk), optimizer state and
        step counts included; state a layer gets only after the load (it had none
        when saved) lives in memory until the next :func:`save`. "r" gives
        read-only tables; "c" is copy-on-write (updates stay in memory).
    params : list of layers, optional
        Only for an optimizer checkpoint: restore into these existing layers (their
        weights are overwritten with the saved ones; shapes and dtypes must match)
        instead of creating new ones.

    Returns
    -------
    The layer or optimizer.

    Raises
    ------
    ValueError
        Not a zip archive, truncated or corrupt file, missing member, unknown
        format_version or kind, an array whose shape or dtype disagrees with the
        configuration, object arrays (no pickle is ever loaded).
    """
    if mmap_mode not in _MMAP_MODES:
        raise ValueError(f"mmap_mode must be one of {_MMAP_MODES}, got {mmap_mode!r}")
    _register_builtin_kinds()
    reader = _Reader(path, mmap_mode)
    try:
        header = reader.header()
        kind = header["root"].get("kind")
        if params is not None and not (isinstance(kind, str) and kind.startswith("optim.")):
            raise ValueError(f"params is for optimizer checkpoints; {reader.path} holds a "
                             f"{kind!r}")
        return reader.rebuild(header["root"], "root", params)
    finally:
        reader.close()
