"""What the tab and the REST routes share: WebUI handles, the LoRA list, one merge call.

Nothing here imports gradio or fastapi; ``modules.*`` is imported only in
:meth:`WebuiContext.from_webui`, so tests can hand in small stand-ins.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loraclr_ext.errors import InvalidInputError, LoraClrError, NoModelError
from loraclr_ext.files.triggers import Triggers
from loraclr_ext.hosts.webui.detect import is_loaded, model_architecture
from loraclr_ext.hosts.webui.make import forget_cached_loras
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions
from loraclr_ext.ui.progress import PreviewProgress, Snapshot, StateProgress

log = logging.getLogger("loraclr")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
NO_CHECKPOINT_FILE = (
    "No checkpoint found: put an SD 1.x, SD 2.x or SDXL checkpoint in models/Stable-diffusion, "
    "pick it in the checkpoint menu, then merge."
)
SETTINGS = {
    # setting key -> (MergeOptions field or None, label)
    "loraclr_default_rank": ("rank", "Default target rank (0 = exact)"),
    "loraclr_default_steps": ("steps", "Default denoising steps recorded per concept (0 = auto)"),
    "loraclr_default_size": ("size", "Default image size (px) of the recording run (0 = auto)"),
    "loraclr_default_precision": ("precision", "Default precision of the saved file"),
    "loraclr_output_subfolder": (None, "Subfolder of the Lora folder for merged files"),
}


def option_default(name: str) -> Any:
    """The :class:`MergeOptions` default of field ``name``."""
    return next(f.default for f in fields(MergeOptions) if f.name == name)


@dataclass
class LoraEntry:
    """One row of the LoRA list."""

    name: str
    file: str
    architecture: str
    format: str
    rank: int | None
    triggers: list[str]
    reason: str | None
    trigger_source: str = ""
    """Where :attr:`triggers` came from (:data:`loraclr_ext.files.triggers.SOURCES`)."""
    found: Triggers | None = field(default=None, repr=False)
    """The triggers with the file's tags, for the concept table's pre-fill."""

    @property
    def usable(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "found"}
        return {**data, "usable": self.usable}


@dataclass
class ConceptRow:
    """A selected LoRA (by list name), its concept prompt and strength."""

    name: str
    prompt: str
    strength: float = 1.0


@dataclass
class WebuiContext:
    """The WebUI objects the extension uses, gathered in one place.

    Attributes:
        shared: ``modules.shared`` (``opts``, ``state``, ``cmd_opts``).
        sd_models: ``modules.sd_models`` (``model_data.get_sd_model()`` loads or waits for a
            load, ``model_data.sd_model`` peeks without either).
        devices: ``modules.devices``.
        call_queue: ``modules.call_queue`` (``queue_lock``, ``wrap_gradio_gpu_call``).
        networks: the built-in Lora extension's ``networks`` module, or ``None``.
        processing: ``modules.processing`` (txt2img for the preview grid), or ``None``.
        scripts: ``modules.scripts`` (an empty script runner for each preview image), or
            ``None``.
        paths: ``modules.paths`` (``data_path``), or ``None``.
        check_shapes: check LoRA shapes against the real model sizes (off for tiny models).
    """

    shared: Any
    sd_models: Any
    devices: Any
    call_queue: Any
    networks: Any = None
    check_shapes: bool = True
    processing: Any = None
    paths: Any = None
    scripts: Any = None
    _cache: dict[tuple, LoraEntry] = field(default_factory=dict, repr=False)
    _last: Snapshot | None = field(default=None, repr=False)
    _status_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_webui(cls) -> WebuiContext:
        """Gather the running WebUI's modules (call from ``scripts/`` only)."""
        from modules import call_queue, devices, paths, processing, scripts, sd_models, shared

        try:
            import networks  # the built-in Lora extension's module (dossier §4.8)
        except ImportError:
            networks = None
        return cls(
            shared,
            sd_models,
            devices,
            call_queue,
            networks,
            processing=processing,
            paths=paths,
            scripts=scripts,
        )

    # -- settings and folders

    def setting(self, key: str, default: Any = None) -> Any:
        opts = self.shared.opts
        return getattr(opts, key, opts.data.get(key, default) if hasattr(opts, "data") else default)

    def default_options(self) -> dict[str, Any]:
        """Option defaults with the user's settings applied."""
        values = {f.name: f.default for f in fields(MergeOptions)}
        for key, (name, _) in SETTINGS.items():
            if name is not None:
                values[name] = self.setting(key, values[name])
        for name in ("rank", "steps", "size"):  # 0 in a settings field: exact / auto
            if not values[name]:
                values[name] = None
        return values

    @property
    def lora_dir(self) -> Path:
        return Path(self.shared.cmd_opts.lora_dir)

    def output_dir(self) -> Path:
        """The Lora folder or the configured subfolder of it (created if missing)."""
        sub = str(self.setting("loraclr_output_subfolder", "") or "").strip().strip("/\\")
        if sub and (".." in Path(sub).parts or Path(sub).is_absolute()):
            raise InvalidInputError(
                f"Output subfolder {sub!r} must stay inside the Lora folder; fix it in Settings."
            )
        folder = self.lora_dir / sub if sub else self.lora_dir
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def model(self, load: bool = True) -> Any:
        """The loaded model, got the way the WebUI's own generation gets it.

        With ``load`` (merges, under the queue lock): Forge builds the model lazily
        (``FakeInitialModel`` until then), so its ``sd_models.forge_model_reload()`` runs
        first (a no-op when the selected checkpoint is loaded); then
        ``model_data.get_sd_model()``, what ``shared.sd_model`` returns: on A1111 and
        reForge it loads the checkpoint if none was loaded yet, and waits for the load
        A1111 starts in the background at start-up (it holds ``model_data.lock`` while it
        loads). ``None`` only when there is no checkpoint to load or loading failed.

        Without ``load`` (the LoRA list, drawn at start-up and on every keystroke, outside
        the queue lock): a peek at ``model_data.sd_model`` that never loads nor waits;
        ``None`` while a checkpoint is still loading.
        """
        data = self.sd_models.model_data
        if not load:
            return data.sd_model
        if not is_loaded(data.sd_model) and self.no_checkpoint_file():
            # Forge's reload raises a ValueError then, A1111's load prints a traceback.
            raise NoModelError(NO_CHECKPOINT_FILE)
        reload = getattr(self.sd_models, "forge_model_reload", None)
        if callable(reload):
            reload()
        get = getattr(data, "get_sd_model", None)
        model = get() if callable(get) else data.sd_model
        lock = getattr(data, "lock", None)
        locked = getattr(lock, "locked", None)
        if lock is not None and callable(locked) and locked():
            # A load in progress holds the lock and may already have published the model
            # before finishing it (hijack, callbacks): wait for it to end, then look again.
            with lock:
                pass
            model = data.sd_model
        if not is_loaded(model) and self.no_checkpoint_file():
            raise NoModelError(NO_CHECKPOINT_FILE)
        return model

    def no_checkpoint_file(self) -> bool:
        """The WebUI found no checkpoint file to load: its ``sd_models.checkpoints_list``
        is empty, or Forge selected none (``forge_loading_parameters["checkpoint_info"]``
        is ``None``, which its ``forge_model_reload`` answers with a ``ValueError``)."""
        listing = getattr(self.sd_models, "checkpoints_list", None)
        if isinstance(listing, dict) and not listing:
            return True
        data = getattr(self.sd_models, "model_data", None)
        params = getattr(data, "forge_loading_parameters", None)
        return (
            isinstance(params, dict)
            and "checkpoint_info" in params
            and (params["checkpoint_info"] is None)
        )

    def model_architecture(self) -> Architecture | None:
        """The loaded model's architecture, for greying out LoRAs; ``None`` when unknown.

        Peeks without loading: the list is drawn at start-up and on every search keystroke,
        outside the queue lock, and must not load a Forge checkpoint there.
        """
        try:
            return model_architecture(self.model(load=False))
        except LoraClrError:
            return None

    # -- the list

    def lora_files(self) -> Iterator[Path]:
        root = self.lora_dir
        if not root.is_dir():
            return
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(LORA_SUFFIXES):
                    yield Path(folder) / name

    def list_loras(self, query: str = "") -> list[LoraEntry]:
        """Every LoRA in the Lora folder (recursively), filtered by ``query``."""
        from loraclr_ext.files.read import describe_lora

        arch = self.model_architecture()
        entries = []
        for path in self.lora_files():
            stat = path.stat()
            sides = _side_files(path)
            key = (str(path), stat.st_mtime_ns, stat.st_size, sides, arch, self.check_shapes)
            if key not in self._cache:
                info = describe_lora(path, arch, check_shapes=self.check_shapes)
                self._cache[key] = _entry(info, path.relative_to(self.lora_dir), arch)
            entries.append(self._cache[key])
        words = query.lower().split()
        return [e for e in entries if all(w in _haystack(e) for w in words)]

    def resolve(self, name: str) -> Path:
        """A list name (file stem or path relative to the Lora folder) -> its file."""
        for entry in self.list_loras():
            if name in (entry.name, entry.file):
                if entry.reason:
                    raise InvalidInputError(f"{entry.file} cannot be merged: {entry.reason}")
                return self.lora_dir / entry.file
        raise InvalidInputError(f"No LoRA named {name!r} in {self.lora_dir}; refresh the list.")

    # -- merging

    @contextmanager
    def job(self, name: str = "loraclr-merge") -> Iterator[None]:
        """Hold the generation lock and a ``shared.state`` job (REST; the tab uses
        ``wrap_gradio_gpu_call``, which does the same)."""
        with self.call_queue.queue_lock:
            self.shared.state.begin(job=name)
            try:
                yield
            finally:
                self.shared.state.end()

    def merge(self, rows: list[ConceptRow], options: MergeOptions, *, source: str = "tab") -> Any:
        """Validate, merge on the loaded checkpoint, write, refresh the Lora list.

        Call with the generation lock held. ``source`` ("tab", "api") is what the status
        route reports as the merge's origin. Returns the engine's ``MergeResult``.

        Raises:
            LoraClrError: any bad input, no model, out of memory, interrupt.
        """
        from loraclr_ext.engine import merge
        from loraclr_ext.hosts.webui.make import make_host
        from loraclr_ext.pipeline.plan import output_path

        snapshot = Snapshot(output=options.output, source=source)
        with self._status_lock:
            self._last = snapshot
        progress = StateProgress(
            self.shared.state, quality=options.quality, snapshot=snapshot, preview=options.preview
        )
        try:
            specs = [ConceptSpec(self.resolve(r.name), r.prompt, float(r.strength)) for r in rows]
            out = output_path(self.output_dir(), options.output)
            result = merge(
                specs,
                options,
                out,
                lambda: make_host(self.model(), self),
                progress,
                check_shapes=self.check_shapes,
            )
        except Exception as exc:
            said = str(exc) if isinstance(exc, LoraClrError) else type(exc).__name__
            self._finish(snapshot, said)
            raise
        finally:
            if hasattr(self.devices, "torch_gc"):
                self.devices.torch_gc()
        try:
            self.refresh_networks(written=out.stem)
            if options.preview:
                self.preview(result, snapshot, start=progress.preview_start())
        finally:
            self._finish(snapshot, f"wrote {out.name}")
        return result

    def _finish(self, snapshot: Snapshot, outcome: str) -> None:
        with self._status_lock:
            snapshot.finished, snapshot.outcome = time.time(), outcome
            if outcome.startswith("wrote"):
                snapshot.stage, snapshot.fraction = "done", 1.0

    def preview(self, result: Any, snapshot: Snapshot | None = None, start: float = 0.0) -> None:
        """Draw the preview grid of a written merge with the WebUI's own txt2img (after
        :meth:`refresh_networks`, so ``<lora:NAME:1>`` finds the new file), on the
        progress bar from ``start`` to the end. Never raises for the preview itself: a
        stop or failure is said in ``result.preview_note``."""
        from loraclr_ext.engine import add_preview
        from loraclr_ext.preview.webui import WebuiRenderer, kept

        renderer = WebuiRenderer(self.processing, self.model(), self.scripts)
        with kept(self.generation_files()):
            add_preview(result, renderer, PreviewProgress(self.shared.state, snapshot, start))

    def generation_files(self) -> list[Path]:
        """Files the WebUI rewrites on every generation (``params.txt``, the last prompt)."""
        data_path = getattr(self.paths, "data_path", None)
        return [Path(data_path) / "params.txt"] if data_path else []

    def status(self) -> dict[str, Any]:
        """The running (or else the last) LoRACLR merge since start-up, as JSON."""
        with self._status_lock:
            last = self._last
        if last is None:
            return {"running": False, "output": None, "stage": None, "progress": None}
        return last.to_dict()

    def interrupt(self) -> bool:
        """Raise the WebUI's interrupt flag, which the engine polls, if and only if a
        LoRACLR merge is running (a txt2img job is never stopped from here)."""
        with self._status_lock:
            if self._last is None or not self._last.running:
                return False
            self.shared.state.interrupt()
            self._last.stage = "interrupting"
            return True

    def refresh_networks(self, written: str | None = None) -> None:
        """Let the built-in Lora extension see the new file (dossier Appendix B.8); on
        Forge / reForge also drop the cached state dicts and LoRA hash, so a file
        rewritten under the same name is read again (forge.md §4); on A1111 the layers
        carrying ``written`` (the stem just written) are applied again."""
        if self.networks is not None and hasattr(self.networks, "list_available_networks"):
            self.networks.list_available_networks()
        forget_cached_loras(self.model(load=False), self.networks, written)


def parse_options(ctx: WebuiContext, values: dict[str, Any]) -> MergeOptions:
    """Settings defaults overlaid with ``values`` (unknown keys are an error)."""
    merged = {**ctx.default_options(), **values}
    for name in ("rank", "steps", "size"):
        if merged.get(name) in (0, "", None):
            merged[name] = None
    return MergeOptions.from_dict(merged)


def user_message(exc: BaseException) -> str:
    """The message to show for ``exc``; unexpected errors are logged with a traceback."""
    if isinstance(exc, LoraClrError):
        return str(exc)
    if isinstance(exc, TypeError | ValueError):
        return f"Invalid input: {exc}"
    log.exception("LoRACLR merge failed")
    return f"Unexpected error ({type(exc).__name__}: {exc}); see the console. Nothing was written."


def _entry(info: Any, rel: Path, arch: Architecture | None) -> LoraEntry:
    reason = info.reason
    if reason is None and arch is not None and info.architecture not in (None, arch):
        reason = f"{info.architecture.label} LoRA; the loaded checkpoint is {arch.label}"
    return LoraEntry(
        name=info.name,
        file=rel.as_posix(),
        architecture=info.architecture.label if info.architecture else "unknown",
        format=info.format or "unreadable",
        rank=info.rank,
        triggers=list(info.triggers),
        reason=reason,
        trigger_source=info.found.source,
        found=info.found,
    )


def _side_files(path: Path) -> tuple[int, ...]:
    """Modification times of the files beside a LoRA that hold its triggers (0: none), so
    editing the activation text refreshes the list."""
    stamps = []
    for side in (path.with_suffix(".json"), path.with_suffix(".civitai.info")):
        try:
            stamps.append(side.stat().st_mtime_ns)
        except OSError:
            stamps.append(0)
    return tuple(stamps)


def _haystack(entry: LoraEntry) -> str:
    return " ".join([entry.file, entry.architecture, entry.format, *entry.triggers]).lower()


__all__ = [
    "ConceptRow",
    "LoraEntry",
    "WebuiContext",
    "parse_options",
    "user_message",
]
