"""Text and JSON renderings of ``kvmpfn mutants`` and ``kvmpfn compare`` results."""

from __future__ import annotations

import json


def mutants_json(results, paths) -> str:
    killed = sum(1 for r in results if r.verdict == "killed")
    doc = {
        "version": 1,
        "traces": list(paths),
        "mutants": [r.as_json() for r in results],
        "summary": {"mutants": len(results), "killed": killed, "score": f"{killed}/{len(results)}"},
    }
    return json.dumps(doc, indent=2) + "\n"


def mutants_text(results) -> str:
    lines = []
    width = max((len(r.name) for r in results), default=4)
    for r in results:
        if r.verdict == "killed":
            first = r.killed_by[0]
            codes = ", ".join(f"{c} {d:+d}" for c, d in first["codes"].items())
            more = f" (+{len(r.killed_by) - 1} more traces)" if len(r.killed_by) > 1 else ""
            detail = f"{first['trace']}: {codes}{more}"
        elif r.verdict == "blind spot":
            detail = f"outcomes change in {r.changed[0]}, nothing flagged"
        else:
            detail = "no trace exercises it"
        lines.append(f"{r.name:<{width}}  {r.verdict:<10}  {detail}")
    killed = sum(1 for r in results if r.verdict == "killed")
    lines.append(f"kill score: {killed}/{len(results)}")
    return "\n".join(lines) + "\n"


def compare_json(diffs, paths, a: str, b: str) -> str:
    doc = {"version": 1, "a": a, "b": b, "traces": len(paths), "differences": diffs}
    return json.dumps(doc, indent=2) + "\n"


def compare_text(diffs, paths, a: str, b: str) -> str:
    lines = [f"compare: a = {a!r}, b = {b!r}: {len(diffs)} of {len(paths)} traces differ"]
    for d in diffs:
        lines.append(f"{d['trace']}:")
        div = d["first_divergence"]
        if div is not None:
            lines.append(f"  first divergence at line {div['line']} ({div['op']}):")
            lines.append(f"    a: {json.dumps(div['a'])}")
            lines.append(f"    b: {json.dumps(div['b'])}")
        if d["findings_a"] != d["findings_b"]:
            lines.append(f"  findings a: {d['findings_a']}  b: {d['findings_b']}")
        if d["error_a"] != d["error_b"]:
            lines.append(f"  error a: {d['error_a']}  b: {d['error_b']}")
    return "\n".join(lines) + "\n"
