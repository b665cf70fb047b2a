"""The host kernel as KVM sees it: frames, vmas, ``get_user_pages``, guest memory contents, remapping.

mm/memory.c ``get_user_pages`` and ``follow_pfn`` (VM_PFNMAP), mm/hugetlb.c, mm/mmu_notifier.c's
``invalidate_range_start`` point, and the guest-physical accessors of kvm_main.c (``kvm_read_guest``,
``kvm_write_guest``). Every operation is O(1) or O(log slots), apart from a hugetlb remap (at most 512
frames) and an unmap (the window's frames).

What a trace can make the host hold (the costs ``kvmpfn.limits`` counts against ``max_memory``):

- a ``Frame`` per 4 KiB page touched in a ``ram``/``reserved`` window, and per frame KVM referenced or whose
  contents were written anywhere; 4 KiB more for each page whose contents are not zero;
- one entry per 2 MiB block faulted into a ``hugetlb`` window: its 512 frames exist (``frame`` gives them,
  host-mapped) but take no memory until referenced or written;
- pages of the memory image: at most the image's own non-zero pages, plus a read cache of ``PAGE_CACHE``
  pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from kvmpfn.host.errors import HostError
from kvmpfn.host.frames import BAD_PFN, DEFAULT_FIRST_PFN, Frame, FrameAllocator, pfn_valid
from kvmpfn.host.memslots import HvaWindow, Memslot, MemslotTable
from kvmpfn.x86 import KVM_PAGES_PER_HPAGE, PAGE_SHIFT, PAGE_SIZE

_OFFSET_MASK = PAGE_SIZE - 1
_HPAGE_MASK = KVM_PAGES_PER_HPAGE - 1
_ZERO_PAGE = bytes(PAGE_SIZE)
#: pages of contents kept for reads (``Host._page_data``), most of them the frames' own buffers
PAGE_CACHE = 1024

InvalidateHook = Callable[[int, int], None]


class MemoryImage(Protocol):
    """Initial guest-physical contents (e.g. an ELF core): ``read_page(gfn)`` gives 4 KiB or None."""

    def read_page(self, gfn: int) -> bytes | None: ...


def window_pfn(w: HvaWindow, off: int) -> int | None:
    """The RAM pfn faulted in at page ``off`` of ``w``, or None. A hugetlb window maps whole 2 MiB blocks:
    ``w.pages.get(off)`` alone is right for a page offset there only when it is the first of its block."""
    if w.backing == "hugetlb":
        first = w.pages.get(off & ~_HPAGE_MASK)
        return None if first is None else first + (off & _HPAGE_MASK)
    return w.pages.get(off)


class Host:
    """Host frames by pfn, the memslots and vmas behind guest memory, and guest memory contents.

    ``frames`` holds the frames that have state: a hugetlb frame enters it only when KVM references it or its
    contents are written; until then ``frame`` gives a fresh host-mapped frame for it.

    :param first_pfn: the first frame the allocator hands out (trace header ``host.first_pfn``).
    :param memory_image: initial contents of untouched guest pages, looked up by gfn.
    """

    def __init__(self, first_pfn: int = DEFAULT_FIRST_PFN, memory_image: MemoryImage | None = None) -> None:
        self.allocator = FrameAllocator(first_pfn)
        self.frames: dict[int, Frame] = {}
        #: ``pfn >> 9`` of every 2 MiB block a hugetlb window maps (its frames need not be in ``frames``)
        self.huge_blocks: set[int] = set()
        #: frames in ``frames`` whose ``data`` is not None (4 KiB each)
        self.data_pages = 0
        self.memory_image = memory_image
        self._slots = MemslotTable()
        self._invalidate_hooks: list[InvalidateHook] = []
        #: guest pte -> the memoised walks that read it, keyed by its gpa (an 8-byte pte) or gpa | 1 (a 4-byte
        #: one): a store there that does more than set A/D bits passes those walks to ``on_watched_write``
        #: (they are dropped) first
        self.watched: dict[int, set[tuple[int, int]]] = {}
        #: upper-level guest ptes the memoised walks read (same keys): a store there passes None (every walk)
        self.watched_upper: set[int] = set()
        #: gfn -> the page's contents, for reads (a page that reads as zeros is not kept): dropped per gfn when
        #: a frame is installed behind it, and wholly when memslots change or a vma is unmapped
        self._page_data: dict[int, bytes | bytearray] = {}
        self.on_watched_write: Callable[[set[tuple[int, int]] | None], None] | None = None
        # kvm_init: bad_page = alloc_page(GFP_KERNEL | __GFP_ZERO); the allocation's reference is the host's.
        self.bad_pfn = BAD_PFN
        self.frames[BAD_PFN] = Frame(BAD_PFN, host_mapped=True)

    # -- frames -------------------------------------------------------------------------------------------
    def frame(self, pfn: int) -> Frame:
        """``pfn_to_page``: the frame for ``pfn``, created on demand (free RAM, or a device frame)."""
        f = self.frames.get(pfn)
        if f is None:
            f = self.frames[pfn] = Frame(pfn, pfn_valid(pfn), host_mapped=pfn >> 9 in self.huge_blocks)
        return f

    @staticmethod
    def pfn_valid(pfn: int) -> bool:
        """``pfn_valid``: ``pfn`` has a struct page."""
        return pfn_valid(pfn)

    def free_if_unused(self, pfn: int) -> bool:
        """The last ``put_page``: forget a RAM frame that neither the host maps nor KVM references.

        The allocator never reuses a pfn, so a forgotten frame reads back from ``frame()`` as free RAM.
        """
        f = self.frames.get(pfn)
        if f is None or f.count != 0 or f.host_mapped or not f.struct_page or pfn == BAD_PFN:
            return False
        if f.data is not None:
            self.data_pages -= 1
        del self.frames[pfn]
        return True

    def _set_data(self, f: Frame, data: bytes | bytearray | None) -> None:
        """Give the fresh frame ``f`` a copy of ``data`` (a page, or a prefix of one); zeros stay None."""
        if data is None or data == _ZERO_PAGE:
            return
        if f.data is None:
            self.data_pages += 1
        f.data = bytearray(data[:PAGE_SIZE].ljust(PAGE_SIZE, b"\0"))

    # -- memslots ----------------------------------------------------------------------------------------
    def set_memslot(self, slot: int, gfn: int, npages: int, backing: str) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: create, move or resize ``slot``; ``npages`` 0 deletes it.

        :raises HostError: overlap with another slot, deleting an absent slot, negative ``npages``, an
            unknown backing, or a range outside the 52-bit gpa space.
        """
        self._page_data.clear()
        dropped = self._slots.set(slot, gfn, npages, backing)
        if dropped is not None:
            self._unmap_window(dropped)

    @property
    def memslots(self) -> list[Memslot]:
        """The memslots in slot-id order."""
        return self._slots.in_slot_order()

    def memslot(self, slot: int) -> Memslot | None:
        """The memslot with id ``slot``, or None."""
        return self._slots.get(slot)

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """``gfn_to_memslot``: the slot holding ``gfn`` (bisect plus a one-entry cache), or None."""
        return self._slots.gfn_to_memslot(gfn)

    def gfn_to_hva(self, gfn: int) -> int | None:
        """``gfn_to_hva``: the userspace address of ``gfn``; None where the kernel returns ``bad_hva()``."""
        ms = self._slots.gfn_to_memslot(gfn)
        if ms is None:
            return None
        return ms.window.base + ((gfn - ms.window_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int | None:
        """The gfn whose memslot maps ``hva`` (what ``kvm_handle_hva`` computes per slot), or None."""
        w = self._slots.hva_to_window(hva)
        if w is None or w.slot is None:
            return None
        ms = w.slot
        gfn = ms.window_gfn + ((hva - w.base) >> PAGE_SHIFT)
        return gfn if ms.base_gfn <= gfn < ms.base_gfn + ms.npages else None

    def slot_backing(self, gfn: int) -> str | None:
        """The backing of ``gfn``'s slot (``"ram"``, ``"hugetlb"``, ``"reserved"``, ``"mmio"``), or None."""
        ms = self._slots.gfn_to_memslot(gfn)
        return None if ms is None else ms.backing

    def is_hugetlb(self, gfn: int) -> bool:
        """``is_vm_hugetlb_page(find_vma(gfn_to_hva(gfn)))``."""
        ms = self._slots.gfn_to_memslot(gfn)
        return ms is not None and ms.backing == "hugetlb"

    # -- get_user_pages and friends ----------------------------------------------------------------------
    def get_user_pages(self, hva: int) -> int | None:
        """``get_user_pages(.., addr, 1, write=1, force=1, ..)``: the pfn at ``hva``, faulted in if untouched.

        None where it fails: VM_PFNMAP (device) vmas and hvas in no vma. Takes no KVM reference: the caller
        (``gfn_to_pfn``) counts it.
        """
        w = self._slots.hva_to_window(hva)
        if w is None or w.dev_base is not None:
            return None
        off = (hva - w.base) >> PAGE_SHIFT
        pfn = w.pages.get(off)
        if pfn is None:
            pfn = self._fault_in(w, off)
        return pfn

    def follow_pfnmap(self, hva: int) -> int | None:
        """The device pfn of a VM_PFNMAP ``hva`` (``(addr - vm_start) / 4096 + vm_pgoff``), or None."""
        w = self._slots.hva_to_window(hva)
        if w is None or w.dev_base is None:
            return None
        return w.dev_base + ((hva - w.base) >> PAGE_SHIFT)

    def peek_pfn(self, gfn: int) -> int | None:
        """What ``gfn`` maps to now, with no side effect: its frame, its device pfn, or None if untouched."""
        ms = self._slots.gfn_to_memslot(gfn)
        if ms is None:
            return None
        w = ms.window
        off = gfn - ms.window_gfn
        if w.dev_base is not None:
            return w.dev_base + off
        return window_pfn(w, off)

    def _fault_in(self, w: HvaWindow, off: int) -> int:
        """The pfn at page ``off`` of ``w``, which ``w.pages.get(off)`` did not give: anonymous or hugetlb page
        fault, the page (or its 2 MiB block) gets fresh frames, unless its hugetlb block is already there."""
        if w.backing == "hugetlb":
            block = off & ~_HPAGE_MASK
            first = w.pages.get(block)
            if first is not None:
                return first + (off - block)
            first = self.allocator.alloc(KVM_PAGES_PER_HPAGE, KVM_PAGES_PER_HPAGE)
            self._install_block(w, block, first)
            if self.memory_image is not None:
                for i in range(KVM_PAGES_PER_HPAGE):
                    data = self._image_page(w, block + i)
                    if data is not None and data != _ZERO_PAGE:
                        self._set_data(self.frame(first + i), data)
            return first + (off - block)
        pfn = self.allocator.alloc()
        self._install(w, off, pfn, self._image_page(w, off))
        return pfn

    def _install(self, w: HvaWindow, off: int, pfn: int, data: bytes | bytearray | None) -> None:
        f = Frame(pfn, reserved=w.backing == "reserved", host_mapped=True)
        self._set_data(f, data)
        self.frames[pfn] = f
        w.pages[off] = pfn
        if w.slot is not None:
            self._page_data.pop(w.slot.window_gfn + off, None)

    def _install_block(self, w: HvaWindow, block: int, first: int) -> None:
        """Map the 2 MiB block at window offset ``block`` to frames ``first`` .. ``first + 511``."""
        w.pages[block] = first
        self.huge_blocks.add(first >> 9)
        if w.slot is not None and self._page_data:
            gfn = w.slot.window_gfn + block
            for i in range(KVM_PAGES_PER_HPAGE):
                self._page_data.pop(gfn + i, None)

    def _image_page(self, w: HvaWindow, off: int) -> bytes | None:
        ms = w.slot
        if self.memory_image is None or ms is None:
            return None
        gfn = ms.window_gfn + off
        if not ms.base_gfn <= gfn < ms.base_gfn + ms.npages:
            return None
        return self.memory_image.read_page(gfn)

    def _unmap_window(self, w: HvaWindow) -> None:
        """munmap: drop the host's mapping reference of every frame in the window."""
        self._page_data.clear()
        pfns: Iterable[int] = w.pages.values()
        if w.backing == "hugetlb":
            blocks = {first >> 9 for first in pfns}
            self.huge_blocks -= blocks
            if len(blocks) * KVM_PAGES_PER_HPAGE < len(self.frames):
                pfns = [first + i for first in pfns for i in range(KVM_PAGES_PER_HPAGE) if first + i in self.frames]
            else:  # fewer frames with state than frames mapped: look at those
                pfns = [pfn for pfn in self.frames if pfn >> 9 in blocks]
        for pfn in pfns:
            self.frames[pfn].host_mapped = False
            self.free_if_unused(pfn)
        w.pages.clear()

    # -- host_remap: swap-out + swap-in, migration, KSM -------------------------------------------------
    def add_invalidate_hook(self, fn: InvalidateHook) -> None:
        """Register ``fn(hva_start, hva_end)`` (end exclusive), called at ``invalidate_range_start``."""
        self._invalidate_hooks.append(fn)

    def host_remap(self, gfn: int) -> tuple[int | None, int | None]:
        """The host moves the memory behind ``gfn`` to a new frame; returns ``(old_pfn, new_pfn)``.

        The invalidate hooks run first, over the page (hugetlb: its 2 MiB region), while the old frames are
        still mapped; then new frames are allocated, contents copied, and the old frames lose the host's
        mapping reference (freed unless KVM still holds references). An untouched gfn has nothing to move:
        ``(None, None)``. A device pfn never moves: ``(pfn, pfn)``.

        :raises HostError: ``gfn`` is in no memslot.
        """
        ms = self._slots.gfn_to_memslot(gfn)
        if ms is None:
            raise HostError("gfn", f"host_remap of gfn {gfn:#x}, which no memslot holds")
        w = ms.window
        off = gfn - ms.window_gfn
        if w.dev_base is not None:
            return w.dev_base + off, w.dev_base + off
        old_pfn = window_pfn(w, off)
        if old_pfn is None:
            return None, None
        if w.backing != "hugetlb":
            hva = w.base + (off << PAGE_SHIFT)
            for hook in list(self._invalidate_hooks):
                hook(hva, hva + PAGE_SIZE)
            new_pfn = self.allocator.alloc()
            old = self.frames[old_pfn]
            self._install(w, off, new_pfn, old.data)
            old.host_mapped = False
            self.free_if_unused(old_pfn)
            return old_pfn, new_pfn
        block = off & ~_HPAGE_MASK
        old_first = w.pages[block]
        hva_start = w.base + (block << PAGE_SHIFT)
        for hook in list(self._invalidate_hooks):
            hook(hva_start, hva_start + (KVM_PAGES_PER_HPAGE << PAGE_SHIFT))
        first = self.allocator.alloc(KVM_PAGES_PER_HPAGE, KVM_PAGES_PER_HPAGE)
        self.huge_blocks.discard(old_first >> 9)
        self._install_block(w, block, first)
        for i in range(KVM_PAGES_PER_HPAGE):
            stale = self.frames.get(old_first + i)
            if stale is not None:  # a frame with state; the others were never used
                if stale.data is not None and stale.data != _ZERO_PAGE:
                    self._set_data(self.frame(first + i), stale.data)
                stale.host_mapped = False
                self.free_if_unused(stale.pfn)
        return old_pfn, first + (off - block)

    # -- guest-physical memory contents ------------------------------------------------------------------
    def _read_page(self, gfn: int) -> bytes | bytearray | None:
        """The current contents of ``gfn`` without allocating (None: zeros)."""
        data = self._page_data.get(gfn)
        if data is None:
            data = self._page_contents(gfn)
            if data is not None:
                if len(self._page_data) >= PAGE_CACHE:
                    self._page_data.clear()
                self._page_data[gfn] = data
        return data

    def _page_contents(self, gfn: int) -> bytes | bytearray | None:
        ms = self._slots.gfn_to_memslot(gfn)
        if ms is None:
            return None
        w = ms.window
        off = gfn - ms.window_gfn
        if w.dev_base is not None:
            f = self.frames.get(w.dev_base + off)
            return None if f is None else f.data
        pfn = window_pfn(w, off)
        if pfn is not None:
            f = self.frames.get(pfn)
            return None if f is None else f.data
        if self.memory_image is not None:
            return self.memory_image.read_page(gfn)
        return None

    def _write_page(self, gfn: int) -> bytearray | None:
        """The contents of ``gfn`` for a store, faulting the page in; None outside every slot."""
        ms = self._slots.gfn_to_memslot(gfn)
        if ms is None:
            return None
        w = ms.window
        off = gfn - ms.window_gfn
        f: Frame | None
        if w.dev_base is not None:
            f = self.frame(w.dev_base + off)
        else:
            pfn = w.pages.get(off)
            if pfn is None:
                pfn = self._fault_in(w, off)
            f = self.frames.get(pfn)
            if f is None:  # a hugetlb frame without state yet
                f = self.frame(pfn)
        if f.data is None:
            f.data = bytearray(PAGE_SIZE)
            self.data_pages += 1
        return f.data

    def read_guest(self, gpa: int, size: int) -> int:
        """``kvm_read_guest``: ``size`` bytes at ``gpa``, little endian. Never allocates.

        Untouched pages read from ``memory_image`` or as zeros; gpas outside every slot read as zeros.
        """
        off = gpa & _OFFSET_MASK
        if off + size <= PAGE_SIZE:
            data = self._page_data.get(gpa >> PAGE_SHIFT) or self._read_page(gpa >> PAGE_SHIFT)
            return 0 if data is None else int.from_bytes(data[off : off + size], "little")
        return int.from_bytes(self.read_bytes(gpa, size), "little")

    def read_bytes(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at ``gpa`` (may cross pages), without allocating."""
        out = bytearray()
        while n > 0:
            off = gpa & _OFFSET_MASK
            chunk = min(n, PAGE_SIZE - off)
            data = self._read_page(gpa >> PAGE_SHIFT)
            piece = b"" if data is None else data[off : off + chunk]
            out += piece
            out += bytes(chunk - len(piece))
            gpa += chunk
            n -= chunk
        return bytes(out)

    def _watched_store(self, gpa: int, data: bytes | bytearray) -> None:
        """A store of ``data`` at ``gpa``: each watched guest pte it overlaps passes its memoised walks to
        ``on_watched_write`` (an upper-level one: None, every walk), unless the store only sets that entry's A/D
        bits (which never change what a walk answers, and which the walker itself writes)."""
        watched, upper = self.watched, self.watched_upper
        end = gpa + len(data)
        for a in range(gpa & ~7, end, 4):
            for key in (a, a | 1):  # an 8-byte pte at a, a 4-byte one at a
                if key in watched or key in upper:
                    self._store_over_pte(key, gpa, data)

    def _store_over_pte(self, key: int, gpa: int, data: bytes | bytearray) -> None:
        """The store of ``data`` at ``gpa`` against one watched pte (``Host.watched`` key ``key``)."""
        a, esize = key & ~1, 4 if key & 1 else 8
        end = gpa + len(data)
        if a + esize <= gpa:
            return
        old = self.read_bytes(a, esize)
        new = bytearray(old)
        lo, hi = max(gpa, a), min(end, a + esize)
        new[lo - a : hi - a] = data[lo - gpa : hi - gpa]
        was, now = int.from_bytes(old, "little"), int.from_bytes(new, "little")
        if not (was ^ now) & ~0x60 and not was & ~now:
            return  # sets A and/or D, nothing else
        if key in self.watched_upper:
            self.watched_upper.clear()
            walks = None
        else:
            walks = self.watched.pop(key)
        if self.on_watched_write is not None:
            self.on_watched_write(walks)

    def write_bytes(self, gpa: int, data: bytes | bytearray) -> bool:
        """``kvm_write_guest``: store ``data`` at ``gpa``; False if a part fell outside every slot."""
        if self.watched or self.watched_upper:
            self._watched_store(gpa, data)
        ok = True
        pos = 0
        while pos < len(data):
            off = gpa & _OFFSET_MASK
            chunk = min(len(data) - pos, PAGE_SIZE - off)
            buf = self._write_page(gpa >> PAGE_SHIFT)
            if buf is None:
                ok = False
            else:
                buf[off : off + chunk] = data[pos : pos + chunk]
            gpa += chunk
            pos += chunk
        return ok

    def write_guest(self, gpa: int, val: int, size: int) -> bool:
        """Store the low ``size`` bytes of ``val`` at ``gpa``, little endian, faulting the page in.

        Returns False (the store is dropped) outside every slot.
        """
        data = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        off = gpa & _OFFSET_MASK
        if off + size <= PAGE_SIZE:
            if self.watched or self.watched_upper:
                self._watched_store(gpa, data)
            buf = self._write_page(gpa >> PAGE_SHIFT)
            if buf is None:
                return False
            buf[off : off + size] = data
            return True
        return self.write_bytes(gpa, data)

    def cmpxchg_guest(self, gpa: int, size: int, old: int, new: int) -> bool:
        """Compare-and-exchange ``size`` bytes at ``gpa`` (``cmpxchg_gpte``); True if the store happened."""
        if self._slots.gfn_to_memslot(gpa >> PAGE_SHIFT) is None:
            return False
        mask = (1 << (8 * size)) - 1
        if self.read_guest(gpa, size) != old & mask:
            return False
        return self.write_guest(gpa, new, size)
