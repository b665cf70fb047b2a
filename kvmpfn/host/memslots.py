"""Memslots: gfn → hva (virt/kvm/kvm_main.c ``gfn_to_memslot``, ``gfn_to_hva``; docs/kernel.md, Memslot changes).

Every slot creation maps a fresh host vma, an ``HvaWindow``: 2 MiB aligned, at ``HVA_BASE`` plus a cursor that
only grows, with a 2 MiB guard gap after each. A slot's ``userspace_addr`` is its window base plus the 2 MiB
offset of its first gpa, so hva ≡ gpa (mod 2 MiB) and hugetlb regions line up with guest large pages. Host
memory belongs to the window (per hva), so a moved or resized slot keeps the frames of the hvas it still
covers; a window that a resize or move outgrows is moved whole to a new, larger address range (``mremap``:
frames keep their hva offsets). Deleting a slot, or changing its backing, unmaps its window.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from kvmpfn.host.errors import HostError
from kvmpfn.host.frames import MMIO_PFN_BASE
from kvmpfn.x86 import KVM_HPAGE_SHIFT, KVM_PAGES_PER_HPAGE, PAGE_SHIFT

BACKINGS = ("ram", "hugetlb", "reserved", "mmio")
HVA_BASE = 0x7F0000000000
HPAGE_SIZE = 1 << KVM_HPAGE_SHIFT
GFN_LIMIT = 1 << (52 - PAGE_SHIFT)
_HPAGE_GFN_MASK = KVM_PAGES_PER_HPAGE - 1


def _round_hpages(npages: int) -> int:
    return -(-npages // KVM_PAGES_PER_HPAGE) * KVM_PAGES_PER_HPAGE


class HvaWindow:
    """The host vma behind one memslot creation (anonymous, hugetlbfs, reserved or VM_PFNMAP device).

    ``pages`` maps a page offset in the window to the RAM pfn faulted in there (hugetlb: the offset of each
    2 MiB block faulted in to its first pfn); a device window instead maps offset ``i`` to ``dev_base + i``
    (``vm_pgoff`` arithmetic of ``follow_pfn``).
    """

    __slots__ = ("base", "npages", "backing", "pages", "dev_base", "slot")

    def __init__(self, base: int, npages: int, backing: str, dev_base: int | None, slot: Memslot | None):
        self.base = base
        self.npages = npages
        self.backing = backing
        self.pages: dict[int, int] = {}
        self.dev_base = dev_base
        self.slot = slot

    @property
    def end(self) -> int:
        return self.base + (self.npages << PAGE_SHIFT)


class Memslot:
    """``struct kvm_memory_slot``: ``base_gfn``, ``npages``, ``userspace_addr``; ``slot`` is its id.

    ``window_gfn`` is the gfn that window offset 0 stands for (``base_gfn`` rounded down to 2 MiB).
    """

    __slots__ = ("slot", "base_gfn", "npages", "backing", "window", "window_gfn")

    def __init__(self, slot: int, base_gfn: int, npages: int, backing: str, window: HvaWindow):
        self.slot = slot
        self.base_gfn = base_gfn
        self.npages = npages
        self.backing = backing
        self.window = window
        self.window_gfn = base_gfn & ~_HPAGE_GFN_MASK

    @property
    def userspace_addr(self) -> int:
        """The hva of ``base_gfn``."""
        return self.window.base + ((self.base_gfn - self.window_gfn) << PAGE_SHIFT)

    def gfn_to_hva(self, gfn: int) -> int:
        """``gfn_to_hva`` within this slot (no range check)."""
        return self.window.base + ((gfn - self.window_gfn) << PAGE_SHIFT)

    def __repr__(self) -> str:
        return (
            f"Memslot(slot={self.slot}, base_gfn={self.base_gfn:#x}, npages={self.npages:#x}, "
            f"backing={self.backing!r}, userspace_addr={self.userspace_addr:#x})"
        )


def _check_int(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise HostError(field, f"must be an integer, not {value!r}")
    return value


class MemslotTable:
    """``kvm->memslots`` plus the host's vma layout: sorted by gfn for ``bisect``, with a one-entry cache."""

    def __init__(self) -> None:
        self._by_id: dict[int, Memslot] = {}
        self._bases: list[int] = []  # base_gfn of each slot, sorted
        self._sorted: list[Memslot] = []  # parallel to _bases
        self._last: Memslot | None = None
        self._by_slot_order: list[Memslot] | None = None
        self._window_bases: list[int] = []  # sorted (the cursor only grows)
        self._windows: list[HvaWindow] = []
        self._last_window: HvaWindow | None = None
        self._hva_cursor = HVA_BASE
        self._dev_cursor = MMIO_PFN_BASE

    # -- lookups (hot path) ------------------------------------------------------------------------------
    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """``gfn_to_memslot``: the slot holding ``gfn``, or None."""
        ms = self._last
        if ms is not None and ms.base_gfn <= gfn < ms.base_gfn + ms.npages:
            return ms
        i = bisect_right(self._bases, gfn) - 1
        if i < 0:
            return None
        ms = self._sorted[i]
        if gfn < ms.base_gfn + ms.npages:
            self._last = ms
            return ms
        return None

    def hva_to_window(self, hva: int) -> HvaWindow | None:
        """The host vma containing ``hva`` (``find_vma``), or None."""
        w = self._last_window
        if w is not None and w.base <= hva < w.end:
            return w
        i = bisect_right(self._window_bases, hva) - 1
        if i < 0:
            return None
        w = self._windows[i]
        if hva < w.end:
            self._last_window = w
            return w
        return None

    def get(self, slot: int) -> Memslot | None:
        return self._by_id.get(slot)

    def in_slot_order(self) -> list[Memslot]:
        if self._by_slot_order is None:
            self._by_slot_order = [self._by_id[k] for k in sorted(self._by_id)]
        return self._by_slot_order

    def __len__(self) -> int:
        return len(self._by_id)

    # -- KVM_SET_USER_MEMORY_REGION ----------------------------------------------------------------------
    def set(self, slot: int, gfn: int, npages: int, backing: str) -> HvaWindow | None:
        """Create, move, resize (``npages`` > 0) or delete (``npages`` 0) ``slot``.

        Returns the window unmapped by a deletion or a change of backing, for the host to drop its frames.
        """
        slot = _check_int("slot", slot)
        npages = _check_int("npages", npages)
        if slot < 0:
            raise HostError("slot", f"slot id {slot} is negative")
        if npages < 0:
            raise HostError("npages", f"npages {npages} is negative")
        old = self._by_id.get(slot)
        if npages == 0:
            if old is None:
                raise HostError("slot", f"cannot delete slot {slot}: it does not exist")
            self._changed()
            self._unlink(old)
            del self._by_id[slot]
            self._unmap(old.window)
            return old.window
        gfn = _check_int("gfn", gfn)
        if backing not in BACKINGS:
            raise HostError("backing", f"unknown backing {backing!r} (expected one of {', '.join(BACKINGS)})")
        if gfn < 0 or gfn + npages > GFN_LIMIT:
            raise HostError("gfn", f"slot {slot} [{gfn:#x}, +{npages:#x}) is outside the 52-bit gpa space")
        other = self._overlapping(gfn, npages, old)
        if other is not None:
            raise HostError(
                "gfn",
                f"slot {slot} [{gfn:#x}, {gfn + npages:#x}) overlaps slot {other.slot} "
                f"[{other.base_gfn:#x}, {other.base_gfn + other.npages:#x})",
            )
        self._changed()
        need = (gfn & _HPAGE_GFN_MASK) + npages
        dropped = None
        if old is not None:
            self._unlink(old)
        if old is None or old.backing != backing:
            if old is not None:
                self._unmap(old.window)
                dropped = old.window
            ms = Memslot(slot, gfn, npages, backing, self._map(need, backing))
            ms.window.slot = ms
            self._by_id[slot] = ms
        else:
            ms = old
            if need > ms.window.npages:
                self._remap(ms.window, need)
            ms.base_gfn = gfn
            ms.npages = npages
            ms.window_gfn = gfn & ~_HPAGE_GFN_MASK
        i = bisect_left(self._bases, gfn)
        self._bases.insert(i, gfn)
        self._sorted.insert(i, ms)
        return dropped

    def _changed(self) -> None:
        self._last = None
        self._last_window = None
        self._by_slot_order = None

    def _overlapping(self, gfn: int, npages: int, skip: Memslot | None) -> Memslot | None:
        # Slots are disjoint: only the last slot (other than `skip`) starting below the end can overlap.
        j = bisect_left(self._bases, gfn + npages) - 1
        if j >= 0 and self._sorted[j] is skip:
            j -= 1
        if j >= 0:
            ms = self._sorted[j]
            if ms.base_gfn + ms.npages > gfn:
                return ms
        return None

    def _unlink(self, ms: Memslot) -> None:
        i = bisect_left(self._bases, ms.base_gfn)
        del self._bases[i]
        del self._sorted[i]

    # -- the host's vmas ---------------------------------------------------------------------------------
    def _map(self, need: int, backing: str) -> HvaWindow:
        npages = _round_hpages(need)
        dev_base = self._dev_range(npages) if backing == "mmio" else None
        w = HvaWindow(self._hva_range(npages), npages, backing, dev_base, None)
        self._window_bases.append(w.base)
        self._windows.append(w)
        return w

    def _remap(self, w: HvaWindow, need: int) -> None:
        """``mremap`` a window that a slot outgrew to a fresh range; a device window gets a new pfn range."""
        self._drop_window(w)
        w.npages = _round_hpages(need)
        w.base = self._hva_range(w.npages)
        if w.dev_base is not None:
            w.dev_base = self._dev_range(w.npages)
        self._window_bases.append(w.base)
        self._windows.append(w)

    def _unmap(self, w: HvaWindow) -> None:
        self._drop_window(w)
        w.slot = None

    def _drop_window(self, w: HvaWindow) -> None:
        i = bisect_left(self._window_bases, w.base)
        del self._window_bases[i]
        del self._windows[i]

    def _hva_range(self, npages: int) -> int:
        base = self._hva_cursor
        self._hva_cursor += (npages << PAGE_SHIFT) + HPAGE_SIZE  # plus a 2 MiB guard gap
        return base

    def _dev_range(self, npages: int) -> int:
        base = self._dev_cursor
        self._dev_cursor += npages
        return base
