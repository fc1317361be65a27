"""Outputs appear complete or not at all, and never replace a file unasked."""

import subprocess

import numpy as np
import pytest
import tifffile

from medhpc.errors import OutputExistsError
from medhpc.io import (ImageGeometry, atomic_path, write_image, write_nifti, write_tiff_stack,
                       write_volume)

VOLUME = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
GEOMETRY = ImageGeometry.from_spacing(VOLUME.shape, 1.5)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def _write_then_fail(path, *args, **kwargs):
    with open(path, "wb") as partial:
        partial.write(b"half a file")
    raise RuntimeError("disk full")


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("stop")
    assert _leftovers(tmp_path) == []


def test_hdf5_failure_inside_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_volume(tmp_path / "v.h5", VOLUME, GEOMETRY, attrs={"bad": object()})
    assert _leftovers(tmp_path) == []


def test_nifti_failure_inside_write_leaves_nothing(tmp_path, monkeypatch):
    from medhpc.io import nifti

    def write_then_fail(stream, block):
        stream._put(b"half a block")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nifti.NiftiStream, "write", write_then_fail)
    with pytest.raises(RuntimeError):
        write_nifti(tmp_path / "v.nii.gz", VOLUME, GEOMETRY)
    assert _leftovers(tmp_path) == []


def test_nifti_stream_short_of_data_leaves_nothing(tmp_path):
    from medhpc.io.nifti import NiftiStream

    with pytest.raises(ValueError, match="expected"):
        with NiftiStream(tmp_path / "v.nii", VOLUME.shape[::-1], np.float32,
                         GEOMETRY.affine) as stream:
            stream.write(VOLUME[:1])
    assert _leftovers(tmp_path) == []


def test_nifti_stream_in_blocks_equals_one_write(tmp_path):
    from medhpc.io.nifti import NiftiStream

    write_nifti(tmp_path / "whole.nii.gz", VOLUME, GEOMETRY)
    with NiftiStream(tmp_path / "blocks.nii.gz", VOLUME.shape[::-1], np.float32,
                     GEOMETRY.affine) as stream:
        for plane in VOLUME:
            stream.write(plane)
    import gzip

    assert (gzip.open(tmp_path / "whole.nii.gz").read()
            == gzip.open(tmp_path / "blocks.nii.gz").read())


def test_tiff_failure_inside_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tifffile, "imwrite", _write_then_fail)
    with pytest.raises(RuntimeError):
        write_tiff_stack(tmp_path / "v.tif", VOLUME)
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "v.h5"
    write_volume(target, VOLUME, GEOMETRY)
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_volume(target, VOLUME, GEOMETRY, attrs={"bad": object()}, overwrite=True)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == ["v.h5"]


@pytest.mark.parametrize("name", ["v.h5", "v.nii.gz", "v.nii", "v.tif", "v.ome.tif"])
def test_existing_output_needs_overwrite(tmp_path, name):
    target = tmp_path / name
    write_image(target, VOLUME, GEOMETRY)
    with pytest.raises(OutputExistsError) as excinfo:
        write_image(target, VOLUME * 2, GEOMETRY)
    assert str(target) in str(excinfo.value)
    write_image(target, VOLUME * 2, GEOMETRY, overwrite=True)
    assert _leftovers(tmp_path) == [name]


def test_output_paths_are_checked_before_any_work(tmp_path):
    from medhpc.errors import InputError
    from medhpc.io.atomic import check_output_path

    check_output_path(tmp_path / "new" / "deeper" / "t.json", False, (".json",))
    with pytest.raises(InputError, match=r"t\.txt: unsupported file name; expected a name "
                                         r"ending in \.json"):
        check_output_path(tmp_path / "t.txt", False, (".json",))
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path, True)
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        check_output_path(tmp_path / "t.json", False, (".json",))
    check_output_path(tmp_path / "t.json", True, (".json",))
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        check_output_path(tmp_path / "file" / "t.json", False)
    assert _leftovers(tmp_path) == ["file", "t.json"]


def test_an_output_in_a_read_only_folder_is_refused(tmp_path):
    import os

    from medhpc.errors import InputError
    from medhpc.io.atomic import check_output_path

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the check cannot fail here")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="folder is not writable"):
            check_output_path(folder / "sub" / "t.json", False)
    finally:
        folder.chmod(0o755)


def test_outputs_published_together_appear_at_the_end_or_not_at_all(tmp_path):
    from medhpc.io.atomic import publish_together

    with publish_together():
        for name in ("a.txt", "b.txt"):
            with atomic_path(tmp_path / name) as tmp:
                tmp.write_text(name)
        assert not (tmp_path / "a.txt").exists() and len(_leftovers(tmp_path)) == 2
    assert _leftovers(tmp_path) == ["a.txt", "b.txt"]
    with pytest.raises(RuntimeError, match="third failed"):
        with publish_together():
            with atomic_path(tmp_path / "c.txt") as tmp:
                tmp.write_text("c")
            with atomic_path(tmp_path / "state.npz", now=True) as tmp:
                tmp.write_text("kept")  # a checkpoint survives the failure
            raise RuntimeError("third failed")
    assert _leftovers(tmp_path) == ["a.txt", "b.txt", "state.npz"]


def test_partials_of_ended_processes_are_removed_and_planted_ones_never_written_through(
        tmp_path):
    from medhpc.io.atomic import PARTIAL_PREFIX, partial_name

    ended = _ended_pid()
    stale = tmp_path / f"{PARTIAL_PREFIX}{ended}-v.nii.gz"
    stale.write_text("left by a killed run")
    target = tmp_path / "elsewhere.txt"
    target.write_text("untouched")
    partial_name(tmp_path / "v.nii.gz").symlink_to(target)
    with atomic_path(tmp_path / "v.nii.gz") as tmp:
        tmp.write_text("new")
    assert _leftovers(tmp_path) == ["elsewhere.txt", "v.nii.gz"]
    assert target.read_text() == "untouched"


def _ended_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path):
    from medhpc.errors import OutputWriteError
    from tests.helpers import tiny_filesystem

    with tiny_filesystem(tmp_path / "small", 64) as small:
        with pytest.raises(OutputWriteError, match=r"big\.bin: cannot be written \(No space "
                                                   r"left on device\); no partial file"):
            with atomic_path(small / "big.bin") as tmp:
                tmp.write_bytes(b"\0" * 2**20)
        assert _leftovers(small) == []


def test_files_written_inside_a_folder_output_are_reported_where_they_end_up(tmp_path):
    from medhpc.io.atomic import published_outputs

    folder = tmp_path / "phantom"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name in ("activity.h5", "mu_map.h5"):
            with atomic_path(tmp / name) as inner:
                inner.write_bytes(b"x")
    reported = published_outputs()
    assert folder / "activity.h5" in reported and folder / "mu_map.h5" in reported
    assert not any(".partial-" in str(path) for path in reported)
    assert (folder / "mu_map.h5").read_bytes() == b"x"


def test_staged_outputs_of_writers_wait_for_the_block_and_can_be_appended_meanwhile(tmp_path):
    from medhpc.io.atomic import partial_name, pending_path, publish, publish_together

    volume, parts = tmp_path / "v.h5", tmp_path / "v.h5.parts"
    staged_file, staged_parts = partial_name(volume), partial_name(parts)
    with publish_together():
        staged_file.write_bytes(b"master")
        staged_parts.mkdir()
        publish((staged_parts, parts, False), (staged_file, volume))
        assert not volume.exists() and not parts.exists()
        assert pending_path(volume) == staged_file
        with open(pending_path(volume), "ab") as stream:
            stream.write(b" + trajectories")
    assert volume.read_bytes() == b"master + trajectories" and parts.is_dir()
    assert pending_path(volume) == volume
    assert _leftovers(tmp_path) == ["v.h5", "v.h5.parts"]


def test_a_failed_block_removes_staged_outputs_and_a_rewrite_keeps_only_the_last(tmp_path):
    from medhpc.io.atomic import publish_together

    log = tmp_path / "log.csv"
    with publish_together():
        for epoch in range(3):  # written again before the block ends
            with atomic_path(log, overwrite=True) as tmp:
                tmp.write_text(f"epoch {epoch}")
    assert log.read_text() == "epoch 2"
    with pytest.raises(RuntimeError):
        with publish_together():
            with atomic_path(tmp_path / "model.pt") as tmp:
                tmp.write_bytes(b"weights")
            raise RuntimeError("a later stage failed")
    assert _leftovers(tmp_path) == ["log.csv"]
