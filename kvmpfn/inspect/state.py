"""The MMU's state at one moment, as data (``kvmpfn show``): shadow pages with their decoded role, parent
links and write protection, their present sptes (the child page or the frame each maps), the rmaps, the
frames KVM references, the memslots and their ``write_count``; and, for one guest-virtual address, the guest
walk and the shadow walk level by level.
"""

from __future__ import annotations

from kvmpfn.errors import InputError
from kvmpfn.inspect import bits_text
from kvmpfn.kvm.context import shadow_walk
from kvmpfn.kvm.rmap import rmap_entries
from kvmpfn.kvm.spte import NOTRAP, TRAP, is_last_spte, is_shadow_present_pte, is_writeble_pte, spte_to_pfn
from kvmpfn.kvm.walker import gva_in_range, walk_addr
from kvmpfn.x86 import INVALID_PAGE, PAGE_SHIFT, PT64_BASE_ADDR_MASK, PT_PRESENT_MASK


def sp_name(sp) -> str:
    return f"sp{sp.id}"


def sptep_name(sptep: tuple) -> str:
    sp, index = sptep
    return f"{sp_name(sp)}[{index}]"


def role(sp) -> dict:
    """``kvm_mmu_page_role`` decoded (``direct``: the era's ``metaphysical``)."""
    return {
        "level": sp.level,
        "glevels": sp.glevels,
        "quadrant": sp.quadrant,
        "direct": bool(sp.metaphysical),
        "access": sp.access,
        "invalid": bool(sp.invalid),
        "cr0_wp": sp.cr0_wp,
        "word": f"{sp.role:#x}",
    }


def vcpu_roots(kvm, vcpu) -> list:
    """The shadow pages a vcpu's hardware walk starts from: its root, or its four PAE roots."""
    headers = kvm.page_header
    if vcpu.root_hpa == INVALID_PAGE:
        return []
    entries = [vcpu.root_hpa] if vcpu.pae_root is None or vcpu.root_hpa >> PAGE_SHIFT in headers else vcpu.pae_root
    roots = []
    for hpa in entries:
        if hpa == INVALID_PAGE or (entries is vcpu.pae_root and not hpa & PT_PRESENT_MASK):
            continue
        sp = headers.get((hpa & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT)
        if sp is not None:
            roots.append(sp)
    return roots


def write_protected(kvm, sp) -> bool | None:
    """A page that shadows a guest table: no writable spte maps its gfn (None for a direct page)."""
    if sp.metaphysical:
        return None
    return not any(is_writeble_pte(s.spt[i]) for s, i in rmap_entries(kvm.rmap, sp.gfn))


def entry(kvm, sp, index: int) -> dict:
    spte = sp.spt[index]
    out = {"index": index, "spte": f"{spte:#x}", "bits": bits_text(spte)}
    if is_last_spte(spte, sp.level):
        out["pfn"] = f"{spte_to_pfn(spte):#x}"
        out["gfn"] = f"{sp.gfns[index]:#x}"
    else:
        child = kvm.page_header.get(spte_to_pfn(spte))
        out["child"] = sp_name(child) if child is not None else None
    return out


def page(kvm, sp) -> dict:
    present = [i for i, s in enumerate(sp.spt) if is_shadow_present_pte(s)]
    return {
        "id": sp_name(sp),
        "gfn": f"{sp.gfn:#x}",
        "hpa": f"{sp.hpa << PAGE_SHIFT:#x}",
        "role": role(sp),
        "root_count": sp.root_count,
        "parents": [sptep_name(p) for p in sp.parent_ptes],
        "write_protected": write_protected(kvm, sp),
        "notrap": sum(1 for s in sp.spt if s == NOTRAP),
        "sptes": [entry(kvm, sp, i) for i in present],
    }


def mmu_state(rp) -> dict:
    """Everything ``kvmpfn show`` prints, in a deterministic order."""
    kvm, host, ledger = rp.kvm, rp.host, rp.auditor.ledger
    pages = sorted(kvm.active_mmu_pages.values(), key=lambda sp: sp.id)
    frames = []
    for pfn in sorted(set(ledger.refs) | {p for p, f in host.frames.items() if f.count}):
        f = host.frames.get(pfn)
        frames.append(
            {
                "pfn": f"{pfn:#x}",
                "refcount": f.count if f else 0,
                "kvm_refs": ledger.total(pfn),
                "dirty": bool(f and f.dirty),
                "accessed": bool(f and f.accessed),
                "struct_page": bool(f and f.struct_page),
            }
        )
    memslots = []
    for ms in host.memslots:
        slot = kvm.slots.get(ms.slot)
        memslots.append(
            {
                "slot": ms.slot,
                "gfn": f"{ms.base_gfn:#x}",
                "npages": ms.npages,
                "backing": ms.backing,
                "write_count": {} if slot is None else {str(k): v for k, v in sorted(slot.write_count.items()) if v},
                "dirty_log": slot is not None and slot.dirty_bitmap is not None,
            }
        )
    return {
        "seq": rp.seq,
        "line": rp.line,
        "mmu": rp.mmu,
        "kernel": rp.kernel,
        "vcpus": [
            {
                "vcpu": v.vcpu_id,
                "paging": v.cpu.paging,
                "cr3": f"{v.cpu.cr3:#x}",
                "shadow_root_level": v.shadow_root_level,
                "roots": [sp_name(sp) for sp in vcpu_roots(kvm, v)],
            }
            for _, v in sorted(kvm.vcpus.items())
        ],
        "shadow_pages": [page(kvm, sp) for sp in pages],
        "rmap": [
            {"gfn": f"{g:#x}", "sptes": [sptep_name(s) for s in rmap_entries(kvm.rmap, g)]} for g in sorted(kvm.rmap)
        ],
        "rmap_pde": [
            {"region": f"{r:#x}", "sptes": [sptep_name(s) for s in rmap_entries(kvm.rmap_pde, r)]}
            for r in sorted(kvm.rmap_pde)
        ],
        "frames": frames,
        "memslots": memslots,
        "stat": dict(kvm.stat),
    }


def gva_walk(rp, vcpu_id: int, gva: int) -> dict:
    """The guest walk (side-effect free) and the shadow walk of ``gva`` on one vcpu, level by level.

    :raises InputError: ``gva`` is no address in the vcpu's paging mode (as the same address in a trace).
    """
    kvm = rp.kvm
    vcpu = kvm.vcpus.get(vcpu_id)
    out: dict = {"vcpu": vcpu_id, "gva": f"{gva:#x}", "levels": []}
    if vcpu is None:
        out["error"] = f"vcpu {vcpu_id} has not run"
        return out
    cpu = vcpu.cpu
    if cpu.paging == "none" and gva >> 32:
        raise InputError("--gva", f"{gva:#x} is beyond 4 GiB with paging off (vcpu {vcpu_id})")
    if cpu.paging != "none" and not gva_in_range(cpu.paging, gva):
        what = "not canonical" if cpu.paging == "64" else "beyond 4 GiB"
        mode = "PAE" if cpu.paging == "pae" else f"{cpu.paging}-bit"
        raise InputError("--gva", f"gva {gva:#x} is {what} in {mode} paging (vcpu {vcpu_id})")
    levels: dict[int, dict] = {}
    if cpu.paging != "none":
        ok, w = walk_addr(cpu, rp.host, gva, False, False, False, set_ad=False)
        out["guest"] = "ok" if ok else f"fault (error code {w.error_code:#x})"
        if ok:
            out["gpa"] = f"{(w.gfn << PAGE_SHIFT) | (gva & 0xFFF):#x}"
        for lvl in range(len(w.ptes), 0, -1):
            if w.pte_gpa[lvl - 1] or w.ptes[lvl - 1]:
                gpte = w.ptes[lvl - 1]
                levels.setdefault(lvl, {"level": lvl})["gpte"] = {
                    "gpa": f"{w.pte_gpa[lvl - 1]:#x}",
                    "value": f"{gpte:#x}",
                    "bits": bits_text(gpte),
                }
    else:
        out["guest"] = "paging off"
    if vcpu.root_hpa != INVALID_PAGE:
        path, end = shadow_walk(vcpu, kvm, gva)
        for sp, index in path:
            levels.setdefault(sp.level, {"level": sp.level})["spte"] = {
                "where": sptep_name((sp, index)),
                **entry(kvm, sp, index),
            }
        out["shadow_end"] = "trap" if end == TRAP else "notrap" if end == NOTRAP else f"{end:#x}"
    out["levels"] = [levels[k] for k in sorted(levels, reverse=True)]
    return out


class StopAt:
    """Replay observer: stop right after event ``seq`` (None: the last event, before a teardown) and keep
    :func:`mmu_state` (and the walk of ``gva``) of that moment."""

    records = False

    def __init__(self, seq: int | None, gva: int | None = None, vcpu: int = 0) -> None:
        self.at = seq
        self.gva = gva
        self.vcpu = vcpu
        self.state: dict | None = None

    def attach(self, rp) -> None:
        self.rp = rp
        original = rp.do_teardown

        def teardown(e=None):
            self._capture()
            return original(e)

        rp.do_teardown = teardown
        for cls, (_handler, op) in list(rp.dispatch.items()):
            if op == "teardown":
                rp.dispatch[cls] = (teardown, op)

    def _capture(self) -> None:
        if self.state is None:
            self.state = mmu_state(self.rp)
            if self.gva is not None:
                self.state["walk"] = gva_walk(self.rp, self.vcpu, self.gva)

    def event(self, seq: int, line: int, e, rec: dict) -> bool:
        self.rp.seq, self.rp.line = seq, line
        if self.at is not None and seq >= self.at:
            self._capture()
            return True
        return False

    def finish(self, rp) -> None:
        self._capture()
