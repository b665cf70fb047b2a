"""Looking inside a replay: observers attached to the MMU's existing hooks (the pfn API hook, ``rmap_add`` /
``rmap_remove``, ``rmap_write_protect``) and walkers over its state, for ``kvmpfn explain``, ``show``,
``stat``, the HTML report and the timeline.

An observer is handed to :func:`kvmpfn.replay.replay_file` (``observer=``); it chains itself after the
auditor's ledger on each hook it needs (:func:`chain`), so nothing is paid on a replay without one.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmpfn.kvm.spte import NOTRAP, TRAP, spte_to_pfn
from kvmpfn.x86 import (
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_GLOBAL_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PCD_MASK,
    PT_PRESENT_MASK,
    PT_PWT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
)

FAULT_OPS = frozenset({"access", "pf"})  # the events that are a guest access (the others are stores or setup)

BITS = (
    (PT_PRESENT_MASK, "P"),
    (PT_WRITABLE_MASK, "W"),
    (PT_USER_MASK, "U"),
    (PT_PWT_MASK, "PWT"),
    (PT_PCD_MASK, "PCD"),
    (PT_ACCESSED_MASK, "A"),
    (PT_DIRTY_MASK, "D"),
    (PT_PAGE_SIZE_MASK, "PS"),
    (PT_GLOBAL_MASK, "G"),
    (PT64_NX_MASK, "NX"),
)


def chain(first: Callable | None, then: Callable) -> Callable:
    """A hook that calls ``first`` (the one already installed, if any) and then ``then`` with the same
    arguments."""
    if first is None:
        return then

    def both(*args):
        first(*args)
        then(*args)

    return both


def bits_text(value: int) -> str:
    """The flag bits set in a pte, by their SDM names: ``P W U A D``."""
    return " ".join(name for mask, name in BITS if value & mask)


def spte_text(spte: int | None) -> str:
    """An spte in words: ``trap``, ``notrap``, or ``0x100000067 (pfn 0x100000: P W U A D)``."""
    if spte is None:
        return "unknown"
    if spte == TRAP:
        return "trap"
    if spte == NOTRAP:
        return "notrap"
    return f"{spte:#x} (pfn {spte_to_pfn(spte):#x}: {bits_text(spte)})"


def sptep_text(sptep: tuple) -> str:
    """Where an spte lives, as the ledger's provenance names it: ``spte 5 of shadow page gfn 0x0 level 1``."""
    sp, index = sptep
    return f"spte {index} of shadow page gfn {sp.gfn:#x} level {sp.level}"
