"""Where the time went: draw stage-timing breakdowns as per-rank stacked bars.

The breakdown documents are the JSON that
:meth:`medhpc.runtime.timing.StageTimer.breakdown` produces. Each rank gets one
horizontal bar, stacked from its stage times (colours grouped by stage kind)
and ended by a pale "not in a stage" remainder up to that rank's wall time.
Two documents (before and after a change) are drawn side by side on the same
time axis, with the speed-up of the wall time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medhpc.errors import InputError, MedhpcError
from medhpc.io.atomic import atomic_path
from medhpc.runtime.timing import KINDS

REQUIRED_KEYS = ("command", "ranks", "wall_seconds", "wall_per_rank", "stages")
STAGE_KEYS = ("name", "kind", "per_rank")
KIND_COLORMAPS = {"io": "Blues", "transfer": "PuRd", "kernel": "Greens",
                  "comm": "Oranges", "compile": "Purples", "other": "Greys"}
REMAINDER_COLOR = "#dcdcdc"


def load_breakdown(path) -> dict:
    """Read and check a breakdown JSON file.

    Raises
    ------
    InputError
        When the file cannot be read, is not JSON, or is not a medhpc timing file.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the timing file ({exc.__class__.__name__}: "
                         f"{getattr(exc, 'strerror', None) or exc})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); "
                         f"expected a medhpc timing file") from None
    check_breakdown(document, str(path))
    return document


def check_breakdown(document, source: str) -> None:
    """Raise :class:`InputError` naming ``source`` unless ``document`` is a breakdown."""
    if not isinstance(document, dict) or "stages" not in document:
        raise InputError(f"{source}: not a medhpc timing file (expected a JSON object "
                         f"with 'stages', as written by --timing)")
    missing = [key for key in REQUIRED_KEYS if key not in document]
    if missing:
        raise InputError(f"{source}: medhpc timing file lacks {', '.join(map(repr, missing))}")
    walls = document["wall_per_rank"]
    if not isinstance(walls, list) or not walls or not all(_is_time(w) for w in walls):
        raise InputError(f"{source}: 'wall_per_rank' must be a non-empty list of seconds")
    if not _is_time(document["wall_seconds"]):
        raise InputError(f"{source}: 'wall_seconds' must be a number of seconds")
    if not isinstance(document["stages"], list):
        raise InputError(f"{source}: 'stages' must be a list")
    for index, stage in enumerate(document["stages"]):
        if not isinstance(stage, dict) or any(key not in stage for key in STAGE_KEYS):
            raise InputError(f"{source}: stage {index} lacks one of {', '.join(STAGE_KEYS)}")
        if stage["kind"] not in KINDS:
            raise InputError(f"{source}: stage {stage['name']!r} has kind {stage['kind']!r}; "
                             f"expected one of {', '.join(KINDS)}")
        seconds = stage["per_rank"]
        if (not isinstance(seconds, list) or len(seconds) != len(walls)
                or not all(_is_time(s) for s in seconds)):
            raise InputError(f"{source}: stage {stage['name']!r} needs {len(walls)} per-rank "
                             f"times, one per entry of 'wall_per_rank'")


def _is_time(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def speedup(before: dict, after: dict) -> float:
    """Wall time of ``before`` over wall time of ``after`` (inf when ``after`` took no time)."""
    return before["wall_seconds"] / after["wall_seconds"] if after["wall_seconds"] > 0 else math.inf


def plot_breakdown(documents: list[dict], out_png, titles: list[str] | None = None,
                   overwrite: bool = False) -> Path:
    """Draw one or two breakdowns as per-rank stacked bars into a PNG.

    Parameters
    ----------
    documents : list of dict
        One breakdown, or two (before, after) drawn side by side on one time axis.
    out_png : str or Path
        The image to write (atomically).
    titles : list of str, optional
        A label per document (for instance "before", "after"), shown above the
        command, rank count and wall time.
    overwrite : bool
        Whether an existing ``out_png`` may be replaced.

    Returns
    -------
    Path
        ``out_png``.
    """
    if len(documents) not in (1, 2):
        raise InputError(f"report draws one or two timing files, not {len(documents)}")
    if titles is not None and len(titles) != len(documents):
        raise InputError(f"{len(titles)} title(s) for {len(documents)} timing file(s)")
    for index, document in enumerate(documents):
        check_breakdown(document, f"timing document {index + 1}")
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise MedhpcError("drawing the report needs matplotlib: "
                          "pip install 'medhpc[plot]'") from None

    colors = stage_colors(documents)
    most_ranks = max(len(document["wall_per_rank"]) for document in documents)
    height = min(14.0, max(4.0, 2.5 + 0.12 * most_ranks))
    figure = Figure(figsize=(7.0 * len(documents), height), dpi=110,
                    layout="constrained")
    axes = figure.subplots(1, len(documents), sharex=True, squeeze=False)[0]
    for index, (ax, document) in enumerate(zip(axes, documents)):
        _draw_panel(ax, document, colors, None if titles is None else titles[index])
    axes[0].set_xlim(0, 1.02 * max(max(d["wall_per_rank"]) for d in documents) or 1.0)
    if len(documents) == 2:
        before, after = documents
        figure.suptitle(f"speed-up {speedup(before, after):.2f}x  "
                        f"(wall {before['wall_seconds']:.3g} s -> {after['wall_seconds']:.3g} s)",
                        fontsize=13, fontweight="bold")

    handles = [Patch(facecolor=color, label=f"{name} ({kind})")
               for (name, kind), color in colors.items()]
    handles.append(Patch(facecolor=REMAINDER_COLOR, label="not in a stage"))
    columns = max(1, min(len(handles), 4 * len(documents)))
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=8,
                  frameon=False)

    out_png = Path(out_png)
    with atomic_path(out_png, overwrite=overwrite) as tmp:
        figure.savefig(tmp, format="png")
    return out_png


def stage_colors(documents: list[dict]) -> dict[tuple[str, str], tuple]:
    """Give each (stage, kind) of the documents a colour: one colour family per kind.

    The result is ordered by kind (io, transfer, kernel, comm, other), then by
    first appearance, as the legend lists it.
    """
    from matplotlib import colormaps

    names_by_kind: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for document in documents:
        for stage in document["stages"]:
            names = names_by_kind[stage["kind"]]
            if stage["name"] not in names:
                names.append(stage["name"])
    colors = {}
    for kind, names in names_by_kind.items():
        colormap = colormaps[KIND_COLORMAPS[kind]]
        lightest = 0.55 if kind == "other" else 0.4
        for name, shade in zip(names, _shades(len(names), lightest)):
            colors[(name, kind)] = colormap(shade)
    return colors


def _shades(count: int, lightest: float = 0.4, darkest: float = 0.9) -> list[float]:
    """``count`` shades of one colormap, neighbours alternating dark and light."""
    if count == 1:
        return [(lightest + darkest) / 2]
    evenly = [lightest + (darkest - lightest) * i / (count - 1) for i in range(count)]
    half = (count + 1) // 2
    dark, light = evenly[half:][::-1], evenly[:half][::-1]
    return [shade for pair in zip(light, dark + [None]) for shade in pair if shade is not None]


def _draw_panel(ax, document: dict, colors: dict, label: str | None) -> None:
    """Stacked horizontal bars, one per rank, of one breakdown."""
    walls = document["wall_per_rank"]
    ranks = list(range(len(walls)))
    bar_height = 0.8 if len(walls) <= 32 else 0.95
    left = [0.0] * len(walls)
    for stage in document["stages"]:
        ax.barh(ranks, stage["per_rank"], left=left, height=bar_height,
                color=colors[(stage["name"], stage["kind"])], linewidth=0)
        left = [start + seconds for start, seconds in zip(left, stage["per_rank"])]
    remainder = [max(0.0, wall - busy) for wall, busy in zip(walls, left)]
    ax.barh(ranks, remainder, left=left, height=0.4 * bar_height, color=REMAINDER_COLOR,
            linewidth=0)
    ax.axvline(document["wall_seconds"], color="black", linestyle="--", linewidth=0.8)

    from matplotlib.ticker import MaxNLocator

    ax.set_ylim(len(walls) - 0.5, -0.5)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(len(walls), 16), integer=True))
    ax.set_ylabel("rank")
    ax.set_xlabel("seconds")
    ax.grid(axis="x", linewidth=0.5, alpha=0.5)
    ax.set_axisbelow(True)

    busy_mean = sum(left) / len(left)
    balance = f", busiest/mean rank {max(left) / busy_mean:.2f}" if busy_mean > 0 else ""
    nodes = document.get("nodes", 1)
    where = f"{document['ranks']} rank(s)" + (f" on {nodes} nodes" if nodes and nodes > 1 else "")
    lines = [label] if label else []
    lines.append(f"{document['command'] or '(no command)'}: {where}")
    lines.append(f"wall {document['wall_seconds']:.3g} s{balance}")
    ax.set_title("\n".join(lines), fontsize=10)
