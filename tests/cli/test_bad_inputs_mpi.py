"""Bad input over every subcommand, at the rank count of the MPI pass (2, 3 and 4).

Each case runs the real command line in every rank of the job (``medhpc.cli.main.run``)
and must end with exit code 2 on every rank, exactly one error line in the whole job
(rank 0's) naming the file or option at fault, and no file left in the output folder.
An error that is not agreed among the ranks ends the job through ``MPI_Abort``, which
fails the whole pass loudly.
"""

import shutil

import h5py
import numpy as np
import pytest

from medhpc.io.geometry import ImageGeometry
from medhpc.io.nifti import write_nifti
from medhpc.parallel.comm import get_world
from tests.parallel import shared_tmp_dir

pytestmark = pytest.mark.mpi

GRID = ImageGeometry.from_spacing((8, 12, 12), 2.0)


def _nifti(path, array, affine=None):
    import nibabel

    image = nibabel.Nifti1Image(array, GRID.affine if affine is None else None)
    if affine is not None:  # an affine nibabel would refuse to decompose into a qform
        image.header.set_sform(affine, code=1)
        image.header["qform_code"] = 0
    nibabel.save(image, str(path))


def _section(path, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(path)


def make_inputs(folder):
    """Good and broken inputs of every kind the cases refer to."""
    rng = np.random.default_rng(0)
    good = rng.random(GRID.shape, dtype=np.float32) + 0.1
    write_nifti(folder / "good.nii.gz", good, GRID)
    write_nifti(folder / "good2.nii.gz", np.roll(good, 1, axis=2), GRID)
    write_nifti(folder / "mu.nii.gz", np.full(GRID.shape, 0.0096, np.float32), GRID)
    _nifti(folder / "flat.nii.gz", good[0].T)
    nan = good.copy()
    nan[2, 3, 4] = np.nan
    _nifti(folder / "nan.nii.gz", nan.transpose(2, 1, 0))
    _nifti(folder / "fourd.nii.gz", np.stack([good, good], axis=-1).transpose(2, 1, 0, 3))
    _nifti(folder / "complex.nii.gz", (good + 1j * good).astype(np.complex64).transpose(2, 1, 0))
    _nifti(folder / "constant.nii.gz", np.ones(GRID.shape, np.float32).transpose(2, 1, 0))
    singular = np.diag([2.0, 2.0, 0.0, 1.0])
    _nifti(folder / "singular.nii.gz", good.transpose(2, 1, 0), affine=singular)
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "empty.h5").write_bytes(b"")
    (folder / "empty.json").write_bytes(b"")
    garbage = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name in ("garbage.nii.gz", "garbage.h5", "garbage.pt", "garbage.json"):
        (folder / name).write_bytes(garbage)
    (folder / "folder.nii.gz").mkdir()
    (folder / "folder.h5").mkdir()
    (folder / "garbage.hs").write_text("not an Interfile header\n")
    with h5py.File(folder / "nodata.h5", "w") as handle:
        handle["something_else"] = np.zeros(4)
    whole = folder / "whole.h5"
    with h5py.File(whole, "w") as handle:
        handle["prompts"] = rng.random((64, 64, 16), dtype=np.float32)
    data = whole.read_bytes()
    (folder / "truncated.h5").write_bytes(data[: len(data) // 3])
    whole.unlink()
    (folder / "existing.h5").write_bytes(b"old")
    (folder / "existing.json").write_text("{}")
    (folder / "existing_file").write_text("a file, not a folder")
    for name in ("sections_empty", "sections_one", "sections_garbage", "sections_ok"):
        (folder / name).mkdir()
    _section(folder / "sections_one" / "s_000.png", 0)
    _section(folder / "sections_garbage" / "s_000.png", 0)
    (folder / "sections_garbage" / "s_001.png").write_bytes(garbage)
    _section(folder / "sections_ok" / "s_000.png", 0)
    _section(folder / "sections_ok" / "s_001.png", 1)
    _section(folder / "sections_ok" / "s_002.png", 2)
    (folder / "ct_images").mkdir()
    (folder / "ct_labels").mkdir()
    shutil.copy(folder / "garbage.nii.gz", folder / "ct_images" / "case_000.nii.gz")
    shutil.copy(folder / "good.nii.gz", folder / "ct_labels" / "case_000.nii.gz")
    for name in ("ct_good_images", "ct_good_labels"):
        (folder / name).mkdir()
    write_nifti(folder / "ct_good_images" / "case_000.nii.gz", good * 100, GRID)
    write_nifti(folder / "ct_good_labels" / "case_000.nii.gz", (good > 0.5).astype(np.uint8), GRID)


SIMULATE = ["pet-simulate", "--scanner", "small-test", "--mu-map", "{d}/mu.nii.gz"]
LDDMM_OUT = ["--out", "{o}/reg"]
TNR_OUT = ["--out", "{o}/volume.h5"]

#: (case id, command line, words the one error line must contain)
CASES = [
    # pet-simulate: the activity image
    ("sim-missing", SIMULATE + ["--activity", "{d}/missing.nii.gz", "--out", "{o}/s.h5"],
     ["missing.nii.gz"]),
    ("sim-directory", SIMULATE + ["--activity", "{d}/folder.nii.gz", "--out", "{o}/s.h5"],
     ["folder.nii.gz"]),
    ("sim-empty", SIMULATE + ["--activity", "{d}/empty.nii.gz", "--out", "{o}/s.h5"],
     ["empty.nii.gz"]),
    ("sim-garbage", SIMULATE + ["--activity", "{d}/garbage.nii.gz", "--out", "{o}/s.h5"],
     ["garbage.nii.gz"]),
    ("sim-nan", SIMULATE + ["--activity", "{d}/nan.nii.gz", "--out", "{o}/s.h5"],
     ["nan.nii.gz", "NaN"]),
    ("sim-2d", SIMULATE + ["--activity", "{d}/flat.nii.gz", "--out", "{o}/s.h5"],
     ["flat.nii.gz"]),
    ("sim-complex", SIMULATE + ["--activity", "{d}/complex.nii.gz", "--out", "{o}/s.h5"],
     ["complex.nii.gz", "complex"]),
    ("sim-singular", SIMULATE + ["--activity", "{d}/singular.nii.gz", "--out", "{o}/s.h5"],
     ["singular.nii.gz"]),
    ("sim-extension", SIMULATE + ["--activity", "{d}/good.nii.gz", "--out", "{o}/s.nii.gz"],
     ["s.nii.gz"]),
    ("sim-existing", SIMULATE + ["--activity", "{d}/good.nii.gz", "--out", "{d}/existing.h5"],
     ["existing.h5", "--overwrite"]),
    ("sim-counts", SIMULATE + ["--activity", "{d}/good.nii.gz", "--out", "{o}/s.h5",
                               "--counts", "-5"], ["counts"]),
    ("sim-scanner", ["pet-simulate", "--scanner", "no-such-scanner", "--activity",
                     "{d}/good.nii.gz", "--mu-map", "{d}/mu.nii.gz", "--out", "{o}/s.h5"],
     ["no-such-scanner"]),
    # pet-convert and STIR data
    ("convert-missing", ["pet-convert", "--in", "{d}/missing.hs", "--out", "{o}/s.h5"],
     ["missing.hs"]),
    ("convert-garbage", ["pet-convert", "--in", "{d}/garbage.hs", "--out", "{o}/s.h5"],
     ["garbage.hs", "Interfile"]),
    ("convert-castor-no-scanner", ["pet-convert", "--in", "{d}/missing.cdh", "--out",
                                   "{o}/s.h5"], ["missing.cdh"]),
    ("recon-stir-garbage", ["pet-recon", "--sinogram", "{d}/garbage.hs", "--out",
                            "{o}/r.nii.gz"], ["garbage.hs"]),
    # pet-recon: the sinogram and the run options
    ("recon-missing", ["pet-recon", "--sinogram", "{d}/missing.h5", "--out", "{o}/r.nii.gz"],
     ["missing.h5"]),
    ("recon-directory", ["pet-recon", "--sinogram", "{d}/folder.h5", "--out", "{o}/r.nii.gz"],
     ["folder.h5"]),
    ("recon-empty", ["pet-recon", "--sinogram", "{d}/empty.h5", "--out", "{o}/r.nii.gz"],
     ["empty.h5"]),
    ("recon-truncated", ["pet-recon", "--sinogram", "{d}/truncated.h5", "--out",
                         "{o}/r.nii.gz"], ["truncated.h5"]),
    ("recon-no-data", ["pet-recon", "--sinogram", "{d}/nodata.h5", "--out", "{o}/r.nii.gz"],
     ["nodata.h5"]),
    ("recon-threads", ["pet-recon", "--sinogram", "{d}/nodata.h5", "--out", "{o}/r.nii.gz",
                       "--threads", "100000"], ["--threads"]),
    ("recon-timings-existing", ["pet-recon", "--sinogram", "{d}/nodata.h5", "--out",
                                "{o}/r.nii.gz", "--timings", "{d}/existing.json"],
     ["existing.json"]),
    ("recon-iterations", ["pet-recon", "--sinogram", "{d}/nodata.h5", "--out", "{o}/r.nii.gz",
                          "--iterations", "0"], ["--iterations"]),
    # lddmm: both images and the output folder
    ("lddmm-missing", ["lddmm", "--fixed", "{d}/missing.nii.gz", "--moving", "{d}/good.nii.gz"]
     + LDDMM_OUT, ["missing.nii.gz"]),
    ("lddmm-nan", ["lddmm", "--fixed", "{d}/good.nii.gz", "--moving", "{d}/nan.nii.gz"]
     + LDDMM_OUT, ["nan.nii.gz", "NaN"]),
    ("lddmm-4d", ["lddmm", "--fixed", "{d}/fourd.nii.gz", "--moving", "{d}/good.nii.gz"]
     + LDDMM_OUT, ["fourd.nii.gz"]),
    ("lddmm-complex", ["lddmm", "--fixed", "{d}/good.nii.gz", "--moving", "{d}/complex.nii.gz"]
     + LDDMM_OUT, ["complex.nii.gz"]),
    ("lddmm-constant", ["lddmm", "--fixed", "{d}/constant.nii.gz", "--moving",
                        "{d}/good.nii.gz"] + LDDMM_OUT, ["constant.nii.gz"]),
    ("lddmm-singular", ["lddmm", "--fixed", "{d}/singular.nii.gz", "--moving",
                        "{d}/good.nii.gz"] + LDDMM_OUT, ["singular.nii.gz"]),
    ("lddmm-garbage", ["lddmm", "--fixed", "{d}/good.nii.gz", "--moving", "{d}/garbage.nii.gz"]
     + LDDMM_OUT, ["garbage.nii.gz"]),
    ("lddmm-out-is-a-file", ["lddmm", "--fixed", "{d}/good.nii.gz", "--moving",
                             "{d}/good2.nii.gz", "--out", "{d}/existing_file"],
     ["existing_file"]),
    ("lddmm-levels", ["lddmm", "--fixed", "{d}/good.nii.gz", "--moving", "{d}/good2.nii.gz",
                      "--levels", "40"] + LDDMM_OUT, ["--levels"]),
    ("lddmm-apply-missing", ["lddmm-apply", "--transform", "{d}/missing.h5", "--image",
                             "{d}/good.nii.gz", "--out", "{o}/w.nii.gz"], ["missing.h5"]),
    ("lddmm-apply-garbage", ["lddmm-apply", "--transform", "{d}/garbage.h5", "--image",
                             "{d}/good.nii.gz", "--out", "{o}/w.nii.gz"], ["garbage.h5"]),
    # tnr-register and tnr-apply: section folders and options
    ("tnr-missing", ["tnr-register", "--input", "{d}/no_such_folder"] + TNR_OUT,
     ["no_such_folder"]),
    ("tnr-empty", ["tnr-register", "--input", "{d}/sections_empty"] + TNR_OUT,
     ["sections_empty"]),
    ("tnr-one", ["tnr-register", "--input", "{d}/sections_one"] + TNR_OUT, ["sections_one"]),
    ("tnr-garbage", ["tnr-register", "--input", "{d}/sections_garbage"] + TNR_OUT,
     ["s_001.png"]),
    ("tnr-extension", ["tnr-register", "--input", "{d}/sections_ok", "--out", "{o}/v.png"],
     ["v.png"]),
    ("tnr-sigma", ["tnr-register", "--input", "{d}/sections_ok", "--sigma", "-1"] + TNR_OUT,
     ["--sigma"]),
    ("tnr-patch", ["tnr-register", "--input", "{d}/sections_ok", "--patch", "3"] + TNR_OUT,
     ["--patch"]),
    ("tnr-apply-missing", ["tnr-apply", "--registration", "{d}/missing.h5", "--input",
                           "{d}/sections_ok", "--out", "{o}/a.h5"], ["missing.h5"]),
    ("tnr-apply-garbage", ["tnr-apply", "--registration", "{d}/garbage.h5", "--input",
                           "{d}/sections_ok", "--out", "{o}/a.h5"], ["garbage.h5"]),
    # ct-prepare, ct-train, ct-segment, ct-register
    ("ct-prepare-empty", ["ct-prepare", "--images", "{d}/sections_empty", "--labels",
                          "{d}/ct_labels", "--out", "{o}/data.h5"], ["sections_empty"]),
    ("ct-prepare-garbage", ["ct-prepare", "--images", "{d}/ct_images", "--labels",
                            "{d}/ct_labels", "--out", "{o}/data.h5"], ["case_000.nii.gz"]),
    ("ct-prepare-extension", ["ct-prepare", "--images", "{d}/ct_good_images", "--labels",
                              "{d}/ct_good_labels", "--out", "{o}/data.nii.gz"],
     ["data.nii.gz"]),
    ("ct-train-missing", ["ct-train", "--data", "{d}/missing.h5", "--out", "{o}/run"],
     ["missing.h5"]),
    ("ct-train-garbage", ["ct-train", "--data", "{d}/garbage.h5", "--out", "{o}/run"],
     ["garbage.h5"]),
    ("ct-train-truncated", ["ct-train", "--data", "{d}/truncated.h5", "--out", "{o}/run"],
     ["truncated.h5"]),
    ("ct-segment-missing", ["ct-segment", "--model", "{d}/missing.pt", "--images",
                            "{d}/good.nii.gz", "--out", "{o}/seg"], ["missing.pt"]),
    ("ct-segment-garbage", ["ct-segment", "--model", "{d}/garbage.pt", "--images",
                            "{d}/good.nii.gz", "--out", "{o}/seg"], ["garbage.pt"]),
    ("ct-register-missing", ["ct-register", "--model", "{d}/missing.pt", "--fixed",
                             "{d}/good.nii.gz", "--moving", "{d}/good.nii.gz", "--out",
                             "{o}/reg"], ["missing.pt"]),
    ("ct-register-garbage", ["ct-register", "--model", "{d}/garbage.pt", "--fixed",
                             "{d}/good.nii.gz", "--moving", "{d}/good.nii.gz", "--out",
                             "{o}/reg"], ["garbage.pt"]),
    # compile (one rank only: later jobs share the cache)
    ("compile-under-mpiexec", ["compile", "--app", "tnr"], ["one rank"]),
    # report
    ("report-garbage", ["report", "{d}/garbage.json", "--png", "{o}/t.png"], ["garbage.json"]),
    ("report-empty", ["report", "{d}/empty.json", "--png", "{o}/t.png"], ["empty.json"]),
]


@pytest.fixture(scope="module")
def inputs():
    world = get_world()
    with shared_tmp_dir(world) as folder:
        if world.is_root:
            make_inputs(folder)
        world.barrier()
        yield folder


def _torch_missing(argv) -> bool:
    if not argv[0].startswith("ct-") or argv[0] == "ct-prepare":
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.parametrize("case, argv, words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_everywhere_and_leaves_nothing(inputs, capsys, case, argv,
                                                                    words):
    from medhpc.cli.main import run

    if _torch_missing(argv):
        pytest.skip("PyTorch is not installed")
    world = get_world()
    out = inputs / "out" / case
    if world.is_root:
        out.mkdir(parents=True)
    world.barrier()
    before = sorted(path.name for path in inputs.iterdir())
    args = [part.format(d=inputs, o=out) for part in argv]
    if args[0] not in ("lddmm-apply", "report", "compile"):
        args += ["--device", "cpu", "--threads", "1"] if "--threads" not in args else \
            ["--device", "cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        run(args)
    captured = capsys.readouterr()
    error_lines = [line for line in captured.err.splitlines()
                   if line.startswith(("medhpc: error:", "Error:")) or "medhpc: error:" in line]
    codes = world.allgather(ended.value.code)
    lines = world.allgather(error_lines)
    everything = [line for rank_lines in lines for line in rank_lines]
    assert codes == [2] * world.size, f"{case}: exit codes {codes}; stderr: {captured.err}"
    assert len(everything) == 1, f"{case}: error lines over all ranks: {everything}"
    message = everything[0]
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert "Traceback" not in captured.err
    world.barrier()
    if world.is_root:
        assert list(out.iterdir()) == [], f"{case}: left {list(out.iterdir())}"
        assert sorted(path.name for path in inputs.iterdir()) == before
