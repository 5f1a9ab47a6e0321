"""Connected-component postprocessing of BraTS label maps (components found with cc3d).

Rules (selected with ``--postprocess``; several may be chained with commas):

- ``ratio-adaptive`` — the BraTS 2025 GoAT 1st-place rule (To-Liang Hsu et al.; their published inference code,
  ``ratio_adaptive_postprocessing``): WT_vol = mean voxel count of the 6-connected whole-tumour components of at least
  10 voxels (0 if none). ET step: ET_thresh = min(0.0005·WT_vol, 100); 6-connected ET components with fewer voxels
  are set to background. WT_vol is then recomputed and WT_thresh = max(min(0.005·WT_vol, 250), 10); whole-tumour
  components with fewer voxels are set to background. No TC rule.
- ``min-size[:N]`` — whole-tumour components (26-connected) of fewer than N voxels (default 50) set to background.
- ``et-to-netc[:N]`` — when the case's total ET volume is below N voxels (default 500), all ET becomes NETC: the
  classic rule of BraTS pipelines since Isensee et al. 2020 (a case without true enhancement is scored perfect only
  when no ET is predicted at all). N is a parameter; tune it on your own validation data.
- ``region-min-size[:WT/TC/ET]`` — the BraTS GoAT 2024 rule (Ferreira et al., ShadowTwin41/BraTS_2023_2024_solutions,
  ``process_prediction_file``): the regions WT (NETC ∪ SNFH ∪ ET), TC (NETC ∪ ET) and ET are filtered each on its
  own — 26-connected components with fewer voxels than the region's threshold (default WT 250, TC 150, ET 100) are
  dropped — and the labels are rebuilt from the kept regions, unconditionally, in the order WT → SNFH, TC → NETC,
  ET → ET (later regions overwrite earlier ones). So an ET component removed inside a kept TC becomes NETC (not
  background), and a kept ET stays ET even where its TC or WT component was removed. Resection cavity (RC, a label
  the published pipeline did not have) is kept where no region is rebuilt.
- ``none`` — nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import cc3d
import numpy as np

from .labels import ET, NETC, RC, REGIONS, SNFH

WHOLE_TUMOUR = REGIONS["WT"].labels


Parameter = float | tuple[float, ...] | None


@dataclass(frozen=True)
class Step:
    """One postprocessing rule with its parameter: a threshold in voxels, or one per region (``250/150/100``)."""

    rule: str
    parameter: Parameter = None

    def __str__(self) -> str:
        if self.parameter is None:
            return self.rule
        if isinstance(self.parameter, tuple):
            return f"{self.rule}:{'/'.join(f'{v:g}' for v in self.parameter)}"
        return f"{self.rule}:{self.parameter:g}"


def component_sizes(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of ``mask``: the label image (0 = outside) and the voxel count of each label."""
    components = cc3d.connected_components(mask.astype(np.uint8, copy=False), connectivity=connectivity)
    return components, np.bincount(components.ravel())


def remove_components_below(labels: np.ndarray, mask: np.ndarray, min_voxels: float, connectivity: int) -> int:
    """Set components of ``mask`` with fewer than ``min_voxels`` voxels to background, in place; returns how many."""
    components, sizes = component_sizes(mask, connectivity)
    small = np.flatnonzero(sizes < min_voxels)
    small = small[small > 0]
    if small.size:
        labels[np.isin(components, small)] = 0
    return int(small.size)


def mean_whole_tumour_component(labels: np.ndarray, connectivity: int = 6, min_voxels: int = 10) -> float:
    """Mean voxel count of whole-tumour components of at least ``min_voxels`` voxels (0 when there are none)."""
    _, sizes = component_sizes(np.isin(labels, WHOLE_TUMOUR), connectivity)
    counted = sizes[1:][sizes[1:] >= min_voxels]
    return float(counted.mean()) if counted.size else 0.0


def ratio_adaptive(labels: np.ndarray, et_ratio: float = 0.0005, wt_ratio: float = 0.005) -> dict[str, Any]:
    """The GoAT 2025 ratio-adaptive rule (module docstring), in place; returns the thresholds and removals."""
    wt_volume = mean_whole_tumour_component(labels)
    et_threshold = min(et_ratio * wt_volume, 100.0)
    removed_et = remove_components_below(labels, labels == ET, et_threshold, connectivity=6)
    wt_volume_after = mean_whole_tumour_component(labels)
    wt_threshold = max(min(wt_ratio * wt_volume_after, 250.0), 10.0)
    removed_wt = remove_components_below(labels, np.isin(labels, WHOLE_TUMOUR), wt_threshold, connectivity=6)
    return {"wt_volume": wt_volume, "et_threshold": et_threshold, "et_components_removed": removed_et,
            "wt_volume_after_et": wt_volume_after, "wt_threshold": wt_threshold,
            "wt_components_removed": removed_wt}


def min_size(labels: np.ndarray, min_voxels: float = 50) -> dict[str, Any]:
    """Remove whole-tumour components (26-connected) smaller than ``min_voxels``, in place."""
    removed = remove_components_below(labels, np.isin(labels, WHOLE_TUMOUR), min_voxels, connectivity=26)
    return {"min_voxels": min_voxels, "wt_components_removed": removed}


def et_to_netc(labels: np.ndarray, min_et_voxels: float = 500) -> dict[str, Any]:
    """Turn all ET into NETC when total ET has fewer than ``min_et_voxels`` voxels, in place."""
    et_voxels = int(np.count_nonzero(labels == ET))
    converted = 0 < et_voxels < min_et_voxels
    if converted:
        labels[labels == ET] = NETC
    return {"min_et_voxels": min_et_voxels, "et_voxels": et_voxels, "converted": converted}


#: The regions of ``region-min-size``, in the order their labels are rebuilt, with the label each writes.
REBUILD_ORDER: tuple[tuple[str, int], ...] = (("WT", SNFH), ("TC", NETC), ("ET", ET))


def region_min_size(labels: np.ndarray, thresholds: tuple[float, ...] = (250, 150, 100)) -> dict[str, Any]:
    """The GoAT 2024 region rule (module docstring), in place: per-region 26-connected removal, labels rebuilt."""
    kept = {}
    removed = {}
    for (region, _), threshold in zip(REBUILD_ORDER, thresholds):
        mask = np.isin(labels, REGIONS[region].labels)
        removed[region] = remove_components_below(mask, mask, threshold, connectivity=26)
        kept[region] = mask
    labels[labels != RC] = 0
    for region, label in REBUILD_ORDER:
        labels[kept[region]] = label
    return {"thresholds": dict(zip((r for r, _ in REBUILD_ORDER), thresholds)),
            "components_removed": removed, "connectivity": 26}


_RULES: dict[str, tuple[Callable[..., dict[str, Any]], Parameter]] = {
    "ratio-adaptive": (ratio_adaptive, None),
    "min-size": (min_size, 50),
    "et-to-netc": (et_to_netc, 500),
    "region-min-size": (region_min_size, (250.0, 150.0, 100.0)),
}
RULE_NAMES: tuple[str, ...] = ("none", *_RULES)


def parse_steps(spec: str) -> list[Step]:
    """Parse ``'ratio-adaptive'``, ``'min-size:100,et-to-netc:300'`` or ``'none'`` into steps."""
    steps = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        rule, _, value = part.partition(":")
        if rule == "none":
            continue
        if rule not in _RULES:
            raise ValueError(f"unknown postprocessing rule {rule!r}; choose from {', '.join(RULE_NAMES)}")
        default = _RULES[rule][1]
        if value and default is None:
            raise ValueError(f"postprocessing rule {rule!r} takes no parameter")
        steps.append(Step(rule, _parse_parameter(part, value, default) if value else default))
    return steps


def _parse_parameter(part: str, value: str, default: Parameter) -> Parameter:
    """A number of voxels, or (for per-region rules) as many numbers as the default has, separated by '/'."""
    count = len(default) if isinstance(default, tuple) else 1
    try:
        numbers = tuple(float(v) for v in value.split("/"))
    except ValueError:
        numbers = ()
    if len(numbers) != count or any(not n >= 0 for n in numbers):
        expected = "one number of voxels" if count == 1 else f"{count} numbers of voxels separated by '/'"
        raise ValueError(f"postprocessing {part!r}: the parameter must be {expected}")
    return numbers if isinstance(default, tuple) else numbers[0]


def apply_steps(labels: np.ndarray, steps: list[Step]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Apply the steps in order to a copy of ``labels``; returns the new labels and a record of each step."""
    result = labels.copy()
    records = []
    for step in steps:
        function, _ = _RULES[step.rule]
        details = function(result) if step.parameter is None else function(result, step.parameter)
        records.append({"rule": step.rule, **details})
    return result, records
