"""Exception and warning hierarchy.

Every user-facing failure is a ``LoraClrError``; its message names the file, key or value
involved and says what to do. Subclasses also inherit the matching built-in exception so
callers that catch ``ValueError`` / ``FileNotFoundError`` keep working.
"""

from __future__ import annotations

NO_MODEL = "No checkpoint is loaded; pick one in the Stable Diffusion checkpoint menu first."


class LoraClrError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidInputError(LoraClrError, ValueError):
    """A user input (option, prompt, name, tensor) is malformed or inconsistent."""


class LoraFileError(LoraClrError, ValueError):
    """A LoRA file cannot be read: corrupt, truncated, pickled, or of an unknown format."""


class ArchitectureMismatchError(LoraClrError, ValueError):
    """A LoRA was trained for another architecture than the base model."""


class UnmatchedKeysError(LoraClrError, ValueError):
    """Too many of a file's keys map to no module of the architecture."""


class OutputExistsError(LoraClrError, FileExistsError):
    """The output file exists and overwriting was not requested."""


class ModelNotFoundError(LoraClrError, FileNotFoundError):
    """A base model, tokenizer or config needed offline is missing."""


class SolverError(LoraClrError, ValueError):
    """Statistics or weights given to the solver are inconsistent (shape, NaN, empty)."""


class NoModelError(LoraClrError):
    """No checkpoint is loaded in the WebUI (and none is loading)."""

    def __init__(self, message: str = NO_MODEL) -> None:
        super().__init__(message)


class MergeInterruptedError(LoraClrError):
    """The user interrupted the merge; nothing was written."""


class OutOfMemoryMergeError(LoraClrError, MemoryError):
    """The device ran out of memory during the merge; nothing was written."""


class LoraClrWarning(UserWarning):
    """Base of every warning this package emits."""
