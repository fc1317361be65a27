"""List-mode data: crystal pairs, the two file formats, and list-mode OSEM against sinograms."""

import h5py
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.pet.listmode import (parse_time_windows, read_events, read_listmode_layout,
                                 window_events, write_listmode)
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from medhpc.pet.run_listmode import ListModeRecon, centred_on_tof
from medhpc.pet.scanner import (crystal_ids, crystal_pair_lors, load_scanner, plane_ring_pairs,
                                sinogram_crystals)
from tests.pet.conftest import LISTMODE_DURATION_S, SMALL_TOF_SCANNER, serial_run, simulate

MLEM = ReconSettings(algorithm="mlem", iterations=3, psf_fwhm_mm=3.0)


def sinogram_ids(scanner):
    """Crystal IDs of every sinogram bin's start and end, flat in LOR order."""
    start, end = sinogram_crystals(scanner)
    rings = plane_ring_pairs(scanner)
    return (crystal_ids(scanner, start[:, :, None], rings[None, None, :, 0]).ravel(),
            crystal_ids(scanner, end[:, :, None], rings[None, None, :, 1]).ravel())


def test_every_bin_maps_back_to_itself_in_both_orientations():
    scanner = load_scanner("small-test")
    first, second = sinogram_ids(scanner)
    lor, reversed_pair = crystal_pair_lors(scanner, first, second)
    np.testing.assert_array_equal(lor, np.arange(scanner.n_lors))
    assert not reversed_pair.any()
    lor, reversed_pair = crystal_pair_lors(scanner, second, first)
    np.testing.assert_array_equal(lor, np.arange(scanner.n_lors))
    assert reversed_pair.all()


def test_each_crystal_pair_is_one_lor_or_none():
    scanner = load_scanner("small-test")
    ids = np.arange(scanner.crystals_per_ring * scanner.rings)
    first, second = (a.ravel() for a in np.meshgrid(ids, ids, indexing="ij"))
    lor, _ = crystal_pair_lors(scanner, first, second)
    counts = np.bincount(lor[lor >= 0], minlength=scanner.n_lors)
    np.testing.assert_array_equal(counts, 2)  # each LOR once per orientation
    same = first == second
    assert (lor[same] == -1).all()
    out_of_range, _ = crystal_pair_lors(scanner, [ids[-1] + 1, -1], [0, 5])
    assert (out_of_range == -1).all()


def test_tof_centred_lor_keeps_line_and_moves_midpoint():
    xstart = np.array([[-100.0, 0.0, 0.0]], np.float32)
    xend = np.array([[100.0, 0.0, 10.0]], np.float32)
    start, end = centred_on_tof(xstart, xend, np.array([30.0], np.float32))
    direction = (xend - xstart)[0] / np.linalg.norm(xend - xstart)
    np.testing.assert_allclose(0.5 * (start + end)[0], 0.5 * (xstart + xend)[0] + 30 * direction,
                               atol=1e-4)
    assert np.linalg.norm(end - start) == pytest.approx(np.linalg.norm(xend - xstart) + 60, 1e-5)
    np.testing.assert_allclose((end - start)[0] / np.linalg.norm(end - start), direction, atol=1e-6)


# ---------------------------------------------------------------- the medhpc file

def small_file(path, scanner, n=10, tof=False, **changes):
    events = {"crystal1": np.arange(n), "crystal2": np.arange(n) + 40,
              "time_ms": np.arange(n) * 100}
    if tof:
        events["tof_bin"] = np.arange(n) % scanner.tof_bins
    events.update(changes)
    grid = ImageGeometry.from_spacing((7, 16, 16), (4.0, 4.0, 2.0))
    write_listmode(path, scanner, grid, events, duration_s=1.0, overwrite=True)
    return path


def test_medhpc_file_round_trip_and_windows(tmp_path):
    scanner = load_scanner("small-test")
    layout = read_listmode_layout(small_file(tmp_path / "a.h5", scanner))
    assert (layout.kind, layout.n_events, layout.tof, layout.duration_s) == ("medhpc", 10, False, 1.0)
    block = read_events(layout, 2, 5)
    np.testing.assert_array_equal(block.crystal1, [2, 3, 4])
    np.testing.assert_array_equal(block.crystal2, [42, 43, 44])
    assert block.tof_mm is None
    assert window_events(layout, 0.25, 0.55) == (3, 6)
    assert window_events(layout, 0.0, 1.0) == (0, 10)


def test_medhpc_file_tof_bins_become_positions(tmp_path):
    path = tmp_path / "scanner.toml"
    path.write_text(SMALL_TOF_SCANNER)
    scanner = load_scanner(path)
    layout = read_listmode_layout(small_file(tmp_path / "t.h5", scanner, n=7, tof=True))
    block = read_events(layout, 0, 7)
    np.testing.assert_allclose(block.tof_mm, (np.arange(7) - 3) * scanner.tof_bin_mm, rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"crystal1": np.full(10, 10_000)}, "crystal1 ID 10000"),
    ({"time_ms": np.arange(10)[::-1]}, "times decrease"),
])
def test_medhpc_file_bad_events(tmp_path, change, message):
    scanner = load_scanner("small-test")
    layout = read_listmode_layout(small_file(tmp_path / "b.h5", scanner, **change))
    with pytest.raises(InputError, match=message):
        read_events(layout, 0, 10)


def test_medhpc_file_bad_layouts(tmp_path):
    scanner = load_scanner("small-test")
    with pytest.raises(InputError, match="not found"):
        read_listmode_layout(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("no")
    with pytest.raises(InputError, match="not an HDF5 file or a CASToR header"):
        read_listmode_layout(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5.attrs["format"] = "medhpc-sinogram"
    with pytest.raises(InputError, match="not a medhpc list-mode file"):
        read_listmode_layout(tmp_path / "other.h5")
    path = small_file(tmp_path / "c.h5", scanner)
    with h5py.File(path, "a") as h5:
        del h5["events/time_ms"]
    with pytest.raises(InputError, match="events/time_ms"):
        read_listmode_layout(path)
    path = small_file(tmp_path / "d.h5", scanner)
    with h5py.File(path, "a") as h5:
        h5["multiplicative"] = np.ones((3, 3, 3), np.float32)
        h5["additive"] = np.ones((3, 3, 3), np.float32)
    with pytest.raises(InputError, match="'multiplicative' has shape"):
        read_listmode_layout(path)


def test_time_windows():
    assert parse_time_windows(None, 100.0) == [(0.0, 100.0)]
    assert parse_time_windows("0:30,30:200", 100.0) == [(0.0, 30.0), (30.0, 100.0)]
    for text in ("0-30", "30:10", "120:130"):
        with pytest.raises(InputError, match="--time-windows"):
            parse_time_windows(text, 100.0)


# ---------------------------------------------------------------- CASToR

def write_castor(folder, records, header_lines):
    """A CASToR header written by hand (the documented keys) and its records."""
    records.tofile(folder / "scan.cdf")
    header = folder / "scan.cdh"
    header.write_text("\n".join(["Data filename: scan.cdf", f"Number of events: {len(records)}",
                                 "Data mode: list-mode", "Data type: PET",
                                 "Start time (s): 0"] + header_lines) + "\n")
    return header


def test_castor_header_and_records(tmp_path):
    path = tmp_path / "scanner.toml"
    path.write_text(SMALL_TOF_SCANNER)
    scanner = load_scanner(path)
    dtype = np.dtype([("time_ms", "<u4"), ("attenuation", "<f4"), ("randoms_rate", "<f4"),
                      ("normalisation", "<f4"), ("tof_ps", "<f4"), ("crystal1", "<u4"),
                      ("crystal2", "<u4")])
    records = np.zeros(4, dtype)
    records["time_ms"] = [0, 10, 20, 30]
    records["attenuation"] = [2.0, 4.0, 1.0, 1.0]
    records["normalisation"] = [0.5, 1.0, 2.0, 1.0]
    records["randoms_rate"] = [0.1, 0.2, 0.3, 0.4]
    records["tof_ps"] = [100.0, -100.0, 0.0, 50.0]
    records["crystal1"] = [0, 1, 2, 3]
    records["crystal2"] = [30, 31, 32, 33]
    header = write_castor(tmp_path, records, [
        "Duration (s): 0.04", "Attenuation correction flag: 1", "Normalization correction flag: 1",
        "Random correction flag: 1", "TOF information flag: 1", "TOF resolution (ps): 300",
        "List TOF quantization bin size (ps): 20", "Scanner name: small-tof"])
    layout = read_listmode_layout(header, scanner)
    assert (layout.kind, layout.n_events, layout.tof) == ("castor", 4, True)
    assert layout.event_fields == ("attenuation", "randoms_rate", "normalisation")
    block = read_events(layout, 0, 4)
    np.testing.assert_array_equal(block.crystal2, [30, 31, 32, 33])
    np.testing.assert_allclose(block.multiplicative, [1.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(block.additive_rate, [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(block.tof_mm, np.array([100, -100, 0, 50]) * 0.299792458 / 2,
                               rtol=1e-6)
    assert window_events(layout, 0.015, 0.04) == (2, 4)


def test_castor_bad_inputs(tmp_path):
    scanner = load_scanner("small-test")
    dtype = np.dtype([("time_ms", "<u4"), ("crystal1", "<u4"), ("crystal2", "<u4")])
    records = np.zeros(3, dtype)
    header = write_castor(tmp_path, records, ["Duration (s): 1"])
    assert read_listmode_layout(header, scanner).n_events == 3
    with pytest.raises(InputError, match="pass --scanner"):
        read_listmode_layout(header)
    records[:2].tofile(tmp_path / "scan.cdf")
    with pytest.raises(InputError, match="3 events of 12 bytes"):
        read_listmode_layout(header, scanner)
    cases = [(["Duration (s): 1", "Data mode: histogram"], "expected 'list-mode'"),
             (["Maximum number of lines per event: 2", "Duration (s): 1"], "multi-pair"),
             (["Duration (s): soon"], "is not a float"),
             ([], "missing key 'Duration \\(s\\):'"),
             (["Duration (s): 1", "TOF information flag: 2"], "expected 0 or 1")]
    for lines, message in cases:
        header = write_castor(tmp_path, records, lines)  # a key given twice: the last counts
        with pytest.raises(InputError, match=message):
            read_listmode_layout(header, scanner)


# ---------------------------------------------------------------- list-mode OSEM

def test_listmode_mlem_equals_sinogram_mlem(pet_case, tmp_path):
    sinogram, events = pet_case["listmode"]
    reference, reference_history = PetRecon(serial_run(), sinogram, tmp_path / "s.nii.gz",
                                            MLEM).compute()
    recon = ListModeRecon(serial_run(), events, tmp_path / "l.nii.gz", MLEM)
    image, history = recon.compute()
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=2e-5 * reference.max())
    np.testing.assert_allclose(history, reference_history, rtol=1e-6)


def test_tof_listmode_mlem_equals_tof_sinogram_mlem(tmp_path):
    from medhpc.phantoms.pet_files import write_pet_phantom

    scanner = tmp_path / "small-tof.toml"
    scanner.write_text(SMALL_TOF_SCANNER)
    write_pet_phantom(tmp_path / "phantom", str(scanner), shape=(7, 32, 32),
                      voxel_mm=(4.0, 4.0, 2.0))
    sinogram, events = simulate(tmp_path, "tof", counts=2e5, tof=True, scanner=str(scanner),
                                listmode=True)
    reference, _ = PetRecon(serial_run(), sinogram, tmp_path / "s.nii.gz", MLEM).compute()
    image, _ = ListModeRecon(serial_run(), events, tmp_path / "l.nii.gz", MLEM).compute()
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=2e-5 * reference.max())


def castor_copy(folder, events_path):
    """The medhpc events as CASToR list-mode data, with a header written by hand."""
    with h5py.File(events_path) as h5:
        dtype = np.dtype([("time_ms", "<u4"), ("crystal1", "<u4"), ("crystal2", "<u4")])
        records = np.zeros(h5["events/crystal1"].shape[0], dtype)
        for name in dtype.names:
            records[name] = h5[f"events/{name}"][...]
    return write_castor(folder, records, [f"Duration (s): {LISTMODE_DURATION_S:g}",
                                          "Scanner name: small-test"])


def test_castor_events_with_sinogram_factors_equal_medhpc_events(pet_case, tmp_path):
    sinogram, events = pet_case["listmode"]
    reference, _ = ListModeRecon(serial_run(), events, tmp_path / "l.nii.gz", MLEM).compute()
    header = castor_copy(tmp_path, events)
    recon = ListModeRecon(serial_run(), header, tmp_path / "c.nii.gz", MLEM, scanner="small-test",
                          factors=sinogram, image_shape=reference.shape,
                          voxel_size_mm=(4.0, 4.0, 2.0))
    image, _ = recon.compute()
    # the CASToR grid is centred on the scanner like the phantom's, so the images match
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=2e-5 * reference.max())


def read_listmode_file(path):
    with h5py.File(path) as h5:
        arrays = {name: h5[f"events/{name}"][...] for name in ("crystal1", "crystal2", "time_ms")}
        grid = ImageGeometry(tuple(h5.attrs["image_shape"]), np.asarray(h5.attrs["image_affine"]))
        return arrays, h5["multiplicative"][...], h5["additive"][...], grid


def test_a_time_window_is_the_acquisition_cut_to_it(pet_case, tmp_path):
    _, events = pet_case["listmode"]
    settings = ReconSettings(algorithm="osem", iterations=2, subsets=2)
    half = LISTMODE_DURATION_S / 2
    recon = ListModeRecon(serial_run(), events, tmp_path / "w.nii.gz", settings,
                          time_windows=f"0:{half:g},{half:g}:{LISTMODE_DURATION_S:g}")
    frames, histories = recon.compute()
    assert frames.shape[0] == 2 and len(histories) == 2
    counts = [np.subtract(*window_events(recon.layout, *w)[::-1]) for w in recon.windows]
    assert sum(counts) == recon.layout.n_events and min(counts) > 0.4 * recon.layout.n_events
    # the first window alone: its events, half the time, half the additive counts
    arrays, multiplicative, additive, grid = read_listmode_file(events)
    early = arrays["time_ms"] < half * 1000
    cut = tmp_path / "first_half.h5"
    write_listmode(cut, load_scanner("small-test"), grid,
                   {name: values[early] for name, values in arrays.items()}, half,
                   multiplicative, additive / 2)
    alone, _ = ListModeRecon(serial_run(), cut, tmp_path / "c.nii.gz", settings).compute()
    np.testing.assert_allclose(frames[0], alone, rtol=1e-5, atol=1e-6 * alone.max())


def test_events_outside_the_sinogram_are_skipped_with_a_notice(pet_case, tmp_path, caplog):
    _, events = pet_case["listmode"]
    scanner = load_scanner("small-test")
    arrays, multiplicative, additive, grid = read_listmode_file(events)
    arrays["crystal2"][:5] = arrays["crystal1"][:5]  # same crystal: no LOR
    path = tmp_path / "odd.h5"
    write_listmode(path, scanner, grid, arrays, LISTMODE_DURATION_S, multiplicative, additive)
    recon = ListModeRecon(serial_run(), path, tmp_path / "o.nii.gz", MLEM)
    shares = recon.event_shares(0, recon.layout.n_events, LISTMODE_DURATION_S)
    assert sum(share.n_values for share in shares) == recon.layout.n_events - 5


def test_a_mu_map_gives_the_attenuation_of_events_and_sensitivity(pet_case, tmp_path):
    _, events = pet_case["listmode"]
    reference, _ = ListModeRecon(serial_run(), events, tmp_path / "l.nii.gz", MLEM).compute()
    mu_map = pet_case["folder"] / "phantom" / "mu_map.nii.gz"
    image, _ = ListModeRecon(serial_run(), events, tmp_path / "m.nii.gz", MLEM,
                             mu_map=str(mu_map)).compute()
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=2e-5 * reference.max())
    arrays, multiplicative, additive, grid = read_listmode_file(events)
    bare = tmp_path / "bare.h5"  # factors without their normalisation part
    write_listmode(bare, load_scanner("small-test"), grid, arrays, LISTMODE_DURATION_S,
                   multiplicative, additive)
    with pytest.raises(InputError, match="no 'normalisation'"):
        ListModeRecon(serial_run(), bare, tmp_path / "b.nii.gz", MLEM, mu_map=str(mu_map))


def test_list_mode_refuses_nmf(pet_case, tmp_path):
    _, events = pet_case["listmode"]
    with pytest.raises(InputError, match="--algorithm nmf models dynamic sinograms"):
        ListModeRecon(serial_run(), events, tmp_path / "n.nii.gz",
                      ReconSettings(algorithm="nmf"))


def test_events_with_span3_factors_equal_the_same_factors_per_ring_pair(pet_case, span_case,
                                                                        tmp_path):
    """Span > 1: each event takes its plane's multiplicative factor and an equal share of the
    plane's additive counts; the sensitivity repeats a plane's factor to its ring pairs. So
    span-3 factors give the image that span-1 factors holding those values per ring pair do."""
    import shutil

    from medhpc.pet.scanner import plane_members, ring_pair_to_plane

    folder = pet_case["folder"]
    span1, span3 = (load_scanner(str(folder / f"span{n}.toml")) for n in (1, 3))
    sinogram1, events1 = simulate(folder, "span1_events", counts=2e5,
                                  scanner=str(folder / "span1.toml"), listmode=True)
    # span-1 factors that repeat the span-3 file's per plane (additive split over the pairs)
    pairs1 = plane_members(span1)[0]
    plane3 = ring_pair_to_plane(span3)[pairs1[:, 0], pairs1[:, 1]]
    members3 = np.diff(plane_members(span3)[1])[plane3]
    factors1 = tmp_path / "factors1.h5"
    shutil.copy(sinogram1, factors1)
    with h5py.File(span_case["span3"], "r") as h5:
        multiplicative3, additive3 = h5["multiplicative"][...], h5["additive"][...]
    with h5py.File(factors1, "r+") as h5:
        h5["multiplicative"][...] = multiplicative3[:, :, plane3]
        h5["additive"][...] = additive3[:, :, plane3] / members3
    # the same events on the span-3 scanner
    with h5py.File(events1, "r") as h5:
        events = {name: h5[f"events/{name}"][...] for name in ("crystal1", "crystal2", "time_ms")}
        grid = ImageGeometry(tuple(h5.attrs["image_shape"]), np.asarray(h5.attrs["image_affine"]))
    events3 = tmp_path / "span3.listmode.h5"
    write_listmode(events3, span3, grid, events, LISTMODE_DURATION_S)
    reference, _ = ListModeRecon(serial_run(), events1, tmp_path / "a.nii.gz", MLEM,
                                 factors=factors1).compute()
    image, _ = ListModeRecon(serial_run(), events3, tmp_path / "b.nii.gz", MLEM,
                             factors=span_case["span3"]).compute()
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=2e-5 * reference.max())
