"""Progress that moves (docs/command-line.md, "Progress"): every member reports its sliding window tile by tile.

Through the real command line: an ensemble of the shipped demo nnU-Net v2, U-Mamba (nnU-Net's predictor) and
MedNeXt (its own v1 sliding window) models and a TorchScript network (MONAI's sliding window) on a phantom at 2 mm
that each of them covers with several tiles. Inside each member the ``member-step`` fractions strictly increase,
stay within the member's share of the case, and count its tiles to the end; reports are rate-limited (at most one
per percent of the tiles). The bar (``--progress bar``) moves inside a member and keeps the tile count visible in 80
columns.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from BraTSEnsembleLib import demo
from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.members.progress import AFTER_WINDOW, REPORT_EVERY, WINDOW_SPAN, TileProgress
from test_torchscript_member import ROLES, save_torchscript, tiny_net

ROOT = Path(__file__).resolve().parents[1]
MEMBER_SHARE = 0.95  # of the case, split evenly among the members (pipeline.segment_case)
TILE = re.compile(r"tile (\d+)/(\d+)$")


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "BraTSEnsembleLib.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchscript_member(folder: Path, **extra) -> dict:
    """A TorchScript member: a small real network (test_torchscript_member.TinyNet) run by MONAI's sliding window."""
    path = save_torchscript(tiny_net(5), folder / "tiny.ts")
    return {"name": "tiny-ts", "framework": "torchscript", "path": str(path), "channel_roles": list(ROLES),
            "activation": "softmax", "class_labels": {"0": "background", "1": "ET", "2": "NETC", "3": "SNFH"},
            "roi_size": [32, 32, 32], "normalization": "zscore-nonzero", **extra}


def member_steps(events: list[dict]) -> dict[int, list[dict]]:
    """member-step events by member index (0-based), from the ``model i/n:`` of their messages."""
    steps: dict[int, list[dict]] = {}
    for event in events:
        if event["event"] == "member-step":
            index = int(re.match(r"model (\d+)/\d+: ", event["message"]).group(1)) - 1
            steps.setdefault(index, []).append(event)
    return steps


def test_tile_progress_is_rate_limited_and_moves_forward() -> None:
    reports: list[tuple[str, float]] = []
    tiles = TileProgress(lambda step, fraction=None: reports.append((step, fraction)), 10_000)
    for _ in range(5_000):
        tiles.advance()
    tiles.rewind(4_000)  # a repeated pass (out of memory): nothing is reported twice or backwards
    while tiles.done < tiles.total:
        tiles.advance()
    fractions = [f for _, f in reports]
    assert len(reports) <= 1 / REPORT_EVERY + 1
    assert fractions == sorted(set(fractions)), "fractions must strictly increase"
    assert reports[0] == ("sliding window, tile 1/10000", pytest.approx(WINDOW_SPAN[0] + 0.8 / 10_000))
    assert reports[-1] == ("sliding window, tile 10000/10000", pytest.approx(WINDOW_SPAN[1]))


def test_every_member_reports_its_tiles(tmp_path: Path) -> None:
    """At 2 mm (the demo models' spacing) the phantom's 71×99×69-voxel head takes 1×2×2 tiles of the nnU-Net,
    U-Mamba and MedNeXt patch (80×80×64) and 3×4×3 windows of the TorchScript network (48³, overlap 0.25)."""
    phantom = make_phantom(9107, shape=(96, 128, 88), spacing=(2.0, 2.0, 2.0))
    case_dir = phantom.write(tmp_path / "cases")
    members = [{"name": name, "framework": framework, "path": str(demo.MODELS_DIR / folder), "folds": [0],
                "mirroring": False}
               for name, framework, folder in (
                   ("nnunet", "nnunetv2", "nnUNetTrainerAdam1en3__nnUNetPlans__3d_fullres"),
                   ("umamba", "umamba", "nnUNetTrainerUMambaBot__nnUNetPlans__3d_fullres"),
                   ("mednext", "mednext", "nnUNetTrainerV2_MedNeXt_S_kernel3__nnUNetPlansv2.1_trgSp_2x2x2"))]
    members.append(torchscript_member(tmp_path / "ts", roi_size=[48, 48, 48]))
    manifest = tmp_path / "set.json"
    manifest.write_text(json.dumps({"name": "progress-set", "postprocess": "none", "members": members}))
    out = tmp_path / "out"
    done = cli("predict", case_dir, "-o", out, "--model-set", manifest, "--device", "cpu", "--progress", "json",
               "--trust-checkpoint", members[-1]["path"])
    events = [json.loads(line) for line in done.stdout.splitlines()]
    steps = member_steps(events)
    n = len(members)
    assert sorted(steps) == list(range(n))
    for index, member_events in steps.items():
        name = members[index]["name"]
        fractions = [e["fraction"] for e in member_events]
        assert all(a < b for a, b in zip(fractions, fractions[1:])), f"{name}: {fractions}"
        low, high = index / n * MEMBER_SHARE, (index + 1) / n * MEMBER_SHARE
        assert low <= fractions[0] and fractions[-1] <= high, f"{name}: {fractions} outside [{low}, {high}]"
        tiles = [TILE.search(e["message"]) for e in member_events]
        counts = [(int(m.group(1)), int(m.group(2))) for m in tiles if m]
        assert len(counts) >= 3, f"{name}: tiles were not reported: {[e['message'] for e in member_events]}"
        assert counts[-1][0] == counts[-1][1], f"{name}: the last tile reported is {counts[-1]}"
        assert len(counts) <= 1 / REPORT_EVERY + 1, f"{name}: {len(counts)} tile reports"
        assert member_events[-1]["message"].endswith("back to the case grid")
        assert member_events[-1]["fraction"] == pytest.approx((index + AFTER_WINDOW) / n * MEMBER_SHARE, abs=1e-4)
    assert json.loads((out / f"{phantom.case_id}.json").read_text())["regions"]


def test_bar_moves_inside_a_member_and_keeps_the_tile_count_visible(tmp_path: Path) -> None:
    """A TorchScript member of 36 windows on a small phantom, the bar in 80 columns."""
    case_dir = make_phantom(9106, shape=(40, 44, 40)).write(tmp_path / "cases")
    manifest = tmp_path / "set.json"
    manifest.write_text(json.dumps({"name": "bar-set", "postprocess": "none",
                                    "members": [torchscript_member(tmp_path / "ts", roi_size=[16, 16, 16])]}))
    done = cli("predict", case_dir, "-o", tmp_path / "out", "--model-set", manifest, "--device", "cpu",
               "--progress", "bar", "--trust-checkpoint", tmp_path / "ts" / "tiny.ts",
               env={**os.environ, "COLUMNS": "80"})
    lines = [line.rstrip() for line in re.split(r"[\r\n]", done.stderr) if "%|" in line]
    assert lines and all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    tile_lines = [line for line in lines if re.search(r"tile \d+/36: +\d+%", line)]
    percents = {int(re.search(r"(\d+)%\|", line).group(1)) for line in tile_lines}
    assert len(percents) >= 10, f"the bar does not move inside the member: {sorted(percents)}"
    assert "tile 36/36" in tile_lines[-1] and int(re.search(r"(\d+)%\|", tile_lines[-1]).group(1)) == max(percents)
