"""LoRACLR Merge: contrastive merging of concept LoRAs into one exact kohya LoRA.

Kept import-light on purpose: the WebUI imports this package at start-up, so torch,
safetensors and gradio are imported by the submodules that need them, never here.
"""

__version__ = "0.1.0"
