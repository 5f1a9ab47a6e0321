"""Postprocessing rules against their published definitions.

The ratio-adaptive rule is checked against an oracle written here from the published description (per-component
loops over ``scipy.ndimage.label`` with its default 6-connected structure, as the GoAT 2025 inference code uses),
on random label maps, and on hand-built cases where the published choices and the obvious alternatives disagree.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from BraTSEnsembleLib.labels import ET, NETC, SNFH
from BraTSEnsembleLib.postprocess import Step, apply_steps, et_to_netc, min_size, parse_steps, ratio_adaptive


def oracle_ratio_adaptive(labels: np.ndarray, et_ratio: float = 0.0005, wt_ratio: float = 0.005) -> np.ndarray:
    """The published rule, component by component, with scipy's default (6-connected) labelling."""
    out = labels.copy()

    def mean_wt_component(volume: np.ndarray) -> float:
        components, count = ndimage.label(np.isin(volume, [1, 2, 3]))
        sizes = [int((components == i).sum()) for i in range(1, count + 1)]
        kept = [s for s in sizes if s >= 10]
        return sum(kept) / len(kept) if kept else 0.0

    et_threshold = min(et_ratio * mean_wt_component(out), 100)
    components, count = ndimage.label(out == 3)
    for i in range(1, count + 1):
        region = components == i
        if region.sum() < et_threshold:
            out[region] = 0
    wt_threshold = max(min(wt_ratio * mean_wt_component(out), 250), 10)
    components, count = ndimage.label(np.isin(out, [1, 2, 3]))
    for i in range(1, count + 1):
        region = components == i
        if region.sum() < wt_threshold:
            out[region] = 0
    return out


def blob(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


@pytest.mark.parametrize("seed", range(6))
def test_ratio_adaptive_equals_the_published_rule_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    shape = (40, 44, 36)
    labels = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(2, 6)):  # tumours of different sizes: oedema shell, ET rim, necrotic centre
        centre, radius = rng.integers(6, 30, 3), rng.uniform(2, 9)
        labels[blob(shape, centre, radius)] = SNFH
        labels[blob(shape, centre, radius * 0.6)] = ET
        labels[blob(shape, centre, radius * 0.3)] = NETC
    speckle = rng.random(shape) < 0.01  # scattered single voxels and small clusters of each label
    labels[speckle] = rng.integers(1, 4, int(speckle.sum()))
    ours = labels.copy()
    ratio_adaptive(ours)
    assert np.array_equal(ours, oracle_ratio_adaptive(labels))
    assert not np.array_equal(ours, labels), "the case should have something to remove"


def test_small_et_island_goes_to_background_not_netc():
    """A 5-voxel ET island with a 20000-voxel mean WT component: ET_thresh = min(0.0005·WT_vol, 100) = 10 → the island
    (inside oedema) becomes background, not NETC."""
    shape = (60, 60, 60)
    labels = np.zeros(shape, np.uint8)
    labels[blob(shape, (30, 30, 30), 16.85)] = SNFH  # ≈ 20 000 voxels
    labels[30, 30, 28:33] = ET  # 5 voxels inside the oedema
    details = ratio_adaptive(labels)
    assert details["et_threshold"] == pytest.approx(min(0.0005 * details["wt_volume"], 100))
    assert 5 < details["et_threshold"]
    assert labels[30, 30, 30] == 0  # background: a hole in the oedema, as published
    assert np.count_nonzero(labels == NETC) == 0


def test_diagonal_neighbours_are_separate_components_under_six_connectivity():
    """Two 8-voxel cubes touching only at an edge: 26-connected they are one 16-voxel lesion (kept with WT_thresh
    10), 6-connected two 8-voxel lesions (removed). The published rule is 6-connected."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:7, 5:7, 5:7] = SNFH
    labels[7:9, 7:9, 5:7] = SNFH  # shares only an edge with the first cube
    details = ratio_adaptive(labels)
    assert details["wt_threshold"] == 10
    assert np.count_nonzero(labels) == 0


def test_wt_volume_is_recomputed_after_the_et_step():
    """Removing ET islands changes the WT component sizes the WT step averages; the published code recomputes.

    One ≈180 000-voxel tumour and four 12-voxel pure-ET islands: mean WT component ≈ 36 000, ET_thresh = 18 > 12,
    so the islands go; afterwards the mean is the big tumour alone (≈180 000) and WT_thresh = 250."""
    shape = (100, 100, 100)
    labels = np.zeros(shape, np.uint8)
    labels[blob(shape, (50, 50, 50), 35)] = SNFH
    for z in range(2, 26, 6):  # four separate 12-voxel pure-ET islands in a corner, outside the tumour
        labels[z:z + 2, 2:4, 2:5] = ET
    details = ratio_adaptive(labels.copy())
    assert details["et_components_removed"] == 4
    assert details["wt_volume_after_et"] > 4 * details["wt_volume"]
    assert details["wt_threshold"] == 250
    ours = labels.copy()
    ratio_adaptive(ours)
    assert np.array_equal(ours, oracle_ratio_adaptive(labels))


def test_min_size_and_et_to_netc():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[blob(labels.shape, (15, 15, 15), 6)] = SNFH
    labels[blob(labels.shape, (15, 15, 15), 3)] = ET
    labels[1:3, 1:3, 1:3] = SNFH  # 8 voxels
    removed = min_size(labels, 9)
    assert removed["wt_components_removed"] == 1 and labels[1, 1, 1] == 0
    et_voxels = int(np.count_nonzero(labels == ET))
    unchanged = labels.copy()
    assert et_to_netc(unchanged, et_voxels)["converted"] is False  # not below the threshold
    assert et_to_netc(labels, et_voxels + 1)["converted"] is True
    assert np.count_nonzero(labels == ET) == 0 and np.count_nonzero(labels == NETC) == et_voxels


def test_parse_steps_and_apply_record():
    assert parse_steps("none") == []
    assert parse_steps("ratio-adaptive,et-to-netc:300") == [Step("ratio-adaptive"), Step("et-to-netc", 300)]
    assert parse_steps("min-size") == [Step("min-size", 50)]
    for bad in ("ratio-adaptive:5", "blur", "min-size:abc"):
        with pytest.raises(ValueError):
            parse_steps(bad)
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2, 2, 2] = ET
    result, records = apply_steps(labels, parse_steps("min-size:2"))
    assert labels[2, 2, 2] == ET and result[2, 2, 2] == 0  # the input is left as it was
    assert records == [{"rule": "min-size", "min_voxels": 2.0, "wt_components_removed": 1}]
