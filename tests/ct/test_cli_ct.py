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
