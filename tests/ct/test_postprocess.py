"""Largest-component postprocessing and the validation rule that chooses it."""

import numpy as np

from medhpc.ct.postprocess import helpful_classes, largest_component


def test_only_the_largest_component_of_the_listed_classes_is_kept():
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:4, 1:4, 1:4] = 1          # the organ
    labels[5, 7, 7] = 1                # a stray voxel of class 1
    labels[4, 4, 4] = 1                # a corner neighbour of (3, 3, 3): part of the organ
    labels[1:3, 5:7, 5:7] = 2          # class 2 in two pieces
    labels[5, 0, 0] = 2
    kept = largest_component(labels, [1])
    assert kept[5, 7, 7] == 0 and kept[2, 2, 2] == 1
    assert kept[4, 4, 4] == 1          # diagonal neighbour of (3, 3, 3): the same component
    assert kept[5, 0, 0] == 2          # class 2 not listed: untouched
    both = largest_component(labels, [1, 2])
    assert both[5, 0, 0] == 0 and np.count_nonzero(both == 2) == 8


def test_the_classes_whose_validation_dice_rises_are_chosen():
    names = ["liver", "spleen", "kidneys"]
    plain = np.array([0.90, 0.80, np.nan])
    kept = np.array([0.92, 0.80, 0.5])
    assert helpful_classes(plain, kept, names) == ["liver"]


def test_ct_train_stores_the_classes_its_last_validation_chose():
    import pytest

    pytest.importorskip("torch")
    from medhpc.ct.tasks import largest_component_classes

    history = [{"dice": {"liver": 0.5, "spleen": None},
                "dice_largest_component": {"liver": 0.4, "spleen": None}},
               {"dice": {"liver": 0.9, "spleen": 0.7},
                "dice_largest_component": {"liver": 0.93, "spleen": 0.7}}]
    assert largest_component_classes(history) == ["liver"]
    assert largest_component_classes([{"dice": {"liver": 0.9}}]) == []  # an older log
    assert largest_component_classes([]) == []
