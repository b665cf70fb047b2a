"""Host physical frames by pfn: ``struct page`` and the frame allocator (mm/page_alloc.c, include/linux/mm.h).

pfn layout (all deterministic):

- ``BAD_PFN`` (0x800): KVM's ``bad_page``, a zeroed RAM frame allocated at ``kvm_init``, outside the guest
  allocator's sequence (the allocator skips it should its range ever reach it);
- ``first_pfn`` (default ``DEFAULT_FIRST_PFN`` = 0x100000, i.e. 4 GiB) upward: RAM handed to guest memory on
  first touch, in touch order; hugetlb takes 512-aligned blocks of 512;
- ``MMIO_PFN_BASE`` (0xF000000, hpa 0xF0_0000_0000) upward: device windows (VM_PFNMAP), frames with no
  struct page. Every pfn below it is RAM with a struct page (``pfn_valid``).
"""

from __future__ import annotations

from kvmpfn.host.errors import HostError

BAD_PFN = 0x800
DEFAULT_FIRST_PFN = 0x100000
MMIO_PFN_BASE = 0xF000000


def pfn_valid(pfn: int) -> bool:
    """``pfn_valid(pfn)``: the frame has a ``struct page`` (RAM, below the device range)."""
    return 0 <= pfn < MMIO_PFN_BASE


class Frame:
    """One host frame: ``struct page`` state, or a device frame without one (``struct_page`` False).

    ``count`` is the references KVM holds (``page_count`` minus the host's own); the host's mapping
    reference is ``host_mapped``. ``data`` is the frame's 4 KiB of contents (None: still zero).
    Differs from the kernel: a hugetlb tail page keeps its own count instead of folding it into the head's.
    """

    __slots__ = ("pfn", "struct_page", "reserved", "count", "dirty", "accessed", "host_mapped", "data")

    def __init__(self, pfn: int, struct_page: bool = True, reserved: bool = False, host_mapped: bool = False):
        self.pfn = pfn
        self.struct_page = struct_page
        self.reserved = reserved
        self.count = 0
        self.dirty = False
        self.accessed = False
        self.host_mapped = host_mapped
        self.data: bytearray | None = None

    def __repr__(self) -> str:
        flags = "".join(
            c
            for c, on in (
                ("S", self.struct_page),
                ("R", self.reserved),
                ("D", self.dirty),
                ("A", self.accessed),
                ("M", self.host_mapped),
            )
            if on
        )
        return f"Frame(pfn={self.pfn:#x}, count={self.count}, flags={flags or '-'})"


class FrameAllocator:
    """The host's page allocator as KVM sees it: a cursor from ``first_pfn`` upward, never reusing a pfn."""

    def __init__(self, first_pfn: int = DEFAULT_FIRST_PFN) -> None:
        if type(first_pfn) is not int or not 0 <= first_pfn < MMIO_PFN_BASE:
            raise HostError("host.first_pfn", f"must be an integer in [0, {MMIO_PFN_BASE:#x})")
        self.first_pfn = first_pfn
        self.next_pfn = first_pfn

    def alloc(self, n: int = 1, align: int = 1) -> int:
        """Take ``n`` contiguous frames whose first pfn is ``align``-aligned; return the first pfn."""
        start = -(-self.next_pfn // align) * align
        if start <= BAD_PFN < start + n:
            start = -(-(BAD_PFN + 1) // align) * align
        if start + n > MMIO_PFN_BASE:
            raise HostError("host.first_pfn", "the host ran out of RAM frames below the device range")
        self.next_pfn = start + n
        return start
