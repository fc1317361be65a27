"""TOF timing calibration: the file, each LOR's kernel, and reconstructions that use it."""

import h5py
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from medhpc.pet.run_listmode import ListModeRecon
from medhpc.pet.scanner import FWHM_PER_SIGMA, crystal_positions, load_scanner, lor_endpoints
from medhpc.pet.timing import (MM_PER_PS, OFFSET_DATASET, RESOLUTION_DATASET,
                               read_timing_calibration, sinogram_kernels,
                               write_timing_calibration)
from medhpc.phantoms.pet_files import write_pet_phantom
from tests.pet.conftest import SMALL_TOF_SCANNER, serial_run, simulate
from tests.pet.test_run import nrmse

MLEM = ReconSettings(algorithm="mlem", iterations=4, psf_fwhm_mm=0.0)
OSEM = ReconSettings(algorithm="osem", iterations=4, subsets=4, psf_fwhm_mm=0.0)


@pytest.fixture(scope="module")
def tof_scanner(tmp_path_factory):
    path = tmp_path_factory.mktemp("timing") / "small-tof.toml"
    path.write_text(SMALL_TOF_SCANNER)
    return path, load_scanner(str(path))


def crystal_table(scanner, values):
    """Per-crystal values [rings, crystals per ring] from a function of the crystal centres."""
    centres = crystal_positions(scanner).transpose(1, 0, 2)  # [ring, crystal, xyz]
    return values(centres)


def test_sinogram_kernels_follow_the_lor_end_points(tof_scanner, tmp_path):
    path, scanner = tof_scanner
    # offset linear in the crystal position: each LOR's kernel offset is then known from its
    # end points alone, whatever the crystal order
    offset = crystal_table(scanner, lambda c: 0.5 * c[..., 0] + 3.0 * c[..., 2])
    resolution = crystal_table(scanner, lambda c: 250.0 + 0.4 * c[..., 1])
    write_timing_calibration(tmp_path / "t.h5", offset, resolution)
    timing = read_timing_calibration(tmp_path / "t.h5", scanner)
    views = np.array([3, 17])
    kernels = sinogram_kernels(timing, scanner, views=views)
    xstart, xend = (p.reshape(-1, 3).astype(np.float64)
                    for p in lor_endpoints(scanner, views=views))
    expected_offset = MM_PER_PS * (0.5 * (xstart[:, 0] - xend[:, 0])
                                   + 3.0 * (xstart[:, 2] - xend[:, 2]))
    np.testing.assert_allclose(kernels.offset_mm, expected_offset, rtol=1e-4, atol=1e-3)
    resolution_ps = np.sqrt(0.5 * ((250 + 0.4 * xstart[:, 1]) ** 2
                                   + (250 + 0.4 * xend[:, 1]) ** 2))
    np.testing.assert_allclose(kernels.sigma_mm, MM_PER_PS * resolution_ps / FWHM_PER_SIGMA,
                               rtol=1e-4)


def test_without_resolutions_every_lor_has_the_scanners(tof_scanner, tmp_path):
    _, scanner = tof_scanner
    write_timing_calibration(tmp_path / "t.h5", np.zeros((scanner.rings,
                                                          scanner.crystals_per_ring)))
    kernels = sinogram_kernels(read_timing_calibration(tmp_path / "t.h5", scanner), scanner,
                               views=[0])
    np.testing.assert_allclose(kernels.sigma_mm, scanner.tof_sigma_mm, rtol=1e-6)
    assert not np.any(kernels.offset_mm)


def bad_file(path, name=OFFSET_DATASET, shape=(4, 48), value=0.0, extra=None):
    with h5py.File(path, "w") as h5:
        if name is not None:
            h5.create_dataset(name, data=np.full(shape, value))
        for key, data in (extra or {}).items():
            h5.create_dataset(key, data=data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.h5", "file not found"),
    (lambda p: bad_file(p / "b.h5", name="offsets"), "no dataset 'crystal_time_offset_ps'"),
    (lambda p: bad_file(p / "b.h5", shape=(48, 4)), "shape (48, 4); expected"),
    (lambda p: bad_file(p / "b.h5", value=np.nan), "non-finite"),
    (lambda p: bad_file(p / "b.h5", value=2e4), "expected picoseconds"),
    (lambda p: bad_file(p / "b.h5", extra={RESOLUTION_DATASET: np.zeros((4, 48))}),
     "values <= 0"),
])
def test_bad_calibration_files_get_one_line(tof_scanner, tmp_path, make, message):
    _, scanner = tof_scanner
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        read_timing_calibration(path, scanner)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_calibration_for_non_tof_data_is_refused(tmp_path):
    scanner = load_scanner("small-test")
    path = bad_file(tmp_path / "t.h5", shape=(scanner.rings, scanner.crystals_per_ring))
    with pytest.raises(InputError, match="have no TOF"):
        read_timing_calibration(path, scanner)


@pytest.fixture(scope="module")
def miscalibrated(tof_scanner, tmp_path_factory):
    """Noise-free TOF data of a scanner whose crystal clocks are off by up to +-150 ps (the
    pair offsets reach 300 ps = 45 mm, against a 300 ps CTR), and resolutions of 250-400 ps."""
    path, scanner = tof_scanner
    folder = tmp_path_factory.mktemp("miscalibrated")
    write_pet_phantom(folder / "phantom", str(path), shape=(7, 32, 32), voxel_mm=(4.0, 4.0, 2.0))
    rng = np.random.default_rng(4)
    shape = (scanner.rings, scanner.crystals_per_ring)
    calibration = folder / "timing.h5"
    write_timing_calibration(calibration, rng.uniform(-150, 150, shape),
                             rng.uniform(250, 400, shape))
    timing = read_timing_calibration(calibration, scanner)
    sinogram, events = simulate(folder, "tof", counts=4e5, tof=True, scanner=str(path),
                                listmode=True, timing=timing)
    noise_free = simulate(folder, "tof_noise_free", noise=False, tof=True, scanner=str(path),
                          timing=timing)
    from medhpc.io.images import read_image

    truth, _ = read_image(folder / "phantom" / "activity.nii.gz")
    return {"folder": folder, "calibration": calibration, "sinogram": sinogram,
            "events": events, "noise_free": noise_free, "truth": truth}


def test_the_calibration_brings_back_what_a_miscalibrated_scanner_blurs(miscalibrated):
    folder, truth = miscalibrated["folder"], miscalibrated["truth"]
    nominal, _ = PetRecon(serial_run(), miscalibrated["noise_free"], folder / "n.nii.gz",
                          OSEM).compute()
    calibrated, _ = PetRecon(serial_run(), miscalibrated["noise_free"], folder / "c.nii.gz",
                             OSEM, tof_calibration=miscalibrated["calibration"]).compute()
    error_nominal, error_calibrated = nrmse(nominal, truth[0]), nrmse(calibrated, truth[0])
    assert error_calibrated < 0.85 * error_nominal, (error_calibrated, error_nominal)


def test_calibrated_listmode_equals_the_calibrated_sinogram(miscalibrated):
    folder, calibration = miscalibrated["folder"], miscalibrated["calibration"]
    reference, _ = PetRecon(serial_run(), miscalibrated["sinogram"], folder / "s.nii.gz",
                            MLEM, tof_calibration=calibration).compute()
    image, _ = ListModeRecon(serial_run(), miscalibrated["events"], folder / "l.nii.gz", MLEM,
                             tof_calibration=calibration).compute()
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=2e-5 * reference.max())
    nominal, _ = ListModeRecon(serial_run(), miscalibrated["events"], folder / "l0.nii.gz",
                               MLEM).compute()
    assert np.abs(nominal - reference).max() > 0.05 * reference.max()


def test_planes_decomposition_refuses_a_calibration(miscalibrated):
    with pytest.raises(InputError, match="use --decomp views"):
        PetRecon(serial_run(), miscalibrated["noise_free"], miscalibrated["folder"] / "p.nii.gz",
                 MLEM, decomp="planes", tof_calibration=miscalibrated["calibration"])


@pytest.mark.mpi
@pytest.mark.parametrize("source", ["sinogram", "events"])
def test_calibrated_reconstruction_over_the_ranks_equals_one_rank(miscalibrated, source):
    from medhpc.parallel.comm import get_world
    from medhpc.runtime.context import start_run

    world = get_world()
    recon = PetRecon if source == "sinogram" else ListModeRecon
    data = miscalibrated[source]
    folder, calibration = miscalibrated["folder"], miscalibrated["calibration"]
    run = start_run("pet-recon", device="cpu", verbosity=-1, world=world)
    image, history = recon(run, data, folder / f"{source}-mpi.nii.gz", OSEM,
                           tof_calibration=calibration).compute()
    reference, reference_history = recon(serial_run(), data, folder / f"{source}-1.nii.gz",
                                         OSEM, tof_calibration=calibration).compute()
    np.testing.assert_allclose(image, reference, rtol=2e-4, atol=2e-5 * reference.max())
    np.testing.assert_allclose(np.ravel(history), np.ravel(reference_history), rtol=1e-5)


def test_the_plan_and_the_log_name_the_calibration(miscalibrated):
    folder, calibration = miscalibrated["folder"], miscalibrated["calibration"]
    recon = PetRecon(serial_run(), miscalibrated["noise_free"], folder / "logged.nii.gz",
                     ReconSettings(iterations=1, subsets=2), tof_calibration=calibration)
    assert recon.plan()["tof_calibration"] == str(calibration)
    listmode = ListModeRecon(serial_run(), miscalibrated["events"], folder / "lm.nii.gz",
                             ReconSettings(iterations=1, subsets=2), tof_calibration=calibration)
    assert listmode.plan()["tof_calibration"] == str(calibration)
    recon.execute()
    import json

    log = json.loads((folder / "logged.json").read_text())
    assert log["tof_calibration"] == str(calibration)

