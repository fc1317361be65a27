"""List inputs from a file or from stdin (``-``)."""

import io

import pytest

from medhpc.errors import InputError
from medhpc.io.lists import read_list_text
from medhpc.lddmm.run import read_pairs
from medhpc.tnr.sources import input_files


def test_a_list_file_gives_its_text_and_its_folder(tmp_path):
    (tmp_path / "list.txt").write_text("a.tif\n")
    text, folder, name = read_list_text(tmp_path / "list.txt")
    assert (text, folder, name) == ("a.tif\n", tmp_path, str(tmp_path / "list.txt"))


def test_stdin_paths_start_from_the_working_folder(tmp_path, monkeypatch):
    for name in ("s1.tif", "s2.tif"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("# sections\ns1.tif\n\ns2.tif\n"))
    assert [str(p) for p in input_files(["-"])] == ["s1.tif", "s2.tif"]
    monkeypatch.setattr("sys.stdin", io.StringIO("fixed,moving,name\ns1.tif,s2.tif,one\n"))
    pairs = read_pairs("-")
    assert [(str(p["fixed"]), str(p["moving"]), p["name"]) for p in pairs] == [
        ("s1.tif", "s2.tif", "one")]


def test_an_empty_stdin_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(InputError, match="stdin: no pairs"):
        read_pairs("-")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00\x81binary"), "not a text file"),
])
def test_a_folder_or_a_binary_file_is_refused_as_a_list(tmp_path, make, message):
    path = tmp_path / "list.txt"
    make(path)
    with pytest.raises(InputError, match=message):
        read_list_text(path)
    with pytest.raises(InputError, match=message):
        input_files([path])
