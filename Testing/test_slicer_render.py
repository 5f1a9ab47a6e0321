"""The result as Slicer shows it: the segmentation over T1c in Slicer's own slice views (axial, sagittal, coronal) and
the 3D view, rendered offscreen through slice logics and displayable managers of ``slicer-core`` (see
``slicer_views.py``). Set ``BRATS_UPDATE_SCREENSHOT=1`` with the end-to-end test in ``test_slicer_mrml.py`` to
re-render Resources/Screenshots/slicer_views.png from the demo ensemble's result.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_views  # noqa: E402
from test_slicer_mrml import (DEMO_CASE, app, label_points_ras, load_volume, logic,  # noqa: E402,F401
                              write_cli_outputs)


def test_demo_segmentation_over_t1c_in_slicers_slice_and_3d_views(app, logic, tmp_path):
    labels = sitk.ReadImage(str(DEMO_CASE / "DemoPhantom-777-seg.nii.gz"))
    reference = load_volume(app, DEMO_CASE / "DemoPhantom-777-t1c.nii.gz")
    write_cli_outputs(tmp_path / "out", "DemoPhantom-777", labels)
    seg, table, _ = logic.importResults(str(tmp_path / "out"), "DemoPhantom-777", reference)
    logic.showResults(seg, table, reference)
    center = label_points_ras(labels, 1).mean(axis=0)  # the necrotic core's centre: every region is cut there
    views = slicer_views.render_views(app, center, size=(240, 240))
    for name in ("Red", "Yellow", "Green"):
        pixels = views[name]
        # the view centre is the NETC core (red fill over the image), surrounded by ET (yellow) and SNFH (green)
        core = pixels[110:130, 110:130].reshape(-1, 3).mean(axis=0)
        assert core[0] > core[1] + 40 and core[0] > core[2] + 40, (name, core)
        r, g, b = (pixels[:, :, i].astype(int) for i in range(3))
        coloured = {
            "NETC": (r > g + 60) & (r > b + 60),  # red fill
            "ET": (r > 150) & (g > 150) & (b < r - 50),  # yellow fill
            "SNFH": (g > r + 30) & (g > b + 30),  # green fill
        }
        for region, mask in coloured.items():
            assert mask.mean() > 0.005, (name, region, mask.mean())
        assert coloured["SNFH"].mean() > coloured["ET"].mean() and coloured["SNFH"].mean() > coloured["NETC"].mean()
        # outside the segments, T1c in grey
        grey = pixels[(pixels.max(-1) - pixels.min(-1) < 4) & (pixels.max(-1) > 40)]
        assert len(grey) > 0.05 * pixels.shape[0] * pixels.shape[1], name
    assert not np.array_equal(views["Red"], views["Yellow"]) and not np.array_equal(views["Red"], views["Green"])
    three_d = views["3D"]
    # the SNFH surface (outermost, green) in front of the view's background gradient
    green = (three_d[:, :, 1] > three_d[:, :, 0] + 40) & (three_d[:, :, 1] > three_d[:, :, 2] + 40)
    assert 0.05 < green.mean() < 0.9
    picture = slicer_views.views_picture(views)
    assert picture.shape == (246, 4 * 240 + 3 * 4, 3)
    slicer_views.save_png(picture, tmp_path / "views.png")
    assert (tmp_path / "views.png").stat().st_size > 10_000
