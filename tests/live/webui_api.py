"""A running WebUI's REST API, over the standard library's HTTP client."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

FAST_MERGE = {"steps": 1, "size": 64, "iterations": 0, "quality": False}
"""Merge options that keep a real SD 1.5 merge to a minute or two on a CPU."""
IMAGE = {
    "width": 64,
    "height": 64,
    "steps": 2,
    "seed": 1234,
    "sampler_name": "Euler",
    "override_settings": {"emphasis": "No norm"},
}
"""A seeded small txt2img. "Original" emphasis rescales the conditioning by the ratio of its
means before and after weighting, 0/0 = NaN (a black image) when the text encoder's last
layer norm is the identity, as in a random-weight checkpoint: its output has mean zero by
construction, and Forge and reForge hit an exact 0.0 for some prompts (trained weights do
not)."""


@dataclass
class Reply:
    status: int
    body: Any


@dataclass
class WebUI:
    """A running WebUI's REST API (stdlib HTTP only)."""

    url: str
    timeout: float = 1800.0
    calls: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        self.calls.append(f"{method} {path}")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return Reply(response.status, json.loads(response.read() or b"null"))
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return Reply(exc.code, json.loads(raw))
            except ValueError:
                return Reply(exc.code, raw.decode(errors="replace"))

    def wait_until_up(self, seconds: float = 600.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.call("GET", "/loraclr/v1/version", timeout=10).status == 200:
                    return
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"{self.url} did not answer /loraclr/v1/version in {seconds} s")

    def generate(self, prompt: str) -> str:
        """One seeded txt2img image, as the base64 PNG the WebUI returns."""
        reply = self.call("POST", "/sdapi/v1/txt2img", {"prompt": prompt, **IMAGE})
        assert reply.status == 200, reply.body
        return reply.body["images"][0]

    def merge(self, loras: list[dict], output: str, **options: Any) -> Reply:
        body = {"loras": loras, "output": output, **FAST_MERGE, **options}
        return self.call("POST", "/loraclr/v1/merge", body)

    def progress_text(self) -> str:
        reply = self.call("GET", "/sdapi/v1/progress?skip_current_image=true", timeout=30)
        if reply.status != 200:
            return ""
        return str(reply.body.get("textinfo") or reply.body.get("state", {}).get("textinfo") or "")

    def merge_in_background(self, loras: list[dict], output: str, **options: Any):
        """Start a merge on a thread; returns (thread, result holder)."""
        holder: dict[str, Reply] = {}

        def run() -> None:
            holder["reply"] = self.merge(loras, output, **options)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, holder


def decode(image: str) -> tuple[str, tuple[int, int], bytes]:
    """The pixels of a base64 PNG the WebUI returned: (mode, size, raw bytes). The PNG file
    itself also carries the generation's info text, which names the LoRAs' hashes and can
    differ when the WebUI re-read its LoRA list, so images are compared by their pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[-1]))) as img:
        return img.mode, img.size, img.tobytes()
