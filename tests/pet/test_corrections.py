"""Corrections given as separate files replace the sinogram file's, in any image format."""

import h5py
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.images import read_image, write_image
from medhpc.pet.corrections import CorrectionFiles
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from tests.pet.conftest import serial_run

SETTINGS = ReconSettings(iterations=1, subsets=4)


def reconstruct(sinogram, tmp_path, decomp="views", **files):
    recon = PetRecon(serial_run(), sinogram, tmp_path / "x.nii.gz", SETTINGS, decomp=decomp,
                     corrections=CorrectionFiles(**files))
    return recon.compute()[0]


def stored(sinogram, tmp_path, name):
    path = tmp_path / f"{name}.h5"
    with h5py.File(sinogram) as source, h5py.File(path, "w") as target:
        target[name] = source[name][...]
    return str(path)


@pytest.mark.parametrize("decomp", ["views", "planes"])
def test_files_holding_the_stored_factors_reproduce_the_reconstruction(pet_case, tmp_path,
                                                                       decomp):
    sinogram = pet_case["noisy"]
    reference = reconstruct(sinogram, tmp_path, decomp)
    mu, grid = read_image(pet_case["folder"] / "phantom" / "mu_map.nii.gz")
    write_image(tmp_path / "mu.hv", mu, grid)  # an Interfile mu-map
    image = reconstruct(sinogram, tmp_path, decomp, mu_map=str(tmp_path / "mu.hv"),
                        norm=stored(sinogram, tmp_path, "normalisation"),
                        randoms=f"{stored(sinogram, tmp_path, 'additive')}:/additive")
    np.testing.assert_allclose(image, reference, rtol=1e-4, atol=1e-5 * reference.max())


def test_a_mu_map_of_air_leaves_the_image_uncorrected(pet_case, tmp_path):
    sinogram = pet_case["noisy"]
    reference = reconstruct(sinogram, tmp_path)
    mu, grid = read_image(pet_case["folder"] / "phantom" / "mu_map.nii.gz")
    write_image(tmp_path / "air.nii.gz", np.zeros_like(mu), grid)
    image = reconstruct(sinogram, tmp_path, mu_map=str(tmp_path / "air.nii.gz"))
    body = pet_case["truth"] > 0
    assert image[body].mean() < 0.8 * reference[body].mean()  # attenuation not undone


def test_bad_correction_files_are_one_line(pet_case, tmp_path):
    sinogram = pet_case["noisy"]
    with h5py.File(tmp_path / "short.h5", "w") as h5:
        h5["norm"] = np.ones((3, 4, 5), np.float32)
    with pytest.raises(InputError, match=r"short.h5:norm: --norm has shape \(3, 4, 5\)"):
        reconstruct(sinogram, tmp_path, norm=str(tmp_path / "short.h5"))
    with h5py.File(tmp_path / "two.h5", "w") as h5:
        h5["a"] = h5["b"] = np.ones(3)
    with pytest.raises(InputError, match="holds 2 datasets"):
        reconstruct(sinogram, tmp_path, scatter=str(tmp_path / "two.h5"))
    mu, grid = read_image(pet_case["folder"] / "phantom" / "mu_map.nii.gz")
    write_image(tmp_path / "hu.nii.gz", mu * 1e5, grid)
    with pytest.raises(InputError, match="looks like 1/cm or HU"):
        reconstruct(sinogram, tmp_path, mu_map=str(tmp_path / "hu.nii.gz"))
    with pytest.raises(InputError, match="--randoms file not found"):
        reconstruct(sinogram, tmp_path, randoms=str(tmp_path / "none.h5"))
