"""The report's per-concept scores as a plot: inline SVG, one panel per measure, one group
of bars per concept, one bar per method (pure string building, no gradio).

Scaled with a ``viewBox`` so a panel shrinks with its column instead of overflowing it.
"""

from __future__ import annotations

from html import escape
from typing import Any

CHART_MEASURES = (
    ("unet", "UNet error (own prompts)"),
    ("joint_kv", "joint K/V error"),
    ("joint_bleed", "joint bleed"),
)
"""Per-concept fields plotted, each in its own panel (lower is better in all three)."""

METHOD_COLOURS = {
    "loraclr": "#d9822b",
    "least squares": "#6c8ebf",
    "stacked": "#9673a6",
    "average": "#82b366",
}
"""Fixed colours, so a method looks the same in every panel and every merge."""

OTHER_COLOUR = "#999999"
WIDTH = 300
LABEL_WIDTH = 96
BAR_HEIGHT = 7
GROUP_GAP = 8
TOP = 18


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _panel(report: Any, key: str, title: str) -> str:
    """One measure: concepts down, methods' bars across, an axis from min(0, lowest) to
    max(1, highest) with a line at 0."""
    methods = report.methods
    names = [c.concept for c in methods[0].concepts]
    values = [[getattr(m.concepts[i], key) for m in methods] for i in range(len(names))]
    flat = [v for row in values for v in row if _finite(v)]
    low = min([0.0, *flat])
    high = max([1.0, *flat])
    plot = WIDTH - LABEL_WIDTH - 34
    scale = plot / (high - low)
    zero = LABEL_WIDTH + (0 - low) * scale
    group = len(methods) * BAR_HEIGHT + GROUP_GAP
    height = TOP + len(names) * group + 4
    parts = [
        f"<svg class='loraclr-chart' viewBox='0 0 {WIDTH} {height}' role='img' "
        f"aria-label='{escape(title)} per concept'>",
        f"<text x='0' y='11' class='loraclr-chart-title'>{escape(title)}</text>",
        f"<line x1='{zero:.1f}' y1='{TOP - 3}' x2='{zero:.1f}' y2='{height - 2}' "
        "class='loraclr-chart-axis'/>",
    ]
    for i, name in enumerate(names):
        y0 = TOP + i * group
        label_y = y0 + len(methods) * BAR_HEIGHT / 2 + 3
        parts.append(
            f"<text x='0' y='{label_y:.1f}' class='loraclr-chart-label'>{escape(name[:14])}</text>"
        )
        for j, method in enumerate(methods):
            value = values[i][j]
            y = y0 + j * BAR_HEIGHT
            colour = METHOD_COLOURS.get(method.method, OTHER_COLOUR)
            shown = f"{value:.3f}" if _finite(value) else "n/a"
            tip = f"{method.method}, {name}: {shown}"
            if not _finite(value):
                parts.append(
                    f"<text x='{zero + 2:.1f}' y='{y + BAR_HEIGHT - 1}' "
                    f"class='loraclr-chart-value'><title>{escape(tip)}</title>n/a</text>"
                )
                continue
            end = LABEL_WIDTH + (value - low) * scale
            x, w = min(zero, end), abs(end - zero)
            parts.append(
                f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{BAR_HEIGHT - 1}' "
                f"fill='{colour}'><title>{escape(tip)}</title></rect>"
            )
            parts.append(
                f"<text x='{max(zero, end) + 2:.1f}' y='{y + BAR_HEIGHT - 1}' "
                f"class='loraclr-chart-value'>{value:.2f}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def legend(methods: list[str]) -> str:
    """Colour key of the methods, as HTML."""
    items = "".join(
        f"<span class='loraclr-key'><span class='loraclr-swatch' "
        f"style='background:{METHOD_COLOURS.get(m, OTHER_COLOUR)}'></span>{escape(m)}</span>"
        for m in methods
    )
    return f"<div class='loraclr-legend'>{items}</div>"


def concept_chart(report: Any) -> str:
    """Every measure of ``CHART_MEASURES`` that has a number as a panel (a one-concept
    merge has no joint measure), with the method key; empty when there is nothing to plot."""
    if not report.methods or not report.methods[0].concepts:
        return ""
    panels = "".join(
        f"<div class='loraclr-panel'>{_panel(report, key, title)}</div>"
        for key, title in CHART_MEASURES
        if any(_finite(getattr(c, key)) for m in report.methods for c in m.concepts)
    )
    return (
        f"<div class='loraclr-charts'>{legend([m.method for m in report.methods])}"
        f"<div class='loraclr-panels'>{panels}</div></div>"
    )
