"""The method's pieces: matching and rejection, rigid pre-alignment, trajectories, warps."""

import numpy as np
from scipy import ndimage

from medhpc.tnr import kernels_cpu, rigid, trajectories
from medhpc.tnr.matching import (ACCEPTED, AMBIGUOUS, INCONSISTENT, LOW_NCC, Matches,
                                 MatchSettings, analyse_peaks, grid_points, match_sections,
                                 reject_inconsistent, textured_patches)
from medhpc.tnr.warpfield import fitted_warp, rigid_warp


def texture(shape, seed=0, sigma=2.0):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (image / image.std()).astype(np.float32)


def test_matching_recovers_a_subpixel_shift():
    fixed = texture((96, 96))
    shift = (2.3, -1.6)  # moving(p + shift) = fixed(p)
    moving = ndimage.shift(fixed, shift, order=3, mode="reflect").astype(np.float32)
    settings = MatchSettings(patch=24, search=6, grid=16)
    matches = match_sections(fixed, np.ones_like(fixed, bool), moving, settings,
                             kernels_cpu.zncc_scores)
    assert np.count_nonzero(matches.accepted) >= 0.8 * len(matches.status) > 0
    error = matches.offsets[matches.accepted] - np.array(shift)
    assert np.abs(error).max() < 0.25


def test_flat_patches_are_dropped_and_weak_peaks_rejected():
    image = texture((64, 64))
    image[:, :32] = 0.0
    points = grid_points(image.shape, 16)
    keep = textured_patches(image, np.ones_like(image, bool), points, 12, 0.05)
    assert not keep[points[:, 1] < 20].any() and keep[points[:, 1] > 44].all()
    settings = MatchSettings(min_ncc=0.6)
    scores = np.full((2, 9, 9), 0.1, np.float32)
    scores[0, 4, 4] = 0.5                               # below min_ncc
    scores[1, 4, 4], scores[1, 4, 5], scores[1, 4, 3] = 0.9, 0.6, 0.6
    scores[1, 4, 3], scores[1, 3, 4], scores[1, 5, 4] = 0.6, 0.6, 0.6
    scores[1, 0, 8] = 0.88                              # a second peak almost as high
    _, _, status = analyse_peaks(scores, settings)
    assert list(status) == [LOW_NCC, AMBIGUOUS]


def test_inconsistent_match_among_agreeing_neighbours_is_rejected():
    points = grid_points((80, 80), 16)
    offsets = np.tile([1.0, -0.5], (len(points), 1))
    offsets[12] = [6.0, 4.0]
    status = reject_inconsistent(points, offsets, np.full(len(points), ACCEPTED, np.int8), 16, 2.0)
    assert status[12] == INCONSISTENT and np.count_nonzero(status == INCONSISTENT) == 1


def test_rigid_estimate_recovers_rotation_and_shift():
    fixed = np.zeros((128, 128), np.float32)
    fixed[20:108, 24:100] = texture((88, 76), seed=2, sigma=3.0) + 2
    truth = rigid.rotation_about(np.deg2rad(3.0), (63.5, 63.5), (4.0, -6.0))
    moving = rigid.resample(fixed, np.linalg.inv(truth), order=3)  # fixed(p) = moving(T p)
    estimate = rigid.estimate_rigid(fixed, moving, max_angle_deg=6)
    corners = np.array([[30.0, 30.0], [30.0, 95.0], [95.0, 60.0]])
    assert np.abs(rigid.apply(estimate, corners) - rigid.apply(truth, corners)).max() < 1.0


def test_chain_from_centre_composes_pairwise_transforms():
    steps = {(i, i + 1): rigid.rotation_about(0.01 * (i + 1), (5, 5), (i, 1.0)) for i in range(4)}
    chained = rigid.chain_from_centre(steps, [0, 1, 2, 3, 4], 2)
    np.testing.assert_allclose(chained[2], np.eye(3))
    np.testing.assert_allclose(chained[4], steps[(3, 4)] @ steps[(2, 3)])
    np.testing.assert_allclose(chained[0] @ np.eye(3), np.linalg.inv(steps[(1, 2)] @ steps[(0, 1)]))


def test_smoothing_keeps_lines_and_pairwise_is_straight():
    z = np.arange(9, dtype=float)
    line = np.stack([10 + 0.5 * z, 20 - 0.25 * z], axis=1)[None]     # drifting anatomy
    jitter = np.random.default_rng(0).normal(0, 1.0, line.shape)
    valid = np.ones((1, 9), bool)
    smoothed = trajectories.smooth_along_z(line, valid, 2.0)
    np.testing.assert_allclose(smoothed[0], line[0], atol=1e-9)  # ends included
    noisy = trajectories.smooth_along_z(line + jitter, valid, 2.0)
    assert np.abs(noisy - line).mean() < 0.6 * np.abs(jitter).mean()
    straight = trajectories.straight(line, valid, 4)
    np.testing.assert_allclose(straight[0], np.repeat(line[:, 4], 9, axis=0))
    partial = valid.copy()
    partial[0, 7:] = False                                          # left the image
    ended = trajectories.smooth_along_z(line, partial, 2.0)
    assert np.isnan(ended[0, 7:]).all()
    np.testing.assert_allclose(ended[0, :7], line[0, :7], atol=1e-9)


def test_chained_trajectories_follow_constant_fields_both_ways():
    shape = (64, 64)
    step = np.array([1.5, -0.5])
    matches = Matches(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int8))
    move = rigid.rotation_about(0.0, (0, 0), step)
    fields = {(i, i + 1): trajectories.pair_field(i, i + 1, shape, 16, matches, move)
              for i in range(4)}
    seeds = np.array([[30.0, 30.0], [20.0, 40.0]])
    positions, valid = trajectories.chain_trajectories(fields, [0, 1, 2, 3, 4], 5, 2, seeds,
                                                       shape)
    for section in range(5):
        np.testing.assert_allclose(positions[:, section], seeds + (section - 2) * step, atol=1e-6)
    assert valid.all()


def test_fitted_warp_reproduces_a_rigid_map_and_falls_back():
    matrix = rigid.rotation_about(0.05, (31.5, 31.5), (2.0, -1.0))
    rng = np.random.default_rng(0)
    output = rng.uniform(0, 63, (40, 2))
    warp = fitted_warp(output, rigid.apply(matrix, output), (64, 64), 4, 0.0, np.eye(3))
    reference = rigid_warp(matrix, (64, 64), 4)
    np.testing.assert_allclose(warp.dense(), reference.dense(), atol=1e-3)
    fallback = fitted_warp(output[:2], output[:2], (64, 64), 4, 0.0, matrix)
    np.testing.assert_allclose(fallback.dense(), reference.dense(), atol=1e-6)


def test_smoothing_widens_at_the_ends_only_where_that_predicts_better():
    rng = np.random.default_rng(1)
    count, n = 24, 300
    z = np.arange(count, dtype=float)
    start = rng.uniform(0, 100, (n, 1, 2))
    slope = rng.normal(0, 0.5, (n, 1, 2))
    anatomy = start + slope * z[None, :, None]                        # straight trajectories
    own = rng.normal(0, 2.0, (1, count, 2))                           # each section's distortion
    valid = np.ones((n, count), bool)
    observed = anatomy + own + rng.normal(0, 0.5, anatomy.shape)
    smoothed = trajectories.smooth_along_z(observed, valid, 2.0)
    fixed = np.stack([trajectories.local_linear(run, 2.0) for run in observed])
    ends = [0, 1, count - 2, count - 1]
    error = np.abs(smoothed - anatomy)[:, ends].mean()
    assert error < 0.9 * np.abs(fixed - anatomy)[:, ends].mean()
    # a strongly bending anatomy without noise: the choice follows the actual error
    bent = start + 0.2 * (z[None, :, None] - 12) ** 2 * np.sign(slope)
    chosen = np.abs(trajectories.smooth_along_z(bent, valid, 2.0) - bent).mean(axis=(0, 2))
    narrow = np.abs(np.stack([trajectories.local_linear(run, 2.0) for run in bent])
                    - bent).mean(axis=(0, 2))
    assert np.all(chosen <= narrow + 1e-9)
