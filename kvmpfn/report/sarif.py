"""``kvmpfn audit --format sarif``: SARIF 2.1.0 for code-scanning dashboards.

One run; the driver ``kvmpfn`` has one rule per finding code (:data:`kvmpfn.vocab.CODES`, plus any
code a finding carries that the table lacks). Each finding is a result of level ``error`` located at its trace
and line, with a ``baselineState``: per code, the first findings in trace order up to the baseline's count are
``unchanged``, the rest ``new``; a baseline finding that did not appear is an ``absent`` result located at the
trace alone. Input errors are tool execution notifications of the run's invocation. No timings.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import PurePath
from typing import Any
from urllib.parse import quote

from kvmpfn import __version__
from kvmpfn.report import AuditReport, TraceOutcome, subject_text
from kvmpfn.vocab import CODES, INVARIANTS

SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"


def artifact_uri(path: str) -> str:
    """A trace path as a URI reference: relative paths stay relative (POSIX separators, percent-encoded)."""
    if os.path.isabs(path):
        return PurePath(path).as_uri()
    return quote(path.replace(os.sep, "/"), safe="/")


def rule(code: str) -> dict[str, Any]:
    """The reportingDescriptor of a finding code."""
    known = CODES.get(code)
    short = known.short if known else f"kvmpfn finding {code}."
    check = known.check if known else short
    subject = known.subject if known else "see the finding"
    if known and known.invariant:
        inv = known.invariant
        check += f" Invariant {inv}, {INVARIANTS[inv]}: docs/kernel.md, Invariants: {inv}."
    return {
        "id": code,
        "name": "".join(part.capitalize() for part in code.split("-")),
        "shortDescription": {"text": short},
        "fullDescription": {"text": check},
        "help": {
            "text": f"{check} Subject: {subject}. `kvmpfn codes {code}` explains it. If the finding is expected "
            "for this trace, record it with `kvmpfn audit --update-baseline` (docs/trace-format.md, Baselines)."
        },
        "defaultConfiguration": {"level": "error"},
    }


def _location(trace: str, line: int | None = None) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": {"uri": artifact_uri(trace)}}
    if isinstance(line, int) and line >= 1:
        physical["region"] = {"startLine": line}
    return {"physicalLocation": physical}


def _error_line(outcome: TraceOutcome) -> int | None:
    match = re.match(re.escape(outcome.trace) + r":(\d+):", outcome.error or "")
    return int(match.group(1)) if match else None


def trace_results(outcome: TraceOutcome, rule_index: dict[str, int]) -> list[dict[str, Any]]:
    """The results of one trace: its findings in order, then the absent baseline findings."""
    results = []
    seen: Counter = Counter()
    for finding in outcome.findings:
        code = finding["code"]
        seen[code] += 1
        state = "unchanged" if seen[code] <= outcome.expected.get(code, 0) else "new"
        subject = subject_text(finding)
        text = f"{code}: {finding.get('message') or rule(code)['shortDescription']['text']}"
        text += f" [{subject}]" if subject else ""
        results.append(
            {
                "ruleId": code,
                "ruleIndex": rule_index[code],
                "level": "error",
                "message": {"text": text},
                "locations": [_location(outcome.trace, finding.get("line"))],
                "baselineState": state,
            }
        )
    for code, count in outcome.missing.items():
        text = (
            f"{code}: the baseline expects {outcome.expected[code]} in this trace, "
            f"the replay found {outcome.counts.get(code, 0)}."
        )
        for _ in range(count):
            results.append(
                {
                    "ruleId": code,
                    "ruleIndex": rule_index[code],
                    "level": "error",
                    "message": {"text": text},
                    "locations": [_location(outcome.trace)],
                    "baselineState": "absent",
                }
            )
    return results


def document(report: AuditReport) -> dict[str, Any]:
    ran = report.ran
    codes = list(CODES)
    extra = {c for o in ran for c in (*o.counts, *o.expected) if c not in CODES}
    codes += sorted(extra)
    rule_index = {code: i for i, code in enumerate(codes)}
    results = [r for o in ran for r in trace_results(o, rule_index)]
    notifications = [
        {
            "level": "error",
            "message": {"text": o.error},
            "locations": [_location(o.trace, _error_line(o))],
        }
        for o in ran
        if o.error is not None
    ]
    invocation: dict[str, Any] = {"executionSuccessful": not notifications}
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    driver = {"name": "kvmpfn", "version": __version__, "rules": [rule(c) for c in codes]}
    return {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{"tool": {"driver": driver}, "invocations": [invocation], "results": results}],
    }


def render(report: AuditReport) -> str:
    """The SARIF log as text, indented, with a trailing newline."""
    return json.dumps(document(report), indent=2) + "\n"
