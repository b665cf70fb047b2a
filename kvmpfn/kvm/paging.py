"""Shadow paging: arch/x86/kvm/paging_tmpl.h of v2.6.26 (``FNAME(page_fault)``, ``FNAME(fetch)``,
``FNAME(prefetch_page)``, ``FNAME(update_pte)``), parameterised by the shadow page's guest format instead of
the ``PTTYPE`` template (``sp.glevels == 2``: 32-bit ptes). The guest walk itself is walker.walk_addr.
See docs/kernel.md, FNAME(page_fault) and FNAME(fetch); and docs/kernel.md, kvm_mmu_pte_write.
"""

from __future__ import annotations

from kvmpfn.kvm.mmu import (
    FAULT_RETRY,
    fault_gfn_to_pfn,
    is_largepage_backed,
    kvm_mmu_audit,
    kvm_mmu_free_some_pages,
    kvm_mmu_get_page,
    kvm_mmu_put_page,
    mark_page_dirty,
    mmu_notifier_retry,
    mmu_set_spte,
    mmu_topup_memory_caches,
    page_header,
    pt64_index,
    root_table,
)
from kvmpfn.kvm.rmap import rmap_remove
from kvmpfn.kvm.spte import NOTRAP, TRAP, is_large_pte, is_shadow_present_pte
from kvmpfn.kvm.vm import Kvm, KvmMmuPage, Sptep, Vcpu
from kvmpfn.kvm.walker import GuestCpu, GuestWalker, _rsvd_masks, walk_addr
from kvmpfn.x86 import (
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT32_ROOT_LEVEL,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)

PT32_BASE_ADDR_MASK = 0xFFFFF000


def gpte_to_gfn(gpte: int, glevels: int) -> int:
    """``FNAME(gpte_to_gfn)``: the 4K frame bits of a guest pte (PT32 or PT64 base mask)."""
    mask = PT32_BASE_ADDR_MASK if glevels == PT32_ROOT_LEVEL else PT64_BASE_ADDR_MASK
    return (gpte & mask) >> PAGE_SHIFT


def gpte_access(cpu: GuestCpu, gpte: int, glevels: int) -> int:
    """``FNAME(gpte_access)``: W and U from the gpte, EXEC unless NX (PTTYPE 64 with EFER.NX)."""
    access = (gpte & (PT_WRITABLE_MASK | PT_USER_MASK)) | ACC_EXEC_MASK
    if glevels != PT32_ROOT_LEVEL and cpu.efer_nx and gpte & PT64_NX_MASK:
        access &= ~ACC_EXEC_MASK
    return access


def pte_size(glevels: int) -> int:
    return 4 if glevels == PT32_ROOT_LEVEL else 8


GLEVELS_PAGING = {2: "32", 3: "pae", 4: "64"}


def is_rsvd_bits_set(cpu: GuestCpu, gpte: int, level: int, glevels: int) -> bool:
    """``is_rsvd_bits_set`` (a later kernel's): reserved bits of a guest entry at ``level`` in the paging mode
    of ``glevels``, with the vcpu's EFER.NX, CR4.PSE, MAXPHYADDR and 1 GiB support."""
    nonleaf, large = _rsvd_masks(GLEVELS_PAGING[glevels], cpu.maxphyaddr, cpu.efer_nx, cpu.cr4_pse, cpu.gbpages)[
        level - 1
    ]
    if large is not None and gpte & PT_PAGE_SIZE_MASK:
        return bool(gpte & large)
    return bool(gpte & nonleaf)


class GuestMemory:
    """Guest memory as the shadow walker sees it: reads with ``kvm_read_guest``; A/D updates with
    ``FNAME(cmpxchg_gpte)``, which maps the guest page table with ``gfn_to_page`` (+1) and releases it dirty
    (−1), so the ledger sees that pair."""

    __slots__ = ("kvm",)

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def read_guest(self, gpa: int, size: int) -> int:
        return self.kvm.host.read_guest(gpa, size)

    def cmpxchg_guest(self, gpa: int, size: int, old: int, new: int) -> bool:
        api = self.kvm.api
        pfn = api.gfn_to_page(gpa >> PAGE_SHIFT, "cmpxchg_gpte")
        if api.is_error_pfn(pfn):
            # bad_page holds zeros: the compare fails and the walk restarts (docs/kernel.md, FNAME(walk_addr)); the
            # kernel releases it like any page it mapped, with kvm_release_page_dirty (paging_tmpl.h, v2.6.26)
            api.kvm_release_pfn_dirty(pfn, "cmpxchg_gpte")
            return False
        ok = self.kvm.host.cmpxchg_guest(gpa, size, old, new)
        api.kvm_release_pfn_dirty(pfn, "cmpxchg_gpte")
        return ok


def paging_walk(
    vcpu: Vcpu, kvm: Kvm, addr: int, write: bool, user: bool, fetch: bool, ac: bool = False
) -> tuple[bool, GuestWalker]:
    """``FNAME(walk_addr)`` as KVM runs it: A/D updates through ``cmpxchg_gpte``, ``mark_page_dirty`` on the
    table, and the ``kvm_mmu_pte_write`` resync after setting D. ``--bug walk-read-unchecked``: v2.6.26's
    ignored ``kvm_read_guest`` return (:func:`walker.walk_addr`)."""
    from kvmpfn.kvm.pte_write import kvm_mmu_pte_write

    return walk_addr(
        vcpu.cpu,
        GuestMemory(kvm),
        addr,
        write,
        user,
        fetch,
        ac=ac,
        set_ad=True,
        mark_page_dirty=lambda gfn: mark_page_dirty(kvm, gfn),
        pte_write=lambda gpa, val, size: kvm_mmu_pte_write(vcpu, kvm, gpa, val, size),
        rsvd_check="no-rsvd-check" not in kvm.bugs,
        in_memslot=kvm.host.gfn_to_memslot if "walk-read-unchecked" in kvm.bugs else None,
    )


def paging_page_fault(vcpu: Vcpu, kvm: Kvm, addr: int, error_code: int) -> int:
    """``FNAME(page_fault)``: walk the guest tables (a failed walk injects #PF with the walker's error code),
    choose a large spte when the guest pde is large and the host backs it, R(pfn) from ``gfn_to_pfn`` (error
    pfn: release, return 1 = MMIO), then ``FNAME(fetch)``; returns ``*ptwrite`` (1 = emulate the write)."""
    write_fault = bool(error_code & PFERR_WRITE_MASK)
    user_fault = bool(error_code & PFERR_USER_MASK)
    fetch_fault = bool(error_code & PFERR_FETCH_MASK)
    kvm_mmu_audit(vcpu, kvm, "pre page fault")
    r = mmu_topup_memory_caches(vcpu, kvm)
    if r:
        return r
    ok, walker = paging_walk(vcpu, kvm, addr, write_fault, user_fault, fetch_fault, vcpu.fault_ac)
    vcpu.fault_walker = walker
    if not ok:
        vcpu.fault_err = walker.error_code  # inject_page_fault
        vcpu.last_pt_write_count = 0
        return 0
    gfn = walker.gfn
    vcpu.fault_gpa = gfn << PAGE_SHIFT | (addr & 0xFFF)
    largepage = 0
    if walker.level == 2:
        large_gfn = gfn & ~(KVM_PAGES_PER_HPAGE - 1)
        if is_largepage_backed(vcpu, kvm, large_gfn):
            gfn = large_gfn
            largepage = 1
    pfn = fault_gfn_to_pfn(vcpu, kvm, gfn, "page_fault")
    if pfn is None:
        return 1
    if pfn == FAULT_RETRY:
        return 0
    if "cr0wp-user-write" not in kvm.bugs:
        cr0_wp0_supervisor_write(vcpu, walker, user_fault, write_fault)
    kvm_mmu_free_some_pages(vcpu, kvm)
    write_pt = fetch(vcpu, kvm, addr, walker, user_fault, write_fault, largepage, gfn, pfn)
    if not write_pt:
        vcpu.last_pt_write_count = 0
    kvm_mmu_audit(vcpu, kvm, "post page fault (fixed)")
    return write_pt


def cr0_wp0_supervisor_write(vcpu: Vcpu, walker: GuestWalker, user_fault: bool, write_fault: bool) -> None:
    """The CR0.WP=0 branch of later kernels' ``FNAME(page_fault)`` (commit c22885050e65, "KVM: MMU: fix
    Dirty bit missed if CR0.WP = 0", v3.9), run after the pfn is known and before ``FNAME(fetch)``: a
    supervisor write the guest translation does not allow (legal with CR0.WP=0) turns the walker's
    ``pte_access`` into W without U (and without exec for a user page under CR4.SMEP, so a supervisor fetch
    still exits and meets the guest's SMEP). The rights down to the guest leaf (``access_at``), which become
    the ``role.access`` of a metaphysical page splitting a guest large page, change the same way.

    The era made the spte writable inside ``mmu_set_spte`` only, after ``FNAME(fetch)`` had chosen the
    metaphysical page by the unconverted rights: a writable spte then sat in a page whose role lacks W, and
    a later read fault through a writable-but-clean large pde (W dropped from the role) relinked it, so the
    next write hit without setting the guest's D bit (traces/regressions/cr0wp0-large-page-clean-pde.jsonl).
    ``--bug cr0wp-user-write`` skips this and keeps the era's ``mmu_set_spte`` path. Differs from the kernel:
    a user page under CR4.SMAP is left alone (``mmu_set_spte`` keeps it read-only and has the write
    emulated), where the kernel converts it and relies on role.smap_andnot_wp.
    """
    cpu = vcpu.cpu
    access = walker.pte_access
    if not write_fault or user_fault or cpu.cr0_wp or access & ACC_WRITE_MASK:
        return
    user_page = bool(access & ACC_USER_MASK)
    if user_page and cpu.cr4_smap:
        return
    drop = ACC_USER_MASK | (ACC_EXEC_MASK if user_page and cpu.cr4_smep else 0)
    walker.pte_access = (access | ACC_WRITE_MASK) & ~drop
    leaf = walker.level - 1
    walker.access_at[leaf] = (walker.access_at[leaf] | ACC_WRITE_MASK) & ~drop


def fetch(
    vcpu: Vcpu,
    kvm: Kvm,
    addr: int,
    walker: GuestWalker,
    user_fault: bool,
    write_fault: bool,
    largepage: int,
    gfn: int,
    pfn: int,
) -> int:
    """``FNAME(fetch)``: walk the shadow from the root by ``addr``, creating the shadow page of each guest
    table on the way (``kvm_mmu_get_page``: write-protects it), re-reading the guest entry after protecting
    its table and bailing out if it changed (R released), then ``mmu_set_spte`` at the leaf. Returns
    ``*ptwrite``.

    Guest large pages are split into metaphysical level-1 pages (W dropped from the role while the guest pde
    is not dirty); guest 1 GiB pages likewise one level up (docs/trace-format.md, The simulated CPU). Differs from the
    kernel: the child's ``role.access`` is the AND of the guest entries above it only (the 2021 fix;
    ``--bug sp-access-inherit`` uses the whole walk's); a large spte in the way is ``rmap_remove``d and then
    set to trap (v2.6.30 order; ``--bug large-spte-remove-order`` stores trap first); the bail-out
    unlinks the new page from its parent (v2.6.28 fix; ``--bug fetch-bailout-parent``). v2.6.26's
    ``FNAME(fetch)`` only called ``rmap_remove`` on a large spte in the way, with no trap store and no
    ``lpages`` decrement (``--bug fetch-large-rmap-remove``, which turns on ``role-ignores-pse-nx``: only a
    page shared across a CR4.PSE change holds a large spte where the guest now has a table): when the child
    then bails out, the large spte stays present without its reference and rmap entry, and the next fault
    through it releases the frame again (``rmap_remove``'s BUG). The leaf gets
    the walker's ``pte_access`` as it is (later kernels': the era's ``& access`` changed nothing, and would
    take back the W a CR0.WP=0 supervisor write was given, ``cr0_wp0_supervisor_write``).
    """
    glevels = vcpu.root_level
    leaf_level = walker.level
    access = walker.pt_access
    sp, level = root_table(vcpu, kvm, addr)
    if sp is None:
        kvm.api.kvm_release_pfn_clean(pfn, "fetch")
        return 0
    while True:
        index = pt64_index(addr, level)
        if level == 1 or (largepage and level == 2):
            break
        ent = sp.spt[index]
        if is_shadow_present_pte(ent) and not is_large_pte(ent):
            sp = page_header(kvm, ent)
            level -= 1
            continue
        if is_shadow_present_pte(ent) and is_large_pte(ent):
            if "fetch-large-rmap-remove" in kvm.bugs:
                rmap_remove(kvm, (sp, index))  # v2.6.26: the large spte stays present, lpages unchanged
            elif "large-spte-remove-order" in kvm.bugs:
                sp.spt[index] = TRAP
                rmap_remove(kvm, (sp, index))  # returns at once: the spte is no longer present
                kvm.stat["lpages"] -= 1
            else:
                rmap_remove(kvm, (sp, index))
                sp.spt[index] = TRAP
                kvm.stat["lpages"] -= 1
        if "sp-access-inherit" not in kvm.bugs:
            # the guest entries above the child: down to this level, or to the guest leaf when the child
            # splits a guest large page (its role then records the large page's own rights too)
            access = walker.access_at[max(level, leaf_level) - 1]
        if level - 1 < leaf_level:
            metaphysical = 1
            if not walker.ptes[leaf_level - 1] & PT_DIRTY_MASK:
                access &= ~ACC_WRITE_MASK
            base = gpte_to_gfn(walker.ptes[leaf_level - 1], glevels)
            if leaf_level == 3:
                base &= ~((1 << 18) - 1)
                table_gfn = base if level - 1 == 2 else base + ((addr >> 21) & 511) * KVM_PAGES_PER_HPAGE
            else:
                table_gfn = base
        else:
            metaphysical = 0
            table_gfn = walker.table_gfn[level - 2]
        child = kvm_mmu_get_page(vcpu, kvm, table_gfn, addr, level - 1, metaphysical, access, (sp, index))
        if not metaphysical:
            gpa = walker.pte_gpa[level - 2]
            curr = kvm.host.read_guest(gpa, pte_size(glevels))
            if kvm.consume("pte_race"):
                curr ^= PT_ACCESSED_MASK
            if curr != walker.ptes[level - 2]:
                if "fetch-bailout-parent" not in kvm.bugs:
                    kvm_mmu_put_page(child, (sp, index))
                kvm.api.kvm_release_pfn_clean(pfn, "fetch")
                return 0
        sp.spt[index] = child.hpa << PAGE_SHIFT | PT_PRESENT_MASK | PT_ACCESSED_MASK | PT_WRITABLE_MASK | PT_USER_MASK
        sp = child
        level -= 1
    dirty = walker.ptes[leaf_level - 1] & PT_DIRTY_MASK
    pt_write = mmu_set_spte(
        vcpu,
        kvm,
        (sp, index),
        access,
        walker.pte_access,
        user_fault,
        write_fault,
        dirty,
        largepage,
        gfn,
        pfn,
        False,
    )
    return pt_write


def prefetch_page(vcpu: Vcpu, kvm: Kvm, sp: KvmMmuPage) -> None:
    """``FNAME(prefetch_page)``: metaphysical pages, and 32-bit-guest pages above level 1, stay all trap;
    otherwise an entry is notrap where the guest pte is not present (the guest takes that #PF without an
    exit) and trap where it is."""
    if sp.metaphysical or (sp.glevels == PT32_ROOT_LEVEL and sp.level > 1):
        return
    size = pte_size(sp.glevels)
    base = sp.gfn << PAGE_SHIFT
    if sp.glevels == PT32_ROOT_LEVEL:
        base += (sp.quadrant << 9) * size
    read = kvm.host.read_guest
    spt = sp.spt
    for i in range(512):
        spt[i] = TRAP if read(base + i * size, size) & PT_PRESENT_MASK else NOTRAP


def update_pte(vcpu: Vcpu, kvm: Kvm, sp: KvmMmuPage, sptep: Sptep, gpte: int) -> None:
    """``FNAME(update_pte)``: after a guest pte write, install the new translation speculatively if it is
    present and accessed and matches the gfn ``mmu_guess_page_from_pte_write`` resolved; takes its own
    reference (``kvm_get_pfn``, +1) for the new spte. A non-present gpte makes the spte notrap.

    Differs from the kernel: a gpte with reserved bits set is left trap (later kernels'
    ``prefetch_invalid_gpte``), so the guest's next access faults with RSVD; a level-1 spte is never made large
    from a PAT bit the guess took for PS.
    """
    if not (gpte & PT_PRESENT_MASK and gpte & PT_ACCESSED_MASK):
        if not gpte & PT_PRESENT_MASK:
            sptep[0].spt[sptep[1]] = NOTRAP
        return
    if "no-rsvd-check" not in kvm.bugs and is_rsvd_bits_set(vcpu.cpu, gpte, sp.level, sp.glevels):
        return
    pte_access = sp.access & gpte_access(vcpu.cpu, gpte, sp.glevels)
    gfn = gpte_to_gfn(gpte, sp.glevels)
    if gfn != vcpu.update_pte_gfn:
        return
    pfn = vcpu.update_pte_pfn
    api = kvm.api
    if api.is_error_pfn(pfn):
        return
    if kvm.notifiers and mmu_notifier_retry(kvm, vcpu.update_pte_mmu_seq):
        return
    api.kvm_get_pfn(pfn, "update_pte")
    # mmu_guess_page_from_pte_write reads bit 7 as PS whatever the level; in a level-1 pte it is PAT, and the
    # era then wrote a "large" spte into a page table (docs/kernel.md, kvm_mmu_pte_write's hazard): only level 2 goes
    # large here
    largepage = vcpu.update_pte_largepage if sp.level == 2 else 0
    mmu_set_spte(vcpu, kvm, sptep, sp.access, pte_access, 0, 0, gpte & PT_DIRTY_MASK, largepage, gfn, pfn, True)
