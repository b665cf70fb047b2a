"""Shadow pte helpers (arch/x86/kvm/mmu.c, 2008): sptes are plain 64-bit ints with the kernel's bit layout.

A `sptep` (the kernel's ``u64 *``) is modelled as ``(sp, index)``: the shadow page and the entry's index in
``sp.spt``.
"""

from kvmpfn.x86 import (
    PAGE_SHIFT,
    PT64_BASE_ADDR_MASK,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SHADOW_NOTRAP_NONPRESENT_PTE,
    SHADOW_TRAP_NONPRESENT_PTE,
)

TRAP = SHADOW_TRAP_NONPRESENT_PTE
NOTRAP = SHADOW_NOTRAP_NONPRESENT_PTE


def is_shadow_present_pte(spte: int) -> bool:
    """``is_shadow_present_pte``: neither the trap nor the notrap non-present value."""
    return spte != TRAP and spte != NOTRAP


is_rmap_pte = is_shadow_present_pte  # every present spte is rmapped (docs/kernel.md, Kernel variants)


def is_large_pte(spte: int) -> bool:
    """``is_large_pte``: PT_PAGE_SIZE_MASK; meaningful at level 2 only."""
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_writeble_pte(spte: int) -> bool:
    """``is_writeble_pte`` (the kernel's spelling)."""
    return bool(spte & PT_WRITABLE_MASK)


def spte_to_pfn(spte: int) -> int:
    """``spte_to_pfn`` (the seed): ``(spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT``."""
    return (spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT


def is_last_spte(spte: int, level: int) -> bool:
    """A leaf: any entry at level 1, a large entry at level 2 (docs/kernel.md, Kernel variants; ``is_last_spte`` of
    v2.6.32)."""
    return level == 1 or (level == 2 and bool(spte & PT_PAGE_SIZE_MASK))
