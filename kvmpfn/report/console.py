"""``kvmpfn audit`` for people: a rich table on a terminal (with per-trace seconds and a progress bar on
stderr), plain text when piped or written with ``-o`` (no timings, so the same input gives the same text)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console
from rich.text import Text

from kvmpfn.report import ERROR, FAIL, NOT_RUN, PASS, AuditReport, TraceOutcome, counts_text, finding_text, safe
from kvmpfn.report.progress import progress as bar

LABELS = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR", NOT_RUN: "NOT RUN"}
STYLES = {PASS: "green", FAIL: "bold red", ERROR: "bold red", NOT_RUN: "dim"}


def _details(outcome: TraceOutcome) -> list[str]:
    """Lines under a trace: its input error, the findings of codes beyond the baseline, the missing codes and
    what ``--update-baseline`` changed."""
    if outcome.status == NOT_RUN:
        return []
    lines = []
    if outcome.error:
        lines.append(outcome.error)
    new = outcome.new
    lines.extend("+ " + finding_text(f) for f in outcome.findings if f["code"] in new)
    counts = outcome.counts
    lines.extend(
        f"- {code}: baseline expects {outcome.expected[code]}, found {counts.get(code, 0)}" for code in outcome.missing
    )
    if outcome.previous is not None and outcome.previous != outcome.expected:
        old = counts_text(dict(sorted(outcome.previous.items()))) or "clean"
        lines.append(f"baseline updated: {old} -> {counts_text(outcome.expected) or 'clean'}")
    return lines


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _summary_line(report: AuditReport, seconds: float | None = None) -> str:
    s = report.summary()
    parts = [f"{s['pass']} pass", f"{s['fail']} fail", f"{s['error']} error"]
    if s["not_run"]:
        parts.append(f"{s['not_run']} not run")
    shard = f" (shard {s['shard']})" if "shard" in s else ""
    took = f" in {seconds:.2f}s" if seconds is not None else ""
    findings = counts_text(s["by_code"]) or "none"
    traces, events = _plural(s["traces"], "trace"), _plural(s["events"], "event")
    return f"{traces}{shard}: {', '.join(parts)}; {events}{took}; findings: {findings}"


def _lines(report: AuditReport, seconds: bool, quiet: bool = False) -> list[tuple[str, str]]:
    """The report as (status, line) pairs: one line per trace, details indented under it. Nothing is cut or
    put in columns, so that paths and codes stay whole on a narrow terminal (they wrap instead)."""
    lines = []
    width = max((len(LABELS[o.status]) for o in report.outcomes), default=4)
    for o in report.outcomes:
        if quiet and o.status in (PASS, NOT_RUN) and o.previous is None:
            continue
        line = f"{LABELS[o.status]:<{width}}  {safe(o.trace)}"
        if o.status != NOT_RUN:
            line += f"  {_plural(o.events, 'event')}"
            if seconds and o.seconds is not None:
                line += f" in {o.seconds:.2f}s"
            if o.findings:
                line += f"  findings: {counts_text(o.counts)}"
        lines.append((o.status, line))
        lines.extend(("", f"{'':<{width}}    {safe(d)}") for d in _details(o))
    return lines


def render_text(report: AuditReport, quiet: bool = False) -> str:
    """The plain-text report: one line per trace (``quiet``: per failing trace), details indented under it, a
    summary line."""
    lines = [line for _, line in _lines(report, seconds=False, quiet=quiet)]
    lines.append(_summary_line(report))
    lines.extend(f"baseline written: {safe(path)}" for path in report.baselines_written)
    return "\n".join(lines) + "\n"


def print_rich(report: AuditReport, console: Console, quiet: bool = False) -> None:
    """The terminal report: the plain text's lines with each trace's seconds, the status in colour."""
    for status, line in _lines(report, seconds=True, quiet=quiet):
        text = Text(line, style="dim" if not status else "")
        if status:
            text.stylize(STYLES[status], 0, len(LABELS[status]))
        console.print(text, overflow="fold")
    console.print(Text(_summary_line(report, report.seconds)), overflow="fold")
    for path in report.baselines_written:
        console.print(Text(f"baseline written: {safe(path)}"), overflow="fold")


def show(report: AuditReport, stream: IO[str] | None = None, quiet: bool = False) -> None:
    """Print the report on ``stream`` (stdout): rich when it is a terminal, plain text otherwise."""
    stream = stream or sys.stdout
    if stream.isatty():
        print_rich(report, Console(file=stream, highlight=False), quiet)
    else:
        stream.write(render_text(report, quiet))
        stream.flush()


@contextmanager
def progress(total: int, stream: IO[str] | None = None) -> Iterator[Callable[[str], None]]:
    """The gate's progress (:mod:`kvmpfn.report.progress`, on a terminal only); yields ``advance(trace)``,
    called as each trace finishes."""
    with bar("auditing", total=total, unit="traces", stream=stream) as update:
        done = 0

        def advance(trace: str) -> None:
            nonlocal done
            done += 1
            update(done, safe(trace))

        yield advance
