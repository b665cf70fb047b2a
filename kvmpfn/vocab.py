"""kvmpfn's vocabulary, one home for each name: MMUs, kernel variants, paging modes, memslot backings, injected
faults, and the finding codes with their invariant, subject and meaning.

Click choices, the msgspec types of :mod:`kvmpfn.trace.events`, SARIF rules, ``kvmpfn codes`` and the tables of
docs/trace-format.md and docs/kernel.md are derived from it (tests/test_docs.py compares the docs tables with
it). The historical bugs behind ``--bug`` live in :mod:`kvmpfn.kvm.bugs`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

Mmu = Literal["shadow", "tdp"]
Kernel = Literal["page", "pfn", "pfn-io", "notifier"]
PagingMode = Literal["none", "32", "pae", "64"]
Backing = Literal["ram", "hugetlb", "reserved", "mmio"]
FaultKind = Literal["enomem", "gup_fail", "pte_race"]
TdpFlavour = Literal["npt", "ept"]

#: ``--mmu`` and the header's ``mmu``: KVM walks the guest tables (shadow) or the CPU does (EPT/NPT).
MMUS: tuple[str, ...] = get_args(Mmu)
#: ``--kernel`` and the header's ``kernel``, oldest first.
KERNELS: tuple[str, ...] = get_args(Kernel)
#: ``guest.paging``: paging off, 2-level, PAE, 4-level.
PAGING_MODES: tuple[str, ...] = get_args(PagingMode)
#: ``--tdp`` and the header's ``tdp``: the TDP hardware under ``mmu: tdp`` (docs/fidelity.md).
TDPS: tuple[str, ...] = get_args(TdpFlavour)
#: A memslot's ``backing``.
BACKINGS: tuple[str, ...] = get_args(Backing)
#: An ``inject`` event's ``fault``.
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)

#: Every event ``op``, in the order docs/trace-format.md describes them.
OPS: tuple[str, ...] = (
    "access",
    "pf",
    "write",
    "pte_write",
    "cr3",
    "paging",
    "invlpg",
    "memslot",
    "dirty_log",
    "host_remap",
    "inject",
    "audit",
    "teardown",
)


class KernelVariant(NamedTuple):
    """One ``kernel`` value: the kernel it models (``version``, ``commit``) and what it adds to the one before."""

    version: str
    commit: str
    adds: str


#: The kernel variants (docs/kernel.md, Kernel variants).
KERNEL_VARIANTS: dict[str, KernelVariant] = {
    "page": KernelVariant("v2.6.25", "-", "the struct page API: gfn_to_page, kvm_release_page_clean/dirty"),
    "pfn": KernelVariant(
        "v2.6.26-rc (the seed)",
        "35149e21",
        "the pfn API (gfn_to_pfn, kvm_release_pfn_clean/dirty); memory without struct page still gives bad_pfn",
    ),
    "pfn-io": KernelVariant(
        "v2.6.27",
        "2e2e3738",
        "VM_PFNMAP memory mapped by pfn with no reference; refcount operations skip frames without struct page",
    ),
    "notifier": KernelVariant(
        "v2.6.27",
        "e930bffe",
        "MMU notifiers, zap-all on memslot deletion, unaccount at invalidation, last_pte_updated for "
        "speculative sptes only",
    ),
}


#: The invariants the auditor checks, by number, with a title (defined in docs/kernel.md, Invariants).
INVARIANTS: dict[str, str] = {
    "I1": "every KVM reference is owned by a present leaf or in flight",
    "I2": "every present leaf is in exactly one rmap",
    "I3": "pointer sptes and parent lists agree",
    "I4": "shadowed guest page tables are write-protected",
    "I5": "every leaf maps the frame its address translates to",
    "I6": "notrap only where the guest entry is not present",
    "I7": "every leaf lies in a memslot",
    "I8": "write_count counts the shadow pages of each region",
    "I9": "accessed bits of new sptes",
    "I10": "after kvm_unmap_hva no leaf maps the hva",
    "I11": "a leaf grants no more than the guest allows",
    "I12": "guest A/D bits after a successful walk",
    "I13": "shadow-page accounting matches the live pages",
    "I14": "a writable mapping's frame is marked dirty",
}


class Code(NamedTuple):
    """One finding code.

    ``invariant``: the invariant it checks (docs/kernel.md, Invariants), or ``""`` for a progress or recorded-trace
    check; ``subject``: what a finding names; ``short``: one line; ``check``: when it fires; ``recorded``: also
    reported by the checks on recorded kernel traces (``kvmpfn check``).
    """

    invariant: str
    subject: str
    short: str
    check: str
    recorded: bool = False


#: Every finding code, in the order of docs/trace-format.md, Findings.
CODES: dict[str, Code] = {
    "refcount-leak": Code(
        "I1",
        "frame",
        "A reference KVM took on a frame is never released.",
        "At teardown a frame still holds a KVM reference; or, at an audit, a frame holds more KVM references than "
        "present leaf sptes map it plus the references in flight.",
    ),
    "refcount-underflow": Code(
        "I1",
        "frame",
        "KVM releases a reference it does not hold.",
        "A kvm_release_pfn_* or put on a frame where KVM holds no reference.",
    ),
    "pageless-refcount": Code(
        "I1",
        "frame",
        "A refcount, dirty or accessed operation touches a frame without struct page.",
        "A get, release, set-dirty or set-accessed operation on a frame that has no struct page, or one that must "
        "not be refcounted.",
    ),
    "spte-hpa-mismatch": Code(
        "I5",
        "address, level",
        "A present leaf spte maps a frame other than the one its address translates to now.",
        "audit_mappings_page: a present leaf, reached from a root at an address, maps a frame other than the one "
        "the guest translation and the memslots give for that address now.",
    ),
    "spte-pfn-truncated": Code(
        "I5",
        "address, level",
        "The frame number stored in an spte lost high bits.",
        "A present leaf maps the right frame modulo 2^20: the pfn was shifted in 32 bits before it went into the spte.",
    ),
    "notrap-valid-gva": Code(
        "I6",
        "address, level",
        "A notrap leaf where the guest translation is valid.",
        "A leaf holds the notrap value (the guest takes #PF without an exit) although the guest pte it shadows "
        "is present.",
    ),
    "notrap-nonleaf": Code(
        "I6",
        "address, level",
        "A notrap entry above the leaf level whose shadowed guest entry is present.",
        "An entry above the leaf level holds notrap although the guest entry it shadows is present.",
    ),
    "rmap-mismatch": Code(
        "I2",
        "address, level",
        "A present leaf is not in exactly one rmap, or an rmap entry is not a live present leaf.",
        "audit_rmap: a present leaf is in no rmap or in more than one, or an rmap entry points at something that "
        "is not a present leaf of a live shadow page.",
    ),
    "parent-link": Code(
        "I3",
        "address, level",
        "A present non-leaf spte and its child's parent list disagree.",
        "A present pointer spte points at a page whose parent list lacks it, or a parent-list entry does not "
        "point back at the page.",
    ),
    "writable-shadowed-gfn": Code(
        "I4",
        "gfn, level",
        "A writable leaf maps or covers a guest page table that KVM shadows.",
        "audit_write_protection: a writable leaf maps, or a writable large leaf covers, a gfn that a live shadow "
        "page shadows.",
    ),
    "spte-without-memslot": Code(
        "I7",
        "gfn, level",
        "A present leaf maps a gfn that no memslot holds.",
        "A present leaf's gfn lies in no memslot (typically after a slot was deleted without zapping its sptes).",
    ),
    "write-count": Code(
        "I8",
        "slot, 2 MiB region",
        "A region's shadowed-page count disagrees with the live shadow pages in it.",
        "A 2 MiB region's write_count differs from the number of live, valid shadow pages of guest tables in it "
        "(plus one for a region the slot covers only in part).",
    ),
    "spte-permission": Code(
        "I11",
        "address, level",
        "A leaf grants more than the guest translation allows.",
        "A leaf's W, U or NX grants more than the guest translation allows, judged with the CR0.WP of its shadow "
        "page's role; with CR0.WP=0 a supervisor-writable leaf must not keep U.",
    ),
    "mmu-page-accounting": Code(
        "I13",
        "(once)",
        "Shadow-page budget counters disagree with the live pages.",
        "n_alloc - n_free differs from the number of live shadow pages, or the hash holds other pages than the "
        "live ones.",
    ),
    "dirty-lost": Code(
        "I14",
        "frame",
        "A frame written through a writable spte was not marked dirty.",
        "A leaf that had W when it was removed (rmap_remove, or replaced in mmu_set_spte) had its reference "
        "released clean; or rmap_write_protect cleared W without kvm_set_pfn_dirty; or, in a logging slot, a "
        "writable leaf's gfn is missing from the dirty bitmap.",
    ),
    "fault-loop": Code(
        "",
        "address, vcpu",
        "The same address faults again and again with no change in between.",
        "Replay: an access exits to KVM on three attempts in a row although KVM fixed the fault after each. "
        "Recorded traces: at least 8 consecutive faults of one vcpu at one address with no spte set, changed or "
        "zapped for it in between.",
        recorded=True,
    ),
    "notifier-stale-spte": Code(
        "I10",
        "gfn, level",
        "After kvm_unmap_hva a present leaf still maps the gfn behind the hva.",
        "notifier kernel: after kvm_unmap_hva(hva) (invalidate_page, or one page of invalidate_range_start) a "
        "present leaf, 4K or large, still maps the gfn behind hva, whose frame the host is about to free.",
    ),
    "recorded-spte-mismatch": Code(
        "",
        "gfn, level",
        "A recorded kvm_mmu_set_spte installed another frame than the one requested.",
        "A recorded kvm_mmu_set_spte installs a frame other than the one the preceding kvm_mmu_spte_requested of "
        "the same thread asked for (the 2 MiB rounding of large pages allowed).",
        recorded=True,
    ),
    "recorded-spte-pfn-change": Code(
        "",
        "gfn, level",
        "A recorded leaf spte changed frame without going non-present.",
        "A recorded kvm_tdp_mmu_spte_changed moves a present leaf to another frame without a non-present value "
        "in between: the stale-spte pattern.",
        recorded=True,
    ),
    "kernel-bug": Code(
        "",
        "function, spte",
        "The simulated kernel hit a BUG(): the host would have crashed.",
        "A BUG()/BUG_ON() in the modelled kernel code (rmap_remove on an spte it does not hold, __direct_map "
        "walking into a large spte as a table, ...), reachable only under a --bug switch. The replay stops at "
        "that event; the finding names the kernel function and the spte it choked on.",
    ),
}

#: The codes the checks on recorded kernel traces report (:mod:`kvmpfn.audit.recorded`).
RECORDED_CODES: tuple[str, ...] = tuple(name for name, code in CODES.items() if code.recorded)
