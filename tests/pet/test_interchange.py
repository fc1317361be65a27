"""STIR projection data and CASToR histograms: layout, geometry, round trips, bad input."""

import h5py
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.images import read_image
from medhpc.pet.interchange import (read_castor_histogram, read_stir_layout, read_stir_sinogram,
                                    stir_bin_index, stir_detector_pairs, write_stir)
from medhpc.pet.scanner import (ScannerGeometry, crystal_ids, lor_endpoints, plane_members,
                                plane_ring_pairs, sinogram_crystals)
from medhpc.pet.sinogram import read_block, read_layout
from tests.helpers import run_medhpc

N_DETECTORS, RINGS, T_EVEN = 16, 3, 12
RADIUS_CM, RING_CM = 8.0, 0.4


def _stir_header(data_name, axial_major=True, segments=(-2, -1, 0, 1, 2), extra=(),
                 tangential=T_EVEN, detectors=N_DETECTORS, dimensions=4, maximum=None,
                 rings=RINGS, axial_sizes=None):
    """A STIR 4 style header written from the documented keys (not by medhpc)."""
    axial = "{" + ",".join(str(n) for n in (axial_sizes or [rings - abs(d) for d in segments])) \
        + "}"
    labels = ("axial coordinate", "view") if axial_major else ("view", "axial coordinate")
    sizes = (axial, detectors // 2) if axial_major else (detectors // 2, axial)
    listed = "{" + ",".join(str(d) for d in segments) + "}"
    lines = ["!INTERFILE  :=", f"name of data file := {data_name}",
             "originating system := userdefined", "!GENERAL DATA :=",
             "!type of data := PET", "imagedata byte order := LITTLEENDIAN",
             "!PET data type := Emission", "applied corrections := {None}",
             "!number format := float", "!number of bytes per pixel := 4",
             f"number of dimensions := {dimensions}",
             "matrix axis label [4] := segment", f"!matrix size [4] := {len(segments)}",
             f"matrix axis label [3] := {labels[0]}", f"!matrix size [3] := {sizes[0]}",
             f"matrix axis label [2] := {labels[1]}", f"!matrix size [2] := {sizes[1]}",
             "matrix axis label [1] := tangential coordinate",
             f"!matrix size [1] := {tangential}",
             f"minimum ring difference per segment := {listed}",
             f"maximum ring difference per segment := {maximum or listed}",
             "Scanner parameters:=", "Scanner type := userdefined",
             f"Number of rings                          := {rings}",
             f"Number of detectors per ring             := {detectors}",
             f"Inner ring diameter (cm)                 := {2 * RADIUS_CM}",
             "Average depth of interaction (cm)        := 0.5",
             f"Distance between rings (cm)              := {RING_CM}",
             "View offset (degrees)                    := 0", "end scanner parameters:=",
             *extra, "!END OF INTERFILE :="]
    return "\n".join(lines) + "\n"


def _write_index_file(folder, axial_major=True):
    """A STIR file whose every value is its own element index."""
    n_values = sum(RINGS - abs(d) for d in range(-2, 3)) * (N_DETECTORS // 2) * T_EVEN
    np.arange(n_values, dtype="<f4").tofile(folder / "index.s")
    header = folder / "index.hs"
    header.write_text(_stir_header("index.s", axial_major=axial_major))
    return header, n_values


def _stir_bin(index, axial_major):
    """(ring difference, view, axial position, t) of element ``index``, from STIR's layout."""
    views = N_DETECTORS // 2
    for difference in range(-2, 3):
        size = (RINGS - abs(difference)) * views * T_EVEN
        if index < size:
            outer, position = divmod(index, T_EVEN)
            if axial_major:
                axial, view = divmod(outer, views)
            else:
                view, axial = divmod(outer, RINGS - abs(difference))
            return difference, view, axial, position - T_EVEN // 2
        index -= size
    raise AssertionError("index outside the data")


def test_detector_pairs_invert_stir_pairing():
    for n in (8, 16, 96):
        views, tangential, swapped = stir_detector_pairs(n)
        det_a, det_b = np.nonzero(~np.eye(n, dtype=bool))
        view, t = views[det_a, det_b], tangential[det_a, det_b]
        det1 = (view + np.right_shift(t, 1)) % n
        det2 = (view - np.right_shift(t + 1, 1) + n // 2) % n
        reverse = swapped[det_a, det_b]
        assert np.all(np.where(reverse, det1 == det_b, det1 == det_a))
        assert np.all(np.where(reverse, det2 == det_a, det2 == det_b))
        _, counts = np.unique(view * 2 * n + t, return_counts=True)
        assert np.all(counts == 2)  # each bin once per orientation


@pytest.mark.parametrize("axial_major", [True, False])
def test_stir_bins_are_the_lors_stir_describes(tmp_path, axial_major):
    header, n_values = _write_index_file(tmp_path, axial_major)
    layout = read_layout(header)
    scanner = layout.scanner
    assert (scanner.crystals_per_ring, scanner.rings, scanner.max_ring_difference) == (16, 3, 2)
    assert scanner.radius_mm == pytest.approx(80.0) and scanner.doi_mm == pytest.approx(5.0)
    assert scanner.radial_trim == N_DETECTORS // 2 - T_EVEN // 2
    block = read_block(layout)
    stored = block.multiplicative > 0
    assert np.array_equal(np.sort(block.prompts[stored]), np.arange(n_values, dtype=np.float32))
    # with T even, one edge of medhpc radial bins has no STIR bin
    assert stored.sum() == n_values and (~stored).sum() == scanner.n_views * scanner.n_planes
    xstart, xend = lor_endpoints(scanner)
    radius = scanner.radius_mm + scanner.doi_mm
    pairs = plane_ring_pairs(scanner)
    start, end = sinogram_crystals(scanner)
    for radial, view, plane in zip(*np.nonzero(stored)):
        difference, stir_view, axial, t = _stir_bin(int(block.prompts[radial, view, plane]),
                                                    axial_major)
        det1 = (stir_view + (t >> 1)) % N_DETECTORS
        det2 = (stir_view - ((t + 1) >> 1) + N_DETECTORS // 2) % N_DETECTORS
        ring1 = axial + max(0, -difference)
        stir_ends = set()
        for det, ring in ((det1, ring1), (det2, ring1 + difference)):
            angle = 2 * np.pi * det / N_DETECTORS
            stir_ends.add((round(radius * np.sin(angle), 3), round(-radius * np.cos(angle), 3),
                           ring))
        medhpc_ends = {(round(float(xstart[radial, view, plane, 0]), 3),
                        round(float(xstart[radial, view, plane, 1]), 3), int(pairs[plane, 0])),
                       (round(float(xend[radial, view, plane, 0]), 3),
                        round(float(xend[radial, view, plane, 1]), 3), int(pairs[plane, 1]))}
        assert stir_ends == medhpc_ends
        assert {start[radial, view], end[radial, view]} == {(det1 - 4) % 16, (det2 - 4) % 16}


SPAN3_RINGS = 5
SPAN3_SEGMENTS = ((-1, 1), (-4, -2), (2, 4))  # file order need not be medhpc's
SPAN3_AXIAL = (9, 5, 5)  # 2 rings - 1 - 2 x (smallest |ring difference|)


def _write_span3_index_file(folder, axial_major):
    views = N_DETECTORS // 2
    n_values = sum(SPAN3_AXIAL) * views * T_EVEN
    np.arange(n_values, dtype="<f4").tofile(folder / "span3.s")
    header = folder / "span3.hs"
    header.write_text(_stir_header(
        "span3.s", axial_major=axial_major, segments=[low for low, _ in SPAN3_SEGMENTS],
        maximum="{" + ",".join(str(high) for _, high in SPAN3_SEGMENTS) + "}",
        rings=SPAN3_RINGS, axial_sizes=SPAN3_AXIAL))
    return header, n_values


def _stir_span3_bin(index, axial_major):
    """(segment range, view, axial position, t) of element ``index``, from STIR's layout."""
    views = N_DETECTORS // 2
    for (low, high), size in zip(SPAN3_SEGMENTS, SPAN3_AXIAL):
        count = size * views * T_EVEN
        if index < count:
            outer, position = divmod(index, T_EVEN)
            axial, view = divmod(outer, views) if axial_major else divmod(outer, size)[::-1]
            return (low, high), view, axial, position - T_EVEN // 2
        index -= count
    raise AssertionError("index outside the data")


@pytest.mark.parametrize("axial_major", [True, False])
def test_span3_stir_bins_sum_the_ring_pairs_stir_describes(tmp_path, axial_major):
    """Each STIR span-3 bin holds the LORs of every ring pair whose difference is in its
    segment and whose ring sum is its axial position plus the segment's smallest |difference|;
    the medhpc plane it lands in has exactly those ring pairs between the same detectors."""
    header, n_values = _write_span3_index_file(tmp_path, axial_major)
    layout = read_layout(header)
    scanner = layout.scanner
    assert (scanner.span, scanner.rings, scanner.max_ring_difference) == (3, 5, 4)
    block = read_block(layout)
    stored = block.multiplicative > 0
    assert np.array_equal(np.sort(block.prompts[stored]), np.arange(n_values, dtype=np.float32))
    pairs, first = plane_members(scanner)
    start, end = sinogram_crystals(scanner)
    for radial, view, plane in zip(*np.nonzero(stored)):
        (low, high), stir_view, axial, t = _stir_span3_bin(
            int(block.prompts[radial, view, plane]), axial_major)
        det1 = (stir_view + (t >> 1)) % N_DETECTORS
        det2 = (stir_view - ((t + 1) >> 1) + N_DETECTORS // 2) % N_DETECTORS
        smallest = 0 if low <= 0 <= high else min(abs(low), abs(high))
        stir_lors = set()
        for ring1 in range(SPAN3_RINGS):
            ring2 = axial + smallest - ring1
            if low <= ring2 - ring1 <= high and 0 <= ring2 < SPAN3_RINGS:
                stir_lors.add(frozenset({((det1 - 4) % 16, ring1), ((det2 - 4) % 16, ring2)}))
        medhpc_lors = {frozenset({(int(start[radial, view]), int(r1)),
                                  (int(end[radial, view]), int(r2))})
                       for r1, r2 in pairs[first[plane]:first[plane + 1]]}
        assert stir_lors and stir_lors == medhpc_lors


def test_span3_write_read_round_trip_and_header(tmp_path):
    header, _ = _write_span3_index_file(tmp_path, axial_major=True)
    layout = read_layout(header)
    prompts = read_block(layout).prompts
    written = write_stir(tmp_path / "again.hs", layout.scanner, prompts)
    again = read_stir_layout(written)
    assert again.scanner.span == 3 and sorted(again.segments) == sorted(SPAN3_SEGMENTS)
    assert np.array_equal(read_stir_sinogram(again, layout.scanner), prompts)
    text = written.read_text()
    assert "minimum ring difference per segment := {-4,-1,2}" in text
    assert "maximum ring difference per segment := {-2,1,4}" in text


def test_write_read_round_trip_is_exact(pet_case, tmp_path):
    layout = read_layout(pet_case["noisy"])
    prompts = read_block(layout).prompts
    header = write_stir(tmp_path / "noisy.hs", layout.scanner, prompts)
    assert (tmp_path / "noisy.s").stat().st_size == prompts.size * 4
    stir = read_stir_layout(header)
    assert stir.n_tangential == layout.scanner.n_radial
    assert stir.scanner.sinogram_shape == layout.scanner.sinogram_shape
    assert np.array_equal(read_stir_sinogram(stir, layout.scanner), prompts)
    index = stir_bin_index(stir, layout.scanner, np.arange(layout.scanner.n_views),
                           np.arange(layout.scanner.n_planes))
    assert np.array_equal(np.sort(index.ravel()), np.arange(stir.n_values))
    stir_block = read_block(read_layout(header), views=[1, 5, 9], planes=np.arange(3, 40))
    assert np.array_equal(stir_block.prompts, prompts[:, [1, 5, 9]][:, :, 3:40])
    assert np.all(stir_block.multiplicative == 1) and np.all(stir_block.additive == 0)


def test_pet_convert_stir_with_corrections_rebuilds_the_sinogram(pet_case, tmp_path):
    """Prompts, STIR correction factors (reciprocals) and randoms in; the medhpc file out."""
    source = pet_case["noisy"]
    for dataset, name in (("prompts", "prompts"), ("normalisation", "norm"),
                          ("attenuation", "acf"), ("additive", "randoms")):
        result = run_medhpc("pet-convert", "--in", source, "--dataset", dataset,
                            "--out", tmp_path / f"{name}.hs")
        assert result.returncode == 0, result.stderr
    out = tmp_path / "back.h5"
    result = run_medhpc("pet-convert", "--in", tmp_path / "prompts.hs", "--norm",
                        tmp_path / "norm.hs", "--acf", tmp_path / "acf.hs", "--randoms",
                        tmp_path / "randoms.hs", "--scanner", "small-test", "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(source, "r") as original, h5py.File(out, "r") as converted:
        assert np.array_equal(converted["prompts"][...], original["prompts"][...])
        assert np.array_equal(converted["additive"][...], original["additive"][...])
        for name in ("normalisation", "attenuation", "multiplicative"):
            np.testing.assert_allclose(converted[name][...], original[name][...], rtol=1e-6)
    assert read_layout(out).scanner == read_layout(source).scanner


def test_pet_recon_reads_stir_as_it_reads_the_same_counts_in_medhpc(pet_case, tmp_path):
    layout = read_layout(pet_case["noisy"])
    prompts = read_block(layout).prompts
    header = write_stir(tmp_path / "counts.hs", layout.scanner, prompts)
    converted = tmp_path / "counts.h5"
    result = run_medhpc("pet-convert", "--in", header, "--out", converted)
    assert result.returncode == 0, result.stderr
    images = []
    for source in (header, converted):
        out = tmp_path / f"{source.suffix[1:]}.nii.gz"
        result = run_medhpc("pet-recon", "--sinogram", source, "--out", out, "--iterations", "1",
                            "--subsets", "4", "--device", "cpu", "--no-fov-mask")
        assert result.returncode == 0, result.stderr
        images.append(read_image(out)[0])
    assert images[0].max() > 0
    assert np.array_equal(images[0], images[1])


def _castor_files(folder, scanner, prompts, multiplicative_parts, additive, duration_s, rng):
    """A CASToR PET histogram of the sinogram, records shuffled and half the pairs reversed."""
    attenuation, normalisation = multiplicative_parts
    start, end = sinogram_crystals(scanner)
    pairs = plane_ring_pairs(scanner)
    radial, view, plane = np.meshgrid(*[np.arange(n) for n in prompts.shape], indexing="ij")
    id1 = crystal_ids(scanner, start[radial, view], pairs[plane, 0]).ravel()
    id2 = crystal_ids(scanner, end[radial, view], pairs[plane, 1]).ravel()
    reverse = rng.random(id1.size) < 0.5
    id1, id2 = np.where(reverse, id2, id1), np.where(reverse, id1, id2)
    order = rng.permutation(id1.size)
    record = np.dtype([("time", "<u4"), ("acf", "<f4"), ("randoms", "<f4"), ("ncf", "<f4"),
                       ("counts", "<f4"), ("id1", "<u4"), ("id2", "<u4")])
    records = np.zeros(id1.size, record)
    records["acf"] = (1.0 / attenuation).ravel()[order]
    records["ncf"] = (1.0 / normalisation).ravel()[order]
    records["randoms"] = (additive / duration_s).ravel()[order]
    records["counts"] = prompts.ravel()[order]
    records["id1"], records["id2"] = id1[order], id2[order]
    records.tofile(folder / "histogram.cdf")
    header = folder / "histogram.cdh"
    header.write_text("\n".join([
        "Data filename: histogram.cdf", f"Number of events: {id1.size}",
        "Data mode: histogram", "Data type: PET", "Start time (s): 0",
        f"Duration (s): {duration_s}", "Scanner name: small-test",
        "Attenuation correction flag: 1", "Normalization correction flag: 1",
        "Random correction flag: 1", "Scatter correction flag: 0"]) + "\n")
    return header


def assert_histogram_is_the_sinogram(histogram, data):
    assert histogram["outside"] == 0
    assert np.array_equal(histogram["prompts"], data["prompts"])
    for name in ("attenuation", "normalisation", "multiplicative", "additive"):
        np.testing.assert_allclose(histogram[name], data[name], rtol=2e-6, atol=1e-7)


def test_castor_histogram_equals_the_sinogram(pet_case, tmp_path):
    with h5py.File(pet_case["noisy"], "r") as h5:
        data = {name: h5[name][...] for name in ("prompts", "attenuation", "normalisation",
                                                 "additive", "multiplicative")}
    layout = read_layout(pet_case["noisy"])
    header = _castor_files(tmp_path, layout.scanner, data["prompts"],
                           (data["attenuation"], data["normalisation"]), data["additive"], 300.0,
                           np.random.default_rng(1))
    assert_histogram_is_the_sinogram(read_castor_histogram(header, layout.scanner), data)
    out = tmp_path / "histogram.h5"
    result = run_medhpc("pet-convert", "--in", header, "--scanner", "small-test", "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as h5:
        assert np.array_equal(h5["prompts"][...], data["prompts"])


def test_castor_histogram_ids_outside_the_scanner_are_refused(tmp_path):
    scanner = ScannerGeometry(name="tiny", crystals_per_ring=16, rings=2, radius_mm=50.0,
                              ring_spacing_mm=4.0, crystal_size_mm=4.0, radial_trim=2,
                              max_ring_difference=1)
    record = np.dtype([("time", "<u4"), ("counts", "<f4"), ("id1", "<u4"), ("id2", "<u4")])
    records = np.zeros(2, record)
    records["id1"], records["id2"] = [0, 40], [8, 3]
    records.tofile(tmp_path / "h.cdf")
    (tmp_path / "h.cdh").write_text("Data filename: h.cdf\nNumber of events: 2\nData mode: "
                                    "histogram\nData type: PET\nDuration (s): 10\n")
    with pytest.raises(InputError, match="crystal1 ID 40"):
        read_castor_histogram(tmp_path / "h.cdh", scanner)


@pytest.mark.parametrize("change, message", [
    ({"maximum": "{-2,-1,1,1,2}"}, "same odd number"),
    ({"segments": (-2, 1), "maximum": "{-1,2}", "axial_sizes": (3, 3)}, "same odd number"),
    ({"segments": (-4, -1, 2), "maximum": "{-2,1,4}", "axial_sizes": (1, 5, 1)},
     "ring difference 4 of 3 rings"),
    ({"extra": ("applied corrections := {arc correction}",)}, "arc-corrected"),
    ({"dimensions": 5}, "TOF"),
    ({"detectors": 18}, "multiple of 4"),
    ({"segments": (-2, 0, 2)}, "each once"),
])
def test_unsupported_stir_data_give_one_line(tmp_path, change, message):
    header = tmp_path / "bad.hs"
    header.write_text(_stir_header("bad.s", **change))
    np.zeros(10_000, "<f4").tofile(tmp_path / "bad.s")
    with pytest.raises(InputError, match=message) as error:
        read_layout(header)
    assert str(header) in str(error.value) and "\n" not in str(error.value)


def test_short_or_missing_stir_data_are_refused_before_any_output(tmp_path):
    header, _ = _write_index_file(tmp_path)
    with open(tmp_path / "index.s", "r+b") as data:
        data.truncate(100)
    out = tmp_path / "recon.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", header, "--out", out, "--device", "cpu")
    assert result.returncode == 2
    assert "index.s" in result.stderr and "need" in result.stderr
    assert not out.exists()
    (tmp_path / "index.s").unlink()
    result = run_medhpc("pet-convert", "--in", header, "--out", tmp_path / "x.h5")
    assert result.returncode == 2 and "not found" in result.stderr
    assert not (tmp_path / "x.h5").exists()


def test_pet_convert_refuses_mismatched_options(pet_case, tmp_path):
    result = run_medhpc("pet-convert", "--in", pet_case["noisy"], "--norm", "n.hs",
                        "--out", tmp_path / "x.hs")
    assert result.returncode == 2 and "goes with a STIR" in result.stderr
    result = run_medhpc("pet-convert", "--in", pet_case["noisy"], "--out", tmp_path / "x.h5")
    assert result.returncode == 2 and ".hs" in result.stderr
    castor = tmp_path / "a.cdh"
    castor.write_text("Data mode: histogram\n")
    result = run_medhpc("pet-convert", "--in", castor, "--out", tmp_path / "a.h5")
    assert result.returncode == 2 and "--scanner" in result.stderr
    result = run_medhpc("pet-recon", "--sinogram", castor, "--out", tmp_path / "r.nii.gz")
    assert result.returncode == 2 and "pet-convert" in result.stderr


def test_pet_convert_span_sums_ring_pairs_and_reconstructs_like_span_data(span_case, pet_case,
                                                                        tmp_path):
    """--span 3 on the span-1 sinogram: the counts are kept, each plane is its ring pairs' sum,
    and it is within the factor averaging of the span-3 data simulated directly."""
    out = tmp_path / "span3.h5"
    result = run_medhpc("pet-convert", "--in", span_case["span1"], "--span", "3", "--out", out,
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    span1, span3 = read_layout(span_case["span1"]), read_layout(out)
    assert span3.scanner.span == 3 and span3.scanner.n_planes == read_layout(
        span_case["span3"]).scanner.n_planes
    block1, block3 = read_block(span1), read_block(span3)
    np.testing.assert_allclose(block3.prompts.sum(), block1.prompts.sum(), rtol=1e-6)
    np.testing.assert_allclose(block3.additive.sum(), block1.additive.sum(), rtol=1e-6)
    # segment 0 of span 3 takes ring differences -1..1; at ring sum 3 that is (1, 2), (2, 1)
    pairs1 = plane_members(span1.scanner)[0]
    pairs3, first3 = plane_members(span3.scanner)
    plane = next(p for p in range(len(first3) - 1)
                 if {tuple(q) for q in pairs3[first3[p]:first3[p + 1]]} == {(1, 2), (2, 1)})
    members = [int(np.flatnonzero((pairs1 == q).all(axis=1))[0]) for q in ((1, 2), (2, 1))]
    np.testing.assert_allclose(block3.prompts[:, :, plane],
                               block1.prompts[:, :, members].sum(axis=2), rtol=1e-5)
    np.testing.assert_allclose(block3.multiplicative[:, :, plane],
                               block1.multiplicative[:, :, members].mean(axis=2), rtol=1e-5)
    direct = read_block(read_layout(span_case["span3"])).prompts
    assert np.linalg.norm(block3.prompts - direct) < 0.02 * np.linalg.norm(direct)


@pytest.mark.parametrize("arguments, words", [
    (("--span", "2"), ["--span 2", "odd span"]),
    (("--span", "3", "--scanner", "small-test"), ["--scanner", "expected no --scanner"]),
])
def test_pet_convert_span_refuses_bad_requests(span_case, tmp_path, arguments, words):
    out = tmp_path / "x.h5"
    result = run_medhpc("pet-convert", "--in", span_case["span1"], *arguments, "--out", out,
                        "--device", "cpu")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "rror" in line]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr
    assert not out.exists()


def test_pet_convert_span_refuses_compressed_input(span_case, tmp_path):
    result = run_medhpc("pet-convert", "--in", span_case["span3"], "--span", "3", "--out",
                        tmp_path / "x.h5", "--device", "cpu")
    assert result.returncode == 2 and "already span 3" in result.stderr


def test_pet_convert_writes_a_castor_histogram_that_reads_back_as_the_sinogram(pet_case,
                                                                              tmp_path):
    source = pet_case["noisy"]
    with h5py.File(source, "r") as h5:
        data = {name: h5[name][...] for name in ("prompts", "attenuation", "normalisation",
                                                 "additive", "multiplicative")}
    header = tmp_path / "for-castor.cdh"
    result = run_medhpc("pet-convert", "--in", source, "--out", header, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "1 s" in result.stderr  # no acquisition time recorded: said once, rates are counts
    text = header.read_text()
    assert "Data mode: histogram" in text and "Attenuation correction flag: 1" in text
    layout = read_layout(source)
    assert_histogram_is_the_sinogram(read_castor_histogram(header, layout.scanner), data)
    back = tmp_path / "back.h5"
    result = run_medhpc("pet-convert", "--in", header, "--scanner", "small-test", "--out", back,
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with h5py.File(back, "r") as h5:
        assert np.array_equal(h5["prompts"][...], data["prompts"])


def test_pet_convert_to_castor_refuses_what_a_histogram_cannot_hold(pet_case, span_case,
                                                                   tmp_path):
    out = tmp_path / "x.cdh"
    for source, extra, expected in (
            (pet_case["noisy"], ("--dataset", "additive"),
             ["--dataset additive", "prompts with their factors"]),
            (span_case["span3"], (), ["crystal pairs", "span 3"])):
        result = run_medhpc("pet-convert", "--in", source, *extra, "--out", out, "--device",
                            "cpu")
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if "rror" in line]
        assert len(lines) == 1 and all(word in lines[0] for word in expected), result.stderr
        assert not out.exists() and not out.with_suffix(".cdf").exists()
