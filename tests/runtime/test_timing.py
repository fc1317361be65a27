"""Stage times: compiling (or loading) kernels is its own stage, not the stage that asked."""

import numba

from medhpc.runtime.timing import COMPILE_CLOCK, COMPILE_STAGE, StageTimer


def test_compilation_inside_a_stage_is_charged_to_the_compile_stage():
    COMPILE_CLOCK.install()
    first = []
    COMPILE_CLOCK.on_first_compile = lambda: first.append(True)
    compiled_before = COMPILE_CLOCK.compiled

    @numba.njit
    def add_one(x):
        return x + 1

    timer = StageTimer()
    with timer.stage("outer", "other"):
        with timer.stage("kernel", "kernel"):
            assert add_one(1) == 2
    assert COMPILE_CLOCK.compiled == compiled_before + 1
    assert timer.kinds[COMPILE_STAGE] == "compile" and timer.calls[COMPILE_STAGE] == 1
    assert timer.seconds[COMPILE_STAGE] > 0 and timer.calls["outer"] == 1
    assert first == ([True] if compiled_before == 0 else [])
    with timer.stage("kernel", "kernel"):
        add_one(2)
    assert timer.calls[COMPILE_STAGE] == 1
