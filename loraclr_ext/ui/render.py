"""HTML for the tab: the LoRA list, the result panel with the quality report, messages.

Pure string building (no gradio), everything escaped; element classes are ``loraclr-*``.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from loraclr_ext.ui.chart import concept_chart
from loraclr_ext.ui.service import LoraEntry

REPORT_COLUMNS = (
    ("text_trigger", "text @ trigger"),
    ("unet", "UNet"),
    ("joint_kv", "joint K/V"),
    ("leak", "leak"),
    ("joint_bleed", "joint bleed"),
)
"""Per-method means shown in the report table (lower is better)."""

COLUMN_HELP = (
    (
        "text @ trigger",
        "on held-out prompts naming one concept, how far the text conditioning at its trigger "
        "words is from that concept's LoRA alone: 0 = the same, 1 = as if the LoRA were off.",
    ),
    ("UNet", "the same for the UNet's noise prediction on those prompts."),
    (
        "joint K/V",
        "on prompts naming two concepts together (“A and B in a park”), the same at each "
        "concept's words in the cross-attention keys and values, against its LoRA alone on "
        "that prompt: whether each keeps its identity when named beside another.",
    ),
    (
        "leak",
        "the share of the other LoRAs' effect (all of them applied together) that shows on "
        "a concept's own prompts: "
        "stacking ≈ 1, averaging n LoRAs ≈ 1/n, 0 = none; below 0 = pushed away from them.",
    ),
    (
        "joint bleed",
        "the share of the partner concept's effect that lands on a concept's words in the "
        "two-concept prompts (same scale): the bleeding of faces and outfits into each other.",
    ),
    (
        "base moved",
        "how far prompts naming no concept move from the base model, in units of one LoRA's "
        "own effect on them (0 = untouched).",
    ),
)
"""What each report column means, in words, shown under the table."""


def lora_table(entries: list[LoraEntry], total: int) -> str:
    """The LoRA list: file, architecture, format, rank, triggers and a one-character
    "usable" mark; an incompatible LoRA is greyed out (it is not offered in the selector)
    and its reason takes a row of its own under it, across the whole table, so a long
    reason (it names the file's path) neither squeezes nor wraps the mark's column."""
    if not entries:
        return f"<p class='loraclr-empty'>No LoRA matches ({total} in the Lora folder).</p>"
    rows = []
    for e in entries:
        cls = "loraclr-ok" if e.usable else "loraclr-incompatible"
        mark = "✔" if e.usable else "✖"
        rows.append(
            f"<tr class='{cls}'><td>{escape(e.file)}</td><td>{escape(e.architecture)}</td>"
            f"<td>{escape(e.format)}</td><td>{e.rank if e.rank is not None else '–'}</td>"
            f"<td>{escape(', '.join(e.triggers))}</td>"
            f"<td class='loraclr-usable'>{mark}</td></tr>"
        )
        if not e.usable:
            rows.append(
                f"<tr class='loraclr-reason'><td colspan='{len(LIST_COLUMNS)}'>"
                f"{escape(e.reason or '')}</td></tr>"
            )
    head = "".join(
        f"<th class='loraclr-usable'>{c}</th>" if c == "usable" else f"<th>{c}</th>"
        for c in LIST_COLUMNS
    )
    note = f"<p class='loraclr-count'>{len(entries)} of {total} LoRAs shown.</p>"
    table = f"<table class='loraclr-list'><tr>{head}</tr>{''.join(rows)}</table>"
    return f"{note}{_scroll(table)}"


LIST_COLUMNS = ("file", "architecture", "format", "rank", "triggers", "usable")
"""The LoRA list's column headings."""


PROGRESS_AREA = (
    "<div class='loraclr-progress-area'><div class='loraclr-progress-anchor'></div></div>"
)
"""The progress bar's own place (``#loraclr_progress``): the WebUI's ``requestProgress``
inserts its bar before the anchor, inside this area, which ``style.css`` keeps in the flow
(the WebUI's own CSS positions the bar absolutely, over whatever is above)."""


def message(text: str, *, error: bool = True) -> str:
    cls = "loraclr-error" if error else "loraclr-info"
    return f"<div class='{cls}'>{escape(text)}</div>"


def _bar(value: float, scale: float) -> str:
    """The value over a bar that fills its cell's width in proportion to ``scale`` (the
    column's largest value): the bar is a block inside the cell, so it never overflows."""
    if value != value:  # NaN: a one-concept merge has no joint measure
        return "<span class='loraclr-value'>–</span>"
    share = 0.0 if scale <= 0 else max(0.0, min(value / scale, 1.0)) * 100
    return (
        f"<span class='loraclr-value'>{value:.3f}</span>"
        f"<span class='loraclr-track'><span class='loraclr-bar' "
        f"style='width:{share:.0f}%'></span></span>"
    )


def report_table(report: Any) -> str:
    """Method × (the means of ``REPORT_COLUMNS``, base moved) with a bar under each value,
    scaled to the largest value of its column (lower is better); every column explained
    in words under it, then the per-concept plot (``ui.chart``)."""
    columns = [*REPORT_COLUMNS, ("preservation_unet", "base moved")]
    values = {
        m.method: [
            m.mean(k) if k != "preservation_unet" else m.preservation_unet for k, _ in columns
        ]
        for m in report.methods
    }
    scales = [
        max((v[i] for v in values.values() if v[i] == v[i]), default=1.0)
        for i in range(len(columns))
    ]
    head = "".join(f"<th>{escape(label)}</th>" for _, label in columns)
    rows = []
    for method, vals in values.items():
        cells = "".join(f"<td>{_bar(v, s)}</td>" for v, s in zip(vals, scales, strict=True))
        rows.append(f"<tr><th scope='row'>{escape(method)}</th>{cells}</tr>")
    explained = "".join(
        f"<dt>{escape(label)}</dt><dd>{escape(text)}</dd>" for label, text in COLUMN_HELP
    )
    return (
        _scroll(
            f"<table class='loraclr-report'><thead><tr><th>method</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        + "<p class='loraclr-note'>Means over the concepts; lower is better in every column. "
        "Stacked and average are the usual ways to combine LoRAs; least squares is the merge "
        "without its contrastive term.</p>"
        + f"<dl class='loraclr-help'>{explained}</dl>"
        + concept_chart(report)
    )


STAGE_WORDS = {
    "collect": "recording",
    "solve": "solving",
    "report": "quality report",
    "write": "writing",
    "preview": "preview",
}
"""How the engine's timing keys read in the panel."""


def duration(seconds: float) -> str:
    """``0.4 s``, ``36 s``, ``1 min 51 s``, ``1 h 02 min``."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def stage_times(seconds: dict[str, float]) -> str:
    """``took 2 min 50 s: recording 36 s · solving 7 s · quality report 1 min 51 s · …``"""
    parts = [f"{STAGE_WORDS.get(k, k)} {duration(v)}" for k, v in seconds.items()]
    total = duration(sum(seconds.values()))
    return f"took {total}: " + " · ".join(parts) if parts else ""


def result_panel(result: Any) -> str:
    """File name, the prompt to use, timings and the report."""
    parts = [
        f"<div class='loraclr-result'><p>Saved <b>{escape(result.path.name)}</b> "
        f"in {escape(str(result.path.parent))} (with a {escape(result.path.stem)}.json "
        "sidecar).</p>",
        f"<p>Use: <code>{escape(result.prompt_tag)}</code></p>",
        f"<p class='loraclr-note loraclr-times'>{len(result.layers)} modules; "
        f"{escape(stage_times(result.seconds))}</p>",
        *(f"<p class='loraclr-note'>{escape(note)}</p>" for note in getattr(result, "notes", [])),
    ]
    if getattr(result, "preview", None) is not None:
        parts.append(preview_figure(result.preview))
    elif getattr(result, "preview_note", ""):
        note = escape(result.preview_note)
        parts.append(f"<p class='loraclr-note loraclr-preview-note'>{note}</p>")
    if result.report is not None:
        parts.append(report_table(result.report))
    parts.append("</div>")
    return "".join(parts)


def preview_figure(grid: Any) -> str:
    """The preview grid as an inline PNG with what each image shows and what it cost."""
    data = base64.b64encode(grid.png()).decode("ascii")
    items = "".join(
        f"<li><b>{escape(cell.label)}</b>: <code>{escape(cell.prompt_with_tags())}</code></li>"
        for cell in grid.cells
    )
    return (
        "<figure class='loraclr-preview'>"
        f"<img src='data:image/png;base64,{data}' alt='Preview grid: "
        f"{escape(', '.join(c.label for c in grid.cells))}'>"
        f"<figcaption>Preview, left to right ({escape(grid.summary())}):<ol>{items}</ol>"
        "</figcaption></figure>"
    )


def _scroll(table: str) -> str:
    """Let a wide table scroll inside its column instead of being cut off at its edge."""
    return f"<div class='loraclr-scroll'>{table}</div>"
