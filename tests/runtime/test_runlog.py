"""The run documents' one writer: common head, strict JSON, atomic and checked."""

import json

import numpy as np
import pytest

from medhpc import __version__
from medhpc.errors import OutputExistsError
from medhpc.runtime.runlog import SCHEMA_VERSION, run_document, write_run_log


def test_a_run_log_has_the_common_head_and_plain_strict_json(tmp_path):
    path = tmp_path / "log.json"
    write_run_log(path, "lddmm", {"energy": np.float32(0.5), "history": np.arange(3),
                                  "folder": tmp_path, "bad": float("nan"),
                                  "command": "overridden"}, timings={"wall_seconds": 1.0})
    text = path.read_text()
    document = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the log"))
    assert document["schema_version"] == SCHEMA_VERSION and document["command"] == "lddmm"
    assert document["medhpc_version"] == __version__ and document["created"][:2] == "20"
    assert document["energy"] == 0.5 and document["history"] == [0, 1, 2]
    assert document["folder"] == str(tmp_path) and document["bad"] is None
    assert document["timings"] == {"wall_seconds": 1.0}
    assert list(document)[:4] == ["schema_version", "command", "medhpc_version", "created"]


def test_a_run_log_is_not_replaced_without_overwrite(tmp_path):
    path = tmp_path / "log.json"
    write_run_log(path, "pet-recon", {"a": 1})
    with pytest.raises(OutputExistsError):
        write_run_log(path, "pet-recon", {"a": 2})
    write_run_log(path, "pet-recon", {"a": 2}, overwrite=True)
    assert json.loads(path.read_text())["a"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.json"]


def test_the_head_cannot_be_taken_over_by_the_body():
    document = run_document("ct-train", {"schema_version": 99, "medhpc_version": "x"})
    assert document["schema_version"] == SCHEMA_VERSION
    assert document["medhpc_version"] == __version__
