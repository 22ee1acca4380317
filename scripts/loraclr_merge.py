"""LoRACLR Merge for AUTOMATIC1111: registers the tab, its settings and the REST routes.

Thin by design: everything else lives in the ``loraclr_ext`` package next to this folder,
imported here at module level because the WebUI puts the extension folder on ``sys.path``
only while this file is being imported (research/a1111.md §1.2).
"""

from __future__ import annotations

import os
import sys

from modules import script_callbacks, scripts, shared

EXTENSION_DIR = scripts.basedir() or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXTENSION_DIR not in sys.path:
    sys.path.insert(0, EXTENSION_DIR)

from loraclr_ext.ui.service import SETTINGS, WebuiContext, option_default  # noqa: E402

SECTION = ("loraclr", "LoRACLR Merge")
_context: WebuiContext | None = None


def context() -> WebuiContext:
    """The WebUI handles, gathered once (after the built-in Lora extension loaded)."""
    global _context
    if _context is None:
        _context = WebuiContext.from_webui()
    return _context


def on_ui_tabs():
    from loraclr_ext.ui.tab import create_tab

    tab, _ = create_tab(context())
    return [(tab, "LoRACLR Merge", "loraclr_merge")]


def on_ui_settings() -> None:
    import gradio as gr

    defaults = {
        "loraclr_default_rank": 0,
        "loraclr_default_steps": option_default("steps") or 0,
        "loraclr_default_size": option_default("size") or 0,
        "loraclr_default_precision": option_default("precision"),
        "loraclr_output_subfolder": "",
    }
    components = {
        "loraclr_default_precision": (gr.Radio, {"choices": ["fp16", "bf16", "fp32"]}),
        # 0 = auto: chosen for the device at merge time (GPU 12 steps at 512 px, CPU fewer)
        "loraclr_default_steps": (gr.Slider, {"minimum": 0, "maximum": 100, "step": 1}),
        "loraclr_default_size": (gr.Slider, {"minimum": 0, "maximum": 2048, "step": 8}),
        "loraclr_default_rank": (gr.Number, {"precision": 0, "minimum": 0}),
    }
    for key, (_, label) in SETTINGS.items():
        component, args = components.get(key, (None, None))
        shared.opts.add_option(
            key,
            shared.OptionInfo(
                defaults[key], label, component=component, component_args=args, section=SECTION
            ),
        )


def on_app_started(demo, app) -> None:
    from loraclr_ext.ui.api import mount

    mount(app, context(), getattr(shared.cmd_opts, "api_auth", None))


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
