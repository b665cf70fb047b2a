"""``kvmpfn replay``'s report: plain text (the same words on a terminal, coloured by rich) and JSON.

The text names every finding: code, where it was detected (line, seq, audit point), its subject, its message
and its provenance, one line per reference or record behind it.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from kvmpfn.report import finding_text, provenance_text, safe

FINDINGS_SHOWN = 20  # findings listed without -v
PROVENANCE_SHOWN = 5  # provenance lines per finding without -v


def replay_doc(result: Any) -> dict[str, Any]:
    """The JSON document of one replay (deterministic: no timings)."""
    doc: dict[str, Any] = {
        "version": 1,
        "trace": result.trace,
        "mmu": result.mmu,
        "kernel": result.kernel,
        "options": result.options,
        "events": result.events,
        "findings": result.findings,
        "summary": result.summary(),
    }
    if result.error is not None:
        doc["error"] = result.error
    if result.interrupted:
        doc["interrupted"] = True
    return doc


def replay_json(result: Any) -> str:
    return json.dumps(replay_doc(result), indent=2) + "\n"


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + "s" * (count != 1)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


def replay_lines(result: Any, *, quiet: bool = False, verbose: bool = False, hint: str = "") -> list[tuple[str, str]]:
    """The text report as (style, line) pairs; the style is for rich, the words are the same without it.
    ``hint``: the command that explains a finding, shown after the findings."""
    lines: list[tuple[str, str]] = []
    summary = result.summary()
    n = len(result.findings)
    if not quiet:
        what = f"{result.mmu} MMU, kernel {result.kernel}" if result.mmu else "not started"
        lines.append(("bold", f"{safe(result.trace)}: {_n(result.events, 'event')} ({what})"))
        lines.append(("", f"  results: {_counts(summary['results'])}"))
        if "shadow_pages" in summary:
            lines.append(
                (
                    "",
                    f"  at the end: {_n(summary['shadow_pages'], 'shadow page')}, {_n(summary['sptes'], 'leaf spte')}, "
                    f"{_n(summary['frames_referenced'], 'frame')} referenced",
                )
            )
    if n and not quiet:
        lines.append(("bold red", f"  {n} finding{'s' * (n != 1)}: {_counts(summary['by_code'])}"))
    elif not quiet:
        lines.append(("green", "  no findings"))
    limit = None if verbose else PROVENANCE_SHOWN
    shown = result.findings if verbose else result.findings[:FINDINGS_SHOWN]
    for i, finding in enumerate(shown, 1):
        lines.append(("red", f"  [{i}] {finding_text(finding)}"))
        prov = finding.get("provenance") or []
        for entry in prov[:limit]:
            lines.append(("dim", f"      {provenance_text(entry)}"))
        if limit is not None and len(prov) > limit:
            lines.append(("dim", f"      ... {len(prov) - limit} more (-v shows all)"))
    if len(shown) < n:
        rest = Counter(f["code"] for f in result.findings[len(shown) :])
        lines.append(("dim", f"  ... {n - len(shown)} more: {_counts(dict(sorted(rest.items())))} (-v shows all)"))
    if n and hint and not quiet:
        lines.append(("dim", f"  the history behind a finding: {hint}"))
    if result.interrupted:
        lines.append(("bold yellow", f"  interrupted at event {result.events}: the report covers the events before it"))
    return lines


def replay_text(result: Any, *, quiet: bool = False, verbose: bool = False, hint: str = "") -> str:
    lines = replay_lines(result, quiet=quiet, verbose=verbose, hint=hint)
    return "".join(line + "\n" for _, line in lines)
