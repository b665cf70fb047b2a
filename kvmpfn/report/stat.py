"""``kvmpfn stat``'s text, after ``perf kvm stat``: events by op and result, faults per vcpu, the hottest
pages, pte writes, shadow-page churn, peaks, and (text only) wall time per op."""

from __future__ import annotations

from kvmpfn.report import safe

SINGULAR = {"frames referenced": "frame referenced", "live sptes": "live spte", "shadow pages": "shadow page"}


def stat_lines(doc: dict, quiet: bool = False) -> list[tuple[str, str]]:
    """The lines of one trace's stat; ``quiet``: only the first line, the findings and why it stopped."""
    n = doc["events"]
    head = f"{safe(doc['trace'])}: {n} event{'s' * (n != 1)} ({doc['mmu']} MMU, kernel {doc['kernel']})"
    if doc.get("interrupted"):
        head = f"interrupted at event {n}: {head}, the counts cover the events before it"
    lines = [("bold yellow" if doc.get("interrupted") else "bold", head)]
    if quiet:
        return lines + _end(doc)
    seconds = doc.get("seconds_by_op", {})
    total = sum(seconds.values()) or 1.0
    lines.append(("", f"  {'op':<12} {'result':<12} {'events':>10} {'%':>7}   time"))
    events = doc["events"] or 1
    for op, results in doc["by_kind"].items():
        t = seconds.get(op)
        for i, (res, n) in enumerate(results.items()):
            when = f"{t:8.3f}s {100 * t / total:5.1f}%" if t is not None and i == 0 else ""
            lines.append(("", f"  {op if i == 0 else '':<12} {res:<12} {n:>10} {100 * n / events:6.2f}%   {when}"))
    lines.append(
        ("", "  faults per vcpu: " + (", ".join(f"{v}: {n}" for v, n in doc["faults_per_vcpu"].items()) or "none"))
    )
    for name in ("hottest_gpas", "hottest_gvas"):
        pairs = ", ".join(f"{a} ×{n}" for a, n in doc[name]) or "none"
        lines.append(("", f"  {name.replace('_', ' ')} by faults: {pairs}"))
    pw = doc["pte_writes"]
    lines.append(
        (
            "",
            f"  pte writes: {pw['emulated']} emulated, {pw['kvm_mmu_pte_write']} kvm_mmu_pte_write, "
            f"{pw['pte_updated']} updated in place, {pw['flooded']} flooding zaps, {pw['pde_zapped']} pde zaps",
        )
    )
    sp = doc["shadow_pages"]
    lines.append(("", f"  shadow pages: {sp['created']} created, {sp['zapped']} zapped, {sp['recycled']} recycled"))
    peak = (f"{n} {name if n != 1 else SINGULAR[name]}" for name, n in doc["peak"].items())
    lines.append(("", "  peak: " + ", ".join(peak)))
    return lines + _end(doc)


def _end(doc: dict) -> list[tuple[str, str]]:
    style = "bold red" if doc["findings"] else "green"
    lines = [(style, f"  findings: {doc['findings']}")]
    if doc.get("error"):
        lines.append(("bold red", f"  stopped: {safe(doc['error'])}"))
    return lines
