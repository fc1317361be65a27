"""The sinogram file: layout checks and block reads equal in-memory indexing."""

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.pet.scanner import load_scanner
from medhpc.pet.sinogram import read_block, read_layout, write_sinogram


@pytest.fixture(scope="module")
def dynamic_sinogram(tmp_path_factory):
    scanner = load_scanner("small-test")
    rng = np.random.default_rng(0)
    shape = scanner.sinogram_shape[:3]
    prompts = rng.random(shape + (3,), dtype=np.float32)
    additive = rng.random(shape + (3,), dtype=np.float32)
    multiplicative = rng.random(shape, dtype=np.float32)
    path = tmp_path_factory.mktemp("sino") / "dynamic.h5"
    write_sinogram(path, scanner, ImageGeometry.from_spacing((15, 40, 40), (4, 4, 2)), prompts,
                   multiplicative, additive, frames=3)
    return path, prompts, multiplicative, additive


@pytest.mark.parametrize("views, planes", [
    (None, None),
    (np.array([0, 5, 6, 47]), None),
    (None, np.array([1, 2, 17, 40, 63])),
    (np.arange(3, 48, 8), np.arange(0, 64, 7)),
    (np.array([], dtype=np.int64), None),
])
def test_block_reads_equal_in_memory_indexing(dynamic_sinogram, views, planes):
    path, prompts, multiplicative, additive = dynamic_sinogram
    layout = read_layout(path)
    assert layout.frames == 3 and layout.prompts_shape == prompts.shape
    v = np.arange(48) if views is None else views
    p = np.arange(64) if planes is None else planes
    for frame in range(3):
        block = read_block(layout, views=views, planes=planes, frame=frame)
        np.testing.assert_array_equal(block.prompts, prompts[:, v][:, :, p][..., frame])
        np.testing.assert_array_equal(block.additive, additive[:, v][:, :, p][..., frame])
        np.testing.assert_array_equal(block.multiplicative, multiplicative[:, v][:, :, p])


def test_layout_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_layout(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_layout(tmp_path / "text.h5")
