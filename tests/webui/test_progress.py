"""The merge's progress as the WebUI shows it: one bar over the whole merge that never
goes back, an ETA the WebUI's own formula makes sane, and stage times in words."""

from __future__ import annotations

import itertools

import pytest

from loraclr_ext.ui.progress import RESOLUTION, StateProgress, spans

ROWS = [["sks_dog", "sks dog", 1.0], ["zwx_cat", "zwx cat", 1.0]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def begun_state(clock):
    from modules.shared_state import State

    state = State()
    state.begin("task(x)")
    state.time_start = clock()
    return state


# (engine stage text, steps, seconds per step) of a CPU merge with its report, in the
# proportions of the run (collect 36 s, solve 7 s, writing 17 s without a stage of
# its own) with the report at the quarter of the merge it is capped to (18 s, not 111 s).
RUN = [
    ("Recording concept features", 24, 1.5),
    ("Solving layers", 140, 0.05),
    ("Measuring quality", 4, 4.5),
]


def play(progress, state, clock, run, sample):
    clock.now += 3.0  # opening the checkpoint and reading the LoRAs
    sample()
    for text, steps, seconds in run:
        progress.stage(text, steps)
        sample()
        for _ in range(steps):
            clock.now += seconds
            progress.advance()
            sample()
    clock.now += 17.0  # writing


@pytest.mark.parametrize("quality", [True, False])
def test_one_monotone_progress_with_a_sane_eta(webui, quality):
    from modules.progress import progress_of

    clock = Clock()
    state = begun_state(clock)
    progress = StateProgress(state, quality=quality)
    run = RUN if quality else RUN[:2]
    samples = []

    def sample():
        samples.append((clock.now, *progress_of(state, clock.now), state.textinfo))

    play(progress, state, clock, run, sample)
    end = clock.now
    values = [v for _, v, _, _ in samples]
    assert values == sorted(values), values
    assert values[-1] >= 0.8 and values[-1] < 1.0
    assert state.job_count == 1 and state.sampling_steps == RESOLUTION
    assert samples[-1][3] == "LoRACLR: writing the file"
    assert any("(12 of 24)" in s[3] for s in samples)
    # Past the first tenth, the ETA is within a factor of ~3 of the real remaining time
    # (the issue saw 133,671 s for a 3-minute merge).
    for now, value, eta, _ in samples:
        if value >= 0.1:
            remaining = end - now
            assert eta < 3 * remaining + 20, (value, eta, remaining)
            assert eta > remaining / 3 - 20, (value, eta, remaining)


def test_an_unknown_stage_never_moves_the_bar_back(webui):
    state = begun_state(Clock())
    progress = StateProgress(state, quality=True)
    progress.stage("Recording concept features", 4)
    progress.advance(4)
    before = state.sampling_step
    progress.stage("Something new", 3)
    assert state.sampling_step == before
    progress.advance(3)
    progress.stage("Solving layers", 2)
    assert state.sampling_step >= before
    assert state.textinfo == "LoRACLR: Solving layers (0 of 2)"


def test_stage_slices_cover_the_scale_in_order():
    for quality in (True, False):
        slices = spans(quality)
        assert slices[0].start == 0 and slices[-1].end == 1
        assert all(a.end == pytest.approx(b.start) for a, b in itertools.pairwise(slices))
        assert ("report" in [s.key for s in slices]) is quality


def test_tab_merge_reports_monotone_progress_and_status(webui, monkeypatch):
    """A real (tiny) merge through the tab's handler: every value the bar would show is
    ≥ the one before, every stage appears, and the status record follows it."""
    from loraclr_ext.ui import progress as progress_module
    from loraclr_ext.ui.tab import create_tab

    shown = []
    original = progress_module.StateProgress._show

    def spy(self, text):
        original(self, text)
        shown.append((self.state.sampling_step, text))

    monkeypatch.setattr(progress_module.StateProgress, "_show", spy)
    ctx = webui["ctx"]
    _, h = create_tab(ctx)
    wrapped = ctx.call_queue.wrap_gradio_gpu_call(h.merge, extra_outputs=[""])
    from test_tab import values

    tag, _ = wrapped("task(p)", ["sks_dog", "zwx_cat"], ROWS, *values(output="prog", quality=True))
    assert tag.startswith("<lora:prog:1>")
    steps = [s for s, _ in shown]
    assert steps == sorted(steps) and steps[-1] > 0.8 * RESOLUTION
    texts = " | ".join(t for _, t in shown)
    for stage in ("preparing", "Recording", "Solving", "Measuring quality", "writing"):
        assert stage in texts, texts
    status = ctx.status()
    assert status["running"] is False and status["progress"] == 1.0
    assert status["outcome"] == "wrote prog.safetensors" and status["source"] == "tab"


@pytest.mark.parametrize("quality", [True, False])
def test_a_merge_in_passes_fills_the_solving_slice_too(webui, quality):
    """A live merge in 2 passes stopped at 0.70 before the file was written: its one stage
    (recording and solving, interleaved) took only the recording's slice of the bar."""
    from loraclr_ext.pipeline.progress import InPasses

    clock = Clock()
    state = begun_state(clock)
    inner = StateProgress(state, quality=quality)
    progress = InPasses(inner, total=30, passes=2)
    slices = {s.key: s for s in spans(quality)}
    values = []
    for text, steps in (("Recording concept features", 10), ("Solving layers", 5)) * 2:
        progress.stage(text, steps)
        for _ in range(steps):
            progress.advance()
            values.append(inner.fraction)
    assert values == sorted(values)
    assert values[-1] == pytest.approx(slices["solve"].end, abs=1 / RESOLUTION)
    if quality:
        inner.stage("Measuring quality", 2)
        inner.advance(2)
        assert inner.fraction == pytest.approx(slices["report"].end, abs=1 / RESOLUTION)
    assert state.textinfo == "LoRACLR: writing the file"
