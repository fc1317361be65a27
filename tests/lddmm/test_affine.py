"""The affine start (medhpc.lddmm.affine): known motions recovered at the grid corners, on a
synthetic volume and on real anatomy; MI across an intensity remapping; identity kept;
bad inputs stopped with one line."""

import json

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.lddmm import affine
from medhpc.lddmm.affine import corner_error_mm, register_affine, resample_to_fixed

SPACING = 2.0
CENTRE = np.array([10.0, -20.0, 15.0])


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_geometry(shape, flip_x, axis, degrees, centre) -> ImageGeometry:
    """An oblique grid of ``SPACING`` mm centred on ``centre`` (LAS when ``flip_x``)."""
    linear = rotation(axis, degrees) @ np.diag([-SPACING if flip_x else SPACING, SPACING,
                                                SPACING])
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = np.asarray(centre) - linear @ ((np.array(shape[::-1]) - 1) / 2)
    return ImageGeometry(shape, out)


def motion(axis, degrees, scales, shift) -> np.ndarray:
    """Fixed world to moving world: scale and rotate about CENTRE, then shift."""
    linear = rotation(axis, degrees) @ np.diag(scales)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = CENTRE + np.asarray(shift) - linear @ CENTRE
    return out


class Blobs:
    """A smooth volume: a sum of Gaussian blobs placed in world space."""

    def __init__(self, count=30, radius_mm=28.0, seed=1):
        rng = np.random.default_rng(seed)
        self.centres = CENTRE + rng.uniform(-radius_mm, radius_mm, (count, 3))
        self.widths = rng.uniform(4.0, 9.0, count)
        self.heights = rng.uniform(0.3, 1.0, count)

    def at(self, points_mm: np.ndarray) -> np.ndarray:
        out = np.zeros(len(points_mm))
        for centre, width, height in zip(self.centres, self.widths, self.heights):
            out += height * np.exp(-np.sum((points_mm - centre) ** 2, 1) / (2 * width * width))
        return out

    def image(self, geometry: ImageGeometry, to_blobs=np.eye(4)) -> np.ndarray:
        """The volume on ``geometry``'s grid, seen through ``to_blobs`` (world to world)."""
        z, y, x = np.indices(geometry.shape)
        world = geometry.voxel_to_world(np.stack([x, y, z], -1).reshape(-1, 3).astype(float))
        world = world @ to_blobs[:3, :3].T + to_blobs[:3, 3]
        return self.at(world).reshape(geometry.shape).astype(np.float32)


@pytest.fixture(scope="module")
def scene():
    fixed_geometry = oblique_geometry((48, 48, 48), True, (0.7, -0.4, 0.6), 15.0, CENTRE)
    moving_geometry = oblique_geometry((50, 46, 52), False, (-0.2, 0.8, 0.3), 12.0,
                                       CENTRE + [2.0, 1.0, -3.0])
    blobs = Blobs()
    return blobs, fixed_geometry, moving_geometry, blobs.image(fixed_geometry)


def moved(scene, truth):
    """The moving image of ``truth``: M(q) = F(truth^-1 q)."""
    blobs, _, moving_geometry, _ = scene
    return blobs.image(moving_geometry, np.linalg.inv(truth))


def test_affine_motion_is_recovered_at_the_corners(scene):
    _, fixed_geometry, moving_geometry, fixed = scene
    truth = motion((1.0, 2.0, 0.5), 10.0, (1.08, 0.95, 1.03), (3.0, -4.0, 0.0))
    moving = moved(scene, truth)
    assert corner_error_mm(np.eye(4), truth, fixed_geometry) > 5 * SPACING
    result = register_affine(fixed, fixed_geometry, moving, moving_geometry, mode="affine")
    # measured 0.14 mm
    assert corner_error_mm(result.matrix, truth, fixed_geometry) < 0.5 * SPACING
    assert result.stages == ("rigid", "affine")
    assert set(result.iterations) == {"rigid", "affine"}
    assert all(len(v) == len(result.levels_mm) for v in result.iterations.values())
    assert result.metric_after > 0.999 > result.metric_before
    assert json.loads(json.dumps(result.record()))["stages"] == ["rigid", "affine"]
    # the convention: M_F(y) = M(A_M^-1 T A_F y) lands on the fixed image
    on_fixed = resample_to_fixed(moving, moving_geometry, fixed_geometry, result.matrix)
    assert np.corrcoef(on_fixed.ravel(), fixed.ravel())[0, 1] > 0.999


def test_rigid_motion_is_recovered_in_rigid_mode(scene):
    _, fixed_geometry, moving_geometry, fixed = scene
    truth = motion((0.3, -1.0, 0.8), 10.0, (1.0, 1.0, 1.0), (0.0, 3.0, 4.0))
    result = register_affine(fixed, fixed_geometry, moved(scene, truth), moving_geometry,
                             mode="rigid")
    assert result.stages == ("rigid",)
    linear = result.matrix[:3, :3]
    np.testing.assert_allclose(linear @ linear.T, np.eye(3), atol=1e-9)
    assert corner_error_mm(result.matrix, truth, fixed_geometry) < 0.5 * SPACING  # 0.01 mm


def test_mutual_information_sees_through_an_intensity_remapping(scene):
    _, fixed_geometry, moving_geometry, fixed = scene
    truth = motion((1.0, 2.0, 0.5), 10.0, (1.0, 1.0, 1.0), (3.0, -4.0, 0.0))
    remapped = np.exp(-3.0 * moved(scene, truth)).astype(np.float32)  # inverted, nonlinear
    result = register_affine(fixed, fixed_geometry, remapped, moving_geometry, mode="rigid",
                             metric="mi")
    assert corner_error_mm(result.matrix, truth, fixed_geometry) < 0.5 * SPACING  # 0.03 mm
    assert result.metric_after > result.metric_before


def test_identical_images_stay_at_the_identity(scene):
    _, fixed_geometry, _, fixed = scene
    for metric in ("ncc", "mi", "ssd"):
        result = register_affine(fixed, fixed_geometry, fixed, fixed_geometry, metric=metric)
        # measured: 0 for ncc and ssd (to 1e-13 mm); mi 0.05 mm (its Parzen estimate's bias)
        assert result.start == "identity"
        assert corner_error_mm(result.matrix, np.eye(4), fixed_geometry) < 0.05 * SPACING


def test_result_is_deterministic_and_masks_are_honoured(scene):
    _, fixed_geometry, moving_geometry, fixed = scene
    truth = motion((1.0, 0.0, 1.0), 8.0, (1.0, 1.0, 1.0), (2.0, 2.0, -2.0))
    moving = moved(scene, truth)
    first = register_affine(fixed, fixed_geometry, moving, moving_geometry, mode="rigid",
                            samples=4096)
    again = register_affine(fixed, fixed_geometry, moving, moving_geometry, mode="rigid",
                            samples=4096)
    np.testing.assert_array_equal(first.matrix, again.matrix)
    # a bright slab in the moving image, left out by its mask, does not pull the result
    spoiled = moving.copy()
    spoiled[:, :, :14] = 5.0
    mask = np.ones(moving.shape, np.uint8)
    mask[:, :, :14] = 0
    fixed_mask = np.zeros(fixed.shape, bool)
    fixed_mask[6:-6, 6:-6, 6:-6] = True
    result = register_affine(fixed, fixed_geometry, spoiled, moving_geometry, mode="rigid",
                             fixed_mask=fixed_mask, moving_mask=mask)
    assert corner_error_mm(result.matrix, truth, fixed_geometry) < 0.5 * SPACING  # 0.01 mm
    # (94 mm without the masks)


def test_ncc_and_mi_gradients_match_finite_differences(scene):
    """The analytic gradient of each cost in the 12 parameters, with every sample well
    inside the moving grid (so none enters or leaves under the small steps)."""
    _, fixed_geometry, moving_geometry, fixed = scene
    truth = motion((1.0, 2.0, 0.5), 6.0, (1.03, 0.98, 1.0), (1.0, -1.0, 0.5))
    moving = moved(scene, truth)
    central = np.zeros(fixed.shape, bool)
    central[12:-12, 12:-12, 12:-12] = True
    fixed_image = affine._checked("fixed", fixed, fixed_geometry, central)
    moving_image = affine._checked("moving", moving, moving_geometry, None)
    linear = truth[:3, :3] + 0.01 * np.random.default_rng(0).standard_normal((3, 3))
    translation = truth[:3, 3] + truth[:3, :3] @ CENTRE - CENTRE + [0.4, -0.3, 0.2]
    radius = 30.0
    scale = np.r_[np.full(9, 1 / radius), np.ones(3)]
    for metric in ("ncc", "mi", "ssd"):
        level = affine._Level(fixed_image, moving_image, CENTRE, metric, 10 ** 6, 32, 0)
        at = level.evaluate(linear, translation)
        assert at.count == level.size

        def cost(step):
            step = step * scale
            return level.evaluate(linear + step[:9].reshape(3, 3), translation + step[9:]).cost

        h = 1e-3
        numeric = np.array([(cost(h * e) - cost(-h * e)) / (2 * h) for e in np.eye(12)])
        analytic = at.gradient * scale
        np.testing.assert_allclose(analytic, numeric, atol=0.03 * np.abs(numeric).max())


def test_bad_inputs_stop_with_one_line(scene):
    _, fixed_geometry, moving_geometry, fixed = scene
    constant = np.full(fixed.shape, 3.0, np.float32)
    with pytest.raises(InputError, match="moving image: constant") as info:
        register_affine(fixed, fixed_geometry, constant, fixed_geometry)
    assert "\n" not in str(info.value)
    far = _shifted(moving_geometry, (500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not overlap") as info:
        register_affine(fixed, fixed_geometry, moved(scene, np.eye(4)), far)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="mode"):
        register_affine(fixed, fixed_geometry, fixed, fixed_geometry, mode="similarity")
    with pytest.raises(InputError, match="metric"):
        register_affine(fixed, fixed_geometry, fixed, fixed_geometry, metric="lncc")
    with pytest.raises(InputError, match="NaN"):
        register_affine(np.where(fixed > 0.5, np.nan, fixed), fixed_geometry, fixed,
                        fixed_geometry)
    with pytest.raises(InputError, match="fixed mask: no voxel"):
        register_affine(fixed, fixed_geometry, fixed, fixed_geometry,
                        fixed_mask=np.zeros(fixed.shape, bool))


def _shifted(geometry: ImageGeometry, shift_mm) -> ImageGeometry:
    out = np.array(geometry.affine)
    out[:3, 3] += shift_mm
    return ImageGeometry(geometry.shape, out)


def test_mni152_with_a_rotated_header_and_a_bias_field():
    """Real anatomy: nilearn's 2 mm MNI152 averaged to 4 mm; the moving header rotated by 10
    degrees about the image centre (data unchanged) and a +/-20 % bias field."""
    pytest.importorskip("nilearn")
    from bench.lddmm.affine import mni_template, rotated_header_pair

    template, geometry = mni_template(2, fsl_grid=False)
    nz, ny, nx = (n // 2 for n in template.shape)
    coarse = np.empty((nz, ny, nx), np.float32)
    affine.kernels.block_mean(template, 2, 2, 2, coarse)
    blocks = np.diag([2.0, 2.0, 2.0, 1.0])
    blocks[:3, 3] = 0.5
    geometry = ImageGeometry(coarse.shape, geometry.affine @ blocks)
    moving, moving_geometry, truth = rotated_header_pair(coarse, geometry)
    spacing = min(geometry.spacing_mm)
    assert corner_error_mm(np.eye(4), truth, geometry) > 5 * spacing
    for mode in ("affine", "rigid"):
        result = register_affine(coarse, geometry, moving, moving_geometry, mode=mode)
        # measured: 0.52 mm affine, 0.35 mm rigid (start: 30.5 mm)
        assert corner_error_mm(result.matrix, truth, geometry) < 0.5 * spacing, mode
        assert result.levels_mm == ((8.0,) * 3, (4.0,) * 3)  # none finer than the image
