"""Render a results JSON of ``benchmarks/run.py`` as the Markdown tables of the README.

    python benchmarks/report.py benchmarks/results/latest.json > /tmp/tables.md
"""

import json
import sys

# workload -> (peer the target is about, target ratio, label)
TARGETS = {
    "forward": [("numpy", 0.5, "<= 0.5 x np.take"), ("bound", 2.0, "<= 2 x copyto bound")],
    "dense_backward": [("torch", 0.1, "<= 0.1 x torch")],
    "sparse_fwd_bwd": [("torch", 0.1, "<= 0.1 x torch")],
    "sparse_accumulate": [],
    "dense_fwd_bwd": [],
    "step_sparseadam": [("torch", 0.2, "<= 0.2 x torch")],
    "step_adagrad": [("torch", 0.2, "<= 0.2 x torch")],
    "bag_sum_forward": [("torch", 1.0, "<= 1.0 x torch")],
    "bag_sum_backward": [],
}


def _ms(v):
    return "" if v is None else (f"{v:.1f}" if v >= 1 else f"{v:.2f}")


def _vs_torch(times):
    """sparsembed's and torch's times (ms) of a timed case, and their ratio as text."""
    s, t = times.get("sparsembed"), times.get("torch")
    return s, t, (f"{s / t:.3f}" if s and t else "")


def main_table(result):
    lines = [
        "| workload | D | ids | sparsembed ms | torch ms | numpy ms | bound ms | vs torch | vs numpy | vs bound | fused vs torch | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        # (the dense backward's extra floor, a fill of (V, D), is listed below the table)
    ]
    for row in result["main"]:
        t, r = row["times_ms"], row["ratios"]
        checks = []
        for peer, goal, label in TARGETS.get(row["workload"], []):
            key = f"vs_{peer}"
            if key in r:
                checks.append(f"{label}: {'met' if r[key] <= goal else 'not met'}")
        if "fused_vs_torch" in r:
            checks.append("fused faster: " + ("met" if t["fused"] < t["sparsembed"] else "not met"))
        lines.append(
            f"| {row['workload']} | {row['D']} | {row['dist']} | {_ms(t.get('sparsembed'))} | "
            f"{_ms(t.get('torch'))} | {_ms(t.get('numpy'))} | {_ms(t.get('bound'))} | "
            f"{r.get('vs_torch', float('nan')):.3f} | "
            + (f"{r['vs_numpy']:.3f}" if "vs_numpy" in r else "")
            + " | "
            + (f"{r['vs_bound']:.2f}" if "vs_bound" in r else "")
            + " | "
            + (f"{r['fused_vs_torch']:.3f} ({_ms(t['fused'])} ms)" if "fused_vs_torch" in r else "")
            + f" | {'; '.join(checks)} |"
        )
    fills = []
    for row in result["main"]:
        t = row["times_ms"]
        if row["workload"] != "dense_backward" or "fill" not in t or "torch" not in t:
            continue
        text = f"D={row['D']} {row['dist']}: fill {t['fill']:.1f} ms = {t['fill'] / t['torch']:.3f} x torch"
        if "stream_fill" in t:
            text += (f", streamed {t['stream_fill']:.1f} ms = {t['stream_fill'] / t['torch']:.3f} x torch"
                     f" (ours {t['sparsembed'] / t['stream_fill']:.2f} x it)")
        if "stream_fill_read" in t:
            text += (f", streamed while reading grad_output in order {t['stream_fill_read']:.1f} ms"
                     f" = {t['stream_fill_read'] / t['torch']:.3f} x torch"
                     f" (ours {t['sparsembed'] / t['stream_fill_read']:.2f} x it)")
        fills.append(text)
    if fills:
        lines.append("")
        lines.append("Dense backward floor, writing a preallocated (V, D) array once (`out.fill(0)`, "
                     "and a zero-fill with non-temporal stores), and the streamed fill that also "
                     "reads the (B, D) grad_output once in order (a dense backward's whole "
                     "traffic, no plan): " + "; ".join(fills) + ".")
    floors = [_sparse_floor(row) for row in result["main"] if row["workload"] == "sparse_fwd_bwd"]
    floors = [f for f in floors if f]
    if floors:
        lines.append("")
        lines.append(
            "Sparse forward + backward floor, the data it must move at the machine's "
            "measured bandwidth (the forward's streamed write of the (B, D) output and "
            "read of the U table rows, then the backward's read of the (B, D) grad_output "
            "and streamed write of the (U, D) row sums -- the column indices are one "
            "array shared by every gradient of width D, written once, and the (V + 1) row "
            "pointer is written only when something reads it, which neither a training "
            "loop nor this benchmark does; U distinct ids), from reads and writes fully "
            "overlapped to one after the other, the plan not counted: "
            + "; ".join(floors) + ".")
    return "\n".join(lines)


def sparse_floor_ms(row):
    """Least time of a sparse forward + backward, ``(overlapped, in turn)`` in ms,
    from the row's two bandwidth probes: ``stream_write`` writes one (B, D) array of
    table data, ``seq_read`` reads one. The forward writes the (B, D) output and
    reads the U table rows, the backward reads the (B, D) grad_output and writes the
    (U, D) row sums (its (V + 1) row pointer is written when read: not here).
    ``overlapped`` prices each pass at the larger of its writes and its reads (a
    lower bound: the memory would have to serve both at full speed at once), ``in
    turn`` at their sum (what the data costs when reads and writes do not overlap).
    The plan's own time is not counted."""
    t = row["times_ms"]
    if "stream_write" not in t or "seq_read" not in t or "unique_rows" not in row:
        return None
    B, U = row["B"], row["unique_rows"]
    w, r = t["stream_write"], t["seq_read"]  # per (B, D) float32 array
    rows = U / B
    overlapped = max(w, r * rows) + max(r, w * rows)
    in_turn = (w + r) * (1 + rows)
    return overlapped, in_turn


def _sparse_floor(row):
    floor = sparse_floor_ms(row)
    t = row["times_ms"]
    if floor is None or "torch" not in t:
        return None
    lo, hi = floor
    return (f"D={row['D']} {row['dist']} (U = {row['unique_rows']:,}): {lo:.1f}-{hi:.1f} ms"
            f" = {lo / t['torch']:.3f}-{hi / t['torch']:.3f} x torch (ours "
            f"{t['sparsembed'] / hi:.2f}-{t['sparsembed'] / lo:.2f} x it)")


def bag_modes_table(result):
    rows = result.get("bag_modes") or []
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"| EmbeddingBag (V = {r0['V']:,}, D = {r0['D']}, {r0['n_bags']:,} bags of "
             f"{r0['bag']}, uniform ids) | sparsembed ms | torch ms | vs torch |",
             "|---|---|---|---|"]
    names = {"forward": "forward", "dense": "forward + dense backward",
             "sparse": "forward + sparse backward"}
    for r in rows:
        s, t, ratio = _vs_torch(r["times_ms"])
        lines.append(f"| {r['mode']}: {names[r['kind']]} | {_ms(s)} | {_ms(t)} | {ratio} |")
    return "\n".join(lines)


def bag_widths_table(result):
    rows = result.get("bag_widths") or []
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"| EmbeddingBag sum forward ({r0['n_bags']:,} bags of {r0['bag']}): dtype | D | V "
             "| ids | sparsembed ms | torch ms | vs torch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, t, ratio = _vs_torch(r["times_ms"])
        lines.append(f"| {r['dtype']} | {r['D']} | {r['V']:,} | {r['dist']} | {_ms(s)} | "
                     f"{_ms(t)} | {ratio} |")
    return "\n".join(lines)


def threads_table(result):
    lines = ["| operation (V = 1e6, D = 64, B = 262,144) | 1 thread ms | 2 threads ms | speedup |",
             "|---|---|---|---|"]
    for t in result.get("threads") or []:
        lines.append(f"| {t['op']} | {t['t1_ms']:.1f} | {t['t2_ms']:.1f} | {t['speedup']:.2f}x |")
    return "\n".join(lines)


def memory_table(result):
    lines = ["| V | unique rows | sparse backward peak (tracemalloc) | fused step peak | dense gradient would be |",
             "|---|---|---|---|---|"]
    for m in result.get("memory") or []:
        fused = m.get("fused_step_tracemalloc")
        lines.append(
            f"| {m['V']:,} | {m['unique']:,} | {m['sparse_backward_tracemalloc'] / 2**20:.1f} MiB | "
            + ("" if fused is None else f"{fused / 2**20:.2f} MiB")
            + f" | {m['dense_grad_bytes'] / 2**20:.0f} MiB |"
        )
    return "\n".join(lines)


def scaling_table(result):
    sc = result.get("scaling") or {}
    out = []
    for key, var in (("vs_B", "B"), ("vs_V", "V")):
        pts = sc.get(key) or []
        if not pts:
            continue
        batches = pts[0].get("batches", 1)
        how = f"a new batch each call, {batches} in turn" if batches > 1 else "one batch repeated"
        out.append(f"| {var} ({how}) | workload | sparsembed ms | torch ms | ratio |")
        out.append("|---|---|---|---|---|")
        for p in pts:
            s, t, ratio = _vs_torch(p["times_ms"])
            out.append(f"| {p[var]:,} | {p['workload']} | {_ms(s)} | {_ms(t)} | {ratio} |")
        out.append("")
    return "\n".join(out)


def machine_line(result):
    m = result["machine"]
    return (f"{m.get('Model name', '?')}, {m.get('CPU(s)', m.get('cpus'))} CPUs "
            f"({m.get('Core(s) per socket', '?')} cores/socket, "
            f"{m.get('Thread(s) per core', '?')} thread/core), L2 {m.get('L2 cache', '?')}, "
            f"L3 {m.get('L3 cache', '?')}; Python {m['python']}, numpy {m['numpy']}, "
            f"torch {m.get('torch', '-')}, sparsembed {m['sparsembed']} "
            f"(OpenMP: {m['openmp']}); {result['n_threads']} threads, median of "
            f"{result['repeat']} runs; {result['date_utc']} UTC")


def main(path):
    with open(path) as fh:
        result = json.load(fh)
    print("Machine: " + machine_line(result) + "\n")
    print(main_table(result) + "\n")
    print(bag_modes_table(result) + "\n")
    widths = bag_widths_table(result)
    if widths:
        print(widths + "\n")
    print(threads_table(result) + "\n")
    print(memory_table(result) + "\n")
    print(scaling_table(result))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest.json")
