"""The tab with real gradio (3.41.2 and 4.40.0, one venv each): it builds, its handlers
merge through the WebUI stand-ins, and every bad input gives its message and leaves files
and weights alone."""

from __future__ import annotations

import importlib.util
import json
from html import unescape
from pathlib import Path

import pytest
from fixtures import WEBUI_GRADIO, component_ids, gradio_version, js_hooks
from lora_fixtures import FAST, fingerprint, snapshot

from loraclr_ext.pipeline.fields import option_fields

ROOT = Path(__file__).resolve().parents[2]


def tab(ctx):
    from loraclr_ext.ui.tab import create_tab

    return create_tab(ctx)


def values(**overrides):
    """Widget values in field order: defaults, FAST, then ``overrides``."""
    from loraclr_ext.ui.service import option_default

    merged = {f.name: option_default(f.name) for f in option_fields()}
    merged.update(rank=0, **FAST)
    merged.update(overrides)
    return [merged[f.name] for f in option_fields()]


ROWS = [["sks_dog", "sks dog", 1.0], ["zwx_cat", "zwx cat", 1.0]]


def run(ctx, rows, selected=None, **overrides):
    """Call the merge the way the Merge button does (through wrap_gradio_gpu_call); the
    ticked LoRAs are the rows' unless ``selected`` says otherwise."""
    _, h = tab(ctx)
    wrapped = ctx.call_queue.wrap_gradio_gpu_call(h.merge, extra_outputs=[""])
    ticked = [r[0] for r in rows] if selected is None else selected
    return wrapped("task(test)", ticked, rows, *values(**overrides))


def test_script_registers_tab_settings_and_routes(webui):
    import gradio as gr
    from fastapi import FastAPI
    from modules import script_callbacks, shared

    for callbacks in script_callbacks.callbacks.values():
        callbacks.clear()
    spec = importlib.util.spec_from_file_location(
        "loraclr_merge.py", ROOT / "scripts" / "loraclr_merge.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._context = webui["ctx"]
    (settings,) = script_callbacks.callbacks["ui_settings"]
    settings()
    assert shared.opts.data_labels["loraclr_default_steps"].section == ("loraclr", "LoRACLR Merge")
    assert shared.opts.loraclr_default_precision == "fp16"
    (ui_tabs,) = script_callbacks.callbacks["ui_tabs"]
    [(blocks, title, elem_id)] = ui_tabs()
    assert isinstance(blocks, gr.Blocks)
    assert (title, elem_id) == ("LoRACLR Merge", "loraclr_merge")
    app = FastAPI()
    (started,) = script_callbacks.callbacks["app_started"]
    started(None, app)
    paths = {r.path for r in app.routes}
    assert {"/loraclr/v1/version", "/loraclr/v1/loras", "/loraclr/v1/merge"} <= paths
    assert len((ROOT / "scripts" / "loraclr_merge.py").read_text().splitlines()) <= 250


def test_tab_builds_with_ids_widgets_and_list(webui):
    blocks, h = tab(webui["ctx"])
    ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    for name in (
        "search",
        "refresh",
        "list",
        "select",
        "concepts",
        "merge",
        "interrupt",
        "result",
        "prompt_tag",
        "send_txt2img",
        "task_id",
    ):
        assert f"loraclr_{name}" in ids
    assert {f"loraclr_opt_{f.name}" for f in option_fields()} <= ids
    # Every LoRA is listed (recursively); incompatible and corrupt ones with a reason and
    # not offered for selection.
    html = h.list_html()
    for name in ("sks_dog", "people/zwx_cat", "qpr_castle", "xl_style", "broken"):
        assert name in html
    assert "SDXL LoRA but the base model is SD 1.x" in html
    assert html.count("loraclr-incompatible") == 2
    assert sorted(h.choices()) == ["qpr_castle", "sks_dog", "zwx_cat"]
    assert "zwx_cat" in h.list_html("zwx") and "sks_dog" not in h.list_html("zwx")


@pytest.mark.parametrize("version", [gradio_version()])
def test_tab_config_for_the_running_gradio(webui, version):
    """Names the gradio under test (the id shows it in the CI log) and checks the tab's
    frontend config for it: its ids, and the three JS hooks registered through the
    keyword this version takes (``_js=`` in 3, ``js=`` in 4)."""
    import gradio as gr

    from loraclr_ext.ui.tab import gradio_major, js

    assert version == gr.__version__ and version in WEBUI_GRADIO
    assert gradio_major() == int(version.split(".")[0])
    assert js("f") == ({"_js": "f"} if version.startswith("3.") else {"js": "f"})
    blocks, _ = tab(webui["ctx"])
    ids = component_ids(blocks)
    assert all(i.startswith("loraclr_") for i in ids)
    assert {"loraclr_select", "loraclr_concepts", "loraclr_merge", "loraclr_result"} <= ids
    assert js_hooks(blocks) == {"loraclrStartMerge", "loraclrRefreshCards", "loraclrSendToTxt2img"}


def test_select_prefills_triggers_and_keeps_edits(webui):
    _, h = tab(webui["ctx"])
    rows = h.select(["sks_dog"], [])
    assert rows == [["sks_dog", "sks dog", 1.0]]
    rows[0][1] = "sks dog, edited"
    rows = h.select(["sks_dog", "zwx_cat"], rows)
    assert rows == [["sks_dog", "sks dog, edited", 1.0], ["zwx_cat", "zwx cat", 1.0]]


def test_refresh_rescans_host_list(webui):
    _, h = tab(webui["ctx"])
    (webui["dir"] / "sks_dog.safetensors").rename(webui["dir"] / "renamed.safetensors")
    html, update = h.refresh("")
    assert webui["networks"].refresh_calls == 1
    assert "renamed" in html and "renamed" in update["choices"]


def test_merge_writes_file_sidecar_report_and_refreshes(webui):
    before = fingerprint(webui["model"])
    tag, html = run(webui["ctx"], ROWS, output="duo", quality=True)
    out = webui["dir"] / "duo.safetensors"
    assert out.is_file() and (webui["dir"] / "duo.json").is_file()
    sidecar = json.loads((webui["dir"] / "duo.json").read_text())
    assert sidecar["sd version"] == "SD1" and "sks dog" in sidecar["activation text"]
    assert tag == "<lora:duo:1>, sks dog, zwx cat"
    assert "duo.safetensors" in html and "loraclr-report" in html and "loraclr-bar" in html
    assert webui["networks"].refresh_calls == 1
    assert webui["shared"].state.begun == 1  # ran as a WebUI job under the queue lock
    assert webui["model"].apply_calls > 0
    assert fingerprint(webui["model"]) == before


def test_merge_follows_the_ticked_loras_when_the_table_lags(webui):
    """Two LoRAs ticked, the second row not yet in the table: both are merged (the new
    row with its metadata triggers); an unticked row is left out."""
    tag, html = run(webui["ctx"], ROWS[:1], selected=["sks_dog", "zwx_cat"], output="lag")
    assert tag == "<lora:lag:1>, sks dog, zwx cat", unescape(html)
    assert (webui["dir"] / "lag.safetensors").is_file()
    three = [*ROWS, ["qpr_castle", "qpr castle", 1.0]]
    tag, _ = run(webui["ctx"], three, selected=["sks_dog", "qpr_castle"], output="two")
    assert tag == "<lora:two:1>, sks dog, qpr castle"


BAD = [
    ("one LoRA", ROWS[:1], {}, "Select at least two LoRAs"),
    ("incompatible", [ROWS[0], ["xl_style", "xl", 1.0]], {}, "SDXL LoRA"),
    ("corrupt", [ROWS[0], ["broken", "b", 1.0]], {}, "broken.safetensors"),
    ("unknown", [ROWS[0], ["nope", "n", 1.0]], {}, "No LoRA named 'nope'"),
    ("empty prompt", [ROWS[0], ["zwx_cat", "  ", 1.0]], {}, "is empty"),
    ("duplicate prompt", [ROWS[0], ["zwx_cat", "SKS dog", 1.0]], {}, "same concept prompt"),
    ("bad name", ROWS, {"output": "a/b"}, "path separator"),
    ("existing", ROWS, {"output": "sks_dog"}, "already exists"),
    ("bad steps", ROWS, {"steps": 101}, "steps must be ≤ 100"),
]


@pytest.mark.parametrize(("case", "rows", "opts", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_message_and_nothing_written(webui, case, rows, opts, expected):
    files, before = snapshot(webui["dir"]), fingerprint(webui["model"])
    tag, html = run(webui["ctx"], rows, **opts)
    html = unescape(html)
    assert tag == ""
    assert "loraclr-error" in html and expected in html, html
    assert snapshot(webui["dir"]) == files
    assert fingerprint(webui["model"]) == before
    assert webui["model"].apply_calls == 0


def test_no_checkpoint_file(webui):
    from modules import sd_models

    sd_models.model_data.sd_model = None
    files = snapshot(webui["dir"])
    _, html = run(webui["ctx"], ROWS)
    assert "No checkpoint found: put" in html
    assert snapshot(webui["dir"]) == files


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("is_sdxl", "SD 1.x LoRA but the base model is SDXL"),
        ("is_sd2", "SD 1.x LoRA but the base model is SD 2.x"),
        ("is_ssd", "(SD3 / SSD-1B) is not supported"),
        ("is_sd3", "(SD3 / SSD-1B) is not supported"),
    ],
)
def test_other_families_refused_clearly(webui, flag, expected):
    """SD1 LoRAs on an SD 2.x / SDXL checkpoint, or any merge on SD3 / SSD-1B: the
    message, no file, no weight touched."""
    setattr(webui["model"], flag, True)
    files, before = snapshot(webui["dir"]), fingerprint(webui["model"])
    _, html = run(webui["ctx"], ROWS)
    assert expected in unescape(html), html
    assert snapshot(webui["dir"]) == files
    assert fingerprint(webui["model"]) == before
    assert webui["model"].apply_calls == 0


def test_out_of_memory_says_what_to_lower(webui, monkeypatch):
    import torch

    import loraclr_ext.engine

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loraclr_ext.engine, "run_merge", oom)
    files = snapshot(webui["dir"])
    _, html = run(webui["ctx"], ROWS)
    # The stand-in host runs on the CPU, so it is the CPU's memory that ran out.
    assert "Out of CPU memory" in html and "Lower the image size" in html
    assert snapshot(webui["dir"]) == files


def test_interrupt_stops_writes_nothing_restores_host_loras(webui):
    """Interrupt mid-merge while the Lora extension has a LoRA merged into a weight: no
    file, and the model (LoRA-merged weight included) is exactly as before."""
    import torch

    model, networks = webui["model"], webui["networks"]
    layer = model.model.diffusion_model.get_submodule(
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    )
    layer.network_weights_backup = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.25)
    layer.network_current_names = (("other", 1.0, 1.0, None),)
    networks.loaded_networks.append("other")
    before, files = fingerprint(model), snapshot(webui["dir"])
    encode, state = model.get_learned_conditioning, webui["shared"].state

    def press_interrupt(*args, **kwargs):
        # The clean base weight is in place while the merge runs.
        assert torch.equal(layer.weight, layer.network_weights_backup)
        state.interrupt()
        return encode(*args, **kwargs)

    model.get_learned_conditioning = press_interrupt
    _, html = run(webui["ctx"], ROWS)
    assert "interrupted" in html.lower()
    assert snapshot(webui["dir"]) == files
    assert fingerprint(model) == before
    assert layer.network_current_names == (("other", 1.0, 1.0, None),)
    assert networks.loaded_networks == ["other"]


def test_interrupt_button_stops_only_a_loraclr_merge(webui):
    """The tab's Interrupt raises the flag while a LoRACLR merge runs (the interrupt test
    above) and leaves a generation started elsewhere alone."""
    _, h = tab(webui["ctx"])
    webui["shared"].state.begin(job="task(txt2img)")
    h.interrupt()
    assert not webui["shared"].state.interrupted


def props(blocks, elem_id):
    return next(
        c["props"] for c in blocks.config["components"] if c["props"].get("elem_id") == elem_id
    )


def test_first_view_hint_no_blank_row_send_disabled_rank_exact(webui):
    """Before anything is ticked: the hint (style.css then hides the concept table's
    default empty row, which gradio 4 drew as a blank row with strength 0; test_browser.py
    checks it); "Send to txt2img" disabled; the rank field at 0 with "0 = exact" in its
    label and help."""
    blocks, h = tab(webui["ctx"])
    assert "Tick two or more LoRAs" in props(blocks, "loraclr_concepts_hint")["value"]
    assert props(blocks, "loraclr_send_txt2img")["interactive"] is False
    rank = props(blocks, "loraclr_opt_rank")
    assert rank["value"] == 0 and rank["label"] == "Rank (0 = exact)"
    assert "0 = exact" in rank["info"] and "empty" not in rank["info"]
    table, hint = h.select_view(["sks_dog"], None)
    assert table == [["sks_dog", "sks dog", 1.0]] and hint["visible"] is False
    table, hint = h.select_view([], table)
    assert table == [] and hint["visible"] is True
    assert h.send_state("")["interactive"] is False
    assert h.send_state("<lora:x:1>, sks dog")["interactive"] is True


def test_list_after_a_merge_counts_the_new_file(webui):
    """What the Merge button's chain shows next: the rescanned list with the new file."""
    _, h = tab(webui["ctx"])
    assert "5 of 5 LoRAs shown" in h.list_html()
    run(webui["ctx"], ROWS, output="fresh")
    html, update = h.refresh("", ["sks_dog", "zwx_cat"])
    assert "6 of 6 LoRAs shown" in html and "fresh.safetensors" in html
    assert "fresh" in update["choices"]
    # the ticked LoRAs are sent back by name with the new choices (gradio 4.40 otherwise
    # kept the ticks by position: "fresh" sorts first, and two other LoRAs showed ticked)
    assert update["value"] == ["sks_dog", "zwx_cat"]


def _component(blocks, elem_id):
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_float_fields_keep_fractions_and_int_fields_whole_numbers(webui):
    """A live run found the memory budget field rounding 0.05 GB to 0 (auto) and the
    browser marking 0.05 invalid: every zero-means-auto field had ``precision=0, step=1``."""
    blocks, _ = tab(webui["ctx"])
    budget = _component(blocks, "loraclr_opt_memory_budget")
    assert budget.preprocess(0.05) == pytest.approx(0.05)
    assert props(blocks, "loraclr_opt_memory_budget")["step"] <= 0.01
    margin = _component(blocks, "loraclr_opt_margin")
    assert margin.preprocess(0.25) == pytest.approx(0.25)
    for name in ("rank", "steps", "size", "iterations"):
        assert _component(blocks, f"loraclr_opt_{name}").preprocess(7.6) == 8
        assert props(blocks, f"loraclr_opt_{name}")["step"] == 1
