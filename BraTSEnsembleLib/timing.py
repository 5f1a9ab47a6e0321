"""Per-stage wall time of one case, for the ``timing`` field of the statistics JSON (see docs/command-line.md).

:class:`StageTimes` adds up ``time.perf_counter`` intervals by stage name. :func:`segment_case` makes one per case
and makes it *current* (a context variable) while the members run, so that a member can attribute parts of its own
work (:func:`record`: nnU-Net's preprocessing, network and export) without a change to the member interface; a
member that records nothing is counted as a whole. Timing only observes: no number of the segmentation depends on it.
"""
from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from typing import Iterator

#: Decimals kept in the JSON (milliseconds).
DIGITS = 3

_current: ContextVar["StageTimes | None"] = ContextVar("brats_ensemble_stage_times", default=None)


class StageTimes:
    """Seconds per stage, summed over every interval recorded under that name (in first-recorded order)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + max(0.0, seconds)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as (part of) stage ``name``; counted even when the block raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    @contextlib.contextmanager
    def current(self) -> Iterator["StageTimes"]:
        """Make this the collector that :func:`record` adds to, for the ``with`` block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def total(self) -> float:
        return sum(self.seconds.values())

    def rounded(self) -> dict[str, float]:
        return {name: round(value, DIGITS) for name, value in self.seconds.items()}


def rounded_seconds(seconds: float | None) -> float | None:
    """``seconds`` as the JSON keeps it (milliseconds), None kept."""
    return None if seconds is None else round(seconds, DIGITS)


#: What a member may attribute through :func:`record`, in the order the JSON lists them.
MEMBER_STAGES: tuple[str, ...] = ("loading", "preprocessing", "network", "export")


def member_timing(name: str, own: StageTimes, case: StageTimes) -> dict[str, float | str]:
    """One member's record for the JSON, its parts added to the case's stages as well.

    ``own`` holds the member's whole ``predict`` call as ``member`` and what the member recorded of it; ``other``
    is the rest (for nnU-Net members: stacking the input channels and the float32 copy of the probabilities; for
    members that record nothing: all of their work)."""
    whole = own.seconds.get("member", 0.0)
    parts = {stage: own.seconds[stage] for stage in MEMBER_STAGES if stage in own.seconds}
    parts["other"] = max(0.0, whole - sum(parts.values()))
    for stage, seconds in parts.items():
        case.add(stage if stage != "other" else "member_other", seconds)
    return {"member": name, "seconds": round(whole, DIGITS), **{k: round(v, DIGITS) for k, v in parts.items()}}


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the ``with`` block into stage ``name`` of the current collector (see :func:`record`)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record(name, time.perf_counter() - started)


def record(stage: str, seconds: float) -> None:
    """Add ``seconds`` to ``stage`` of the current collector (nothing when no case is being timed)."""
    collector = _current.get()
    if collector is not None:
        collector.add(stage, seconds)
