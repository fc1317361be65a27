"""Independent work items (frames, image pairs, cases) spread over the ranks.

Schedules:

- ``"block"``: rank ``r`` takes the consecutive items ``block_range(n, size, r)``;
- ``"cyclic"``: rank ``r`` takes items ``r, r + size, ...``;
- ``"dynamic"``: the root hands out one item at a time to whichever rank asks
  next, so items of unequal cost balance. The root only hands out items when
  there are more than two ranks; with two ranks it also works on items and
  answers requests between its own items (the other rank may then wait for at
  most one of the root's items). With one rank every schedule is a plain loop.

Errors: an exception raised by ``fn`` never leaves ranks waiting. The rank
stops taking items, the others finish the item they hold, and every rank
raises the exception of the lowest failing item index (the rank where it
happened raises the original object), marked ``agreed = True`` like
:meth:`World.agree`. Exceptions that cannot be pickled arrive as
:class:`RuntimeError`. ``KeyboardInterrupt`` and other non-``Exception``
errors are not caught: the command line aborts the job.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Sequence

from medhpc.parallel.comm import World, portable_exception
from medhpc.parallel.geometry import block_range, cyclic_items

SCHEDULES = ("block", "cyclic", "dynamic")

_TAG_REQUEST = 4201
_TAG_ASSIGN = 4202
_STOP = -1


def static_items(world: World, n: int, schedule: str = "block") -> list[int]:
    """Indices of the items this rank processes under a ``"block"`` or ``"cyclic"`` split."""
    if schedule == "block":
        return list(range(*block_range(n, world.size, world.rank)))
    if schedule == "cyclic":
        return list(cyclic_items(n, world.size, world.rank))
    raise ValueError(f"schedule {schedule!r}: expected 'block' or 'cyclic'")


def map_items(world: World, items: Sequence[Any], fn: Callable[[Any], Any],
              schedule: str = "block", root: int = 0, gather_to: str = "all",
              progress: Callable[[int, int], None] | None = None) -> list | None:
    """Apply ``fn`` to every item, spread over the ranks; return the results in input order.

    Parameters
    ----------
    world : World
    items : sequence
        The same sequence on every rank; ``fn(items[i])`` runs on one rank only.
    fn : callable
        Returns a picklable result.
    schedule : {"block", "cyclic", "dynamic"}
    root : int
        The rank that hands out items (``"dynamic"``) and collects results.
    gather_to : {"all", "root"}
        Where the result list is returned; other ranks get ``None``.
    progress : callable, optional
        ``progress(done, total)`` after each item finished: on ``root`` over all items with
        one rank or the dynamic schedule, on every rank over its own items otherwise.

    Returns
    -------
    list or None
        ``[fn(item) for item in items]`` on the ranks that ``gather_to`` names.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if gather_to not in ("all", "root"):
        raise ValueError(f"gather_to {gather_to!r}: expected 'all' or 'root'")
    report = progress or (lambda done, total: None)
    if world.size == 1:
        results = []
        for item in items:
            results.append(fn(item))
            report(len(results), len(items))
        return results
    if schedule == "dynamic":
        results, failure, own_error = _dynamic(world, items, fn, root, report)
    else:
        results, failure, own_error = _static(world, items, fn, schedule, root, gather_to,
                                              report)
    if failure is not None:
        index, exc = failure
        if own_error is not None and own_error[0] == index:
            exc = own_error[1]
        exc.agreed = True
        raise exc
    if gather_to == "root" and world.rank != root:
        return None
    return results


def _pickled(message, fallback) -> bytes:
    """Pickle ``message``, or ``fallback()`` when ``message`` cannot be pickled."""
    try:
        return pickle.dumps(message)
    except Exception as exc:
        return pickle.dumps(fallback(exc))


def _attempt(fn, item):
    """Return ``(result, None)`` or ``(None, exception)``."""
    try:
        return fn(item), None
    except Exception as exc:
        return None, exc


def _static(world: World, items, fn, schedule: str, root: int, gather_to: str, report):
    """Block or cyclic split; return (results, first failure, own failure)."""
    done, own_error = [], None
    mine = static_items(world, len(items), schedule)
    for index in mine:
        result, exc = _attempt(fn, items[index])
        if exc is not None:
            own_error = (index, exc)
            break
        done.append((index, result))
        report(len(done), len(mine))
    failure = None if own_error is None else (own_error[0], portable_exception(own_error[1]))

    def unpicklable(exc):
        first = done[0][0] if done else 0
        return [], failure or (first, RuntimeError(
            f"results of rank {world.rank} cannot be sent: {type(exc).__name__}: {exc}"))

    report = _pickled((done, failure), unpicklable)
    reports = world.allgather(report) if gather_to == "all" else world.gather(report, root=root)
    results = first_failure = None
    if reports is not None:
        results = [None] * len(items)
        failures = []
        for pairs, rank_failure in map(pickle.loads, reports):
            for index, result in pairs:
                results[index] = result
            if rank_failure is not None:
                failures.append(rank_failure)
        first_failure = min(failures, key=lambda f: f[0]) if failures else None
    if gather_to == "root":
        first_failure = world.bcast(first_failure, root=root)
    return results, first_failure, own_error


def _dynamic(world: World, items, fn, root: int, report):
    """Root hands out items on request; return (results, first failure, own failure)."""
    if world.rank == root:
        results, failure, own_error = _serve(world, items, fn, report)
        outcome = _pickled((results, failure), lambda exc: (None, (0, RuntimeError(
            f"results cannot be sent: {type(exc).__name__}: {exc}"))))
    else:
        own_error = _ask_for_work(world, items, fn, root)
        outcome = None
    results, failure = pickle.loads(world.bcast(outcome, root=root))
    return results, failure, own_error


def _serve(world: World, items, fn, report):
    """Root's side of the dynamic schedule."""
    results = [None] * len(items)
    state = {"next": 0, "failure": None, "active": world.size - 1, "done": 0}

    def finished_one():
        state["done"] += 1
        report(state["done"], len(items))
    own_error = None
    root_works = world.size == 2

    def record_failure(index, exc):
        if state["failure"] is None or index < state["failure"][0]:
            state["failure"] = (index, exc)

    def answer_request():
        message, source, _ = world.recv_obj(tag=_TAG_REQUEST)
        finished = pickle.loads(message)
        if finished is not None:
            index, ok, value = finished
            if ok:
                results[index] = value
                finished_one()
            else:
                record_failure(index, value)
        if state["failure"] is None and state["next"] < len(items):
            world.send_obj(state["next"], source, tag=_TAG_ASSIGN)
            state["next"] += 1
        else:
            world.send_obj(_STOP, source, tag=_TAG_ASSIGN)
            state["active"] -= 1

    while state["active"] > 0 or (root_works and state["failure"] is None
                                  and state["next"] < len(items)):
        if root_works and state["failure"] is None and state["next"] < len(items):
            while world.iprobe(tag=_TAG_REQUEST):
                answer_request()
            if state["failure"] is not None or state["next"] >= len(items):
                continue
            index = state["next"]
            state["next"] += 1
            result, exc = _attempt(fn, items[index])
            if exc is None:
                results[index] = result
                finished_one()
            else:
                own_error = (index, exc)
                record_failure(index, portable_exception(exc))
        else:
            answer_request()
    return results, state["failure"], own_error


def _ask_for_work(world: World, items, fn, root: int):
    """A worker's side of the dynamic schedule; return its own failure, if any."""
    finished, own_error = pickle.dumps(None), None
    while True:
        world.send_obj(finished, root, tag=_TAG_REQUEST)
        index = world.recv_obj(source=root, tag=_TAG_ASSIGN)[0]
        if index == _STOP:
            return own_error
        result, exc = _attempt(fn, items[index])
        if exc is None:
            finished = _pickled((index, True, result), lambda error: (index, False, RuntimeError(
                f"result of item {index} cannot be sent: {type(error).__name__}: {error}")))
        else:
            own_error = (index, exc)
            finished = pickle.dumps((index, False, portable_exception(exc)))
