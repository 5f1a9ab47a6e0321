"""Streaming fusion arithmetic and per-region statistics."""
from __future__ import annotations

import numpy as np
import pytest

from BraTSEnsembleLib.ensemble import StreamingEnsemble, argmax_labels
from BraTSEnsembleLib.labels import ET, NETC, SNFH
from BraTSEnsembleLib.members.base import Probabilities
from BraTSEnsembleLib.stats import cohort_columns, cohort_rows, region_statistics


def random_probabilities(seed: int, labels=(0, 1, 2, 3), shape=(6, 7, 8)) -> Probabilities:
    logits = np.random.default_rng(seed).normal(size=(len(labels), *shape)).astype(np.float32)
    e = np.exp(logits)
    return Probabilities((e / e.sum(0)).astype(np.float32), tuple(labels))


def test_equal_weights_reproduce_nnunet_ensemble_arithmetic():
    members = [random_probabilities(s) for s in range(3)]
    ensemble = StreamingEnsemble()
    for member in members:
        ensemble.add(member)
    expected = members[0].array.copy()  # nnUNetv2_ensemble: float32 running sum, then /= n
    for member in members[1:]:
        expected += member.array
    expected /= 3
    assert np.array_equal(ensemble.probabilities().array, expected)
    assert np.array_equal(ensemble.argmax_labels(), expected.argmax(0).astype(np.uint8))


def test_weights_and_class_order_alignment():
    a = random_probabilities(1)
    b = random_probabilities(2)
    # b delivered in another channel order (a model whose dataset.json numbers classes differently)
    order = [0, 2, 3, 1]
    b_reordered = Probabilities(b.array[order].copy(), tuple(b.labels[i] for i in order))
    ensemble = StreamingEnsemble()
    ensemble.add(a, 3.0)
    ensemble.add(b_reordered, 1.0)
    expected = (3 * a.array + b.array) / 4
    assert np.allclose(ensemble.probabilities().array, expected, atol=1e-6)
    assert ensemble.labels == (0, 1, 2, 3)


def test_a_member_without_a_class_contributes_zero_to_it():
    with_rc = random_probabilities(3, labels=(0, 1, 2, 3, 4))
    without_rc = random_probabilities(4)
    ensemble = StreamingEnsemble()
    ensemble.add(without_rc)
    ensemble.add(with_rc)
    mean = ensemble.probabilities()
    assert mean.labels == (0, 1, 2, 3, 4)
    assert np.allclose(mean.channel(4), with_rc.channel(4) / 2)
    with pytest.raises(ValueError, match="positive"):
        ensemble.add(with_rc, 0.0)


def test_argmax_maps_channels_to_canonical_labels_with_ties_to_the_first():
    array = np.zeros((3, 1, 1, 2), np.float32)
    array[:, 0, 0, 0] = [0.2, 0.4, 0.4]  # tie between channels 1 and 2 → channel 1
    array[:, 0, 0, 1] = [0.1, 0.2, 0.7]
    labels = argmax_labels(Probabilities(array, (0, ET, SNFH)))
    assert labels.tolist() == [[[ET, SNFH]]]


def test_region_statistics_volumes_in_ml_and_lesion_counts():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:4, 2:4, 2:4] = ET  # 8 voxels
    labels[10:12, 10:12, 10:13] = NETC  # 12 voxels, a second lesion
    labels[10:12, 10:12, 13:15] = ET  # 8 voxels touching the NETC block: same TC lesion
    labels[15:20, 0:2, 0:2] = SNFH  # 20 voxels, apart
    stats = region_statistics(labels, (0.5, 1.0, 2.0))  # 1 mm³ voxels → mL = voxels / 1000
    assert stats["ET"] == {"voxels": 16, "volume_ml": 0.016, "lesions": 2}
    assert stats["NETC"] == {"voxels": 12, "volume_ml": 0.012, "lesions": 1}
    assert stats["TC"] == {"voxels": 28, "volume_ml": 0.028, "lesions": 2}
    assert stats["WT"] == {"voxels": 48, "volume_ml": 0.048, "lesions": 3}
    assert "RC" not in stats
    anisotropic = region_statistics(labels, (1.0, 1.0, 3.0))
    assert anisotropic["WT"]["volume_ml"] == pytest.approx(0.144)


def test_cohort_rows_are_flat_and_stable():
    stats = {"b": {"ET": {"voxels": 1, "volume_ml": 0.001, "lesions": 1}},
             "a": {"ET": {"voxels": 2, "volume_ml": 0.002, "lesions": 1}}}
    rows = cohort_rows(stats)
    assert [r["case_id"] for r in rows] == ["a", "b"]
    assert cohort_columns(rows) == ["case_id", "ET_voxels", "ET_volume_ml", "ET_lesions"]
