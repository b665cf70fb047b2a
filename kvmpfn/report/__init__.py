"""Audit reports: the outcome of a gate run (filled in by :mod:`kvmpfn.gate`) and its renderers — console
(rich on a terminal, plain text otherwise), json_report, sarif, junit.

Renderers are pure functions of an :class:`AuditReport`: the same outcomes give the same bytes. Timings
(``seconds``) are shown by the rich console only, never written to a document.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PASS, FAIL, ERROR, NOT_RUN = "pass", "fail", "error", "not run"

#: Finding fields that name its subject (docs/trace-format.md "Findings").
SUBJECT_FIELDS = ("pfn", "gfn", "addr", "spte", "region", "level", "slot")
#: Finding fields that are not its subject.
OTHER_FIELDS = ("code", "seq", "line", "point", "message", "provenance")


@dataclass
class TraceOutcome:
    """One trace of a gate run.

    :param trace: the path as the user gave it (a directory argument joined with the relative path)
    :param key: the baseline key: the path relative to the corpus root, POSIX separators
    :param status: ``pass``, ``fail``, ``error`` (input error) or ``not run`` (``--fail-fast`` stopped first)
    :param expected: the baseline entry, code → count (after ``--update-baseline``: the new entry)
    :param previous: the baseline entry that ``--update-baseline`` replaced, else ``None``
    :param seconds: wall time of the replay (terminal only)
    """

    trace: str
    key: str
    status: str = NOT_RUN
    events: int = 0
    findings: list[dict] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    previous: dict[str, int] | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Findings by code, sorted by code."""
        return dict(sorted(Counter(f["code"] for f in self.findings).items()))

    @property
    def new(self) -> dict[str, int]:
        """Codes found more often than the baseline expects: code → how many more."""
        counts = self.counts
        return {c: n - self.expected.get(c, 0) for c, n in counts.items() if n > self.expected.get(c, 0)}

    @property
    def missing(self) -> dict[str, int]:
        """Codes the baseline expects more often than found: code → how many fewer."""
        counts = self.counts
        return {c: n - counts.get(c, 0) for c, n in sorted(self.expected.items()) if n > counts.get(c, 0)}


@dataclass
class AuditReport:
    """A gate run: every selected trace in corpus order (including those ``--fail-fast`` did not run)."""

    outcomes: list[TraceOutcome]
    shard: tuple[int, int] | None = None
    seconds: float | None = None
    baselines_written: list[str] = field(default_factory=list)
    options: dict[str, Any] | None = None  # the replay options, as documents record them
    selection: dict[str, Any] | None = None  # a shard's whole selection: {"paths", "baseline", "traces"}
    interrupted: bool = False  # Ctrl-C stopped the run: the traces not run are "not run"

    @property
    def ran(self) -> list[TraceOutcome]:
        return [o for o in self.outcomes if o.status != NOT_RUN]

    def summary(self) -> dict[str, Any]:
        """Counts for documents: traces run, statuses, events, findings by code (no timings)."""
        ran = self.ran
        statuses = Counter(o.status for o in self.outcomes)
        by_code: Counter = Counter()
        for o in ran:
            by_code.update(o.counts)
        out: dict[str, Any] = {
            "traces": len(ran),
            "pass": statuses[PASS],
            "fail": statuses[FAIL],
            "error": statuses[ERROR],
            "not_run": statuses[NOT_RUN],
            "events": sum(o.events for o in ran),
            "by_code": dict(sorted(by_code.items())),
        }
        if self.shard is not None:
            out["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        if self.interrupted:
            out["interrupted"] = True
        return out


def counts_text(counts: dict[str, int], sign: str = "") -> str:
    """``{"refcount-leak": 2}`` → ``refcount-leak ×2`` (``sign`` "+" or "-" prefixes each count)."""
    return ", ".join(f"{code} {sign or '×'}{n}" for code, n in counts.items())


def diff_text(outcome: TraceOutcome) -> str:
    """How a trace's findings differ from its baseline: ``new refcount-leak +1; missing dirty-lost -1``."""
    parts = []
    if outcome.new:
        parts.append("new " + counts_text(outcome.new, "+"))
    if outcome.missing:
        parts.append("missing " + counts_text(outcome.missing, "-"))
    return "; ".join(parts)


def subject_text(finding: dict) -> str:
    """A finding's subject as ``name=value`` pairs (``pfn=0x100001 level=1``); fields this module does not
    know are shown too, so that nothing a newer auditor adds is hidden."""
    names = [n for n in SUBJECT_FIELDS if n in finding]
    names += [n for n in finding if n not in SUBJECT_FIELDS and n not in OTHER_FIELDS]
    parts = []
    for name in names:
        value = finding[name]
        parts.append(f"{name}={value if isinstance(value, str) else json.dumps(value, sort_keys=True)}")
    return " ".join(parts)


def safe(text: object) -> str:
    """``text`` with control characters (newlines, terminal escapes) escaped: input-derived strings (file names,
    labels) cannot forge report lines or drive a terminal."""
    text = str(text).translate(_CONTROL)
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # undecodable file-name bytes as \udcXX


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def provenance_text(entry: dict) -> str:
    """One provenance entry in words: ``reference taken at line 12 (seq 0) by gfn_to_pfn in tdp_page_fault,
    owned by spte 5 of shadow page gfn 0x0 level 1``. Fields it does not know are appended as ``name=value``."""
    known = ("seq", "line", "function", "caller", "owner", "task", "text_line")
    if "text_line" in entry:  # a record of a real kernel's tracepoint (kvmpfn check, x.recorded)
        text = f"{entry.get('function')} record at text line {entry['text_line']} (task {entry.get('task')})"
    elif "function" in entry:
        function = entry["function"]
        taken = not ("release" in function or function.startswith(("put", "kvm_set_")))
        verb = "reference taken" if taken else "released" if "release" in function or "put" in function else "call"
        text = f"{verb} at line {entry.get('line')} (seq {entry.get('seq')}) by {function}"
        if entry.get("caller"):
            text += f" in {entry['caller']}"
        if taken:
            text += f", owned by {entry['owner']}" if entry.get("owner") else ", owned by no spte"
    else:
        text = f"event at line {entry.get('line')} (seq {entry.get('seq')})"
        if entry.get("caller"):
            text += f" in {entry['caller']}"
    extra = [f"{k}={json.dumps(v, sort_keys=True)}" for k, v in entry.items() if k not in known]
    return safe(" ".join([text, *extra]))


def finding_text(finding: dict) -> str:
    """One line for a finding: ``refcount-leak at line 12 (seq 10, teardown): MESSAGE [pfn=0x100001]``."""
    where = f"line {finding['line']}" if finding.get("line") is not None else "end of trace"
    context = [f"seq {finding['seq']}"] if finding.get("seq") is not None else []
    if finding.get("point"):
        context.append(str(finding["point"]))
    if context:
        where += f" ({', '.join(context)})"
    subject = subject_text(finding)
    text = " ".join(p for p in (finding.get("message") or "", f"[{subject}]" if subject else "") if p)
    return safe(f"{finding['code']} at {where}" + (f": {text}" if text else ""))
