"""The demo's PNG report (BraTSEnsembleLib.demo.report) on small phantoms: size, content, slice choice, empty maps.

The demo command itself, the shipped case and the shipped model set are tested in test_demo_set.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from BraTSEnsembleLib.demo.phantom import make_phantom
from BraTSEnsembleLib.demo.report import DPI, FIGURE_SIZE_IN, tumour_centre, write_report
from BraTSEnsembleLib.labels import ET, REGIONS, SNFH, region_mask
from BraTSEnsembleLib.stats import region_statistics
from BraTSEnsembleLib.uncertainty import member_agreement

SHAPE = (48, 56, 48)
EXPECTED_SIZE = (int(FIGURE_SIZE_IN[1] * DPI), int(FIGURE_SIZE_IN[0] * DPI))  # (height, width) in pixels
# The slice panels lie left of x = 0.615 and above y = 0.875 (figure fractions, y from the top): no legend/tables.
PANELS = (slice(int(0.09 * EXPECTED_SIZE[0]), int(0.875 * EXPECTED_SIZE[0])), slice(0, int(0.615 * EXPECTED_SIZE[1])))


def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))[..., :3]  # float RGB in [0, 1]


def _et_coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the ET colour (yellow), pure or blended over grey: red and green well above blue, about equal."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    et = REGIONS["ET"].color
    assert et[0] > 0.9 and et[1] > 0.7 and et[2] < 0.1  # the heuristic below assumes a yellow ET
    return (r - b > 0.3) & (g - b > 0.25) & (np.abs(r - g) < 0.15)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11, shape=SHAPE)


@pytest.fixture(scope="module")
def reports(phantom, tmp_path_factory):
    """The report of the phantom with its own ground truth as the prediction, and of an empty label map."""
    folder = tmp_path_factory.mktemp("reports")
    statistics = {"regions": region_statistics(phantom.labels, phantom.spacing)}
    agreement = {"model-a": {"WT": 0.91, "TC": 0.85, "ET": 0.8}, "model-b": {"WT": 0.9, "TC": 0.8, "ET": None}}
    uncertainty = {r: {"mean_disagreement": 0.1, "mean_entropy": 0.2} for r in statistics["regions"]}
    full = write_report(phantom.images, phantom.labels, phantom.spacing, statistics, agreement,
                        folder / "full.png", "Phantom report", uncertainty=uncertainty)
    empty_labels = np.zeros_like(phantom.labels)
    empty = write_report({r: phantom.images[r] for r in ("t1c", "t2f")}, empty_labels, phantom.spacing,
                         region_statistics(empty_labels, phantom.spacing), None, folder / "empty.png", "Empty")
    return full, empty


def test_report_size_and_content(reports):
    full, _ = reports
    assert full.is_file() and full.name == "full.png"
    assert not list(full.parent.glob(".*partial*")), "no temporary file may stay behind"
    rgb = _read_png(full)
    assert rgb.shape[:2] == EXPECTED_SIZE
    assert rgb.std() > 0.1, "the page is blank"
    panels = rgb[PANELS]
    assert (panels.max(axis=-1) < 0.05).mean() > 0.1, "no dark image background in the slice panels"
    assert (panels.std(axis=-1) < 0.02).sum() > 10_000, "no grey image pixels in the slice panels"
    assert _et_coloured(panels).sum() > 500, "the ET overlay colour is missing from the slices"


def test_empty_label_map_still_makes_a_report(reports):
    _, empty = reports
    rgb = _read_png(empty)
    assert rgb.shape[:2] == EXPECTED_SIZE
    assert rgb.std() > 0.1
    assert _et_coloured(rgb[PANELS]).sum() == 0, "nothing labelled, yet ET colour in the slices"


def test_slice_chooser_picks_the_tumour_centre(phantom):
    centre, found = tumour_centre(phantom.labels)
    assert found
    whole = region_mask(phantom.labels, "WT")
    assert np.abs(np.array(centre) - np.argwhere(whole).mean(axis=0)).max() <= 0.5 + 1e-9
    assert phantom.labels[centre] != 0


def test_slice_chooser_takes_the_largest_component_and_the_middle_when_empty():
    labels = np.zeros((30, 40, 50), dtype=np.uint8)
    labels[2:6, 3:7, 4:8] = SNFH  # small lesion
    labels[15:25, 20:30, 30:44] = ET  # large lesion: centre (19.5, 24.5, 36.5)
    centre, found = tumour_centre(labels)
    assert found
    assert np.abs(np.array(centre) - (19.5, 24.5, 36.5)).max() <= 0.5
    assert labels[centre] == ET
    assert tumour_centre(np.zeros((30, 40, 50), dtype=np.uint8)) == ((15, 20, 25), False)


def test_report_refuses_images_on_another_grid(phantom, tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_report({"t1c": phantom.images["t1c"][:-1]}, phantom.labels, phantom.spacing,
                     region_statistics(phantom.labels, phantom.spacing), None, tmp_path / "x.png", "x")
    assert not (tmp_path / "x.png").exists()


def test_member_agreement_is_dice_per_region(phantom):
    fused = phantom.labels
    shrunk = np.where(fused == ET, SNFH, fused).astype(np.uint8)  # a member that never says ET
    table = member_agreement({"same": fused, "no-et": shrunk}, fused)
    assert table["same"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert table["no-et"]["WT"] == 1.0 and table["no-et"]["ET"] == 0.0
    netc, tc = int(region_mask(fused, "NETC").sum()), int(region_mask(fused, "TC").sum())
    assert table["no-et"]["TC"] == pytest.approx(2 * netc / (netc + tc))
