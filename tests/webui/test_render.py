"""The result panel's text and the report table's HTML (no browser: test_browser.py
checks how they lay out)."""

from __future__ import annotations

from types import SimpleNamespace

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


def test_report_bars_are_shares_of_their_cell():
    row = SimpleNamespace(method="least squares", mean=lambda k: 0.5, preservation_unet=0.25)
    top = SimpleNamespace(method="loraclr", mean=lambda k: 1.0, preservation_unet=0.5)
    html = render.report_table(SimpleNamespace(methods=[top, row]))
    assert "width:50%" in html and "width:100%" in html and "px" not in html
    assert "<th scope='row'>least squares</th>" in html and "base moved" in html
