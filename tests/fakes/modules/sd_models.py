"""``modules.sd_models``: ``model_data.sd_model`` peeks at the loaded model."""

from types import SimpleNamespace

model_data = SimpleNamespace(sd_model=None)
