"""The host kernel side: struct page by pfn, the allocator behind get_user_pages, memslots, guest memory."""

from kvmpfn.host.errors import HostError
from kvmpfn.host.frames import BAD_PFN, DEFAULT_FIRST_PFN, MMIO_PFN_BASE, Frame, FrameAllocator, pfn_valid
from kvmpfn.host.memory import Host, InvalidateHook, MemoryImage
from kvmpfn.host.memslots import BACKINGS, GFN_LIMIT, HVA_BASE, HvaWindow, Memslot

__all__ = [
    "BACKINGS",
    "BAD_PFN",
    "DEFAULT_FIRST_PFN",
    "GFN_LIMIT",
    "HVA_BASE",
    "MMIO_PFN_BASE",
    "Frame",
    "FrameAllocator",
    "Host",
    "HostError",
    "HvaWindow",
    "InvalidateHook",
    "MemoryImage",
    "Memslot",
    "pfn_valid",
]
