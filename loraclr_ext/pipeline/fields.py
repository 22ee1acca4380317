"""The option table: one :class:`FieldSpec` per :class:`MergeOptions` field (one source of truth).

The tab builds one gradio component per field, the REST ``version`` route publishes the same
list as JSON schema and the command line one flag per field, so they cannot drift apart.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

from loraclr_ext.pipeline.options import MergeOptions

Kind = Literal["text", "bool", "int", "float", "choice"]
MAIN = ("output", "rank", "steps", "size", "precision", "overwrite", "quality", "preview")
"""Fields shown outside the "Advanced" accordion, in this order."""


@dataclass(frozen=True)
class FieldSpec:
    """One option as a widget: kind, label (the field's help), default and bounds."""

    name: str
    kind: Kind
    help: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    zero: str | None = None
    """What 0 (or empty) means for an optional number: ``"exact"`` rank, ``"auto"`` steps."""

    @property
    def advanced(self) -> bool:
        return self.name not in MAIN

    @property
    def label(self) -> str:
        title = self.name.replace("_", " ").capitalize()
        return f"{title} (0 = {self.zero})" if self.zero else title

    def json_schema(self) -> dict[str, Any]:
        kind = {"text": "string", "bool": "boolean", "int": "integer", "float": "number"}
        schema: dict[str, Any] = {"description": self.help, "default": self.default}
        if self.kind == "choice":
            schema.update(type="string", enum=list(self.choices))
        else:
            schema["type"] = [kind[self.kind], "null"] if self.optional else kind[self.kind]
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return schema


def _kind(tp: Any) -> tuple[Kind, tuple[str, ...], bool]:
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return "choice", tuple(typing.get_args(tp)), optional
    kinds: dict[Any, Kind] = {bool: "bool", int: "int", float: "float", str: "text"}
    return kinds[tp], (), optional


def option_fields() -> list[FieldSpec]:
    """Every :class:`MergeOptions` field, main ones first."""
    hints = typing.get_type_hints(MergeOptions)
    specs = []
    for f in fields(MergeOptions):
        kind, choices, optional = _kind(hints[f.name])
        specs.append(
            FieldSpec(
                name=f.name,
                kind=kind,
                help=f.metadata.get("help", ""),
                default=None if f.default is MISSING else f.default,
                minimum=f.metadata.get("minimum"),
                maximum=f.metadata.get("maximum"),
                choices=choices,
                optional=optional,
                zero=f.metadata.get("zero"),
            )
        )
    order = {name: i for i, name in enumerate(MAIN)}
    return sorted(specs, key=lambda s: order.get(s.name, len(order)))


def options_schema() -> dict[str, Any]:
    """JSON schema of a merge request body (``loras`` plus every option)."""
    concept = {
        "type": "object",
        "required": ["name", "prompt"],
        "properties": {
            "name": {"type": "string", "description": "LoRA file stem or path in the Lora folder"},
            "prompt": {"type": "string", "description": "Concept prompt with trigger words"},
            "strength": {"type": "number", "default": 1.0},
        },
    }
    props = {"loras": {"type": "array", "minItems": 2, "items": concept}}
    props.update({s.name: s.json_schema() for s in option_fields()})
    return {"type": "object", "required": ["loras"], "properties": props}
