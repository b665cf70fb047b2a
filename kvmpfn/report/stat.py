"""``kvmpfn stat``'s text, after ``perf kvm stat``: events by op and result, faults per vcpu, the hottest
pages, pte writes, shadow-page churn, peaks, and (text only) wall time per op."""

from __future__ import annotations

from kvmpfn.report import safe


def stat_lines(doc: dict) -> list[tuple[str, str]]:
    lines = [("bold", f"{safe(doc['trace'])}: {doc['events']} events ({doc['mmu']} MMU, kernel {doc['kernel']})")]
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
    lines.append(("", "  peak: " + ", ".join(f"{n} {name}" for name, n in doc["peak"].items())))
    style = "bold red" if doc["findings"] else "green"
    lines.append((style, f"  findings: {doc['findings']}"))
    if doc.get("error"):
        lines.append(("bold red", f"  stopped: {safe(doc['error'])}"))
    return lines
