"""--resume reuses the pairs matched by an interrupted run."""

import numpy as np
import pytest

from medhpc.tnr import run as run_module
from tests.helpers import PlantedObject
from tests.tnr.conftest import SETTINGS, register


def test_resume_skips_matched_pairs_and_gives_the_same_result(phantom_folder, tmp_path,
                                                              monkeypatch):
    source = phantom_folder / "sections"
    out = tmp_path / "v.h5"

    def interrupted(self, warps):
        raise KeyboardInterrupt("stopped after matching")

    with monkeypatch.context() as patch:
        patch.setattr(run_module.StackRegistration, "warp_sections", interrupted)
        with pytest.raises(KeyboardInterrupt):
            register(source, out, resume=True)
    saved = sorted((tmp_path / "v.tnr-pairs").glob("pair-*.h5"))
    assert len(saved) == 11

    calls = []
    original = run_module.match_sections
    monkeypatch.setattr(run_module, "match_sections",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed, _ = register(source, out, resume=True)
    assert calls == []
    assert not (tmp_path / "v.tnr-pairs").exists()
    fresh, _ = register(source, tmp_path / "w.h5", SETTINGS)
    assert len(calls) == 11
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


def test_planted_pickle_in_the_resume_store_is_never_run(phantom_folder, tmp_path):
    import pickle

    out = tmp_path / "v.h5"
    store = tmp_path / "v.tnr-pairs"
    store.mkdir()
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(PlantedObject(marker))
    for name in ("pair-00000-00001.h5", "pair-00000-00001.pkl"):
        (store / name).write_bytes(payload)
    resumed, _ = register(phantom_folder / "sections", out, resume=True)
    assert not marker.exists()
    fresh, _ = register(phantom_folder / "sections", tmp_path / "w.h5", SETTINGS)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


@pytest.mark.parametrize("signal_at_match, kept", [(5, 5), (1, 0)])
def test_sigterm_while_matching_stops_cleanly_and_resume_continues(
        phantom_folder, tmp_path, monkeypatch, signal_at_match, kept):
    """A stop signal ends the run after the pair being matched is kept (exit 143), or at
    once while nothing is kept yet (kernels compiling); nothing but the pair store is
    left, and --resume matches only the rest."""
    import os
    import signal

    from medhpc.runtime.checkpoint import CheckpointStop

    source, out = phantom_folder / "sections", tmp_path / "v.h5"
    original = run_module.match_sections
    calls = []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == signal_at_match:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "match_sections", signalled)
        with pytest.raises(CheckpointStop, match=f"SIGTERM received: stopped while matching, "
                                                 f"{kept} of 11"):
            register(source, out, resume=False)
    assert not out.exists() and not out.with_name("v-fields.h5").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"v.tnr-pairs"}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    calls.clear()
    monkeypatch.setattr(run_module, "match_sections",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed, _ = register(source, out, resume=True)
    assert len(calls) == 11 - kept
    fresh, _ = register(source, tmp_path / "w.h5", SETTINGS)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


def test_a_failure_after_the_volume_is_written_leaves_no_output_and_keeps_the_pairs(
        phantom_folder, tmp_path, monkeypatch):
    """The volume, fields, picture and log are published together: a failure while
    drawing the picture leaves none of them (and no partial file), only the pair store."""
    def broken_picture(self, views, record):
        raise RuntimeError("picture failed")

    monkeypatch.setattr(run_module.StackRegistration, "_picture", broken_picture)
    out = tmp_path / "v.h5"
    with pytest.raises(RuntimeError, match="picture failed"):
        register(phantom_folder / "sections", out, png=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["v.tnr-pairs"]
