"""``kvmpfn show``'s text: the shadow page tree from each vcpu's roots, then rmaps, frames and memslots;
summarised (the first few entries of each list, counts per level) unless ``verbose``."""

from __future__ import annotations

from collections import Counter

FIRST = 4  # entries shown per list when summarised


def page_head(p: dict) -> str:
    r = p["role"]
    kind = "direct" if r["direct"] else "shadows gfn " + p["gfn"]
    flags = [f"glevels {r['glevels']}", f"quadrant {r['quadrant']}", f"access {r['access']}"]
    if r["invalid"]:
        flags.append("INVALID")
    if p["write_protected"] is not None:
        flags.append("write-protected" if p["write_protected"] else "NOT write-protected")
    if p["root_count"]:
        flags.append(f"root_count {p['root_count']}")
    parents = ", ".join(p["parents"]) or "none"
    return f"{p['id']} level {r['level']} {kind} ({', '.join(flags)}; role {r['word']}; parents {parents})"


def _entry(e: dict) -> str:
    target = f"-> {e['child']}" if "child" in e else f"frame {e['pfn']} (gfn {e['gfn']})"
    return f"[{e['index']}] {e['spte']} {e['bits']} {target}"


def _more(items: list, verbose: bool) -> tuple[list, int]:
    return (items, 0) if verbose else (items[:FIRST], max(0, len(items) - FIRST))


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 head``, ``2 heads`` (``words``: the plural when it is not ``word`` + s)."""
    return f"{count} {word if count == 1 else words or word + 's'}"


def show_lines(state: dict, verbose: bool = False, quiet: bool = False) -> list[tuple[str, str]]:
    """The lines of ``kvmpfn show``: summarised unless ``verbose``; ``quiet``: only the counts (no tree, no
    entries)."""
    lines: list[tuple[str, str]] = []
    pages = {p["id"]: p for p in state["shadow_pages"]}
    head = f"MMU state after seq {state['seq']} (line {state['line']}), {state['mmu']} MMU, kernel {state['kernel']}"
    if "interrupted" in state:
        head = f"interrupted at event {state['interrupted']}: {head}"
    lines.append(("bold yellow" if "interrupted" in state else "bold", head))
    levels = Counter(p["role"]["level"] for p in state["shadow_pages"])
    leaves = sum(1 for p in state["shadow_pages"] for e in p["sptes"] if "pfn" in e)
    per_level = ", ".join(f"level {lv}: {n}" for lv, n in sorted(levels.items(), reverse=True)) or "none"
    lines.append(("", f"  {plural(len(pages), 'shadow page')} ({per_level}); {plural(leaves, 'leaf spte')}"))
    seen: set[str] = set()

    def tree(pid: str, depth: int) -> None:
        p = pages.get(pid)
        pad = "  " * depth
        if p is None:
            lines.append(("red", f"{pad}{pid}: not a live shadow page"))
            return
        if pid in seen:
            lines.append(("dim", f"{pad}{page_head(p)} (shown above)"))
            return
        seen.add(pid)
        lines.append(("cyan", pad + page_head(p)))
        shown, more = _more(p["sptes"], verbose)
        for e in shown:
            lines.append(("", f"{pad}  {_entry(e)}"))
            if "child" in e and e["child"] is not None:
                tree(e["child"], depth + 2)
        if more:
            entries = plural(more, "more present entry", "more present entries")
            lines.append(("dim", f"{pad}  ... {entries} (-v shows all)"))

    for v in state["vcpus"]:
        lines.append(
            (
                "bold",
                f"  vcpu {v['vcpu']}: paging {v['paging']}, cr3 {v['cr3']}, roots {', '.join(v['roots']) or 'none'}",
            )
        )
        if not quiet:
            for root in v["roots"]:
                tree(root, 2)
    if not quiet:
        rest = [pid for pid in pages if pid not in seen]
        if rest:
            lines.append(("bold", f"  {plural(len(rest), 'shadow page')} no root reaches"))
            shown, more = _more(rest, verbose)
            for pid in shown:
                tree(pid, 2)
            if more:
                lines.append(("dim", f"    ... {more} more (-v shows all)"))
    for name, key in (("rmap", "gfn"), ("rmap_pde", "region")):
        heads = state[name]
        lines.append(("bold", f"  {name}: {plural(len(heads), 'head')}"))
        shown, more = ([], 0) if quiet else _more(heads, verbose)
        for h in shown:
            lines.append(("", f"    {key} {h[key]}: {', '.join(h['sptes'])}"))
        if more:
            lines.append(("dim", f"    ... {more} more (-v shows all)"))
    lines.append(("bold", f"  frames referenced: {len(state['frames'])}"))
    shown, more = ([], 0) if quiet else _more(state["frames"], verbose)
    for f in shown:
        flags = " ".join(n for n in ("dirty", "accessed") if f[n]) + ("" if f["struct_page"] else " no-struct-page")
        lines.append(("", f"    {f['pfn']}: refcount {f['refcount']}, KVM refs {f['kvm_refs']} {flags}".rstrip()))
    if more:
        lines.append(("dim", f"    ... {more} more (-v shows all)"))
    lines.append(("bold", f"  memslots: {len(state['memslots'])}"))
    for m in [] if quiet else state["memslots"]:
        wc = ", ".join(f"region {k}: {v}" for k, v in m["write_count"].items()) or "none"
        log = ", dirty logging" if m["dirty_log"] else ""
        size = plural(m["npages"], "page")
        lines.append(("", f"    slot {m['slot']}: gfn {m['gfn']} +{size} ({m['backing']}{log}); write_count {wc}"))
    if "walk" in state:
        lines.extend(walk_lines(state["walk"]))
    return lines


def walk_lines(walk: dict) -> list[tuple[str, str]]:
    lines = [
        ("bold", f"  walk of gva {walk['gva']} on vcpu {walk['vcpu']}: guest {walk.get('guest', walk.get('error'))}")
    ]
    if "gpa" in walk:
        lines[-1] = (lines[-1][0], lines[-1][1] + f" -> gpa {walk['gpa']}")
    if walk["levels"]:
        lines.append(("", f"    {'level':<6} {'guest pte (at gpa)':<44} shadow pte"))
    for lv in walk["levels"]:
        g = lv.get("gpte")
        s = lv.get("spte")
        gtext = f"{g['value']} {g['bits']} (at {g['gpa']})" if g else "-"
        stext = f"{s['where']} {s['spte']} {s['bits']}" if s else "-"
        lines.append(("", f"    {lv['level']:<6} {gtext:<44} {stext}"))
    if "shadow_end" in walk:
        lines.append(("", f"    shadow walk ends at {walk['shadow_end']}"))
    return lines
