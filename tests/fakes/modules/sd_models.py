"""``modules.sd_models`` of A1111 1.10: ``model_data`` (an ``SdModelData``) and ``load_model``.

As in 1.10, ``model_data.sd_model`` is a peek (``None`` until a checkpoint is loaded) and
``model_data.get_sd_model()`` (what ``shared.sd_model`` returns) loads the checkpoint under
``model_data.lock`` if none was ever loaded; a caller that comes while another thread
loads waits for that lock. A failed load (no checkpoint files at all) is reported and leaves
``None``. :func:`start_background_load` is what A1111's start-up does: a thread that
touches ``shared.sd_model`` while the API and UI already serve.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class SdModelData:
    def __init__(self) -> None:
        self.sd_model: Any = None
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()
        self.loader: Callable[[], Any] | None = None  # None: no checkpoint files
        self.loads = 0
        self.load_errors: list[str] = []

    def get_sd_model(self) -> Any:
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                try:
                    load_model()
                except Exception as exc:  # 1.10 prints it and carries on with no model
                    self.load_errors.append(str(exc))
                    self.sd_model = None
        return self.sd_model

    def set_sd_model(self, value: Any) -> None:
        self.sd_model = value


model_data = SdModelData()
checkpoints_list: dict[str, Any] = {}
"""Checkpoint title -> info, as 1.10 lists the files it found (empty: no checkpoint)."""


def load_model() -> None:
    """Build the selected checkpoint (``model_data.loader``) and publish it."""
    if model_data.loader is None:
        raise FileNotFoundError("No checkpoints found.")
    model_data.loads += 1
    model_data.set_sd_model(model_data.loader())
    model_data.was_loaded_at_least_once = True


def set_checkpoint(loader: Callable[[], Any]) -> None:
    """One checkpoint file in the list, built by ``loader`` when loaded."""
    model_data.loader = loader
    checkpoints_list["model.safetensors"] = "model.safetensors"


def start_background_load(build: Callable[[], Any], seconds: float) -> threading.Thread:
    """Start-up's model load: a thread that asks for the model, whose load takes
    ``seconds`` before ``build()`` gives it."""

    def slow() -> Any:
        time.sleep(seconds)
        return build()

    set_checkpoint(slow)
    thread = threading.Thread(target=model_data.get_sd_model, name="load-model", daemon=True)
    thread.start()
    return thread


def reset() -> None:
    """No model, never loaded, no checkpoint files (what each test starts from)."""
    model_data.sd_model = None
    model_data.was_loaded_at_least_once = False
    model_data.loader = None
    model_data.loads = 0
    model_data.load_errors.clear()
    checkpoints_list.clear()
