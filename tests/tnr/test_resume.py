"""--resume reuses the pairs matched by an interrupted run."""

import numpy as np
import pytest

from medhpc.tnr import register as register_module
from tests.tnr.conftest import SETTINGS, register


def test_resume_skips_matched_pairs_and_gives_the_same_result(phantom_folder, tmp_path,
                                                              monkeypatch):
    source = phantom_folder / "sections"
    out = tmp_path / "v.h5"

    def interrupted(self, warps):
        raise KeyboardInterrupt("stopped after matching")

    with monkeypatch.context() as patch:
        patch.setattr(register_module.Reconstruction, "warp_sections", interrupted)
        with pytest.raises(KeyboardInterrupt):
            register(source, out, resume=True)
    saved = sorted((tmp_path / "v.tnr-pairs").glob("pair-*.pkl"))
    assert len(saved) == 11

    calls = []
    original = register_module.match_sections
    monkeypatch.setattr(register_module, "match_sections",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed, _ = register(source, out, resume=True)
    assert calls == []
    assert not (tmp_path / "v.tnr-pairs").exists()
    fresh, _ = register(source, tmp_path / "w.h5", SETTINGS)
    assert len(calls) == 11
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)
