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
    assert "No checkpoint is loaded" in response.json()["detail"]


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
