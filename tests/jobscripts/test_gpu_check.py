"""bench/gpu_check.sh and bench/gpu_check.py: the GPU check script runs where there is no GPU.

The simulator pass (``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim``) runs the smoke mode: every
kernel of the check table against its CPU twin at tiny sizes. The serial pass checks that
the shell script, without a GPU, says so, writes its JSON and exits 0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(command, tmp_path, simulator):
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.cudasim
def test_smoke_in_the_simulator(tmp_path):
    done = run([sys.executable, "bench/gpu_check.py", "--smoke"], tmp_path, simulator=True)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["simulator"] and results["failures"] == 0
    names = {entry["name"] for entry in results["kernels"]}
    assert {"em_ratio", "gaussian convolve_axis", "joseph_forward_tof"} <= names
    for entry in results["kernels"]:
        if "error" in entry:  # a kernel module not written yet
            assert entry["error"].startswith("not available"), entry
            continue
        assert entry["accuracy"]["ok"], entry
        assert entry["timing"]["median_s"] > 0
    assert "rel. error" in (tmp_path / "gpu_check.txt").read_text()


def test_check_table_covers_every_cuda_launcher():
    """Every public launcher of every *_cuda module has an entry in the check table."""
    import importlib
    import inspect
    import pkgutil

    import medhpc

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    table = {(check.package, check.stem, check.function) for check in gpu_check.CHECKS}
    pytest.importorskip("numba.cuda")
    for info in pkgutil.walk_packages(medhpc.__path__, "medhpc."):
        if not info.name.endswith("_cuda"):
            continue
        module = importlib.import_module(info.name)
        package, _, stem = info.name.rpartition(".")
        stem = stem[: -len("_cuda")]
        for name in getattr(module, "PTX_SIGNATURES", {}):
            launcher = getattr(module, name, None)
            if launcher is None or not inspect.isfunction(launcher):
                continue  # kernels that are not launchers of their own
            assert (package, stem, name) in table, f"{info.name}.{name} is not in bench/gpu_check.py"


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="serial pass only")
def test_without_a_gpu_it_says_so(tmp_path):
    from medhpc.parallel.device import cuda_gpu_count

    if cuda_gpu_count() > 0:
        pytest.skip("a GPU is present: the full check is for bench/gpu_check.sh itself")
    done = run(["bash", "bench/gpu_check.sh"], tmp_path, simulator=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA GPU" in done.stdout
    assert "skipped" in json.loads((tmp_path / "gpu_check.json").read_text())
