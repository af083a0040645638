"""A Chrome trace (the planner's `--trace` JSON) drawn as a standalone SVG: one row per (process, thread),
one bar per complete event, coloured by category. For reading a schedule where Perfetto is not at hand."""

from __future__ import annotations

from html import escape

COLORS = {"compute": "#4c78a8", "sram": "#bab0ac", "transfer": "#f58518", "pipeline": "#54a24b"}
ROW_H, LABEL_W, PLOT_W = 16, 300, 1100


def trace_svg(trace: dict, pids: list[int] | None = None, until_us: float | None = None, from_us: float = 0.0) -> str:
    """SVG of `trace`'s complete events for the processes `pids` (default: all), from `from_us` to `until_us`
    (default: the last event's end)."""
    events = [e for e in trace["traceEvents"] if e["ph"] == "X" and (pids is None or e["pid"] in pids)]
    events = [e for e in events if e["ts"] + e["dur"] > from_us and (until_us is None or e["ts"] < until_us)]
    if not events:
        raise ValueError("nothing to draw: the trace has no complete events for those processes")
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    rows = sorted(
        {(e["pid"], e["tid"]) for e in events}, key=lambda r: ((pids or []).index(r[0]) if pids else r[0], r[1])
    )
    end = until_us or max(e["ts"] + e["dur"] for e in events)
    scale = PLOT_W / (end - from_us)
    height = ROW_H * (len(rows) + 4)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_W + PLOT_W + 20}" height="{height}" '
        'font-family="sans-serif" font-size="10">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for i, (pid, tid) in enumerate(rows):
        y = ROW_H * (i + 1)
        label = f"{procs.get(pid, pid)} / {names.get((pid, tid), tid)}"
        out.append(f'<text x="4" y="{y + 11}">{escape(label[:60])}</text>')
        out.append(f'<line x1="{LABEL_W}" x2="{LABEL_W + PLOT_W}" y1="{y + ROW_H}" y2="{y + ROW_H}" stroke="#eee"/>')
    index = {r: i for i, r in enumerate(rows)}
    for e in events:
        begin = max(e["ts"], from_us)  # a bar that started before the window is drawn from its edge
        x = LABEL_W + (begin - from_us) * scale
        w = max(0.5, (min(e["ts"] + e["dur"], end) - begin) * scale)
        y = ROW_H * (index[(e["pid"], e["tid"])] + 1) + 2
        color = COLORS.get(e.get("cat", ""), "#999")
        out.append(
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW_H - 4}" fill="{color}" fill-opacity="0.8">'
            f"<title>{escape(e['name'])}: {e['ts']:.2f} us + {e['dur']:.3f} us</title></rect>"
        )
    y = ROW_H * (len(rows) + 2)
    for k in range(11):
        x = LABEL_W + PLOT_W * k / 10
        out.append(f'<text x="{x:.0f}" y="{y}" text-anchor="middle">{from_us + (end - from_us) * k / 10:.1f} us</text>')
    legend = "  ".join(f"{c}" for c in COLORS)
    out.append(
        f'<text x="4" y="{y}">{escape(legend)}: blue compute, grey SRAM read, orange transfer, green pipeline</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
