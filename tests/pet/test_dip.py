"""Deep-image-prior reconstruction: the network fitted through the projector."""

import dataclasses

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.nifti import write_nifti
from medhpc.pet.dip import network_layout
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from tests.pet.conftest import serial_run

pytest.importorskip("torch")

SMALL = ReconSettings(algorithm="dip", iterations=3, subsets=2, dip_widths=(4, 8))


def test_strides_halve_only_the_axes_that_stay_long_enough():
    layout = network_layout((1, 40, 40), (4, 8, 16))
    assert layout.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2))
    assert layout.kernels[0] == (1, 3, 3) and layout.divisor == (1, 4, 4)


def test_the_fitted_image_raises_the_likelihood_and_stays_in_the_support(pet_case, tmp_path):
    recon = PetRecon(serial_run(), pet_case["noisy"], tmp_path / "d.nii.gz", SMALL)
    image, history = recon.compute()
    assert image.shape == pet_case["truth"].shape and image.min() >= 0
    assert len(history) == 6 and history[-1] > history[0]
    assert np.all(image[:, ~recon.support] == 0)
    again, _ = PetRecon(serial_run(), pet_case["noisy"], tmp_path / "e.nii.gz", SMALL).compute()
    np.testing.assert_array_equal(again, image)  # seeded: the same run twice


def test_an_anatomical_prior_is_the_network_input(pet_case, tmp_path):
    prior = tmp_path / "prior.nii.gz"
    write_nifti(prior, pet_case["truth"] > 0, pet_case["grid"])
    with_prior, _ = PetRecon(serial_run(), pet_case["noisy"], tmp_path / "p.nii.gz", SMALL,
                             prior=prior).compute()
    from_noise, _ = PetRecon(serial_run(), pet_case["noisy"], tmp_path / "n.nii.gz",
                             SMALL).compute()
    assert with_prior.min() >= 0 and not np.allclose(with_prior, from_noise)


def test_dip_inputs_are_checked_before_any_compute(pet_case, tmp_path):
    with pytest.raises(InputError, match="--decomp views"):
        PetRecon(serial_run(), pet_case["noisy"], tmp_path / "x.nii.gz", SMALL, decomp="planes")
    with pytest.raises(InputError, match="does not checkpoint"):
        PetRecon(serial_run(), pet_case["noisy"], tmp_path / "x.nii.gz", SMALL, resume=True)
    prior = tmp_path / "small.nii.gz"
    from medhpc.io.geometry import ImageGeometry

    write_nifti(prior, np.ones((3, 4, 5), np.float32), ImageGeometry.from_spacing(
        (3, 4, 5), (1.0, 1.0, 1.0)))
    with pytest.raises(InputError, match="expected the output grid"):
        PetRecon(serial_run(), pet_case["noisy"], tmp_path / "x.nii.gz", SMALL, prior=prior)
    osem = dataclasses.replace(SMALL, algorithm="osem")
    with pytest.raises(InputError, match="network input of --algorithm dip"):
        PetRecon(serial_run(), pet_case["noisy"], tmp_path / "x.nii.gz", osem, prior=prior)
