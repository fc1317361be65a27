"""``medhpc compile`` fills the kernel cache with exactly what the subcommands call."""

from tests.helpers import run_medhpc


def _compiled(cache):
    return sorted(path.name for path in cache.rglob("*.nbc"))


def test_compile_ahead_leaves_nothing_for_a_later_run_to_compile(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"NUMBA_CACHE_DIR": str(cache)}
    done = run_medhpc("compile", "--app", "tnr", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # its scratch outputs are not reported
    assert "kernels of tnr compiled" in done.stderr and str(cache) in done.stderr
    compiled = _compiled(cache)
    assert any(name.startswith("kernels_cpu.remap") for name in compiled)
    phantom = tmp_path / "phantom"
    assert run_medhpc("phantom", "tnr", "--out", phantom, "--sections", "5", "--size", "128",
                      "--seed", "4", env=env).returncode == 0
    done = run_medhpc("tnr-register", "--input", phantom / "sections", "--out",
                      tmp_path / "v.h5", "--device", "cpu", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert _compiled(cache) == compiled
