"""Compile every application's kernels ahead of the first real run (``medhpc compile``).

Numba compiles a kernel the first time it is called with a new signature and keeps the
machine code in its cache (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the package).
A cluster job whose ranks all start with an empty cache compiles the same kernels on every
rank at once; ``medhpc compile`` fills the cache once, on a login node or as a job's first
step. It runs each application's own subcommands on tiny inputs in a temporary folder, so
exactly the signatures the real subcommands call are compiled (the default paths and the
options that change a kernel's arguments: TOF, the prior and resolution model, each
similarity metric, the affine start). The cache is specific to the CPU model: run it on the
kind of node the jobs will use.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

APPS = ("pet", "lddmm", "tnr", "ct")


def _small_tof_scanner() -> str:
    """The small-test preset with 7 TOF bins, as a TOML scanner file's text."""
    from importlib import resources

    preset = (resources.files("medhpc.pet") / "presets" / "small-test.toml").read_text()
    return (preset.replace('name = "small-test"', 'name = "small-test-tof"')
            + "tof_bins = 7\ntof_resolution_ps = 385.0\n")


def _pet(folder: Path, device: str) -> list[list[str]]:
    (folder / "tof.toml").write_text(_small_tof_scanner())
    phantom = ["--activity", f"{folder}/phantom/activity.nii.gz",
               "--mu-map", f"{folder}/phantom/mu_map.nii.gz"]
    recon = ["--iterations", "1", "--subsets", "2", "--device", device]
    return [
        ["phantom", "pet", "--out", f"{folder}/phantom", "--scanner", "small-test",
         "--shape", "8,24,24", "--voxel-mm", "4,4,2"],
        ["pet-simulate", *phantom, "--scanner", "small-test", "--counts", "1e5",
         "--out", f"{folder}/s.h5", "--device", device],
        ["pet-simulate", *phantom, "--scanner", f"{folder}/tof.toml", "--counts", "1e5",
         "--tof", "--out", f"{folder}/tof.h5", "--device", device],
        ["pet-recon", "--sinogram", f"{folder}/s.h5", "--out", f"{folder}/r.nii.gz", *recon],
        ["pet-recon", "--sinogram", f"{folder}/s.h5", "--out", f"{folder}/rdp.nii.gz",
         "--algorithm", "osem-rdp", "--psf-fwhm-mm", "4", "--postfilter-fwhm-mm", "4", *recon],
        ["pet-recon", "--sinogram", f"{folder}/tof.h5", "--out", f"{folder}/t.nii.gz", *recon],
        ["pet-recon", "--sinogram", f"{folder}/s.h5", "--out", f"{folder}/b.nii.gz",
         "--algorithm", "bsrem", *recon],
        ["pet-simulate", *phantom, "--scanner", f"{folder}/tof.toml", "--counts", "1e4", "--tof",
         "--listmode", "--out", f"{folder}/events.h5", "--device", device],
        ["pet-recon", "--listmode", f"{folder}/events.h5", "--out", f"{folder}/l.nii.gz", *recon],
        ["pet-scatter", "--sinogram", f"{folder}/s.h5", "--activity",
         f"{folder}/phantom/activity.nii.gz", "--mu-map", f"{folder}/phantom/mu_map.nii.gz",
         "--out", f"{folder}/scatter.h5", "--device", device],
    ]


def _lddmm(folder: Path, device: str) -> list[list[str]]:
    pair = ["--fixed", f"{folder}/phantom/fixed.nii.gz",
            "--moving", f"{folder}/phantom/moving.nii.gz", "--levels", "1",
            "--iterations", "2", "--device", device]
    return [
        ["phantom", "lddmm", "--out", f"{folder}/phantom", "--shape", "64"],
        ["lddmm", *pair, "--out", f"{folder}/lncc", "--initial-transform", "affine"],
        ["lddmm", *pair, "--out", f"{folder}/mi", "--metric", "mi"],
        ["lddmm", *pair, "--out", f"{folder}/beg", "--method", "beg", "--metric", "ssd"],
        ["lddmm", *pair, "--out", f"{folder}/beg-lncc", "--method", "beg", "--metric", "lncc"],
        ["lddmm-apply", "--transform", f"{folder}/lncc/transform.h5",
         "--image", f"{folder}/phantom/moving.nii.gz", "--out", f"{folder}/warped.nii.gz"],
    ]


def _tnr(folder: Path, device: str) -> list[list[str]]:
    return [
        ["phantom", "tnr", "--out", f"{folder}/phantom", "--sections", "4", "--size", "96"],
        ["tnr-register", "--input", f"{folder}/phantom/sections", "--out", f"{folder}/v.h5",
         "--patch", "16", "--search", "4", "--grid", "16", "--fields", f"{folder}/f.h5",
         "--device", device],
        ["tnr-register", "--input", f"{folder}/phantom/sections", "--out", f"{folder}/b.h5",
         "--patch", "16", "--search", "4", "--grid", "16", "--interpolation", "bilinear",
         "--device", device],
    ]


def _ct(folder: Path, device: str) -> list[list[str]]:
    return [
        ["phantom", "ct", "--out", f"{folder}/phantom", "--cases", "2", "--shape", "16,24,24"],
        ["ct-prepare", "--images", f"{folder}/phantom/images", "--labels",
         f"{folder}/phantom/labels", "--out", f"{folder}/data.h5", "--device", device],
        ["ct-train", "--data", f"{folder}/data.h5", "--out", f"{folder}/run", "--epochs", "1",
         "--steps", "1", "--patch", "16,16,16", "--batch", "1", "--widths", "4,8",
         "--folds", "1", "--device", device],
    ]


_COMMANDS = {"pet": _pet, "lddmm": _lddmm, "tnr": _tnr, "ct": _ct}


def warm_up(apps, device: str, log) -> dict:
    """Run the tiny pipelines of ``apps`` on ``device``; return the seconds each took."""
    from medhpc.cli.main import cli
    from medhpc.io.atomic import unreported

    seconds = {}
    for app in apps:
        began = time.perf_counter()
        log.info(f"compiling the {app} kernels ...")
        with tempfile.TemporaryDirectory(prefix=f"medhpc-compile-{app}-") as scratch, \
                unreported():
            for argv in _COMMANDS[app](Path(scratch), device):
                quiet = [] if argv[0] in ("phantom", "lddmm-apply") else ["--quiet"]
                cli.main(args=[*argv, *quiet], prog_name="medhpc", standalone_mode=False)
        seconds[app] = time.perf_counter() - began
        log.info(f"{app}: {seconds[app]:.1f} s")
    return seconds
