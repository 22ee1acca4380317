"""The "LoRACLR Merge" tab, for gradio 3.41.2 (A1111 1.10, reForge) and 4.40.0 (Forge).

Only the API both versions share is used: components built with keyword arguments both
accept, ``gr.update(...)`` dicts (never ``gr.X.update``), no ``.style()``; the one
difference, the keyword naming an event's JavaScript function, goes through :func:`js`.
Handlers are plain methods of :class:`TabHandlers` so tests can call them directly as
well as through the built Blocks. Element ids are ``loraclr_*``.
"""

from __future__ import annotations

from typing import Any

from loraclr_ext.files.triggers import Triggers, concept_prompts
from loraclr_ext.pipeline.fields import FieldSpec, option_fields
from loraclr_ext.ui import render
from loraclr_ext.ui.service import ConceptRow, WebuiContext, parse_options, user_message

HEADERS = ["LoRA", "concept prompt", "strength"]
CONCEPTS_HINT = (
    "<p class='loraclr-concepts-hint'>Tick two or more LoRAs above: each gets a row in "
    "this table with its concept prompt (from its trigger words) and strength.</p>"
)


class TabHandlers:
    """The tab's event handlers over one :class:`WebuiContext`."""

    def __init__(self, ctx: WebuiContext) -> None:
        self.ctx = ctx
        self.specs = option_fields()

    # -- list

    def choices(self) -> list[str]:
        """Names offered for selection: usable (compatible, readable) LoRAs only."""
        return [e.name for e in self.ctx.list_loras() if e.usable]

    def list_html(self, query: str = "") -> str:
        shown = self.ctx.list_loras(query or "")
        return render.lora_table(shown, len(self.ctx.list_loras()))

    def refresh(self, query: str = "", selected: list[str] | None = None) -> tuple[str, Any]:
        """Rescan the Lora folder: new table, new selector choices, and the ticked LoRAs
        that still exist sent back with them (gradio 4.40 keeps a multiselect's choice by
        position: given only new choices, it showed other LoRAs as ticked)."""
        import gradio as gr

        self.ctx.refresh_networks()
        choices = self.choices()
        kept = [name for name in selected or [] if name in choices]
        return self.list_html(query), gr.update(choices=choices, value=kept)

    def on_page_load(self, query: str = "", selected: list[str] | None = None) -> tuple[str, Any]:
        """The list as the folder holds it now, when a browser opens the page: the tab is
        built once at start-up, and files added since (a REST merge, a download) were
        missing until a restart. A plain rescan: the WebUI's own caches are left alone."""
        import gradio as gr

        choices = self.choices()
        kept = [name for name in selected or [] if name in choices]
        return self.list_html(query), gr.update(choices=choices, value=kept)

    def select(self, selected: list[str] | None, rows: Any) -> list[list[Any]]:
        """Concept rows for the selection: kept rows keep their edits, new rows get the
        LoRA's triggers as prompt and strength 1 (top tags that another selected LoRA
        also has are left out: :func:`loraclr_ext.files.triggers.concept_prompts`)."""
        current = {r[0]: r for r in _rows(rows)}
        chosen = set(selected or [])
        found = {
            e.name: e.found or Triggers(list(e.triggers))
            for e in self.ctx.list_loras()
            if e.name in chosen
        }
        triggers = concept_prompts(found)
        out = []
        for name in selected or []:
            if name in current:
                out.append(list(current[name]))
            else:
                out.append([name, ", ".join(triggers.get(name, [])), 1.0])
        return out

    def select_view(self, selected: list[str] | None, rows: Any) -> tuple[Any, Any]:
        """The selector's event: the concept rows, and the hint shown while there are
        none."""
        import gradio as gr

        new = self.select(selected, rows)
        return new, gr.update(visible=not new)

    @staticmethod
    def send_state(tag: str | None) -> Any:
        """The "Send to txt2img" button is usable only once a merge produced a tag."""
        import gradio as gr

        return gr.update(interactive=bool((tag or "").strip()))

    # -- merge

    def merge(
        self, task_id: str, selected: list[str] | None, rows: Any, *values: Any
    ) -> tuple[str, str]:
        """Run one merge; returns (prompt tag, result HTML). Never raises for bad input:
        the message goes to the panel and nothing is written.

        The ticked LoRAs decide what is merged: the concept table is reconciled with them
        first, because a quick second tick can reach the table after Merge was pressed
        (seen in a real A1111: two ticked, one row, "select at least two")."""
        try:
            options = parse_options(self.ctx, self.option_values(values))
            concepts = [
                ConceptRow(str(r[0]), str(r[1] or ""), _strength(r[2]))
                for r in self.select(selected, rows)
            ]
            result = self.ctx.merge(concepts, options)
        except Exception as exc:  # every failure becomes a panel message
            return "", render.message(user_message(exc))
        return result.prompt_tag, render.result_panel(result)

    def option_values(self, values: tuple[Any, ...]) -> dict[str, Any]:
        """Widget values (in :func:`option_fields` order) -> option dict."""
        out = {}
        for spec, value in zip(self.specs, values, strict=True):
            if spec.kind == "int" and value is not None:
                value = int(value)
            elif spec.kind == "float" and value is not None:
                value = float(value)
            out[spec.name] = value
        return out

    def interrupt(self) -> None:
        """Stop the running LoRACLR merge; a generation started elsewhere is left alone."""
        self.ctx.interrupt()


def _rows(rows: Any) -> list[list[Any]]:
    """Dataframe value (list of lists, or a pandas frame) -> rows with a LoRA name."""
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):
        rows = rows.values.tolist()
    return [list(r) + [""] * (3 - len(r)) for r in rows if r and str(r[0]).strip()]


def _strength(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else 1.0
    except (TypeError, ValueError):
        return float("nan")  # the engine's strength check reports it


def gradio_major() -> int:
    """Major version of the installed gradio (3 on A1111 1.10 / reForge, 4 on Forge)."""
    import gradio as gr

    return int(gr.__version__.split(".", 1)[0])


def js(function: str) -> dict[str, str]:
    """Event-listener keyword running the global JS ``function`` before (or instead of) the
    Python handler: ``_js=`` in gradio 3, ``js=`` in gradio 4 (gradio 3 rejects ``js=``;
    plain gradio 4 rejects ``_js=``, only Forge's shim renames it)."""
    return {"js" if gradio_major() >= 4 else "_js": function}


FLOAT_STEP = 0.01
"""Arrow-key step of float fields (a memory budget of 0.05 GB, a margin of 0.25)."""


def _widget(spec: FieldSpec, default: Any) -> Any:
    import gradio as gr

    common = {"label": spec.label, "info": spec.help, "elem_id": f"loraclr_opt_{spec.name}"}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(default), **common)
    if spec.kind == "choice":
        return gr.Radio(choices=list(spec.choices), value=default, **common)
    if spec.kind == "text":
        return gr.Textbox(value=default or "", **common)
    bounds = {k: v for k, v in (("minimum", spec.minimum), ("maximum", spec.maximum)) if v}
    # gradio rounds a Number to ``precision`` before the handler sees it, and the browser
    # refuses values off ``step``: a float field needs neither set to whole numbers
    whole = spec.kind == "int"
    kind = {"precision": 0, "step": 1} if whole else {"precision": None, "step": FLOAT_STEP}
    if spec.zero:  # optional numbers show their "exact"/"auto" choice as 0
        return gr.Number(value=default or 0, minimum=0, **kind, **common)
    return gr.Number(value=default, **bounds, **kind, **common)


def create_tab(ctx: WebuiContext) -> tuple[Any, TabHandlers]:
    """Build the tab's Blocks; returns it with its handlers."""
    import gradio as gr

    h = TabHandlers(ctx)
    defaults = ctx.default_options()
    with gr.Blocks(analytics_enabled=False) as tab:
        task_id = gr.Textbox(visible=False, elem_id="loraclr_task_id")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    search = gr.Textbox(
                        label="Search", placeholder="name, trigger, SD1…", elem_id="loraclr_search"
                    )
                    refresh = gr.Button("🔄 Refresh", elem_id="loraclr_refresh", scale=0)
                table = gr.HTML(h.list_html(), elem_id="loraclr_list")
                selector = gr.Dropdown(
                    choices=h.choices(),
                    multiselect=True,
                    label="LoRAs to merge (incompatible ones are not offered)",
                    elem_id="loraclr_select",
                )
                # Until a LoRA is ticked, style.css hides the table's rows while the hint
                # below shows: gradio's one default empty row came out in gradio 4.40 as a
                # blank row with strength 0 (a table of no rows crashes gradio 4.40's
                # frontend, and one mounted hidden misplaced its double-clicks).
                concepts = gr.Dataframe(
                    headers=HEADERS,
                    datatype=["str", "str", "number"],
                    col_count=(3, "fixed"),
                    type="array",
                    interactive=True,
                    label="Concepts: prompt with trigger words, and strength",
                    elem_id="loraclr_concepts",
                )
                hint = gr.HTML(CONCEPTS_HINT, elem_id="loraclr_concepts_hint")
            with gr.Column(scale=2):
                widgets = []
                for spec in h.specs:
                    if not spec.advanced:
                        widgets.append(_widget(spec, defaults[spec.name]))
                with gr.Accordion("Advanced", open=False):
                    for spec in h.specs:
                        if spec.advanced:
                            widgets.append(_widget(spec, defaults[spec.name]))
                order = {w.elem_id: w for w in widgets}
                widgets = [order[f"loraclr_opt_{s.name}"] for s in h.specs]
                with gr.Row():
                    merge = gr.Button("Merge", variant="primary", elem_id="loraclr_merge")
                    stop = gr.Button("Interrupt", elem_id="loraclr_interrupt")
                gr.HTML(render.PROGRESS_AREA, elem_id="loraclr_progress")
                result = gr.HTML(elem_id="loraclr_result")
                with gr.Row():
                    tag = gr.Textbox(
                        label="Use in a prompt",
                        interactive=False,
                        show_copy_button=True,
                        elem_id="loraclr_prompt_tag",
                    )
                    send = gr.Button(
                        "Send to txt2img",
                        elem_id="loraclr_send_txt2img",
                        scale=0,
                        interactive=False,
                    )

        tab.load(h.on_page_load, inputs=[search, selector], outputs=[table, selector], queue=False)
        search.change(h.list_html, inputs=[search], outputs=[table], queue=False)
        refresh.click(h.refresh, inputs=[search, selector], outputs=[table, selector])
        # Outside the queue, like the search box: a cheap update that must not wait
        # behind (or be merged with) the previous tick's.
        selector.change(
            h.select_view, inputs=[selector, concepts], outputs=[concepts, hint], queue=False
        )
        run = ctx.call_queue.wrap_gradio_gpu_call(h.merge, extra_outputs=[""])
        # After the merge: rescan the list (new file, new count) and let the txt2img /
        # img2img Lora cards refresh. One step with both a Python and a JS function: in
        # gradio 3.41 a step with only a JS function never starts the step chained after it,
        # which left the list at its old count until a restart.
        merge.click(
            run,
            inputs=[task_id, selector, concepts, *widgets],
            outputs=[tag, result],
            **js("loraclrStartMerge"),
        ).then(
            h.refresh,
            inputs=[search, selector],
            outputs=[table, selector],
            **js("loraclrRefreshCards"),
        )
        stop.click(h.interrupt, queue=False)
        tag.change(h.send_state, inputs=[tag], outputs=[send], queue=False)
        send.click(fn=None, inputs=[tag], **js("loraclrSendToTxt2img"))
    tab.loraclr_handlers = h
    return tab, h
