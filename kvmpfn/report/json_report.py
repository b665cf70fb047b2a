"""``kvmpfn audit --format json`` (docs/trace-format.md, JSON report).

>>> print(render(report))                    # doctest: +SKIP
{"version": 1, "traces": [{"trace": "traces/a.jsonl", "status": "fail", "events": 12, "findings": [...],
 "expected": {}, "new": {"refcount-leak": 1}, "missing": {}}], "summary": {..., "by_code": {...}}}

Only the elements of ``findings`` lists have a ``code`` member; code counts are maps keyed by code. Traces
that ``--fail-fast`` did not run are left out (``summary.not_run`` counts them). No timings. ``kvmpfn`` is
the version that wrote the report and ``options`` the replay options; a shard's report (``--shard i/n``) also
has ``selection``: the command's paths, ``--baseline`` and every trace of the unsharded selection, in order,
which is what :func:`merge` needs to rebuild the unsharded report.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from kvmpfn import __version__
from kvmpfn.errors import InputError
from kvmpfn.report import NOT_RUN, AuditReport, TraceOutcome

MAX_REPORT = 256 << 20  # bytes: a report larger than this is not read


def trace_document(outcome: TraceOutcome) -> dict[str, Any]:
    """One element of ``traces``: trace, status, events, findings, expected, new, missing and error if any."""
    doc: dict[str, Any] = {
        "trace": outcome.trace,
        "status": outcome.status,
        "events": outcome.events,
        "findings": outcome.findings,
        "expected": dict(sorted(outcome.expected.items())),
        "new": outcome.new,
        "missing": outcome.missing,
    }
    if outcome.error is not None:
        doc["error"] = outcome.error
    return doc


def document(report: AuditReport) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "kvmpfn": __version__, "options": report.options}
    if report.selection is not None:
        doc["selection"] = report.selection
    doc["traces"] = [trace_document(o) for o in report.ran]
    doc["summary"] = report.summary()
    return doc


def render(report: AuditReport) -> str:
    """The JSON report as text, indented, with a trailing newline."""
    return json.dumps(document(report), indent=2) + "\n"


class MergeError(InputError):
    """Shard reports that do not add up to one run."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


def load(path: str) -> dict[str, Any]:
    """A JSON report written by ``kvmpfn audit --format json``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_REPORT:
                raise MergeError(f"{path}: not a regular file of at most {MAX_REPORT >> 20} MiB")
            doc = json.loads(fh.read())
    except OSError as err:
        raise MergeError(f"{path}: cannot read the report: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise MergeError(f"{path}: not a JSON report: {str(err) or type(err).__name__}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or "traces" not in doc:
        raise MergeError(f"{path}: not a kvmpfn audit JSON report")
    return doc


def _outcome(path: str, doc: Any) -> TraceOutcome:
    try:
        return TraceOutcome(
            trace=doc["trace"],
            key="",
            status=doc["status"],
            events=doc["events"],
            findings=doc["findings"],
            expected=doc["expected"],
            error=doc.get("error"),
        )
    except (KeyError, TypeError):
        raise MergeError(f"{path}: a trace of the report is malformed") from None


def merge(reports: dict[str, dict[str, Any]]) -> AuditReport:
    """The report of the unsharded run, from its n shard reports (by path): same kvmpfn version, options and
    selection, shards 1..n each once, every trace of the selection in exactly one shard."""
    first_path, first = next(iter(reports.items()))
    count = str(first.get("summary", {}).get("shard", "")).partition("/")[2]
    shards: dict[str, str] = {}
    for path, doc in reports.items():
        shard = doc.get("summary", {}).get("shard")
        if "selection" not in doc or not isinstance(shard, str):
            raise MergeError(f"{path}: not the report of a shard (--shard i/n)")
        for name in ("kvmpfn", "options", "selection"):
            if doc.get(name) != first.get(name):
                raise MergeError(f'{path}: its "{name}" differs from that of {first_path}; not shards of one run')
        index, _, n = shard.partition("/")
        if n != count:
            raise MergeError(f"{path}: shard {shard}, but {first_path} is one of {count} shards")
        if doc["summary"].get("not_run"):
            raise MergeError(f"{path}: --fail-fast stopped this shard; its traces do not add up")
        if index in shards:
            raise MergeError(f"{path}: shard {shard} again (also {shards[index]})")
        shards[index] = path
    missing = [f"{i}/{count}" for i in range(1, int(count) + 1) if str(i) not in shards]
    if missing:
        raise MergeError(f"shard {', '.join(missing)} missing")
    by_trace: dict[str, TraceOutcome] = {}
    for path, doc in reports.items():
        for item in doc["traces"]:
            outcome = _outcome(path, item)
            if outcome.trace in by_trace:
                raise MergeError(f"{path}: {outcome.trace} is in two shards")
            by_trace[outcome.trace] = outcome
    order = first["selection"]["traces"]
    if set(by_trace) != set(order):
        raise MergeError("the shards do not hold the selection's traces exactly")
    outcomes = [by_trace[t] for t in order]
    for o in outcomes:
        if o.status == NOT_RUN:
            raise MergeError(f"{o.trace}: not run")
    return AuditReport(outcomes=outcomes, options=first["options"])
