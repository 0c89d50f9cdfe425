"""SVG charts drawn on the server: no chart library, no script, readable without either.
Colours come from the stylesheet (classes), so the page's content policy allows them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from markupsafe import Markup


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # class of its bars and legend swatch
    values: list[float]


def nice_step(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^n at or above value, never below 1 (counts of requests
    and tokens are whole), so axis ticks land on round numbers."""
    if value <= 1:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exp >= value and (step != 2.5 or exp >= 10):
            return float(step * exp)
    return float(10 * exp)


def _fmt(v: float) -> str:
    if v >= 1_000_000:
        return f"{v / 1_000_000:g}M"
    if v >= 1_000:
        return f"{v / 1_000:g}k"
    return f"{v:g}"


def stacked_bars(labels: list[str], series: list[Series], *, title: str, unit: str,
                 width: int = 1000, height: int = 260) -> Markup:
    """Vertical bars, one per label, each stacked from the series in order."""
    left, right, top, bottom = 48, 8, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s.values[i] for s in series) for i in range(len(labels))]
    ticks = 4
    ymax = ticks * nice_step(max(totals, default=0) / ticks)
    n = max(1, len(labels))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.7)
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
           f"<title>{escape(title)}</title>"]
    for k in range(ticks + 1):  # gridlines and y labels
        v = ymax * k / ticks
        y = top + plot_h - plot_h * k / ticks
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    every = max(1, math.ceil(n / 10))  # at most ~10 x labels
    for i, label in enumerate(labels):
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h
        parts = []
        for s in series:
            v = s.values[i]
            h = plot_h * v / ymax
            if h > 0:
                y -= h
                out.append(f'<rect class="{s.css}" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                           f'height="{h:.1f}"/>')
            parts.append(f"{s.name} {v:,.0f}")
        out.append(f'<rect class="hit" x="{left + i * slot:.1f}" y="{top}" width="{slot:.1f}" '
                   f'height="{plot_h}"><title>{escape(label)}: {escape(", ".join(parts))} '
                   f'{escape(unit)}</title></rect>')
        if i % every == 0:
            out.append(f'<text class="axis" x="{left + i * slot + slot / 2:.1f}" '
                       f'y="{height - 8}" text-anchor="middle">{escape(label)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def horizontal_bars(rows: list[tuple[str, float]], *, title: str, unit: str, css: str = "bar-a",
                    width: int = 520) -> Markup:
    """One labelled bar per row, longest first: for per-model and per-key totals."""
    row_h, label_w, value_w = 26, 200, 70
    height = max(1, len(rows)) * row_h + 8
    vmax = max((v for _, v in rows), default=0) or 1
    plot_w = width - label_w - value_w
    out = [f'<svg class="chart bars" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
           f"<title>{escape(title)}</title>"]
    if not rows:
        out.append(f'<text class="axis" x="{width / 2}" y="20" text-anchor="middle">No usage '
                   f'in this range</text>')
    for i, (label, v) in enumerate(rows):
        y = 4 + i * row_h
        shown = label if len(label) <= 28 else label[:27] + "…"
        w = max(1.0, plot_w * v / vmax) if v else 0
        out.append(f'<text class="label" x="{label_w - 8}" y="{y + 17}" text-anchor="end">'
                   f'{escape(shown)}</text>')
        out.append(f'<rect class="{css}" x="{label_w}" y="{y + 4}" width="{w:.1f}" '
                   f'height="{row_h - 8}"><title>{escape(label)}: {v:,.0f} {escape(unit)}'
                   f'</title></rect>')
        out.append(f'<text class="value" x="{label_w + w + 6:.1f}" y="{y + 17}">{v:,.0f}</text>')
    out.append("</svg>")
    return Markup("".join(out))


@dataclass(frozen=True)
class Line:
    name: str
    css: str  # class of its stroke, markers and legend swatch
    points: list[tuple[float, float]]  # (x, y), x ascending
    markers: bool = False  # a dot on every point (few points, e.g. once per epoch)


def _round_step(value: float) -> float:
    """As nice_step, for fractional values too (a loss of 0.03 gets ticks of 0.01)."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exp >= value * (1 - 1e-9):
            return step * exp
    return 10 * exp


def line_chart(lines: list[Line], *, title: str, x_name: str, y_name: str,
               x_max: float | None = None, width: int = 1000, height: int = 300,
               font: int = 13, x_ticks: int = 8, css: str = "wide") -> Markup:
    """Lines over a shared x axis from 0 (steps) and y axis from 0 (losses); every point has a
    tooltip with its exact value. The caller says so in words when there is nothing to draw.
    `font` is the labels' size in the drawing's units (the stylesheet sets the same for `css`),
    so a narrow drawing for phones can have labels that stay readable when it is scaled down."""
    left, right, top, bottom = round(font * 4.4), round(font * 1.2), font, round(font * 3.2)
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for line in lines for x, _ in line.points]
    ys = [y for line in lines for _, y in line.points]
    ystep = _round_step(max(ys, default=0) / 4)
    ticks = max(1, math.ceil(max(ys, default=0) / ystep - 1e-9))  # 3 or 4 lines, tight above
    ymax = ticks * ystep
    xstep = nice_step(max(max(xs, default=0), x_max or 0) / x_ticks)
    xmax = xstep * math.ceil(max(max(xs, default=0), x_max or 0, 1) / xstep)

    def sx(x: float) -> float:
        return left + plot_w * x / xmax

    def sy(y: float) -> float:
        return top + plot_h - plot_h * min(y, ymax) / ymax

    out = [f'<svg class="chart lines {css}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
           f"<title>{escape(title)}</title>"]
    for k in range(ticks + 1):
        v = ystep * k
        y = sy(v)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{left - font / 2:.1f}" y="{y + font * .35:.1f}" '
                   f'text-anchor="end">{v:.4g}</text>')
    x = 0.0
    while x <= xmax + 1e-9:
        out.append(f'<text class="axis" x="{sx(x):.1f}" y="{top + plot_h + font * 1.4:.1f}" '
                   f'text-anchor="middle">{x:g}</text>')
        x += xstep
    out.append(f'<text class="axis" x="{left + plot_w / 2:.1f}" y="{height - font * .3:.1f}" '
               f'text-anchor="middle">{escape(x_name)}</text>')
    mid = top + plot_h / 2
    out.append(f'<text class="axis" x="{font}" y="{mid:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 {font} {mid:.1f})">{escape(y_name)}</text>')
    for line in lines:
        if len(line.points) > 1:
            pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line.points)
            out.append(f'<polyline class="line {line.css}" points="{pts}">'
                       f'<title>{escape(line.name)}</title></polyline>')
        dots = line.markers or len(line.points) <= 60 or len(line.points) == 1
        radius = (4 if line.markers else 3) * font / 13
        for x, y in line.points:
            tip = f"{escape(line.name)}, {escape(x_name)} {x:g}: {y:.4f}"
            out.append(f'<circle class="{"dot" if dots else "hit-dot"} {line.css}" '
                       f'cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius:.1f}">'
                       f'<title>{tip}</title></circle>')
    out.append("</svg>")
    return Markup("".join(out))
