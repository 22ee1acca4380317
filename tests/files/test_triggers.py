"""Concept prompts pre-filled with the real trigger (issue 12 item 5): each metadata kind
in a real file, the order between them, and shared tags kept out of two prompts.

Formats: /work/notes/formats.md §7 (kohya ``ss_dataset_dirs``/``ss_tag_frequency``
folder names ``<repeats>_<class tokens>``, the A1111 sidecar's ``activation text``,
civitai ``trainedWords``, ``modelspec.trigger_phrase``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraclr_ext.cli import main
from loraclr_ext.files.read import describe_lora, read_lora
from loraclr_ext.files.triggers import concept_prompts, find_triggers
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.ui.service import LoraEntry, _entry
from loraclr_ext.ui.tab import TabHandlers

TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"

# A kohya DreamBooth run on folder "10_ohwx woman" whose captions also say "portrait".
OHWX = {
    "ss_output_name": "ohwx_v1",
    "ss_dataset_dirs": json.dumps({"10_ohwx woman": {"n_repeats": 10, "img_count": 12}}),
    "ss_tag_frequency": json.dumps({"10_ohwx woman": {"portrait": 12, "ohwx woman": 4}}),
}


def _lora(path: Path, metadata: dict[str, str] | None = None, **side: object) -> Path:
    """A small SD1 kohya file with ``metadata``; ``side`` maps a suffix (``json``,
    ``civitai_info``) to the content of the file of that name beside it."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{TE_Q}.lora_down.weight": torch.randn(2, 768, generator=g),
        f"{TE_Q}.lora_up.weight": torch.randn(768, 2, generator=g),
        f"{K}.lora_down.weight": torch.randn(2, 768, generator=g),
        f"{K}.lora_up.weight": torch.randn(320, 2, generator=g),
    }
    save_file(tensors, str(path), metadata=metadata)
    for suffix, content in side.items():
        text = content if isinstance(content, str) else json.dumps(content)
        path.with_suffix("." + suffix.replace("_", ".")).write_text(text, encoding="utf-8")
    return path


def test_dataset_folder_gives_instance_token_and_class(tmp_path: Path) -> None:
    info = describe_lora(_lora(tmp_path / "w.safetensors", OHWX))
    assert info.usable
    assert info.triggers == ["ohwx woman"]  # not the top tag "portrait"
    assert info.found.source == "dataset"
    assert read_lora(tmp_path / "w.safetensors").triggers == ["ohwx woman"]


def test_dataset_folders_from_tag_frequency_keys_and_duplicates() -> None:
    tags = {"5_sks dog": {"dog": 3}, "5_sks dog (2)": {"dog": 1}, "2_zwx cat": {"cat": 9}}
    found = find_triggers({"ss_tag_frequency": json.dumps(tags)})
    assert (found.words, found.source) == (["sks dog", "zwx cat"], "dataset")
    # A folder without a repeat count is no DreamBooth folder (sd-scripts ignores it).
    plain = find_triggers({"ss_tag_frequency": json.dumps({"img": {"a": 2, "b": 1}})})
    assert (plain.words, plain.source) == (["a", "b"], "tags")


def test_sidecar_activation_text_comes_first(tmp_path: Path) -> None:
    meta = {**OHWX, "modelspec.trigger_phrase": "spec word"}
    sidecar = {"activation text": "ohwx woman, red scarf", "preferred weight": 0.8}
    path = _lora(
        tmp_path / "s.safetensors", meta, json=sidecar, civitai_info={"trainedWords": ["c"]}
    )
    info = describe_lora(path)
    assert (info.triggers, info.found.source) == (["ohwx woman", "red scarf"], "sidecar")


def test_civitai_trained_words_before_modelspec_and_folders(tmp_path: Path) -> None:
    meta = {**OHWX, "modelspec.trigger_phrase": "spec word"}
    civitai = {"trainedWords": ["ohwx, woman", "ohwx woman"], "baseModel": "SD 1.5"}
    path = _lora(
        tmp_path / "c.safetensors", meta, json={"activation text": ""}, civitai_info=civitai
    )
    info = describe_lora(path)
    assert (info.triggers, info.found.source) == (["ohwx", "woman", "ohwx woman"], "civitai")


def test_modelspec_before_folders_and_bad_side_files_ignored(tmp_path: Path) -> None:
    meta = {**OHWX, "modelspec.trigger_phrase": "ohwx person, ohwx person"}
    path = _lora(tmp_path / "m.safetensors", meta, json="{not json", civitai_info=["a list"])
    info = describe_lora(path)
    assert (info.triggers, info.found.source) == (["ohwx person"], "modelspec")


def test_cli_inspect_shows_the_chosen_trigger(tmp_path: Path, capsys) -> None:
    path = _lora(tmp_path / "i.safetensors", OHWX, json={"activation text": "ohwx woman"})
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["triggers"] == ["ohwx woman"]


def _tags(counts: dict[str, int], name: str) -> dict[str, str]:
    return {"ss_tag_frequency": json.dumps({"img": counts}), "ss_output_name": name}


class _Ctx:
    """The part of :class:`WebuiContext` the concept table's pre-fill uses."""

    def __init__(self, entries: list[LoraEntry]) -> None:
        self.entries = entries

    def list_loras(self, query: str = "") -> list[LoraEntry]:
        return self.entries


def test_shared_top_tags_stay_out_of_the_concept_prompts(tmp_path: Path) -> None:
    """Today's failure: two captioned LoRAs both rank "portrait" high, and both concept
    prompts got it. Tags another selected LoRA also has are dropped; real triggers stay."""
    files = {
        "anna": _lora(
            tmp_path / "anna.safetensors",
            _tags({"portrait": 9, "anna": 5, "red hair": 2, "smile": 1}, "anna"),
        ),
        "bob": _lora(
            tmp_path / "bob.safetensors", _tags({"portrait": 7, "smile": 6, "bob": 3}, "bob")
        ),
        "carl": _lora(tmp_path / "carl.safetensors", _tags({"portrait": 5, "smile": 4}, "carl")),
        "ohwx": _lora(tmp_path / "ohwx.safetensors", OHWX),
    }
    infos = {n: describe_lora(p) for n, p in files.items()}
    assert infos["anna"].triggers == ["portrait", "anna", "red hair"]  # alone: top tags
    entries = [_entry(i, Path(i.path.name), Architecture.SD1) for i in infos.values()]
    rows = TabHandlers(_Ctx(entries)).select(["anna", "bob", "carl", "ohwx"], None)  # type: ignore[arg-type]
    assert rows == [
        ["anna", "anna, red hair", 1.0],
        ["bob", "bob", 1.0],
        ["carl", "carl", 1.0],  # every tag shared: its ss_output_name
        ["ohwx", "ohwx woman", 1.0],  # a folder trigger is never dropped
    ]
    # Selected alone, a LoRA keeps its tags; the REST list says where words came from.
    assert concept_prompts({"bob": infos["bob"].found}) == {"bob": ["portrait", "smile", "bob"]}
    listed = {e.name: e.to_dict() for e in entries}
    assert listed["ohwx"]["triggers"] == ["ohwx woman"]
    assert listed["ohwx"]["trigger_source"] == "dataset"
    assert "found" not in listed["ohwx"]
