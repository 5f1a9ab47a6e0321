"""A one-page PNG report of a segmented case: slices with the segmentation, the region volumes and the agreement.

``write_report`` draws, on one ~1600×1000 px page (readable at 100 % zoom):

- axial, coronal and sagittal slices through the tumour's centre of mass (of the largest whole-tumour component;
  the middle of the volume when nothing is labelled), on T1c (top row) and T2-FLAIR (bottom row), with the labels
  overlaid in the BraTS colours of :data:`BraTSEnsembleLib.labels.REGIONS` (ET yellow, NETC red, SNFH green) and the
  physical aspect ratio of the voxel spacing;
- the table of volumes per region (mL, voxels, lesions);
- when given, the agreement of each ensemble member with the fused labels (Dice for WT, TC, ET) and/or the
  ensemble's uncertainty summary (mean disagreement / entropy inside each region, as in the statistics JSON);
- a footer that says what the page is (by default: made with synthetic phantoms, research use only).

Slices are shown in array (voxel) axes, with the superior side up in the coronal and sagittal views; for images in
the usual LPS/RAS-aligned orientation this is the usual radiological display. Drawn with matplotlib's object API
(``Figure`` + ``FigureCanvasAgg``), so no global pyplot state is touched and no display is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..labels import ET, NETC, RC, REGIONS, SNFH, region_mask
from ..segmentation import statistics_rows

#: Label value → region name whose colour is drawn for it.
OVERLAY_REGIONS: dict[int, str] = {NETC: "NETC", SNFH: "SNFH", ET: "ET", RC: "RC"}
#: Image rows of the report: (role, title); a role that is not given is left out.
IMAGE_ROWS: tuple[tuple[str, str], ...] = (("t1c", "T1c"), ("t2f", "T2-FLAIR"))
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
FIGURE_SIZE_IN = (16.0, 10.0)
DPI = 100
OVERLAY_ALPHA = 0.4
ROW_HEIGHT = 0.03  # table row height, figure fraction (30 px)
DEMO_FOOTER = ("Made with synthetic phantoms and a demo model trained on them for a few minutes. Research use "
               "only: not a medical device, never for diagnosis or for patients.")


def tumour_centre(labels: np.ndarray) -> tuple[tuple[int, int, int], bool]:
    """``((z, y, x), found)``: the rounded centre of mass of the largest 26-connected whole-tumour component, or
    the middle of the volume (``found`` False) when the label map has no tumour voxel."""
    whole = region_mask(labels, "WT")
    if not whole.any():
        return tuple(int(s) // 2 for s in labels.shape), False  # type: ignore[return-value]
    import cc3d

    components, count = cc3d.connected_components(whole.astype(np.uint8), connectivity=26, return_N=True)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        whole = components == int(np.argmax(sizes))
    centre = np.argwhere(whole).mean(axis=0)
    return tuple(int(round(c)) for c in centre), True  # type: ignore[return-value]


def _slice(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    """A 2-D slice, rows top to bottom as displayed: axial (y, x); coronal and sagittal with superior (high z) up."""
    z, y, x = centre
    if view == "axial":
        return volume[z]
    if view == "coronal":
        return volume[::-1, y, :]
    return volume[::-1, :, x]


def _extent(shape_zyx: Sequence[int], spacing_xyz: Sequence[float], view: str) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in mm of a displayed slice, so that ``aspect='equal'`` is the physical aspect."""
    nz, ny, nx = shape_zyx
    sx, sy, sz = (float(s) for s in spacing_xyz)
    width, height = {"axial": (nx * sx, ny * sy), "coronal": (nx * sx, nz * sz), "sagittal": (ny * sy, nz * sz)}[view]
    return 0.0, width, 0.0, height


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display window of a volume: 0.5–99.5th percentiles of its non-zero voxels (0–1 for an empty image)."""
    values = image[image > 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _overlay(labels_2d: np.ndarray) -> np.ndarray:
    """RGBA image of the labels in their region colours (transparent background)."""
    rgba = np.zeros(labels_2d.shape + (4,), dtype=np.float32)
    for value, region in OVERLAY_REGIONS.items():
        where = labels_2d == value
        if where.any():
            rgba[where, :3] = REGIONS[region].color
            rgba[where, 3] = OVERLAY_ALPHA
    return rgba


def _draw_view(ax: Any, image: np.ndarray, labels: np.ndarray, view: str, centre: Sequence[int],
               spacing_xyz: Sequence[float], window: tuple[float, float], field_mm: float) -> None:
    """One view; every view shows a square field of ``field_mm`` around its slice, so all share one scale."""
    extent = _extent(labels.shape, spacing_xyz, view)
    ax.imshow(_slice(image, view, centre), cmap="gray", vmin=window[0], vmax=window[1], extent=extent,
              aspect="equal", interpolation="nearest")
    labels_2d = _slice(labels, view, centre)
    ax.imshow(_overlay(labels_2d), extent=extent, aspect="equal", interpolation="nearest")
    rows, cols = labels_2d.shape
    # Outlines in full colour: the regions stay visible on bright and dark tissue alike.
    xs = np.linspace(extent[0], extent[1], cols + 1)
    xs = (xs[:-1] + xs[1:]) / 2
    ys = np.linspace(extent[3], extent[2], rows + 1)
    ys = (ys[:-1] + ys[1:]) / 2
    for value, region in OVERLAY_REGIONS.items():
        mask = labels_2d == value
        if mask.any() and not mask.all():
            ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[REGIONS[region].color],
                       linewidths=1.2)
    mid_x, mid_y = (extent[0] + extent[1]) / 2, (extent[2] + extent[3]) / 2
    ax.set_xlim(mid_x - field_mm / 2, mid_x + field_mm / 2)
    ax.set_ylim(mid_y - field_mm / 2, mid_y + field_mm / 2)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_facecolor("black")  # the square field beyond the image


def _table(figure: Any, left: float, top: float, width: float, title: str, columns: Sequence[str],
           rows: Sequence[Sequence[str]], colours: Sequence[tuple[float, float, float] | None] | None = None,
           note: str | None = None, first_width: float = 0.25) -> float:
    """Draw a titled table whose top-left corner is at (``left``, ``top``) in figure fractions; returns the bottom of
    what was drawn (note included), so that the next panel can go below it."""
    figure.text(left, top, title, fontsize=13, fontweight="bold", va="top")
    top -= 0.035
    shown = [list(r) for r in rows] or [["(none)"] + [""] * (len(columns) - 1)]
    height = ROW_HEIGHT * (len(shown) + 1)
    ax = figure.add_axes((left, top - height, width, height))
    ax.set_axis_off()
    others = (1.0 - first_width) / max(1, len(columns) - 1)
    table = ax.table(cellText=shown, colLabels=list(columns), bbox=[0.0, 0.0, 1.0, 1.0], cellLoc="center",
                     colLoc="center", colWidths=[first_width] + [others] * (len(columns) - 1))
    table.auto_set_font_size(False)
    table.set_fontsize(11.5)
    for (row, col), cell in table.get_celld().items():
        cell.set_edgecolor("#c8c8c8")
        cell.set_linewidth(0.6)
        if row == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("#eeeeee")
        elif col == 0 and colours and row - 1 < len(colours) and colours[row - 1] is not None:
            cell.set_facecolor((*colours[row - 1], 0.45))  # type: ignore[misc]
    bottom = top - height
    if note:
        figure.text(left, bottom - 0.008, note, fontsize=10, color="#444444", va="top")
        bottom -= 0.008 + 0.02 * (note.count("\n") + 1)
    return bottom


def _format(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def render_report(case_images: Mapping[str, np.ndarray], labels: np.ndarray, spacing_xyz: Sequence[float],
                  statistics: Mapping[str, Any], member_agreement: Mapping[str, Mapping[str, float]] | None,
                  title: str, *, uncertainty: Mapping[str, Mapping[str, float | None]] | None = None,
                  uncertainty_note: str | None = None, subtitle: str | None = None,
                  footer: str = DEMO_FOOTER) -> Any:
    """The report as a matplotlib ``Figure`` (see :func:`write_report`)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels = np.asarray(labels)
    rows = [(role, name) for role, name in IMAGE_ROWS if role in case_images] or \
        [(role, role) for role in list(case_images)[:2]]
    if not rows:
        raise ValueError("no image to draw the report on (give at least t1c or t2f)")
    for role, _ in rows:
        if case_images[role].shape != labels.shape:
            raise ValueError(f"image {role} has shape {case_images[role].shape}, labels {labels.shape}")
    centre, found = tumour_centre(labels)

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, facecolor="white")
    figure.text(0.015, 0.975, title, fontsize=18, fontweight="bold", va="top")
    z, y, x = centre
    where = (f"Slices through the centre of the largest whole-tumour component, voxel (x, y, z) = ({x}, {y}, {z})"
             if found else "No tumour labelled: slices through the middle of the volume")
    if subtitle:
        where = f"{subtitle}    ·    {where}"
    figure.text(0.015, 0.938, where, fontsize=11.5, color="#333333", va="top")

    grid = figure.add_gridspec(len(rows), 3, left=0.045, right=0.615, top=0.885, bottom=0.125, wspace=0.04,
                               hspace=0.08)
    field_mm = max(n * float(s) for n, s in zip(reversed(labels.shape), spacing_xyz))
    for r, (role, name) in enumerate(rows):
        image = np.asarray(case_images[role], dtype=np.float32)
        window = _window(image)
        for c, view in enumerate(VIEWS):
            ax = figure.add_subplot(grid[r, c])
            _draw_view(ax, image, labels, view, centre, spacing_xyz, window, field_mm)
            index = {"axial": z, "coronal": y, "sagittal": x}[view]
            count = {"axial": labels.shape[0], "coronal": labels.shape[1], "sagittal": labels.shape[2]}[view]
            if r == 0:
                ax.set_title(f"{view.capitalize()}  (slice {index + 1}/{count})", fontsize=12.5)
            if c == 0:
                ax.set_ylabel(name, fontsize=14, fontweight="bold")
    handles = [Patch(facecolor=REGIONS[r].color, edgecolor=REGIONS[r].color, label=f"{r}: {REGIONS[r].description}")
               for r in ("ET", "NETC", "SNFH")]
    if np.any(labels == RC):
        handles.append(Patch(facecolor=REGIONS["RC"].color, label=f"RC: {REGIONS['RC'].description}"))
    figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.04, 0.112), ncol=len(handles),
                  fontsize=11, frameon=False, handlelength=1.6, columnspacing=1.4)
    spacing_text = " × ".join(f"{float(s):g}" for s in spacing_xyz)
    figure.text(0.045, 0.068, f"Voxel spacing (x × y × z): {spacing_text} mm; grid (x × y × z): "
                f"{labels.shape[2]} × {labels.shape[1]} × {labels.shape[0]}; all views at one physical scale.",
                fontsize=10, color="#444444", va="top")

    # Right column: tables, one below the other.
    left, width, top = 0.655, 0.325, 0.885
    stats_rows = statistics_rows(statistics)
    top = _table(figure, left, top, width, "Volumes per region", ["Region", "Volume [mL]", "Voxels", "Lesions"],
                 [[r["Region"], f"{r['Volume [mL]']:.2f}", f"{r['Voxels']:,}", str(r["Lesions"])]
                  for r in stats_rows],
                 [REGIONS[r["Region"]].color if r["Region"] in OVERLAY_REGIONS.values() else None
                  for r in stats_rows],
                 note="TC = NETC + ET; WT = NETC + SNFH + ET.\nLesions: 26-connected components.") - 0.04
    if member_agreement is not None:
        regions = ("WT", "TC", "ET")
        names = [str(name) if len(str(name)) <= 24 else str(name)[:23] + "…" for name in member_agreement]
        top = _table(figure, left, top, width, "Agreement of each model with the ensemble (Dice)",
                     ["Model", *regions],
                     [[name, *(_format(scores.get(r)) for r in regions)]
                      for name, scores in zip(names, member_agreement.values())],
                     note="Dice of each model's own labels (argmax) with the ensemble's final labels.",
                     first_width=0.46) - 0.04
    if uncertainty is not None:
        regions = [r for r in ("ET", "NETC", "SNFH", "TC", "WT", "RC") if r in uncertainty]
        _table(figure, left, top, width, "Ensemble uncertainty (mean inside region)",
               ["Region", "Disagreement", "Entropy"],
               [[r, _format(uncertainty[r].get("mean_disagreement")), _format(uncertainty[r].get("mean_entropy"))]
                for r in regions],
               [REGIONS[r].color if r in OVERLAY_REGIONS.values() else None for r in regions],
               note=uncertainty_note or "Disagreement: share of models whose own label differs from the\n"
                                        "ensemble's; entropy of the fused probabilities (0 certain … 1 uniform).")
    figure.text(0.5, 0.012, footer, fontsize=11, ha="center", va="bottom", color="#7a0000", fontweight="bold",
                wrap=True)
    return figure


def write_report(case_images: Mapping[str, np.ndarray], labels: np.ndarray, spacing_xyz: Sequence[float],
                 statistics: Mapping[str, Any], member_agreement: Mapping[str, Mapping[str, float]] | None,
                 path: str | Path, title: str, *, uncertainty: Mapping[str, Mapping[str, float | None]] | None = None,
                 uncertainty_note: str | None = None, subtitle: str | None = None,
                 footer: str = DEMO_FOOTER) -> Path:
    """Write the one-page PNG report of a case (about 1600×1000 px) and return its path.

    ``case_images``: role → (z, y, x) array ('t1c' and 't2f' are drawn); ``labels``: canonical BraTS label map on
    the same grid; ``spacing_xyz``: voxel size in mm, SimpleITK order; ``statistics``: the statistics JSON (or its
    ``regions`` dict); ``member_agreement``: ``{member name: {"WT": dice, "TC": dice, "ET": dice}}`` or None;
    ``uncertainty``: the statistics JSON's ``uncertainty`` summary (``{region: {"mean_disagreement", …}}``) or None,
    ``uncertainty_note`` the line under that table; ``subtitle``: a line under the title; ``footer``: the line at the
    bottom (by default the synthetic-phantom / research-use statement).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = render_report(case_images, labels, spacing_xyz, statistics, member_agreement, title,
                           uncertainty=uncertainty, uncertainty_note=uncertainty_note, subtitle=subtitle,
                           footer=footer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.png")
    FigureCanvasAgg(figure)
    figure.savefig(str(tmp), dpi=DPI, facecolor="white")
    tmp.replace(path)
    return path
