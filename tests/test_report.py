"""The timing report: PNGs of per-rank stage times, and checks of the timing JSON."""

import json
import random

import pytest

from medhpc import __version__
from medhpc.errors import InputError, OutputExistsError
from medhpc.report import load_breakdown, plot_breakdown, speedup
from medhpc.runtime.runlog import SCHEMA_VERSION
from medhpc.runtime.timing import build_breakdown, write_breakdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGES = [("read", "io"), ("upload", "transfer"), ("forward", "kernel"), ("back", "kernel"),
          ("allreduce", "comm"), ("download", "transfer"), ("write", "io"), ("setup", "other")]


def synthetic_breakdown(ranks, scale=1.0, stages=STAGES, seed=0, command="pet recon"):
    """Per-rank records as StageTimer.breakdown gathers them, with uneven ranks."""
    generator = random.Random(seed)
    records = []
    for rank in range(ranks):
        load = scale * (1.0 + 0.5 * rank / max(1, ranks - 1))
        seconds = {name: load * generator.uniform(0.2, 1.0) for name, _ in stages}
        records.append({"seconds": seconds, "calls": {name: 3 for name, _ in stages},
                        "kinds": dict(stages), "wall": sum(seconds.values()) + 0.3 * scale})
    return build_breakdown(records, command=command)


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert min_bytes < len(data) < 2_000_000
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert 400 < width < 4000 and 300 < height < 3000


def test_single_breakdown(tmp_path):
    out = plot_breakdown([synthetic_breakdown(4)], tmp_path / "single.png")
    assert_png(out)


def test_before_after_many_ranks_and_stages(tmp_path):
    many = STAGES + [(f"kernel{i}", "kernel") for i in range(6)] + [("halo", "comm")]
    before = synthetic_breakdown(64, scale=2.0, stages=many, seed=1)
    after = synthetic_breakdown(64, scale=0.8, stages=many[:-2], seed=2)
    out = tmp_path / "compare.png"
    plot_breakdown([before, after], out, titles=["before", "after"])
    assert_png(out)
    assert speedup(before, after) == pytest.approx(before["wall_seconds"] / after["wall_seconds"])
    assert [entry.name for entry in tmp_path.iterdir()] == ["compare.png"]


def test_existing_png_needs_overwrite(tmp_path):
    document = synthetic_breakdown(2)
    out = plot_breakdown([document], tmp_path / "single.png")
    with pytest.raises(OutputExistsError):
        plot_breakdown([document], out)
    plot_breakdown([document], out, overwrite=True)
    assert_png(out)


def test_load_breakdown_round_trip(tmp_path):
    document = synthetic_breakdown(3)
    write_breakdown(document, tmp_path / "timing.json")
    loaded = load_breakdown(tmp_path / "timing.json")
    assert loaded["schema_version"] == SCHEMA_VERSION
    assert loaded["medhpc_version"] == __version__
    written = {key: value for key, value in loaded.items()
               if key not in ("schema_version", "medhpc_version", "created")}
    expected = json.loads(json.dumps(document))
    expected.pop("created", None)
    assert written == expected


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a medhpc timing file"),
    ('{"stages": []}', "lacks 'command', 'ranks', 'wall_seconds', 'wall_per_rank'"),
    ('{"command": "", "ranks": 1, "wall_seconds": 1, "wall_per_rank": [1],'
     ' "stages": [{"name": "a", "kind": "gpu", "per_rank": [1]}]}', "kind 'gpu'"),
    ('{"command": "", "ranks": 2, "wall_seconds": 1, "wall_per_rank": [1, 1],'
     ' "stages": [{"name": "a", "kind": "io", "per_rank": [1]}]}', "needs 2 per-rank times"),
])
def test_bad_timing_file(tmp_path, content, message):
    path = tmp_path / "timing.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        load_breakdown(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_wrong_count(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_breakdown(tmp_path / "absent.json")
    document = synthetic_breakdown(2)
    with pytest.raises(InputError, match="one or two"):
        plot_breakdown([document] * 3, tmp_path / "three.png")
