"""``modules.shared``: ``opts``, ``state``, ``cmd_opts`` (lora_dir, api_auth)."""

from __future__ import annotations

from types import SimpleNamespace

from modules.options import OptionInfo, Options
from modules.shared_state import State

opts = Options()
state = State()
cmd_opts = SimpleNamespace(lora_dir="", api_auth=None, api=False, nowebui=False)

__all__ = ["OptionInfo", "cmd_opts", "opts", "state"]
