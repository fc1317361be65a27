"""Joseph projector on the CPU: adjointness, exact chords, analytic line integrals, TOF."""

import numba
import numpy as np
import pytest

from medhpc.pet.projector import JosephProjector, LorTofKernels, TofSpec

SHAPE = (5, 6, 7)  # (nz, ny, nx)
VOXEL_MM = np.array([2.0, 1.5, 2.5], dtype=np.float32)  # (x, y, z)
ORIGIN_MM = np.array([-6.0, -3.5, 1.0], dtype=np.float32)


def box_mm(shape=SHAPE, origin_mm=ORIGIN_MM, voxel_mm=VOXEL_MM):
    """(low, high) corners (x, y, z) of the image box in mm."""
    size = np.array(shape[::-1], dtype=np.float64)
    low = np.asarray(origin_mm, np.float64) - 0.5 * np.asarray(voxel_mm, np.float64)
    return low, low + size * voxel_mm


def exact_chord_mm(xstart, xend, low, high):
    """Length of each segment xstart -> xend inside the box [low, high] (float64 slab method)."""
    xstart, xend = np.asarray(xstart, np.float64), np.asarray(xend, np.float64)
    step = xend - xstart
    t_min, t_max = np.zeros(len(step)), np.ones(len(step))
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            t1 = (low[axis] - xstart[:, axis]) / step[:, axis]
            t2 = (high[axis] - xstart[:, axis]) / step[:, axis]
            flat = step[:, axis] == 0
            inside = (xstart[:, axis] >= low[axis]) & (xstart[:, axis] <= high[axis])
            t1 = np.where(flat, np.where(inside, -np.inf, np.inf), t1)
            t2 = np.where(flat, np.inf, t2)
            t_min = np.maximum(t_min, np.minimum(t1, t2))
            t_max = np.minimum(t_max, np.maximum(t1, t2))
    return np.maximum(t_max - t_min, 0.0) * np.linalg.norm(step, axis=1)


def lors_through(points_mm, rng, reach_mm=60.0):
    """LORs through ``points_mm`` in random directions, ending ``reach_mm`` away on each side."""
    direction = rng.normal(size=points_mm.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return ((points_mm - reach_mm * direction).astype(np.float32),
            (points_mm + reach_mm * direction).astype(np.float32))


def mixed_lors(rng, n_random=120):
    """Axis-parallel, diagonal, oblique, missing and grazing LORs for SHAPE."""
    low, high = box_mm()
    centre = 0.5 * (low + high)
    far = 40.0
    starts, ends = [], []

    def add(start, end):
        starts.append(np.asarray(start, np.float64))
        ends.append(np.asarray(end, np.float64))

    for axis in range(3):  # parallel to each axis, through and between voxel centres
        for offset in ([0.0, 0.0, 0.0], [0.3, -0.7, 0.45], [1.0, 0.75, 1.25]):
            point = centre + np.asarray(offset)
            a, b = point.copy(), point.copy()
            a[axis], b[axis] = low[axis] - far, high[axis] + far
            add(a, b)
            add(b, a)
    for direction in ([1, 1, 0], [1, -1, 1], [0, 1, 1], [1, 0, -1]):  # principal-axis ties
        d = np.asarray(direction, np.float64)
        add(centre - far * d, centre + far * d)
    edge = high.copy()
    for shift in (-1e-3, 0.0, 1e-3):  # along the top y-z edge: just inside, on it, outside
        a, b = edge + shift, edge + shift
        a[0], b[0] = low[0] - far, high[0] + far
        add(a, b)
    corner = high + np.array([0.4, 0.4, -0.4])  # cuts off a corner of the box
    add(corner + np.array([-far, far, 0.0]), corner + np.array([far, -far, 0.0]))
    add(centre + [0.0, 30.0, 0.0], centre + [30.0, 30.0, 5.0])  # misses: passes above the box
    add(centre, centre)  # degenerate
    add(centre + 1.0, centre + [1.0, 1.0, 3.0])  # ends inside the box
    points = low + rng.random((n_random, 3)) * (high - low) * 1.4 - 0.2 * (high - low)
    xstart, xend = lors_through(points, rng)
    return (np.vstack([np.asarray(starts, np.float32), xstart]),
            np.vstack([np.asarray(ends, np.float32), xend]))


TOF = TofSpec(bins=11, bin_mm=4.0, sigma_mm=3.0, cutoff_sigmas=3.0)


@pytest.mark.parametrize("tof", [None, TOF], ids=["nontof", "tof"])
def test_adjointness(tof):
    rng = np.random.default_rng(1)
    xstart, xend = mixed_lors(rng)
    projector = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=tof)
    assert projector.shape_out == ((projector.n_lors,) if tof is None else
                                   (projector.n_lors, TOF.bins))
    for _ in range(2):
        error = projector.adjointness_error(rng)
        assert error < 1e-5, error


def test_adjointness_in_chunks_matches_whole():
    rng = np.random.default_rng(2)
    xstart, xend = mixed_lors(rng)
    whole = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM)
    chunked = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, chunk_lors=17)
    image = rng.random(SHAPE, dtype=np.float32)
    values = rng.random(whole.n_lors, dtype=np.float32)
    np.testing.assert_allclose(chunked.forward(image), whole.forward(image), rtol=1e-6)
    np.testing.assert_allclose(chunked.back(values), whole.back(values), rtol=1e-5, atol=1e-6)


def test_uniform_box_gives_exact_chords():
    rng = np.random.default_rng(3)
    xstart, xend = mixed_lors(rng, n_random=400)
    projector = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM)
    value = 2.5
    projection = projector.forward(np.full(SHAPE, value, dtype=np.float32))
    chord_mm = exact_chord_mm(xstart, xend, *box_mm())
    np.testing.assert_allclose(projection, value * chord_mm, rtol=1e-4, atol=1e-4)
    assert np.count_nonzero(chord_mm) > 300
    assert np.count_nonzero(chord_mm == 0) >= 3


def ellipsoid_image(shape, origin_mm, voxel_mm, centre_mm, semi_axes_mm, supersample=3):
    """Voxelised uniform ellipsoid (value 1) with partial-volume fractions."""
    fractions = np.zeros(shape, dtype=np.float64)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    z, y, x = np.meshgrid(*[origin_mm[a] + voxel_mm[a] * np.arange(shape[2 - a])
                            for a in (2, 1, 0)], indexing="ij")
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                r2 = (((x + ox * voxel_mm[0] - centre_mm[0]) / semi_axes_mm[0]) ** 2
                      + ((y + oy * voxel_mm[1] - centre_mm[1]) / semi_axes_mm[1]) ** 2
                      + ((z + oz * voxel_mm[2] - centre_mm[2]) / semi_axes_mm[2]) ** 2)
                fractions += r2 <= 1.0
    return (fractions / supersample ** 3).astype(np.float32)


def ellipsoid_chord_mm(xstart, xend, centre_mm, semi_axes_mm):
    """Exact chord length of each line through an axis-aligned ellipsoid."""
    start = (np.asarray(xstart, np.float64) - centre_mm) / semi_axes_mm
    step = (np.asarray(xend, np.float64) - np.asarray(xstart, np.float64)) / semi_axes_mm
    a = np.sum(step * step, axis=1)
    b = 2 * np.sum(start * step, axis=1)
    c = np.sum(start * start, axis=1) - 1.0
    discriminant = np.maximum(b * b - 4 * a * c, 0.0)
    t_span = np.sqrt(discriminant) / a
    return t_span * np.linalg.norm(np.asarray(xend, np.float64) - xstart, axis=1)


def test_ellipsoid_line_integrals():
    shape = (40, 40, 40)
    voxel_mm = np.full(3, 2.0, dtype=np.float32)
    origin_mm = np.full(3, -39.0, dtype=np.float32)
    centre_mm = np.array([3.0, -2.0, 1.5])
    semi_axes_mm = np.array([28.0, 20.0, 14.0])
    activity = 1.7
    image = activity * ellipsoid_image(shape, origin_mm, voxel_mm, centre_mm, semi_axes_mm)
    rng = np.random.default_rng(4)
    points = centre_mm + rng.uniform(-0.6, 0.6, (1500, 3)) * semi_axes_mm
    xstart, xend = lors_through(points, rng, reach_mm=120.0)
    expected = activity * ellipsoid_chord_mm(xstart, xend, centre_mm, semi_axes_mm)
    keep = expected >= 0.3 * activity * 2 * semi_axes_mm.max()
    assert keep.sum() > 500
    projection = JosephProjector(xstart[keep], xend[keep], shape, origin_mm, voxel_mm).forward(
        image)
    relative_error = np.abs(projection - expected[keep]) / expected[keep]
    assert relative_error.mean() < 0.01, relative_error.mean()


def test_tof_bins_sum_to_nontof():
    rng = np.random.default_rng(5)
    low, high = box_mm()
    centre = 0.5 * (low + high)
    points = centre + rng.uniform(-0.7, 0.7, (200, 3)) * (high - low)
    xstart, xend = lors_through(points, rng, reach_mm=50.0)
    tof = TofSpec(bins=25, bin_mm=4.0, sigma_mm=5.0, cutoff_sigmas=2.5)
    image = rng.random(SHAPE, dtype=np.float32)
    tof_projection = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM,
                                     tof=tof).forward(image)
    projection = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM).forward(image)
    assert tof_projection.shape == (200, 25)
    np.testing.assert_allclose(tof_projection.sum(axis=1), projection, rtol=1e-5, atol=1e-5)
    # the TOF profile peaks where the image is: near the point each LOR was built through
    peak_bin = np.argmax(tof_projection, axis=1)
    peak_mm = (peak_bin - (tof.bins - 1) / 2) * tof.bin_mm
    lit = projection > 0.2 * projection.max()
    assert np.all(np.abs(peak_mm[lit]) < 50.0)


@pytest.mark.parametrize("tof", [
    TofSpec(bins=25, bin_mm=8.0, sigma_mm=5.0, cutoff_sigmas=2.5),
    TofSpec(bins=5, bin_mm=3.0, sigma_mm=2.0, cutoff_sigmas=3.0),
], ids=["bins-cover-the-image", "bins-too-few"])
def test_back_projection_of_every_bin_equals_the_tof_back_projection_of_repeated_values(tof):
    """The TOF sensitivity in one pass equals the bin-by-bin TOF back projection, also where
    the bins do not cover a LOR's stretch in the image (then it is below the non-TOF one)."""
    rng = np.random.default_rng(9)
    xstart, xend = mixed_lors(rng)
    projector = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=tof)
    factors = rng.uniform(0.2, 1.0, projector.n_lors).astype(np.float32)
    expected = projector.back(np.repeat(factors, tof.bins).reshape(projector.shape_out))
    np.testing.assert_allclose(projector.back_every_bin(factors), expected, rtol=1e-5,
                               atol=1e-6 * expected.max())
    plain = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM).back(factors)
    if tof.bins == 25:
        np.testing.assert_allclose(expected, plain, rtol=1e-5, atol=1e-6 * plain.max())
    else:
        assert expected.sum() < plain.sum() * (1 - 1e-3)


def point_source_row(x_mm):
    """A row of 41 one-mm voxels along x, centred at 0, lit at ``x_mm``:
    (image, origin_mm, voxel_mm)."""
    image = np.zeros((1, 1, 41), dtype=np.float32)
    image[0, 0, 20 + int(x_mm)] = 1.0
    return (image, np.array([-20.0, 0.0, 0.0], dtype=np.float32),
            np.ones(3, dtype=np.float32))


def test_tof_profile_follows_a_point_source():
    image, origin_mm, voxel_mm = point_source_row(10)
    shape = image.shape
    xstart = np.array([[-50.0, 0.0, 0.0], [50.0, 0.0, 0.0]], dtype=np.float32)
    tof = TofSpec(bins=21, bin_mm=2.0, sigma_mm=2.0, cutoff_sigmas=4.0)
    projection = JosephProjector(xstart, -xstart, shape, origin_mm, voxel_mm,
                                 tof=tof).forward(image)
    centres_mm = (np.arange(tof.bins) - (tof.bins - 1) / 2) * tof.bin_mm
    forward_mean = np.sum(projection[0] * centres_mm) / projection[0].sum()
    backward_mean = np.sum(projection[1] * centres_mm) / projection[1].sum()
    assert forward_mean == pytest.approx(10.0, abs=0.05)
    assert backward_mean == pytest.approx(-10.0, abs=0.05)
    np.testing.assert_allclose(projection.sum(axis=1), 1.0, rtol=1e-5)


def per_lor_kernels(rng, n_lors, sigma_mm=TOF.sigma_mm):
    """Timing-calibration-like kernels: widths within +-30 %, offsets up to a bin."""
    return LorTofKernels(sigma_mm * rng.uniform(0.7, 1.3, n_lors),
                         rng.uniform(-TOF.bin_mm, TOF.bin_mm, n_lors))


def test_per_lor_tof_kernels_are_adjoint_and_sum_to_the_nontof_projection():
    rng = np.random.default_rng(21)
    xstart, xend = mixed_lors(rng)
    n = xstart.shape[0]
    kernels = per_lor_kernels(rng, n)
    wide = TofSpec(bins=41, bin_mm=TOF.bin_mm, sigma_mm=TOF.sigma_mm)  # bins cover the box
    projector = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=wide,
                                tof_kernels=kernels)
    for _ in range(2):
        assert projector.adjointness_error(rng) < 1e-5
    image = rng.random(SHAPE, dtype=np.float32)
    plain = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM).forward(image)
    np.testing.assert_allclose(projector.forward(image).sum(axis=1), plain, rtol=1e-5,
                               atol=1e-5 * plain.max())
    chunked = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=wide,
                              tof_kernels=kernels, chunk_lors=13)
    np.testing.assert_allclose(chunked.forward(image), projector.forward(image), rtol=1e-6)
    factors = rng.uniform(0.2, 1.0, n).astype(np.float32)
    expected = projector.back(np.repeat(factors, wide.bins).reshape(projector.shape_out))
    np.testing.assert_allclose(projector.back_every_bin(factors), expected, rtol=1e-5,
                               atol=1e-6 * expected.max())


def test_per_lor_tof_kernels_equal_to_the_shared_one_change_nothing():
    rng = np.random.default_rng(22)
    xstart, xend = mixed_lors(rng)
    n = xstart.shape[0]
    shared = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=TOF)
    own = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=TOF,
                          tof_kernels=LorTofKernels(np.full(n, TOF.sigma_mm), np.zeros(n)))
    image = rng.random(SHAPE, dtype=np.float32)
    values = rng.random(shared.shape_out, dtype=np.float32)
    np.testing.assert_allclose(own.forward(image), shared.forward(image), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(own.back(values), shared.back(values), rtol=1e-6, atol=1e-6)


def test_a_kernel_offset_of_one_bin_moves_the_profile_by_one_bin():
    image, origin_mm, voxel_mm = point_source_row(4)
    shape = image.shape
    xstart = np.array([[-50.0, 0.0, 0.0]] * 3, dtype=np.float32)
    tof = TofSpec(bins=21, bin_mm=2.0, sigma_mm=2.0, cutoff_sigmas=4.0)
    kernels = LorTofKernels([2.0, 2.0, 4.0], [0.0, tof.bin_mm, -3.0])
    projection = JosephProjector(xstart, -xstart, shape, origin_mm, voxel_mm, tof=tof,
                                 tof_kernels=kernels).forward(image)
    np.testing.assert_allclose(projection[1, 1:], projection[0, :-1], atol=1e-6)
    centres_mm = (np.arange(tof.bins) - (tof.bins - 1) / 2) * tof.bin_mm
    means = projection @ centres_mm / projection.sum(axis=1)
    np.testing.assert_allclose(means, [4.0, 6.0, 1.0], atol=0.05)
    spread = np.sqrt(projection @ centres_mm ** 2 / projection.sum(axis=1) - means ** 2)
    assert spread[2] > 1.8 * spread[0]  # the wider kernel


@pytest.mark.parametrize("sigma, offset, message", [
    ([1.0, 2.0], [0.0, 0.0, 0.0], "one per LOR"),
    ([1.0, 0.0], [0.0, 0.0], "finite and > 0"),
    ([1.0, np.nan], [0.0], "finite and > 0"),
    ([1.0], [np.inf], "offsets finite"),
])
def test_lor_tof_kernels_reject_bad_values(sigma, offset, message):
    with pytest.raises(ValueError, match=message):
        LorTofKernels(sigma, offset)


def test_projector_rejects_tof_kernels_it_cannot_use():
    rng = np.random.default_rng(23)
    xstart, xend = mixed_lors(rng)
    with pytest.raises(ValueError, match="non-TOF"):
        JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM,
                        tof_kernels=LorTofKernels.uniform(3.0))
    with pytest.raises(ValueError, match="for 2 LORs"):
        JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=TOF,
                        tof_kernels=LorTofKernels([3.0, 3.0], [0.0, 0.0]))


def test_matches_skimage_radon_in_2d():
    radon = pytest.importorskip("skimage.transform").radon
    size = 63
    centre = (size - 1) / 2
    rows, cols = np.mgrid[:size, :size] - centre
    image2d = (np.exp(-((cols - 6) ** 2 + (rows + 4) ** 2) / (2 * 5.0 ** 2))
               + 0.6 * np.exp(-((cols + 9) ** 2 + (rows - 7) ** 2) / (2 * 3.0 ** 2)))
    image2d[rows ** 2 + cols ** 2 > (size // 2 - 1) ** 2] = 0.0  # radon(circle=True) needs it
    angles_deg = np.arange(0.0, 180.0, 6.0)
    sinogram = radon(image2d, theta=angles_deg, circle=True)  # (detector, angle)

    # skimage integrates along (sin a, cos a) in (col, row) at offset s (cos a, -sin a)
    angle = np.deg2rad(angles_deg)[None, :]
    s = (np.arange(size) - centre)[:, None]
    point = np.stack(np.broadcast_arrays(s * np.cos(angle), -s * np.sin(angle),
                                         np.zeros_like(s * angle)), axis=-1).reshape(-1, 3)
    direction = np.stack(np.broadcast_arrays(np.sin(angle) + 0 * s, np.cos(angle) + 0 * s,
                                             np.zeros_like(s * angle)), axis=-1).reshape(-1, 3)
    projector = JosephProjector(point - 60 * direction, point + 60 * direction, (1, size, size),
                                np.array([-centre, -centre, 0.0]), np.ones(3))
    projection = projector.forward(image2d[None].astype(np.float32)).reshape(size, -1)
    correlation = np.corrcoef(projection.ravel(), sinogram.ravel())[0, 1]
    assert correlation > 0.99, correlation
    relative_l2 = np.linalg.norm(projection - sinogram) / np.linalg.norm(sinogram)
    assert relative_l2 < 0.02, relative_l2


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("tof", [None, TOF], ids=["nontof", "tof"])
def test_back_projection_is_race_free(tof):
    rng = np.random.default_rng(6)
    xstart, xend = mixed_lors(rng, n_random=3000)
    projector = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=tof)
    values = rng.random(projector.shape_out, dtype=np.float32)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = projector.back(values)
        numba.set_num_threads(2)
        parallel = projector.back(values)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_allclose(parallel, serial, rtol=1e-5, atol=1e-5 * serial.max())


def test_rejects_bad_shapes():
    xstart = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        JosephProjector(xstart, np.zeros((4, 2)), SHAPE, ORIGIN_MM, VOXEL_MM)
    projector = JosephProjector(xstart, xstart + 1, SHAPE, ORIGIN_MM, VOXEL_MM)
    with pytest.raises(ValueError):
        projector.forward(np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        TofSpec(bins=0, bin_mm=1.0, sigma_mm=1.0)


@pytest.mark.parametrize("tof", [None, TofSpec(bins=5, bin_mm=40.0, sigma_mm=20.0)],
                         ids=["nontof", "tof"])
def test_span3_projector_is_adjoint_and_sums_the_ring_pair_projections(tof):
    """span > 1: the compressed projector's adjoint test, and each plane's value equal to the
    sum of the span-1 projections of its ring pairs."""
    import dataclasses

    from medhpc.pet.projector import CompressedProjector, sinogram_projector
    from medhpc.pet.scanner import (default_image_grid, load_scanner, plane_members,
                                    ring_pair_to_plane)

    span1 = dataclasses.replace(load_scanner("small-test"), max_ring_difference=4)
    span3 = dataclasses.replace(span1, span=3)
    shape, voxel = default_image_grid(span3)
    origin = -0.5 * (np.array(shape[::-1]) - 1) * np.array(voxel)
    views = [0, 5, 17]
    compressed = sinogram_projector(span3, shape, origin, voxel, views=views, tof=tof)
    assert isinstance(compressed, CompressedProjector)
    assert compressed.n_lors == span3.n_radial * len(views) * span3.n_planes
    rng = np.random.default_rng(3)
    assert compressed.adjointness_error(rng) < 1e-5
    image = rng.random(shape, dtype=np.float32)
    tail = (tof.bins,) if tof else ()
    plain = sinogram_projector(span1, shape, origin, voxel, views=views, tof=tof)
    ring_pairs = plain.forward(image).reshape((span1.n_radial, len(views), span1.n_planes) + tail)
    pairs, first = plane_members(span3)
    member_planes = ring_pair_to_plane(span1)[pairs[:, 0], pairs[:, 1]]
    expected = np.add.reduceat(ring_pairs[:, :, member_planes], first[:-1], axis=2)
    actual = compressed.forward(image).reshape(expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=2e-6 * expected.max())
    values = rng.random((compressed.n_lors,), dtype=np.float32)
    every_bin = np.repeat(values[:, None], tof.bins, 1) if tof else values
    np.testing.assert_allclose(compressed.back_every_bin(values), compressed.back(every_bin),
                               rtol=1e-4, atol=1e-4)
