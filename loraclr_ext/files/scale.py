"""Scales kept outside the tensors: PEFT's ``lora_adapter_metadata`` header JSON.

diffusers ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` and SimpleTuner write
the PEFT ``LoraConfig`` of each component into the safetensors header under
``__metadata__["lora_adapter_metadata"]``, keys packed as ``"{component}.{field}"``
(diffusers ``loaders/lora_base.py`` ``_pack_dict_with_prefix``), e.g.
``{"unet.r": 4, "unet.lora_alpha": 16, "unet.rank_pattern": {...}}``. diffusers rebuilds
a ``LoraConfig`` from it on load, so PEFT's scaling applies (PEFT ``tuners/lora/layer.py``):

    scale = lora_alpha / r            (``lora_alpha / √r`` with ``use_rslora``)

with ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` / ``alpha_pattern``
(keys are module-name patterns matched against the end of the module path). A missing
``lora_alpha`` takes ``LoraConfig``'s default, 8.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

METADATA_KEY = "lora_adapter_metadata"
PEFT_DEFAULT_ALPHA = 8.0


@dataclass(frozen=True)
class PeftConfig:
    """One component's PEFT config fields that decide the scale."""

    r: float | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, float] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False


def peft_configs(metadata: Mapping[str, str]) -> dict[str, PeftConfig]:
    """``{component prefix: PeftConfig}`` from the header (empty when absent or malformed)."""
    try:
        packed = json.loads(metadata.get(METADATA_KEY, "") or "{}")
    except json.JSONDecodeError:
        return {}
    if not isinstance(packed, dict):
        return {}
    fields: dict[str, dict[str, object]] = {}
    for key, value in packed.items():
        prefix, _, name = str(key).rpartition(".")
        if prefix:
            fields.setdefault(prefix, {})[name] = value
    configs = {}
    for prefix, values in fields.items():
        configs[prefix] = PeftConfig(
            r=_number(values.get("r")),
            lora_alpha=_number(values.get("lora_alpha")),
            rank_pattern=_patterns(values.get("rank_pattern")),
            alpha_pattern=_patterns(values.get("alpha_pattern")),
            use_rslora=bool(values.get("use_rslora", False)),
        )
    return configs


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _patterns(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if _number(v) is not None}


def _pattern_value(patterns: Mapping[str, float], path: str) -> float | None:
    """The value of the first pattern that is the path or a dotted tail of it (PEFT
    ``utils/other.py get_pattern_key``: exact name, else ``(.*\\.)?pattern$``)."""
    if path in patterns:
        return patterns[path]
    for pattern, value in patterns.items():
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
                return value
        except re.error:
            continue
    return None


def peft_scale(configs: Mapping[str, PeftConfig], module: str, rank: int) -> float | None:
    """The PEFT scale of a dotted file module (``unet.down_blocks…to_q``), or ``None`` when
    the header has no config for its component."""
    for prefix in sorted(configs, key=len, reverse=True):
        if not module.startswith(prefix + "."):
            continue
        config, path = configs[prefix], module[len(prefix) + 1 :]
        r = _pattern_value(config.rank_pattern, path) or config.r or float(rank)
        alpha = _pattern_value(config.alpha_pattern, path)
        if alpha is None:
            alpha = config.lora_alpha if config.lora_alpha is not None else PEFT_DEFAULT_ALPHA
        return alpha / (math.sqrt(r) if config.use_rslora else r)
    return None
