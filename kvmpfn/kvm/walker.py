"""The guest page-table walker: FNAME(walk_addr) of arch/x86/kvm/paging_tmpl.h, v2.6.26
(docs/kernel.md, FNAME(walk_addr)).

The kernel instantiates paging_tmpl.h twice (``paging32_*`` with u32 entries, ``paging64_*`` with u64
entries for PAE and 4-level guests). Here there is one walk, :func:`walk_addr`, driven by a per-mode table
(:data:`PAGING_MODES`: levels, index bits, entry size, what PS means at each level, which address bits
exist).

The walk follows the architecture (Intel SDM vol. 3 ch. 4, and what kvm-unit-tests x86/access.c expects),
with the guest-visible fixes of docs/kernel.md, Kernel variants: reserved bits are checked, access rights
are judged once the leaf is reached, no guest A/D bit is written by a faulting walk, and ``access_at`` gives
each level's ``role.access`` (the 2021 fix). Each public function names where it differs from the 2008
kernel.

Reserved bits (``_rsvd_masks``; the SDM's paging-structure tables, and KVM's later
``__reset_rsvds_bits_mask`` in mmu.c, which access.c exercises):

- 32-bit: no reserved bits in 4-byte PDEs pointing to a table or in PTEs. With CR4.PSE a PDE with PS is a
  4 MiB leaf: bit 21 is reserved and bits 20:13 hold physical address bits 39:32 (PSE-36), of which those at
  or above min(MAXPHYADDR, 40) are reserved. With CR4.PSE=0 the PS bit is ignored (the PDE points to a page
  table).
- PAE: bits 62:MAXPHYADDR of PDEs and PTEs, bit 63 (XD) when EFER.NX=0; a 2 MiB PDE also bits 20:13.
  PDPTEs are checked when CR3 is loaded (:func:`load_pdptrs`): bits 63:MAXPHYADDR, 8:5 and 2:1.
- 4-level: bits 51:MAXPHYADDR of every entry (bits 62:52 are ignored), bit 63 when EFER.NX=0, PS in a PML4E,
  PS in a PDPTE without 1 GiB page support; a 2 MiB PDE also bits 20:13, a 1 GiB PDPTE bits 29:13.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from kvmpfn.x86 import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PAGE_SHIFT,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT32_BASE_ADDR_MASK,
    PT32_DIR_PSE36_SHIFT,
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PAGE_TABLE_LEVEL,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    UNMAPPED_GVA,
)

__all__ = [
    "PAGING_MODES",
    "PT32E_PDPT_ADDR_MASK",
    "WALK_RESTART_LIMIT",
    "GuestCpu",
    "GuestMem",
    "GuestWalker",
    "PagingMode",
    "gpte_access",
    "gpte_to_gfn",
    "gpte_to_gfn_pde",
    "gva_in_range",
    "gva_to_gpa",
    "is_canonical",
    "is_present_pte",
    "load_pdptrs",
    "permission_fault",
    "pse36_gfn_delta",
    "rsvd_bits",
    "walk_addr",
]

# PAE: CR3 bits 31:5 address the 32-byte page-directory-pointer table.
PT32E_PDPT_ADDR_MASK = 0xFFFF_FFE0
# PSE-36: bits 20:13 of a 4 MiB PDE carry physical address bits 39:32 (the kernel's PT32_DIR_PSE36_MASK is
# only the low four of them, bits 35:32).
PT32_DIR_PSE36_BITS = 8
PT32_DIR_PSE36_FULL_MASK = ((1 << PT32_DIR_PSE36_BITS) - 1) << PT32_DIR_PSE36_SHIFT
PSE36_MAX_PHYADDR = 32 + PT32_DIR_PSE36_BITS
PT32_DIR_RSVD_BIT21 = 1 << 21
# PAE PDPTE bits 2:1 and 8:5 are reserved (bits 63:MAXPHYADDR too, added per CPU).
PT32E_PDPTE_RSVD_LOW = 0b1_1110_0110
# How many times a walk restarts after losing a compare-and-exchange of an A/D bit. A single-threaded guest
# memory needs at most 3 (a pte aliasing a higher-level entry of the same walk); more means the cmpxchg cannot
# succeed (docs/kernel.md, FNAME(walk_addr): a page table without struct page), where the kernel livelocked.
WALK_RESTART_LIMIT = 4

# What bit 7 means at a level (PagingMode.ps). Level 1 always has PS_PAT: there bit 7 is PAT, never PS.
PS_PAT = "pat"  # not a page-size bit
PS_LARGE = "large"  # a large leaf
PS_PSE = "pse"  # a large leaf with CR4.PSE, ignored without
PS_GBPAGES = "gbpages"  # a large leaf when the CPU has 1 GiB pages, reserved without
PS_RESERVED = "reserved"  # always a reserved-bit fault
PS_PDPTE = "pdpte"  # the PAE PDPTE registers: not read by the walk


def rsvd_bits(lo: int, hi: int) -> int:
    """Mask of bits ``hi:lo`` (mmu.c ``rsvd_bits``); 0 when ``hi < lo``."""
    return ((1 << (hi - lo + 1)) - 1) << lo if hi >= lo else 0


@dataclass(slots=True)
class GuestCpu:
    """The guest paging state a walk depends on (the vcpu's CR0/CR3/CR4/EFER, CPUID and PDPTE registers)."""

    paging: str  # "none" | "32" | "pae" | "64"
    cr3: int
    cr0_wp: bool = True
    efer_nx: bool = True
    cr4_pse: bool = True
    cr4_smep: bool = False
    cr4_smap: bool = False
    maxphyaddr: int = 40
    gbpages: bool = False
    pdptrs: list[int] | None = None  # PAE: the 4 PDPTEs loaded at CR3 load time


class GuestMem(Protocol):
    """Guest-physical memory as the walker sees it (``kvm_read_guest``; the cmpxchg of ``cmpxchg_gpte``)."""

    def read_guest(self, gpa: int, size: int) -> int: ...

    def cmpxchg_guest(self, gpa: int, size: int, old: int, new: int) -> bool: ...


@dataclass(slots=True)
class GuestWalker:
    """``struct guest_walker``. Lists are indexed by ``level - 1``; levels the walk did not reach hold 0."""

    level: int  # level of the leaf (1 = 4K pte, 2 = large pde, 3 = 1 GiB pdpte), or of the faulting entry
    gfn: int  # the gfn reached (large leaves: base + 4K index of the frame within)
    pt_access: int  # ACC_* AND over the non-leaf levels
    pte_access: int  # ACC_* including the leaf
    access_at: list[int]  # AND of gpte_access from the top down to and including each level
    table_gfn: list[int]  # gfn of the guest table read at each level
    pte_gpa: list[int]  # gpa of the entry read at each level
    ptes: list[int]  # entry value at each level (after A/D updates)
    error_code: int = 0  # PFERR_* bits when the walk faulted
    set_accessed: list[int] = field(default_factory=list)  # gpas whose A bit this walk set, in walk order
    set_dirty: int | None = None  # gpa of the pte whose D bit this walk set
    ad_lost: bool = False  # a success whose A/D bits could not be written (WALK_RESTART_LIMIT)


@dataclass(frozen=True, slots=True)
class PagingMode:
    """One guest paging mode as data: what FNAME() and ``mmu->root_level`` select in the kernel."""

    name: str
    root_level: int  # mmu->root_level: 2, 3 (PAE, from the PDPTE registers) or 4
    level_bits: int  # PT_LEVEL_BITS: index bits per level
    pte_size: int  # sizeof(pt_element_t)
    base_addr_mask: int  # PT_BASE_ADDR_MASK: table address bits of an entry and of CR3
    high_rsvd_top: int  # address bits MAXPHYADDR..high_rsvd_top are reserved (0: none, 4-byte entries)
    has_nx: bool  # bit 63 is XD (EXEC is taken away with EFER.NX, reserved without)
    pse36: bool  # 4 MiB leaves carry PSE-36 address bits
    ps: tuple[str, ...]  # ps[level - 1]: what bit 7 means at that level (PS_*)


# fmt: off
PAGING_MODES: dict[str, PagingMode] = {
    #                name   root bits size base_addr_mask       high nx     pse36  ps[level - 1]
    "32": PagingMode("32",  2,   10,  4,   PT32_BASE_ADDR_MASK, 0,   False, True,  (PS_PAT, PS_PSE)),
    "pae": PagingMode("pae", 3,  9,   8,   PT64_BASE_ADDR_MASK, 62,  True,  False,
                      (PS_PAT, PS_LARGE, PS_PDPTE)),
    "64": PagingMode("64",  4,   9,   8,   PT64_BASE_ADDR_MASK, 51,  True,  False,
                     (PS_PAT, PS_LARGE, PS_GBPAGES, PS_RESERVED)),
}
# fmt: on


def _paging_mode(cpu: GuestCpu) -> PagingMode:
    mode = PAGING_MODES.get(cpu.paging)
    if mode is None:
        raise ValueError(f"walk_addr: paging {cpu.paging!r} is not walked ('none': the address is the gpa)")
    return mode


@lru_cache(maxsize=64)
def _rsvd_masks(
    paging: str, maxphyaddr: int, efer_nx: bool, cr4_pse: bool, gbpages: bool
) -> tuple[tuple[int, int | None], ...]:
    """Per level: (reserved bits of an entry that is not a large leaf, reserved bits of a large leaf or None
    when PS does not make a leaf there). Models the later kernel's ``rsvd_bits_mask[2][level]``."""
    mode = PAGING_MODES[paging]
    high = rsvd_bits(maxphyaddr, mode.high_rsvd_top) if mode.high_rsvd_top else 0
    if mode.has_nx and not efer_nx:
        high |= PT64_NX_MASK
    masks = []
    for level, rule in enumerate(mode.ps, start=1):
        large: int | None = None
        nonleaf = high
        if rule == PS_RESERVED or (rule == PS_GBPAGES and not gbpages):
            nonleaf |= PT_PAGE_SIZE_MASK
        elif rule == PS_LARGE or (rule == PS_GBPAGES and gbpages) or (rule == PS_PSE and cr4_pse):
            if mode.pse36:
                usable = max(0, min(maxphyaddr, PSE36_MAX_PHYADDR) - 32)
                large = PT32_DIR_RSVD_BIT21 | rsvd_bits(PT32_DIR_PSE36_SHIFT + usable, 20)
            else:
                large = high | rsvd_bits(13, PAGE_SHIFT + mode.level_bits * (level - 1) - 1)
        masks.append((nonleaf, large))
    return tuple(masks)


def is_present_pte(pte: int) -> bool:
    """``is_present_pte`` (mmu.c): the P bit of a guest pte."""
    return bool(pte & PT_PRESENT_MASK)


def gpte_access(cpu: GuestCpu, gpte: int) -> int:
    """``FNAME(gpte_access)``: the ACC_* rights one guest entry grants.

    ``(gpte & (W|U)) | ACC_EXEC``, minus ACC_EXEC when the entry has NX, EFER.NX is on and entries are
    8 bytes (PAE/64). Not applied to a PAE PDPTE, which has no rights bits.
    """
    access = (gpte & (PT_WRITABLE_MASK | PT_USER_MASK)) | ACC_EXEC_MASK
    if cpu.efer_nx and gpte & PT64_NX_MASK and _paging_mode(cpu).has_nx:
        access &= ~ACC_EXEC_MASK
    return access


def _gpte_to_gfn_lvl(mode: PagingMode, gpte: int, level: int) -> int:
    """The gfn an entry at ``level`` points to: a table (level 1: a 4K frame), or a large page's first gfn."""
    page_mask = (1 << (PAGE_SHIFT + mode.level_bits * (level - 1))) - 1
    return (gpte & mode.base_addr_mask & ~page_mask) >> PAGE_SHIFT


def gpte_to_gfn(cpu: GuestCpu, gpte: int) -> int:
    """``gpte_to_gfn``: the gfn a non-leaf entry or 4K pte points to (``PT_BASE_ADDR_MASK``)."""
    return _gpte_to_gfn_lvl(_paging_mode(cpu), gpte, PT_PAGE_TABLE_LEVEL)


def gpte_to_gfn_pde(cpu: GuestCpu, gpte: int, level: int = 2) -> int:
    """``gpte_to_gfn_pde``: the first gfn of the large page a leaf at ``level`` maps (without PSE-36 bits).

    Differs from the kernel: takes a level, so that 1 GiB PDPTEs (level 3) work too (the later
    ``gpte_to_gfn_lvl``).
    """
    return _gpte_to_gfn_lvl(_paging_mode(cpu), gpte, level)


def pse36_gfn_delta(gpte: int) -> int:
    """``pse36_gfn_delta``: the gfn bits a 32-bit 4 MiB PDE adds above 4 GiB (PSE-36).

    Differs from the kernel: reads bits 20:13 (physical address bits 39:32, as the SDM defines them for
    MAXPHYADDR up to 40), not just bits 16:13; bits at or above MAXPHYADDR are reserved and fault first.
    """
    return (gpte & PT32_DIR_PSE36_FULL_MASK) << (32 - PT32_DIR_PSE36_SHIFT - PAGE_SHIFT)


def is_canonical(addr: int, va_bits: int = 48) -> bool:
    """A 64-bit address whose bits 63:va_bits-1 are all equal (``is_noncanonical_address`` negated)."""
    if not 0 <= addr < 1 << 64:
        return False
    top = addr >> (va_bits - 1)
    return top == 0 or top == (1 << (65 - va_bits)) - 1


def gva_in_range(paging: str, addr: int) -> bool:
    """Whether ``addr`` is a valid gva for a paging mode (docs/trace-format.md, Values); "none": a gpa."""
    if paging == "64":
        return is_canonical(addr)
    if paging == "none":
        return 0 <= addr < 1 << 52
    return 0 <= addr < 1 << 32


def load_pdptrs(cpu_or_cr3: GuestCpu | int, mem: GuestMem, maxphyaddr: int | None = None) -> list[int] | None:
    """``load_pdptrs`` (x86.c): read the four PAE PDPTEs at ``cr3 & ~0x1f``; None means the load #GPs.

    A present PDPTE with any of bits 2:1, 8:5 or 63:MAXPHYADDR set makes the load fail. ``maxphyaddr``
    defaults to the cpu's (or 40 when a bare CR3 is given). Pure: the caller stores the result in
    ``cpu.pdptrs``.

    Differs from the kernel: the era's mask 0xfffffff0000001e6 assumed MAXPHYADDR 36; this uses the cpu's.
    """
    if isinstance(cpu_or_cr3, GuestCpu):
        cr3, default_maxphyaddr = cpu_or_cr3.cr3, cpu_or_cr3.maxphyaddr
    else:
        cr3, default_maxphyaddr = cpu_or_cr3, 40
    if maxphyaddr is None:
        maxphyaddr = default_maxphyaddr
    rsvd = PT32E_PDPTE_RSVD_LOW | rsvd_bits(maxphyaddr, 63)
    base = cr3 & PT32E_PDPT_ADDR_MASK
    pdptrs = [mem.read_guest(base + 8 * i, 8) for i in range(4)]
    if any(is_present_pte(pdpte) and pdpte & rsvd for pdpte in pdptrs):
        return None
    return pdptrs


def _fault_error_code(cpu: GuestCpu, mode: PagingMode, write: bool, user: bool, fetch: bool) -> int:
    """W/U/FETCH bits of a #PF error code; FETCH only exists with NX paging (PAE/64 and EFER.NX) or SMEP."""
    code = 0
    if write:
        code |= PFERR_WRITE_MASK
    if user:
        code |= PFERR_USER_MASK
    if fetch and ((mode.has_nx and cpu.efer_nx) or cpu.cr4_smep):
        code |= PFERR_FETCH_MASK
    return code


def permission_fault(cpu: GuestCpu, access: int, write: bool, user: bool, fetch: bool, ac: bool) -> bool:
    """Whether the accumulated rights ``access`` deny the access (SDM 4.6)."""
    if user and not access & ACC_USER_MASK:
        return True
    if write and not access & ACC_WRITE_MASK and (user or cpu.cr0_wp):
        return True
    if fetch and not access & ACC_EXEC_MASK:
        return True
    if not user and access & ACC_USER_MASK:
        if fetch and cpu.cr4_smep:
            return True
        if not fetch and cpu.cr4_smap and not ac:
            return True
    return False


def _walk_once(
    cpu: GuestCpu,
    mode: PagingMode,
    mem: GuestMem,
    addr: int,
    write_fault: bool,
    user_fault: bool,
    fetch_fault: bool,
    ac: bool,
    rsvd_check: bool = True,
    in_memslot: Callable[[int], object] | None = None,
) -> tuple[bool, GuestWalker]:
    """One read-only pass from the root to the leaf or the first faulting entry. On a non-present or reserved
    entry, pt_access and pte_access are the rights accumulated above it. ``in_memslot(gfn)`` given: a table
    outside every memslot is not read and ``pte`` keeps the entry above it (``walk_read_unchecked``)."""
    masks = _rsvd_masks(mode.name, cpu.maxphyaddr, cpu.efer_nx, cpu.cr4_pse, cpu.gbpages)
    if not rsvd_check:  # the era: nothing reserved, PS where no large page may be is a pointer
        masks = tuple((0, None if large is None else 0) for _nonleaf, large in masks)
    n = mode.root_level
    w = GuestWalker(n, 0, ACC_ALL, ACC_ALL, [0] * n, [0] * n, [0] * n, [0] * n)
    table_gfns, pte_gpas, ptes, access_at = w.table_gfn, w.pte_gpa, w.ptes, w.access_at
    level = n
    pte = cpu.cr3
    if mode.ps[n - 1] == PS_PDPTE:
        if cpu.pdptrs is None:
            raise ValueError("walk_addr: PAE paging without PDPTEs (call load_pdptrs at CR3 load)")
        index = (addr >> 30) & 3
        pte = cpu.pdptrs[index]
        pdpt = cpu.cr3 & PT32E_PDPT_ADDR_MASK
        table_gfns[n - 1] = pdpt >> PAGE_SHIFT
        pte_gpas[n - 1] = pdpt + 8 * index
        ptes[n - 1] = pte
        access_at[n - 1] = ACC_ALL
        if not pte & PT_PRESENT_MASK:
            w.error_code = _fault_error_code(cpu, mode, write_fault, user_fault, fetch_fault)
            return False, w
        level -= 1
    # the hot loop: _gpte_to_gfn_lvl, is_present_pte and gpte_access written out
    read_guest = mem.read_guest
    level_bits, pte_size = mode.level_bits, mode.pte_size
    table_mask = mode.base_addr_mask & ~((1 << PAGE_SHIFT) - 1)
    index_mask = (1 << level_bits) - 1
    no_exec = cpu.efer_nx and mode.has_nx  # gpte NX takes ACC_EXEC away
    pt_access = ACC_ALL
    while True:
        shift = PAGE_SHIFT + level_bits * (level - 1)
        table_gfn = (pte & table_mask) >> PAGE_SHIFT
        pte_gpa = (table_gfn << PAGE_SHIFT) + ((addr >> shift) & index_mask) * pte_size
        i = level - 1
        table_gfns[i] = table_gfn
        pte_gpas[i] = pte_gpa
        if in_memslot is None or in_memslot(table_gfn):
            pte = read_guest(pte_gpa, pte_size)
        ptes[i] = pte
        if not pte & PT_PRESENT_MASK:
            w.level = level
            w.pt_access = w.pte_access = pt_access
            w.error_code = _fault_error_code(cpu, mode, write_fault, user_fault, fetch_fault)
            return False, w
        rsvd, rsvd_large = masks[i]
        large = rsvd_large is not None and bool(pte & PT_PAGE_SIZE_MASK)
        if large:
            rsvd = rsvd_large  # type: ignore[assignment]
        if pte & rsvd:
            w.level = level
            w.pt_access = w.pte_access = pt_access
            code = _fault_error_code(cpu, mode, write_fault, user_fault, fetch_fault)
            w.error_code = PFERR_PRESENT_MASK | PFERR_RSVD_MASK | code
            return False, w
        access = (pte & (PT_WRITABLE_MASK | PT_USER_MASK)) | ACC_EXEC_MASK
        if no_exec and pte & PT64_NX_MASK:
            access &= ~ACC_EXEC_MASK
        pte_access = pt_access & access
        access_at[i] = pte_access
        if level == PT_PAGE_TABLE_LEVEL or large:
            w.level = level
            w.pt_access, w.pte_access = pt_access, pte_access
        if level == PT_PAGE_TABLE_LEVEL:
            w.gfn = (pte & table_mask) >> PAGE_SHIFT
            break
        if large:
            w.gfn = _gpte_to_gfn_lvl(mode, pte, level) + ((addr & ((1 << shift) - 1)) >> PAGE_SHIFT)
            if mode.pse36:
                w.gfn += pse36_gfn_delta(pte)
            break
        pt_access = pte_access
        level -= 1
    if permission_fault(cpu, w.pte_access, write_fault, user_fault, fetch_fault, ac):
        w.gfn = 0
        w.error_code = PFERR_PRESENT_MASK | _fault_error_code(cpu, mode, write_fault, user_fault, fetch_fault)
        return False, w
    return True, w


def _update_accessed_dirty(
    mode: PagingMode,
    mem: GuestMem,
    w: GuestWalker,
    write_fault: bool,
    mark_page_dirty: Callable[[int], object] | None,
    pte_write: Callable[[int, int, int], object] | None,
) -> bool:
    """Set A top-down and D on the leaf with compare-and-exchange; False when an entry changed (restart)."""
    top = mode.root_level - 1 if mode.ps[mode.root_level - 1] == PS_PDPTE else mode.root_level
    for level in range(top, w.level - 1, -1):
        pte = w.ptes[level - 1]
        if pte & PT_ACCESSED_MASK:
            continue
        if mark_page_dirty is not None:
            mark_page_dirty(w.table_gfn[level - 1])
        if not mem.cmpxchg_guest(w.pte_gpa[level - 1], mode.pte_size, pte, pte | PT_ACCESSED_MASK):
            return False
        w.ptes[level - 1] = pte | PT_ACCESSED_MASK
        w.set_accessed.append(w.pte_gpa[level - 1])
    leaf = w.ptes[w.level - 1]
    if write_fault and not leaf & PT_DIRTY_MASK:
        gpa = w.pte_gpa[w.level - 1]
        if mark_page_dirty is not None:
            mark_page_dirty(w.table_gfn[w.level - 1])
        if not mem.cmpxchg_guest(gpa, mode.pte_size, leaf, leaf | PT_DIRTY_MASK):
            return False
        w.ptes[w.level - 1] = leaf | PT_DIRTY_MASK
        w.set_dirty = gpa
        if pte_write is not None:
            pte_write(gpa, leaf | PT_DIRTY_MASK, mode.pte_size)
    return True


def walk_addr(
    cpu: GuestCpu,
    mem: GuestMem,
    addr: int,
    write_fault: bool,
    user_fault: bool,
    fetch_fault: bool,
    *,
    ac: bool = False,
    set_ad: bool = True,
    mark_page_dirty: Callable[[int], object] | None = None,
    pte_write: Callable[[int, int, int], object] | None = None,
    rsvd_check: bool = True,
    in_memslot: Callable[[int], object] | None = None,
) -> tuple[bool, GuestWalker]:
    """``FNAME(walk_addr)`` (paging_tmpl.h, v2.6.26): translate gva ``addr`` for one access.

    Reads the guest entries from CR3 (PAE: from ``cpu.pdptrs[(addr >> 30) & 3]``) down to the leaf. At
    each level a non-present entry is a fault with P=0, an entry with reserved bits a fault with P|RSVD
    (the SDM order); only at the leaf are the accumulated rights judged: write to read-only (user, or
    CR0.WP), user access to a supervisor page, fetch from NX (EFER.NX, PAE/64), SMEP (supervisor fetch from
    a user page), SMAP (supervisor data access to a user page unless ``ac``). The error code adds W, U, and
    FETCH where it exists (NX paging or SMEP).

    On success with ``set_ad``, A is set on every entry that lacks it, top-down (not the PAE PDPTE registers),
    then D on the leaf for a write, each by ``mem.cmpxchg_guest`` (``FNAME(cmpxchg_gpte)``), each preceded by
    ``mark_page_dirty(table_gfn)``; after D, ``pte_write(pte_gpa, new_pte, size)`` (``kvm_mmu_pte_write``). A
    lost cmpxchg restarts the whole walk (``goto walk``); A bits set before it stay set and stay listed in
    ``set_accessed``, even if the restarted walk faults. When the cmpxchg is still lost after
    :data:`WALK_RESTART_LIMIT` restarts, the last walk is returned as a success with the A/D bits it could
    not write left clear (in ``ptes`` and in memory), which docs/kernel.md, Invariants: I12 requires. ``set_ad=False``
    is the auditor's side-effect-free walk; the TDP hardware walk is ``set_ad=True`` without callbacks. Paging
    "none" raises ValueError.

    :return: (True, walker) or (False, walker with ``error_code``; ``level`` is the faulting entry's).

    Differs from the kernel: the 2008 walk judged W/U/NX at each level on the way down and set A bits as it
    went, so a faulting walk could leave A bits behind; it had no reserved-bit checks (no PFERR_RSVD), no
    SMEP/SMAP, no 1 GiB pages (PS at levels 3/4 was ignored), PSE-36 bits 16:13 only, always set FETCH for a
    fetch fault, and restarted without bound (a livelock when the cmpxchg could never succeed).
    ``access_at`` is the 2021 ``role.access`` fix. ``rsvd_check=False`` is the era's walk without reserved
    bits (``--bug no-rsvd-check``).

    A guest table outside every memslot reads as zeros, so the walk faults not-present (the behaviour since
    d6d161b4, "KVM: MMU: bail out pagewalk on kvm_read_guest error", v2.6.33). v2.6.26 and v2.6.27 ignored
    ``kvm_read_guest``'s return value: ``pte`` kept the
    entry above, whose frame was then used as the next table and finally as the leaf's gfn, so a read reached
    that gpa (MMIO) and a write's D-bit ``cmpxchg_gpte`` hit ``bad_page`` and restarted forever.
    ``in_memslot(gfn)`` re-creates that (``--bug walk-read-unchecked``); the restart limit then ends the
    livelock with ``ad_lost`` set, which the caller reports.
    """
    mode = _paging_mode(cpu)
    set_accessed: list[int] = []
    restarts = 0
    while True:
        ok, w = _walk_once(cpu, mode, mem, addr, write_fault, user_fault, fetch_fault, ac, rsvd_check, in_memslot)
        w.set_accessed = set_accessed
        if not ok or not set_ad:
            return ok, w
        if _update_accessed_dirty(mode, mem, w, write_fault, mark_page_dirty, pte_write):
            return True, w
        if restarts == WALK_RESTART_LIMIT:
            w.ad_lost = True
            return True, w  # the kernel's livelock, cut short: A/D left unwritten
        restarts += 1


def gva_to_gpa(
    cpu: GuestCpu,
    mem: GuestMem,
    addr: int,
    write_fault: bool = False,
    user_fault: bool = False,
    fetch_fault: bool = False,
    *,
    ac: bool = False,
    set_ad: bool = True,
    mark_page_dirty: Callable[[int], object] | None = None,
    pte_write: Callable[[int, int, int], object] | None = None,
) -> int:
    """``FNAME(gva_to_gpa)``: ``gfn << 12 | (addr & 0xfff)`` of a successful walk, else UNMAPPED_GVA.

    With paging "none" returns ``addr`` (``nonpaging_gva_to_gpa``).

    Differs from the kernel: the access kind and ``set_ad`` are parameters; the kernel always walked as a
    supervisor read and set A bits, also when the audit code called it (pass ``set_ad=False`` for that).
    """
    if cpu.paging == "none":
        return addr
    ok, w = walk_addr(
        cpu,
        mem,
        addr,
        write_fault,
        user_fault,
        fetch_fault,
        ac=ac,
        set_ad=set_ad,
        mark_page_dirty=mark_page_dirty,
        pte_write=pte_write,
    )
    if not ok:
        return UNMAPPED_GVA
    return (w.gfn << PAGE_SHIFT) | (addr & ((1 << PAGE_SHIFT) - 1))
