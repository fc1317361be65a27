"""The JSON documents a run leaves: its log, its ``--timings`` breakdown, its ``--json`` summary.

Every subcommand writes them through this module, so they share one schema head:
``schema_version``, ``command``, ``medhpc_version`` and ``created`` (ISO 8601, local
time with offset), then the command's own fields. Non-finite numbers are written as
``null``, so the files are strict JSON for any reader (``jq``, JavaScript, pandas).

Schema versions: 1 (this layout; docs/architecture.md, "Run logs").
"""

from __future__ import annotations

import json
import math
import time

from medhpc import __version__
from medhpc.io.atomic import atomic_path
from medhpc.runtime.checkpoint import plain_data

SCHEMA_VERSION = 1


def run_document(command: str, body: dict) -> dict:
    """``body`` under the common head, as plain JSON-ready data."""
    head = {"schema_version": SCHEMA_VERSION, "command": command,
            "medhpc_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return _finite({**head, **plain_data({k: v for k, v in body.items() if k not in head})})


def dumps(document: dict) -> str:
    """Strict JSON text of a document made by :func:`run_document`."""
    return json.dumps(document, indent=2, allow_nan=False, default=str) + "\n"


def write_run_log(path, command: str, body: dict, timings: dict | None = None,
                  overwrite: bool = False) -> dict:
    """Write a run's JSON log atomically and return the document.

    Parameters
    ----------
    path : path-like
        The log file (``.json``).
    command : str
        The subcommand (``pet-recon``, ``lddmm``, ...).
    body : dict
        The command's fields (inputs, settings, history, results).
    timings : dict, optional
        The stage breakdown of :meth:`~medhpc.runtime.context.Run.finish`, kept under
        ``timings``.
    overwrite : bool
        Replace an existing log.
    """
    document = run_document(command, dict(body, timings=timings) if timings is not None
                            else body)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(dumps(document))
    return document


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
