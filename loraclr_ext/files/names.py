"""Rules for the output file's name and where the writer puts it.

A user types the output name in the tab, the CLI or the REST body, so it is checked here
before anything is computed: it must be a plain file name on every system a WebUI runs on
(POSIX and Windows; reserved characters and device names from Microsoft's "Naming Files,
Paths, and Namespaces"). The sidecar beside the LoRA is ``<stem>.json``, the name
A1111/Forge's ``extra_networks.get_user_metadata`` looks for.
"""

from __future__ import annotations

from pathlib import Path

from loraclr_ext.errors import InvalidInputError

SUFFIX = ".safetensors"
MAX_NAME_LENGTH = 200
_RESERVED_CHARS = set('<>:"|?*')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)
}


def validate_output_name(name: str) -> str:
    """Check a user-chosen output name; return it without a ``.safetensors`` suffix.

    Raises:
        InvalidInputError: empty, a path (separators or ``..``), reserved or control
            characters, a Windows device name, a trailing dot/space, or too long.
    """
    stem = name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name

    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(f"Output name {name!r} is not allowed: {reason}.")

    if not stem.strip():
        raise bad("it is empty; type a file name such as 'alice_and_bob'")
    if "/" in stem or "\\" in stem:
        raise bad("it contains a path separator; give a plain file name")
    if ".." in stem or stem == ".":
        raise bad("it contains '..'; give a plain file name")
    found = sorted(_RESERVED_CHARS & set(stem))
    if found:
        raise bad(f"it contains {' '.join(found)}; these are reserved in file names")
    if any(ord(c) < 32 or ord(c) == 127 for c in stem):
        raise bad("it contains control characters")
    if stem.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise bad("it is a reserved device name on Windows")
    if stem != stem.rstrip(". ") or stem != stem.lstrip():
        raise bad("it starts with a space or ends with a dot or space")
    if len(stem) > MAX_NAME_LENGTH:
        raise bad(f"it is longer than {MAX_NAME_LENGTH} characters")
    return stem


def check_output_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` once it ends in ``.safetensors`` and its folder exists.

    Raises:
        InvalidInputError: another suffix, or a missing directory.
    """
    final = Path(path)
    if final.suffix.lower() != SUFFIX:
        raise InvalidInputError(f"{final} must end in {SUFFIX}.")
    if not final.parent.is_dir():
        raise InvalidInputError(f"Output directory {final.parent} does not exist; create it first.")
    return final


def sidecar_path(final: Path) -> Path:
    """The A1111/Forge user-metadata file of the LoRA ``final``: ``<stem>.json`` beside it."""
    return final.with_suffix(".json")
