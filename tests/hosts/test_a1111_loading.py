"""A1111 1.10 serves its API and UI while the checkpoint still loads in a background thread
(issue 9: a merge sent then was refused with "No checkpoint is loaded" while txt2img just
waited). The merge gets the model the way txt2img does (``model_data.get_sd_model()``,
what ``shared.sd_model`` returns), so it waits for the load; the LoRA list peeks and never
waits; "no checkpoint" is said only when there is none to load."""

from __future__ import annotations

import time

import pytest
import torch
from lora_fixtures import FAST, snapshot

from loraclr_ext.errors import NoModelError

LOAD_SECONDS = 1.5
ROWS = [("sks_dog", "sks dog"), ("zwx_cat", "zwx cat")]


def merge(ctx, output: str):
    from loraclr_ext.ui.service import ConceptRow, parse_options

    options = parse_options(ctx, {**FAST, "output": output})
    with ctx.job():
        return ctx.merge([ConceptRow(*r) for r in ROWS], options)


def test_merge_sent_while_the_checkpoint_loads_waits_for_it(webui, tiny):
    from modules import sd_models
    from sd_model import FakeSdModel

    ctx = webui["ctx"]
    sd_models.reset()  # just started: nothing loaded yet, the start-up thread loads it
    built = []

    encoded = []

    def build():
        model = FakeSdModel(tiny["pipe"])
        encode = model.get_learned_conditioning

        def counting(prompts):
            encoded.append(len(prompts))
            return encode(prompts)

        model.get_learned_conditioning = counting
        built.append(model)
        return model

    thread = sd_models.start_background_load(build, LOAD_SECONDS)
    started = time.perf_counter()
    entries = ctx.list_loras()
    listed = time.perf_counter() - started
    # The list does not wait for the load; architectures are unknown until it ends.
    assert listed < LOAD_SECONDS / 2, listed
    assert sd_models.model_data.sd_model is None and thread.is_alive()
    assert {e.name for e in entries} >= {"sks_dog", "zwx_cat"}
    assert ctx.model_architecture() is None
    result = merge(ctx, "while_loading")
    waited = time.perf_counter() - started
    thread.join(timeout=30)
    assert result.path.is_file() and result.path.stat().st_size > 0
    assert waited >= LOAD_SECONDS
    assert sd_models.model_data.loads == 1 and len(built) == 1  # waited, did not load twice
    assert sum(encoded) > 0  # the merge ran on the model the load produced
    assert sd_models.model_data.sd_model is built[0]
    assert ctx.model_architecture() is not None


def test_no_checkpoint_at_all_is_said_so(webui):
    from modules import sd_models

    sd_models.reset()  # no checkpoint files: the load A1111 tries fails
    files = snapshot(webui["dir"])
    with pytest.raises(NoModelError, match="No checkpoint found: put") as refused:
        merge(webui["ctx"], "nothing")
    assert "\n" not in str(refused.value)
    # Refused from the empty checkpoint list, before a load A1111 would fail noisily.
    assert sd_models.model_data.load_errors == []
    assert snapshot(webui["dir"]) == files


def test_model_loaded_on_demand_when_start_up_skipped_it(webui, tiny):
    """``--skip-load-model-at-start``: no thread; the merge's request loads the model, as
    txt2img's would."""
    from modules import sd_models
    from sd_model import FakeSdModel

    sd_models.reset()
    sd_models.set_checkpoint(lambda: FakeSdModel(tiny["pipe"]))
    assert webui["ctx"].model(load=False) is None
    result = merge(webui["ctx"], "on_demand")
    assert result.path.is_file() and sd_models.model_data.loads == 1
    assert isinstance(sd_models.model_data.sd_model, FakeSdModel)
    assert torch.is_tensor(sd_models.model_data.sd_model.alphas_cumprod)
