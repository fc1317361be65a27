"""CUDA Joseph kernels: PTX compilation without a GPU, and agreement with the CPU twins.

The agreement tests run in the simulator pass::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/pet/test_kernels_cuda.py
"""

import numpy as np
import pytest

from medhpc import backend
from medhpc.backend import cuda_simulator_active
from medhpc.pet.projector import JosephProjector, LorTofKernels, TofSpec

COMPUTE_CAPABILITIES = [(7, 5), (9, 0)]
KERNEL_NAMES = ["joseph_forward", "joseph_back", "joseph_forward_tof", "joseph_back_tof",
                "joseph_back_tof_summed", "sum_members", "repeat_members"]

SHAPE = (5, 7, 6)  # (nz, ny, nx)
ORIGIN_MM = np.array([-5.0, -4.5, -3.0], dtype=np.float32)
VOXEL_MM = np.array([2.0, 1.5, 1.25], dtype=np.float32)
TOF_ARGS = (3.0, 2.5, 3.0)  # bin_mm, sigma_mm, cutoff_sigmas
TOF_BINS = 9


def kernel_tof_args(rng, n_lors, per_lor):
    """TOF launch arguments (bin_mm, sigma_mm, offset_mm, cutoff): one kernel for all LORs,
    or each LOR its own width and centre offset."""
    bin_mm, sigma_mm, cutoff = TOF_ARGS
    if not per_lor:
        return bin_mm, np.array([sigma_mm], np.float32), np.zeros(1, np.float32), cutoff
    sigma = (sigma_mm * rng.uniform(0.7, 1.4, n_lors)).astype(np.float32)
    offset = rng.uniform(-4.0, 4.0, n_lors).astype(np.float32)
    return bin_mm, sigma, offset, cutoff


def kernels_cuda():
    try:
        from medhpc.pet import kernels_cuda as module
    except ImportError as error:  # numba-cuda missing
        pytest.skip(f"numba.cuda is not importable: {error}")
    return module


@pytest.mark.skipif(cuda_simulator_active(), reason="the CUDA simulator cannot compile PTX")
@pytest.mark.parametrize("cc", COMPUTE_CAPABILITIES, ids=lambda cc: f"cc{cc[0]}{cc[1]}")
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_compiles_to_ptx(name, cc):
    module = kernels_cuda()
    from numba import cuda
    from numba.cuda.cudadrv.error import CCSupportError

    assert set(module.PTX_SIGNATURES) == set(KERNEL_NAMES)
    pyfunc, signature = module.PTX_SIGNATURES[name]
    try:
        ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=cc)
    except CCSupportError as error:
        pytest.skip(f"compute capability {cc} unsupported by the installed toolkit: {error}")
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".f64" not in ptx  # float32 throughout: fast on every GPU


def tiny_lors(rng, n_random=44):
    """Random oblique LORs plus axis-parallel, missing and grazing ones."""
    low = ORIGIN_MM - 0.5 * VOXEL_MM
    high = low + np.array(SHAPE[::-1]) * VOXEL_MM
    centre = 0.5 * (low + high)
    points = low + rng.random((n_random, 3)) * (high - low) * 1.2 - 0.1 * (high - low)
    direction = rng.normal(size=(n_random, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    starts = [points - 30 * direction]
    ends = [points + 30 * direction]
    for axis in range(3):
        offset = np.array([0.3, -0.4, 0.2])
        offset[axis] = 30.0
        starts.append([centre - offset]), ends.append([centre + offset])
    starts.append([[high[0] - 30, high[1], high[2] - 0.2]])  # on the top y face
    ends.append([[high[0] + 30, high[1], high[2] - 0.2]])
    starts.append([centre + [0, 40, 0]]), ends.append([centre + [10, 40, 3]])  # misses
    return (np.vstack(starts).astype(np.float32), np.vstack(ends).astype(np.float32))


def assert_close(actual, expected):
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.cudasim
@pytest.mark.parametrize("tof, per_lor", [(False, False), (True, False), (True, True)],
                         ids=["nontof", "tof", "tof-per-lor"])
def test_launchers_match_cpu_twins(tof, per_lor):
    from numba import cuda

    from medhpc.pet import kernels_cpu

    module = kernels_cuda()
    rng = np.random.default_rng(7)
    xstart, xend = tiny_lors(rng)
    n = xstart.shape[0]
    image = rng.random(SHAPE, dtype=np.float32)
    out_shape = (n, TOF_BINS) if tof else (n,)
    values = rng.random(out_shape, dtype=np.float32)
    tof_args = kernel_tof_args(rng, n, per_lor) if tof else ()
    suffix = "_tof" if tof else ""
    d_xstart, d_xend = cuda.to_device(xstart), cuda.to_device(xend)
    d_origin, d_voxel = cuda.to_device(ORIGIN_MM), cuda.to_device(VOXEL_MM)

    expected = np.zeros(out_shape, dtype=np.float32)
    getattr(kernels_cpu, "joseph_forward" + suffix)(image, xstart, xend, ORIGIN_MM, VOXEL_MM,
                                                    *tof_args, expected)
    d_out = cuda.to_device(np.full(out_shape, np.nan, dtype=np.float32))
    getattr(module, "joseph_forward" + suffix)(cuda.to_device(image), d_xstart, d_xend,
                                               d_origin, d_voxel, *tof_args, d_out)
    assert_close(d_out.copy_to_host(), expected)

    expected_image = np.ones(SHAPE, dtype=np.float32)
    getattr(kernels_cpu, "joseph_back" + suffix)(values, xstart, xend, ORIGIN_MM, VOXEL_MM,
                                                 *tof_args, expected_image)
    d_image = cuda.to_device(np.ones(SHAPE, dtype=np.float32))
    getattr(module, "joseph_back" + suffix)(cuda.to_device(values), d_xstart, d_xend,
                                            d_origin, d_voxel, *tof_args, d_image)
    assert_close(d_image.copy_to_host(), expected_image)


@pytest.mark.cudasim
@pytest.mark.parametrize("per_lor", [False, True], ids=["shared", "per-lor"])
def test_summed_tof_back_projection_matches_its_cpu_twin(per_lor):
    from numba import cuda

    from medhpc.pet import kernels_cpu

    module = kernels_cuda()
    rng = np.random.default_rng(11)
    xstart, xend = tiny_lors(rng)
    values = rng.random(xstart.shape[0], dtype=np.float32)
    tof_args = kernel_tof_args(rng, xstart.shape[0], per_lor)
    expected = np.ones(SHAPE, dtype=np.float32)
    kernels_cpu.joseph_back_tof_summed(values, xstart, xend, ORIGIN_MM, VOXEL_MM, TOF_BINS,
                                       *tof_args, expected)
    d_image = cuda.to_device(np.ones(SHAPE, dtype=np.float32))
    module.joseph_back_tof_summed(cuda.to_device(values), cuda.to_device(xstart),
                                  cuda.to_device(xend), cuda.to_device(ORIGIN_MM),
                                  cuda.to_device(VOXEL_MM), TOF_BINS, *tof_args, d_image)
    assert_close(d_image.copy_to_host(), expected)
    projector = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, device="cuda",
                                tof=TofSpec(TOF_BINS, *TOF_ARGS), chunk_lors=20,
                                tof_kernels=LorTofKernels(tof_args[1], tof_args[2]))
    assert_close(projector.back_every_bin(values), expected - 1.0)


@pytest.mark.cudasim
def test_member_sum_and_repeat_match_their_cpu_twins():
    from numba import cuda

    from medhpc.pet import kernels_cpu

    module = kernels_cuda()
    rng = np.random.default_rng(12)
    first = np.array([0, 1, 3, 4, 7], np.int64)
    plane_of = np.repeat(np.arange(4), np.diff(first))
    members = rng.random((3, 7, 2), dtype=np.float32)
    planes = rng.random((3, 4, 2), dtype=np.float32)
    summed, repeated = np.empty_like(planes), np.empty_like(members)
    kernels_cpu.sum_members(members, first, summed)
    kernels_cpu.repeat_members(planes, plane_of, repeated)
    np.testing.assert_allclose(summed, np.add.reduceat(members, first[:-1], axis=1), rtol=1e-6)
    assert np.array_equal(repeated, planes[:, plane_of])
    d_summed = cuda.to_device(np.full_like(planes, np.nan))
    d_repeated = cuda.to_device(np.full_like(members, np.nan))
    module.sum_members(cuda.to_device(members), cuda.to_device(first), d_summed)
    module.repeat_members(cuda.to_device(planes), cuda.to_device(plane_of), d_repeated)
    assert_close(d_summed.copy_to_host(), summed)
    assert np.array_equal(d_repeated.copy_to_host(), repeated)


@pytest.mark.cudasim
def test_cuda_span3_projector_matches_cpu_on_device_arrays():
    import dataclasses

    from numba import cuda

    from medhpc.pet.projector import sinogram_projector
    from medhpc.pet.scanner import load_scanner

    scanner = dataclasses.replace(load_scanner("small-test"), rings=3, max_ring_difference=1,
                                  span=3, crystals_per_ring=16, radial_trim=4,
                                  crystal_size_mm=2.0, radius_mm=12.0)
    shape, voxel = (5, 7, 6), np.array([2.0, 2.0, 2.0], np.float32)
    origin = -0.5 * (np.array(shape[::-1]) - 1) * voxel
    cpu = sinogram_projector(scanner, shape, origin, voxel, views=[0, 3])
    gpu = sinogram_projector(scanner, shape, origin, voxel, views=[0, 3], device="cuda")
    image = np.random.default_rng(5).random(shape, dtype=np.float32)
    projection = gpu.forward(cuda.to_device(image))
    assert backend.is_device_array(projection)
    assert_close(projection.copy_to_host(), cpu.forward(image))
    values = cpu.forward(image)
    back = gpu.back(cuda.to_device(values))
    assert backend.is_device_array(back)
    assert_close(back.copy_to_host(), cpu.back(values))


@pytest.mark.cudasim
@pytest.mark.parametrize("tof", [None, TofSpec(TOF_BINS, *TOF_ARGS)], ids=["nontof", "tof"])
def test_cuda_projector_matches_cpu_projector(tof):
    rng = np.random.default_rng(8)
    xstart, xend = tiny_lors(rng)
    cpu = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=tof)
    gpu = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, device="cuda", tof=tof,
                          chunk_lors=20)
    image = rng.random(SHAPE, dtype=np.float32)
    values = rng.random(cpu.shape_out, dtype=np.float32)
    assert_close(gpu.forward(image), cpu.forward(image))
    assert_close(gpu.back(values), cpu.back(values))
    assert gpu.adjointness_error(rng) < 1e-5
    resident = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, device="cuda", tof=tof)
    for _ in range(2):  # the second call reuses the end points kept on the device
        assert_close(resident.forward(image), cpu.forward(image))


@pytest.mark.cudasim
def test_end_points_stay_on_the_gpu_in_chunks_while_the_card_has_room(monkeypatch):
    from medhpc import backend
    from medhpc.pet import projector as projector_module

    rng = np.random.default_rng(12)
    xstart, xend = tiny_lors(rng)
    tof = TofSpec(TOF_BINS, *TOF_ARGS)
    cpu = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=tof)
    uploads = []
    original = backend.to_device
    monkeypatch.setattr(projector_module.backend, "to_device",
                        lambda array, device: uploads.append(array.shape) or
                        original(array, device))
    for room in (None, 1):  # every chunk fits; room for one chunk only
        if room is not None:
            monkeypatch.setattr(JosephProjector, "_room_for",
                                staticmethod(lambda chunk, kept=[]: kept.append(1) or
                                             len(kept) <= room))
        gpu = JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, device="cuda",
                              tof=tof, chunk_lors=7)
        chunks = -(-gpu.n_lors // 7)
        image = rng.random(SHAPE, dtype=np.float32)
        from numba import cuda

        device_image = cuda.to_device(image)
        uploads.clear()
        first = gpu.forward(device_image)
        assert len(uploads) == 4 * chunks  # end points and TOF kernel widths/offsets, once
        uploads.clear()
        second = gpu.forward(device_image)
        assert len(uploads) == (0 if room is None else 4 * (chunks - room))
        assert_close(second.copy_to_host(), first.copy_to_host())
        assert_close(second.copy_to_host(), cpu.forward(image))
