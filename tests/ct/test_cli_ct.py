"""ct command line without its optional dependency."""

import subprocess
import sys


def test_training_without_pytorch_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; from medhpc.cli.main import run; "
            f"sys.argv = ['medhpc', 'ct-train', '--data', 'data.h5', '--out', "
            f"{str(tmp_path / 'run')!r}]; run()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "needs PyTorch" in lines[0] and "medhpc[train]" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_plan_for_a_gpu_budget_is_the_same_on_a_cpu_node(tiny_dataset, tmp_path):
    """--gpu-mem-gb plans for a GPU (AMP on) wherever --dry-run runs; without a budget on
    the CPU the plan is for the CPU (AMP off)."""
    import json

    import pytest

    pytest.importorskip("torch")
    from tests.helpers import run_medhpc

    plans = {}
    for name, extra in (("gpu", ["--gpu-mem-gb", "16"]), ("cpu", [])):
        done = run_medhpc("ct-train", "--data", tiny_dataset, "--out", tmp_path / name,
                          "--dry-run", "--device", "cpu", "--folds", "2", *extra)
        assert done.returncode == 0, done.stderr
        plans[name] = json.loads(done.stdout)["memory_plan"]
    assert plans["gpu"]["amp"] is True and plans["gpu"]["budget_gb"] == 16
    assert plans["cpu"]["amp"] is False
    assert not (tmp_path / "gpu").exists()
