"""Planner and fingerprint: network layout from voxel spacing, target spacing, the low-res
configuration, and a plan that does not depend on the node computing it."""

from types import SimpleNamespace

import h5py
import json
import numpy as np
import pytest

from medhpc.ct.fingerprint import dataset_fingerprint, target_spacing
from medhpc.ct.planner import (CPU_WIDTHS, GPU_WIDTHS, MIN_FEATURE, NetworkLayout,
                               network_layout, parameter_count, plan_lowres, plan_training,
                               stage_layout)
from medhpc.io.geometry import ImageGeometry
from medhpc.io.nifti import read_nifti, write_nifti
from tests.ct.conftest import prepare

THICK = (2.5, 0.8, 0.8)  # z, y, x mm: thick slices


def test_thick_slices_pool_in_plane_first_and_get_flat_kernels():
    strides, kernels = stage_layout(THICK, (64, 192, 160))
    assert strides[0] == (1, 1, 1) and strides[1] == (1, 2, 2)
    assert kernels[0] == (1, 3, 3) and all(k == (3, 3, 3) for k in kernels[1:])
    assert all(s[0] == 2 for s in strides[2:-1])  # z pools once the voxels are near cubic
    layout = NetworkLayout((1,) * len(strides), strides, kernels)
    bottom = np.array((64, 192, 160)) / np.array(layout.divisor)
    assert np.all(bottom >= MIN_FEATURE) and np.all(bottom < 4 * MIN_FEATURE)
    assert 6 <= len(strides) <= 7


def test_given_widths_on_cubic_voxels_keep_the_isotropic_layout_of_older_models():
    assert network_layout((1.0, 1.0, 1.0), (16, 16, 16), (8, 16, 32, 64)) == \
        NetworkLayout.isotropic((8, 16, 32, 64))
    forced = network_layout(THICK, (8, 32, 32), (4, 8, 16, 32))
    assert forced.depth == 4 and forced.strides[1] == (1, 2, 2)


def test_a_gpu_plan_for_anisotropic_ct_has_nnunet_widths_and_divisible_patches():
    for budget in (8, 16, 32):
        plan = plan_training(None, 4, (200, 512, 512), budget, None, None, spacing_zyx=THICK)
        layout = plan.network
        assert plan.fits and plan.estimated_gb <= budget
        assert layout.widths[0] == 32 and max(layout.widths) == 320
        assert layout.strides[1] == (1, 2, 2) and 6 <= layout.depth <= 7
        assert all(p % d == 0 for p, d in zip(plan.patch, layout.divisor))
        extents = np.array(plan.patch) * THICK
        assert extents.max() <= 1.6 * extents.min(), (budget, plan.patch)
    cpu = plan_training(None, 4, (200, 512, 512), 4, False, None, spacing_zyx=THICK,
                        rule=CPU_WIDTHS)
    assert cpu.network.widths[0] == 8 and max(cpu.network.widths) == 64
    assert cpu.network.depth <= CPU_WIDTHS.max_stages


def test_the_unet_builds_a_planned_layout_with_the_counted_parameters():
    torch = pytest.importorskip("torch")
    from medhpc.ct.unet import UNet3D, UNetConfig

    layout = network_layout(THICK, (16, 48, 40), (4, 8, 16, 16))
    assert layout.strides[1] == (1, 2, 2)
    config = UNetConfig.from_layout(layout, 3, deep_supervision=True)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = UNet3D(config)
    assert sum(p.numel() for p in model.parameters()) == \
        parameter_count(layout, 3, deep_supervision=True)
    outputs = model(torch.randn(2, 1, 16, 48, 40))
    expected = [(2, 3) + tuple(int(n / np.prod([s[a] for s in layout.strides[:k + 1]]))
                               for a, n in enumerate((16, 48, 40)))
                for k in range(layout.depth - 1)]
    assert [tuple(o.shape) for o in outputs] == expected


def test_a_low_resolution_configuration_only_when_the_patch_sees_little_of_a_case():
    full = plan_training(None, 4, (200, 512, 512), 8, None, None, spacing_zyx=THICK)
    lowres = plan_lowres(full, 4, (200, 512, 512), THICK, 8)
    spacing_zyx = lowres["spacing_mm"][::-1]
    assert spacing_zyx[0] == pytest.approx(2.5) and spacing_zyx[1] > 1.5 * THICK[1]
    assert np.prod(lowres["plan"]["patch"]) >= 0.25 * np.prod(lowres["median_shape_zyx"])
    assert lowres["prepare"].startswith("ct-prepare --spacing-mm ")
    small = plan_training(None, 4, (64, 96, 96), 8, None, None)
    assert plan_lowres(small, 4, (64, 96, 96), (1, 1, 1), 8) is None


def test_target_spacing_is_the_median_except_on_a_thin_coarse_axis():
    iso = [(1.0, 0.8, 0.8), (1.2, 0.7, 0.7), (1.1, 0.9, 0.9)]
    assert target_spacing(iso, [(300, 512, 512)] * 3) == pytest.approx((1.1, 0.8, 0.8))
    thick = [(5.0, 0.8, 0.8)] * 6 + [(1.5, 0.8, 0.8)] * 3
    shapes = [(40, 512, 512)] * 6 + [(133, 512, 512)] * 3
    z = target_spacing(thick, shapes)[0]
    assert z == pytest.approx(np.percentile([s[0] for s in thick], 10))
    assert z < 5.0
    # many voxels along the coarse axis: not thin, the median stays
    assert target_spacing(thick, [(600, 512, 512)] * 9)[0] == pytest.approx(5.0)


def test_fingerprint_counts_classes_and_keeps_each_source_grid():
    entries = [{"name": "a", "spacing_zyx": [2.0, 1.0, 1.0], "shape_zyx": [10, 20, 20],
                "class_voxels": [90, 10, 0]},
               {"name": "b", "spacing_zyx": [3.0, 1.0, 1.0], "shape_zyx": [12, 20, 20],
                "class_voxels": [80, 15, 5]}]
    fingerprint = dataset_fingerprint(entries, ["liver", "spleen"], {"mean": 0.0})
    assert fingerprint["class_fraction"] == pytest.approx({"liver": 25 / 200, "spleen": 5 / 200})
    assert fingerprint["cases_with_class"] == {"liver": 2, "spleen": 1}
    assert fingerprint["per_case"]["b"]["spacing_zyx"] == [3.0, 1.0, 1.0]
    assert fingerprint["target_spacing_zyx"] == pytest.approx([2.5, 1.0, 1.0])


def test_ct_prepare_auto_resamples_to_the_target_spacing_of_the_headers(tiny_phantoms, tmp_path):
    images, labels = tiny_phantoms
    folders = {kind: tmp_path / kind for kind in ("images", "labels")}
    z_spacings = (4.0, 4.0, 2.0)  # a thin-slice case among thick ones
    for index, z_mm in enumerate(z_spacings):
        name = f"case_{index:03d}.nii.gz"
        for kind, source in (("images", images), ("labels", labels)):
            array, _ = read_nifti(source / name)
            geometry = ImageGeometry.from_spacing(array.shape, (4.0, 4.0, z_mm))
            folders[kind].mkdir(exist_ok=True)
            write_nifti(folders[kind] / name, array, geometry)
    out = tmp_path / "auto.h5"
    summary = prepare(folders["images"], folders["labels"], out, spacing_mm="auto")
    assert summary["spacing_mm"] == pytest.approx([4.0, 4.0, 4.0])
    with h5py.File(out) as h5:
        fingerprint = json.loads(h5.attrs["fingerprint"])
        assert json.loads(h5.attrs["spacing_mm"]) == pytest.approx([4.0, 4.0, 4.0])
        assert h5["cases/case_002/image"].shape[0] == 12  # 24 slices at 2 mm -> 12 at 4 mm
    assert fingerprint["per_case"]["case_002"]["spacing_zyx"] == pytest.approx([2.0, 4.0, 4.0])
    assert fingerprint["target_spacing_zyx"] == pytest.approx([4.0, 4.0, 4.0])
    assert 0 < fingerprint["class_fraction"]["liver"] < 0.5


def test_the_plan_for_a_budget_is_the_same_with_and_without_a_gpu(tiny_dataset):
    """A --gpu-mem-gb plan made on a CPU node equals the one the GPU job makes."""
    from medhpc.ct.dataset import CtDataset
    from medhpc.ct.run import Training
    from medhpc.ct.settings import TrainSettings

    dataset = CtDataset(tiny_dataset)
    plans = {}
    for device in ("cpu", "cuda"):
        training = Training(SimpleNamespace(device=device, world=None), tiny_dataset, "run",
                            TrainSettings(gpu_mem_gb=16))
        plans[device] = training.memory_plan(dataset.n_classes + 1, dataset)
    assert plans["cpu"] == plans["cuda"]
    assert plans["cpu"].amp and plans["cpu"].network.widths[0] == GPU_WIDTHS.base


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_is_within_15_percent_of_the_measured_cpu_peak(checkpointing):
    """bench/ct/memory.py's measurement (tensors alive at once during one training step,
    from PyTorch's profiler) on a planned thick-slice network of nnU-Net widths."""
    pytest.importorskip("torch")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "ct" / "memory.py"
    case = {"widths": None, "spacing": list(THICK), "patch": [8, 48, 48], "batch": 2,
            "checkpointing": checkpointing, "device": "cpu"}
    done = subprocess.run([sys.executable, str(script), "--one", json.dumps(case)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["layout"]["widths"][0] == 32 and result["layout"]["strides"][1] == [1, 2, 2]
    assert 0.85 <= result["ratio"] <= 1.15, result
