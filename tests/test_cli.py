"""The command line: a real merge on a saved tiny model, inspect, and every bad input of
design §6 answered with one clear line, a non-zero exit and no output file."""

from __future__ import annotations

import json

import pytest
import torch

from loraclr_ext.cli import main
from loraclr_ext.demo.run import CONCEPTS
from loraclr_ext.model.architecture import Architecture
from loraclr_ext.pipeline.options import JOINT_TEMPLATES


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def merge_args(demo, out, *extra, loras=None, prompts=None):
    loras = loras or demo["loras"][:2]
    prompts = prompts or [c for c, _ in CONCEPTS[:2]]
    args = ["merge", "--base", demo["model"], "--out", out, "--steps", "2", "--size", "64"]
    for lora, prompt in zip(loras, prompts):
        args += ["--lora", lora, "--prompt", prompt]
    return [*args, *extra]


@pytest.mark.slow
def test_merge_writes_lora_sidecar_and_report(sd1_demo, tmp_path, capsys):
    out = tmp_path / "duo.safetensors"
    code, stdout, err = run(capsys, *merge_args(sd1_demo, out, "--report", tmp_path / "r.json"))
    assert code == 0, err
    assert out.is_file()
    assert json.loads(out.with_suffix(".json").read_text())["sd version"] == "SD1"
    report = json.loads((tmp_path / "r.json").read_text())["report"]
    assert {m["method"] for m in report["methods"]} == {
        "loraclr",
        "least squares",
        "stacked",
        "average",
    }
    # The joint measures reach the JSON: two concepts, scored at their words in prompts
    # naming both; stacking carries nearly all of the partner's effect there.
    assert report["joint_prompts"] == list(JOINT_TEMPLATES)
    stacked = next(m for m in report["methods"] if m["method"] == "stacked")
    for concept in stacked["concepts"]:
        assert 0.8 < concept["joint_bleed"] < 1.2, concept
        assert concept["joint_kv"] > 0, concept
    assert "joint bleed" in stdout
    assert "<lora:duo:1>, sks dog, zwx cat" in stdout


def test_auto_recording_values_are_shown_and_reported(sd1_demo, tmp_path, capsys, monkeypatch):
    from loraclr_ext.pipeline import options

    monkeypatch.setitem(options.AUTO_RECORDING, "cpu", (2, 64))  # tiny model: tiny run
    out = tmp_path / "auto.safetensors"
    args = [a for a in merge_args(sd1_demo, out) if a not in ("--steps", "2", "--size", "64")]
    code, stdout, err = run(capsys, *args, "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "recorded 2 steps at 64 px (steps and size auto for cpu)" in stdout
    payload = json.loads((tmp_path / "r.json").read_text())
    assert (payload["options"]["steps"], payload["options"]["size"]) == (2, 64)
    assert payload["auto"] == ["steps", "size"] and payload["device"] == "cpu"


def test_inspect_describes_a_lora(sd1_demo, capsys):
    code, out, _ = run(capsys, "inspect", sd1_demo["loras"][0], "--json")
    info = json.loads(out)
    assert code == 0
    assert info["architecture"] == "SD 1.x"
    assert info["triggers"] == ["sks"]
    assert info["rank"] == 4
    assert info["modules"]["te1"] > 0 and info["modules"]["unet"] > 0


def _sdxl_lora(path):
    from loraclr_ext.files.write import write_lora
    from loraclr_ext.model.deltas import ModuleDelta
    from loraclr_ext.model.targets import ModuleRef

    ref = ModuleRef("te2", "text_model.encoder.layers.0.self_attn.q_proj")
    write_lora(
        path,
        {ref: ModuleDelta(torch.ones(8, 1), torch.ones(1, 8))},
        Architecture.SDXL,
        check_shapes=False,
    )
    return path


BAD = {
    "one LoRA": (
        lambda d, t: merge_args(d, t / "o.safetensors", loras=d["loras"][:1], prompts=["sks dog"]),
        "at least two",
    ),
    "same file twice": (
        lambda d, t: merge_args(d, t / "o.safetensors", loras=[d["loras"][0]] * 2),
        "selected twice",
    ),
    "empty prompt": (
        lambda d, t: merge_args(d, t / "o.safetensors", prompts=["sks dog", "  "]),
        "empty",
    ),
    "same prompt": (
        lambda d, t: merge_args(d, t / "o.safetensors", prompts=["sks dog", "sks  dog"]),
        "same concept prompt",
    ),
    "missing out dir": (
        lambda d, t: merge_args(d, t / "nowhere" / "o.safetensors"),
        "does not exist",
    ),
    "bad device": (lambda d, t: [*merge_args(d, t / "o.safetensors"), "--device", "tpu"], "device"),
    "prompt count": (
        lambda d, t: [*merge_args(d, t / "o.safetensors"), "--lora", d["loras"][2]],
        "--prompt",
    ),
    "other architecture": (
        lambda d, t: merge_args(
            d, t / "o.safetensors", loras=[d["loras"][0], _sdxl_lora(t / "xl.safetensors")]
        ),
        "SDXL LoRA but the base model is SD 1.x",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, sd1_demo, tmp_path, capsys):
    build, expected = BAD[case]
    argv = build(sd1_demo, tmp_path)
    before = {p.name for p in tmp_path.rglob("*")}
    code, _, err = run(capsys, *argv)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]
    assert {p.name for p in tmp_path.rglob("*")} == before


def _broken(tmp_path, kind, good):
    data = good.read_bytes()
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[40:200])
    else:  # a pickle
        path = tmp_path / "pickled.pt"
        torch.save({"lora_unet_x.lora_down.weight": torch.ones(1)}, path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "pickle"])
def test_broken_files_are_refused_by_name(kind, sd1_demo, tmp_path, capsys):
    bad = _broken(tmp_path, kind, sd1_demo["loras"][1])
    out = tmp_path / "o.safetensors"
    code, _, err = run(capsys, *merge_args(sd1_demo, out, loras=[sd1_demo["loras"][0], bad]))
    assert code == 1
    assert bad.name in err
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_existing_output_is_kept_without_overwrite(sd1_demo, tmp_path, capsys):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"user data")
    code, _, err = run(capsys, *merge_args(sd1_demo, out))
    assert code == 1 and "already exists" in err
    assert out.read_bytes() == b"user data"
    code, _, err = run(capsys, *merge_args(sd1_demo, out, "--overwrite", "--no-quality"))
    assert code == 0, err
    assert out.read_bytes() != b"user data"


def test_rank_zero_means_exact_in_the_flag_the_tab_and_the_help(tmp_path):
    """One spelling of "exact" everywhere: ``--rank 0`` parses to an exact merge, and the
    tab's label and help and the flag's help all say "0 = exact"."""
    from loraclr_ext.cli import _options, build_parser
    from loraclr_ext.pipeline.fields import option_fields

    parser = build_parser()
    base = ["merge", "--base", tmp_path, "--lora", "a", "--prompt", "a", "--out", "o"]
    args = parser.parse_args([str(a) for a in [*base, "--rank", "0"]])
    assert _options(args, "o").rank is None
    assert _options(parser.parse_args([str(a) for a in base]), "o").rank is None
    assert _options(parser.parse_args([*map(str, base), "--rank", "8"]), "o").rank == 8
    rank = next(s for s in option_fields() if s.name == "rank")
    assert rank.label == "Rank (0 = exact)"
    assert "0 = exact" in rank.help and "empty" not in rank.help
    flag = next(
        a
        for a in parser._subparsers._group_actions[0].choices["merge"]._actions
        if "--rank" in a.option_strings
    )
    assert "0 = exact" in flag.help


def test_preview_writes_the_grid_png_beside_the_lora(sd1_demo, tmp_path, capsys):
    from PIL import Image

    from loraclr_ext.preview.grid import LABEL_HEIGHT

    out = tmp_path / "duo.safetensors"
    argv = merge_args(sd1_demo, out, "--no-quality", "--preview")
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    png = tmp_path / "duo.preview.png"
    with Image.open(png) as image:
        assert image.size == (4 * 64, 64 + LABEL_HEIGHT)  # 2 concepts + joint merged/stacked
    assert f"preview: {png}  (4 images, " in stdout and "10 steps at 64 px" in stdout
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--preview",), "duo.preview.png already exists"),
        (("--preview-file", "x.png"), "--preview-file needs --preview"),
        (("--preview", "--preview-file", "x.jpg"), "must end in .png"),
    ],
)
def test_a_bad_preview_request_is_refused_before_any_work(
    extra, expected, sd1_demo, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "duo.preview.png"
    mine.write_bytes(b"my picture")
    out = tmp_path / "duo.safetensors"
    code, stdout, err = run(capsys, *merge_args(sd1_demo, out, "--no-quality", *extra))
    assert code == 1 and expected in err and err.count("\n") == 1
    assert "loading" not in stdout  # refused before the model was opened
    assert not out.exists() and mine.read_bytes() == b"my picture"
