"""Charts drawn on the server as SVG: no script, no external library, nothing fetched by the
browser. Only presentation attributes (fill, stroke): the CSP forbids inline style."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

WIDTH, HEIGHT = 600, 170
LEFT, RIGHT, TOP, BOTTOM = 40, 8, 12, 24


@dataclass(frozen=True, slots=True)
class Range:
    name: str  # "day" | "week"
    seconds: float
    bucket: float  # seconds per bar
    label_format: str  # strftime of the tick labels
    tick_every: int  # a label every this many bars


RANGES = {
    "day": Range("day", 86400.0, 3600.0, "%H:00", 4),
    "week": Range("week", 7 * 86400.0, 6 * 3600.0, "%m-%d", 4),
}


def bucket_sales(
    sales: Sequence[tuple[float, int]], now: float, chart: Range
) -> list[tuple[float, int]]:
    """(bucket start, units) for each bar of `chart`, oldest first, ending at `now`."""
    count = int(chart.seconds // chart.bucket)
    # Buckets on round boundaries (whole hours), so a bar means the same at every refresh.
    end = math.ceil(now / chart.bucket) * chart.bucket
    start = end - count * chart.bucket
    units = [0] * count
    for at, quantity in sales:
        index = int((at - start) // chart.bucket)
        if 0 <= index < count:
            units[index] += quantity
    return [(start + i * chart.bucket, units[i]) for i in range(count)]


def _nice_top(value: int) -> int:
    """A round axis maximum at or above `value` (1, 2, 5, 10, 20, 50...)."""
    if value <= 1:
        return 1
    magnitude = int(10 ** int(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return int(step * magnitude)
    return 10 * magnitude


def sales_chart(
    buckets: Sequence[tuple[float, int]], chart: Range, title: str, unit_label: str
) -> Markup:
    """Bars of units sold per bucket, with a y axis and time ticks."""
    top = _nice_top(max((u for _, u in buckets), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bar_w = plot_w / max(1, len(buckets))
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" '
        'stroke="#888" stroke-width="1"/>',
    ]
    for fraction in (0.5, 1.0):
        y = TOP + plot_h * (1 - fraction)
        value = top * fraction
        label = f"{value:g}"
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd" '
            'stroke-width="1"/>'
            f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{escape(label)}</text>'
        )
    for index, (start, units) in enumerate(buckets):
        x = LEFT + index * bar_w
        h = plot_h * units / top
        if units:
            when = datetime.fromtimestamp(start).strftime(chart.label_format)
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{TOP + plot_h - h:.1f}"'
                f' width="{max(1.0, bar_w - 2):.1f}"'
                f' height="{h:.1f}" fill="#2f6fb0"><title>{escape(when)}: {units} '
                f"{escape(unit_label)}</title></rect>"
            )
        if index % chart.tick_every == 0:
            label = datetime.fromtimestamp(start).strftime(chart.label_format)
            parts.append(
                f'<text x="{x + 1:.1f}" y="{HEIGHT - 6}" font-size="11" fill="#555">'
                f"{escape(label)}</text>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def runway_bar(
    time_to_empty: float | None,
    lead_time: float,
    title: str,
    empty_label: str,
    lead_label: str,
) -> Markup:
    """How long the stock lasts against the lead time: a bar to the time to empty (red when
    it ends before the lead time is up, so a restock ordered now comes too late) and a marker
    at the lead time. The scale is twice the lead time, the bar capped at its end."""
    width, height, margin = 600, 44, 4
    scale = max(1.0, 2 * lead_time)
    lasting = scale if time_to_empty is None else min(scale, time_to_empty)
    bar = (width - 2 * margin) * lasting / scale
    lead_x = margin + (width - 2 * margin) * lead_time / scale
    short = time_to_empty is not None and time_to_empty < lead_time
    colour = "#c0392b" if short else "#2e8b57"
    return Markup(
        f'<svg class="runway" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
        f'<rect x="{margin}" y="6" width="{width - 2 * margin}" height="16" fill="#eee"/>'
        f'<rect x="{margin}" y="6" width="{bar:.1f}" height="16" fill="{colour}">'
        f"<title>{escape(empty_label)}</title></rect>"
        f'<line x1="{lead_x:.1f}" y1="2" x2="{lead_x:.1f}" y2="26" stroke="#222" '
        'stroke-width="2" stroke-dasharray="4 2"/>'
        f'<text x="{lead_x:.1f}" y="40" text-anchor="middle" font-size="11" fill="#222">'
        f"{escape(lead_label)}</text></svg>"
    )
