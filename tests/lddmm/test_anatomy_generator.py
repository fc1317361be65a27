"""The real-anatomy LDDMM pairs of bench/lddmm/anatomy.py: deterministic, diffeomorphic, of
the documented size, and with a true map that the moving image and labels agree with; and
bench/lddmm/realbrain.py's reader of medhpc's transform.h5."""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("scipy")

from bench.lddmm import anatomy  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None,
                                reason="needs nilearn (the MNI152 template)")


def _union_dice(a, b):
    """Dice of grey and white matter together (thin cortex alone loses to resampling)."""
    a, b = a >= 2, b >= 2
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def composed_small():
    return anatomy.make_pair(family="composed", seed=0, downsample=4)


def test_a_seed_gives_the_same_pair(composed_small):
    again = anatomy.make_pair(family="composed", seed=0, downsample=4)
    for key in ("moving", "moving_labels", "true_map"):
        np.testing.assert_array_equal(composed_small[key], again[key])
    other = anatomy.make_pair(family="composed", seed=1, downsample=4)
    assert not np.allclose(other["true_map"], composed_small["true_map"])


def test_composed_displacement_is_the_documented_size(composed_small):
    stats = composed_small["info"]["displacement_mm"]
    # measured at downsample 4: mean 3.90, max 8.75 (2 mm: 3.90, 8.89)
    assert 3.6 < stats["mean_grey_white"] < 4.2
    assert 6.0 < stats["max_grey_white"] < 12.0
    assert composed_small["fixed"].shape == (24, 29, 23)


@pytest.mark.parametrize("family", anatomy.FAMILIES)
def test_every_family_is_a_diffeomorphism(family):
    pair = anatomy.make_pair(family=family, seed=0, downsample=4)
    assert pair["info"]["det_jacobian"]["min"] > 0
    assert anatomy.folded_share(pair["true_map"], pair["fixed_affine"]) == 0.0
    identity = anatomy.identity_map(pair["fixed_affine"], pair["fixed"].shape)
    error = anatomy.displacement_error(pair["true_map"], identity,
                                       anatomy.brain_mask(pair["fixed_labels"]))
    assert error["mean_mm"] == pytest.approx(
        pair["info"]["displacement_mm"]["mean_grey_white"], rel=1e-4)


@pytest.mark.parametrize("rotate", [0.0, 10.0])
def test_the_true_map_brings_the_moving_anatomy_back(rotate):
    """Moving labels and (bias- and noise-free) intensities, pulled back through the true map,
    match the fixed ones far better than through no registration; a rotated header changes
    nothing but the map. Measured at downsample 2: union Dice 0.974 (identity 0.944, rotated
    0.895), intensity correlation 0.989 (identity 0.735, rotated 0.540)."""
    pair = anatomy.make_pair(family="composed", seed=0, downsample=2, bias=0.0, noise=0.0,
                             rotate_header_deg=rotate)
    fixed_labels = pair["fixed_labels"]
    identity = anatomy.identity_map(pair["fixed_affine"], fixed_labels.shape)
    inside = fixed_labels > 0
    scores = {}
    for name, world_map in (("true", pair["true_map"]), ("identity", identity)):
        labels = anatomy.warp_labels(pair["moving_labels"], pair["moving_affine"], world_map,
                                     "label")
        intensity = anatomy.sample(pair["moving"],
                                   anatomy.world_to_voxel(pair["moving_affine"], world_map), 3)
        scores[name] = (_union_dice(labels, fixed_labels), anatomy.dice(labels, fixed_labels),
                        np.corrcoef(intensity[inside], pair["fixed"][inside])[0, 1])
    union, tissues, correlation = scores["true"]
    assert union > 0.95
    assert min(tissues.values()) > 0.85
    assert correlation > 0.98
    assert min(tissues[k] - scores["identity"][1][k] for k in tissues) > 0.05
    assert correlation - scores["identity"][2] > 0.15


@pytest.mark.parametrize("with_world_affine", [False, True])
def test_medhpc_transform_reads_as_a_world_map(tmp_path, with_world_affine):
    h5py = pytest.importorskip("h5py")
    from bench.lddmm.realbrain import read_medhpc_map

    fixed_affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    shape_xyz = (5, 4, 3)
    forward = np.zeros((3,) + shape_xyz[::-1], np.float32)  # (z, y, x) components, zyx grid
    forward[0] = 0.5   # u_z
    forward[2] = -1.0  # u_x
    world_affine = np.eye(4)
    world_affine[:3, 3] = (10.0, 0.0, 0.0)
    path = tmp_path / "transform.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("forward_displacement_vox", data=forward)
        if with_world_affine:
            f.create_dataset("affine_world_ras", data=world_affine)
    world = read_medhpc_map(path, fixed_affine)
    assert world.shape == (3,) + shape_xyz
    expected = anatomy.voxel_world(fixed_affine, shape_xyz)
    expected[0] += 2.0   # x - 1 voxel of -2 mm
    expected[2] += 1.0   # z + 0.5 voxel of 2 mm
    if with_world_affine:
        expected[0] += 10.0
    np.testing.assert_allclose(world, expected, atol=1e-5)
