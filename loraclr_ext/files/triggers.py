"""Which words call up a LoRA's concept: the one place that decides, best source first.

The concept prompts of a merge are pre-filled from here (the CLI ``inspect``, the WebUI
list and its concept table, the REST ``loras`` route all go through
:func:`find_triggers` via :func:`loraclr_ext.files.read.describe_lora`).

Sources, in the order they are trusted (first one that yields a word wins):

1. ``sidecar`` — ``"activation text"`` of the A1111/Forge user-metadata file
   ``<name>.json`` beside the LoRA: what the user (or the WebUI editor) set to be inserted
   with the LoRA (A1111 ``ui_extra_networks_lora.py``, ``ui_edit_user_metadata.py``).
2. ``civitai`` — ``trainedWords`` of ``<name>.civitai.info`` beside the LoRA (written by
   Civitai helper extensions from the civitai model-version API; not in A1111 itself).
3. ``modelspec`` — ``modelspec.trigger_phrase`` (ModelSpec 1.0.1; written by trainers
   and by our own writer), comma-separated.
4. ``dataset`` — the class tokens of kohya DreamBooth folders: the keys of
   ``ss_dataset_dirs`` and ``ss_tag_frequency`` are folder names
   ``<repeats>_<instance token and class>`` (sd-scripts ``config_util.py
   extract_dreambooth_params``: ``int`` before the first ``_`` is the repeat count, the
   rest the caption used for uncaptioned images), e.g. ``10_ohwx woman`` → ``ohwx woman``;
   a name used twice gets `` (2)`` appended by sd-scripts, which is dropped here.
5. ``tags`` — the :data:`MAX_TRIGGER_TAGS` most frequent ``ss_tag_frequency`` tags
   summed over folders (as A1111's ``build_tags`` counts them). These are generic words
   ("portrait") as often as triggers, so :func:`concept_prompts` drops the ones that
   several selected LoRAs share.
6. ``name`` — ``ss_output_name``, the alias A1111 shows for the file.

Bundled textual-inversion names (``bundle_emb.<name>.*``) are prompt words too; the
caller adds them with :meth:`Triggers.with_embedded`, after the chosen source's words.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_TRIGGER_TAGS = 3
MAX_SIDE_FILE_BYTES = 1 << 20
"""Side files larger than this are not read (a user-metadata JSON is a few hundred bytes)."""
SOURCES = ("sidecar", "civitai", "modelspec", "dataset", "tags", "name", "")
_FOLDER = re.compile(r"^\d+_(.+?)(?: \(\d+\))?$")


@dataclass(frozen=True)
class Triggers:
    """The words found for one LoRA and where they came from.

    Attributes:
        words: the prompt words, best first (embedded names last).
        source: which source gave them, one of :data:`SOURCES` (``""``: none).
        tags: every ``ss_tag_frequency`` tag, most frequent first (for
            :func:`concept_prompts` to see which tags other LoRAs share).
        embedded: bundled embedding names, appended to ``words``.
        fallback: ``ss_output_name`` (may be empty), used when every top tag is shared.
    """

    words: list[str]
    source: str = ""
    tags: list[str] = field(default_factory=list)
    embedded: list[str] = field(default_factory=list)
    fallback: str = ""

    def with_embedded(self, names: Sequence[str]) -> Triggers:
        """These triggers with bundled embedding names appended (each once)."""
        words = [*self.words, *(n for n in names if n not in self.words)]
        return Triggers(words, self.source, self.tags, list(names), self.fallback)


def _split(text: object) -> list[str]:
    """Comma-separated words of ``text`` (or of each string in a list), stripped, unique."""
    parts: Iterable[object] = text if isinstance(text, list) else [text]
    words = [w.strip() for p in parts if isinstance(p, str) for w in p.split(",")]
    return list(dict.fromkeys(w for w in words if w))


def _side_json(path: Path) -> dict:
    """A small JSON object file, or ``{}`` when absent, too big, unreadable or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_SIDE_FILE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _json_map(metadata: Mapping[str, str], key: str) -> dict:
    try:
        value = json.loads(metadata.get(key, "") or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def tag_counts(metadata: Mapping[str, str]) -> Counter[str]:
    """Summed ``ss_tag_frequency`` counts over all dataset folders (empty if absent/bad)."""
    counts: Counter[str] = Counter()
    for tags in _json_map(metadata, "ss_tag_frequency").values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, int | float) and str(tag).strip():
                    counts[str(tag).strip()] += int(n)
    return counts


def dataset_classes(metadata: Mapping[str, str]) -> list[str]:
    """Instance-and-class tokens from kohya DreamBooth folder names, in file order."""
    folders = [*_json_map(metadata, "ss_dataset_dirs"), *_json_map(metadata, "ss_tag_frequency")]
    found = [m.group(1).strip() for f in folders if (m := _FOLDER.match(str(f)))]
    return list(dict.fromkeys(w for w in found if w))


def _candidates(
    metadata: Mapping[str, str], path: str | Path | None, tags: list[str], fallback: str
) -> Iterator[tuple[str, list[str]]]:
    """Each source's words in trust order, read only when the previous one gave none."""
    if path is not None:
        side = Path(path)
        yield "sidecar", _split(_side_json(side.with_suffix(".json")).get("activation text"))
        yield "civitai", _split(_side_json(side.with_suffix(".civitai.info")).get("trainedWords"))
    yield "modelspec", _split(metadata.get("modelspec.trigger_phrase", ""))
    yield "dataset", dataset_classes(metadata)
    yield "tags", tags[:MAX_TRIGGER_TAGS]
    yield "name", [fallback] if fallback else []


def find_triggers(metadata: Mapping[str, str], path: str | Path | None = None) -> Triggers:
    """The trigger words of a LoRA by the order in this module's docstring.

    Args:
        metadata: the file's safetensors metadata.
        path: the LoRA file, to read ``<stem>.json`` and ``<stem>.civitai.info`` beside it;
            ``None`` reads metadata only.

    Bundled embedding names are added afterwards with :meth:`Triggers.with_embedded`.
    """
    tags = [tag for tag, _ in tag_counts(metadata).most_common()]
    fallback = metadata.get("ss_output_name", "").strip()
    found = _candidates(metadata, path, tags, fallback)
    source, words = next(((s, w) for s, w in found if w), ("", []))
    return Triggers(words, source, tags, [], fallback)


def triggers_from_metadata(metadata: Mapping[str, str]) -> list[str]:
    """:func:`find_triggers` on the metadata alone (no side files, no embeddings)."""
    return find_triggers(metadata).words


def concept_prompts(found: Mapping[str, Triggers]) -> dict[str, list[str]]:
    """Prompt words for LoRAs selected together, by name.

    A LoRA whose words are its top tags (source ``tags``) loses every tag that another
    selected LoRA's ``ss_tag_frequency`` also holds: a shared tag ("portrait") names no
    one concept and would put the same word in two concepts' prompts. Its next unshared
    tags take their place; if none is left, its ``ss_output_name``. Every other source is
    kept as found.
    """
    prompts: dict[str, list[str]] = {}
    for name, t in found.items():
        if t.source != "tags":
            prompts[name] = list(t.words)
            continue
        others = {tag for n, o in found.items() if n != name for tag in o.tags}
        own = [tag for tag in t.tags if tag not in others][:MAX_TRIGGER_TAGS]
        words = own or ([t.fallback] if t.fallback else [])
        prompts[name] = [*words, *(e for e in t.embedded if e not in words)]
    return prompts
