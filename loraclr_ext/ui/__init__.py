"""WebUI integration: the gradio tab, the REST routes and the service both call.

The only code that imports ``gradio``, ``fastapi`` or ``modules.*`` (inside the functions that
need them, so importing this package stays cheap outside a WebUI)."""
