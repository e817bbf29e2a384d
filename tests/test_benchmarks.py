"""The benchmark runner works end to end at tiny sizes (no timing assertions)."""

import json
import os
import subprocess
import sys

import pytest

RUNNER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "run.py")


@pytest.mark.skipif(not os.path.exists(RUNNER), reason="benchmarks/ not in this checkout")
def test_runner_smoke_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    args = [sys.executable, RUNNER, "--smoke", "--json", str(out), "--plot", str(plot)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    assert result["n_threads"] == 2
    names = {row["workload"] for row in result["main"]}
    assert {"forward", "dense_backward", "sparse_fwd_bwd", "dense_fwd_bwd"} <= names
    for row in result["main"]:
        assert row["times_ms"]["sparsembed"] > 0
        assert row["dist"] in ("uniform", "zipf")
        # every peer that ran has a ratio
        peers = set(row["times_ms"]) - {"sparsembed", "fused"}
        assert {f"vs_{p}" for p in peers} <= set(row["ratios"])
    # the dense backward's floors: the streamed write alone and with grad_output's read
    dense = [row for row in result["main"] if row["workload"] == "dense_backward"]
    assert all({"stream_fill", "stream_fill_read"} <= set(row["times_ms"]) for row in dense)
    sys.path.insert(0, os.path.dirname(RUNNER))
    try:
        import report
    finally:
        sys.path.remove(os.path.dirname(RUNNER))
    table = report.main_table(result)
    assert "streamed while reading grad_output in order" in table
    modes = {(r["mode"], r["kind"]) for r in result["bag_modes"]}
    assert modes == {(m, k) for m in ("sum", "mean", "max")
                     for k in ("forward", "dense", "sparse")} - {("max", "sparse")}
    assert all(r["times_ms"]["sparsembed"] > 0 for r in result["bag_modes"])
    assert "max: forward + dense backward" in report.bag_modes_table(result)
    if result["bag_widths"]:  # beside torch: empty without it
        widths = {(r["dtype"], r["D"], r["V"], r["dist"]) for r in result["bag_widths"]}
        assert widths == {(dt, D, V, dist) for dt, D in (("float32", 20), ("float16", 8))
                          for V in (100, 1000) for dist in ("uniform", "zipf")}
        assert all(r["times_ms"]["sparsembed"] > 0 and r["times_ms"]["torch"] > 0
                   for r in result["bag_widths"])
        assert "| float16 | 8 | 1,000 | zipf |" in report.bag_widths_table(result)
    assert result["threads"] and all(t["t1_ms"] > 0 and t["t2_ms"] > 0 for t in result["threads"])
    assert result["scaling"]["vs_B"] and result["scaling"]["vs_V"]
    # each scaling point takes a new batch per call, as a training loop does
    points = result["scaling"]["vs_B"] + result["scaling"]["vs_V"]
    assert all(p["batches"] > 1 and p["times_ms"]["sparsembed"] > 0 for p in points)
    assert "a new batch each call" in report.scaling_table(result)
    assert result["memory"] and all(m["sparse_backward_tracemalloc"] > 0 for m in result["memory"])
    assert "Model name" in result["machine"] or "cpus" in result["machine"]
    pytest.importorskip("matplotlib")
    assert plot.exists() and plot.stat().st_size > 1000


CLIFFS = os.path.join(os.path.dirname(RUNNER), "bench_cliffs.py")


@pytest.mark.skipif(not os.path.exists(CLIFFS), reason="benchmarks/ not in this checkout")
def test_cliffs_smoke_writes_valid_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "cliffs.json"
    proc = subprocess.run([sys.executable, CLIFFS, "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and result["n_threads"] == 2
    assert len(result["cells"]) == 12
    for row in result["cells"]:
        assert row["times_ms"]["sparsembed"] > 0 and row["times_ms"]["torch"] > 0
        assert set(row["ratios"]) == {f"vs_{p}" for p in row["times_ms"] if p != "sparsembed"}
