"""Messages and progress: rank 0 speaks on stderr, batch logs stay short, --quiet is quiet."""

import io

from medhpc.runtime.log import Log


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_batch_log_is_one_line_at_the_end():
    stream = io.StringIO()
    assert list(Log(stream=stream).progress(range(5), desc="frames")) == [0, 1, 2, 3, 4]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("frames [") and " 5/5 " in lines[0]


def test_progress_on_a_terminal_redraws_in_place_and_ends_the_line():
    stream = Terminal()
    list(Log(stream=stream).progress(range(3), desc="pairs"))
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "3/3" in text


def test_quiet_and_other_ranks_show_nothing():
    for log in (Log(verbosity=-1, stream=Terminal()), Log(rank=1, size=2, stream=Terminal())):
        list(log.progress(range(3)))
        show = log.counter("queue")
        show(1, 2)
        show.end()
        assert log.stream.getvalue() == ""


def test_counter_draws_work_counted_elsewhere_with_the_rank_tag():
    stream = io.StringIO()
    show = Log(rank=0, size=4, stream=stream).counter("matching 6 pairs")
    for done in range(1, 7):
        show(done, 6)
    show.end()
    lines = stream.getvalue().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("[rank 0/4] matching 6 pairs [")
    assert "6/6" in lines[-1] and "0.0 s left" in lines[-1]
