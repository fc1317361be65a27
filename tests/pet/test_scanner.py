import json
import math

import h5py
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.pet.scanner import (ScannerGeometry, available_presets, crystal_positions,
                                default_image_grid, direct_planes, load_scanner, lor_endpoints,
                                plane_members, plane_ring_pairs, plane_ring_sums,
                                plane_segments, ring_pair_to_plane, scanner_from_dict,
                                scanner_to_dict, sinogram_crystals, subset_views,
                                tof_bin_centres_mm)


@pytest.fixture(scope="module")
def small():
    return load_scanner("small-test")


def write_toml(path, values):
    lines = ["[scanner]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_presets_are_listed():
    assert {"small-test", "ge-dmi-4ring", "ge-dmi-4ring-tof"} <= set(available_presets())


def test_dmi_sinogram_size():
    dmi = load_scanner("ge-dmi-4ring")
    assert dmi.sinogram_shape == (415, 272, 1296)
    assert dmi.n_lors == 146_292_480 and isinstance(dmi.n_lors, int)
    assert len(plane_ring_pairs(dmi)) == 36 * 36
    assert not dmi.is_tof


def test_dmi_tof():
    dmi = load_scanner("ge-dmi-4ring-tof")
    assert dmi.sinogram_shape == (415, 272, 1296, 29)
    assert dmi.n_bins == 146_292_480 * 29
    assert dmi.tof_sigma_mm == pytest.approx(0.299792458 * 385 / 2 / 2.3548, rel=1e-4)
    centres = tof_bin_centres_mm(dmi)
    assert centres[14] == 0 and centres[15] - centres[14] == pytest.approx(dmi.tof_bin_mm)


def test_tof_bin_default_spans_the_diameter(small):
    tof = ScannerGeometry(**{**scanner_to_dict(small), "tof_bins": 11,
                             "tof_resolution_ps": 400.0, "tof_bin_mm": None})
    assert tof.tof_bin_mm * 11 == pytest.approx(2 * small.radius_mm)


def test_endpoints_on_cylinder_at_ring_z(small):
    xstart, xend = lor_endpoints(small)
    assert xstart.shape == xend.shape == small.sinogram_shape + (3,)
    assert xstart.dtype == np.float32
    pairs = plane_ring_pairs(small)
    for points, ring in ((xstart, pairs[:, 0]), (xend, pairs[:, 1])):
        radius = np.hypot(points[..., 0], points[..., 1])
        np.testing.assert_allclose(radius, small.radius_mm, rtol=1e-5)
        np.testing.assert_array_equal(points[..., 2],
                                      np.broadcast_to(small.ring_z_mm[ring], points.shape[:3]))
    positions = crystal_positions(small)
    assert positions.shape == (small.crystals_per_ring, small.rings, 3)
    np.testing.assert_allclose(positions[..., 2].mean(), 0.0, atol=1e-6)


def test_lors_unique_and_complete(small):
    n = small.crystals_per_ring
    start, end = sinogram_crystals(small)
    assert np.all(start != end)
    pairs = plane_ring_pairs(small)
    first = (start[:, :, None] + n * pairs[None, None, :, 0]).ravel()
    second = (end[:, :, None] + n * pairs[None, None, :, 1]).ravel()
    lors = np.sort(np.stack([first, second], axis=1), axis=1)
    assert len(np.unique(lors, axis=0)) == small.n_lors
    # every crystal pair within the ring difference and the radial FOV is there once
    rings, crystals = np.divmod(lors, n)
    gap = np.abs(crystals[:, 0] - crystals[:, 1])
    assert np.all(np.minimum(gap, n - gap) >= small.radial_trim)
    assert np.all(np.abs(rings[:, 0] - rings[:, 1]) <= small.max_ring_difference)
    rings_ok = sum(1 for r1 in range(small.rings) for r2 in range(small.rings)
                   if abs(r1 - r2) <= small.max_ring_difference)
    # pairs n apart along the ring for each circular gap trim..n/2-1, n/2 pairs at gap n/2
    transaxial = n * (n // 2 - small.radial_trim) + n // 2
    assert small.n_lors == rings_ok * transaxial


def test_sinogram_geometry(small):
    xstart, xend = lor_endpoints(small, planes=[0])
    start, end = xstart[:, :, 0, :2].astype(float), xend[:, :, 0, :2].astype(float)
    direction = end - start
    normal = np.stack([-direction[..., 1], direction[..., 0]], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    distance = np.abs(np.sum(start * normal, axis=-1))
    d = small.radial_trim + np.arange(small.n_radial)
    expected = small.radius_mm * np.abs(np.cos(np.pi * d / small.crystals_per_ring))
    np.testing.assert_allclose(distance, np.broadcast_to(expected[:, None], distance.shape),
                               atol=1e-3)
    centre = small.n_radial // 2
    assert np.all(distance[centre] < 1e-3)
    assert np.all(distance <= small.radial_fov_mm + 1e-3)


def test_direct_planes_have_equal_z(small):
    xstart, xend = lor_endpoints(small, planes=np.flatnonzero(direct_planes(small)))
    np.testing.assert_array_equal(xstart[..., 2], xend[..., 2])
    assert direct_planes(small).sum() == small.rings
    assert np.all(plane_ring_pairs(small)[: small.rings, 0] == np.arange(small.rings))


def test_plane_order_and_lookup(small):
    pairs = plane_ring_pairs(small)
    differences = pairs[:, 1] - pairs[:, 0]
    order = [0] + [d for step in range(1, small.max_ring_difference + 1) for d in (step, -step)]
    segment_starts = np.flatnonzero(np.diff(differences, prepend=np.nan) != 0)
    assert list(differences[segment_starts]) == order
    table = ring_pair_to_plane(small)
    np.testing.assert_array_equal(table[pairs[:, 0], pairs[:, 1]], np.arange(len(pairs)))


def test_selection_matches_full(small):
    xstart, xend = lor_endpoints(small)
    views = subset_views(small.n_views, 6, 4)
    planes = slice(3, 40, 5)
    sub_start, sub_end = lor_endpoints(small, views=views, planes=planes)
    np.testing.assert_array_equal(sub_start, xstart[:, views][:, :, planes])
    np.testing.assert_array_equal(sub_end, xend[:, views][:, :, planes])
    with pytest.raises(InputError):
        lor_endpoints(small, views=[small.n_views])


def test_subsets_partition_views():
    n_views = 272
    for n_subsets in (1, 7, 34, 272):
        views = np.concatenate([subset_views(n_views, n_subsets, s) for s in range(n_subsets)])
        np.testing.assert_array_equal(np.sort(views), np.arange(n_views))
    for bad in ((272, 0, 0), (272, 273, 0), (272, 34, 34), (272, 34, -1)):
        with pytest.raises(InputError):
            subset_views(*bad)


def test_dict_json_hdf5_round_trip(tmp_path):
    scanner = load_scanner("ge-dmi-4ring-tof")
    assert scanner_from_dict(json.loads(json.dumps(scanner_to_dict(scanner)))) == scanner
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.attrs.update(scanner_to_dict(scanner))
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert scanner_from_dict(dict(f.attrs)) == scanner


def test_toml_round_trip(tmp_path, small):
    path = write_toml(tmp_path / "mine.toml", scanner_to_dict(small))
    assert load_scanner(path) == small
    assert load_scanner(str(path)) == small


def test_toml_name_defaults_to_stem(tmp_path, small):
    values = scanner_to_dict(small)
    del values["name"], values["span"], values["tof_bins"]
    del values["tof_resolution_ps"], values["tof_bin_mm"]
    assert load_scanner(write_toml(tmp_path / "pet7.toml", values)).name == "pet7"


@pytest.mark.parametrize("change, words", [
    ({"rings": None}, ["missing", "rings"]),
    ({"rings": 8.0}, ["rings", "integer"]),
    ({"radius_mm": "big"}, ["radius_mm", "number"]),
    ({"colour": "red"}, ["unknown", "colour"]),
    ({"radial_trim": 60}, ["radial_trim", "48"]),
    ({"span": 2}, ["span", "odd"]),
    ({"span": 3, "max_ring_difference": 6}, ["max_ring_difference = 6 at span 3", "1 + k x 3"]),
    ({"crystals_per_ring": 95}, ["crystals_per_ring", "even"]),
    ({"max_ring_difference": 8}, ["max_ring_difference", "7"]),
    ({"tof_bins": 9}, ["tof_resolution_ps"]),
])
def test_bad_toml(tmp_path, small, change, words):
    values = {**scanner_to_dict(small), **change}
    values = {k: v for k, v in values.items() if v is not None}
    path = write_toml(tmp_path / "bad.toml", values)
    with pytest.raises(InputError) as error:
        load_scanner(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_unreadable_inputs(tmp_path):
    missing = tmp_path / "nothere.toml"
    with pytest.raises(InputError, match="nothere.toml"):
        load_scanner(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[scanner\nrings = 3\n")
    with pytest.raises(InputError, match="broken.toml.*invalid TOML"):
        load_scanner(broken)
    no_table = tmp_path / "empty.toml"
    no_table.write_text("rings = 3\n")
    with pytest.raises(InputError, match="empty.toml"):
        load_scanner(no_table)
    with pytest.raises(InputError, match="unknown scanner preset"):
        load_scanner("no-such-scanner")


def test_direct_construction_validates():
    with pytest.raises(InputError, match="crystal_size_mm"):
        ScannerGeometry("x", 96, 8, 120.0, 4.0, 10.0, 17, 7)
    with pytest.raises(InputError, match="rings"):
        ScannerGeometry("x", 96, True, 120.0, 4.0, 6.0, 17, 0)
    scanner = ScannerGeometry("x", np.int64(96), 8, 120, 4.0, 6.0, 17, 7)
    assert isinstance(scanner.radius_mm, float) and isinstance(scanner.crystals_per_ring, int)
    assert math.isclose(scanner.radial_fov_mm, 120 * math.cos(math.pi * 17 / 96))


# ---------------------------------------------------------------- modules, gaps, depth

MODULAR = """[scanner]
name = "small-modular"
crystals_per_ring = 96
rings = 8
radius_mm = 115.0
doi_mm = 5.0
modules_per_ring = 8
module_crystal_pitch_mm = 6.5
ring_spacing_mm = 4.0
rings_per_module = 4
ring_gap_mm = 2.0
crystal_size_mm = 6.0
radial_trim = 17
max_ring_difference = 7
"""


def modular_scanner(tmp_path, text=MODULAR):
    path = tmp_path / "modular.toml"
    path.write_text(text)
    return load_scanner(path)


def test_circle_crystals_are_where_they_always_were():
    from medhpc.pet.scanner import crystal_xy

    scanner = load_scanner("small-test")
    angle = 2 * np.pi * np.arange(96) / 96
    np.testing.assert_allclose(crystal_xy(scanner),
                               np.stack([120 * np.cos(angle), 120 * np.sin(angle)], 1), atol=1e-9)


def test_module_crystals_lie_on_flat_faces_at_the_pitch(tmp_path):
    from medhpc.pet.scanner import crystal_xy

    scanner = modular_scanner(tmp_path)
    xy = crystal_xy(scanner).reshape(8, 12, 2)
    for module in range(8):
        points = xy[module]
        steps = np.diff(points, axis=0)
        np.testing.assert_allclose(np.linalg.norm(steps, axis=1), 6.5, rtol=1e-9)
        direction = steps[0] / np.linalg.norm(steps[0])
        normal = np.array([direction[1], -direction[0]])
        distances = points @ normal
        np.testing.assert_allclose(np.abs(distances), 120.0, rtol=1e-9)  # face + depth
    centre_angles = np.arctan2(*xy.mean(axis=1)[:, ::-1].T)
    crystal_angles = 2 * np.pi * (np.arange(8) * 12 + 5.5) / 96
    np.testing.assert_allclose(np.angle(np.exp(1j * (centre_angles - crystal_angles))), 0,
                               atol=1e-9)


def test_ring_blocks_have_gaps_and_are_centred(tmp_path):
    scanner = modular_scanner(tmp_path)
    z = scanner.ring_z_mm
    np.testing.assert_allclose(np.diff(z), [4, 4, 4, 6, 4, 4, 4])
    assert z[0] == pytest.approx(-z[-1])
    shape, voxel = default_image_grid(scanner)
    assert shape[0] == 16 and voxel == (2.0, 2.0, 2.0)  # 30 mm extent at 2 mm


@pytest.mark.parametrize("change, message", [
    (("modules_per_ring = 8", "modules_per_ring = 7"), "modules_per_ring = 7"),
    (("module_crystal_pitch_mm = 6.5", "module_crystal_pitch_mm = 9.0"), "do not fit"),
    (("rings_per_module = 4", "rings_per_module = 3"), "rings_per_module = 3"),
    (("rings_per_module = 4\n", ""), "ring_gap_mm = 2.0"),
    (("doi_mm = 5.0", "doi_mm = -1.0"), "doi_mm"),
])
def test_bad_layouts_are_named(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        modular_scanner(tmp_path, MODULAR.replace(*change))


def test_modular_scanner_keeps_its_sinogram_and_an_adjoint_projector(tmp_path):
    from medhpc.pet.projector import JosephProjector

    scanner = modular_scanner(tmp_path)
    assert scanner.sinogram_shape == load_scanner("small-test").sinogram_shape
    xstart, xend = lor_endpoints(scanner, views=[0, 7])
    projector = JosephProjector(xstart.reshape(-1, 3), xend.reshape(-1, 3), (15, 40, 40),
                                np.array([-78.0, -78.0, -14.0]), np.array([4.0, 4.0, 2.0]))
    assert projector.adjointness_error(np.random.default_rng(0)) < 1e-5


def test_span_planes_match_the_mmr_layout():
    """Siemens mMR at span 11 up to ring difference 60 (64 rings): 837 planes of 4084 ring
    pairs, segments of 127, 115, 115, 93, 93, 71, 71, 49, 49, 27, 27 planes (as STIR lists)."""
    mmr = ScannerGeometry(name="mmr-like", crystals_per_ring=504, rings=64, radius_mm=328.0,
                          ring_spacing_mm=4.0625, crystal_size_mm=4.0, radial_trim=127,
                          max_ring_difference=60, span=11)
    assert mmr.n_planes == 837 and mmr.n_ring_pairs == 4084
    _, counts = np.unique(plane_segments(mmr), return_counts=True)
    assert sorted(counts.tolist()) == sorted([127] + [115, 93, 71, 49, 27] * 2)
    pairs, first = plane_members(mmr)
    assert len(pairs) == 4084 and len(np.unique(pairs, axis=0)) == 4084
    assert np.abs(pairs[:, 1] - pairs[:, 0]).max() == 60


@pytest.mark.parametrize("span, max_ring_difference", [(3, 1), (3, 4), (5, 2), (5, 7)])
def test_span_planes_hold_each_ring_pair_once_by_sum_and_segment(small, span,
                                                                 max_ring_difference):
    import dataclasses

    scanner = dataclasses.replace(small, span=span, max_ring_difference=max_ring_difference)
    pairs, first = plane_members(scanner)
    difference = pairs[:, 1] - pairs[:, 0]
    wanted = {(r1, r2) for r1 in range(small.rings) for r2 in range(small.rings)
              if abs(r2 - r1) <= max_ring_difference}
    assert {tuple(pair) for pair in pairs.tolist()} == wanted and len(pairs) == len(wanted)
    assert len(first) - 1 == scanner.n_planes and scanner.n_ring_pairs == len(wanted)
    half = (span - 1) // 2
    segment = np.sign(difference) * ((np.abs(difference) + half) // span)
    sums = plane_ring_sums(scanner)
    table = ring_pair_to_plane(scanner)
    for plane in range(scanner.n_planes):
        members = slice(first[plane], first[plane + 1])
        assert len(set(segment[members])) == 1 and np.all(pairs[members].sum(axis=1) == sums[plane])
        assert np.all(table[pairs[members, 0], pairs[members, 1]] == plane)
    assert np.all(np.diff(sums[plane_segments(scanner) == 0]) == 1)  # ascending, all sums
    xstart, xend = lor_endpoints(scanner, views=[3])
    assert xstart.shape[2] == len(pairs)
    assert np.allclose(xstart[0, 0, :, 2], scanner.ring_z_mm[pairs[:, 0]])


def test_span_one_members_are_the_planes(small):
    pairs, first = plane_members(small)
    assert np.array_equal(pairs, plane_ring_pairs(small))
    assert np.array_equal(first, np.arange(small.n_planes + 1))
    assert np.array_equal(plane_ring_sums(small), pairs.sum(axis=1))
