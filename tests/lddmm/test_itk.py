"""ITK twins of transform.h5: SimpleITK (and ANTs, when installed) warp like lddmm-apply.

A known smooth displacement and a rotation-scaling-shift world affine on a flipped, oblique,
anisotropic fixed grid, a moving image on a grid of its own: SimpleITK's Resample through
forward_warp.nii.gz and affine.txt must give medhpc's apply_transform, both ways, and
TransformPoint must give lddmm-apply --points.
"""

import csv
import struct

import nibabel as nib
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import write_image
from medhpc.lddmm import itk
from medhpc.lddmm.transform import (apply_transform, map_points, map_world_points,
                                    read_transform, resample, write_transform)
from medhpc.phantoms.lddmm import invert_displacement
from tests.helpers import run_medhpc

ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis, degrees):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def grid(shape_zyx, spacing_xyz, linear, centre_mm):
    """A grid of ``shape`` whose centre voxel sits at ``centre_mm``."""
    matrix = linear @ np.diag(spacing_xyz)
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = np.asarray(centre_mm) - matrix @ ((np.array(shape_zyx[::-1]) - 1) / 2)
    return ImageGeometry(shape_zyx, affine)


# A LAS fixed grid (x flipped), oblique, anisotropic; a RAS moving grid of another shape.
FIXED = grid((18, 22, 20), (1.2, 0.9, 1.5),
             rotation((0.2, 0.3, 1.0), 15) @ np.diag([-1.0, 1.0, 1.0]), (4.0, -3.0, 6.0))
MOVING = grid((22, 24, 26), (1.1, 1.0, 1.25), rotation((1.0, -0.4, 0.3), -10), (6.0, -1.0, 8.0))
# rotation of 7 degrees, scaling 1.05, shift (mm): world RAS, fixed -> moving
AFFINE = np.eye(4)
AFFINE[:3, :3] = 1.05 * rotation((0.3, -0.5, 0.8), 7.0)
AFFINE[:3, 3] = (2.0, 1.5, 1.0)


def smooth_displacement(shape):
    """A smooth displacement (3, nz, ny, nx) in voxels, up to about 1.5 voxels."""
    z, y, x = np.indices(shape, dtype=np.float64) / np.array(shape, np.float64)[:, None, None,
                                                                                 None]
    return np.stack([1.2 * np.sin(2 * np.pi * x + 0.3) * np.cos(np.pi * y),
                     0.9 * np.cos(2 * np.pi * z) * np.sin(np.pi * x + 0.5),
                     1.5 * np.sin(np.pi * y + 2 * np.pi * z)]).astype(np.float32)


def smooth_image(geometry):
    """A smooth function of world position sampled on ``geometry`` (z, y, x)."""
    index = np.indices(geometry.shape, dtype=np.float64)[::-1].reshape(3, -1).T
    x, y, z = geometry.voxel_to_world(index).T
    values = np.sin(0.21 * x + 0.4) * np.cos(0.17 * y) + 0.6 * np.sin(0.23 * z - 0.2 * x)
    return values.reshape(geometry.shape).astype(np.float32)


@pytest.fixture(scope="module")
def sitk():
    """SimpleITK, a peer that is not a dependency (the test extra installs it)."""
    return pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("itk")
    forward = smooth_displacement(FIXED.shape)
    inverse = invert_displacement(forward)
    write_transform(folder / "transform.h5", forward, inverse, FIXED, MOVING, {},
                    affine_world=AFFINE)
    transform = read_transform(folder / "transform.h5")
    itk.write_itk_outputs(folder, transform)
    write_image(folder / "moving.nii.gz", smooth_image(MOVING), MOVING)
    write_image(folder / "fixed.nii.gz", smooth_image(FIXED), FIXED)
    return folder, transform


def interior(points_zyx, shape, margin):
    inside = np.ones(points_zyx.shape[1:], bool)
    for axis, n in enumerate(shape):
        inside &= (points_zyx[axis] >= margin) & (points_zyx[axis] <= n - 1 - margin)
    return inside


def itk_affine(sitk, folder):
    return sitk.ReadTransform(str(folder / "affine.txt"))


def itk_field(sitk, path):
    field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)


def test_composite_transform_applies_the_last_added_transform_first(sitk):
    shift = sitk.TranslationTransform(3, (10.0, 0.0, 0.0))
    scale = sitk.ScaleTransform(3, (2.0, 2.0, 2.0))
    composite = sitk.CompositeTransform([scale, shift])  # shift added last
    np.testing.assert_allclose(composite.TransformPoint((1.0, 0.0, 0.0)), (22.0, 0.0, 0.0))


def test_transform_h5_keeps_the_affine_and_old_files_read_as_identity(written, tmp_path):
    folder, transform = written
    np.testing.assert_array_equal(transform["affine_world"], AFFINE)
    import h5py

    old = tmp_path / "old.h5"
    with h5py.File(folder / "transform.h5", "r") as source, h5py.File(old, "w") as target:
        for key in source:
            if key != "affine_world_ras":
                source.copy(key, target)
        target.attrs.update(source.attrs)
    np.testing.assert_array_equal(read_transform(old)["affine_world"], np.eye(4))


def test_identity_affine_takes_the_old_arithmetic_and_resample_composes_the_affine(written):
    _, transform = written
    image = smooth_image(MOVING)
    old = {key: transform[key] for key in ("forward", "inverse", "fixed", "moving")}
    for inverse in (False, True):
        without, _ = apply_transform(old, image, MOVING, inverse=inverse)
        identity, _ = apply_transform(dict(old, affine_world=np.eye(4)), image, MOVING,
                                      inverse=inverse)
        np.testing.assert_array_equal(identity, without)
    still = dict(transform, forward=np.zeros_like(transform["forward"]))
    np.testing.assert_array_equal(apply_transform(still, image, MOVING)[0],
                                  resample(image, MOVING, FIXED, world=AFFINE))


def test_displacement_field_file_is_an_itk_vector_image_on_the_fixed_grid(written):
    folder, transform = written
    image = nib.load(str(folder / "forward_warp.nii.gz"))
    assert image.shape == FIXED.shape[::-1] + (1, 3)
    assert int(image.header["intent_code"]) == itk.NIFTI_INTENT_VECTOR
    np.testing.assert_allclose(image.affine, FIXED.affine, atol=1e-5)
    # the vector at one voxel: LPS(A_F (y + u)) - LPS(A_F y)
    z, y, x = 5, 7, 9
    u_xyz = transform["forward"][::-1, z, y, x].astype(np.float64)
    expected = LPS @ FIXED.affine[:3, :3] @ u_xyz
    np.testing.assert_allclose(np.asarray(image.dataobj)[x, y, z, 0], expected, rtol=0,
                               atol=0.5 / itk.VECTOR_QUANTUM_PER_MM)  # rounded to 1/1024 mm


def test_simpleitk_resample_matches_apply_transform_forward(sitk, written):
    folder, transform = written
    moving = sitk.ReadImage(str(folder / "moving.nii.gz"), sitk.sitkFloat32)
    reference = sitk.ReadImage(str(folder / "fixed.nii.gz"), sitk.sitkFloat32)
    # p -> Affine(p + d(p)): the displacement first, so it is added last
    composite = sitk.CompositeTransform([itk_affine(sitk, folder),
                                         itk_field(sitk, folder / "forward_warp.nii.gz")])
    by_itk = sitk.GetArrayFromImage(sitk.Resample(moving, reference, composite,
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    image = smooth_image(MOVING)
    by_medhpc, grid = apply_transform(transform, image, MOVING)
    assert grid == FIXED and by_itk.shape == by_medhpc.shape == FIXED.shape
    points = np.indices(FIXED.shape, dtype=np.float32) + transform["forward"]
    in_moving = map_points(points, FIXED, MOVING, AFFINE)
    keep = interior(in_moving, MOVING.shape, 1.5) & interior(
        np.indices(FIXED.shape), FIXED.shape, 1)
    assert keep.mean() > 0.3
    scale = float(image.max() - image.min())
    assert np.max(np.abs(by_itk - by_medhpc)[keep]) < 1e-3 * scale
    # the affine matters: without it the images differ
    plain, _ = apply_transform(dict(transform, affine_world=None), image, MOVING)
    assert np.max(np.abs(plain - by_medhpc)[keep]) > 0.1 * scale


def test_simpleitk_resample_matches_apply_transform_inverse(sitk, written):
    folder, transform = written
    fixed_space = sitk.ReadImage(str(folder / "fixed.nii.gz"), sitk.sitkFloat32)
    reference = sitk.ReadImage(str(folder / "moving.nii.gz"), sitk.sitkFloat32)
    # m -> q + e(q), q = Affine^-1(m): the inverse affine first, so it is added last
    composite = sitk.CompositeTransform([itk_field(sitk, folder / "inverse_warp.nii.gz"),
                                         itk_affine(sitk, folder).GetInverse()])
    by_itk = sitk.GetArrayFromImage(sitk.Resample(fixed_space, reference, composite,
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    image = smooth_image(FIXED)
    by_medhpc, grid = apply_transform(transform, image, FIXED, inverse=True)
    assert grid == MOVING and by_itk.shape == by_medhpc.shape == MOVING.shape
    on_fixed = map_points(np.indices(MOVING.shape, dtype=np.float32), MOVING, FIXED,
                          np.linalg.inv(AFFINE))
    keep = interior(on_fixed, FIXED.shape, 2.5)  # w moves at most ~2 voxels
    assert keep.mean() > 0.2
    scale = float(image.max() - image.min())
    assert np.max(np.abs(by_itk - by_medhpc)[keep]) < 1e-3 * scale


def fixed_points(count, seed):
    """World RAS points well inside the fixed grid."""
    rng = np.random.default_rng(seed)
    index = rng.uniform(2, np.array(FIXED.shape[::-1]) - 3, size=(count, 3))
    return FIXED.voxel_to_world(index)


def write_points(path, points, header=True):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        if header:
            writer.writerow(["x", "y", "z", "name"])
        for i, point in enumerate(points):
            writer.writerow([*(repr(float(v)) for v in point), f"p{i}"])


def read_points(path):
    with open(path, newline="") as stream:
        rows = list(csv.reader(stream))
    return rows[0], np.array([[float(v) for v in row[:3]] for row in rows[1:]]), rows[1:]


@pytest.mark.parametrize("inverse", [False, True])
def test_lddmm_apply_points_match_simpleitk_transform_point(sitk, written, tmp_path, inverse):
    folder, transform = written
    affine = itk_affine(sitk, folder)
    if inverse:  # moving-space points: the images of fixed points
        points = map_world_points(transform, fixed_points(25, 1))[0]
        composite = sitk.CompositeTransform([itk_field(sitk, folder / "inverse_warp.nii.gz"),
                                             affine.GetInverse()])
    else:
        points = fixed_points(25, 2)
        composite = sitk.CompositeTransform([affine,
                                             itk_field(sitk, folder / "forward_warp.nii.gz")])
    write_points(tmp_path / "in.csv", points)
    args = ["lddmm-apply", "--transform", folder / "transform.h5", "--points",
            tmp_path / "in.csv", "--points-out", tmp_path / "out.csv"]
    result = run_medhpc(*args, *(["--inverse"] if inverse else []), env=ONE_THREAD,
                        timeout=120)
    assert result.returncode == 0, result.stderr
    header, mapped, rows = read_points(tmp_path / "out.csv")
    assert header == ["x", "y", "z", "name"] and [row[3] for row in rows][:2] == ["p0", "p1"]
    expected = np.array([LPS @ composite.TransformPoint(tuple(LPS @ p)) for p in points])
    assert np.max(np.abs(mapped - expected)) < 0.05
    assert np.max(np.linalg.norm(mapped - points, axis=1)) > 1.0  # it moved them


def test_points_forward_then_inverse_come_back(written):
    _, transform = written
    points = fixed_points(40, 3)
    moved, inside = map_world_points(transform, points)
    back, _ = map_world_points(transform, moved, inverse=True)
    assert inside.all()
    error = np.linalg.norm(back - points, axis=1)  # w inverts u at voxels, not between them
    assert error.max() < 0.1 and error.mean() < 0.03


# -- affine files ---------------------------------------------------------------------------
def test_affine_text_round_trip_is_exact(tmp_path):
    path = itk.write_affine_text(tmp_path / "affine.txt", AFFINE)
    text = path.read_text().splitlines()
    assert text[0] == "#Insight Transform File V1.0"
    assert "Transform: AffineTransform_double_3_3" in text
    assert text[-1].startswith("FixedParameters:")
    np.testing.assert_allclose(itk.read_affine(path), AFFINE, rtol=0, atol=1e-9)


def test_affine_text_maps_points_as_itk_does(sitk, tmp_path):
    path = itk.write_affine_text(tmp_path / "affine.txt", AFFINE)
    transform = sitk.ReadTransform(str(path))
    point_ras = np.array([10.0, -20.0, 30.0])
    expected = AFFINE[:3, :3] @ point_ras + AFFINE[:3, 3]
    np.testing.assert_allclose(LPS @ transform.TransformPoint(tuple(LPS @ point_ras)),
                               expected, atol=1e-9)


def test_affine_written_by_simpleitk_with_a_centre_reads_back(sitk, tmp_path):
    transform = sitk.AffineTransform(3)
    lps = itk.ras_to_lps(AFFINE)
    transform.SetMatrix(tuple(lps[:3, :3].ravel()))
    centre = np.array([5.0, -7.0, 11.0])
    transform.SetCenter(tuple(centre))
    # with a centre c the translation is t = offset - c + A c
    transform.SetTranslation(tuple(lps[:3, 3] - centre + lps[:3, :3] @ centre))
    for name in ("affine.tfm", "affine.mat"):
        sitk.WriteTransform(transform, str(tmp_path / name))
        np.testing.assert_allclose(itk.read_affine(tmp_path / name), AFFINE, atol=1e-9)


def mat_v4(variables, big_endian=False):
    """MATLAB v4 bytes of column vectors of doubles."""
    order = ">" if big_endian else "<"
    data = b""
    for name, values in variables.items():
        values = np.asarray(values, np.float64).ravel()
        encoded = name.encode() + b"\0"
        data += struct.pack(order + "5i", 1000 if big_endian else 0, len(values), 1, 0,
                            len(encoded))
        data += encoded + values.astype(order + "f8").tobytes()
    return data


@pytest.mark.parametrize("big_endian", [False, True])
def test_mat_v4_reads_as_the_same_matrix(tmp_path, big_endian):
    lps = itk.ras_to_lps(AFFINE)
    centre = np.array([1.0, 2.0, -3.0])
    translation = lps[:3, 3] - centre + lps[:3, :3] @ centre
    path = tmp_path / "0GenericAffine.mat"
    path.write_bytes(mat_v4({"AffineTransform_double_3_3":
                             np.concatenate([lps[:3, :3].ravel(), translation]),
                             "fixed": centre}, big_endian))
    np.testing.assert_allclose(itk.read_affine(path), AFFINE, atol=1e-9)


def test_plain_4x4_text_is_world_ras(tmp_path):
    path = tmp_path / "matrix.txt"
    path.write_text("# fixed -> moving, world RAS mm\n" +
                    "\n".join(" ".join(repr(float(v)) for v in row) for row in AFFINE) + "\n")
    np.testing.assert_array_equal(itk.read_affine(path), AFFINE)
    comma = tmp_path / "matrix.csv"
    comma.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in AFFINE))
    np.testing.assert_array_equal(itk.read_affine(comma), AFFINE)


@pytest.mark.parametrize("content", [
    b"1 0 0\n0 1 0\n0 0 1\n", b"1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n",
    b"1 0 0 0\n0 0 0 0\n0 0 1 0\n0 0 0 1\n", b"#Insight Transform File V1.0\n"
    b"Transform: Euler3DTransform_double_3_3\nParameters: 0 0 0 0 0 0\nFixedParameters: 0 0 0\n",
    b"#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 2\n",
    b"\x00\x01\x02\xff", b"", b"a b c d\n"])
def test_bad_affine_text_is_a_one_line_input_error(tmp_path, content):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        itk.read_affine(path)
    assert "bad.txt" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("content", [
    b"1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n",  # FSL-style text .mat
    b"\x07\x00\x00\x00garbage bytes here",
    mat_v4({"AffineTransform_double_3_3": np.zeros(6)}),
    mat_v4({"AffineTransform_double_3_3": np.eye(4)[:3].T.ravel()})[:-8]])
def test_bad_mat_is_a_one_line_input_error(tmp_path, content):
    path = tmp_path / "bad.mat"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        itk.read_affine(path)
    assert "bad.mat" in str(error.value) and "\n" not in str(error.value)


def test_missing_affine_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="missing.txt: file not found"):
        itk.read_affine(tmp_path / "missing.txt")


# -- lddmm-apply with several images and a point list ---------------------------------------
@pytest.fixture(scope="module")
def phantom_transform(phantom_files, tmp_path_factory):
    """The tiny phantom's true maps as a transform.h5: moving = fixed o psi, so the
    forward displacement is that of psi^-1."""
    import h5py

    with h5py.File(phantom_files / "true_transform.h5", "r") as f:
        psi, psi_inverse = f["displacement_vox"][()], f["inverse_displacement_vox"][()]
        geometry = ImageGeometry.from_attrs(f.attrs)
    path = tmp_path_factory.mktemp("truth") / "transform.h5"
    write_transform(path, psi_inverse, psi, geometry, geometry, {})
    return path


def dice(a, b, label):
    a, b = a == label, b == label
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_lddmm_apply_two_images_and_points_in_one_call(phantom_files, phantom_transform,
                                                       tmp_path):
    transform = read_transform(phantom_transform)
    fixed_grid = transform["fixed"]
    index = np.random.default_rng(4).uniform(3, 20, size=(6, 3))
    points = fixed_grid.voxel_to_world(index)
    write_points(tmp_path / "landmarks.csv", points, header=False)
    result = run_medhpc(
        "lddmm-apply", "--transform", phantom_transform,
        "--image", phantom_files / "moving.nii.gz", "--out", tmp_path / "a.nii.gz",
        "--image", phantom_files / "moving_labels.nii.gz", "--out", tmp_path / "b.nii.gz",
        "--interp", "linear", "--interp", "label",
        "--points", tmp_path / "landmarks.csv", "--points-out", tmp_path / "mapped.csv",
        env=ONE_THREAD, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("wrote ") == 3
    load = lambda name: np.asarray(nib.load(str(name)).dataobj).transpose(2, 1, 0)  # noqa
    fixed, moving = load(phantom_files / "fixed.nii.gz"), load(phantom_files / "moving.nii.gz")
    warped = load(tmp_path / "a.nii.gz")
    assert np.abs(warped - fixed).mean() < 0.5 * np.abs(moving - fixed).mean()
    labels, truth = load(tmp_path / "b.nii.gz"), load(phantom_files / "fixed_labels.nii.gz")
    moving_labels = load(phantom_files / "moving_labels.nii.gz")
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert dice(labels, truth, 3) > dice(moving_labels, truth, 3) + 0.02
    with open(tmp_path / "mapped.csv", newline="") as stream:
        rows = list(csv.reader(stream))
    assert len(rows) == 6 and rows[2][3] == "p2"  # no header in, none out
    mapped = np.array([[float(v) for v in row[:3]] for row in rows])
    np.testing.assert_allclose(mapped, map_world_points(transform, points)[0], atol=1e-5)


def test_lddmm_apply_out_dir_names_outputs_after_inputs(written, tmp_path):
    folder, _ = written
    write_points(tmp_path / "landmarks.csv", fixed_points(3, 5))
    result = run_medhpc("lddmm-apply", "--transform", folder / "transform.h5",
                        "--image", folder / "moving.nii.gz", "--points",
                        tmp_path / "landmarks.csv", "--out-dir", tmp_path / "out",
                        env=ONE_THREAD, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "moving.nii.gz").exists()
    assert (tmp_path / "out" / "landmarks.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--image", "a.nii.gz"], "1 --image and 0 --out"),
    (["--image", "a.nii.gz", "--out", "x.nii.gz", "--out", "y.nii.gz"], "1 --image and 2 --out"),
    (["--points", "p.csv"], "1 --points and 0 --points-out"),
    ([], "nothing to map"),
    (["--image", "a.nii.gz", "--out", "x.nii.gz", "--out-dir", "d"], "--out-dir with --out"),
    (["--image", "a.nii.gz", "--out", "x.nii.gz", "--interp", "label", "--interp", "linear"],
     "2 --interp for 1 --image"),
    (["--image", "a.nii.gz", "--out", "x.nii.gz", "--image", "b.nii.gz", "--out",
      "x.nii.gz"], "x.nii.gz: the output of both"),
    (["--points", "bad.csv", "--points-out", "out.csv"], "bad.csv line 2"),
])
def test_lddmm_apply_bad_options_exit_2_and_write_nothing(written, tmp_path, args, message):
    folder, _ = written
    (tmp_path / "bad.csv").write_text("x,y,z\n1,2,three\n")
    (tmp_path / "p.csv").write_text("1,2,3\n")
    result = run_medhpc("lddmm-apply", "--transform", folder / "transform.h5", *args,
                        env=ONE_THREAD, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "out.csv").exists()


def test_ants_applies_forward_warp_then_affine_like_simpleitk(sitk, written, tmp_path):
    """Only where ANTsPy is installed: antsApplyTransforms -t forward_warp -t affine."""
    ants = pytest.importorskip("ants")
    folder, transform = written
    fixed = ants.image_read(str(folder / "fixed.nii.gz"))
    moving = ants.image_read(str(folder / "moving.nii.gz"))
    warped = ants.apply_transforms(fixed, moving, [str(folder / "forward_warp.nii.gz"),
                                                   str(folder / "affine.txt")],
                                   interpolator="linear")
    by_ants = warped.numpy().transpose(2, 1, 0)  # ANTsPy arrays are (x, y, z)
    image = smooth_image(MOVING)
    by_medhpc, _ = apply_transform(transform, image, MOVING)
    points = np.indices(FIXED.shape, dtype=np.float32) + transform["forward"]
    keep = interior(map_points(points, FIXED, MOVING, AFFINE), MOVING.shape, 1.5) & interior(
        np.indices(FIXED.shape), FIXED.shape, 1)
    scale = float(image.max() - image.min())
    assert np.max(np.abs(by_ants - by_medhpc)[keep]) < 1e-3 * scale
    # ANTsPy inverts only affines named .mat (antsApplyTransforms takes [affine.txt,1])
    sitk.WriteTransform(sitk.ReadTransform(str(folder / "affine.txt")), str(tmp_path / "a.mat"))
    back = ants.apply_transforms(moving, fixed, [str(tmp_path / "a.mat"),
                                                 str(folder / "inverse_warp.nii.gz")],
                                 whichtoinvert=[True, False], interpolator="linear")
    by_medhpc, _ = apply_transform(transform, smooth_image(FIXED), FIXED, inverse=True)
    keep = interior(map_points(np.indices(MOVING.shape, dtype=np.float32), MOVING, FIXED,
                               np.linalg.inv(AFFINE)), FIXED.shape, 2.5)
    assert np.max(np.abs(back.numpy().transpose(2, 1, 0) - by_medhpc)[keep]) < 1e-3 * scale
    # antsApplyTransformsToPoints (LPS) takes the same lists: fixed -> moving points
    pandas = pytest.importorskip("pandas")
    points = fixed_points(10, 6)
    table = pandas.DataFrame(points @ LPS, columns=["x", "y", "z"])
    mapped = ants.apply_transforms_to_points(3, table, [str(folder / "forward_warp.nii.gz"),
                                                        str(folder / "affine.txt")])
    moved = map_world_points(transform, points)[0]
    np.testing.assert_allclose(mapped[["x", "y", "z"]].to_numpy() @ LPS, moved, atol=0.05)
