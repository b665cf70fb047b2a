"""``kvmpfn audit --format junit``: JUnit XML for CI test dashboards.

``<testsuites>`` holding one ``<testsuite name="kvmpfn audit">``, one ``<testcase>`` per trace:
``classname`` is the trace's directory (``traces/tdp`` → ``traces.tdp``), ``name`` its file name. A trace
whose findings differ from the baseline has a ``<failure>`` listing the difference and the findings; an input
error is an ``<error>``; a trace that ``--fail-fast`` or Ctrl-C stopped before is ``<skipped>``. No ``time``,
``timestamp`` or ``hostname``.
"""

from __future__ import annotations

import posixpath
import re
import xml.etree.ElementTree as ET

from kvmpfn.report import ERROR, FAIL, NOT_RUN, AuditReport, TraceOutcome, diff_text, finding_text

# Characters XML 1.0 cannot hold, even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def classname(trace: str) -> str:
    """The testcase's class: the trace's directory, dotted."""
    parts = [p for p in posixpath.dirname(trace.replace("\\", "/")).split("/") if p not in ("", ".")]
    return ".".join(parts) or "."


def _details(outcome: TraceOutcome) -> str:
    lines = []
    if outcome.error:
        lines.append(outcome.error)
    diff = diff_text(outcome)
    if diff:
        lines.append(f"findings differ from the baseline: {diff}")
    if outcome.expected:
        lines.append("expected: " + ", ".join(f"{c} {n}" for c, n in sorted(outcome.expected.items())))
    lines.extend(finding_text(f) for f in outcome.findings)
    return _clean("\n".join(lines))


def testcase(outcome: TraceOutcome, why_not_run: str = "--fail-fast stopped the gate") -> ET.Element:
    case = ET.Element(
        "testcase",
        {"classname": _clean(classname(outcome.trace)), "name": _clean(posixpath.basename(outcome.trace))},
    )
    if outcome.status == FAIL:
        message = f"findings differ from the baseline: {diff_text(outcome)}"
        failure = ET.SubElement(case, "failure", {"message": _clean(message), "type": "regression"})
        failure.text = _details(outcome)
    elif outcome.status == ERROR:
        ET.SubElement(
            case, "error", {"message": _clean(outcome.error or "input error"), "type": "input-error"}
        ).text = _details(outcome)
    elif outcome.status == NOT_RUN:
        ET.SubElement(case, "skipped", {"message": f"not run: {why_not_run}"})
    return case


def render(report: AuditReport) -> str:
    """The JUnit XML document as text, with an XML declaration and a trailing newline."""
    outcomes = report.outcomes
    counts = {
        "tests": str(len(outcomes)),
        "failures": str(sum(o.status == FAIL for o in outcomes)),
        "errors": str(sum(o.status == ERROR for o in outcomes)),
        "skipped": str(sum(o.status == NOT_RUN for o in outcomes)),
    }
    root = ET.Element("testsuites", {"name": "kvmpfn audit", **counts})
    suite = ET.SubElement(root, "testsuite", {"name": "kvmpfn audit", **counts})
    why = "the gate was interrupted (Ctrl-C)" if report.interrupted else "--fail-fast stopped the gate"
    for outcome in outcomes:
        suite.append(testcase(outcome, why))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
