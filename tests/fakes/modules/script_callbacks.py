"""``modules.script_callbacks``: records registrations so tests can fire them."""

callbacks: dict[str, list] = {"ui_tabs": [], "ui_settings": [], "app_started": []}


def on_ui_tabs(callback, *, name=None):
    callbacks["ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks["ui_settings"].append(callback)


def on_app_started(callback, *, name=None):
    callbacks["app_started"].append(callback)
