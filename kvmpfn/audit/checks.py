"""Ported audit checks (arch/x86/kvm/mmu.c ``#ifdef AUDIT``, seed … v2.6.32): docs/kernel.md, The audit; and
docs/kernel.md, Invariants.

Each check reads the MMU state and reports findings; none takes a reference, writes guest memory or sets a
guest A bit. Where the 2008 code was broken, the port checks what it meant to check and says so. A check's
docstring starts with the invariant it checks (I1 … I14, each defined in docs/kernel.md, Invariants).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

from kvmpfn.audit.findings import Findings
from kvmpfn.audit.ledger import RefLedger
from kvmpfn.kvm.mmu import gfn_to_kvm_slot, slot_edge_write_counts, slot_largepage_idx
from kvmpfn.kvm.rmap import gfn_to_rmap, rmap_entries
from kvmpfn.kvm.spte import NOTRAP, TRAP, is_last_spte, is_shadow_present_pte, spte_to_pfn
from kvmpfn.kvm.vm import Kvm, KvmMmuPage, Sptep, Vcpu
from kvmpfn.kvm.walker import GuestWalker, walk_addr
from kvmpfn.x86 import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    INVALID_PAGE,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PFERR_PRESENT_MASK,
    PT32E_ROOT_LEVEL,
    PT64_NX_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    UNMAPPED_GVA,
)

PFN_TRUNCATE_MASK = (1 << 20) - 1  # what survives a 32-bit ``pfn << PAGE_SHIFT``


def canonicalize(va: int) -> int:
    """Sign-extend bit 47 (the audit's ``canonicalize``)."""
    return va | ~((1 << 48) - 1) & ((1 << 64) - 1) if va & (1 << 47) else va


def live_leaves(kvm: Kvm) -> Iterator[tuple[KvmMmuPage, int, int]]:
    """Every present leaf of every live shadow page: ``(sp, index, spte)``."""
    for sp in kvm.active_mmu_pages.values():
        level = sp.level
        for index, spte in enumerate(sp.spt):
            if spte != TRAP and spte != NOTRAP and is_last_spte(spte, level):
                yield sp, index, spte


def spte_provenance(findings: Findings, sp: KvmMmuPage, index: int, spte: int) -> list[dict[str, Any]]:
    """Where the reference a present leaf owns was taken (from the ledger), as finding provenance."""
    ledger = findings.ledger
    if ledger is None or not is_shadow_present_pte(spte):
        return []
    for ref in ledger.refs.get(spte_to_pfn(spte), ()):
        if ref.owner == (sp, index):
            return [ref.provenance()]
    return []


#: a mapping check: (sp, index, vcpu_id, addr, level) of the entry checked
MappingEntry = tuple[KvmMmuPage, int, int, int, int]
#: what makes two vcpus' mapping audits the same: paging, CR3, CR0.WP, root_hpa, pae_root
RootKey = tuple[str, int, bool, int, tuple[int, ...]]


class GuestView:
    """The guest translation as the auditor needs it: a side-effect-free walk (no A/D writes, no references),
    memoised per (vcpu state, page) for one audit."""

    def __init__(self, kvm: Kvm, vcpu: Vcpu, reads: dict[int, set[MappingEntry]] | None = None) -> None:
        self.kvm = kvm
        self.vcpu = vcpu
        self.cache: dict[int, tuple[bool, GuestWalker | None]] = {}
        # gpa of a guest pte -> entries whose check walked through it (the incremental audit's index); a notrap
        # entry of a page shadowing a guest table reads only its own guest pte, found from the page instead
        self.reads = reads
        self.entry: MappingEntry | None = None  # the entry being checked, recorded in ``reads``

    def walk(self, va: int) -> tuple[bool, GuestWalker | None]:
        page = va >> PAGE_SHIFT
        hit = self.cache.get(page)
        if hit is None:
            hit = self.cache[page] = self.walk_page(va)
        if self.reads is not None and hit[1] is not None:
            self.read(*hit[1].pte_gpa)
        return hit

    def walk_page(self, va: int) -> tuple[bool, GuestWalker | None]:
        """The walk of ``va`` (not memoised): None for the walker when no guest walk applies (TDP, paging off)."""
        cpu = self.vcpu.cpu
        if self.kvm.tdp_enabled or cpu.paging == "none":
            return True, None
        # a supervisor read with EFLAGS.AC=1: SMAP must not hide user pages from the audit
        return walk_addr(cpu, self.kvm.host, va, False, False, False, ac=True, set_ad=False)

    def read(self, *pte_gpas: int) -> None:
        """The entry being checked depends on the guest ptes at these addresses."""
        reads, entry = self.reads, self.entry
        if reads is not None and entry is not None:
            for gpa in pte_gpas:
                reads.setdefault(gpa, set()).add(entry)

    def gva_to_gpa(self, va: int) -> int:
        ok, w = self.walk(va)
        if w is None:
            return va
        if not ok:
            return UNMAPPED_GVA
        return w.gfn << PAGE_SHIFT | (va & 0xFFF)


def mapping_roots(kvm: Kvm) -> list[tuple[RootKey, Vcpu, KvmMmuPage, int, int]]:
    """Where ``audit_mappings`` starts: ``(key, vcpu, root page, va, level)`` for the first vcpu of each distinct
    key (paging, CR3, CR0.WP, roots); a PAE root is its four present PDPT entries."""
    out: list[tuple[RootKey, Vcpu, KvmMmuPage, int, int]] = []
    seen: set[RootKey] = set()
    for vcpu in kvm.vcpus.values():
        if vcpu.root_hpa == INVALID_PAGE:
            continue
        key = (vcpu.cpu.paging, vcpu.cpu.cr3, vcpu.cpu.cr0_wp, vcpu.root_hpa, tuple(vcpu.pae_root))
        if key in seen:
            continue
        seen.add(key)
        if vcpu.shadow_root_level == PT32E_ROOT_LEVEL:
            for i in range(4):
                root = vcpu.pae_root[i]
                if root != INVALID_PAGE and root & PT_PRESENT_MASK:
                    out.append((key, vcpu, kvm.page_header[root >> PAGE_SHIFT], i << 30, 2))
        else:
            out.append((key, vcpu, kvm.page_header[vcpu.root_hpa >> PAGE_SHIFT], 0, vcpu.shadow_root_level))
    return out


def audit_mappings(kvm: Kvm, findings: Findings, reads: dict[int, set[MappingEntry]] | None = None) -> None:
    """``audit_mappings``: from every vcpu's roots, each present leaf against the current guest translation.
    ``reads`` (pte gpa -> entries) collects the guest ptes each check's walk read, for the incremental audit.

    Differs from the 2008 code: large sptes are checked as leaves at their 2 MiB-aligned address (the era
    walked them as tables); the expected frame comes from the host without a reference (the seed's hunk used
    an undeclared ``pfn``); an unmapped or slotless gpa is not an error pfn here but judged as a leaf; TDP
    roots are audited by gpa (the era used guest virtual addresses there, which is meaningless).
    """
    views: dict[int, GuestView] = {}
    for _key, vcpu, sp, va, level in mapping_roots(kvm):
        view = views.get(vcpu.vcpu_id)
        if view is None:
            view = views[vcpu.vcpu_id] = GuestView(kvm, vcpu, reads)
        audit_mappings_page(kvm, findings, view, sp, va, level)


def guest_table(kvm: Kvm, sp: KvmMmuPage) -> bytes | None:
    """The guest table a non-metaphysical page shadows, read once for all its notrap entries."""
    if sp.metaphysical or kvm.tdp_enabled:
        return None
    return kvm.host.read_bytes(sp.gfn << PAGE_SHIFT, 1 << PAGE_SHIFT)


def audit_mappings_page(kvm: Kvm, findings: Findings, view: GuestView, sp: KvmMmuPage, va: int, level: int) -> None:
    """``audit_mappings_page``: each entry of ``sp`` (:func:`audit_mapping`), recursing through pointers."""
    shift = PAGE_SHIFT + 9 * (level - 1)
    table = guest_table(kvm, sp)
    for index, ent in enumerate(sp.spt):
        if ent == TRAP:
            continue
        addr = canonicalize(va + (index << shift))
        child = audit_mapping(kvm, findings, view, sp, index, ent, addr, level, table)
        if child is not None:
            audit_mappings_page(kvm, findings, view, child, addr, level - 1)


def audit_mapping(
    kvm: Kvm,
    findings: Findings,
    view: GuestView,
    sp: KvmMmuPage,
    index: int,
    ent: int,
    addr: int,
    level: int,
    table: bytes | None,
) -> KvmMmuPage | None:
    """One entry of ``audit_mappings_page``, reached at ``addr`` and ``level``: check a leaf
    (``spte-hpa-mismatch``, ``spte-pfn-truncated``, ``notrap-valid-gva``, ``spte-permission``) or a notrap
    pointer (``notrap-nonleaf`` where the guest entry it shadows is present); a pointer returns its child page
    (None when it points at no live page)."""
    if view.reads is not None and (sp.metaphysical or ent != NOTRAP):  # see GuestView.read
        view.entry = (sp, index, view.vcpu.vcpu_id, addr, level)
    if level > 1 and not (ent & PT_PAGE_SIZE_MASK and level == 2 and ent != NOTRAP):
        if ent == NOTRAP:
            if not kvm.tdp_enabled and guest_entry_present(view, sp, index, addr, level, table):
                findings.report(
                    "notrap-nonleaf",
                    f"notrap entry at level {level} for gva {addr:#x} whose guest entry is present",
                    ("addr", addr, level),
                    addr=addr,
                    level=level,
                )
            return None
        return kvm.page_header.get(spte_to_pfn(ent))
    if ent == NOTRAP:
        if not kvm.tdp_enabled and guest_entry_present(view, sp, index, addr, level, table):
            findings.report(
                "notrap-valid-gva",
                f"notrap leaf for gva {addr:#x}, whose guest pte is present",
                ("addr", addr, level),
                addr=addr,
                level=level,
            )
        return None
    gfn = sp.gfns[index]
    if gfn_to_kvm_slot(kvm, gfn) is None:
        return None  # spte-without-memslot, reported by check_memslots
    host = kvm.host
    gpa = view.gva_to_gpa(addr)
    pfn = spte_to_pfn(ent)
    want = None if gpa == UNMAPPED_GVA else host.peek_pfn(gpa >> PAGE_SHIFT)
    if "audit-no-release" in kvm.bugs and gpa != UNMAPPED_GVA:
        # --bug audit-no-release: the 2.6.31 audit's own gfn_to_pfn reference, here without its release
        kvm.api.gfn_to_pfn(gpa >> PAGE_SHIFT, "audit_mappings_page")
    if want != pfn:
        space = "gpa" if kvm.tdp_enabled else "gva"  # under TDP the audit walks guest-physical addresses
        if want is not None and want >> 20 and want & PFN_TRUNCATE_MASK == pfn:
            findings.report(
                "spte-pfn-truncated",
                f"spte for {space} {addr:#x} holds frame {pfn:#x}: frame {want:#x} lost its high bits",
                ("addr", addr, level),
                spte_provenance(findings, sp, index, ent),
                addr=addr,
                level=level,
                pfn=pfn,
                spte=ent,
            )
        else:
            if kvm.tdp_enabled:
                where = "is in no memslot" if gpa == UNMAPPED_GVA else "is backed by another frame now"
            else:
                where = "is not mapped by the guest" if gpa == UNMAPPED_GVA else f"translates to gpa {gpa:#x}"
            findings.report(
                "spte-hpa-mismatch",
                f"spte for {space} {addr:#x} maps frame {pfn:#x} but the address {where}"
                + ("" if want is None else f" (frame {want:#x})"),
                ("addr", addr, level),
                spte_provenance(findings, sp, index, ent),
                addr=addr,
                level=level,
                pfn=pfn,
                spte=ent,
            )
        return None
    if not kvm.tdp_enabled and view.vcpu.cpu.paging != "none":
        check_permission(kvm, findings, view, sp, index, addr, level, ent)
    return None


def guest_entry_present(
    view: GuestView, sp: KvmMmuPage, index: int, addr: int, level: int, table: bytes | None
) -> bool:
    """Whether the guest entry that entry ``index`` of ``sp`` shadows is present (docs/kernel.md, Invariants: I6). A
    page that shadows a guest table reads that entry directly: from ``table``, the table's bytes, or from guest memory
    when ``table`` is None (a 32-bit guest's tables in quadrants: 512 ptes of 1024 per level-1 page, one 4-byte
    pde per two 2 MiB shadow pdes); elsewhere the guest walk of ``addr`` says."""
    if not sp.metaphysical:
        if sp.glevels == 2:
            offset = 4 * ((sp.quadrant << 9) + index if sp.level == 1 else (sp.quadrant << 8) + index // 2)
        else:
            offset = 8 * index
        if table is None:
            return bool(view.kvm.host.read_guest((sp.gfn << PAGE_SHIFT) + offset, 1) & PT_PRESENT_MASK)
        return bool(table[offset] & PT_PRESENT_MASK)
    ok, w = view.walk(addr)
    if w is None:
        return False
    if ok:
        return level >= w.level
    return w.level < level or (w.level == level and bool(w.error_code & PFERR_PRESENT_MASK))


def check_permission(
    kvm: Kvm, findings: Findings, view: GuestView, sp: KvmMmuPage, index: int, addr: int, level: int, spte: int
) -> None:
    """I11: a leaf never grants more than the guest translation (W, U, NX), judged with the CR0.WP of its
    shadow page's role: a W spte over a read-only translation is legal only for CR0.WP=0 supervisor
    writes, and then without U (the v2.6.35 rule; violated in 2008, docs/kernel.md, Historical bugs:
    cr0wp-user-write)."""
    ok, w = view.walk(addr)
    if not ok:
        return  # the mappings check reports a leaf over an unmapped gva
    allowed = cast(GuestWalker, w).pte_access  # a guest walk ran: paging on, not TDP (the caller's test)
    excess = []
    if spte & PT_WRITABLE_MASK and not allowed & ACC_WRITE_MASK:
        if sp.cr0_wp or spte & PT_USER_MASK:
            excess.append("W")
    if spte & PT_USER_MASK and not allowed & ACC_USER_MASK:
        excess.append("U")
    if not spte & PT64_NX_MASK and not allowed & ACC_EXEC_MASK:
        excess.append("X")
    if excess:
        findings.report(
            "spte-permission",
            f"spte for gva {addr:#x} grants {'+'.join(excess)} beyond the guest translation (role cr0_wp={sp.cr0_wp})",
            ("addr", addr, level),
            spte_provenance(findings, sp, index, spte),
            addr=addr,
            level=level,
            spte=spte,
        )


def audit_rmap(kvm: Kvm, findings: Findings) -> None:
    """``audit_rmap``: every present leaf is in exactly one rmap (its gfn's, or its region's when large) and
    every rmap entry is a present leaf of a live shadow page.

    Differs from the 2008 code, which compared the number of 4K rmap entries with the number of *writable*
    level-1 sptes (written when only writable sptes were rmapped, so it fired on every read-only leaf).
    """
    counts: Counter[Sptep] = Counter()
    for table, large in ((kvm.rmap, 0), (kvm.rmap_pde, 1)):
        for key in list(table):
            for sptep in rmap_entries(table, key):
                counts[sptep] += 1
                check_rmap_entry(kvm, findings, large, key, sptep)
    for sp, index, _spte in live_leaves(kvm):
        check_rmap_count(findings, sp, index, counts.get((sp, index), 0))


def check_rmap_entry(kvm: Kvm, findings: Findings, large: int, key: int, sptep: Sptep) -> None:
    """One entry of rmap head ``key`` (of ``rmap_pde`` when ``large``): a present leaf of a live page whose
    gfn's head is this one."""
    sp, index = sptep
    spte = sp.spt[index]
    live = kvm.active_mmu_pages.get(sp.id) is sp
    if not live or not is_shadow_present_pte(spte) or not is_last_spte(spte, sp.level):
        what = "a freed shadow page" if not live else f"a non-leaf or non-present spte {spte:#x}"
        findings.report(
            "rmap-mismatch",
            f"rmap of {'region' if large else 'gfn'} {key:#x} points at {what}",
            ("sptep", sp.id, index),
            gfn=key << 9 if large else key,
            level=sp.level,
        )
    elif gfn_to_rmap(kvm, sp.gfns[index], int(bool(spte & PT_PAGE_SIZE_MASK)))[1] != key or (
        bool(spte & PT_PAGE_SIZE_MASK) != bool(large)
    ):
        findings.report(
            "rmap-mismatch",
            f"spte in the rmap of {key:#x} maps gfn {sp.gfns[index]:#x}",
            ("sptep", sp.id, index),
            gfn=sp.gfns[index],
            level=sp.level,
        )


def check_rmap_count(findings: Findings, sp: KvmMmuPage, index: int, n: int) -> None:
    """A present leaf is in exactly one rmap (``n``: the entries that name it)."""
    if n != 1:
        findings.report(
            "rmap-mismatch",
            f"present leaf {index} of shadow page gfn {sp.gfns[index]:#x} is in {n} rmaps",
            ("sptep", sp.id, index),
            gfn=sp.gfns[index],
            level=sp.level,
        )


def audit_write_protection(kvm: Kvm, findings: Findings) -> None:
    """``audit_write_protection``: no writable leaf maps, and no writable large leaf covers, a gfn that a live
    valid shadow page shadows.

    Differs from the 2008 code, which reported any rmap entry (read-only ones too) of such a gfn and did not
    look at large sptes.
    """
    for sp in kvm.active_mmu_pages.values():
        check_write_protected(kvm, findings, sp)


def check_write_protected(kvm: Kvm, findings: Findings, sp: KvmMmuPage) -> None:
    """No writable leaf maps or covers the gfn of ``sp`` if it is a valid page shadowing a guest table."""
    if sp.metaphysical or sp.invalid:
        return
    gfn = sp.gfn
    for table, key, large in ((kvm.rmap, gfn, 0), (kvm.rmap_pde, gfn // KVM_PAGES_PER_HPAGE, 1)):
        for lsp, index in rmap_entries(table, key):
            spte = lsp.spt[index]
            if is_shadow_present_pte(spte) and spte & PT_WRITABLE_MASK:
                findings.report(
                    "writable-shadowed-gfn",
                    f"writable {'large ' if large else ''}spte maps guest page table gfn {gfn:#x}"
                    f" (shadow page role {sp.role:#x})",
                    ("gfn", gfn, lsp.level),
                    gfn=gfn,
                    level=lsp.level,
                )


def check_parent_links(kvm: Kvm, findings: Findings) -> None:
    """I3: every present pointer spte points at a live page that lists it as a parent, and every parent
    entry points back."""
    for sp in kvm.active_mmu_pages.values():
        if sp.level > 1:
            for index, ent in enumerate(sp.spt):
                check_parent_pointer(kvm, findings, sp, index, ent)
        for psp, pindex in sp.parent_ptes:
            check_parent_entry(kvm, findings, sp, psp, pindex)


def check_parent_pointer(kvm: Kvm, findings: Findings, sp: KvmMmuPage, index: int, ent: int) -> None:
    """A present pointer ``sp.spt[index]`` (``ent``) of a live page is in its child's parent list."""
    if not is_shadow_present_pte(ent) or is_last_spte(ent, sp.level):
        return
    child = kvm.page_header.get(spte_to_pfn(ent))
    if child is None or (sp, index) not in child.parent_ptes:
        findings.report(
            "parent-link",
            f"pointer spte {index} of shadow page gfn {sp.gfn:#x} level {sp.level} is not in its child's parent list",
            ("sptep", sp.id, index),
            gfn=sp.gfn,
            level=sp.level,
        )


def check_parent_entry(kvm: Kvm, findings: Findings, sp: KvmMmuPage, psp: KvmMmuPage, pindex: int) -> None:
    """An entry ``(psp, pindex)`` of live page ``sp``'s parent list points at ``sp`` from a live page."""
    ent = psp.spt[pindex]
    if kvm.active_mmu_pages.get(psp.id) is not psp or not is_shadow_present_pte(ent) or spte_to_pfn(ent) != sp.hpa:
        findings.report(
            "parent-link",
            f"shadow page gfn {sp.gfn:#x} level {sp.level} lists parent spte {pindex} of page gfn"
            f" {psp.gfn:#x}, which does not point at it",
            ("parent", sp.id, psp.id, pindex),
            gfn=sp.gfn,
            level=sp.level,
        )


def check_memslots(kvm: Kvm, findings: Findings) -> None:
    """I7: every present leaf maps a gfn that a memslot holds."""
    for sp, index, spte in live_leaves(kvm):
        check_leaf_memslot(kvm, findings, sp, index, spte)


def check_leaf_memslot(kvm: Kvm, findings: Findings, sp: KvmMmuPage, index: int, spte: int) -> None:
    """I7 for one present leaf."""
    gfn = sp.gfns[index]
    if gfn_to_kvm_slot(kvm, gfn) is None:
        findings.report(
            "spte-without-memslot",
            f"present leaf maps gfn {gfn:#x}, which no memslot holds",
            ("gfn", gfn, sp.level),
            spte_provenance(findings, sp, index, spte),
            gfn=gfn,
            level=sp.level,
        )


def check_write_count(kvm: Kvm, findings: Findings) -> None:
    """I8: each 2 MiB region's ``write_count`` equals the live shadow pages of guest tables in it (not
    invalid ones under ``notifier``, v2.6.27), plus one for a region the slot covers only partly."""
    for slot in kvm.slots.values():
        want: Counter[int] = Counter(slot_edge_write_counts(slot.base_gfn, slot.npages))
        end = slot.base_gfn + slot.npages
        for sp in kvm.active_mmu_pages.values():
            if sp.metaphysical or (sp.invalid and kvm.notifiers):
                continue
            if slot.base_gfn <= sp.gfn < end:
                want[slot_largepage_idx(sp.gfn, slot)] += 1
        for idx in sorted(set(want) | set(slot.write_count)):
            have = slot.write_count.get(idx, 0)
            if have != want[idx]:
                region = slot.base_gfn // KVM_PAGES_PER_HPAGE + idx
                findings.report(
                    "write-count",
                    f"slot {slot.slot} region {region:#x}: write_count {have}, expected {want[idx]}",
                    ("region", slot.slot, region),
                    slot=slot.slot,
                    region=region,
                )


def check_accounting(kvm: Kvm, findings: Findings) -> None:
    """I13: ``n_alloc - n_free`` equals the live pages, and the hash holds exactly the live pages."""
    live = len(kvm.active_mmu_pages)
    hashed = sum(len(bucket) for bucket in kvm.mmu_page_hash.values())
    used = kvm.n_alloc_mmu_pages - kvm.n_free_mmu_pages
    if used != live or hashed != live:
        findings.report(
            "mmu-page-accounting",
            f"n_alloc - n_free = {used}, hashed pages {hashed}, live pages {live}",
            ("accounting",),
        )


def check_dirty_log(kvm: Kvm, findings: Findings) -> None:
    """I14 (dirty logging): in a logging slot every gfn a writable leaf maps is in the dirty bitmap."""
    for sp, index, spte in live_leaves(kvm):
        check_leaf_dirty(kvm, findings, sp, index, spte)


def check_leaf_dirty(kvm: Kvm, findings: Findings, sp: KvmMmuPage, index: int, spte: int) -> None:
    """I14 (dirty logging) for one present leaf."""
    if not spte & PT_WRITABLE_MASK:
        return
    gfn = sp.gfns[index]
    slot = gfn_to_kvm_slot(kvm, gfn)
    if slot is not None and slot.dirty_bitmap is not None and gfn not in slot.dirty_bitmap:
        findings.report(
            "dirty-lost",
            f"writable spte maps gfn {gfn:#x} in logging slot {slot.slot}, but the gfn is not in the bitmap",
            ("gfn-dirty", gfn),
            gfn=gfn,
            slot=slot.slot,
            level=sp.level,
        )


def check_unmapped_hva(kvm: Kvm, ledger: RefLedger, findings: Findings, hva: int, gfn: int) -> None:
    """I10, after each ``kvm_unmap_hva(hva)`` (all of ``invalidate_page``, one page of
    ``invalidate_range_start``): no present leaf, 4K or large, maps ``gfn``, the gfn behind hva, whose frame
    the host is about to free. Guards ``kvm_unmap_hva`` / ``kvm_handle_hva`` (docs/kernel.md, MMU notifiers;
    docs/kernel.md, Historical bugs: handle-hva-unaligned).

    The leaves are not looked up in the rmaps ``kvm_unmap_hva`` just used (a wrong rmap index would hide them):
    every present leaf of a refcounted frame owns one reference (docs/kernel.md, Invariants: I1), bound to it in the
    ledger when
    ``rmap_add`` installed it, and the host moves only refcounted frames. So the candidates are the owners of
    the references on gfn's frame and on its 2 MiB head frame (a large leaf's), each read back from its shadow
    page: O(references on two frames) per call.
    """
    large_gfn = gfn & ~(KVM_PAGES_PER_HPAGE - 1)
    pfns = {pfn for pfn in (kvm.host.peek_pfn(gfn), kvm.host.peek_pfn(large_gfn)) if pfn is not None}
    owned = [(ref, ref.owner) for pfn in sorted(pfns) for ref in ledger.refs.get(pfn, ()) if ref.owner is not None]
    for ref, (sp, index) in owned:
        spte = sp.spt[index]
        leaf_gfn = gfn if sp.level == 1 else large_gfn
        live = kvm.active_mmu_pages.get(sp.id) is sp
        if live and is_shadow_present_pte(spte) and is_last_spte(spte, sp.level) and sp.gfns[index] == leaf_gfn:
            findings.report(
                "notifier-stale-spte",
                f"after kvm_unmap_hva({hva:#x}) a present level-{sp.level} leaf still maps gfn {gfn:#x}",
                ("gfn", leaf_gfn, sp.level),
                [ref.provenance()],
                gfn=leaf_gfn,
                level=sp.level,
                spte=spte,
            )


def check_refcounts(kvm: Kvm, ledger: RefLedger, findings: Findings, in_flight: Counter[int]) -> None:
    """I1: every reference KVM holds is owned by a present leaf mapping that frame, or is in flight at this
    audit point (``in_flight``: frame -> references allowed without an owner)."""
    for pfn in sorted(ledger.refs):
        check_refcount(kvm, ledger, findings, pfn, in_flight.get(pfn, 0))


def live_leaf(kvm: Kvm, sp: KvmMmuPage, index: int) -> bool:
    """Whether ``sp.spt[index]`` is a present leaf of a live page (what :func:`live_leaves` yields)."""
    spte = sp.spt[index]
    return spte != TRAP and spte != NOTRAP and is_last_spte(spte, sp.level) and kvm.active_mmu_pages.get(sp.id) is sp


def check_refcount(kvm: Kvm, ledger: RefLedger, findings: Findings, pfn: int, allowance: int) -> None:
    """I1 for one frame: each reference has its own owner, a present leaf mapping the frame, or is one of
    ``allowance`` references in flight."""
    leaked = []
    seen_owners: set[Sptep] = set()
    for ref in ledger.refs.get(pfn, ()):
        owner = ref.owner
        if owner is None:
            if allowance:
                allowance -= 1
                continue
            leaked.append(ref)
        elif owner in seen_owners or not live_leaf(kvm, *owner) or spte_to_pfn(owner[0].spt[owner[1]]) != pfn:
            leaked.append(ref)
        else:
            seen_owners.add(owner)
    if leaked:
        findings.report(
            "refcount-leak",
            f"frame {pfn:#x} holds {len(leaked)} KVM reference(s) that no present spte owns",
            ("pfn", pfn),
            [ref.provenance() for ref in leaked],
            pfn=pfn,
        )


__all__ = [
    "audit_mappings",
    "audit_mappings_page",
    "audit_rmap",
    "audit_write_protection",
    "check_accounting",
    "check_dirty_log",
    "check_memslots",
    "check_parent_links",
    "check_refcounts",
    "check_unmapped_hva",
    "check_write_count",
]
