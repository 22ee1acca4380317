"""AUTOMATIC1111 WebUI integration: host adapter, tab, REST routes.

Only this subpackage may import ``modules.*``, ``gradio`` or ``fastapi``, and only inside
the functions that need them, so ``import loraclr_ext.webui`` stays cheap and importable
outside a WebUI.
"""
