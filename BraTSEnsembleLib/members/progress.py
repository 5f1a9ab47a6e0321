"""Progress inside a member: its sliding window counted tile by tile, reported as a fraction of the member's work.

A member reports through ``report(step, fraction)`` (see :class:`.base.StepReporter`), ``fraction`` being the share
of its own work done (0–1). The sliding window takes the span :data:`WINDOW_SPAN` of that share (loading and
preprocessing come before it, the way back to the case grid after it, at :data:`AFTER_WINDOW`);
:class:`TileProgress` maps tiles done (over all folds) to that span and reports at most once per percent of the
tiles (and always the first and the last tile), so that a large case with thousands of tiles does not print
thousands of lines. Each report moves the fraction forward.
"""
from __future__ import annotations

from typing import Sequence

from .base import StepReporter

#: The share of a member's work that its sliding window covers: (start, end).
WINDOW_SPAN: tuple[float, float] = (0.1, 0.9)
#: The member's share of work done when its sliding window is over and it brings the result back to the case grid.
AFTER_WINDOW = 0.95
#: Share of the tiles between two reports (the first and the last tile are always reported).
REPORT_EVERY = 0.01


class TileProgress:
    """Counts the tiles of one member's sliding window(s) (all folds together) and reports its progress."""

    def __init__(self, report: StepReporter, total: int, label: str = "sliding window",
                 span: tuple[float, float] = WINDOW_SPAN) -> None:
        self.report, self.total, self.label, self.span = report, max(1, int(total)), label, span
        self.done = 0
        self._reported = -1.0  # share of the tiles at the last report

    @property
    def fraction(self) -> float:
        """The member's share of work done, for the tiles counted so far."""
        start, end = self.span
        return start + (end - start) * min(1.0, self.done / self.total)

    def advance(self, tiles: int = 1) -> None:
        """Count ``tiles`` more tiles; report when a percent more of them is done, and at the first and last."""
        self.done = min(self.total, self.done + int(tiles))
        share = self.done / self.total
        if self._reported < 0 or self.done == self.total or share - self._reported >= REPORT_EVERY:
            if share > self._reported:
                self._reported = share
                self.report(f"{self.label}, tile {self.done}/{self.total}", self.fraction)

    def rewind(self, done: int) -> None:
        """Count from ``done`` tiles again (a pass repeated after CUDA out-of-memory); what was reported stays."""
        self.done = max(0, min(self.total, int(done)))


def monai_window_count(spatial_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs on one image of ``spatial_size`` (padded to at least
    ``roi_size``), computed with MONAI's own scan interval and patch slices."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval
    from monai.utils import ensure_tuple_rep

    image_size = tuple(max(int(s), int(r)) for s, r in zip(spatial_size, roi_size))
    roi = tuple(int(r) for r in roi_size)
    interval = _get_scan_interval(image_size, roi, len(roi), ensure_tuple_rep(overlap, len(roi)))
    return len(dense_patch_slices(image_size, roi, interval))
