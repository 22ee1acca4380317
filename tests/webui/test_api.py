"""REST routes with FastAPI's TestClient over the same stand-ins: same options object,
same validation and messages as the tab, 4xx on bad input, --api-auth honoured."""

from __future__ import annotations

import pytest
from lora_fixtures import FAST, fingerprint, snapshot


@pytest.fixture
def client(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from loraclr_ext.ui.api import mount

    app = FastAPI()
    mount(app, webui["ctx"])
    return TestClient(app)


LORAS = [{"name": "sks_dog", "prompt": "sks dog"}, {"name": "zwx_cat", "prompt": "zwx cat"}]


def test_version_publishes_option_schema(client):
    body = client.get("/loraclr/v1/version").json()
    assert body["api"] == 1
    props = body["options"]["properties"]
    assert props["steps"]["minimum"] == 0 and props["precision"]["enum"] == ["fp16", "bf16", "fp32"]
    assert "loras" in props


def test_loras_lists_everything_with_reasons(client):
    body = client.get("/loraclr/v1/loras").json()
    by_name = {e["name"]: e for e in body["loras"]}
    assert body["model_architecture"] == "SD 1.x"
    assert by_name["sks_dog"]["usable"] and by_name["sks_dog"]["triggers"] == ["sks dog"]
    assert by_name["zwx_cat"]["file"] == "people/zwx_cat.safetensors"
    assert not by_name["xl_style"]["usable"] and "SDXL" in by_name["xl_style"]["reason"]
    assert not by_name["broken"]["usable"]


def test_merge_writes_and_returns_file_and_prompt(client, webui):
    before = fingerprint(webui["model"])
    response = client.post(
        "/loraclr/v1/merge", json={"loras": LORAS, "output": "api_duo", "rank": None, **FAST}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file"] == "api_duo.safetensors"
    assert body["prompt"] == "<lora:api_duo:1>, sks dog, zwx cat"
    assert (webui["dir"] / "api_duo.safetensors").is_file()
    assert (webui["dir"] / "api_duo.json").is_file()
    assert webui["networks"].refresh_calls == 1
    assert webui["shared"].state.begun == 1
    assert fingerprint(webui["model"]) == before


BAD = [
    ({"loras": LORAS[:1]}, 400, "Select at least two LoRAs"),
    ({"loras": LORAS, "output": "a/b"}, 400, "path separator"),
    ({"loras": LORAS, "output": "sks_dog"}, 409, "already exists"),
    ({"loras": LORAS, "colour": "red"}, 400, "Unknown option(s): colour"),
    ({"loras": [LORAS[0], {"name": "zwx_cat", "prompt": ""}]}, 400, "is empty"),
    ({"loras": [LORAS[0], {"name": "xl_style", "prompt": "x"}]}, 400, "SDXL LoRA"),
    ({"loras": LORAS, "steps": 101}, 400, "steps must be ≤ 100"),
    ({"output": "x"}, 400, '"loras" must be a list'),
]


@pytest.mark.parametrize(("body", "status", "expected"), BAD)
def test_bad_requests_get_4xx_with_the_tab_message(client, webui, body, status, expected):
    files = snapshot(webui["dir"])
    response = client.post("/loraclr/v1/merge", json={**FAST, **body})
    assert response.status_code == status, response.text
    assert expected in response.json()["detail"]
    assert snapshot(webui["dir"]) == files


def test_no_checkpoint_is_409(client, webui):
    from modules import sd_models

    sd_models.model_data.sd_model = None
    response = client.post("/loraclr/v1/merge", json={"loras": LORAS, **FAST})
    assert response.status_code == 409
    assert response.json()["detail"].startswith("No checkpoint found: put")


def test_api_auth_is_honoured(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from loraclr_ext.ui.api import mount

    app = FastAPI()
    mount(app, webui["ctx"], "alice:secret,bob:pw")
    client = TestClient(app)
    assert client.get("/loraclr/v1/loras").status_code == 401
    assert client.get("/loraclr/v1/loras", auth=("alice", "wrong")).status_code == 401
    assert client.get("/loraclr/v1/loras", auth=("bob", "pw")).status_code == 200
    assert client.post("/loraclr/v1/merge", json={}).status_code == 401


def test_status_before_any_merge(client):
    body = client.get("/loraclr/v1/status").json()
    assert body == {"running": False, "output": None, "stage": None, "progress": None}


def test_status_after_a_merge_says_what_was_written(client, webui):
    response = client.post("/loraclr/v1/merge", json={"loras": LORAS, "output": "st", **FAST})
    assert response.status_code == 200, response.text
    body = client.get("/loraclr/v1/status").json()
    assert body["running"] is False and body["source"] == "api" and body["output"] == "st"
    assert body["progress"] == 1.0 and body["stage"] == "done" and body["eta_s"] is None
    assert body["outcome"] == "wrote st.safetensors"
    assert body["started"] <= body["finished"] and body["elapsed_s"] >= 0


def test_interrupt_with_nothing_running_is_409(client, webui):
    response = client.post("/loraclr/v1/interrupt")
    assert response.status_code == 409
    assert "No LoRACLR merge is running" in response.json()["detail"]
    assert not webui["shared"].state.interrupted


def test_interrupt_leaves_a_generation_alone(client, webui):
    """A txt2img job holds shared.state, no LoRACLR merge runs: 409, flag untouched; a
    merge that ended earlier does not count as running."""
    client.post("/loraclr/v1/merge", json={"loras": LORAS, "output": "old", **FAST})
    state = webui["shared"].state
    state.begin(job="task(txt2img)")
    response = client.post("/loraclr/v1/interrupt")
    assert response.status_code == 409
    assert not state.interrupted


def test_a_client_that_gave_up_can_see_and_stop_the_merge(client, webui):
    """While a REST merge runs (its client may have timed out), a second client sees it in
    /status and stops it with /interrupt: the merge ends 409 "interrupted", nothing is
    written, the model is as before, and /status says how it ended."""
    from fastapi.testclient import TestClient

    other = TestClient(client.app)
    model, seen = webui["model"], {}
    encode = model.get_learned_conditioning
    before, files = fingerprint(model), snapshot(webui["dir"])

    def look_and_stop(*args, **kwargs):
        if not seen:
            seen["status"] = other.get("/loraclr/v1/status").json()
            seen["interrupt"] = other.post("/loraclr/v1/interrupt")
        return encode(*args, **kwargs)

    model.get_learned_conditioning = look_and_stop
    response = client.post("/loraclr/v1/merge", json={"loras": LORAS, "output": "gave_up", **FAST})
    status = seen["status"]
    assert status["running"] is True and status["source"] == "api"
    assert status["output"] == "gave_up" and 0 <= status["progress"] < 1
    assert status["stage"] and status["finished"] is None
    assert seen["interrupt"].status_code == 200, seen["interrupt"].text
    assert seen["interrupt"].json()["interrupted"] is True
    assert response.status_code == 409 and "interrupted" in response.json()["detail"].lower()
    assert snapshot(webui["dir"]) == files and fingerprint(model) == before
    after = other.get("/loraclr/v1/status").json()
    assert after["running"] is False and "interrupted" in after["outcome"].lower()
    assert other.post("/loraclr/v1/interrupt").status_code == 409


def test_status_and_interrupt_need_credentials_with_api_auth(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from loraclr_ext.ui.api import mount

    app = FastAPI()
    mount(app, webui["ctx"], "alice:secret")
    client = TestClient(app)
    assert client.get("/loraclr/v1/status").status_code == 401
    assert client.post("/loraclr/v1/interrupt").status_code == 401
    assert client.get("/loraclr/v1/status", auth=("alice", "secret")).status_code == 200
