"""The shadow MMU core of arch/x86/kvm/mmu.c (v2.6.26, with the v2.6.27 switches of the ``notifier`` variant):
shadow pages, parent links, write-protection accounting, ``mmu_set_spte``, the direct map used by paging-off
guests and TDP, zapping, recycling, roots and dirty logging. See docs/kernel.md, Fault paths (each section from
nonpaging_map to Teardown).
"""

from __future__ import annotations

from typing import cast

from kvmpfn.errors import KernelBug
from kvmpfn.host.memslots import Memslot
from kvmpfn.kvm.rmap import (
    gfn_to_rmap,
    kvm_unmap_rmapp,
    rmap_add,
    rmap_remove,
    rmap_write_protect,
)
from kvmpfn.kvm.spte import (
    TRAP,
    is_large_pte,
    is_rmap_pte,
    is_shadow_present_pte,
    is_writeble_pte,
    spte_to_pfn,
)
from kvmpfn.kvm.vm import EPT_FAKE_DIRTY_MASK, SHADOW_PAGE_FIRST_PFN, Kvm, KvmMmuPage, KvmSlot, Sptep, Vcpu, role_word
from kvmpfn.x86 import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    INVALID_PAGE,
    KVM_MIN_ALLOC_MMU_PAGES,
    KVM_MIN_FREE_MMU_PAGES,
    KVM_PAGES_PER_HPAGE,
    KVM_PERMILLE_MMU_PAGES,
    KVM_REFILL_PAGES,
    PAGE_SHIFT,
    PFERR_WRITE_MASK,
    PT32_ROOT_LEVEL,
    PT32E_ROOT_LEVEL,
    PT64_BASE_ADDR_MASK,
    PT64_DIR_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT64_ROOT_LEVEL,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)

ENOMEM = -12
TDP_ROOT_LEVEL = 4  # kvm_x86_ops->get_tdp_level() on an x86_64 host (NPT and EPT)
PT64_LEVEL_SHIFT = (PAGE_SHIFT, PAGE_SHIFT + 9, PAGE_SHIFT + 18, PAGE_SHIFT + 27)


def pt64_index(addr: int, level: int) -> int:
    """``PT64_INDEX``: 9 index bits of ``addr`` at ``level``."""
    return (addr >> PT64_LEVEL_SHIFT[level - 1]) & 511


# --- memslot bookkeeping: lpage_info write counts and dirty bitmaps -----------------------------------------


def gfn_to_kvm_slot(kvm: Kvm, gfn: int) -> KvmSlot | None:
    """``gfn_to_memslot`` (KVM side)."""
    ms = kvm.host.gfn_to_memslot(gfn)
    return None if ms is None else kvm.slots.get(ms.slot)


def slot_largepage_idx(gfn: int, slot: KvmSlot) -> int:
    """``slot_largepage_idx``: index of gfn's 2 MiB region in the slot's ``lpage_info``."""
    return gfn // KVM_PAGES_PER_HPAGE - slot.base_gfn // KVM_PAGES_PER_HPAGE


def account_shadowed(kvm: Kvm, gfn: int) -> None:
    """``account_shadowed``: ``write_count++`` of gfn's 2 MiB region (no large sptes over a shadowed table).

    Differs from the kernel: a gfn with no slot is skipped (the kernel dereferences NULL).
    """
    slot = gfn_to_kvm_slot(kvm, gfn)
    if slot is not None:
        idx = slot_largepage_idx(gfn, slot)
        slot.write_count[idx] = slot.write_count.get(idx, 0) + 1


def unaccount_shadowed(kvm: Kvm, gfn: int) -> None:
    """``unaccount_shadowed``: ``write_count--`` (WARN below 0). A gfn whose slot is gone is skipped."""
    slot = gfn_to_kvm_slot(kvm, gfn)
    if slot is not None:
        idx = slot_largepage_idx(gfn, slot)
        slot.write_count[idx] = slot.write_count.get(idx, 0) - 1


def has_wrprotected_page(kvm: Kvm, gfn: int) -> int:
    """``has_wrprotected_page``: the region's write_count, or 1 when no slot holds gfn."""
    slot = gfn_to_kvm_slot(kvm, gfn)
    if slot is None:
        return 1
    return slot.write_count.get(slot_largepage_idx(gfn, slot), 0)


def is_largepage_backed(vcpu: Vcpu, kvm: Kvm, large_gfn: int) -> bool:
    """``is_largepage_backed``: no shadowed table in the region (write_count, which also marks regions the
    slot covers only partly), hugetlbfs backing (``host_largepage_backed``), no dirty logging."""
    if has_wrprotected_page(kvm, large_gfn):
        return False
    if not kvm.host.is_hugetlb(large_gfn):
        return False
    slot = gfn_to_kvm_slot(kvm, large_gfn)
    return not (slot is not None and slot.dirty_bitmap is not None)


def mark_page_dirty(kvm: Kvm, gfn: int) -> None:
    """``mark_page_dirty``: set gfn in its slot's dirty bitmap when the slot logs."""
    slot = gfn_to_kvm_slot(kvm, gfn)
    if slot is not None and slot.dirty_bitmap is not None:
        slot.dirty_bitmap.add(gfn)


def slot_edge_write_counts(base_gfn: int, npages: int) -> dict[int, int]:
    """The ``lpage_info[].write_count`` that ``__kvm_set_memory_region`` presets (kvm_main.c, v2.6.26): 1 for
    the first region when ``base_gfn`` is not 2 MiB aligned and 1 for the last when the slot's end is not. The
    kernel assigns both, so a slot inside a single 2 MiB region has that region at 1, not 2.

    Differs from the kernel: it presets index ``largepages - 1`` of an array sized ``npages / 512``, +1 for a
    partial tail, +1 for an unaligned base; when the base is unaligned and ``base % 512 + npages % 512 <= 512``
    that index lies one past the slot's last region, which then keeps 0. Here the slot's real last region gets
    the 1 (the later kernels' ``gfn_to_index`` sizing).
    """
    counts: dict[int, int] = {}
    end = base_gfn + npages
    if base_gfn % KVM_PAGES_PER_HPAGE:
        counts[0] = 1
    if end % KVM_PAGES_PER_HPAGE:
        counts[(end - 1) // KVM_PAGES_PER_HPAGE - base_gfn // KVM_PAGES_PER_HPAGE] = 1
    return counts


def kvm_slot_init(kvm: Kvm, slot_id: int, base_gfn: int, npages: int) -> KvmSlot:
    """The lpage_info part of ``__kvm_set_memory_region``: regions the slot covers only partly start with
    ``write_count = 1`` (:func:`slot_edge_write_counts`) so that they are never mapped large.

    Differs from the kernel: on a move (same ``npages``, new ``base_gfn``; a new size is refused) the kernel
    reused the old slot's ``lpage_info`` array, counts and edge flags of the old geometry included; here the
    counts are rebuilt for the new geometry from the live shadow pages.
    """
    slot = KvmSlot(slot_id, base_gfn, npages, write_count=slot_edge_write_counts(base_gfn, npages))
    end = base_gfn + npages
    for sp in kvm.active_mmu_pages.values():
        if not sp.metaphysical and base_gfn <= sp.gfn < end and (not sp.invalid or not kvm.notifiers):
            idx = slot_largepage_idx(sp.gfn, slot)
            slot.write_count[idx] = slot.write_count.get(idx, 0) + 1
    return slot


def kvm_mmu_audit(vcpu: Vcpu, kvm: Kvm, msg: str) -> None:
    """``kvm_mmu_audit`` (``#ifdef AUDIT``): the four audit points call the auditor, when one is attached."""
    if kvm.audit_point is not None:
        kvm.audit_point(vcpu, msg)


# --- shadow pages ------------------------------------------------------------------------------------------


def kvm_mmu_alloc_page(kvm: Kvm, parent_pte: Sptep | None) -> KvmMmuPage:
    """``kvm_mmu_alloc_page``: a new page at the head of the active list; ``n_free_mmu_pages--``."""
    sp_id = kvm.next_sp_id
    kvm.next_sp_id += 1
    sp = KvmMmuPage(sp_id, SHADOW_PAGE_FIRST_PFN + sp_id)
    kvm.page_header[sp.hpa] = sp
    kvm.active_mmu_pages[sp_id] = sp
    if kvm.on_new_page is not None:
        kvm.on_new_page(sp)
    if parent_pte is not None:
        sp.parent_ptes.append(parent_pte)
    kvm.n_free_mmu_pages -= 1
    return sp


def kvm_mmu_free_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    """``kvm_mmu_free_page``: off the active list; ``n_free_mmu_pages++``."""
    del kvm.active_mmu_pages[sp.id]
    del kvm.page_header[sp.hpa]
    kvm.n_free_mmu_pages += 1


def page_header(kvm: Kvm, hpa: int) -> KvmMmuPage:
    """``page_header``: the shadow page whose ``spt`` lives at ``hpa`` (an spte's address bits)."""
    sp = kvm.page_header.get((hpa & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT)
    if sp is None:
        raise KernelBug(f"page_header: {hpa:#x} is not a shadow page")
    return sp


def mmu_page_add_parent_pte(sp: KvmMmuPage, parent_pte: Sptep | None) -> None:
    """``mmu_page_add_parent_pte`` (a NULL parent, i.e. a root, is ignored)."""
    if parent_pte is not None:
        sp.parent_ptes.append(parent_pte)


def mmu_page_remove_parent_pte(sp: KvmMmuPage, parent_pte: Sptep) -> None:
    """``mmu_page_remove_parent_pte`` (BUG when not found)."""
    try:
        sp.parent_ptes.remove(parent_pte)
    except ValueError:
        raise KernelBug(f"mmu_page_remove_parent_pte: {parent_pte!r} not a parent of {sp!r}") from None


def kvm_mmu_put_page(sp: KvmMmuPage, parent_pte: Sptep) -> None:
    """``kvm_mmu_put_page``."""
    mmu_page_remove_parent_pte(sp, parent_pte)


def kvm_mmu_lookup_page(kvm: Kvm, gfn: int) -> KvmMmuPage | None:
    """``kvm_mmu_lookup_page``: the first live shadow page of gfn that shadows a guest table (not
    metaphysical, not invalid), whatever its role."""
    for sp in kvm.mmu_page_hash.get(gfn, ()):
        if not sp.metaphysical and not sp.invalid:
            return sp
    return None


def context_role_bits(vcpu: Vcpu, kvm: Kvm) -> tuple[int, int]:
    """The role bits of the vcpu's current context beyond the era's: ``(cr0_wp, ext)``, where ``ext`` holds
    role.nxe, role.ext.cr4_pse and the smep/smap_andnot_wp bits later kernels added (a spte made for a CR0.WP=0
    supervisor write must not serve a context where the guest's SMEP/SMAP apply). Under TDP they are constant.

    v2.6.26's ``union kvm_mmu_page_role`` (include/asm-x86/kvm_host.h) has glevels, level, quadrant,
    metaphysical, access and invalid only: ``--bug role-ignores-pse-nx`` keys pages without ``ext`` (CR0.WP
    has its own switch, ``--bug cr0wp-shared-sp``). Then after a CR4.PSE or EFER.NX change ``mmu_alloc_roots``
    re-finds the same roots, and sptes made under the old meaning of a guest pde keep serving.
    """
    cpu = vcpu.cpu
    cr0_wp = 1 if cpu.cr0_wp or "cr0wp-shared-sp" in kvm.bugs or kvm.tdp_enabled else 0
    if kvm.tdp_enabled or "role-ignores-pse-nx" in kvm.bugs:
        return cr0_wp, 0
    ext = (
        int(bool(cpu.efer_nx))
        | int(bool(cpu.cr4_pse)) << 1
        | int(bool(cpu.cr4_smep) and not cpu.cr0_wp) << 2
        | int(bool(cpu.cr4_smap) and not cpu.cr0_wp) << 3
    )
    return cr0_wp, ext


def kvm_mmu_get_page(
    vcpu: Vcpu, kvm: Kvm, gfn: int, gaddr: int, level: int, metaphysical: int, access: int, parent_pte: Sptep | None
) -> KvmMmuPage:
    """``kvm_mmu_get_page``: find the page for (gfn, role) or create it: hash it, write-protect the guest
    table it shadows (``rmap_write_protect``, which accounts it) and prefetch its entries.

    The role includes the quadrant for 32-bit guests and real mode, EFER.NX and CR4.PSE (later kernels' role
    bits: they change what a guest pte means), and ``cr0_wp`` (v2.6.35's fix; the era's
    pages were shared across CR0.WP: ``--bug cr0wp-shared-sp``). ``parent_pte`` is ``(sp, index)`` or None.
    """
    root_level = vcpu.root_level
    quadrant = 0
    if root_level <= PT32_ROOT_LEVEL:
        quadrant = (gaddr >> (PAGE_SHIFT + 9 * level)) & ((1 << level) - 1)
    cr0_wp, ext = context_role_bits(vcpu, kvm)
    role = role_word(root_level, level, quadrant, metaphysical, access, 0, cr0_wp, ext)
    bucket = kvm.mmu_page_hash.setdefault(gfn, [])
    for sp in bucket:
        if sp.role == role:
            mmu_page_add_parent_pte(sp, parent_pte)
            return sp
    kvm.stat["mmu_cache_miss"] += 1
    sp = kvm_mmu_alloc_page(kvm, parent_pte)
    sp.gfn = gfn
    sp.role = role
    sp.glevels = root_level
    sp.level = level
    sp.quadrant = quadrant
    sp.metaphysical = metaphysical
    sp.access = access
    sp.cr0_wp = cr0_wp
    sp.ext = ext
    bucket.insert(0, sp)  # hlist_add_head
    if not metaphysical:
        rmap_write_protect(kvm, gfn)
    # v2.6.27 prefetches only when trap != notrap: with VMX and bypass_guest_pf they always differ
    vcpu.prefetch_page(vcpu, kvm, sp)
    return sp


def nonpaging_prefetch_page(vcpu: Vcpu, kvm: Kvm, sp: KvmMmuPage) -> None:
    """``nonpaging_prefetch_page``: every entry trap (already so in a new page)."""


def kvm_mmu_page_unlink_children(kvm: Kvm, sp: KvmMmuPage) -> None:
    """``kvm_mmu_page_unlink_children``: leaves are ``rmap_remove``d (−1 each); child pages lose their parent
    link but are not zapped (they stay on the active list, orphaned, with their own leaves); all trap."""
    spt = sp.spt
    if sp.level == 1:
        for i in range(512):
            if is_shadow_present_pte(spt[i]):
                rmap_remove(kvm, (sp, i))
            spt[i] = TRAP
    else:
        for i in range(512):
            ent = spt[i]
            if is_shadow_present_pte(ent):
                if not is_large_pte(ent):
                    mmu_page_remove_parent_pte(page_header(kvm, ent), (sp, i))
                else:
                    kvm.stat["lpages"] -= 1
                    rmap_remove(kvm, (sp, i))
            spt[i] = TRAP
    kvm.stat["remote_tlb_flush"] += 1


def kvm_mmu_reset_last_pte_updated(kvm: Kvm) -> None:
    """``kvm_mmu_reset_last_pte_updated``."""
    for vcpu in kvm.vcpus.values():
        vcpu.last_pte_updated = None


def kvm_mmu_zap_page(kvm: Kvm, sp: KvmMmuPage) -> None:
    """``kvm_mmu_zap_page``: unlink from every parent (their sptes become trap), unlink the children, then free
    the page, or, while it is a root, mark it invalid and move it to the head (the vcpus reload their roots).

    ``unaccount_shadowed`` happens when the page is freed (v2.6.26) or, with ``notifier`` (v2.6.27), when it
    is zapped and not already invalid (``--bug unaccount-invalid-root`` re-creates the double unaccount).
    """
    kvm.stat["mmu_shadow_zapped"] += 1
    if kvm.on_zap_page is not None:
        kvm.on_zap_page(sp)
    while sp.parent_ptes:
        parent_pte = sp.parent_ptes[0]
        kvm_mmu_put_page(sp, parent_pte)
        psp, pindex = parent_pte
        psp.spt[pindex] = TRAP
    kvm_mmu_page_unlink_children(kvm, sp)
    unaccount_at_zap = kvm.notifiers or "unaccount-invalid-root" in kvm.bugs
    if not sp.root_count:
        if not sp.metaphysical and (not sp.invalid or not kvm.notifiers):
            unaccount_shadowed(kvm, sp.gfn)
        kvm.mmu_page_hash[sp.gfn].remove(sp)
        if not kvm.mmu_page_hash[sp.gfn]:
            del kvm.mmu_page_hash[sp.gfn]
        kvm_mmu_free_page(kvm, sp)
    else:
        if unaccount_at_zap and not sp.metaphysical and not sp.invalid:
            unaccount_shadowed(kvm, sp.gfn)
        del kvm.active_mmu_pages[sp.id]
        kvm.active_mmu_pages[sp.id] = sp  # list_move to the head
        sp.set_invalid()
        kvm_reload_remote_mmus(kvm)
    kvm_mmu_reset_last_pte_updated(kvm)


def kvm_reload_remote_mmus(kvm: Kvm) -> None:
    """``kvm_reload_remote_mmus``: every vcpu drops and reloads its roots at its next guest entry."""
    for vcpu in kvm.vcpus.values():
        vcpu.mmu_reload_requested = True


def kvm_mmu_change_mmu_pages(kvm: Kvm, kvm_nr_mmu_pages: int) -> None:
    """``kvm_mmu_change_mmu_pages``: shrink by zapping from the tail (then ``n_free = 0``), or grow."""
    used = kvm.n_alloc_mmu_pages - kvm.n_free_mmu_pages
    if used > kvm_nr_mmu_pages:
        while used > kvm_nr_mmu_pages and kvm.active_mmu_pages:
            kvm_mmu_zap_page(kvm, next(iter(kvm.active_mmu_pages.values())))
            used -= 1
        kvm.n_free_mmu_pages = 0
    else:
        kvm.n_free_mmu_pages += kvm_nr_mmu_pages - kvm.n_alloc_mmu_pages
    kvm.n_alloc_mmu_pages = kvm_nr_mmu_pages


def kvm_mmu_calculate_mmu_pages(kvm: Kvm) -> int:
    """``kvm_mmu_calculate_mmu_pages``: 2% of the memslot pages, at least 64."""
    nr_pages = sum(slot.npages for slot in kvm.slots.values())
    return max(nr_pages * KVM_PERMILLE_MMU_PAGES // 1000, KVM_MIN_ALLOC_MMU_PAGES)


def kvm_mmu_unprotect_page(kvm: Kvm, gfn: int) -> bool:
    """``kvm_mmu_unprotect_page``: zap every non-metaphysical page of gfn (invalid ones too)."""
    zapped = False
    for sp in list(kvm.mmu_page_hash.get(gfn, ())):
        if not sp.metaphysical and sp.id in kvm.active_mmu_pages and sp.gfn == gfn:
            kvm_mmu_zap_page(kvm, sp)
            zapped = True
    return zapped


def mmu_unshadow(kvm: Kvm, gfn: int) -> None:
    """``mmu_unshadow``: zap pages of gfn until ``kvm_mmu_lookup_page`` finds none."""
    while (sp := kvm_mmu_lookup_page(kvm, gfn)) is not None:
        kvm_mmu_zap_page(kvm, sp)


def page_header_update_slot(kvm: Kvm, sp: KvmMmuPage, gfn: int) -> None:
    """``page_header_update_slot``: note in the containing page that it maps into gfn's slot."""
    ms = kvm.host.gfn_to_memslot(gfn)
    if ms is not None:
        sp.slot_bitmap.add(ms.slot)


def __kvm_mmu_free_some_pages(kvm: Kvm) -> None:
    """``__kvm_mmu_free_some_pages``: zap from the tail of the active list until 25 pages are free.

    Differs from the kernel: stops after a whole pass that freed nothing, i.e. when only roots are left (the
    kernel would loop forever).
    """
    stuck = 0
    while kvm.n_free_mmu_pages < KVM_REFILL_PAGES and kvm.active_mmu_pages and stuck < len(kvm.active_mmu_pages):
        before = kvm.n_free_mmu_pages
        kvm_mmu_zap_page(kvm, next(iter(kvm.active_mmu_pages.values())))
        kvm.stat["mmu_recycled"] += 1
        stuck = stuck + 1 if kvm.n_free_mmu_pages == before else 0


def kvm_mmu_free_some_pages(vcpu: Vcpu, kvm: Kvm) -> None:
    """``kvm_mmu_free_some_pages``: recycle when fewer than 5 shadow pages are free."""
    if kvm.n_free_mmu_pages < KVM_MIN_FREE_MMU_PAGES:
        __kvm_mmu_free_some_pages(kvm)


def mmu_topup_memory_caches(vcpu: Vcpu, kvm: Kvm) -> int:
    """``mmu_topup_memory_caches``: never fails in the simulation unless ``inject enomem`` says so."""
    return ENOMEM if kvm.consume("enomem") else 0


def kvm_mmu_zap_all(kvm: Kvm) -> None:
    """``kvm_mmu_zap_all``: zap every page on the active list (roots become invalid and stay)."""
    for sp in list(kvm.active_mmu_pages.values())[::-1]:
        if sp.id in kvm.active_mmu_pages:
            kvm_mmu_zap_page(kvm, sp)
    kvm.stat["remote_tlb_flush"] += 1


# --- mmu_set_spte ------------------------------------------------------------------------------------------


def mmu_set_spte(
    vcpu: Vcpu,
    kvm: Kvm,
    sptep: Sptep,
    pt_access: int,
    pte_access: int,
    user_fault: int,
    write_fault: int,
    dirty: int,
    largepage: int,
    gfn: int,
    pfn: int,
    speculative: bool,
) -> int:
    """``mmu_set_spte``: install a leaf spte for ``gfn`` → ``pfn``, consuming the caller's reference R(pfn).

    Branches on the old value (docs/kernel.md, mmu_set_spte): (B) a table pointer replaced by a large leaf → the child
    loses its parent link (not zapped); (C) a leaf of another pfn → ``rmap_remove`` (−1 on the old frame);
    (D) the same pfn → ``was_rmapped``: the duplicate reference is released at the end (dirty if the old spte
    was writable). A new spte is ``rmap_add``ed and owns R(pfn). Write access is withheld when gfn is a
    shadowed guest table (``kvm_mmu_lookup_page``) or a large spte would cover one (``has_wrprotected_page``);
    a write fault then returns 1 (``*ptwrite``: the caller emulates the write).

    Differs from the kernel: the era's CR0.WP=0 supervisor-write path (W on a read-only gpte, U kept) runs
    only under ``--bug cr0wp-user-write``; otherwise ``FNAME(page_fault)`` has already converted
    ``pte_access`` to W without U (later kernels, ``paging.cr0_wp0_supervisor_write``), and what reaches
    this branch is a user page under CR4.SMAP, left read-only with the write emulated (so the guest's SMAP
    still applies); ``pte_access |= PT_ACCESSED_MASK`` is kept as the
    era's no-op (docs/kernel.md, mmu_set_spte), so fault-made sptes start with A clear. Returns the ``*ptwrite``
    value.

    The spte is built from the shadow masks (``shadow_base_present_pte``, ``shadow_dirty_mask``,
    ``shadow_x_mask``/``shadow_nx_mask``, ``shadow_user_mask``): the x86 format for shadow paging and NPT, the
    EPT format under ``--tdp ept`` (:func:`ept_base_spte`).
    """
    sp, index = sptep
    old = sp.spt[index]
    was_rmapped = 0
    was_writeble = is_writeble_pte(old)
    pt_write = 0
    if is_rmap_pte(old):
        if largepage and not is_large_pte(old):
            mmu_page_remove_parent_pte(page_header(kvm, old), sptep)
        elif pfn != spte_to_pfn(old):
            rmap_remove(kvm, sptep)
        else:
            was_rmapped = is_large_pte(old) if largepage else 1

    if kvm.tdp_enabled and kvm.tdp_flavour == "ept":
        spte = ept_base_spte(kvm)
        if not dirty:
            pte_access &= ~ACC_WRITE_MASK
        if pte_access & ACC_EXEC_MASK:
            spte |= VMX_EPT_EXECUTABLE_MASK
    else:
        spte = PT_PRESENT_MASK | PT_DIRTY_MASK
        if not dirty:
            pte_access &= ~ACC_WRITE_MASK
        if not pte_access & ACC_EXEC_MASK:
            spte |= PT64_NX_MASK
        if pte_access & ACC_USER_MASK:
            spte |= PT_USER_MASK
    if largepage:
        spte |= PT_PAGE_SIZE_MASK
    if "pfn-shift-32" in kvm.bugs:
        spte |= (pfn << PAGE_SHIFT) & 0xFFFFFFFF  # --bug pfn-shift-32: no (u64) cast before the shift
    else:
        spte |= pfn << PAGE_SHIFT

    if pte_access & ACC_WRITE_MASK or (write_fault and not vcpu.cpu.cr0_wp and not user_fault):
        spte |= PT_WRITABLE_MASK
        if not pte_access & ACC_WRITE_MASK and not kvm.tdp_enabled and "cr0wp-user-write" not in kvm.bugs:
            # CR0.WP=0 supervisor write to a read-only gpte: FNAME(page_fault) already gave pte_access W
            # without U (cr0_wp0_supervisor_write) except for a user page under CR4.SMAP. Without U the host's
            # SMAP check would pass later AC=0 supervisor accesses: keep the user page read-only and emulate
            # this write instead (later kernels check SMAP in software here)
            spte &= ~PT_WRITABLE_MASK
            pt_write = 1
        if user_fault and "user-fault-unshadow" in kvm.bugs:
            mmu_unshadow(kvm, gfn)  # the seed's heuristic (docs/kernel.md, Historical bugs: user-fault-unshadow)
        elif "no-write-protect" not in kvm.bugs and (
            kvm_mmu_lookup_page(kvm, gfn) is not None or (largepage and has_wrprotected_page(kvm, gfn))
        ):
            pte_access &= ~ACC_WRITE_MASK
            spte &= ~PT_WRITABLE_MASK
            if write_fault:
                pt_write = 1

    if pte_access & ACC_WRITE_MASK:
        mark_page_dirty(kvm, gfn)

    sp.spt[index] = spte
    if not was_rmapped and spte & PT_PAGE_SIZE_MASK:
        kvm.stat["lpages"] += 1
    page_header_update_slot(kvm, sp, gfn)
    api = kvm.api
    if not was_rmapped:
        rmap_add(vcpu, kvm, sptep, gfn, largepage)
        if "double-release" in kvm.bugs:
            api.kvm_release_pfn_clean(pfn, "mmu_set_spte")  # the v2.6.32 model's release, kept with rmap_remove's
    elif "same-pfn-no-release" not in kvm.bugs:
        if was_writeble:
            api.kvm_release_pfn_dirty(pfn, "mmu_set_spte")
        else:
            api.kvm_release_pfn_clean(pfn, "mmu_set_spte")
    if kvm.notifiers:
        if speculative:
            vcpu.last_pte_updated = sptep
            vcpu.last_pte_gfn = gfn
    elif not pt_write:
        vcpu.last_pte_updated = sptep
    return pt_write


VMX_EPT_EXECUTABLE_MASK = 0x4  # vmx.h; shadow_x_mask under EPT
VMX_EPT_BASE_PRESENT = 0x1 | 0x2 | 0x6 << 3  # VMX_EPT_READABLE | VMX_EPT_WRITABLE | VMX_EPT_DEFAULT_MT << 3


def ept_base_spte(kvm: Kvm) -> int:
    """``shadow_base_present_pte | shadow_dirty_mask`` under EPT (vmx.c): readable, writable, memory type 6
    (write-back, bits 5:3), plus in v2.6.26 (``page``, ``pfn``: ``vmx_create_vcpu``) the fake dirty bit 63
    (VMX_EPT_FAKE_DIRTY_MASK); v2.6.27 (``pfn-io``, ``notifier``: ``hardware_setup``) sets the dirty mask to 0.
    No user or NX mask: EPT has neither. ``shadow_accessed_mask`` is :attr:`Kvm.shadow_accessed_mask`.
    Note that bits 1 and 5 of the base coincide with the x86 W and A bits, and bit 2 (X) with U."""
    return VMX_EPT_BASE_PRESENT | (EPT_FAKE_DIRTY_MASK if kvm.kernel in ("page", "pfn") else 0)


# --- the direct map: paging-off guests and TDP -------------------------------------------------------------


def root_table(vcpu: Vcpu, kvm: Kvm, addr: int) -> tuple[KvmMmuPage | None, int]:
    """The table a shadow walk starts from: the root page, or, for a PAE-shaped shadow, the ``pae_root[i]``
    page at level 2 (None when that entry is absent)."""
    if vcpu.shadow_root_level == PT32E_ROOT_LEVEL:
        root = vcpu.pae_root[(addr >> 30) & 3] if addr < 1 << 32 else 0
        if not root & PT_PRESENT_MASK or root == INVALID_PAGE:
            return None, 2
        return page_header(kvm, root), 2
    return page_header(kvm, vcpu.root_hpa), vcpu.shadow_root_level


def __direct_map(vcpu: Vcpu, kvm: Kvm, v: int, write: int, largepage: int, gfn: int, pfn: int) -> int:
    """``__direct_map``: walk from the root by ``v``, creating metaphysical pages (pseudo gfn = the 2 MiB
    frame of ``v``) where an entry is trap, and install the leaf at level 1 (or 2 when ``largepage``).
    Consumes R(pfn). As in the kernel, only the exact trap value allocates: anything else present is followed
    as a table pointer (``--bug direct-map-into-large`` walks into a large spte; the default stops there and
    replaces it, as v2.6.32 did).
    """
    sp, level = root_table(vcpu, kvm, v)
    if sp is None:
        kvm.api.kvm_release_pfn_clean(pfn, "__direct_map")
        return 0
    while True:
        index = pt64_index(v, level)
        if level == 1:
            return mmu_set_spte(vcpu, kvm, (sp, index), ACC_ALL, ACC_ALL, 0, write, 1, 0, gfn, pfn, False)
        if largepage and level == 2:
            return mmu_set_spte(vcpu, kvm, (sp, index), ACC_ALL, ACC_ALL, 0, write, 1, 1, gfn, pfn, False)
        ent = sp.spt[index]
        if ent != TRAP and level == 2 and is_large_pte(ent) and is_shadow_present_pte(ent):
            if "direct-map-into-large" not in kvm.bugs:
                # v2.6.32 ("make for_each_shadow_entry aware of largepages"): drop the large spte first
                rmap_remove(kvm, (sp, index))
                kvm.stat["lpages"] -= 1
                sp.spt[index] = ent = TRAP
        if ent == TRAP:
            pseudo_gfn = (v & PT64_DIR_BASE_ADDR_MASK) >> PAGE_SHIFT
            child = kvm_mmu_get_page(vcpu, kvm, pseudo_gfn, v, level - 1, 1, ACC_ALL, (sp, index))
            sp.spt[index] = child.hpa << PAGE_SHIFT | PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK
            ent = sp.spt[index]
        table = kvm.page_header.get((ent & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT)
        if table is None:
            # --bug direct-map-into-large: the large spte's frame is not a shadow page; the kernel scribbles on guest
            # memory
            raise KernelBug(f"__direct_map: entry {ent:#x} at level {level} is not a table", ent)
        sp = table
        level -= 1


FAULT_RETRY = -1


def fault_gfn_to_pfn(vcpu: Vcpu, kvm: Kvm, gfn: int, caller: str) -> int | None:
    """The pfn step that ``nonpaging_map``, ``tdp_page_fault`` and ``FNAME(page_fault)`` each spell out in the
    kernel: R(pfn) from ``gfn_to_pfn``; an error pfn (its ``bad_page`` reference) is released and the fault is
    MMIO (None: the caller returns 1, emulate); under ``notifier`` an invalidation that ran meanwhile releases
    it too (FAULT_RETRY: the caller returns 0 and the guest faults again). ``--bug error-pfn-no-release``
    skips the MMIO release (docs/kernel.md, Historical bugs: error-pfn-no-release)."""
    mmu_seq = kvm.mmu_notifier_seq
    api = kvm.api
    pfn = api.gfn_to_pfn(gfn, caller)
    if api.is_error_pfn(pfn):
        if "error-pfn-no-release" not in kvm.bugs:
            api.kvm_release_pfn_clean(pfn, caller)
        vcpu.fault_mmio = True
        return None
    if kvm.notifiers and mmu_notifier_retry(kvm, mmu_seq):
        api.kvm_release_pfn_clean(pfn, caller)
        return FAULT_RETRY
    return pfn


def nonpaging_map(vcpu: Vcpu, kvm: Kvm, v: int, write: int, gfn: int, caller: str = "nonpaging_map") -> int:
    """``nonpaging_map``: a large mapping when the host backs the 2 MiB region, R(pfn) (``fault_gfn_to_pfn``),
    recycle shadow pages if needed, then ``__direct_map`` from the root (PT32E_ROOT_LEVEL with paging off, the
    TDP level under ``tdp_page_fault``), which consumes R."""
    largepage = 0
    if is_largepage_backed(vcpu, kvm, gfn & ~(KVM_PAGES_PER_HPAGE - 1)):
        gfn &= ~(KVM_PAGES_PER_HPAGE - 1)
        largepage = 1
    pfn = fault_gfn_to_pfn(vcpu, kvm, gfn, caller)
    if pfn is None:
        return 1
    if pfn == FAULT_RETRY:
        return 0
    kvm_mmu_free_some_pages(vcpu, kvm)
    return __direct_map(vcpu, kvm, v, write, largepage, gfn, pfn)


def nonpaging_page_fault(vcpu: Vcpu, kvm: Kvm, gva: int, error_code: int) -> int:
    """``nonpaging_page_fault``: paging off, the address is the gpa."""
    r = mmu_topup_memory_caches(vcpu, kvm)
    if r:
        return r
    return nonpaging_map(vcpu, kvm, gva & ~0xFFF, error_code & PFERR_WRITE_MASK, gva >> PAGE_SHIFT)


def tdp_page_fault(vcpu: Vcpu, kvm: Kvm, gpa: int, error_code: int) -> int:
    """``tdp_page_fault`` (NPT/EPT): ``nonpaging_map`` on the fault's gpa, whose ``__direct_map`` starts at the
    TDP root (the kernel repeats that body here rather than calling it).

    ``--bug tdp-gpa-32bit`` truncates the gpa to 32 bits (the era's ``gva_t gpa`` on i386 hosts).
    """
    if "tdp-gpa-32bit" in kvm.bugs:
        gpa &= 0xFFFFFFFF
    r = mmu_topup_memory_caches(vcpu, kvm)
    if r:
        return r
    return nonpaging_map(vcpu, kvm, gpa, error_code & PFERR_WRITE_MASK, gpa >> PAGE_SHIFT, "tdp_page_fault")


def mmu_notifier_retry(kvm: Kvm, mmu_seq: int) -> bool:
    """``mmu_notifier_retry`` (v2.6.27): an invalidation ran or is running since ``mmu_seq`` was sampled."""
    return kvm.mmu_notifier_count != 0 or kvm.mmu_notifier_seq != mmu_seq


# --- roots --------------------------------------------------------------------------------------------------


def mmu_free_roots(vcpu: Vcpu, kvm: Kvm) -> None:
    """``mmu_free_roots``: drop this vcpu's root references; an invalid root reaching 0 is zapped (freed)."""
    if vcpu.root_hpa == INVALID_PAGE:
        return
    if vcpu.shadow_root_level == PT64_ROOT_LEVEL:
        sp = page_header(kvm, vcpu.root_hpa)
        sp.root_count -= 1
        if not sp.root_count and sp.invalid:
            kvm_mmu_zap_page(kvm, sp)
        vcpu.root_hpa = INVALID_PAGE
        return
    for i in range(4):
        root = vcpu.pae_root[i]
        if root and root != INVALID_PAGE:
            sp = page_header(kvm, root)
            sp.root_count -= 1
            if not sp.root_count and sp.invalid:
                kvm_mmu_zap_page(kvm, sp)
        vcpu.pae_root[i] = INVALID_PAGE
    vcpu.root_hpa = INVALID_PAGE


PAE_ROOT_HPA = 0x3FFFFFFF000  # __pa(vcpu->arch.mmu.pae_root): a marker, the four entries live in vcpu.pae_root


def mmu_alloc_roots(vcpu: Vcpu, kvm: Kvm) -> None:
    """``mmu_alloc_roots``: one level-4 root (``cr3 >> 12``; metaphysical under TDP), or four level-2 roots in
    ``pae_root``: a PAE guest's present PDPTEs (absent ones 0), a 32-bit guest's cr3 page in quadrants 0–3,
    gfn 0 for real mode."""
    cpu = vcpu.cpu
    root_gfn = (cpu.cr3 & ((1 << 52) - 1)) >> PAGE_SHIFT
    if vcpu.shadow_root_level == PT64_ROOT_LEVEL:
        metaphysical = 1 if kvm.tdp_enabled else 0
        sp = kvm_mmu_get_page(vcpu, kvm, root_gfn, 0, PT64_ROOT_LEVEL, metaphysical, ACC_ALL, None)
        sp.root_count += 1
        vcpu.root_hpa = sp.hpa << PAGE_SHIFT
        return
    metaphysical = 1 if cpu.paging == "none" or kvm.tdp_enabled else 0
    for i in range(4):
        if vcpu.root_level == PT32E_ROOT_LEVEL:
            pdptr = cpu.pdptrs[i] if cpu.pdptrs else 0
            if not pdptr & PT_PRESENT_MASK:
                vcpu.pae_root[i] = 0
                continue
            root_gfn = (pdptr & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
        elif vcpu.root_level == 0:
            root_gfn = 0
        sp = kvm_mmu_get_page(vcpu, kvm, root_gfn, i << 30, PT32_ROOT_LEVEL, metaphysical, ACC_ALL, None)
        sp.root_count += 1
        vcpu.pae_root[i] = sp.hpa << PAGE_SHIFT | PT_PRESENT_MASK
    vcpu.root_hpa = PAE_ROOT_HPA


def kvm_mmu_load(vcpu: Vcpu, kvm: Kvm) -> int:
    """``kvm_mmu_load``: top up caches, recycle if needed, allocate the roots."""
    r = mmu_topup_memory_caches(vcpu, kvm)
    if r:
        return r
    kvm_mmu_free_some_pages(vcpu, kvm)
    mmu_alloc_roots(vcpu, kvm)
    return 0


def kvm_mmu_unload(vcpu: Vcpu, kvm: Kvm) -> None:
    """``kvm_mmu_unload`` = ``mmu_free_roots``."""
    mmu_free_roots(vcpu, kvm)


# --- dirty logging and MMU notifiers -----------------------------------------------------------------------


def kvm_mmu_slot_remove_write_access(kvm: Kvm, slot: int) -> None:
    """``kvm_mmu_slot_remove_write_access``: clear W in the leaves (4K and large) of every page that maps into
    the slot, without touching rmaps or dirtying frames (docs/kernel.md, Dirty logging).

    Differs from the kernel: v2.6.26 cleared W in every entry of such a page, table pointers included, and no
    fault path gave a present pointer its W back, so a store through a 4K table under a level-2 page holding a
    large leaf of the slot exited forever (a livelock the guest sees); later kernels protect last-level sptes
    only, as here. ``--bug dirty-log-pointer-wp`` re-creates the era's loop.
    """
    leaves_only = "dirty-log-pointer-wp" not in kvm.bugs
    for sp in kvm.active_mmu_pages.values():
        if slot not in sp.slot_bitmap:
            continue
        spt = sp.spt
        level = sp.level
        for i in range(512):
            ent = spt[i]
            if ent & PT_WRITABLE_MASK and (level == 1 or ent & PT_PAGE_SIZE_MASK or not leaves_only):
                spt[i] = ent & ~PT_WRITABLE_MASK
    kvm.stat["remote_tlb_flush"] += 1


def kvm_unmap_hva(kvm: Kvm, hva: int) -> bool:
    """``kvm_unmap_hva`` via ``kvm_handle_hva``: unmap the 4K rmap and the 2 MiB rmap of the gfn behind hva in
    every slot that maps it. ``--bug handle-hva-unaligned`` indexes the 2 MiB rmap relative to the slot
    start (``(gfn - base_gfn) / 512``, docs/kernel.md, Historical bugs: handle-hva-unaligned) instead of by region.

    The caller relies on no present leaf, 4K or large, mapping that gfn afterwards (docs/kernel.md, Invariants: I10);
    the auditor is told of each call (``on_unmap_hva``) and checks it."""
    gfn = kvm.host.hva_to_gfn(hva)
    if gfn is None:
        return False
    ms = cast(Memslot, kvm.host.gfn_to_memslot(gfn))  # hva_to_gfn found its slot
    table, key = gfn_to_rmap(kvm, gfn, 0)
    flush = kvm_unmap_rmapp(kvm, table, key)
    if ms.base_gfn % KVM_PAGES_PER_HPAGE and "handle-hva-unaligned" in kvm.bugs:  # only an unaligned slot differs
        region = ms.base_gfn // KVM_PAGES_PER_HPAGE + (gfn - ms.base_gfn) // KVM_PAGES_PER_HPAGE
    else:
        region = gfn // KVM_PAGES_PER_HPAGE
    flush |= kvm_unmap_rmapp(kvm, kvm.rmap_pde, region)
    if kvm.on_unmap_hva is not None:
        kvm.on_unmap_hva(hva, gfn)
    return flush


def kvm_mmu_notifier_invalidate_range(kvm: Kvm, start: int, end: int) -> None:
    """``kvm_mmu_notifier_invalidate_range_start`` + ``_end`` (v2.6.27): unmap every page hva in
    [start, end), bump ``mmu_notifier_seq``."""
    kvm.mmu_notifier_count += 1
    for hva in range(start, end, 1 << PAGE_SHIFT):
        if kvm_unmap_hva(kvm, hva):
            kvm.stat["remote_tlb_flush"] += 1
    kvm.mmu_notifier_seq += 1
    kvm.mmu_notifier_count -= 1


# --- teardown ----------------------------------------------------------------------------------------------


def free_mmu_pages(kvm: Kvm) -> None:
    """``free_mmu_pages`` (``kvm_mmu_destroy``): zap from the head until the active list is empty."""
    guard = 0
    while kvm.active_mmu_pages and guard < 1 << 24:
        sp = next(reversed(kvm.active_mmu_pages.values()))
        if sp.root_count:
            sp.root_count = 0  # every vcpu unloaded its MMU before; a root left here is a stale count
        kvm_mmu_zap_page(kvm, sp)
        guard += 1


def kvm_arch_destroy_vm(kvm: Kvm) -> None:
    """``kvm_arch_destroy_vm``: unload every vcpu's MMU, then free every shadow page (every leaf reference is
    released); the parked ``update_pte`` references were released at the end of each pte write."""
    for vcpu in kvm.vcpus.values():
        kvm_mmu_unload(vcpu, kvm)
    free_mmu_pages(kvm)
