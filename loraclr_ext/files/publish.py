"""Put a finished file in place all at once, never over someone else's file.

Files are written under a temporary name in the destination folder (so the final rename
stays on one file system and is atomic, POSIX ``rename(2)``), given the permissions a
plainly created file would get, then moved into place. Without ``overwrite`` an existing
file is never replaced.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from loraclr_ext.errors import OutputExistsError


def temp_path(final: Path) -> Path:
    """A new empty hidden file beside ``final`` (``.<stem>.XXXX.tmp``) for the caller to fill."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def exists_message(path: Path) -> str:
    """What to tell the user when ``path`` is already taken."""
    return f"{path} already exists; choose another output name or allow overwriting."


def refuse_existing(targets: list[Path], overwrite: bool) -> None:
    """Fail early, before any work, when a target exists and may not be replaced.

    Raises:
        OutputExistsError: the first existing target, when ``overwrite`` is False.
    """
    for target in targets:
        if target.exists() and not overwrite:
            raise OutputExistsError(exists_message(target))


def publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``final`` atomically; without ``overwrite`` never replace a file.

    A hard link fails if ``final`` exists, which closes the gap between checking and
    renaming; file systems without hard links fall back to check-then-rename. The file
    gets the permissions a plainly created one would: ``mkstemp`` and safetensors leave
    it owner-only, which hides the LoRA from a WebUI or a share running as another user.
    """
    os.chmod(tmp, 0o666 & ~_umask())
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExistsError(exists_message(final)) from None
    except OSError:
        if final.exists():
            raise OutputExistsError(exists_message(final)) from None
        os.replace(tmp, final)
        return
    tmp.unlink()


def write_temp_json(final: Path, content: dict) -> Path:
    """``content`` as indented UTF-8 JSON in a temporary file beside ``final``."""
    tmp = temp_path(final)
    tmp.write_text(json.dumps(content, indent=4, ensure_ascii=False), encoding="utf-8")
    return tmp
