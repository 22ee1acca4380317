"""REST routes ``/loraclr/v1/*`` (documented in the README; the version is in the path).

* ``GET /loraclr/v1/version`` -> extension and API version, option schema.
* ``GET /loraclr/v1/loras`` -> every LoRA in the Lora folder, with ``usable``/``reason``.
* ``POST /loraclr/v1/merge`` -> ``{"file", "path", "prompt", "triggers", "seconds",
  "report", "preview", "notes"}`` (``preview``: ``null`` unless asked for with ``"preview": true``,
  else ``{"png_base64", "summary", "seconds", "cells", "note"}``); bad input -> HTTP 4xx
  ``{"detail": message}`` with the tab's message.
* ``GET /loraclr/v1/status`` -> the running or last LoRACLR merge (tab or REST):
  ``{"running", "output", "source", "stage", "progress", "started", "elapsed_s", "eta_s",
  "finished", "outcome"}``; for a client whose ``merge`` request timed out.
* ``POST /loraclr/v1/interrupt`` -> stops the running LoRACLR merge (the engine polls the
  WebUI's interrupt flag; nothing is written) and answers the status; HTTP 409 when no
  LoRACLR merge runs, so a txt2img job is never interrupted from here.

The merge holds the WebUI's generation lock. With ``--api-auth user:pass[,…]`` every route
needs HTTP Basic credentials, like the WebUI's own API.
"""

# No ``from __future__ import annotations``: FastAPI must see the route signatures' real types.
import base64
import secrets
from typing import Any

from loraclr_ext import __version__
from loraclr_ext.errors import (
    InvalidInputError,
    LoraClrError,
    MergeInterruptedError,
    NoModelError,
    OutOfMemoryMergeError,
    OutputExistsError,
)
from loraclr_ext.pipeline.fields import options_schema
from loraclr_ext.ui.service import (
    ConceptRow,
    WebuiContext,
    parse_options,
    user_message,
)

API_VERSION = 1
PREFIX = f"/loraclr/v{API_VERSION}"


def status_code(exc: BaseException) -> int:
    """HTTP status for a merge failure (all 4xx: the request cannot be served as sent)."""
    if isinstance(exc, OutputExistsError | NoModelError | MergeInterruptedError):
        return 409
    if isinstance(exc, OutOfMemoryMergeError):
        return 413
    if isinstance(exc, LoraClrError | ValueError | TypeError):
        return 400
    return 500


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``--api-auth`` ("user:pass,user2:pass2") -> {user: password}."""
    creds = {}
    for item in (api_auth or "").split(","):
        if ":" in item:
            user, password = item.strip().split(":", 1)
            creds[user] = password
    return creds


def _concepts(body: dict[str, Any]) -> list[ConceptRow]:
    loras = body.get("loras")
    if not isinstance(loras, list):
        raise InvalidInputError('"loras" must be a list of {"name", "prompt", "strength"}.')
    rows = []
    for item in loras:
        if not isinstance(item, dict) or not {"name", "prompt"} <= set(item):
            raise InvalidInputError('Each entry of "loras" needs "name" and "prompt".')
        unknown = sorted(set(item) - {"name", "prompt", "strength"})
        if unknown:
            raise InvalidInputError(f'Unknown key(s) in a "loras" entry: {", ".join(unknown)}.')
        rows.append(ConceptRow(str(item["name"]), str(item["prompt"]), item.get("strength", 1.0)))
    return rows


def merge_response(result: Any) -> dict[str, Any]:
    return {
        "file": result.path.name,
        "path": str(result.path),
        "prompt": result.prompt_tag,
        "triggers": result.triggers,
        "seconds": result.seconds,
        "report": result.report.to_dict() if result.report is not None else None,
        "preview": preview_json(result),
        "notes": list(getattr(result, "notes", [])),
    }


def preview_json(result: Any) -> dict[str, Any] | None:
    """The preview grid (PNG, base64) with its cells, or why there is none; ``None`` when
    no preview was asked for."""
    grid = getattr(result, "preview", None)
    note = getattr(result, "preview_note", "")
    if grid is None:
        return {"png_base64": None, "note": note} if note else None
    return {
        "png_base64": base64.b64encode(grid.png()).decode("ascii"),
        "note": "",
        "summary": grid.summary(),
        "seconds": grid.seconds,
        "cells": [{"label": c.label, "prompt": c.prompt_with_tags()} for c in grid.cells],
    }


def mount(app: Any, ctx: WebuiContext, api_auth: str | None = None) -> None:
    """Add the routes to ``app`` (a FastAPI app; called from ``on_app_started``)."""
    from fastapi import Body, Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    creds = parse_credentials(api_auth)
    basic = HTTPBasic(auto_error=False)

    def auth(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:  # noqa: B008
        if not creds:
            return
        if credentials is not None and credentials.username in creds:
            expected = creds[credentials.username]
            if secrets.compare_digest(credentials.password, expected):
                return
        raise HTTPException(
            status_code=401,
            detail="Incorrect username or password",
            headers={"WWW-Authenticate": "Basic"},
        )

    deps = [Depends(auth)]

    def version() -> dict[str, Any]:
        return {"version": __version__, "api": API_VERSION, "options": options_schema()}

    def loras() -> dict[str, Any]:
        arch = ctx.model_architecture()
        return {
            "model_architecture": arch.label if arch else None,
            "loras": [e.to_dict() for e in ctx.list_loras()],
        }

    def merge(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        try:
            if not isinstance(body, dict):
                raise InvalidInputError("The request body must be a JSON object.")
            rows = _concepts(body)
            options = parse_options(ctx, {k: v for k, v in body.items() if k != "loras"})
            with ctx.job("loraclr-merge (API)"):
                result = ctx.merge(rows, options, source="api")
        except Exception as exc:  # every failure -> its message with a 4xx status
            raise HTTPException(status_code=status_code(exc), detail=user_message(exc)) from exc
        return merge_response(result)

    def status() -> dict[str, Any]:
        return ctx.status()

    def interrupt() -> dict[str, Any]:
        if not ctx.interrupt():
            raise HTTPException(
                status_code=409, detail="No LoRACLR merge is running; nothing to interrupt."
            )
        return {"interrupted": True, "status": ctx.status()}

    app.add_api_route(f"{PREFIX}/version", version, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/loras", loras, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/merge", merge, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/interrupt", interrupt, methods=["POST"], dependencies=deps)
