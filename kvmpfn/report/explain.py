"""``kvmpfn explain``'s text: one line per step of the frames' history (the same words plain and on a
terminal, where rich colours the broken invariant and the references at fault)."""

from __future__ import annotations

from kvmpfn.inspect import spte_text
from kvmpfn.report import finding_text, safe

KIND_WORDS = {"get": "+1", "put": "-1", "dirty": "dirty", "accessed": "accessed"}


def _spte(spte: dict) -> str:
    old = None if spte["old"] is None else int(spte["old"], 16)
    if spte["new"] is None:
        return f"{spte['where']}: {spte_text(old)}"
    if old is None:
        return f"{spte['where']}: installed {spte_text(int(spte['new'], 16))}"
    return f"{spte['where']}: {spte_text(old)} -> {spte_text(int(spte['new'], 16))}"


def where_text(step: dict) -> str:
    """Where a step happened: its event's seq and line, or ``teardown`` (after the last event, at the end)."""
    return "teardown" if step.get("teardown") else f"seq {step['seq']} line {step['line']}"


def step_text(step: dict) -> str:
    """One step in words."""
    where = where_text(step)
    kind = step["kind"]
    if kind == "finding":
        return f"{where}  FINDING {step['code']} detected here: {step['message']}"
    counts = f"refcount {step['refcount']} (KVM refs {step['kvm_refs']})"
    if kind in KIND_WORDS:
        text = f"{where}  {step['function']} ({KIND_WORDS[kind]}) in {step['caller']}  frame {step['pfn']}  {counts}"
    elif kind in ("rmap_add", "rmap_remove"):
        text = f"{where}  {kind}  {_spte(step['spte'])}  {counts}"
    elif kind == "spte":
        text = f"{where}  spte store  {_spte(step['spte'])}"
    elif kind == "write_protect":
        text = f"{where}  rmap_write_protect cleared W on frame {step['pfn']}  {counts}"
    elif kind == "host_remap":
        text = f"{where}  host remap: gfn {step['gfn']} (frame {step['pfn']}) now backed by frame {step['now']}"
    else:
        text = f"{where}  frame {step['pfn']}  {counts}"
    if step.get("broken"):
        first = "FIRST BROKEN" if step.get("first_broken") else "broken"
        text += f"  <- {first}: {step['broken']}"
    if step.get("at_fault"):
        text += f"  <- {step['at_fault']}"
    return safe(text)


def explain_lines(doc: dict) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    if "interrupted" in doc:
        words = f"interrupted at event {doc['interrupted']}: the history covers the events before it"
        lines.append(("bold yellow", words))
    subject = ", ".join(f"{k} {v}" for k, v in doc["subject"].items()) or "no frame"
    lines.append(("bold", f"{safe(doc['trace'])}: history of {subject}; frames {', '.join(doc['frames']) or 'none'}"))
    if "finding" in doc:
        finding = {k: v for k, v in doc["finding"].items() if k != "number"}
        lines.append(
            (
                "red",
                f"  finding [{doc['finding']['number']}] {finding_text(finding)}",
            )
        )
    if not doc["steps"]:
        words = (
            "no step before the interruption touched these frames"
            if "interrupted" in doc
            else "no step touched these frames"
        )
        lines.append(("dim", "  " + words))
    for step in doc["steps"]:
        style = ""
        if step["kind"] == "finding":
            style = "bold red"
        elif step.get("at_fault") or step.get("first_broken"):
            style = "bold yellow"
        elif step["kind"] == "spte":
            style = "dim"
        lines.append((style, "  " + step_text(step)))
    broken = doc["first_broken"]
    if broken is not None:
        at = "in the teardown" if broken.get("teardown") else f"at line {broken['line']} (seq {broken['seq']})"
        lines.append(("bold", f"  first broken {at}: {broken['broken']}"))
    faults = [doc["steps"][i] for i in doc["at_fault"]]
    for step in faults:
        fn = step.get("function") or step["kind"]
        lines.append(
            (
                "bold",
                f"  at fault: {where_text(step)} {fn} in {step.get('caller')}: {step['at_fault']}",
            )
        )
    if doc.get("error"):
        lines.append(("bold red", f"  stopped: {safe(doc['error'])}"))
    return lines
