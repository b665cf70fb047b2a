"""Guest page-table write emulation: ``kvm_mmu_pte_write`` and its helpers (arch/x86/kvm/mmu.c v2.6.26, with the
v2.6.27 ``kvm_mmu_access_page`` of the ``notifier`` variant). docs/kernel.md, kvm_mmu_pte_write.
"""

from __future__ import annotations

from kvmpfn.kvm.mmu import (
    context_role_bits,
    is_largepage_backed,
    kvm_mmu_audit,
    kvm_mmu_free_some_pages,
    kvm_mmu_zap_page,
    mmu_page_remove_parent_pte,
    page_header,
)
from kvmpfn.kvm.paging import update_pte
from kvmpfn.kvm.rmap import rmap_remove
from kvmpfn.kvm.spte import TRAP, is_large_pte, is_shadow_present_pte
from kvmpfn.kvm.vm import Kvm, KvmMmuPage, Sptep, Vcpu
from kvmpfn.x86 import (
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PT32_ROOT_LEVEL,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT64_PERM_MASK,
    PT_ACCESSED_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
)


def mmu_guess_page_from_pte_write(vcpu: Vcpu, kvm: Kvm, gpa: int, new: int, nbytes: int) -> None:
    """``mmu_guess_page_from_pte_write``: assume the write is a pte of the current paging mode; if it is
    present, park R(pfn) of its frame in ``vcpu.update_pte`` (+1; released at the end of the pte write)."""
    vcpu.update_pte_largepage = 0
    if nbytes not in (4, 8):
        return
    gpte = 0
    if vcpu.cpu.paging in ("pae", "64"):
        if nbytes == 4 and gpa % 4 == 0:
            gpte = kvm.host.read_guest(gpa & ~7, 8)
            shift = (gpa % 8) * 8
            gpte = (gpte & ~(0xFFFFFFFF << shift)) | (new & 0xFFFFFFFF) << shift
        elif nbytes == 8 and gpa % 8 == 0:
            gpte = new
    elif nbytes == 4 and gpa % 4 == 0:
        gpte = new & 0xFFFFFFFF
    if not gpte & PT_PRESENT_MASK:
        return
    gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    if gpte & PT_PAGE_SIZE_MASK and is_largepage_backed(vcpu, kvm, gfn):
        gfn &= ~(KVM_PAGES_PER_HPAGE - 1)
        vcpu.update_pte_largepage = 1
    vcpu.update_pte_mmu_seq = kvm.mmu_notifier_seq
    api = kvm.api
    pfn = api.gfn_to_pfn(gfn, "mmu_guess_page_from_pte_write")
    if api.is_error_pfn(pfn):
        api.kvm_release_pfn_clean(pfn, "mmu_guess_page_from_pte_write")
        return
    vcpu.update_pte_gfn = gfn
    vcpu.update_pte_pfn = pfn


def mmu_pte_write_zap_pte(vcpu: Vcpu, kvm: Kvm, sp: KvmMmuPage, sptep: Sptep) -> None:
    """``mmu_pte_write_zap_pte``: a leaf or large spte is ``rmap_remove``d (−1), a pointer unlinks its child;
    the entry becomes trap."""
    index = sptep[1]
    pte = sp.spt[index]
    if is_shadow_present_pte(pte):
        if sp.level == 1 or is_large_pte(pte):
            rmap_remove(kvm, sptep)
        else:
            mmu_page_remove_parent_pte(page_header(kvm, pte), sptep)
    sp.spt[index] = TRAP
    if is_shadow_present_pte(pte) and is_large_pte(pte):
        kvm.stat["lpages"] -= 1


def mmu_pte_write_new_pte(vcpu: Vcpu, kvm: Kvm, sp: KvmMmuPage, sptep: Sptep, new: int) -> None:
    """``mmu_pte_write_new_pte``: directory entries are only zapped, except a large guest pde backed large
    (v2.6.26: never for 32-bit guests, whose 4 MiB pde maps two shadow pdes; ``--bug pse32-double-update``
    drops that rule); level-1 entries go through ``FNAME(update_pte)``.

    Differs from the kernel: a level-3 entry is never updated large (the era would have written a 1 GiB spte
    from a 2 MiB guess).
    """
    if sp.level != 1:
        pse32 = sp.glevels == PT32_ROOT_LEVEL and "pse32-double-update" not in kvm.bugs
        if not vcpu.update_pte_largepage or pse32 or sp.level != 2:
            kvm.stat["mmu_pde_zapped"] += 1
            return
    kvm.stat["mmu_pte_updated"] += 1
    update_pte(vcpu, kvm, sp, sptep, new)


def role_matches_context(vcpu: Vcpu, kvm: Kvm, sp: KvmMmuPage) -> bool:
    """Whether ``sp`` reads a guest pte the way the vcpu's current context does: same guest paging format
    (``glevels``) and the same CR0.WP, EFER.NX, CR4.PSE and SMEP/SMAP role bits (``context_role_bits``).

    Models the role test later kernels make in ``kvm_mmu_pte_write`` (from about v2.6.36): the new pte is
    instantiated (``mmu_pte_write_new_pte``) only in pages whose role matches the vcpu's ``base_role`` under a
    mask (cr0_wp, cr4_pae, nxe; later smep_andnot_wp, smap_andnot_wp); other pages of the gfn only have the
    spte zapped. The era had none of these role bits and updated every page. kvmpfn keys pages on them
    (``kvm_mmu_get_page``), so it needs the test too: ``FNAME(update_pte)`` judges the gpte with the writing
    vcpu's EFER.NX, so a pte with bit 63 set, written while EFER.NX=1, became an spte in the EFER.NX=0 page of
    that table, for which that bit is reserved (traces/regressions/smep-wp0-pte-write-nx-role.jsonl, two
    vcpus; pte-write-role-mismatch.jsonl, one vcpu switching EFER.NX). Differs from the kernel: CR4.PSE is
    compared too, and PAE and 64-bit pages (``glevels`` 3 and 4, both cr4_pae) do not match each other;
    either only costs a prefetch.
    """
    return sp.glevels == vcpu.root_level and (sp.cr0_wp, sp.ext) == context_role_bits(vcpu, kvm)


def need_remote_flush(old: int, new: int) -> bool:
    """``need_remote_flush``: an spte lost presence, changed frame, or lost a permission."""
    if not is_shadow_present_pte(old):
        return False
    if not is_shadow_present_pte(new):
        return True
    if (old ^ new) & PT64_BASE_ADDR_MASK:
        return True
    old ^= PT64_NX_MASK
    new ^= PT64_NX_MASK
    return (old & ~new & PT64_PERM_MASK) != 0


def kvm_mmu_access_page(vcpu: Vcpu, kvm: Kvm, gfn: int) -> None:
    """``kvm_mmu_access_page`` (v2.6.27): an emulated write to the gfn of the last speculative spte counts as
    an access of it (its A bit is set), so the flood detector spares a page really in use."""
    sptep = vcpu.last_pte_updated
    if sptep is not None and vcpu.last_pte_gfn == gfn:
        sp, index = sptep
        spte = sp.spt[index]
        if is_shadow_present_pte(spte) and not spte & PT_ACCESSED_MASK:
            sp.spt[index] = spte | PT_ACCESSED_MASK


def last_updated_pte_accessed(vcpu: Vcpu) -> bool:
    """``last_updated_pte_accessed``."""
    sptep = vcpu.last_pte_updated
    return sptep is not None and bool(sptep[0].spt[sptep[1]] & PT_ACCESSED_MASK)


def kvm_mmu_pte_write(vcpu: Vcpu, kvm: Kvm, gpa: int, new: int, nbytes: int) -> None:
    """``kvm_mmu_pte_write``: guest memory already holds the new bytes. Guess and park the new frame
    (``mmu_guess_page_from_pte_write``), run the fork/flood detector, then for every shadow page of the gfn:
    zap it if the write is misaligned or flooded, else zap the affected spte(s) and, in a page of the vcpu's
    own context (:func:`role_matches_context`), let ``update_pte`` instantiate the new translation. The parked
    reference is released at the end (``--bug prefetch-no-release`` keeps it).
    """
    gfn = gpa >> PAGE_SHIFT
    offset = gpa & 0xFFF
    mmu_guess_page_from_pte_write(vcpu, kvm, gpa, new, nbytes)
    if kvm.notifiers:
        kvm_mmu_access_page(vcpu, kvm, gfn)
    kvm_mmu_free_some_pages(vcpu, kvm)
    kvm.stat["mmu_pte_write"] += 1
    kvm_mmu_audit(vcpu, kvm, "pre pte write")
    flooded = False
    if gfn == vcpu.last_pt_write_gfn and not last_updated_pte_accessed(vcpu):
        vcpu.last_pt_write_count += 1
        flooded = vcpu.last_pt_write_count >= 3
    else:
        vcpu.last_pt_write_gfn = gfn
        vcpu.last_pt_write_count = 1
        vcpu.last_pte_updated = None
    for sp in list(kvm.mmu_page_hash.get(gfn, ())):
        if sp.gfn != gfn or sp.metaphysical or sp.id not in kvm.active_mmu_pages:
            continue
        size = 4 if sp.glevels == PT32_ROOT_LEVEL else 8
        misaligned = ((offset ^ (offset + nbytes - 1)) & ~(size - 1)) or nbytes < 4
        if misaligned or flooded:
            kvm_mmu_zap_page(kvm, sp)
            kvm.stat["mmu_flooded"] += 1
            continue
        page_offset = offset
        npte = 1
        if sp.glevels == PT32_ROOT_LEVEL:
            page_offset <<= 1
            if sp.level == PT32_ROOT_LEVEL:
                page_offset &= ~7
                page_offset <<= 1
                npte = 2
            if page_offset >> PAGE_SHIFT != sp.quadrant:
                continue
            page_offset &= 0xFFF
        index = page_offset // 8
        gentry: int | None = new
        if not role_matches_context(vcpu, kvm, sp):
            gentry = None
        elif gpa & (size - 1) or nbytes < size:
            gentry = kvm.host.read_guest(gpa & ~(size - 1), size)
        for _ in range(npte):
            mmu_pte_write_zap_pte(vcpu, kvm, sp, (sp, index))
            if gentry is not None:
                mmu_pte_write_new_pte(vcpu, kvm, sp, (sp, index), gentry)
            index += 1
    kvm_mmu_audit(vcpu, kvm, "post pte write")
    api = kvm.api
    if not api.is_error_pfn(vcpu.update_pte_pfn) and "prefetch-no-release" not in kvm.bugs:
        api.kvm_release_pfn_clean(vcpu.update_pte_pfn, "kvm_mmu_pte_write")
        vcpu.update_pte_pfn = api.bad_pfn
    elif "prefetch-no-release" in kvm.bugs:
        vcpu.update_pte_pfn = api.bad_pfn
