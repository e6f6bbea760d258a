"""The report's two pictures, drawn as inline SVG text: a heat map and a line chart. No plotting library, no
script: a browser draws them, and each cell or point carries its numbers in a <title> (the hover text).

    heat_map     rows x columns of numbers, light (low) to dark (high), some cells outlined (the chosen one)
    line_chart   a few series over steps, with vertical marks (the schedule's refreshes)
"""
from __future__ import annotations

import math
from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
LOW, MID, HIGH = (247, 251, 255), (107, 174, 214), (8, 48, 107)  # a sequential blue scale


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def number(x, digits: int = 3) -> str:
    """A short label: number(0.123456) == '0.123', number(1234.5) == '1.23e+03', number(None) == 'n/a'."""
    if not finite(x):
        return "n/a"
    if abs(x) >= 1e3 or (x and abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def shade(t: float) -> str:
    """The colour of t in [0, 1]: shade(0) is near white, shade(1) dark blue."""
    a, b, u = (LOW, MID, 2 * t) if t <= 0.5 else (MID, HIGH, 2 * t - 1)
    return "#" + "".join(f"{round(x + (y - x) * u):02x}" for x, y in zip(a, b))


def heat_map(rows: list[str], cols: list[str], values: dict, *, marked=(), tips: dict | None = None,
             cell: int = 22) -> str:
    """An SVG heat map: values[(row, col)] a number (missing or NaN: grey), rows and cols their labels in
    order; cells in `marked` get a thick outline; tips[(row, col)] is extra hover text."""
    tips = tips or {}
    shown = [v for v in values.values() if finite(v)]
    lo, hi = (min(shown), max(shown)) if shown else (0.0, 1.0)
    left = 12 + 7 * max((len(r) for r in rows), default=1)
    top, width = 22, max(left + cell * len(cols) + 8, left + 200)  # room for the legend
    height = top + cell * len(rows) + 30
    out = [f'<svg class="heat" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    step = max(1, len(cols) // 15)  # column labels thinned out where there are many
    for j, c in enumerate(cols):
        if j % step == 0 or j == len(cols) - 1:
            out.append(f'<text x="{left + cell * j + cell / 2}" y="{top - 6}" text-anchor="middle">'
                       f'{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + cell * i
        out.append(f'<text x="{left - 5}" y="{y + cell * 0.68}" text-anchor="end">{escape(r)}</text>')
        for j, c in enumerate(cols):
            v = values.get((r, c))
            t = (v - lo) / (hi - lo) if finite(v) and hi > lo else 0.5
            fill = shade(t) if finite(v) else "#dddddd"
            tip = f"{r} · {c}: {number(v, 4)}" + (f" · {tips[(r, c)]}" if (r, c) in tips else "")
            edge = ' stroke="#e6550d" stroke-width="3"' if (r, c) in marked else ' stroke="#fff"'
            out.append(f'<rect x="{left + cell * j}" y="{y}" width="{cell}" height="{cell}" fill="{fill}"'
                       f'{edge}><title>{escape(tip)}</title></rect>')
            if cell >= 36 and finite(v):  # room for the number itself
                ink = "#fff" if t > 0.6 else "#222"
                out.append(f'<text x="{left + cell * (j + 0.5)}" y="{y + cell * 0.6}" text-anchor="middle" '
                           f'style="fill: {ink}">{escape(number(v, 2))}</text>')
    y = top + cell * len(rows) + 18
    out.append(f'<text x="{left}" y="{y}">low {escape(number(lo))}</text>'
               f'<rect x="{left + 80}" y="{y - 10}" width="12" height="12" fill="{shade(0)}" stroke="#999"/>'
               f'<rect x="{left + 94}" y="{y - 10}" width="12" height="12" fill="{shade(0.5)}"/>'
               f'<rect x="{left + 108}" y="{y - 10}" width="12" height="12" fill="{shade(1)}"/>'
               f'<text x="{left + 126}" y="{y}">high {escape(number(hi))}</text>')
    out.append("</svg>")
    return "".join(out)


def line_chart(title: str, series: list[tuple[str, list, list]], *, marks=(), width: int = 330,
               height: int = 170) -> str:
    """An SVG chart of series (label, xs, ys) sharing one y axis; non-finite points are left out and a
    dashed vertical line is drawn at each x in `marks`. None when no series has a finite point."""
    pts = [[(x, y) for x, y in zip(xs, ys) if finite(x) and finite(y)] for _, xs, ys in series]
    every = [p for s in pts for p in s]
    if not every:
        return None
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    x1 = x1 if x1 > x0 else x0 + 1
    left, right, top, bottom = 58, 10, 20, 24 + 14 * len(series)
    w, h = width - left - right, height - top - bottom

    def sx(x):
        return left + w * (x - x0) / (x1 - x0)

    def sy(y):
        return top + h * (1 - (y - y0) / (y1 - y0))

    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{left}" y="12" class="title">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4}" text-anchor="end">{escape(number(y))}</text>')
    for x in sorted({x0, x1}):
        out.append(f'<text x="{sx(x)}" y="{top + h + 13}" text-anchor="middle">{escape(number(x))}</text>')
    for x in marks:
        out.append(f'<line x1="{sx(x)}" x2="{sx(x)}" y1="{top}" y2="{top + h}" stroke="#e6550d" '
                   f'stroke-dasharray="4 3"><title>refresh after step {x}</title></line>')
    for k, ((label, _, _), points) in enumerate(zip(series, pts)):
        color = PALETTE[k % len(PALETTE)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        if len(points) > 1:
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for x, y in points if len(points) <= 40 else ():
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}">'
                       f'<title>{escape(label)} at step {number(x)}: {escape(number(y, 4))}</title></circle>')
        ly = top + h + 26 + 14 * k
        out.append(f'<rect x="{left}" y="{ly - 8}" width="10" height="3" fill="{color}"/>'
                   f'<text x="{left + 14}" y="{ly - 3}">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)
