"""Model-runtime adapters for the WebUIs (AUTOMATIC1111, Forge, reForge).

They work on the objects the WebUI hands over (``sd_model``, its memory manager) and import no
gradio, fastapi or ``modules.*``, so they are tested without a WebUI."""
