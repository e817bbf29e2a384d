import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sparsembed as se
from sparsembed import _rowsparse
from sparsembed import serialization as S

ROOT = Path(__file__).resolve().parents[1]
# the sparsembed under test (installed or in-place build), for subprocesses
PKG_PARENT = str(Path(se.__file__).resolve().parents[1])


def no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def write_raw(path, header, members):
    """A checkpoint written with arbitrary header/members (for the bad-file tests)."""
    with open(path, "wb") as f:
        S._write_archive(f, header, members)


def header_of(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z["__sparsembed__"].tobytes().decode("utf-8"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_roundtrip_without_pickle(tmp_path, monkeypatch, dtype):
    emb = se.Embedding(7, 3, padding_idx=-1, max_norm=1.5, norm_type=float("inf"),
                       scale_grad_by_freq=True, sparse=True, dtype=dtype, random_state=0)
    emb.requires_grad = False
    path = tmp_path / "emb.ckpt"
    se.save(emb, path)
    no_pickle(monkeypatch)
    back = se.load(path)
    assert type(back) is se.Embedding and repr(back) == repr(emb)
    assert back.padding_idx == 6 and back.norm_type == float("inf") and back.sparse
    assert back.requires_grad is False and back.weight.dtype == dtype
    np.testing.assert_array_equal(back.weight, emb.weight)
    assert back.weight.flags.c_contiguous and back.weight.flags.writeable
    assert not np.shares_memory(back.weight, emb.weight)
    # readable by plain numpy, no pickle, and the documented header
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["__sparsembed__", "weight"]
        np.testing.assert_array_equal(z["weight"], emb.weight)
    h = header_of(path)
    assert h["format"] == "sparsembed" and h["format_version"] == 1
    assert h["root"]["kind"] == "Embedding"
    assert h["root"]["config"]["num_embeddings"] == 7 and h["root"]["config"]["dtype"] == np.dtype(dtype).name
    assert h["root"]["arrays"]["weight"] == {"member": "weight.npy", "shape": [7, 3],
                                             "dtype": np.dtype(dtype).str}
    assert os.listdir(tmp_path) == ["emb.ckpt"]


def test_members_are_stored_and_64_byte_aligned(tmp_path):
    path = tmp_path / "e.npz"
    se.save(se.Embedding(33, 5, random_state=1), path)
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
    m = se.load(path, mmap_mode="r")
    assert isinstance(m.weight, np.memmap) and m.weight.offset % 64 == 0


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits and symlinks")
def test_saving_over_a_file_keeps_its_mode_and_a_link_stays_a_link(tmp_path):
    # the atomic rename had replaced a symlink by a regular file and reset the
    # permission bits of a file written over
    target = tmp_path / "run1.npz"
    link = tmp_path / "latest.npz"
    se.save(se.Embedding(5, 2, random_state=0), target)
    os.chmod(target, 0o600)
    link.symlink_to(target.name)
    emb = se.Embedding(5, 2, random_state=1)
    se.save(emb, link)
    assert link.is_symlink() and os.readlink(link) == target.name
    assert (target.stat().st_mode & 0o777) == 0o600
    np.testing.assert_array_equal(se.load(target).weight, emb.weight)
    assert sorted(os.listdir(tmp_path)) == ["latest.npz", "run1.npz"]
    # and the same for word vectors and vocabularies
    sio = pytest.importorskip("sparsembed.io")
    sio.save_word2vec_format(link, ["a"], np.ones((1, 2)))
    assert link.is_symlink() and sio.load_word2vec_format(target)[0].tokens == ["a"]


def test_atomic_save_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    old = se.Embedding(50, 4, random_state=0)
    se.save(old, path)
    before = path.read_bytes()
    real = S._write_member
    calls = []

    def failing(zf, f, name, arr):
        calls.append(name)
        if name == "weight.npy":
            real(zf, f, name, arr[: len(arr) // 2])  # half the data is on disk, then boom
            raise OSError("disk on fire")
        return real(zf, f, name, arr)

    monkeypatch.setattr(S, "_write_member", failing)
    with pytest.raises(OSError, match="disk on fire"):
        se.save(se.Embedding(50, 4, random_state=1), path)
    assert calls == ["__sparsembed__.npy", "weight.npy"]
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]  # no temp file left behind
    monkeypatch.setattr(S, "_write_member", real)
    np.testing.assert_array_equal(se.load(path).weight, old.weight)
    # an unsavable object fails before anything is written
    with pytest.raises(TypeError, match="cannot save"):
        se.save(object(), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.npz"]


def test_not_a_zip_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "e.npz"
    se.save(se.Embedding(40, 8, random_state=0), path)
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"hello, not a zip" * 10)
    with pytest.raises(ValueError, match="not a valid zip"):
        se.load(bad)
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="zip|truncated|corrupt"):
            se.load(bad)
    # flip a byte inside the JSON header member: its CRC check catches it
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("__sparsembed__.npy")
    corrupt = bytearray(data)
    corrupt[info.header_offset + 300] ^= 0x01
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="__sparsembed__"):
        se.load(bad)
    # flip a byte in the weight member's .npy header
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("weight.npy")
    corrupt = bytearray(data)
    magic = corrupt.index(b"\x93NUMPY", info.header_offset)
    corrupt[magic + 1] = ord("X")
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="weight.npy.*corrupt .npy header"):
        se.load(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="not a valid zip"):
        se.load(bad)
    with pytest.raises(ValueError, match="mmap_mode"):
        se.load(path, mmap_mode="w+")
    # a plain npz without our header member
    np.savez(tmp_path / "plain.npz", weight=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no __sparsembed__.npy member"):
        se.load(tmp_path / "plain.npz")


def _corrupted(data, what):
    """``data`` (a checkpoint's bytes) with one field damaged."""
    b = bytearray(data)
    central = b.index(b"PK\x01\x02")  # the first member's central directory entry
    if what == "npy header dict":
        b[b.rindex(b"{'descr'")] = ord("z")  # the last member's .npy header
    elif what == "npy header bracket":
        b[b.rindex(b"(6, 3)") + 5] = ord("]")
    elif what == "compression method":
        b[central + 10] = 1  # "shrunk": zipfile cannot read it
    elif what == "encrypted flag":
        b[central + 8] |= 1
    elif what == "version needed":
        b[central + 6] = 173
    return bytes(b)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("what", ["npy header dict", "npy header bracket", "compression method",
                                  "encrypted flag", "version needed"])
def test_damaged_fields_are_a_value_error(tmp_path, what, mmap_mode):
    # numpy's .npy header parser and zipfile raise TokenError, SyntaxError,
    # NotImplementedError or RuntimeError on these (load's docstring: ValueError)
    path = tmp_path / "e.npz"
    se.save(se.Embedding(6, 3, random_state=0), path)
    path.write_bytes(_corrupted(path.read_bytes(), what))
    with pytest.raises(ValueError, match="corrupt|not a valid zip"):
        se.load(path, mmap_mode=mmap_mode)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_crafted_headers_are_a_value_error(tmp_path, mmap_mode):
    path = tmp_path / "x.npz"
    w = np.ones((4, 3), dtype=np.float32)
    write_raw(path, _good_header(kind=["Embedding"]), [("weight.npy", w)])  # unhashable
    with pytest.raises(ValueError, match=r"unknown kind \['Embedding'\]"):
        se.load(path, mmap_mode=mmap_mode)
    nested = io.BytesIO()  # a header of JSON nested 100,000 deep: RecursionError
    np.save(nested, np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__sparsembed__.npy", nested.getvalue())
    with pytest.raises(ValueError, match="corrupt header"):
        se.load(path, mmap_mode=mmap_mode)
    # a yes/no option the constructor would take as any truthy value
    header = _good_header()
    header["root"]["config"]["sparse"] = "x"
    write_raw(path, header, [("weight.npy", w)])
    with pytest.raises(ValueError, match="sparse must be true or false, got 'x'"):
        se.load(path, mmap_mode=mmap_mode)
    header = _good_header(attrs={"requires_grad": 1})
    write_raw(path, header, [("weight.npy", w)])
    with pytest.raises(ValueError, match="requires_grad must be true or false, got 1"):
        se.load(path, mmap_mode=mmap_mode)
    hashed = se.HashEmbedding(16, 3, mode="weighted", num_weights=8, random_state=0)
    se.save(hashed, path)
    header = header_of(path)
    header["root"]["attrs"]["importance_requires_grad"] = "no"
    write_raw(path, header, [("weight.npy", hashed.weight),
                             ("importance.npy", hashed.importance.weight)])
    with pytest.raises(ValueError, match="importance_requires_grad must be true or false"):
        se.load(path, mmap_mode=mmap_mode)


def _good_header(n=4, d=3, **root_changes):
    root = {"kind": "Embedding",
            "config": {"num_embeddings": n, "embedding_dim": d, "padding_idx": None,
                       "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
                       "sparse": False, "dtype": "float32"},
            "attrs": {"requires_grad": True},
            "arrays": {"weight": {"member": "weight.npy", "shape": [n, d], "dtype": "<f4"}},
            "children": []}
    root.update(root_changes)
    return {"format": "sparsembed", "format_version": 1, "root": root}


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_mismatched_headers_and_members(tmp_path, mmap_mode):
    path = tmp_path / "x.npz"
    w = np.ones((4, 3), dtype=np.float32)
    write_raw(path, _good_header(), [("weight.npy", w)])
    np.testing.assert_array_equal(se.load(path, mmap_mode=mmap_mode).weight, w)

    h = _good_header()
    h["format_version"] = 2
    write_raw(path, h, [("weight.npy", w)])
    with pytest.raises(ValueError, match="unsupported format_version 2"):
        se.load(path, mmap_mode=mmap_mode)
    h = _good_header()
    h["format"] = "other"
    write_raw(path, h, [("weight.npy", w)])
    with pytest.raises(ValueError, match="not a sparsembed checkpoint"):
        se.load(path, mmap_mode=mmap_mode)

    write_raw(path, _good_header(), [])
    with pytest.raises(ValueError, match="missing member 'weight.npy'"):
        se.load(path, mmap_mode=mmap_mode)
    # config says 5 rows, the array (and its header entry) has 4
    h = _good_header(5)
    h["root"]["arrays"]["weight"]["shape"] = [4, 3]
    write_raw(path, h, [("weight.npy", w)])
    with pytest.raises(ValueError, match=r"does not match its config.*\(4, 3\).*\(5, 3\)"):
        se.load(path, mmap_mode=mmap_mode)
    # header entry disagrees with the member
    write_raw(path, _good_header(5), [("weight.npy", w)])
    with pytest.raises(ValueError, match=r"member 'weight.npy' has shape \[4, 3\].*\[5, 3\]"):
        se.load(path, mmap_mode=mmap_mode)
    write_raw(path, _good_header(), [("weight.npy", w.astype(np.float64))])
    with pytest.raises(ValueError, match="dtype"):
        se.load(path, mmap_mode=mmap_mode)
    write_raw(path, _good_header(kind="Nope"), [("weight.npy", w)])
    with pytest.raises(ValueError, match="unknown kind 'Nope'"):
        se.load(path, mmap_mode=mmap_mode)
    h = _good_header()
    h["root"]["config"]["padding_idx"] = 17
    write_raw(path, h, [("weight.npy", w)])
    with pytest.raises(ValueError, match="padding_idx 17"):
        se.load(path, mmap_mode=mmap_mode)
    h = _good_header()
    h["root"]["config"]["bogus"] = 1
    write_raw(path, h, [("weight.npy", w)])
    with pytest.raises(ValueError, match="bogus"):
        se.load(path, mmap_mode=mmap_mode)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__sparsembed__.npy", b"garbage")
    with pytest.raises(ValueError, match="__sparsembed__"):
        se.load(path, mmap_mode=mmap_mode)


@pytest.mark.parametrize("replacement", ["smaller", "F-order"])
@pytest.mark.parametrize("inside_optimizer", [False, True])
def test_save_refuses_a_layer_whose_table_was_replaced(tmp_path, replacement, inside_optimizer):
    # it wrote the checkpoint (over the good one) and load refused it
    path = tmp_path / "m.npz"
    emb = se.Embedding(5, 2, sparse=True, random_state=0)
    obj = se.optim.Adagrad([emb], lr=0.1) if inside_optimizer else emb
    se.save(obj, path)
    before = path.read_bytes()
    emb.weight = (np.zeros((4, 2), np.float32) if replacement == "smaller"
                  else np.asfortranarray(np.zeros((5, 2), np.float32)))
    with pytest.raises(ValueError, match=r"Embedding.weight (has shape \(4, 2\)|must be a "
                                         r"C-contiguous)"):
        se.save(obj, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    write_raw(path, _good_header(), [])
    with zipfile.ZipFile(path, "a") as zf:
        with zf.open("weight.npy", "w") as m:
            np.lib.format.write_array(m, np.array([[object()] * 3] * 4, dtype=object), allow_pickle=True)
    for mode in (None, "r"):
        with pytest.raises(ValueError, match="weight.npy"):
            se.load(path, mmap_mode=mode)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_member_shorter_than_its_npy_header_says(tmp_path, mmap_mode):
    path = tmp_path / "t.npz"
    write_raw(path, _good_header(100, 16), [])
    full = np.zeros((100, 16), np.float32)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("weight.npy", S._npy_header(full) + full[:50].tobytes())
    with pytest.raises(ValueError, match="'weight.npy' is truncated or corrupt: 6400 data bytes expected"):
        se.load(path, mmap_mode=mmap_mode)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("shape, message", [
    # a byte count past 2**64 wrapped to the 16 bytes stored (numpy's int64 product)
    ((2 ** 62 + 1, 4), r"shape \(4611686018427387905, 4\) is past what an array can hold"),
    ((2 ** 32, 2 ** 30), r"shape \(4294967296, 1073741824\) is past"),
    # a byte count within reach, but not in the file
    ((2 ** 40, 4), "17592186044416 data bytes expected"),
    # two negative sizes multiply to the 4 floats stored
    ((-4, -1), r"corrupt .npy header at byte offset \d+: negative shape \(-4, -1\)"),
    # no data at all, and a size numpy cannot shape
    ((0, 2 ** 70), r"shape \(0, 1180591620717411303424\) is past what an array can hold"),
])
def test_member_whose_npy_header_claims_an_impossible_shape(tmp_path, mmap_mode, shape, message):
    path = tmp_path / "t.npz"
    write_raw(path, _good_header(*shape), [])
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("weight.npy", buf.getvalue() + np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(ValueError, match="'weight.npy'.*" + message):
        se.load(path, mmap_mode=mmap_mode)


def test_saving_over_the_file_it_is_mapped_from_is_refused(tmp_path):
    # after load(mmap_mode="r+") steps write the file in place; a save over it would
    # rename a new file onto the path and leave the mapped arrays on the old one, so
    # later steps would silently never reach the checkpoint
    path = tmp_path / "live.ckpt"
    emb = se.Embedding(8, 2, sparse=True, random_state=0)
    se.save(se.optim.Adagrad([emb], lr=0.5), path)
    opt = se.load(path, mmap_mode="r+")
    layer = opt.param_groups[0]["params"][0]
    before = path.read_bytes()
    for obj in (opt, layer):
        with pytest.raises(ValueError, match="mapped from .*live.ckpt .*another path"):
            se.save(obj, path)
        with pytest.raises(ValueError, match="mapped from"):
            se.save(obj, str(tmp_path / "." / "live.ckpt"))  # the same file, spelt otherwise
    assert path.read_bytes() == before
    # another path is fine, and training goes on in the mapped file
    se.save(opt, tmp_path / "copy.ckpt")
    layer(np.array([1, 2]))
    layer.backward(np.ones((2, 2), np.float32))
    opt.step()
    layer.weight.flush()
    np.testing.assert_array_equal(se.load(path).param_groups[0]["params"][0].weight,
                                  layer.weight)
    # read-only and copy-on-write maps never write the file: saving over it is allowed
    for mode in ("r", "c"):
        se.save(se.load(path, mmap_mode=mode), path)


def test_mmap_r_plus_lookups_and_sparse_updates_persist(tmp_path):
    path = tmp_path / "big.npz"
    emb = se.Embedding(1000, 8, sparse=True, random_state=0)
    original = emb.weight.copy()
    se.save(emb, path)
    m = se.load(path, mmap_mode="r+")
    assert isinstance(m.weight, np.memmap) and m.weight.filename == str(path.resolve())
    ids = np.array([[3, 999], [3, 10]])
    out = m(ids)
    np.testing.assert_array_equal(out, original[ids])
    g = m.backward(np.ones_like(out))
    rows, vals = _rowsparse.row_values(g)
    np.testing.assert_array_equal(rows, [3, 10, 999])
    m.weight[rows] -= 0.5 * vals  # a sparse row update, in place on the file
    m.weight.flush()
    del m
    back = se.load(path)
    expected = original.copy()
    expected[[3, 10, 999]] -= 0.5 * np.array([[2] * 8, [1] * 8, [1] * 8], dtype=np.float32)
    np.testing.assert_array_equal(back.weight, expected)
    # the member's zip CRC is now stale (by design, see the format notes); se.load
    # still reads it, with or without mmap
    again = se.load(path, mmap_mode="r")
    np.testing.assert_array_equal(again.weight, expected)
    assert not again.weight.flags.writeable
    # copy-on-write: changes stay in memory
    c = se.load(path, mmap_mode="c")
    c.weight[0] = 42
    np.testing.assert_array_equal(se.load(path, mmap_mode="r").weight[0], expected[0])


def test_embedding_uses_a_memmap_weight_as_is(tmp_path):
    mm = np.memmap(tmp_path / "w.f32", dtype=np.float32, mode="w+", shape=(500, 4))
    mm[:] = np.arange(2000, dtype=np.float32).reshape(500, 4)
    emb = se.Embedding(500, 4, padding_idx=0, sparse=True, weight=mm)
    assert emb.weight is mm and isinstance(emb.weight, np.memmap)
    assert emb.weight[0, 1] == 1  # padding row not zeroed (torch's _weight)
    np.testing.assert_array_equal(emb(np.array([5, 6])), mm[[5, 6]])
    pre = se.Embedding.from_pretrained(mm)
    assert np.shares_memory(pre.weight, mm)
    g = emb.backward(np.ones((2, 4), np.float32))
    rows, vals = _rowsparse.row_values(g)
    emb.weight[rows] -= vals
    mm.flush()
    on_disk = np.fromfile(tmp_path / "w.f32", dtype=np.float32).reshape(500, 4)
    np.testing.assert_array_equal(on_disk[5], [19, 20, 21, 22])
    np.testing.assert_array_equal(on_disk[7], [28, 29, 30, 31])


HAS_OPTIM = hasattr(se, "optim") and hasattr(getattr(se, "optim", None), "Adagrad")


@pytest.mark.parametrize("how", [
    ["--optimizer", "manual"],
    pytest.param(["--optimizer", "sgd", "--fused"], marks=pytest.mark.skipif(not HAS_OPTIM, reason="no se.optim")),
    pytest.param(["--optimizer", "adagrad", "--fused"], marks=pytest.mark.skipif(not HAS_OPTIM, reason="no se.optim")),
], ids=["manual", "sgd-fused", "adagrad-fused"])
def test_small_scale_training_touches_only_needed_rows(tmp_path, how):
    """bench_memmap at 64 MB: resident memory and disk blocks stay far below the table."""
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_PARENT] + sys.path))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memmap.py"), "--size-gb", "0.064",
                    "--steps", "5", "--warmup", "1", "--batch", "64", "--threads", "1",
                    "--dir", str(tmp_path), "--json", str(out)] + how,
                   check=True, env=env, capture_output=True, timeout=120)
    r = json.loads(out.read_text())
    assert r["optimizer"] == {"manual": "manual", "sgd": "SGD (fused)", "adagrad": "Adagrad (fused)"}[how[1]]
    size = r["size_bytes"]
    assert size == 64_000_000
    assert r["peak_rss_bytes"] - r["baseline_rss_bytes"] < size / 4
    assert r["anon_after_step_max_bytes"] - r["baseline_anon_bytes"] < size / 4
    # only the touched pages were written (Adagrad: in the table and its accumulator file)
    assert r["disk_blocks_bytes_after"] < size / 8
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the table file is removed


# -- optimizers (se.optim) --------------------------------------------------------------
needs_optim = pytest.mark.skipif(not hasattr(se, "optim") or not hasattr(getattr(se, "optim", None), "Adagrad"),
                                 reason="se.optim is not in this build")


def _train(layers, opt, steps, seed):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for layer in layers:
            if isinstance(layer, (se.HashEmbedding, se.Embedding)):
                ids = rng.integers(0, layer.num_embeddings, size=6)
                out = layer(ids)
                layer.backward(np.sin(out) + 0.1)
            elif isinstance(layer, se.EmbeddingBag):
                out = layer(rng.integers(0, layer.num_embeddings, size=(3, 4)))
                layer.backward(np.sin(out) + 0.1)
        opt.step()
        opt.zero_grad()


def _optimizers():
    return [
        ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
        ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
        ("SparseAdam", dict(lr=0.01, betas=(0.8, 0.99))),
        ("RowWiseAdagrad", dict(lr=0.1)),
    ]


@needs_optim
@pytest.mark.parametrize("name, hyper", _optimizers())
def test_optimizer_checkpoint_resumes_exactly(tmp_path, name, hyper):
    cls = getattr(se.optim, name)

    def make():
        a = se.Embedding(50, 4, sparse=True, random_state=0)
        b = se.HashEmbedding(30, 4, mode="weighted", sparse=True, random_state=1)
        c = se.EmbeddingBag(20, 4, mode="mean", sparse=True, random_state=2)
        return [a, b, b.importance, c]

    layers = make()
    opt = cls([{"params": layers[:1]}, {"params": layers[1:], "lr": 0.05}], **hyper)
    _train(layers, opt, 3, seed=0)
    path = tmp_path / "ckpt.npz"
    se.save(opt, path)
    h = header_of(path)["root"]
    assert h["kind"] == f"optim.{name}" and len(h["children"]) == 4
    assert h["children"][2] == {"kind": "HashImportance", "config": {"owner": 1}, "attrs": {},
                                "arrays": {}, "children": []}
    assert h["children"][3]["kind"] == "EmbeddingBag"
    # reference: keep training the original
    _train(layers, opt, 2, seed=1)
    # 1) rebuild everything from the file
    opt2 = se.load(path)
    assert type(opt2) is cls
    layers2 = [l for g in opt2.param_groups for l in g["params"]]
    assert layers2[2] is layers2[1].importance
    assert opt2.param_groups[1]["lr"] == 0.05
    _train(layers2, opt2, 2, seed=1)
    for l1, l2 in zip(layers, layers2):
        np.testing.assert_array_equal(l1.weight, l2.weight)
    # 2) restore into live layers
    live = make()
    opt3 = se.load(path, params=live)
    assert [l for g in opt3.param_groups for l in g["params"]] == live
    _train(live, opt3, 2, seed=1)
    for l1, l3 in zip(layers, live):
        np.testing.assert_array_equal(l1.weight, l3.weight)


def _saved_and_mapped(tmp_path, optimizer, steps):
    """A layer trained ``steps`` steps by ``optimizer`` (lr 0.1), the optimizer saved,
    and the file loaded with mmap_mode="r+": (layer, optimizer, path, the mapped
    optimizer, its layer)."""
    emb = se.Embedding(40, 3, sparse=True, random_state=0)
    opt = optimizer([emb], lr=0.1)
    _train([emb], opt, steps, seed=0)
    path = tmp_path / "a.npz"
    se.save(opt, path)
    m = se.load(path, mmap_mode="r+")
    return emb, opt, path, m, m.param_groups[0]["params"][0]


@needs_optim
def test_optimizer_checkpoint_mmap_and_bad_params(tmp_path):
    emb, opt, path, m, layer = _saved_and_mapped(tmp_path, se.optim.Adagrad, 2)
    assert isinstance(layer.weight, np.memmap) and isinstance(m.state[0]["sum"], np.memmap)
    _train([layer], m, 1, seed=5)
    _train([emb], opt, 1, seed=5)
    layer.weight.flush()
    m.state[0]["sum"].flush()
    del m, layer
    again = se.load(path)
    np.testing.assert_array_equal(again.param_groups[0]["params"][0].weight, emb.weight)
    np.testing.assert_array_equal(again.state[0]["sum"], opt.state[0]["sum"])
    with pytest.raises(ValueError, match="params has 2 layers, the checkpoint holds 1"):
        se.load(path, params=[se.Embedding(40, 3), se.Embedding(40, 3)])
    wrong = se.Embedding(41, 3, sparse=True)
    before = wrong.weight.copy()
    with pytest.raises(ValueError, match=r"params\[0\] is a Embedding with weight \(41, 3\)"):
        se.load(path, params=[wrong])
    np.testing.assert_array_equal(wrong.weight, before)
    # an optimizer over a bare importance table cannot be saved without its owner
    h = se.HashEmbedding(10, 2, mode="weighted")
    with pytest.raises(TypeError, match="importance"):
        se.save(se.optim.SGD([h.importance], lr=0.1), tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


@needs_optim
@pytest.mark.parametrize("fused", [False, True])
def test_training_on_a_mapped_checkpoint_keeps_its_step_counts(tmp_path, fused):
    # the step counts lived in the JSON header only: after training on the mapped
    # file, reloading it gave step 1 beside moments of step 4 (SparseAdam's bias
    # correction, Adagrad's lr_decay went wrong from there)
    emb, opt, path, m, layer = _saved_and_mapped(tmp_path, se.optim.SparseAdam, 1)
    rng = np.random.default_rng(3)
    for _ in range(3):
        ids = rng.integers(0, 40, size=6)
        for lay, o in ((layer, m), (emb, opt)):
            out = lay(ids)
            if fused:
                lay.backward(np.sin(out), optimizer=o)
            else:
                lay.backward(np.sin(out))
                o.step()
                o.zero_grad()
    assert m.state[0]["step"] == opt.state[0]["step"] == 4
    del m, layer
    again = se.load(path)  # what a restart after the training finds in the file
    assert again.state[0]["step"] == 4
    resumed = again.param_groups[0]["params"][0]
    _train([resumed], again, 1, seed=9)
    _train([emb], opt, 1, seed=9)
    np.testing.assert_array_equal(resumed.weight, emb.weight)
    # a mapped optimizer given other state no longer writes to the file
    m = se.load(path, mmap_mode="r+")
    m.load_state_dict(opt.state_dict())
    _train([m.param_groups[0]["params"][0]], m, 1, seed=1)
    del m
    assert se.load(path).state[0]["step"] == 4


def test_params_with_a_layer_checkpoint_is_an_error(tmp_path):
    # params was ignored without a word
    path = tmp_path / "e.npz"
    se.save(se.Embedding(4, 2), path)
    with pytest.raises(ValueError, match="params is for optimizer checkpoints; .* holds a "
                                         "'Embedding'"):
        se.load(path, params=[se.Embedding(4, 2)])


@needs_optim
def test_checkpoint_without_step_arrays_loads(tmp_path):
    # files written before the step counts were also arrays: the header's count
    emb = se.Embedding(10, 2, sparse=True, random_state=0)
    opt = se.optim.Adagrad([emb], lr=0.1)
    _train([emb], opt, 2, seed=0)
    root = S._build(opt, "", members := [])
    del root["arrays"]["state/0/step"]
    members = [(name, arr) for name, arr in members if name != "state/0/step.npy"]
    path = tmp_path / "old.npz"
    write_raw(path, {"format": "sparsembed", "format_version": 1, "root": root}, members)
    back = se.load(path)
    assert back.state[0]["step"] == 2
    np.testing.assert_array_equal(back.state[0]["sum"], opt.state[0]["sum"])


@pytest.mark.parametrize("mmap_mode", [None, "r+"])
def test_embedding_bag_roundtrip(tmp_path, mmap_mode, monkeypatch):
    bag = se.EmbeddingBag(20, 3, max_norm=2.0, mode="max", sparse=True, include_last_offset=True,
                          padding_idx=4, dtype=np.float64, random_state=0)
    path = tmp_path / "bag.npz"
    se.save(bag, path)
    no_pickle(monkeypatch)
    back = se.load(path, mmap_mode=mmap_mode)
    assert type(back) is se.EmbeddingBag and repr(back) == repr(bag)
    assert back.mode == "max" and back.include_last_offset and back.padding_idx == 4
    assert isinstance(back.weight, np.memmap) == (mmap_mode is not None)
    np.testing.assert_array_equal(back.weight, bag.weight)
    ids, offsets = np.array([1, 2, 4, 7, 7]), np.array([0, 2, 5])
    np.testing.assert_array_equal(back(ids, offsets), bag(ids, offsets))
    assert header_of(path)["root"]["config"]["mode"] == "max"
