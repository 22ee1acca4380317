"""Command line: ``merge``, ``inspect`` and ``demo`` on the standalone (diffusers) host.

Exit codes: 0 success, 1 a clear one-line error (nothing written), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loraclr_ext import __version__
from loraclr_ext.errors import InvalidInputError, LoraClrError
from loraclr_ext.pipeline.options import ConceptSpec, MergeOptions

if TYPE_CHECKING:
    from loraclr_ext.engine import MergeResult
    from loraclr_ext.hosts.standalone import StandaloneHost


class TqdmProgress:
    """Engine progress on a tqdm bar, one bar per stage."""

    def __init__(self) -> None:
        self.bar = None

    def stage(self, text: str, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=text, unit="step", leave=False, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def interrupted(self) -> bool:
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loraclr_ext", description=__doc__)
    parser.add_argument("--version", action="version", version=f"loraclr-merge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge concept LoRAs on a base model")
    merge.add_argument(
        "--base",
        required=True,
        type=Path,
        help="diffusers model folder or SD1/SDXL .safetensors checkpoint",
    )
    merge.add_argument(
        "--lora", action="append", type=Path, required=True, help="a concept LoRA (repeat)"
    )
    merge.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="its concept prompt with trigger words (pairs with --lora in order)",
    )
    merge.add_argument(
        "--strength",
        action="append",
        type=float,
        help="strength per LoRA (one value for all, or one per --lora)",
    )
    merge.add_argument("--out", required=True, type=Path, help="output .safetensors")
    merge.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    merge.add_argument(
        "--tokenizer", type=Path, help="folder with the CLIP tokenizer files, if the model has none"
    )
    merge.add_argument("--report", type=Path, help="write the quality report here as JSON")
    merge.add_argument(
        "--preview-file",
        type=Path,
        help="where --preview writes the grid (default: OUT with .preview.png)",
    )
    _add_options(merge)

    inspect = commands.add_parser("inspect", help="describe a LoRA file")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")

    demo = commands.add_parser("demo", help="self-contained demo merge on a tiny built-in model")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("loraclr-demo"),
        help="where the model, LoRAs and result are kept (default ./loraclr-demo)",
    )
    return parser


def _add_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of the table (``output`` is ``--out``'s stem)."""
    from loraclr_ext.pipeline.fields import option_fields

    types: dict[str, type] = {"int": int, "float": float, "text": str}
    for spec in option_fields():
        if spec.name == "output":
            continue
        flag = "--" + spec.name.replace("_", "-")
        if spec.kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=spec.default, help=spec.help
            )
            continue
        shown = "" if spec.default is None else f" (default {spec.default})"
        parser.add_argument(
            flag,
            type=types.get(spec.kind, str),
            default=spec.default,
            choices=spec.choices or None,
            help=spec.help + shown,
        )


def _options(args: argparse.Namespace, output: str) -> MergeOptions:
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(MergeOptions) if f.name != "output"}
    return MergeOptions(output=output, **values)


def _specs(args: argparse.Namespace) -> list[ConceptSpec]:
    if len(args.lora) != len(args.prompt):
        raise InvalidInputError(
            f"{len(args.lora)} --lora but {len(args.prompt)} --prompt; "
            "give one prompt per LoRA, in order."
        )
    strengths = args.strength or [1.0]
    if len(strengths) == 1:
        strengths = strengths * len(args.lora)
    if len(strengths) != len(args.lora):
        raise InvalidInputError(
            f"{len(strengths)} --strength for {len(args.lora)} --lora; give one or one per LoRA."
        )
    return [ConceptSpec(p, t, s) for p, t, s in zip(args.lora, args.prompt, strengths, strict=True)]


def cmd_merge(args: argparse.Namespace) -> int:
    from loraclr_ext.engine import merge
    from loraclr_ext.hosts.devices import resolve_device
    from loraclr_ext.hosts.standalone import StandaloneHost

    specs = _specs(args)
    options = _options(args, args.out.stem)
    device = resolve_device(args.device)
    _check_report_path(args.report)
    preview_file = _preview_path(args, options)
    _check_base(args.base)
    hosts: list[StandaloneHost] = []

    def open_host() -> StandaloneHost:
        print(f"[LoRACLR] loading {args.base} on {device}")
        hosts.append(StandaloneHost.load(args.base, device, tokenizer=args.tokenizer))
        return hosts[0]

    progress = TqdmProgress()
    try:
        result = merge(specs, options, args.out, open_host, progress, check_shapes=False)
        if preview_file is not None:
            _write_preview(result, hosts[0], preview_file, progress)
    finally:
        progress.close()
    _print_result(result, args.report)
    return 0


def _preview_path(args: argparse.Namespace, options: MergeOptions) -> Path | None:
    """Where the preview grid goes; checked before any work like the merged file itself."""
    from loraclr_ext.files.publish import refuse_existing

    if not options.preview:
        if args.preview_file is not None:
            raise InvalidInputError("--preview-file needs --preview.")
        return None
    path = args.preview_file or args.out.with_suffix(".preview.png")
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"--preview-file {path.name} must end in .png.")
    if not path.parent.is_dir():
        raise InvalidInputError(f"Preview folder {path.parent} does not exist; create it first.")
    refuse_existing([path], options.overwrite)
    return path


def _write_preview(
    result: MergeResult, host: StandaloneHost, path: Path, progress: TqdmProgress
) -> None:
    from loraclr_ext.engine import add_preview
    from loraclr_ext.files.publish import publish, temp_path
    from loraclr_ext.preview.standalone import StandaloneRenderer

    add_preview(result, StandaloneRenderer(host, check_shapes=False), progress)
    if result.preview is not None:
        tmp = temp_path(path)
        try:
            tmp.write_bytes(result.preview.png())
            publish(tmp, path, overwrite=bool(result.options and result.options.overwrite))
        finally:
            tmp.unlink(missing_ok=True)
        print(f"preview: {path}  ({result.preview.summary()})")
    else:
        print(f"note: {result.preview_note}")


def _check_report_path(report: Path | None) -> None:
    """The report is written after the merge; its folder must exist before it starts."""
    if report is None:
        return
    if not report.parent.is_dir():
        raise InvalidInputError(
            f"Report folder {report.parent} does not exist; create it or choose another --report."
        )
    if report.is_dir():
        raise InvalidInputError(f"--report {report} is a folder; give a file name.")


def _check_base(base: Path) -> None:
    """A missing base or a checkpoint file whose container is broken ends here, before the
    model loads (a diffusers folder is checked by the loader)."""
    from loraclr_ext.errors import ModelNotFoundError

    if not base.exists():
        raise ModelNotFoundError(f"Base model {base} does not exist.")
    if base.is_dir() or base.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(base), framework="pt") as f:
            f.metadata()
    except Exception as exc:  # safetensors raises its own (Rust) error types
        raise InvalidInputError(
            f"Base model {base} cannot be read as .safetensors ({exc}); it is corrupt or "
            "truncated — download it again."
        ) from exc


def _print_result(result: MergeResult, report_path: Path | None) -> None:
    print(f"wrote {result.path}  (use: {result.prompt_tag})")
    print(f"{result.rank_summary()}; seconds {result.seconds}")
    if result.options is not None:
        print(result.recording_summary())
    for note in result.notes:
        print(f"note: {note}")
    for name, summary in result.unmatched.items():
        print(f"note: {name}: not merged: {summary}")
    if result.skipped:
        missing = len(result.skipped)
        print(f"note: {missing} module(s) are not in the loaded model: {result.skipped[:3]}")
    if result.report is not None:
        print()
        print(result.report.table())
        assert result.path is not None  # the CLI always writes
        path = report_path or result.path.with_suffix(".report.json")
        payload = {
            "file": str(result.path),
            "seconds": result.seconds,
            "options": result.options.to_dict() if result.options else None,
            "auto": result.auto,
            "device": result.device,
            "report": result.report.to_dict(),
        }
        path.write_text(json.dumps(payload, indent=2))
        print(f"\nreport: {path}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from loraclr_ext.files.read import describe_lora

    info = describe_lora(args.file, check_shapes=False)
    data = {
        "file": str(info.path),
        "architecture": info.family or "unknown",
        "format": info.format or "unreadable",
        "rank": info.rank,
        "ranks": info.ranks,
        "modules": info.modules,
        "unmatched": info.unmatched,
        "not merged": info.not_merged or None,
        "triggers": info.triggers,
        "usable": info.usable,
        "reason": info.reason,
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            if value is not None:
                print(f"{key:>13}: {value}")
    return 0 if info.usable else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from loraclr_ext.demo.run import run_demo

    run_demo(args.workdir, TqdmProgress())
    return 0


def _quiet_libraries() -> None:
    """diffusers/transformers chatter (loading bars, accelerate hints) hides our output."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    command = {"merge": cmd_merge, "inspect": cmd_inspect, "demo": cmd_demo}[args.command]
    try:
        return command(args)
    except LoraClrError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
