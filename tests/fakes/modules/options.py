"""``modules.options``: ``OptionInfo`` and an ``Options`` store with the same lookup rules."""

from __future__ import annotations

from typing import Any


class OptionInfo:
    def __init__(
        self,
        default: Any = None,
        label: str = "",
        component: Any = None,
        component_args: Any = None,
        onchange: Any = None,
        section: Any = None,
        **kwargs: Any,
    ) -> None:
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.extra = kwargs

    def info(self, text: str) -> OptionInfo:
        self.label += f" ({text})"
        return self


class Options:
    """``shared.opts``: attribute access falls back to the registered default."""

    def __init__(self) -> None:
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key: str, info: OptionInfo) -> None:
        # A1111 indexes section[0] when dumping the settings JSON; a bad section breaks it.
        assert isinstance(info.section, tuple) and len(info.section) >= 2, key
        self.data_labels[key] = info

    def __getattr__(self, key: str) -> Any:
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value
