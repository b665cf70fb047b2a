"""KVM's state: ``struct kvm`` (arch part), ``struct kvm_vcpu`` (MMU part), ``struct kvm_mmu_page`` and the
KVM side of a memslot (rmaps, lpage_info, dirty bitmap). Functions that act on it live in mmu.py, rmap.py,
paging.py and pte_write.py, named after their kernel counterparts.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import NoReturn

from kvmpfn.errors import InternalError
from kvmpfn.host import Host
from kvmpfn.kvm.pfn import PfnApi
from kvmpfn.kvm.walker import GuestCpu, GuestWalker
from kvmpfn.x86 import INVALID_PAGE, PT64_ENT_PER_PAGE, PT_ACCESSED_MASK, SHADOW_TRAP_NONPRESENT_PTE

# First pfn of the host pages that hold shadow page tables (``sp->spt``): kernel memory, far from the guest
# RAM allocator (first_pfn, 0x100000 by default) and the mmio windows, and below 2^52 >> 12.
SHADOW_PAGE_FIRST_PFN = 0x40000000
EPT_FAKE_ACCESSED_MASK = 1 << 62  # vmx.h, v2.6.26: VMX_EPT_FAKE_ACCESSED_MASK
EPT_FAKE_DIRTY_MASK = 1 << 63  # vmx.h, v2.6.26: VMX_EPT_FAKE_DIRTY_MASK


def role_word(
    glevels: int, level: int, quadrant: int, metaphysical: int, access: int, invalid: int, cr0_wp: int, ext: int = 0
) -> int:
    """``union kvm_mmu_page_role`` packed as in v2.6.26 (glevels 0-3, level 4-7, quadrant 8-9,
    metaphysical 16, access 17-19, invalid 20). Bit 21 holds ``cr0_wp``, the role bit v2.6.35 added; bits 22-25
    (``ext``) EFER.NX, CR4.PSE, SMEP-and-not-WP and SMAP-and-not-WP, which later kernels also key shadow pages
    on (``role.nxe``, ``role.ext.cr4_pse``, ``smep_andnot_wp``, ``smap_andnot_wp``)."""
    return (
        glevels
        | level << 4
        | quadrant << 8
        | metaphysical << 16
        | access << 17
        | invalid << 20
        | cr0_wp << 21
        | ext << 22
    )


class KvmMmuPage:
    """``struct kvm_mmu_page``: one shadow page table of 512 sptes.

    ``parent_ptes`` holds the upper sptes ``(sp, index)`` that point here; the kernel's single-pointer /
    ``kvm_pte_chain`` encoding (``multimapped``) is a plain list here. ``slot_bitmap`` is a set of slot ids.
    """

    __slots__ = (
        "gfn",
        "role",
        "level",
        "glevels",
        "quadrant",
        "metaphysical",
        "access",
        "cr0_wp",
        "ext",
        "invalid",
        "spt",
        "gfns",
        "parent_ptes",
        "root_count",
        "slot_bitmap",
        "hpa",
        "id",
    )

    def __init__(self, sp_id: int, hpa: int) -> None:
        self.id = sp_id
        self.hpa = hpa  # __pa(sp->spt)
        self.gfn = 0
        self.role = 0
        self.level = 0
        self.glevels = 0
        self.quadrant = 0
        self.metaphysical = 0
        self.access = 0
        self.cr0_wp = 0
        self.ext = 0
        self.invalid = 0
        # MutableSequence, not list: the incremental audit swaps in list subclasses that record stores, and
        # compiled code (docs/architecture.md, Compiled modules) bypasses a list subclass's methods
        self.spt: MutableSequence[int] = [SHADOW_TRAP_NONPRESENT_PTE] * PT64_ENT_PER_PAGE
        self.gfns = [0] * PT64_ENT_PER_PAGE
        self.parent_ptes: MutableSequence[tuple[KvmMmuPage, int]] = []
        self.root_count = 0
        self.slot_bitmap: set[int] = set()

    def set_invalid(self) -> None:
        self.invalid = 1
        self.role |= 1 << 20

    def __repr__(self) -> str:
        return f"<sp#{self.id} gfn={self.gfn:#x} level={self.level} role={self.role:#x}>"


#: an spte's address: the shadow page and the index of the entry in ``sp.spt``
Sptep = tuple[KvmMmuPage, int]
#: an rmap head: one sptep, or the ``kvm_rmap_desc`` chain as a list of descs of up to RMAP_EXT entries
RmapHead = Sptep | list[list[Sptep]]
#: a memoised guest walk (``Vcpu.walk_cache``): gfn, pte_access, dirty, fault bits or None, last pte's watch key
WalkMemo = tuple[int, int, int, int | None, int]
#: ``vcpu->arch.mmu.page_fault`` and ``prefetch_page``, ``new_cr3`` and ``free``
PageFaultFn = Callable[["Vcpu", "Kvm", int, int], int]
VcpuKvmFn = Callable[["Vcpu", "Kvm"], None]


@dataclass(slots=True)
class KvmSlot:
    """The KVM side of ``struct kvm_memory_slot``: ``lpage_info[].write_count`` and the dirty bitmap.

    The per-gfn ``rmap[]`` and ``lpage_info[].rmap_pde`` arrays are kept by gfn in ``Kvm.rmap`` and
    ``Kvm.rmap_pde`` so that, before v2.6.27, the sptes a deleted slot leaves behind stay reachable.
    """

    slot: int
    base_gfn: int
    npages: int
    write_count: dict[int, int] = field(default_factory=dict)  # lpage index -> count
    dirty_bitmap: set[int] | None = None  # gfns; None while dirty logging is off


def no_mmu_context(*_args: object) -> NoReturn:
    """A context hook before ``init_kvm_mmu`` ran: the kernel never calls one (``kvm_mmu_setup`` comes first)."""
    raise InternalError("vcpu used before init_kvm_mmu")


@dataclass(slots=True)
class Vcpu:
    """The MMU part of ``struct kvm_vcpu`` (``vcpu->arch.mmu`` and its neighbours, docs/kernel.md, Roots and CR3)."""

    vcpu_id: int
    cpu: GuestCpu
    root_hpa: int = INVALID_PAGE
    root_level: int = 0
    shadow_root_level: int = 0
    pae_root: list[int] = field(default_factory=lambda: [INVALID_PAGE] * 4)
    page_fault: PageFaultFn = no_mmu_context  # init_kvm_mmu sets these
    gva_to_gpa: Callable[..., int] | None = None
    prefetch_page: Callable[[Vcpu, Kvm, KvmMmuPage], None] = no_mmu_context
    new_cr3: VcpuKvmFn | None = None
    free: VcpuKvmFn | None = None
    last_pt_write_gfn: int = -1
    last_pt_write_count: int = 0
    last_pte_updated: Sptep | None = None
    last_pte_gfn: int = 0
    update_pte_gfn: int = 0
    update_pte_pfn: int = 0
    update_pte_largepage: int = 0
    update_pte_mmu_seq: int = 0
    mmu_reload_requested: bool = False
    # what the last fault decided, for outcome records (the kernel returns only 0/1/-errno)
    fault_mmio: bool = False
    fault_gpa: int | None = None
    fault_err: int | None = None
    fault_walker: GuestWalker | None = None
    fault_ac: bool = False
    # the TDP hardware walk's memo, oldest first: gva page -> (gfn, rights, D, fault bits, last pte's Host.watched key)
    walk_cache: dict[int, WalkMemo] = field(default_factory=dict)

    def begin_fault(self, gpa: int | None) -> None:
        """Forget what the previous fault decided. A method, not four stores in ``kvm_mmu_page_fault``: there
        mypy would narrow ``fault_walker`` to None across the page-fault call, and compiled code trusts that."""
        self.fault_mmio = False
        self.fault_err = None
        self.fault_walker = None
        self.fault_gpa = gpa


class Kvm:
    """The arch part of ``struct kvm`` for the MMU: shadow-page hash and active list, budget, rmaps, slots."""

    def __init__(
        self,
        host: Host,
        api: PfnApi,
        *,
        kernel: str,
        tdp: bool,
        bugs: frozenset[str] = frozenset(),
        tdp_flavour: str = "npt",
    ) -> None:
        self.host = host
        self.api = api
        self.kernel = kernel
        self.notifiers = kernel == "notifier"
        self.tdp_enabled = tdp
        if "fetch-large-rmap-remove" in bugs:
            bugs = bugs | {"role-ignores-pse-nx"}  # the only way a large spte gets in FNAME(fetch)'s way
        #: "npt" (SVM: the x86 pte format) or "ept" (VMX); only meaningful with ``tdp``
        self.tdp_flavour = tdp_flavour
        #: ``shadow_accessed_mask`` (mmu.c): what ``rmap_remove`` tests before ``kvm_set_pfn_accessed``
        self.shadow_accessed_mask = PT_ACCESSED_MASK
        #: the host CPU sets A in the sptes it uses (x86 and NPT tables); EPT had no A/D bits before Haswell
        self.hardware_sets_accessed = not (tdp and tdp_flavour == "ept")
        if tdp and tdp_flavour == "ept":
            # vmx.c: v2.6.26 vmx_create_vcpu sets the fake bit 62 (VMX_EPT_FAKE_ACCESSED_MASK), which nothing
            # ever sets; v2.6.27 hardware_setup sets 0. Either way no EPT spte counts as accessed.
            self.shadow_accessed_mask = EPT_FAKE_ACCESSED_MASK if kernel in ("page", "pfn") else 0
        self.bugs = bugs
        self.mmu_page_hash: dict[int, list[KvmMmuPage]] = {}
        # active_mmu_pages: dict order is list order from tail (first) to head (last)
        self.active_mmu_pages: dict[int, KvmMmuPage] = {}
        self.page_header: dict[int, KvmMmuPage] = {}
        self.n_alloc_mmu_pages = 0
        self.n_free_mmu_pages = 0
        self.n_requested_mmu_pages = 0
        self.rmap: dict[int, RmapHead] = {}
        self.rmap_pde: dict[int, RmapHead] = {}
        self.slots: dict[int, KvmSlot] = {}
        self.vcpus: dict[int, Vcpu] = {}
        self.mmu_notifier_seq = 0
        self.mmu_notifier_count = 0
        self.next_sp_id = 0
        self.inject = {"enomem": 0, "gup_fail": 0, "pte_race": 0}
        self.consumed_failure = False
        self.stat = {
            "mmu_shadow_zapped": 0,
            "mmu_cache_miss": 0,
            "mmu_recycled": 0,
            "mmu_flooded": 0,
            "mmu_pte_write": 0,
            "mmu_pte_updated": 0,
            "mmu_pde_zapped": 0,
            "lpages": 0,
            "remote_tlb_flush": 0,
        }
        # observers (the auditor's ledger): called when an spte takes/drops ownership of its reference
        self.on_rmap_add: Callable[[Sptep, int], None] | None = None  # (sptep, pfn)
        self.on_rmap_remove: Callable[[Sptep, int, int], None] | None = None  # (sptep, pfn, spte)
        # rmap_write_protect: called with None before its 4K loop, then with the frames whose W it cleared
        self.on_write_protect: Callable[[set[int] | None], None] | None = None
        # kvm_unmap_hva: called with (hva, gfn) after each call, so the auditor can check docs/kernel.md, Invariants:
        # I10
        self.on_unmap_hva: Callable[[int, int], None] | None = None
        self.audit_point: Callable[[Vcpu, str], None] | None = (
            None  # kvm_mmu_audit(vcpu, msg) at the kernel's audit points
        )
        # the incremental audit's change tracking: a page allocated (before its first parent link), a page zapped
        self.on_new_page: Callable[[KvmMmuPage], None] | None = None
        self.on_zap_page: Callable[[KvmMmuPage], None] | None = None
        host.on_watched_write = self.drop_walks

    def flush_walk_caches(self) -> None:
        """Forget every memoised guest walk (the memory map changed, or an upper-level guest pte)."""
        for vcpu in self.vcpus.values():
            vcpu.walk_cache.clear()
        self.host.watched.clear()
        self.host.watched_upper.clear()

    def flush_vcpu_walks(self, vcpu: Vcpu) -> None:
        """Forget ``vcpu``'s memoised walks (its paging state changed)."""
        for key in list(vcpu.walk_cache):
            self.forget_walk(vcpu, key)

    def forget_walk(self, vcpu: Vcpu, key: int) -> None:
        """Drop one memoised walk and the watch on the last guest pte it read (``Host.watched``)."""
        entry = vcpu.walk_cache.pop(key, None)
        if entry is None:
            return
        watched = self.host.watched
        walks = watched.get(entry[-1])
        if walks is not None:
            walks.discard((vcpu.vcpu_id, key))
            if not walks:
                del watched[entry[-1]]

    def drop_walks(self, walks: set[tuple[int, int]] | None) -> None:
        """Forget the memoised walks ``{(vcpu_id, key)}`` whose last guest pte was just stored to; None: an upper
        pte, every walk."""
        if walks is None:
            self.flush_walk_caches()
            return
        vcpus = self.vcpus
        for vcpu_id, key in walks:
            vcpu = vcpus.get(vcpu_id)
            if vcpu is not None:
                self.forget_walk(vcpu, key)

    def consume(self, fault: str) -> bool:
        """Take one injected failure of this kind, if any is pending (docs/trace-format.md, inject)."""
        if self.inject[fault]:
            self.inject[fault] -= 1
            self.consumed_failure = True
            return True
        return False
