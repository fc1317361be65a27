"""Section flags from measured evidence: a missing piece of tissue."""

import numpy as np

from medhpc.tnr import rigid
from medhpc.tnr.flags import (DOUBTFUL_WEIGHT, PIECE_BLOCK, flag_sections, missing_pieces,
                              uncovered_tissue)
from medhpc.tnr.matching import ACCEPTED, Matches
from medhpc.tnr.run import PairResult

SHAPE = (160, 160)
COUNT = 9
PIECE_SECTION = 4


def tissue_masks():
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    masks = []
    for i in range(COUNT):
        radius = 60 + 0.5 * i                                  # the outline grows slowly
        mask = (yy - 80) ** 2 + (xx - 80) ** 2 < radius ** 2
        if i == PIECE_SECTION:
            mask &= (yy - 80) ** 2 + (xx - 136) ** 2 > 12 ** 2   # a piece fell off its edge
        masks.append(mask)
    return masks


def pairs_of(masks, shift=(3.0, -2.0)):
    """Consecutive pairs; each section lies ``shift`` further than the previous one."""
    move = rigid.rotation_about(0.0, (0, 0), np.asarray(shift))
    placed = [rigid.resample(m.astype(np.float32), np.linalg.matrix_power(np.linalg.inv(move), i))
              > 0.5 for i, m in enumerate(masks)]
    matches = Matches(np.zeros((4, 2)), np.zeros((4, 2)), np.ones(4), np.full(4, ACCEPTED,
                                                                             np.int8))
    pairs = {}
    for a in range(COUNT - 1):
        b = a + 1
        statistics = {i: {"tissue_fraction": float(placed[i].mean()), "texture": 1.0,
                          "mean_colour": [0.5, 0.3, 0.6]} for i in (a, b)}
        pairs[a, b] = PairResult(a, b, move, matches, statistics, {},
                                 {a: uncovered_tissue(placed[a], placed[b], move),
                                  b: uncovered_tissue(placed[b], placed[a],
                                                      np.linalg.inv(move))})
    return pairs, placed


def test_a_missing_piece_is_flagged_and_only_its_trajectories_count_less():
    pairs, placed = pairs_of(tissue_masks())
    fractions, pieces = missing_pieces(COUNT, pairs, np.zeros(COUNT, bool))
    assert fractions[PIECE_SECTION] > 0.015
    assert np.all(np.delete(fractions, PIECE_SECTION) < 0.005)   # outlines differ, no piece
    statistics = {}
    for result in pairs.values():
        statistics.update(result.sections)
    flags = flag_sections(COUNT, statistics, pairs, 0.1)
    assert list(flags.reasons) == [PIECE_SECTION]
    assert "missing tissue" in flags.reasons[PIECE_SECTION][0]
    assert PIECE_SECTION not in flags.leaves and flags.weights(COUNT)[PIECE_SECTION] == 1.0
    # trajectories: one through the piece (section 4's own pixels), one through solid tissue
    shift = np.array([3.0, -2.0])
    start = np.array([[80.0, 132.0], [80.0, 60.0]])      # in the unshifted masks
    positions = start[:, None, :] + np.arange(COUNT)[None, :, None] * shift
    valid = np.ones((2, COUNT), bool)
    weights = flags.point_weights(positions, valid)
    assert weights[0, PIECE_SECTION] == DOUBTFUL_WEIGHT and weights[1, PIECE_SECTION] == 1.0
    assert np.all(np.delete(weights, PIECE_SECTION, axis=1) == 1.0)
    assert pieces[PIECE_SECTION].shape == (SHAPE[0] // PIECE_BLOCK, SHAPE[1] // PIECE_BLOCK)
