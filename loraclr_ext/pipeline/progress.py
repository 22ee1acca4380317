"""Progress and interruption, as the engine reports them to a CLI bar or a WebUI."""

from __future__ import annotations

from typing import Protocol

from loraclr_ext.errors import MergeInterruptedError


class Progress(Protocol):
    """Receives stage changes and steps; says when the user pressed Interrupt."""

    def stage(self, text: str, total: int) -> None:
        """A new stage of ``total`` steps begins."""
        ...

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current stage are done."""
        ...

    def interrupted(self) -> bool:
        """True once the user asked to stop."""
        ...


class SilentProgress:
    """Progress that shows nothing and is never interrupted (library use, tests)."""

    def stage(self, text: str, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def interrupted(self) -> bool:
        return False


def check_interrupt(progress: Progress) -> None:
    """Raise :class:`MergeInterruptedError` if the user asked to stop."""
    if progress.interrupted():
        raise MergeInterruptedError("Merge interrupted; nothing was written.")


PASSES_STAGE = "Recording concept features and solving layers"
"""Start of the one stage text of a merge recorded in passes (its recording and solving
interleave, so a progress display gives it the slices of both)."""


class InPasses:
    """Progress of a merge recorded in passes (a memory budget split its layers): the
    first stage opens one "Recording" stage of ``total`` steps (every pass's recording and
    solving steps); later stages only add their steps to it, so a bar never goes back."""

    def __init__(self, progress: Progress, total: int, passes: int) -> None:
        self.inner = progress
        self.total = total
        self.passes = passes
        self.started = False

    def stage(self, text: str, total: int) -> None:
        if not self.started:
            self.started = True
            self.inner.stage(
                f"{PASSES_STAGE} in {self.passes} passes",
                self.total,
            )

    def advance(self, steps: int = 1) -> None:
        self.inner.advance(steps)

    def interrupted(self) -> bool:
        return self.inner.interrupted()
