"""Validate a merge request and read its LoRAs before any model work starts (design §6).

Every check that can fail on user input runs here, so a bad request costs no GPU time
and leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraclr_ext.errors import (
    ArchitectureMismatchError,
    InvalidInputError,
    OutputExistsError,
)
from loraclr_ext.files.read import BaseWeight, precheck_lora, read_lora
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.model.deltas import LoraFile, ModuleDelta
from loraclr_ext.model.targets import ModuleRef
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions


@dataclass
class Concept:
    """A concept ready to run: its LoRA (strength applied) and its prompt."""

    lora: LoraFile
    prompt: str
    strength: float
    deltas: dict[ModuleRef, ModuleDelta]

    @property
    def name(self) -> str:
        return self.lora.name


@dataclass
class MergePlan:
    """A validated merge: concepts, options and where the result goes."""

    concepts: list[Concept]
    options: MergeOptions
    output: Path
    architecture: Architecture

    @property
    def refs(self) -> list[ModuleRef]:
        """Every module any concept touches, restricted to the selected parts, sorted."""
        refs = {ref for c in self.concepts for ref in c.deltas}
        return sorted(ref for ref in refs if part_selected(ref, self.options))


def is_cross_kv(ref: ModuleRef) -> bool:
    """Cross-attention K/V: their input is the text conditioning, not the image."""
    return ref.component == "unet" and ref.path.endswith(("attn2.to_k", "attn2.to_v"))


def part_selected(ref: ModuleRef, options: MergeOptions) -> bool:
    if ref.is_text:
        return options.text_encoder
    if is_cross_kv(ref):
        return options.cross_attention
    return options.unet_other


def output_path(directory: Path, name: str) -> Path:
    """``<directory>/<name>.safetensors`` after checking the name and the directory."""
    from loraclr_ext.files.names import validate_output_name

    stem = validate_output_name(name.removesuffix(".safetensors"))
    if not directory.is_dir():
        raise InvalidInputError(f"Output directory {directory} does not exist; create it first.")
    return directory / f"{stem}.safetensors"


def plan_merge(
    specs: list[ConceptSpec],
    options: MergeOptions,
    architecture: Architecture,
    output: Path,
    *,
    check_shapes: bool = True,
    min_concepts: int = 2,
    base_weight: BaseWeight | None = None,
) -> MergePlan:
    """Check the request against design §6 and read every LoRA.

    Raises:
        InvalidInputError: fewer than two LoRAs, a file given twice, empty or duplicate
            prompts, bad strength.
        (``min_concepts=1`` lets tests and re-factorisation merge a single LoRA.)
        (``base_weight``: the host's ``base_weight``; DoRA LoRAs are refused without it.)
        OutputExistsError: ``output`` exists and ``options.overwrite`` is off.
        LoraFileError: a file is missing, corrupt, truncated or a pickle.
        ArchitectureMismatchError: a LoRA is for another architecture than the base model.
    """
    _check_request(specs, min_concepts)
    _check_output(output, options, (output,))
    concepts = [_read_concept(spec, architecture, check_shapes, base_weight) for spec in specs]
    plan = MergePlan(concepts, options, output, architecture)
    if not plan.refs:
        raise InvalidInputError(
            "The selected LoRAs touch none of the selected parts; nothing to merge."
        )
    return plan


def precheck(
    specs: list[ConceptSpec],
    options: MergeOptions,
    output: Path,
    *,
    min_concepts: int = 2,
    check_shapes: bool = True,
) -> bool:
    """Every check that needs no model: run before loading anything.

    Request shape (count, distinct files, prompts), every LoRA's container and the parts
    of it no base model can change (another model family, DoRA/OFT, bundled embeddings,
    flattened conv kernels that fit no module), then the output file, its sidecar
    ``<name>.json`` and the output directory.

    Returns:
        whether a LoRA has DoRA modules, whose reading needs the base weights.
    """
    _check_request(specs, min_concepts)
    dora = [precheck_lora(Path(spec.path), check_shapes=check_shapes) for spec in specs]
    if output.suffix.lower() != ".safetensors":
        raise InvalidInputError(f"Output {output.name} must end in .safetensors.")
    _check_output(output, options, (output, output.with_suffix(".json")))
    return any(dora)


def _check_request(specs: list[ConceptSpec], min_concepts: int) -> None:
    """Enough concepts, each file once, every concept with its own prompt and strength."""
    if len(specs) < min_concepts:
        raise InvalidInputError(f"Select at least two LoRAs to merge (got {len(specs)}).")
    _check_distinct_files(specs)
    _check_prompts(specs)


def _check_output(output: Path, options: MergeOptions, targets: tuple[Path, ...]) -> None:
    """None of ``targets`` (the file, and its sidecar) exists unless overwriting is allowed,
    and the output folder exists."""
    for target in targets:
        if target.exists() and not options.overwrite:
            raise OutputExistsError(
                f"{target} already exists; choose another name or allow overwrite."
            )
    if not output.parent.is_dir():
        raise InvalidInputError(
            f"Output directory {output.parent} does not exist; create it first."
        )


def _check_distinct_files(specs: list[ConceptSpec]) -> None:
    seen: dict[Path, int] = {}
    for i, spec in enumerate(specs):
        key = Path(spec.path).resolve()
        if key in seen:
            raise InvalidInputError(
                f"{Path(spec.path).name} is selected twice (concepts {seen[key] + 1} and {i + 1}); "
                "each LoRA can be merged once."
            )
        seen[key] = i


def _check_prompts(specs: list[ConceptSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        prompt = " ".join(spec.prompt.split())
        name = Path(spec.path).name
        if not prompt:
            raise InvalidInputError(
                f"The concept prompt of {name} is empty; enter its trigger words."
            )
        if prompt.lower() in seen:
            raise InvalidInputError(
                f"{name} and {seen[prompt.lower()]} have the same concept prompt {prompt!r}; "
                "each concept needs its own trigger words."
            )
        seen[prompt.lower()] = name
        if not torch.isfinite(torch.tensor(spec.strength)) or spec.strength == 0:
            raise InvalidInputError(f"Strength of {name} must be a finite non-zero number.")


def _read_concept(
    spec: ConceptSpec,
    architecture: Architecture,
    check_shapes: bool,
    base_weight: BaseWeight | None = None,
) -> Concept:
    path = Path(spec.path)
    lora = read_lora(path, architecture, check_shapes=check_shapes, base_weight=base_weight)
    if lora.architecture is not None and lora.architecture != architecture:
        raise ArchitectureMismatchError(
            f"{path.name} is a {lora.architecture.label} LoRA but the base model is "
            f"{architecture.label}; pick LoRAs trained for {architecture.label}."
        )
    deltas = {ref: d.scaled(spec.strength) for ref, d in lora.deltas.items()}
    return Concept(lora, " ".join(spec.prompt.split()), spec.strength, deltas)
