"""The vcpu side of the MMU: context setup (``init_kvm_mmu``, ``kvm_mmu_reset_context``, ``kvm_set_cr3``),
``kvm_mmu_page_fault``, and the simulated CPU that turns a guest ``access`` into hits, exits and guest
faults (docs/trace-format.md, The simulated CPU). docs/kernel.md, Fault paths; docs/kernel.md, Roots and CR3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import cast

from kvmpfn.errors import KernelBug
from kvmpfn.kvm.mmu import (
    ENOMEM,
    TDP_ROOT_LEVEL,
    kvm_mmu_load,
    kvm_mmu_lookup_page,
    mark_page_dirty,
    mmu_free_roots,
    mmu_topup_memory_caches,
    nonpaging_page_fault,
    nonpaging_prefetch_page,
    tdp_page_fault,
)
from kvmpfn.kvm.paging import paging_page_fault, prefetch_page
from kvmpfn.kvm.pte_write import kvm_mmu_pte_write
from kvmpfn.kvm.spte import NOTRAP, TRAP, spte_to_pfn
from kvmpfn.kvm.vm import Kvm, KvmMmuPage, Sptep, Vcpu, WalkMemo
from kvmpfn.kvm.walker import GuestCpu, load_pdptrs, permission_fault, walk_addr
from kvmpfn.trace.events import Guest
from kvmpfn.x86 import (
    ACC_ALL,
    INVALID_PAGE,
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT32_ROOT_LEVEL,
    PT32E_ROOT_LEVEL,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT64_ROOT_LEVEL,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)

#: memoised TDP guest walks per vcpu (a TLB's capacity, in spirit)
WALK_MEMO_LIMIT = 1 << 14

ROOT_LEVEL = {"none": 0, "32": PT32_ROOT_LEVEL, "pae": PT32E_ROOT_LEVEL, "64": PT64_ROOT_LEVEL}


def init_kvm_mmu(vcpu: Vcpu, kvm: Kvm) -> None:
    """``init_kvm_mmu``: ``update_pte.pfn = bad_pfn`` (the seed), then ``init_kvm_tdp_mmu`` or the softmmu
    context of the guest's mode (``nonpaging``, ``paging32``, ``paging32E``, ``paging64``)."""
    vcpu.update_pte_pfn = kvm.api.bad_pfn
    paging = vcpu.cpu.paging
    vcpu.root_hpa = INVALID_PAGE
    vcpu.root_level = ROOT_LEVEL[paging]
    if kvm.tdp_enabled:
        vcpu.page_fault = tdp_page_fault
        vcpu.prefetch_page = nonpaging_prefetch_page
        vcpu.shadow_root_level = TDP_ROOT_LEVEL
        vcpu.new_cr3 = None
    elif paging == "none":
        vcpu.page_fault = nonpaging_page_fault
        vcpu.prefetch_page = nonpaging_prefetch_page
        vcpu.shadow_root_level = PT32E_ROOT_LEVEL
        vcpu.new_cr3 = None
    else:
        vcpu.page_fault = paging_page_fault
        vcpu.prefetch_page = prefetch_page
        vcpu.shadow_root_level = PT64_ROOT_LEVEL if paging == "64" else PT32E_ROOT_LEVEL
        vcpu.new_cr3 = mmu_free_roots  # paging_new_cr3


def kvm_mmu_reset_context(vcpu: Vcpu, kvm: Kvm) -> None:
    """``kvm_mmu_reset_context``: free the roots (shadow pages stay cached), re-init for the new mode."""
    mmu_free_roots(vcpu, kvm)
    init_kvm_mmu(vcpu, kvm)


def pdptrs_changed(vcpu: Vcpu, kvm: Kvm) -> bool:
    """``pdptrs_changed`` (x86.c, v2.6.26): in PAE paging, whether the four PDPTEs in memory at the current
    CR3 differ from the loaded ones; False in any other mode."""
    cpu = vcpu.cpu
    if cpu.paging != "pae":
        return False
    base = cpu.cr3 & ~31
    return [kvm.host.read_guest(base + 8 * i, 8) for i in range(4)] != list(cpu.pdptrs or ())


def kvm_set_cr3(vcpu: Vcpu, kvm: Kvm, cr3: int) -> bool:
    """``kvm_set_cr3`` (arch/x86/kvm/x86.c, v2.6.26): the same CR3 with unchanged PDPTEs is a TLB flush only
    (the roots are kept); in PAE paging the PDPTEs are loaded first; then a CR3 whose frame is in no memslot
    injects #GP (``gfn_to_memslot(cr3 >> PAGE_SHIFT)``, checked even with paging off); otherwise CR3 is set
    and ``mmu.new_cr3`` runs (``paging_new_cr3`` frees the roots; a no-op for real mode and TDP). False =
    #GP, CR3 unchanged.

    Under TDP the guest's CR3 load is not intercepted (NPT; EPT with paging on, vmx.c
    ``CPU_BASED_CR3_LOAD_EXITING``), so the memslot check does not apply; EPT with paging off intercepts it.
    Differs from the kernel: the CR3 reserved-bit #GPs (``CR3_L_MODE_RESERVED_BITS``, ``CR3_PAE_RESERVED_BITS``)
    are not modelled; a PDPTE load that #GPs leaves the PDPTEs as they were (the kernel's ``load_pdptrs``
    returns before storing them, too).
    """
    cpu = vcpu.cpu
    if cr3 == cpu.cr3 and not pdptrs_changed(vcpu, kvm):
        return True  # kvm_mmu_flush_tlb
    pdptrs = cpu.pdptrs
    if cpu.paging == "pae":
        pdptrs = load_pdptrs(cr3, kvm.host, cpu.maxphyaddr)
        if pdptrs is None:
            return False
    intercepted = not kvm.tdp_enabled or (kvm.tdp_flavour == "ept" and cpu.paging == "none")
    if intercepted and kvm.host.gfn_to_memslot(cr3 >> PAGE_SHIFT) is None:
        return False
    cpu.pdptrs = pdptrs
    cpu.cr3 = cr3
    if vcpu.new_cr3 is not None:
        vcpu.new_cr3(vcpu, kvm)
    return True


def kvm_mmu_reload(vcpu: Vcpu, kvm: Kvm) -> int:
    """Guest entry (``vcpu_enter_guest``): honour ``KVM_REQ_MMU_RELOAD`` (``kvm_mmu_unload``), then
    ``kvm_mmu_load`` when the root is invalid."""
    if vcpu.mmu_reload_requested:
        vcpu.mmu_reload_requested = False
        mmu_free_roots(vcpu, kvm)
    if vcpu.root_hpa == INVALID_PAGE:
        return kvm_mmu_load(vcpu, kvm)
    return 0


def new_vcpu(kvm: Kvm, vcpu_id: int, guest: Guest) -> Vcpu:
    """``kvm_arch_vcpu_create`` + ``kvm_mmu_setup``: the guest state from the header, a fresh context.

    The first vcpu sets ``n_free_mmu_pages = n_alloc`` (``alloc_mmu_pages``); later ones leave it alone,
    as QEMU creates every vcpu before the guest runs.
    """
    cpu = GuestCpu(
        paging=guest.paging,
        cr3=guest.cr3,
        cr0_wp=bool(guest.cr0_wp),
        efer_nx=bool(guest.efer_nx),
        cr4_pse=bool(guest.cr4_pse),
        cr4_smep=bool(guest.cr4_smep),
        cr4_smap=bool(guest.cr4_smap),
        maxphyaddr=guest.maxphyaddr,
        gbpages=bool(guest.gbpages),
    )
    if cpu.paging == "pae":
        cpu.pdptrs = load_pdptrs(cpu.cr3, kvm.host, cpu.maxphyaddr) or [0, 0, 0, 0]
    vcpu = Vcpu(vcpu_id, cpu)
    if not kvm.vcpus:
        kvm.n_free_mmu_pages = kvm.n_requested_mmu_pages or kvm.n_alloc_mmu_pages
    kvm.vcpus[vcpu_id] = vcpu
    init_kvm_mmu(vcpu, kvm)
    return vcpu


# --- faults ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class FaultOutcome:
    """What one fault decided, for the outcome record."""

    result: str  # mapped | mmio | emulated | guest_fault | error
    gpa: int | None = None
    err: int | None = None
    set_accessed: list[int] | None = None
    set_dirty: int | None = None
    livelock: bool = False  # the guest walk's cmpxchg_gpte never succeeded (the kernel would spin forever)


def kvm_mmu_page_fault(vcpu: Vcpu, kvm: Kvm, cr2: int, error_code: int, pte_len: int) -> FaultOutcome:
    """``kvm_mmu_page_fault``: run ``mmu.page_fault``; 0 = fixed (or a guest #PF was injected); 1 = emulate:
    MMIO, or a write to a shadowed guest page table, which the emulator performs as a write of the value
    already in memory at the aligned pte address through ``kvm_mmu_pte_write``; <0 = error. Before emulating
    the MMU caches are topped up again (mmu.c, v2.6.26), so an injected ``enomem`` can fail there too."""
    vcpu.begin_fault(cr2 if vcpu.page_fault is not paging_page_fault else None)
    r = vcpu.page_fault(vcpu, kvm, cr2, error_code)
    if r == 1 and mmu_topup_memory_caches(vcpu, kvm):
        r = ENOMEM  # the top-up before emulate_instruction failed
    walker = vcpu.fault_walker
    out = FaultOutcome("mapped", vcpu.fault_gpa)
    if walker is not None:
        out.set_accessed = walker.set_accessed
        out.set_dirty = walker.set_dirty
        out.livelock = walker.ad_lost
    if r < 0:
        out.result = "error"
    elif vcpu.fault_err is not None:
        out.result = "guest_fault"
        out.err = vcpu.fault_err
    elif r == 1 and vcpu.fault_mmio:
        out.result = "mmio"
    elif r == 1:
        out.result = "emulated"
        gpa = cast(int, out.gpa) & ~(pte_len - 1)  # a walk that succeeded set fault_gpa
        kvm_mmu_pte_write(vcpu, kvm, gpa, kvm.host.read_guest(gpa, pte_len), pte_len)
    return out


# --- the simulated CPU -------------------------------------------------------------------------------------


def guest_error_code(cpu: GuestCpu, present: bool, write: bool, user: bool, fetch: bool) -> int:
    """The #PF error code the architecture gives in the guest's own mode (FETCH only with NX or SMEP)."""
    err = PFERR_PRESENT_MASK if present else 0
    if write:
        err |= PFERR_WRITE_MASK
    if user:
        err |= PFERR_USER_MASK
    if fetch and ((cpu.efer_nx and cpu.paging in ("pae", "64")) or cpu.cr4_smep):
        err |= PFERR_FETCH_MASK
    return err


def shadow_walk(vcpu: Vcpu, kvm: Kvm, addr: int) -> tuple[list[Sptep], int]:
    """The hardware walk of the shadow (or TDP) tables from the vcpu's root: the present entries used, in
    order, and the value that ended the walk (a leaf, trap, or notrap; NOTRAP for an absent PAE root).
    The hot path of every ``access``: kept flat."""
    headers = kvm.page_header
    if vcpu.shadow_root_level == PT32E_ROOT_LEVEL:
        root = vcpu.pae_root[(addr >> 30) & 3] if addr < 1 << 32 else 0
        if root == INVALID_PAGE or not root & PT_PRESENT_MASK:
            return [], NOTRAP
        sp = headers[(root & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT]
        shift = 21
    else:
        sp = headers[(vcpu.root_hpa & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT]
        shift = 3 + 9 * vcpu.shadow_root_level
    path: list[Sptep] = []
    while True:
        index = (addr >> shift) & 511
        ent = sp.spt[index]
        if ent == TRAP or ent == NOTRAP:
            return path, ent
        path.append((sp, index))
        if shift == PAGE_SHIFT or ent & PT_PAGE_SIZE_MASK:
            return path, ent
        table = headers.get((ent & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT)
        if table is None:
            raise KernelBug(f"shadow walk: entry {ent:#x} is not a table", ent)
        sp = table
        shift -= 9


def rights_allow(cpu: GuestCpu, both: int, nx: int, write: bool, user: bool, fetch: bool, ac: bool) -> bool:
    """The host CPU's permission check (CR0.WP=1, EFER.NX=1, the guest's SMEP/SMAP) given the W and U bits
    that every spte used has (``both``) and the OR of them all (``nx``: NX in any entry)."""
    if write and not both & PT_WRITABLE_MASK:
        return False
    if user:
        return bool(both & PT_USER_MASK) and not (fetch and nx & PT64_NX_MASK)
    if fetch and nx & PT64_NX_MASK:
        return False
    if both & PT_USER_MASK and (cpu.cr4_smep if fetch else cpu.cr4_smap and not ac):
        return False
    return True


def leaf_allows(cpu: GuestCpu, path: list[Sptep], write: bool, user: bool, fetch: bool, ac: bool) -> bool:
    """:func:`rights_allow` over the sptes of a :func:`shadow_walk` path."""
    both = PT_WRITABLE_MASK | PT_USER_MASK
    nx = 0
    for sp, index in path:
        ent = sp.spt[index]
        both &= ent
        nx |= ent
    return rights_allow(cpu, both, nx, write, user, fetch, ac)


def host_cpu_hit(
    vcpu: Vcpu, kvm: Kvm, addr: int, write: bool, user: bool, fetch: bool, ac: bool
) -> tuple[KvmMmuPage, int, int] | None:
    """The host CPU's walk of the shadow (or TDP) tables for an access that completes without an exit: the
    leaf's ``(sp, index, spte)``, A set in every spte used (not in EPT tables: the era's EPT has no A bits);
    None when the walk ends on a trap, notrap or absent root, or the sptes deny the access (:func:`guest_access`
    then takes the exit path). The hot path of every access: one descent, no allocation (:func:`shadow_walk` is
    the general walk)."""
    headers = kvm.page_header
    if vcpu.shadow_root_level == PT32E_ROOT_LEVEL:
        if addr >> 32:
            return None
        root = vcpu.pae_root[(addr >> 30) & 3]
        if root == INVALID_PAGE or not root & PT_PRESENT_MASK:
            return None
        sp = headers[(root & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT]
        shift = 21
    else:
        sp = headers[(vcpu.root_hpa & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT]
        shift = 3 + 9 * vcpu.shadow_root_level
    both = PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK  # the bits every spte used has
    nx = 0
    try:
        while True:
            index = (addr >> shift) & 511
            ent = sp.spt[index]
            if ent == TRAP or ent == NOTRAP:
                return None
            both &= ent
            nx |= ent
            if shift == PAGE_SHIFT or ent & PT_PAGE_SIZE_MASK:
                break
            sp = headers[(ent & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT]
            shift -= 9
    except KeyError:
        raise KernelBug(f"shadow walk: entry {ent:#x} is not a table", ent) from None
    if kvm.tdp_enabled:
        if write and not both & PT_WRITABLE_MASK:
            return None
    elif not rights_allow(vcpu.cpu, both, nx, write, user, fetch, ac):
        return None
    if not both & PT_ACCESSED_MASK and kvm.hardware_sets_accessed:
        for psp, pindex in shadow_walk(vcpu, kvm, addr)[0]:
            psp.spt[pindex] |= PT_ACCESSED_MASK
        ent = sp.spt[index]
    return sp, index, ent


def tdp_allows(path: list[Sptep], write: bool) -> bool:
    """The TDP walk's check: direct-map sptes are ACC_ALL, only W can be missing (write protection, dirty
    logging)."""
    if not write:
        return True
    for sp, index in path:
        if not sp.spt[index] & PT_WRITABLE_MASK:
            return False
    return True


@dataclass(slots=True)
class AccessOutcome:
    """The outcome of one guest ``access`` (docs/trace-format.md, Outcome records)."""

    result: str
    gpa: int | None = None
    pfn: int | None = None
    spte: int | None = None
    err: int | None = None
    set_accessed: list[int] | None = None
    set_dirty: int | None = None
    looped: bool = False  # the fault was fixed RETRIES times and the access still exits
    livelock: bool = False  # KVM's guest walk restarted without end (FaultOutcome.livelock)


#: a hit without detail (``guest_access(detail=False)``); shared, never changed
HIT = AccessOutcome("hit")


def leaf_of(sp: KvmMmuPage, index: int, addr: int) -> tuple[int, int, int]:
    """(gpa, pfn, spte) of the leaf ``sp.spt[index]`` a walk for ``addr`` ended on: the leaf's gfn plus the
    offset, and the 4K frame reached (for a large spte, its base frame plus the 4K index within)."""
    spte = sp.spt[index]
    mask = (1 << 21) - 1 if spte & PT_PAGE_SIZE_MASK and sp.level == 2 else 0xFFF
    return (
        (sp.gfns[index] << PAGE_SHIFT) | (addr & mask),
        spte_to_pfn(spte) + ((addr & mask) >> PAGE_SHIFT),
        spte,
    )


def hardware_walk(
    vcpu: Vcpu, kvm: Kvm, addr: int, write: bool, user: bool, fetch: bool, ac: bool
) -> tuple[bool, int, list[int], int | None]:
    """The TDP CPU's walk of the guest's own tables when its memo cannot answer (:func:`guest_access` asks
    the memo first): (ok, gfn or error code, set_accessed, set_dirty).

    What a walk found for a gva page is memoised per vcpu (:func:`walk_memo_answer` judges any access kind
    from it) when it leaves every entry it used with A set: a leaf reached (gfn, rights, D), or a non-present or
    reserved entry (the error code without the access bits). Each guest pte the walk read is watched
    (``Host.watched``): a store to one of them that does more than set A/D drops the memo, as does any change
    of the vcpu's paging state or of the memory map; so the memo always answers what a fresh walk would, an
    exact stand-in for the TLB. A full memo forgets its older half (:data:`WALK_MEMO_LIMIT`).
    """
    page = addr >> PAGE_SHIFT
    cpu = vcpu.cpu
    ok, w = walk_addr(cpu, kvm.host, addr, write, user, fetch, ac=ac, set_ad=True)
    value = w.gfn if ok else w.error_code
    lvl = w.level - 1
    if ok:
        if not w.ad_lost:  # every entry used now has A (and the leaf D for a write)
            remember_walk(vcpu, kvm, page, (w.gfn, w.pte_access, w.ptes[lvl] & PT_DIRTY_MASK, None), w.pte_gpa[lvl:])
    elif not value & PFERR_PRESENT_MASK or value & PFERR_RSVD_MASK:
        remember_walk(vcpu, kvm, page, (0, 0, 0, value & (PFERR_PRESENT_MASK | PFERR_RSVD_MASK)), w.pte_gpa[lvl:])
    return ok, value, list(w.set_accessed), w.set_dirty


def walk_memo_answer(
    cpu: GuestCpu, hit: WalkMemo, write: bool, user: bool, fetch: bool, ac: bool
) -> tuple[bool, int] | None:
    """What ``walk_addr`` would answer for this access from a memoised walk ``(gfn, pte_access, dirty,
    fault bits or None, last pte read)``: (True, gfn), (False, error code), or None when the walk would write D
    (a write to a clean leaf) and must run."""
    gfn, access, dirty, fault, _ptes = hit
    if fault is not None:
        return False, fault | guest_error_code(cpu, False, write, user, fetch)
    if permission_fault(cpu, access, write, user, fetch, ac):
        return False, guest_error_code(cpu, True, write, user, fetch)
    if write and not dirty:
        return None
    return True, gfn


def remember_walk(
    vcpu: Vcpu, kvm: Kvm, page: int, found: tuple[int, int, int, int | None], pte_gpas: list[int]
) -> None:
    """Memoise ``found`` for gva ``page`` and watch the guest ptes the walk read, ``pte_gpas`` from the last
    one up (see :func:`hardware_walk`): the last one per walk (``Host.watched``), the upper ones, which many
    walks share and the guest seldom rewrites, all together (``Host.watched_upper``: a store there forgets
    every walk)."""
    memo = vcpu.walk_cache
    if page in memo:
        kvm.forget_walk(vcpu, page)
    elif len(memo) >= WALK_MEMO_LIMIT:
        for old in list(islice(memo, WALK_MEMO_LIMIT // 2)):
            kvm.forget_walk(vcpu, old)
    host = kvm.host
    if vcpu.cpu.paging == "32":  # Host.watched keys a 4-byte pte by gpa | 1
        pte_gpas = [gpa | 1 for gpa in pte_gpas]
    last = pte_gpas[0]
    host.watched_upper.update(pte_gpas[1:])
    memo[page] = (*found, last)
    dep = (vcpu.vcpu_id, page)
    walks = host.watched.get(last)
    if walks is None:
        host.watched[last] = {dep}
    else:
        walks.add(dep)


def guest_access(
    vcpu: Vcpu, kvm: Kvm, addr: int, write: bool, user: bool, fetch: bool, ac: bool, detail: bool = True
) -> AccessOutcome:
    """One guest memory access on the simulated CPU (docs/trace-format.md, The simulated CPU).

    Shadow: walk the sptes; a hit sets A in the sptes used; trap or a denying spte exits to
    ``kvm_mmu_page_fault`` and the access is retried; notrap or an absent PAE root is a guest #PF without an
    exit. TDP: the guest walk runs in hardware (guest A/D written directly), then the gpa goes through the
    TDP tables, a miss or a denial being a TDP fault on the gpa. Paging off: the address is the gpa.
    ``detail=False``: a hit's outcome carries its result only (no outcome record will be written).
    """
    cpu = vcpu.cpu
    set_accessed: list[int] = []
    set_dirty = None
    tdp_addr = addr
    if kvm.tdp_enabled and cpu.paging != "none":
        hit = vcpu.walk_cache.get(addr >> PAGE_SHIFT)  # hardware_walk's memo
        if hit is None:
            answer = None
        elif hit[1] == ACC_ALL and (hit[2] or not write) and (user or not (cpu.cr4_smep or cpu.cr4_smap)):
            answer = True, hit[0]  # walk_memo_answer's verdict for a leaf that grants everything
        else:
            answer = walk_memo_answer(cpu, hit, write, user, fetch, ac)
        if answer is None:
            ok, value, set_accessed, set_dirty = hardware_walk(vcpu, kvm, addr, write, user, fetch, ac)
        else:
            ok, value = answer
        if not ok:
            return AccessOutcome("guest_fault", err=value, set_accessed=[])
        tdp_addr = value << PAGE_SHIFT | (addr & 0xFFF)
    if not vcpu.mmu_reload_requested and vcpu.root_hpa != INVALID_PAGE:
        leaf = host_cpu_hit(vcpu, kvm, tdp_addr, write, user, fetch, ac)
        if leaf is not None:
            if not detail:
                return HIT
            leaf_gpa, pfn, spte = leaf_of(*leaf[:2], tdp_addr)
            return AccessOutcome("hit", leaf_gpa, pfn, spte, set_accessed=set_accessed, set_dirty=set_dirty)
    pte_len = 4 if cpu.paging == "32" else 8
    result = None
    gpa = None
    for _attempt in range(3):
        if (vcpu.mmu_reload_requested or vcpu.root_hpa == INVALID_PAGE) and kvm_mmu_reload(vcpu, kvm):
            return AccessOutcome("error", set_accessed=set_accessed, set_dirty=set_dirty)
        path, end = shadow_walk(vcpu, kvm, tdp_addr)
        if end == NOTRAP and not kvm.tdp_enabled:
            err = guest_error_code(cpu, False, write, user, fetch)
            return AccessOutcome("guest_fault", err=err, set_accessed=set_accessed)
        if (
            end != TRAP
            and end != NOTRAP
            and (tdp_allows(path, write) if kvm.tdp_enabled else leaf_allows(cpu, path, write, user, fetch, ac))
        ):
            if kvm.hardware_sets_accessed:
                for sp, index in path:
                    sp.spt[index] |= PT_ACCESSED_MASK
            leaf_gpa, pfn, spte = leaf_of(*path[-1], tdp_addr)
            if result is None:
                return AccessOutcome("hit", leaf_gpa, pfn, spte, set_accessed=set_accessed, set_dirty=set_dirty)
            return AccessOutcome(result, gpa, pfn, spte, set_accessed=set_accessed, set_dirty=set_dirty)
        error_code = (PFERR_PRESENT_MASK if end != TRAP else 0) | (PFERR_WRITE_MASK if write else 0)
        error_code |= (PFERR_USER_MASK if user else 0) | (PFERR_FETCH_MASK if fetch else 0)
        vcpu.fault_ac = ac
        out = kvm_mmu_page_fault(vcpu, kvm, tdp_addr, error_code, pte_len)
        if out.livelock:  # the kernel never gets here: report the walk's livelock, do not retry
            sa = set_accessed + list(out.set_accessed or ())
            return AccessOutcome(out.result, out.gpa, set_accessed=sa, set_dirty=out.set_dirty, livelock=True)
        if out.set_accessed:
            set_accessed.extend(out.set_accessed)
        if out.set_dirty is not None:
            set_dirty = out.set_dirty
        if kvm.consumed_failure or out.result == "error":
            return AccessOutcome("error", set_accessed=set_accessed, set_dirty=set_dirty)
        if out.result == "guest_fault":
            return AccessOutcome("guest_fault", err=out.err, set_accessed=set_accessed)
        if out.result in ("mmio", "emulated"):
            return AccessOutcome(out.result, out.gpa, set_accessed=set_accessed, set_dirty=set_dirty)
        result, gpa = "mapped", out.gpa
    # every attempt exited and was "fixed", yet the access still cannot complete: the guest would loop
    looped = AccessOutcome("mapped", gpa, set_accessed=set_accessed, set_dirty=set_dirty, looped=True)
    path, end = shadow_walk(vcpu, kvm, tdp_addr)
    if path and end not in (TRAP, NOTRAP):
        _, looped.pfn, looped.spte = leaf_of(*path[-1], tdp_addr)
    return looped


def emulator_write_phys(
    vcpu: Vcpu,
    kvm: Kvm,
    gpa: int,
    val: int,
    nbytes: int,
    always_emulate: bool,
    stored_hook: Callable[[int, int], None] | None = None,
) -> str:
    """A guest store of ``nbytes`` of ``val`` at ``gpa``; its result (``ok``, ``emulated``, ``mmio``, ``error``).

    One that is emulated (``pte_write``, or a store to a shadowed gfn) comes through ``kvm_mmu_page_fault``,
    which tops up the MMU caches before emulating (mmu.c, v2.6.26): an injected ``enomem`` fails it (``error``,
    nothing stored). Then ``emulator_write_phys`` (x86.c): ``kvm_write_guest`` (which marks the page dirty);
    when that fails (no memslot) it skips ``kvm_mmu_pte_write`` and the emulator takes the MMIO path
    (``mmio``). ``stored_hook(gpa, nbytes)``: the incremental audit's record of guest stores."""
    emulate = always_emulate or kvm_mmu_lookup_page(kvm, gpa >> PAGE_SHIFT) is not None
    if emulate and mmu_topup_memory_caches(vcpu, kvm):
        return "error"
    stored = kvm.host.write_guest(gpa, val, nbytes)
    if stored_hook is not None:
        stored_hook(gpa, nbytes)
    mark_page_dirty(kvm, gpa >> PAGE_SHIFT)
    if emulate:
        if not stored:
            return "mmio"
        kvm_mmu_pte_write(vcpu, kvm, gpa, val, nbytes)
        return "emulated"
    return "ok"


def recorded_fault(vcpu: Vcpu, kvm: Kvm, addr: int, err: int) -> AccessOutcome:
    """A ``pf`` event: the fault as recorded, straight into ``kvm_mmu_page_fault`` (no CPU walk)."""
    pte_len = 4 if vcpu.cpu.paging == "32" else 8
    if kvm_mmu_reload(vcpu, kvm):
        return AccessOutcome("error", set_accessed=[])
    vcpu.fault_ac = False
    out = kvm_mmu_page_fault(vcpu, kvm, addr, err, pte_len)
    sa = list(out.set_accessed or [])
    if out.livelock:
        return AccessOutcome(out.result, out.gpa, set_accessed=sa, set_dirty=out.set_dirty, livelock=True)
    if kvm.consumed_failure or out.result == "error":
        return AccessOutcome("error", set_accessed=sa, set_dirty=out.set_dirty)
    if out.result == "guest_fault":
        return AccessOutcome("guest_fault", err=out.err, set_accessed=sa)
    if out.result == "mapped":
        path, end = shadow_walk(vcpu, kvm, addr)
        if path and end not in (TRAP, NOTRAP):
            _, pfn, spte = leaf_of(*path[-1], addr)
            return AccessOutcome("mapped", out.gpa, pfn, spte, set_accessed=sa, set_dirty=out.set_dirty)
    return AccessOutcome(out.result, out.gpa, set_accessed=sa, set_dirty=out.set_dirty)
