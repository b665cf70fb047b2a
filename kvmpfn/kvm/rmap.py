"""Reverse maps (arch/x86/kvm/mmu.c, v2.6.26): docs/kernel.md, rmap_remove and rmap_write_protect; and
docs/kernel.md, MMU notifiers.

An rmap head (the kernel's ``unsigned long *rmapp``) is a key in ``kvm.rmap`` (4K, by gfn) or
``kvm.rmap_pde`` (2 MiB, by region ``gfn >> 9``). Its value follows the kernel's encoding: absent (0), one
``sptep`` (bit 0 clear: a single pointer), or a ``list`` of ``kvm_rmap_desc`` (bit 0 set), each desc a list of
at most RMAP_EXT sptep. As in the kernel, a desc chain never collapses back to the single-pointer form: it
shrinks until its last entry goes, then the head becomes 0 (v2.6.26's ``rmap_desc_remove_entry``).
"""

from __future__ import annotations

from typing import cast

from kvmpfn.errors import KernelBug
from kvmpfn.kvm.spte import TRAP, is_large_pte, is_rmap_pte, is_writeble_pte, spte_to_pfn
from kvmpfn.kvm.vm import Kvm, RmapHead, Sptep, Vcpu
from kvmpfn.x86 import KVM_PAGES_PER_HPAGE, PT_WRITABLE_MASK

RMAP_EXT = 4


def gfn_to_rmap(kvm: Kvm, gfn: int, lpage: int) -> tuple[dict[int, RmapHead], int]:
    """``gfn_to_rmap``: the rmap head of a 4K gfn, or of the 2 MiB region holding it (``lpage_info.rmap_pde``).

    Differs from the kernel: heads are kept by gfn (and region) rather than in per-slot arrays, so that a
    gfn whose slot is gone still has one (modelling the freed arrays before v2.6.27).
    """
    if lpage:
        return kvm.rmap_pde, gfn // KVM_PAGES_PER_HPAGE
    return kvm.rmap, gfn


def rmap_add(vcpu: Vcpu, kvm: Kvm, sptep: Sptep, gfn: int, lpage: int) -> None:
    """``rmap_add``: record that ``sptep`` maps ``gfn`` (0→1: pointer; 1→many: desc; many→many: append).

    Sets ``sp->gfns[index]``; the reference the caller holds is now owned by the spte.
    """
    sp, index = sptep
    if not is_rmap_pte(sp.spt[index]):
        return
    sp.gfns[index] = gfn
    table, key = gfn_to_rmap(kvm, gfn, lpage)
    head = table.get(key)
    if head is None:
        table[key] = sptep
    elif isinstance(head, tuple):
        table[key] = [[head, sptep]]
    else:
        # many->many: the first desc whose last slot is free, else a new desc at the end
        for desc in head:
            if len(desc) < RMAP_EXT:
                desc.append(sptep)
                break
        else:
            head.append([sptep])
    if kvm.on_rmap_add is not None:
        kvm.on_rmap_add(sptep, spte_to_pfn(sp.spt[index]))


def rmap_desc_remove_entry(table: dict[int, RmapHead], key: int, descs: list[list[Sptep]], d: int, i: int) -> None:
    """``rmap_desc_remove_entry``: move the last used slot of the desc into the hole; free an empty desc."""
    desc = descs[d]
    last = desc.pop()
    if i < len(desc):
        desc[i] = last
    if desc:
        return
    del descs[d]
    if not descs:
        del table[key]


def rmap_remove(kvm: Kvm, sptep: Sptep) -> None:
    """``rmap_remove``: drop the reference a present leaf owns, then unlink it from its rmap.

    Refcount: ``kvm_set_pfn_accessed`` if ``shadow_accessed_mask`` is set in the spte (never for EPT: v2.6.26's
    fake bit 62 is never set, v2.6.27's mask is 0), then ``kvm_release_pfn_dirty`` if W else
    ``kvm_release_pfn_clean`` (−1). The spte itself is not modified: callers overwrite it.
    """
    sp, index = sptep
    spte = sp.spt[index]
    if not is_rmap_pte(spte):
        return
    api = kvm.api
    pfn = spte_to_pfn(spte)
    if kvm.on_rmap_remove is not None:
        kvm.on_rmap_remove(sptep, pfn, spte)
    if spte & kvm.shadow_accessed_mask:
        api.kvm_set_pfn_accessed(pfn, "rmap_remove")
    if is_writeble_pte(spte) and "release-clean-writable" not in kvm.bugs:
        api.kvm_release_pfn_dirty(pfn, "rmap_remove")
    else:
        api.kvm_release_pfn_clean(pfn, "rmap_remove")
    table, key = gfn_to_rmap(kvm, sp.gfns[index], is_large_pte(spte))
    head = table.get(key)
    if head is None:
        raise KernelBug(f"rmap_remove: {sp!r}[{index}] {spte:#x} 0->BUG", spte)
    if isinstance(head, tuple):
        if head != sptep:
            raise KernelBug(f"rmap_remove: {sp!r}[{index}] {spte:#x} 1->BUG", spte)
        del table[key]
        return
    for d, desc in enumerate(head):
        for i, entry in enumerate(desc):
            if entry == sptep:
                rmap_desc_remove_entry(table, key, head, d, i)
                return
    raise KernelBug(f"rmap_remove: {sp!r}[{index}] {spte:#x} many->BUG", spte)


def rmap_next(table: dict[int, RmapHead], key: int, sptep: Sptep | None) -> Sptep | None:
    """``rmap_next``: the entry after ``sptep`` (the first for None). In desc form the successor is found by
    searching for ``sptep``, so a removed ``sptep`` ends the walk (the root of ``--bug rmap-wp-hugepage-iter``)."""
    head = table.get(key)
    if head is None:
        return None
    if isinstance(head, tuple):
        return head if sptep is None else None
    prev = None
    for desc in head:
        for entry in desc:
            if prev == sptep:
                return entry
            prev = entry
    return None


def rmap_entries(table: dict[int, RmapHead], key: int) -> list[Sptep]:
    """Every sptep of one rmap head, in ``rmap_next`` order."""
    head = table.get(key)
    if head is None:
        return []
    if isinstance(head, tuple):
        return [head]
    return [entry for desc in head for entry in desc]


def rmap_write_protect(kvm: Kvm, gfn: int) -> None:
    """``rmap_write_protect`` (6597ca09 form): clear W in every 4K spte of ``gfn`` (``kvm_set_pfn_dirty`` on
    the first one's frame if any was writable), drop writable large sptes covering it (``rmap_remove``,
    trap, restart the iteration), then ``account_shadowed``. Read-only large sptes stay.

    ``--bug rmap-wp-hugepage-iter`` continues from the removed entry instead of restarting.
    """
    from kvmpfn.kvm.mmu import account_shadowed

    api = kvm.api
    write_protected = False
    cleared: set[int] = set()
    if kvm.on_write_protect is not None:
        kvm.on_write_protect(None)
    table, key = gfn_to_rmap(kvm, gfn, 0)
    sptep = rmap_next(table, key, None)
    while sptep is not None:
        sp, index = sptep
        if is_writeble_pte(sp.spt[index]):
            sp.spt[index] &= ~PT_WRITABLE_MASK
            cleared.add(spte_to_pfn(sp.spt[index]))
            write_protected = True
        sptep = rmap_next(table, key, sptep)
    if write_protected:
        sp, index = cast(Sptep, rmap_next(table, key, None))  # the loop above found a writable one
        api.kvm_set_pfn_dirty(spte_to_pfn(sp.spt[index]), "rmap_write_protect")
    if kvm.on_write_protect is not None:
        kvm.on_write_protect(cleared)

    table, key = gfn_to_rmap(kvm, gfn, 1)
    sptep = rmap_next(table, key, None)
    while sptep is not None:
        sp, index = sptep
        if is_writeble_pte(sp.spt[index]):
            rmap_remove(kvm, sptep)
            kvm.stat["lpages"] -= 1
            sp.spt[index] = TRAP
            if "rmap-wp-hugepage-iter" not in kvm.bugs:  # tested only where it matters (kvmpfn hunt's probe)
                sptep = None
            write_protected = True
        sptep = rmap_next(table, key, sptep)
    if write_protected:
        kvm.stat["remote_tlb_flush"] += 1
    account_shadowed(kvm, gfn)


def kvm_unmap_rmapp(kvm: Kvm, table: dict[int, RmapHead], key: int) -> bool:
    """``kvm_unmap_rmapp`` (v2.6.27): remove every spte of one rmap head (``rmap_remove``, then trap)."""
    flush = False
    while (sptep := rmap_next(table, key, None)) is not None:
        rmap_remove(kvm, sptep)
        sp, index = sptep
        sp.spt[index] = TRAP
        flush = True
    return flush
