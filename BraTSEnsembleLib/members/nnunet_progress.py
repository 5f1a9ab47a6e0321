"""nnU-Net's own predictor, with its sliding window counted tile by tile for the progress bar.

:class:`ProgressPredictor` is ``nnUNetPredictor`` with three methods wrapped, not changed: each calls nnU-Net's own
method and returns its result untouched, so the numbers are exactly ``nnUNetv2_predict``'s (the parity tests compare
them). ``_internal_get_sliding_window_slicers`` tells how many tiles a fold has, ``_internal_maybe_mirror_and_predict``
runs once per tile (all mirrored copies of it), and ``predict_logits_from_preprocessed_data`` runs the folds between
nnU-Net's preprocessing and its export (its start and end are noted for the per-stage timing). U-Mamba models run
through the same predictor.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from .base import StepReporter
from .progress import AFTER_WINDOW, TileProgress


class ProgressPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that reports its sliding window's progress through :attr:`report` (when set)."""

    report: StepReporter | None = None
    _tiles: TileProgress | None = None
    #: ``time.perf_counter()`` when nnU-Net's network pass (all folds, sliding window, mirroring) began and ended
    #: for the last case: what lies before it in ``predict_single_npy_array`` is preprocessing, after it export
    network_started: float | None = None
    network_finished: float | None = None

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        self._tiles = None  # counted afresh for each case
        self.network_started, self.network_finished = time.perf_counter(), None
        try:
            logits = super().predict_logits_from_preprocessed_data(data)
        finally:
            self._tiles = None
            self.network_finished = time.perf_counter()
        if self.report is not None:
            self.report("back to the case grid", AFTER_WINDOW)
        return logits

    def _internal_get_sliding_window_slicers(self, image_size: tuple[int, ...]) -> list:
        slicers = super()._internal_get_sliding_window_slicers(image_size)
        if self.report is not None and self._tiles is None:  # every fold has the same tiles
            folds = len(self.list_of_parameters)
            label = f"sliding window ({folds} folds)" if folds > 1 else "sliding window"
            self._tiles = TileProgress(self.report, len(slicers) * folds, label)
        return slicers

    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers: Any,
                                                       do_on_device: bool = True) -> torch.Tensor:
        start = self._tiles.done if self._tiles is not None else 0
        try:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        except Exception:
            if self._tiles is not None:  # nnU-Net repeats the pass with its results on the CPU after out-of-memory
                self._tiles.rewind(start)
            raise

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        prediction = super()._internal_maybe_mirror_and_predict(x)
        if self._tiles is not None:
            self._tiles.advance(int(x.shape[0]))
        return prediction
