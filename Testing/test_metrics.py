"""Worked examples for BraTSEnsembleLib.metrics, each derived by hand from the official definitions.

Cubes are written ``[x0:x1, y0:y1, z0:z1]`` (array indices, end excluded). Unless said otherwise the spacing is
1 mm, so a 4×4×4 cube is 64 voxels = 64 mm³. Dilation uses ``generate_binary_structure(3, 2)``, which grows a box
by exactly ``iterations`` voxels along each axis, so two boxes separated by a gap of g empty voxels along x merge
after d iterations each when g ≤ 2d (their dilations then overlap).

Besides these hand-derived numbers, the implementation was compared (outside this repository, not part of the
tests) with the official rachitsaluja/BraTS-2023-Metrics ``metrics.py`` and BraTS-2024-Metrics ``metrics_GLI.py``
on 6 random multi-lesion cases each (isotropic and anisotropic spacing): every score and count agreed to 1e-6.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from BraTSEnsembleLib import evaluation as E
from BraTSEnsembleLib import metrics as M
from BraTSEnsembleLib.errors import InputError


def volume(shape, *boxes):
    """Label map with ``(label, x0, x1, y0, y1, z0, z1)`` boxes written in order."""
    out = np.zeros(shape, dtype=np.uint8)
    for label, x0, x1, y0, y1, z0, z1 in boxes:
        out[x0:x1, y0:y1, z0:z1] = label
    return out


SP1 = (1.0, 1.0, 1.0)


def test_perfect_prediction():
    """GT = prediction = one 4×4×4 ET cube (64 voxels, above every threshold).

    Every protocol: the cube's regions (ET, TC, WT) score lesion Dice 1, HD95 0, NSD 1, 1 TP, 0 FN, 0 FP, legacy Dice
    1 and HD95 0. Regions absent from both (2024: NETC, SNFH, RC) are both-empty: Dice 1, HD95 0, no lesions.
    """
    gt = volume((16, 16, 16), (3, 4, 8, 4, 8, 4, 8))
    for protocol in M.PROTOCOLS:
        scores = M.lesion_wise_scores(gt.copy(), gt, SP1, protocol)
        for region in ("ET", "TC", "WT"):
            s = scores[region]
            assert (s["tp"], s["fn"], s["fp"]) == (1, 0, 0), (protocol, region)
            assert s["lesion_dice"] == 1.0 and s["lesion_hd95"] == 0.0 and s["lesion_nsd_1"] == pytest.approx(1.0)
            assert s["legacy_dice"] == 1.0 and s["legacy_hd95"] == 0.0 and s["legacy_nsd_1"] == pytest.approx(1.0)
        if protocol == "brats2024":
            assert scores["ET"]["lesion_nsd_0.5"] == pytest.approx(1.0)
            for region in ("NETC", "SNFH", "RC"):
                s = scores[region]
                assert (s["lesion_dice"], s["lesion_hd95"], s["tp"], s["fn"], s["fp"]) == (1.0, 0.0, 0, 0, 0)
        if protocol == "brats2025":
            assert scores["ET"]["f1"] == 1.0


def test_both_empty():
    """Empty GT and empty prediction.

    2023/2024: 0 GT lesions and 0 FPs make the lesion-wise quotient 0/0 = NaN, which the official code turns into
    Dice 1 (NSD 1) and HD95 0; legacy Dice 1 and HD95 0 by explicit rule. 2025: panoptica's "no instances" case is
    NaN for every lesion-wise score and the F1, and its global metrics are NaN too (the masks have no overlap, the
    zero-TP rule then gives "no instances"): brats-evaluation's CSV keeps NaN, and so does this output.
    """
    empty = np.zeros((10, 10, 10), dtype=np.uint8)
    for protocol in ("brats2023", "brats2024"):
        for region, s in M.lesion_wise_scores(empty, empty, SP1, protocol).items():
            assert (s["tp"], s["fn"], s["fp"]) == (0, 0, 0)
            assert (s["lesion_dice"], s["lesion_hd95"], s["lesion_nsd_1"]) == (1.0, 0.0, 1.0), (protocol, region)
            assert (s["legacy_dice"], s["legacy_hd95"], s["legacy_nsd_1"]) == (1.0, 0.0, 1.0)
    for region, s in M.lesion_wise_scores(empty, empty, SP1, "brats2025").items():
        assert (s["tp"], s["fn"], s["fp"]) == (0, 0, 0)
        for metric in ("lesion_dice", "lesion_hd95", "lesion_nsd_1", "f1", "legacy_dice", "legacy_hd95",
                       "legacy_nsd_1"):
            assert math.isnan(s[metric]), (region, metric)


def test_missed_lesion_and_false_positive_penalties():
    """GT: ET cubes A [2:6,6:10,6:10] and B [30:34,6:10,6:10] (64 voxels each). Prediction: A exactly, plus a
    3×3×3 ET cube C [16:19,6:9,6:9] (27 voxels) 10 voxels from A and 11 from B — beyond any dilation (3).

    A: Dice 1, HD95 0. B missed: Dice 0, HD95 penalty. C: false positive (it is 27 > 20 voxels, so 2024 keeps it).
    2023: Dice (1 + 0 + 0) / (2 + 1) = 1/3; HD95 (0 + 374 + 374) / 3 = 249.333…
    2024: Dice 1/3; HD95 (0 + 337 + 337) / 3 = 224.666…
    Counts 1 TP, 1 FN, 1 FP; legacy Dice 2·64 / (91 + 128) = 128/219 (same for TC and WT, all label 3).
    """
    gt = volume((40, 16, 16), (3, 2, 6, 6, 10, 6, 10), (3, 30, 34, 6, 10, 6, 10))
    pred = volume((40, 16, 16), (3, 2, 6, 6, 10, 6, 10), (3, 16, 19, 6, 9, 6, 9))
    for protocol, penalty in (("brats2023", 374.0), ("brats2024", 337.0)):
        scores = M.lesion_wise_scores(pred, gt, SP1, protocol)
        for region in ("ET", "TC", "WT"):
            s = scores[region]
            assert (s["tp"], s["fn"], s["fp"]) == (1, 1, 1)
            assert s["lesion_dice"] == pytest.approx(1 / 3)
            assert s["lesion_hd95"] == pytest.approx(2 * penalty / 3)
            assert s["legacy_dice"] == pytest.approx(128 / 219)
    # 2024 NSD: A 1, B 0 (missed), C 0 (FP) → 1/3 at both tolerances
    s = M.lesion_wise_scores(pred, gt, SP1, "brats2024")["ET"]
    assert s["lesion_nsd_0.5"] == pytest.approx(1 / 3) and s["lesion_nsd_1"] == pytest.approx(1 / 3)


def test_gt_lesions_merged_by_dilation():
    """GT: ET cubes [4:8,4:8,4:8] and [12:16,4:8,4:8], a gap of 4 voxels (x = 8…11) ≤ 2·3: GLI dilation (3)
    merges them into one 128-voxel lesion. Prediction: the first cube only.

    2023: one GT lesion, pooled prediction 64 voxels → Dice 2·64 / (64 + 128) = 2/3, 1 TP, 0 FN, 0 FP.
    Control: second cube at [15:19] (gap 7 > 6) stays separate → Dice (1 + 0) / 2 = 0.5, 1 TP, 1 FN.
    """
    pred = volume((32, 12, 12), (3, 4, 8, 4, 8, 4, 8))
    merged = M.lesion_wise_scores(pred, volume((32, 12, 12), (3, 4, 8, 4, 8, 4, 8), (3, 12, 16, 4, 8, 4, 8)),
                                  SP1, "brats2023")["ET"]
    assert (merged["tp"], merged["fn"], merged["fp"]) == (1, 0, 0)
    assert merged["lesion_dice"] == pytest.approx(2 / 3)
    apart = M.lesion_wise_scores(pred, volume((32, 12, 12), (3, 4, 8, 4, 8, 4, 8), (3, 15, 19, 4, 8, 4, 8)),
                                 SP1, "brats2023")["ET"]
    assert (apart["tp"], apart["fn"], apart["fp"]) == (1, 1, 0)
    assert apart["lesion_dice"] == pytest.approx(0.5)


def test_small_gt_lesion_excluded():
    """GT: ET cube A [2:6,4:8,4:8] (64 voxels) and B [20:23,4:7,4:7] (27 voxels). Prediction: A only.

    Spacing 1 mm: B is 27 mm³ ≤ 50 (GLI 2023 threshold) → left out: Dice 1/1 = 1, HD95 0, 1 TP, 0 FN (B's miss is
    not counted), 0 FP. Legacy Dice still sees B: 2·64 / (64 + 91) = 128/155.
    Spacing 2 mm: B is 27·8 = 216 mm³ > 50 → counted: Dice (1 + 0) / 2 = 0.5, 1 FN (the threshold is in mm³).
    """
    gt = volume((32, 12, 12), (3, 2, 6, 4, 8, 4, 8), (3, 20, 23, 4, 7, 4, 7))
    pred = volume((32, 12, 12), (3, 2, 6, 4, 8, 4, 8))
    s = M.lesion_wise_scores(pred, gt, SP1, "brats2023")["ET"]
    assert (s["tp"], s["fn"], s["fp"]) == (1, 0, 0)
    assert s["lesion_dice"] == 1.0 and s["lesion_hd95"] == 0.0
    assert s["legacy_dice"] == pytest.approx(128 / 155)
    s2 = M.lesion_wise_scores(pred, gt, (2.0, 2.0, 2.0), "brats2023")["ET"]
    assert (s2["tp"], s2["fn"]) == (1, 1)
    assert s2["lesion_dice"] == pytest.approx(0.5)


def test_2024_prediction_merging_and_removal():
    """GT: ET cube [10:14,4:8,4:8] (64). Prediction: P1 = the GT cube, P2 [17:20,4:7,4:7] (27 voxels), P3
    [30:32,4:6,4:6] (8 voxels).

    The GT dilated by 3 reaches x = 16, so P2 (x ≥ 17) does not touch it; P1 and P2 (gap 3 ≤ 2·3) merge when the
    *prediction* is dilated (2024); P3 is 10 voxels from P2 (no merge) and has 8 ≤ 10 voxels (ET threshold) → removed.
    2023 (no prediction merging or removal): P2 and P3 are FPs: Dice (1 + 0 + 0)/3 = 1/3, HD95 (0 + 2·374)/3,
    legacy Dice 2·64 / (64 + 99) = 128/163.
    2024: one predicted lesion P1 ∪ P2 (91 voxels) pooled against the GT: Dice 2·64 / (64 + 91) = 128/155, 1 TP, 0 FP;
    legacy Dice also 128/155 (computed after P3's removal).
    """
    gt = volume((40, 12, 12), (3, 10, 14, 4, 8, 4, 8))
    pred = volume((40, 12, 12), (3, 10, 14, 4, 8, 4, 8), (3, 17, 20, 4, 7, 4, 7), (3, 30, 32, 4, 6, 4, 6))
    s23 = M.lesion_wise_scores(pred, gt, SP1, "brats2023")["ET"]
    assert (s23["tp"], s23["fn"], s23["fp"]) == (1, 0, 2)
    assert s23["lesion_dice"] == pytest.approx(1 / 3)
    assert s23["lesion_hd95"] == pytest.approx(2 * 374 / 3)
    assert s23["legacy_dice"] == pytest.approx(128 / 163)
    s24 = M.lesion_wise_scores(pred, gt, SP1, "brats2024")["ET"]
    assert (s24["tp"], s24["fn"], s24["fp"]) == (1, 0, 0)
    assert s24["lesion_dice"] == pytest.approx(128 / 155)
    assert s24["legacy_dice"] == pytest.approx(128 / 155)


def test_2025_matching_prediction_overlaps_two_gt_lesions():
    """GT: ET cubes G1 [10:14,4:8,4:8] and G2 [16:20,4:8,4:8] (64 each, 2-voxel gap). Prediction: one box P
    [10:20,4:8,4:8] (160 voxels) covering both.

    DSC(G1, P) = DSC(G2, P) = 2·64 / (64 + 160) = 4/7. One-to-one bipartite matching pairs P with one of them:
    TP 1, FN 1, FP 0; lesion-wise DSC = mean over matched pairs = 4/7; F1 = 1 / (1 + ½·1) = 2/3.
    Matched pair (G1, P), erosion borders (6-connectivity): G1 has 56 border voxels — 52 on P's border (distance 0),
    4 on its x = 13 face centre at distance 1. P has 128 border voxels — 52 shared (0), rings of 12 at x = 14…18
    (distances 1…5) and its x = 19 face of 16 (distance 6). Pooled 184 sorted distances: 0 ×104, 1 ×16, 2/3/4/5 ×12,
    6 ×16; np.percentile(…, 95) sits at index 0.95·183 = 173.85, inside the sixes → HD95 6.
    NSD @ 1 mm: G1 side 56/56, P side (52 + 12)/128 = 1/2 → (1 + 1/2) / 2 = 0.75.
    Legacy DSC 2·128 / (128 + 160) = 8/9. Control, 2023: dilation merges G1 and G2, the pooled Dice is 8/9.
    """
    gt = volume((30, 14, 14), (3, 10, 14, 4, 8, 4, 8), (3, 16, 20, 4, 8, 4, 8))
    pred = volume((30, 14, 14), (3, 10, 20, 4, 8, 4, 8))
    s = M.lesion_wise_scores(pred, gt, SP1, "brats2025")["ET"]
    assert (s["tp"], s["fn"], s["fp"]) == (1, 1, 0)
    assert s["lesion_dice"] == pytest.approx(4 / 7)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["lesion_hd95"] == pytest.approx(6.0)
    assert s["lesion_nsd_1"] == pytest.approx(0.75)
    assert s["legacy_dice"] == pytest.approx(8 / 9)
    s23 = M.lesion_wise_scores(pred, gt, SP1, "brats2023")["ET"]
    assert (s23["tp"], s23["fn"], s23["lesion_dice"]) == (1, 0, pytest.approx(8 / 9))


def test_legacy_dice_by_region():
    """Legacy (whole-volume) Dice per region.

    Case 1: GT = NETC (1) cube [4:8,4:8,4:8], prediction = ET (3) on the same voxels. WT {1,2,3} and TC {1,3}: Dice 1;
    ET: GT empty, prediction not → Dice 0, HD95 374 (inf → penalty); lesion-wise ET: no GT lesion, 1 FP → 0/1 = 0,
    HD95 374/1.
    Case 2: two 4×4×4 WT cubes offset by 2 voxels along x overlap in 2×4×4 = 32 voxels → Dice 2·32 / 128 = 0.5.
    """
    gt = volume((16, 16, 16), (1, 4, 8, 4, 8, 4, 8))
    pred = volume((16, 16, 16), (3, 4, 8, 4, 8, 4, 8))
    s = M.lesion_wise_scores(pred, gt, SP1, "brats2023")
    assert s["WT"]["legacy_dice"] == 1.0 and s["TC"]["legacy_dice"] == 1.0
    assert s["ET"]["legacy_dice"] == 0.0 and s["ET"]["legacy_hd95"] == 374.0
    assert (s["ET"]["lesion_dice"], s["ET"]["lesion_hd95"], s["ET"]["fp"]) == (0.0, 374.0, 1)
    shifted = volume((16, 16, 16), (2, 6, 10, 4, 8, 4, 8))
    assert M.lesion_wise_scores(shifted, volume((16, 16, 16), (2, 4, 8, 4, 8, 4, 8)), SP1,
                                "brats2023")["WT"]["legacy_dice"] == pytest.approx(0.5)


def test_hd95_offset_cubes_anisotropic_spacing():
    """GT cube [5:9,4:8,4:8], prediction the same cube shifted +1 voxel along axis 0; spacing (2, 1, 1) mm.

    Surface elements sit on voxel corners: the GT's are the 98 surface points of a 5×5×5 corner lattice. Their areas
    at spacing (2, 1, 1) (marching-cubes triangles with vertices at edge midpoints; area vector n scaled to
    (n0·s1·s2, n1·s0·s2, n2·s0·s1)): box corner (one voxel) |(1/8, 2/8, 2/8)| = 0.375; edge along axis 0
    2·|(0, 1/2, 1/2)| = √2; edge along axis 1 or 2: 2·|(1/4, 0, 1/2)| = √5/2; face ⊥ axis 0: 2·(1/2) = 1;
    face ⊥ axis 1 or 2: 2·(1/2·2) = 2. Total = 8·0.375 + 12·√2 + 24·√5/2 + 18·1 + 36·2 = 136.8034 mm².
    GT → prediction distances: the x = 0 face (4 corners, 12 edge points, 9 face points: area 23.916) is 1 voxel
    = 2 mm from the prediction's face; the 9 interior points of the x = 4 face lie on the prediction's interior slice:
    8 are 1 mm (in y or z) from its side faces, the centre 2 mm; every other point is 0.
    Weighted: 0 mm up to 103.887/136.803 = 75.9 %, ≤ 1 mm up to 81.8 %, then 2 mm → HD95 = 2 mm (the mirror side
    is identical). An isotropic-1 mm reading would give 1. The 80th percentile shows the area weighting: weighted
    → 1 mm, while counting points (64 + 8 of 98 = 73.5 % ≤ 1 mm) would give 2 mm.
    Lesion-wise (2023): overlap 3×4×4 = 48 → Dice 2·48/128 = 0.75, HD95 2.
    """
    gt = volume((20, 12, 12), (3, 5, 9, 4, 8, 4, 8))
    pred = volume((20, 12, 12), (3, 6, 10, 4, 8, 4, 8))
    spacing = (2.0, 1.0, 1.0)
    table = M.surfel_area_table(spacing)
    assert table[0b00000001] == pytest.approx(0.375)                 # one voxel (corner)
    assert table[0b00010001] == pytest.approx(math.sqrt(2))          # voxels (0,1,1),(1,1,1): edge along axis 0
    assert table[0b00000011] == pytest.approx(math.sqrt(5) / 2)      # voxels (1,1,0),(1,1,1): edge along axis 2
    assert table[0b00001111] == pytest.approx(1.0)                   # face ⊥ axis 0
    assert table[0b00110011] == pytest.approx(2.0)                   # face ⊥ axis 1
    sd = M.surfel_distances(gt > 0, pred > 0, spacing)
    assert sd.gt_areas.sum() == pytest.approx(8 * 0.375 + 12 * math.sqrt(2) + 24 * math.sqrt(5) / 2 + 18 + 72)
    assert sd.gt_areas[sd.gt_to_pred == 2.0].sum() == pytest.approx(23.9164 + 1.0, abs=1e-3)
    assert M.robust_hausdorff(sd, 95) == pytest.approx(2.0)
    assert M.robust_hausdorff(sd, 80) == pytest.approx(1.0)
    assert M.hd95_surfels(gt > 0, pred > 0, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    s = M.lesion_wise_scores(pred, gt, spacing, "brats2023")["ET"]
    assert s["lesion_dice"] == pytest.approx(0.75) and s["lesion_hd95"] == pytest.approx(2.0)
    assert s["legacy_hd95"] == pytest.approx(2.0)


def test_invalid_inputs():
    """Label values outside the protocol's set, unknown protocols/tasks and shape mismatches are ValueErrors."""
    gt = np.zeros((6, 6, 6), dtype=np.uint8)
    bad = gt.copy()
    bad[1, 1, 1] = 5
    with pytest.raises(ValueError, match=r"prediction: label values \[5\]"):
        M.lesion_wise_scores(bad, gt, SP1, "brats2024")
    rc = gt.copy()
    rc[1, 1, 1] = 4
    with pytest.raises(ValueError, match=r"ground truth: label values \[4\].*brats2023"):
        M.lesion_wise_scores(gt, rc, SP1, "brats2023")
    with pytest.raises(ValueError, match="unknown protocol"):
        M.lesion_wise_scores(gt, gt, SP1, "brats2022")
    with pytest.raises(ValueError, match="GLI only"):
        M.lesion_wise_scores(gt, gt, SP1, "brats2024", task="PED")
    with pytest.raises(ValueError, match="one shape"):
        M.lesion_wise_scores(gt[:5], gt, SP1)


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.transpose(2, 1, 0).copy())  # arrays here are (x, y, z)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_evaluate_folders(tmp_path):
    """Two cases: 'c1' perfect (GT named c1-seg.nii.gz), 'c2' = the missed-lesion + FP example (GT c2.nii.gz).

    Per-case ET lesion Dice 1 and 1/3 → mean 2/3, median 2/3 (two values); ET Num_FP 0 and 1 → mean 0.5.
    Files: per_case.csv (2 cases × 3 regions = 6 rows), summary.csv, one box plot per region.
    """
    pred_dir, gt_dir, out_dir = tmp_path / "pred", tmp_path / "gt", tmp_path / "out"
    pred_dir.mkdir()
    gt_dir.mkdir()
    cube = volume((16, 16, 16), (3, 4, 8, 4, 8, 4, 8))
    _write(gt_dir / "c1-seg.nii.gz", cube)
    _write(pred_dir / "c1.nii.gz", cube)
    _write(gt_dir / "c2.nii.gz", volume((40, 16, 16), (3, 2, 6, 6, 10, 6, 10), (3, 30, 34, 6, 10, 6, 10)))
    _write(pred_dir / "c2.nii.gz", volume((40, 16, 16), (3, 2, 6, 6, 10, 6, 10), (3, 16, 19, 6, 9, 6, 9)))
    result = E.evaluate_folders(pred_dir, gt_dir, out_dir, protocol="brats2023", task="GLI")
    assert result["cases"] == ["c1", "c2"] and result["missing"] == []
    et = result["summary"]["ET"]
    assert et["lesion_dice"]["mean"] == pytest.approx(2 / 3) and et["lesion_dice"]["median"] == pytest.approx(2 / 3)
    assert et["fp"]["mean"] == pytest.approx(0.5)
    lines = (out_dir / "per_case.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("case,region,")
    assert "ET,lesion_dice," in (out_dir / "summary.csv").read_text()
    for region in ("WT", "TC", "ET"):
        png = out_dir / f"boxplot_{region}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_folders_label_checks_and_brats2021(tmp_path):
    """Label 4 is ET in the BraTS 2020/21 convention: rejected under brats2023 (InputError naming the file and the
    value) unless ``labels='brats2021'`` converts it (4 → 3), after which the perfect case scores Dice 1.
    A geometry mismatch (spacing) is also an InputError naming both files."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    old = volume((12, 12, 12), (2, 2, 10, 2, 10, 2, 10), (4, 4, 8, 4, 8, 4, 8))
    _write(gt_dir / "c1-seg.nii.gz", old)
    _write(pred_dir / "c1.nii.gz", old)
    with pytest.raises(InputError, match=r"c1-seg\.nii\.gz: label values \[4\]"):
        E.evaluate_folders(pred_dir, gt_dir, tmp_path / "out", protocol="brats2023")
    result = E.evaluate_folders(pred_dir, gt_dir, tmp_path / "out", protocol="brats2023", labels="brats2021")
    assert result["summary"]["ET"]["lesion_dice"]["mean"] == 1.0
    assert result["summary"]["ET"]["gt_volume_mm3"]["mean"] == 64.0
    _write(pred_dir / "c1.nii.gz", old, spacing=(1.0, 1.0, 2.0))
    with pytest.raises(InputError, match="differ in geometry"):
        E.evaluate_folders(pred_dir, gt_dir, tmp_path / "out2", protocol="brats2023", labels="brats2021")


def test_official_task_names():
    """Tasks are matched without regard to case, ``-``/``_`` or a ``BraTS-`` prefix, and the official config names
    are accepted (brats-evaluation's ``mets``); anything else is refused with the protocol's list — ``MEN`` is a
    2023 task, ambiguous in 2025 (MenPre or MenRT)."""
    assert [M.resolve_task("brats2025", t).name for t in ("mets", "BraTS-GoAT", "men-rt", "MENPRE", "gli")] == [
        "MET", "GoAT", "MenRT", "MenPre", "GLI"]
    assert M.resolve_task("brats2023", "BraTS-PED").name == "PED"
    with pytest.raises(ValueError, match=r"brats2025 has no task 'MEN'; its tasks are GoAT, GLI, MET, PED, MenPre, "
                                         r"MenRT\."):
        M.resolve_task("brats2025", "MEN")


def test_missing_prediction_met():
    """brats2025 MET, no prediction: every score 0 and every HD95 373 (``_handle_missing_data``), also in RC, which
    the ground truth lacks (an empty prediction would give NaN there). Counts: TP/FP 0, FN the ground truth's
    lesions — ET: L (64 mm³, large) and S (8 mm³, small) → FN 2, large FN 1, small FN 1; RC: 0."""
    gt = volume((24, 8, 8), (3, 2, 6, 2, 6, 2, 6), (3, 20, 22, 2, 4, 2, 4))
    scores = M.missing_prediction_scores(gt, SP1, "brats2025", "MET")
    et, rc = scores["ET"], scores["RC"]
    assert (et["tp"], et["fp"], et["fn"], et["large_fn"], et["small_fn"]) == (0, 0, 2, 1, 1)
    assert (et["lesion_dice"], et["lesion_hd95"], et["legacy_hd95"], et["f1"], et["large_f1"]) == (0, 373, 373, 0, 0)
    assert (rc["fn"], rc["large_fn"], rc["lesion_dice"], rc["lesion_hd95"], rc["small_f1"]) == (0, 0, 0, 373, 0)
