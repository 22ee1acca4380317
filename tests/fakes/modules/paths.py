"""``modules.paths``: ``data_path``, where A1111 writes ``params.txt`` (tests set it)."""

from __future__ import annotations

data_path = ""
