"""Small CT phantoms and their prepared datasets, shared by the ct tests."""

import pytest

from medhpc.phantoms.ct import write_ct_phantom


def make_phantoms(folder, cases, shape, seed=0):
    write_ct_phantom(folder, cases, shape, seed=seed)
    return folder / "images", folder / "labels"


def prepare(images, labels, out, **options):
    from medhpc.ct.dataset import prepare_dataset
    from medhpc.runtime.context import start_run

    run = start_run("ct-prepare", device="cpu", threads=1, verbosity=-1)
    return prepare_dataset(run, images, labels, out, ["liver", "spleen", "kidneys"], **options)


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory):
    """Four 24x32x32 cases."""
    return make_phantoms(tmp_path_factory.mktemp("ct_tiny"), 4, (24, 32, 32))


@pytest.fixture(scope="session")
def tiny_dataset(tiny_phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_tiny_data") / "data.h5"
    prepare(*tiny_phantoms, out, clip_hu=(-1000.0, 1000.0))
    return out
