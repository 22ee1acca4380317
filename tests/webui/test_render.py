"""The result panel's text and the report table's HTML (no browser: test_browser.py
checks how they lay out)."""

from __future__ import annotations

import re
from html import escape

import pytest

from loraclr_ext.ui import render


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (0.42, "0.4 s"),
        (9.94, "9.9 s"),
        (35.587, "36 s"),
        (110.758, "1 min 51 s"),
        (120.2, "2 min"),
        (3725, "1 h 02 min"),
    ],
)
def test_durations_in_words(seconds, words):
    assert render.duration(seconds) == words


def test_stage_times_in_words():
    seconds = {"collect": 35.587, "solve": 6.654, "report": 110.758, "write": 16.635}
    assert render.stage_times(seconds) == (
        "took 2 min 50 s: recording 36 s · solving 6.7 s · quality report 1 min 51 s · writing 17 s"
    )


def report(joint=True):
    """A real report of two methods on two concepts (values chosen to check the scaling)."""
    from loraclr_ext.report.quality import ConceptScore, MethodScores, QualityReport

    def scores(value, bleed):
        extra = {"joint_kv": value, "joint_own": 1.0, "joint_bleed": bleed} if joint else {}
        return [ConceptScore(f"c{i}", value, value, value, value, **extra) for i in range(2)]

    return QualityReport(
        [
            MethodScores("loraclr", scores(1.0, -0.25), 0.5, 0.5),
            MethodScores("least squares", scores(0.5, 0.75), 0.25, 0.25),
        ]
    )


def test_report_bars_are_shares_of_their_cell():
    html = render.report_table(report())
    table = html[: html.index("</table>")]
    assert "width:50%" in table and "width:100%" in table and "px" not in table
    assert "<th scope='row'>least squares</th>" in table and "base moved" in table
    assert "joint bleed" in table and "joint K/V" in table


def test_every_report_column_is_explained_in_words():
    html = render.report_table(report())
    header = html[html.index("<thead>") : html.index("</thead>")]
    explained = html[html.index("<dl") : html.index("</dl>")]
    for label in re.findall(r"<th>([^<]+)</th>", header)[1:]:
        assert f"<dt>{escape(label)}</dt>" in explained, label
    assert "below 0 = pushed away" in explained


def test_per_concept_scores_are_plotted():
    html = render.report_table(report())
    svgs = re.findall(r"<svg class='loraclr-chart'.*?</svg>", html)
    assert len(svgs) == 3  # UNet, joint K/V, joint bleed
    bleed = svgs[2]
    # Two concepts × two methods: one bar each; the negative bleed is drawn left of 0.
    widths = [float(w) for w in re.findall(r"<rect [^>]*width='([\d.]+)'", bleed)]
    assert len(widths) == 4
    assert "loraclr, c0: -0.250" in bleed and "least squares, c1: 0.750" in bleed
    zero = float(re.search(r"<line x1='([\d.]+)'", bleed).group(1))
    xs = [float(x) for x in re.findall(r"<rect x='([\d.]+)'", bleed)]
    assert min(xs) < zero and max(xs) == zero
    assert "loraclr" in html[html.index("loraclr-legend") :]


def test_a_one_concept_report_shows_no_joint_numbers():
    html = render.report_table(report(joint=False))
    table = html[: html.index("</table>")]
    assert table.count("<span class='loraclr-value'>–</span>") == 4  # 2 methods × 2 joint
    assert "nan" not in html.lower()
    assert html.count("<svg") == 1  # only the UNet panel has numbers
