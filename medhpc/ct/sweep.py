"""ct-train --sweep: a grid of training configurations on groups of ranks.

The sweep file (TOML) names the settings that vary; everything else comes from the
command line::

    # every combination of the [grid] values is one configuration
    [grid]
    lr = [0.01, 0.003]
    widths = [[8, 16, 32], [16, 32, 64]]

    # and/or configurations listed one by one
    [[configuration]]
    optimizer = "adamw"
    lr = 0.0003

The ranks are split into groups of ``--ranks-per-run``; configuration ``i`` runs on
group ``i % groups`` (each group runs its configurations one after the other), with the
same training as a plain ct-train on that many ranks, into ``OUT/<name>/``. A
configuration that fails (bad values, a patch the network cannot take) is recorded
and the group goes on with its next one; ``OUT/sweep.jsonl`` has one line per
configuration, ``OUT/sweep.csv`` the summary table and, with ``--png``,
``OUT/sweep.png`` one validation curve per configuration.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import time
import tomllib
from pathlib import Path

from medhpc.ct.settings import TrainSettings
from medhpc.errors import InputError, one_line
from medhpc.io.atomic import atomic_path, check_output_free
from medhpc.runtime.log import Log
from medhpc.runtime.timing import StageTimer

#: Settings a sweep may vary (TrainSettings fields).
SWEEPABLE = tuple(f.name for f in dataclasses.fields(TrainSettings))
TUPLE_SETTINGS = ("patch", "widths")


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One point of the sweep: its name and the settings it changes."""

    index: int
    name: str
    changes: dict


def read_sweep(path) -> list[Configuration]:
    """The configurations of a sweep file, checked (one clear line on a bad file)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: sweep file not found; expected a TOML file with a [grid] "
                         f"table or [[configuration]] entries") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a TOML file ({one_line(error)}); expected a [grid] "
                         f"table or [[configuration]] entries") from None
    unknown_tables = sorted(set(document) - {"grid", "configuration"})
    if unknown_tables:
        raise InputError(f"{path}: unknown table(s) {', '.join(unknown_tables)}; expected "
                         f"[grid] and/or [[configuration]]")
    listed = document.get("configuration", [])
    grid = document.get("grid", {})
    if not isinstance(listed, list) or not isinstance(grid, dict):
        raise InputError(f"{path}: expected [grid] as a table and [[configuration]] as a "
                         f"list of tables")
    changes = []
    for entry in listed:
        changes.append(_checked(path, dict(entry), "[[configuration]]"))
    if grid:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise InputError(f"{path}: [grid] {key} = {values!r}; expected a non-empty "
                                 f"list of values")
        _checked(path, {key: values[0] for key, values in grid.items()}, "[grid]")
        keys = list(grid)
        for combination in itertools.product(*(grid[k] for k in keys)):
            changes.append(_checked(path, dict(zip(keys, combination)), "[grid]"))
    if not changes:
        raise InputError(f"{path}: no configurations; expected a [grid] table or "
                         f"[[configuration]] entries")
    return [Configuration(i, configuration_name(i, c), c) for i, c in enumerate(changes)]


def _checked(path, changes: dict, where: str) -> dict:
    unknown = sorted(set(changes) - set(SWEEPABLE))
    if unknown:
        raise InputError(f"{path}: {where} setting(s) {', '.join(unknown)} unknown; expected "
                         f"some of {', '.join(SWEEPABLE)}")
    for key in TUPLE_SETTINGS:
        if key in changes:
            value = changes[key]
            value = [value] * 3 if key == "patch" and isinstance(value, int) else value
            if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                raise InputError(f"{path}: {where} {key} = {changes[key]!r}; expected a list "
                                 f"of integers")
            changes[key] = tuple(value)
    return changes


def configuration_name(index: int, changes: dict) -> str:
    """``c003-lr0.003-widths8.16.32``: the index, then each changed setting."""
    parts = [f"c{index:03d}"]
    for key, value in changes.items():
        text = ".".join(map(str, value)) if isinstance(value, tuple) else str(value)
        parts.append(f"{key}{text}".replace("/", "_").replace(" ", ""))
    return "-".join(parts)[:120]


def run_sweep(run, data, out, base: TrainSettings, configurations: list[Configuration],
              ranks_per_run: int, resume: bool = False, png: bool = False) -> list[dict]:
    """Run every configuration on its group of ranks; return the records (on every rank)."""
    from medhpc.ct.run import MODEL_NAME, Training

    world = run.world
    out = Path(out)

    def check():
        if world.size % ranks_per_run:
            raise InputError(f"--ranks-per-run {ranks_per_run}: {world.size} ranks do not "
                             f"split into groups of {ranks_per_run}; expected a divisor of "
                             f"the rank count")
        if not resume:  # a re-run into the same folder is refused before any training
            for name in ("sweep.jsonl", "sweep.csv") + (("sweep.png",) if png else ()):
                check_output_free(out / name, run.overwrite)
            for configuration in configurations:
                check_output_free(out / configuration.name / MODEL_NAME, run.overwrite)

    world.agree(check)
    groups = world.size // ranks_per_run
    group = world.rank // ranks_per_run
    if run.dry_run:
        run.print_plan({"sweep": [{"name": c.name, "group": c.index % groups,
                                   "settings": _plain(c.changes)} for c in configurations],
                        "groups": groups, "ranks_per_run": ranks_per_run})
        return []
    sub = world.split(group)
    records = []
    with run.stage("run configurations", "other"):
        for configuration in configurations[group::groups]:
            settings = dataclasses.replace(base, **configuration.changes)
            log = Log(sub.rank, sub.size, run.log.verbosity, prefix=f"[{configuration.name}] ")
            sub_run = dataclasses.replace(
                run, world=sub, timer=StageTimer(run.timer.synchronize), log=log,
                timings_path=None, summary={}, breakdown=None, finished=False)
            folder = out / configuration.name
            started = time.perf_counter()
            record = {"name": configuration.name, "group": group, "ranks": sub.size,
                      "settings": _plain(configuration.changes)}
            try:
                restart = resume and (folder / "checkpoint.pt").exists()
                Training(sub_run, data, folder, settings, resume=restart, png=png).execute()
                record.update(status="ok", **_outcome(sub_run.summary))
            except Exception as error:
                if sub.size > 1 and not getattr(error, "agreed", False):
                    raise  # one rank of a group failed alone: end the job, none left waiting
                record.update(status="failed", error=one_line(error))
                sub_run.log.notice(f"failed: {one_line(error)}")
            record["seconds"] = round(time.perf_counter() - started, 3)
            if sub.is_root:
                records.append(record)
    with run.stage("gather summary", "comm"):
        gathered = world.gather(records)
    summary = None
    if world.is_root:
        summary = sorted((r for part in gathered for r in part), key=lambda r: r["name"])
        write_summary(out, summary, png)
        run.log.notice(summary_table(summary))
    return world.bcast(summary)


def _plain(changes: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}


def _outcome(summary: dict) -> dict:
    dice = summary.get("dice") or {}
    values = [v for v in dice.values() if v is not None]
    return {"epochs": summary.get("epochs"), "loss": summary.get("loss"), "dice": dice,
            "mean_dice": sum(values) / len(values) if values else None}


def summary_table(records: list[dict]) -> str:
    """The sweep's summary as a text table (which configurations failed, and why)."""
    lines = [f"{'configuration':<44} {'status':<7} {'loss':>8} {'mean Dice':>9} {'s':>8}"]
    for r in records:
        loss = "" if r.get("loss") is None else f"{r['loss']:.4f}"
        dice = "" if r.get("mean_dice") is None else f"{r['mean_dice']:.3f}"
        lines.append(f"{r['name']:<44} {r['status']:<7} {loss:>8} {dice:>9} "
                     f"{r['seconds']:>8.1f}")
        if r["status"] != "ok":
            lines.append(f"    {r['error']}")
    failed = [r["name"] for r in records if r["status"] != "ok"]
    lines.append(f"{len(records) - len(failed)} of {len(records)} configuration(s) finished"
                 + (f"; failed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def write_summary(out: Path, records: list[dict], png: bool) -> None:
    """``sweep.jsonl`` (one line per configuration), ``sweep.csv`` and ``sweep.png``."""
    with atomic_path(out / "sweep.jsonl", overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    with atomic_path(out / "sweep.csv", overwrite=True) as tmp:
        with open(tmp, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["configuration", "status", "ranks", "epochs", "loss",
                             "mean_dice", "seconds", "settings", "error"])
            for r in records:
                writer.writerow([r["name"], r["status"], r["ranks"], r.get("epochs", ""),
                                 "" if r.get("loss") is None else f"{r['loss']:.6f}",
                                 "" if r.get("mean_dice") is None else f"{r['mean_dice']:.4f}",
                                 f"{r['seconds']:.3f}", json.dumps(r["settings"]),
                                 r.get("error", "")])
    if png:
        from medhpc.ct.figures import plot_sweep_curves

        plot_sweep_curves(out / "sweep.png", out, records)
