"""``kvmpfn audit --format json`` (docs/trace-format.md, JSON report).

>>> print(render(report))                    # doctest: +SKIP
{"version": 1, "traces": [{"trace": "traces/a.jsonl", "status": "fail", "events": 12, "findings": [...],
 "expected": {}, "new": {"refcount-leak": 1}, "missing": {}}], "summary": {..., "by_code": {...}}}

Only the elements of ``findings`` lists have a ``code`` member; code counts are maps keyed by code. Traces
that ``--fail-fast`` did not run are left out (``summary.not_run`` counts them). No timings.
"""

from __future__ import annotations

import json
from typing import Any

from kvmpfn.report import AuditReport, TraceOutcome


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
    return {
        "version": 1,
        "traces": [trace_document(o) for o in report.ran],
        "summary": report.summary(),
    }


def render(report: AuditReport) -> str:
    """The JSON report as text, indented, with a trailing newline."""
    return json.dumps(document(report), indent=2) + "\n"
