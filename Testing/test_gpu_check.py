"""bench/gpu_check.py (the GPU check of issue 16) dry-run on the CPU, so that it cannot rot while no GPU is lent.

Runs the real command as a subprocess at its tiny dry-run sizes and checks that every part reports sane figures:
the demo ensemble's CPU-vs-CPU labels agree on 100 % of voxels, the Mamba comparisons are within tolerance, the
out-of-memory part says it was skipped and why (it is never simulated), and the GoAT-sized ensemble was planned by
nnU-Net's planners and timed (figures only checked for being positive: no timing assertions).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["dry_run"] is True and report["meta"]["device"] == "cpu"
    parts = report["parts"]
    assert set(parts) == {"demo", "mamba", "oom", "goat"}

    demo = parts["demo"]
    assert demo["status"] == "ran"
    assert demo["agreement"] == 1.0 and demo["differing_voxels"] == 0 and demo["voxels"] > 0
    assert demo["meets_goal"] is True
    for run in demo["runs"].values():
        assert run["seconds"] > 0
        assert set(run["dice_vs_truth"]) == {"ET", "TC", "WT", "NETC"}
        # the demo models find the phantom's tumour even in the crop (not chance: WT well above 0)
        assert 0.3 < run["dice_vs_truth"]["WT"] <= 1.0

    mamba = parts["mamba"]
    assert mamba["status"] == "ran" and mamba["within_tolerance"] is True
    assert len(mamba["blocks"]) == 2
    for block in mamba["blocks"]:
        assert block["rel_l2_diff"] == 0.0  # CPU against CPU: the same arithmetic
        assert block["cpu_seconds"] > 0 and block["device_seconds"] > 0
    assert 0 < mamba["chunked_vs_reference"]["rel_l2_diff"] < 1e-5  # carries across chunks, float32 rounding
    assert mamba["mamba_ssm"].startswith("not available")

    oom = parts["oom"]
    assert oom["status"] == "skipped"
    assert "CUDA" in oom["reason"] and "never simulated" in oom["reason"]

    goat = parts["goat"]
    assert goat["status"] == "ran"
    members = goat["members"]
    assert list(members) == ["resenc-m", "resenc-l", "resenc-xl", "resenc-m-ft", "resenc-l-ft", "resenc-xl-ft",
                             "umamba-bot"]
    assert [m["plans"] for m in members.values()] == ["nnUNetResEncUNetMPlans", "nnUNetResEncUNetLPlans",
                                                      "nnUNetResEncUNetXLPlans"] * 2 + ["nnUNetPlans"]
    assert members["umamba-bot"]["trainer"] == "nnUNetTrainerUMambaBot"
    assert all(m["parameters_millions"] > 0 for m in members.values())
    assert set(goat["runs"]) == {"no_mirroring_cold", "no_mirroring_warm", "mirroring"}
    for run in goat["runs"].values():
        assert run["seconds_end_to_end"] > 0
        stages = run["seconds_per_stage"]
        assert set(stages) == {"read_case", "load", "preprocessing", "network", "export", "fusion",
                               "postprocessing", "write_results"}
        assert all(v >= 0 for v in stages.values()) and stages["network"] > 0
    assert goat["mirroring_run_members"] == ["resenc-m", "umamba-bot"]  # the dry run mirrors two members only
    for key, run in goat["runs"].items():
        assert len(run["seconds_per_member"]) == (2 if key == "mirroring" else 7)
        assert run["peak_gpu_memory"]["allocated_gib"] is None  # no GPU: reported as such, not as 0
    assert goat["cold_vs_warm_labels"]["agreement"] == 1.0

    table = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in table and "| oom | skipped |" in table
