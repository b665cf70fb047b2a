"""``kvmpfn codes [NAME]`` and ``kvmpfn bugs``: the finding codes and the ``--bug`` switches, as text or JSON.

The facts come from :mod:`kvmpfn.vocab` (codes, invariants) and :mod:`kvmpfn.kvm.bugs`; this module only
renders them. An unknown name is an :class:`~kvmpfn.errors.InputError` with a suggestion.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from kvmpfn.errors import InputError
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.vocab import CODES, INVARIANTS, KERNELS, MMUS, Code

__all__ = ["CODES", "Code", "bugs_json", "bugs_text", "codes_json", "codes_text", "example_trace"]

#: The repository's trace corpus (present in a clone, not in an installed wheel).
TRACES = Path(__file__).resolve().parent.parent.parent / "traces"
#: Example traces that are not traces/findings/<code>.jsonl.
_EXAMPLES = {
    "fault-loop": "recorded/tdp-fault-loop.jsonl",
    "recorded-spte-mismatch": "recorded/spte-mismatch.trace-cmd.jsonl",
    "recorded-spte-pfn-change": "recorded/tdp-pfn-change.jsonl",
}
BASELINE_HOWTO = (
    "If a trace is expected to produce it, record it in the corpus baseline: `kvmpfn audit DIR --update-baseline` "
    'writes DIR/kvmpfn-baseline.json, {"version": 1, "traces": {"rel/path.jsonl": {"CODE": COUNT}}} '
    "(docs/trace-format.md, Baselines)."
)


def _known(name: str, table: dict[str, Any], what: str) -> None:
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else f"; `kvmpfn {what}s` lists them"
        raise InputError(what, f'unknown {what} "{name}"{hint}')


def example_trace(name: str) -> Path:
    """The corpus trace that shows code ``name`` (a path under :data:`TRACES`; it may be absent when installed)."""
    return TRACES / _EXAMPLES.get(name, f"findings/{name}.jsonl")


def _invariant(code: Code) -> str:
    if not code.invariant:
        return "none (a progress or recorded-trace check)"
    return f"{code.invariant}, {INVARIANTS[code.invariant]} (docs/kernel.md, Invariants: {code.invariant})"


def _explain(name: str) -> dict[str, Any]:
    code = CODES[name]
    trace = example_trace(name)
    return {
        "code": name,
        "subject": code.subject,
        "short": code.short,
        "check": code.check,
        "invariant": code.invariant or None,
        "recorded": code.recorded,
        "example": str(trace.relative_to(TRACES.parent)),
        "baseline": BASELINE_HOWTO,
    }


def codes_json(name: str | None = None) -> str:
    """Every code (``name`` None) or one, as a JSON document with a trailing newline."""
    if name is None:
        doc: Any = {"codes": [_explain(n) for n in CODES]}
    else:
        _known(name, CODES, "code")
        doc = _explain(name)
    return json.dumps(doc, indent=2) + "\n"


def codes_text(name: str | None = None) -> str:
    """The list of codes (``name`` None), or what one code means, its invariant, a trace that shows it and how
    to baseline it."""
    if name is None:
        width = max(map(len, CODES))
        lines = [f"{n:<{width}}  {c.invariant or '-':<4} {c.short}" for n, c in CODES.items()]
        return "\n".join(lines) + "\n`kvmpfn codes NAME` explains one.\n"
    _known(name, CODES, "code")
    code, info = CODES[name], _explain(name)
    trace = example_trace(name)
    out = [
        f"{name}: {code.short}",
        "",
        f"When: {code.check}",
        f"Subject: {code.subject}",
        f"Invariant: {_invariant(code)}",
        "",
        f"A trace that shows it: {info['example']}",
    ]
    if trace.is_file():
        comments = [line for line in trace.read_text().splitlines() if line.startswith("#")]
        out += ["  " + line for line in comments[:12]]
        defect = next((line for line in comments if line.startswith("# Defect: --bug ")), "")
        bug = defect.removeprefix("# Defect: --bug ").split(" ")[0].rstrip(".,")
        option = f" --bug {bug}" if bug in BUGS else ""
        out.append(f"  kvmpfn replay {info['example']}{option}")
    else:
        out.append("  (not in this installation: it is in the repository's traces/ directory)")
    out += ["", f"Baseline: {BASELINE_HOWTO}"]
    return "\n".join(out) + "\n"


def bugs_json(name: str | None = None) -> str:
    """Every ``--bug`` (or ``name``) with its source and the MMUs and kernel variants it applies to, as JSON."""
    chosen = _bugs(name)
    doc = {
        "bugs": [{"name": n, "text": b.text, "mmu": list(b.mmu), "kernels": list(b.kernels)} for n, b in chosen.items()]
    }
    return json.dumps(doc, indent=2) + "\n"


def _bugs(name: str | None) -> dict[str, Any]:
    if name is None:
        return dict(BUGS)
    _known(name, BUGS, "bug")
    return {name: BUGS[name]}


def bugs_text(name: str | None = None) -> str:
    """One line per ``--bug`` (or for ``name``): name, MMUs, kernel variants, source."""
    chosen = _bugs(name)
    width = max(map(len, chosen))
    lines = []
    for name, bug in chosen.items():
        kernels = "all kernels" if bug.kernels == KERNELS else ",".join(bug.kernels)
        mmu = ",".join(bug.mmu) if bug.mmu != MMUS else "both MMUs"
        lines.append(f"{name:<{width}}  {mmu:<10} {kernels:<16} {bug.text}")
    lines.append("Details: docs/kernel.md, Historical bugs.")
    return "\n".join(lines) + "\n"
