"""The finding codes of TRACE_FORMAT.md "Findings": subject, one-line summary and the check, for reports that
describe a code (SARIF rules, console legends)."""

from __future__ import annotations

from typing import NamedTuple


class Code(NamedTuple):
    """One finding code: ``subject`` (what it names), ``short`` (a one-line summary), ``check`` (the test)."""

    subject: str
    short: str
    check: str


#: Every finding code, in the order of TRACE_FORMAT.md's table.
CODES: dict[str, Code] = {
    "refcount-leak": Code(
        "frame",
        "A reference KVM took on a frame is never released.",
        "A reference KVM took on a frame is never released: at teardown, or at an audit when a frame holds "
        "more KVM references than present leaf sptes that map it plus the references in flight (I1).",
    ),
    "refcount-underflow": Code(
        "frame",
        "KVM releases a reference it does not hold.",
        "KVM releases a reference it does not hold (I1).",
    ),
    "pageless-refcount": Code(
        "frame",
        "A refcount, dirty or accessed operation touches a frame without struct page.",
        "A reference-count, dirty or accessed operation touches a frame that has no struct page, or one that "
        "must not be refcounted (I1).",
    ),
    "spte-hpa-mismatch": Code(
        "address, level",
        "A present leaf spte maps a frame other than the one its address translates to now.",
        "A present leaf spte maps a frame other than the one its address translates to now (audit_mappings_page, I5).",
    ),
    "spte-pfn-truncated": Code(
        "address, level",
        "The frame number stored in an spte lost high bits.",
        "The frame number stored in an spte lost high bits (pfn shifted without widening).",
    ),
    "notrap-valid-gva": Code(
        "address, level",
        "A notrap leaf where the guest translation is valid.",
        "A notrap leaf where the guest translation is valid (I6).",
    ),
    "notrap-nonleaf": Code(
        "address, level",
        "A notrap entry above the leaf level whose shadowed guest entry is present.",
        "A notrap entry above the leaf level whose shadowed guest entry is present (I6).",
    ),
    "rmap-mismatch": Code(
        "address, level",
        "A present leaf is not in exactly one rmap, or an rmap entry is not a live present leaf.",
        "A present leaf is not in exactly one rmap, or an rmap entry points at something that is not a "
        "present leaf of a live shadow page (audit_rmap, I2).",
    ),
    "parent-link": Code(
        "address, level",
        "A present non-leaf spte and its child's parent list disagree.",
        "A present non-leaf spte and its child's parent list disagree (I3).",
    ),
    "writable-shadowed-gfn": Code(
        "gfn, level",
        "A writable leaf maps or covers a guest page table that KVM shadows.",
        "A writable leaf maps, or a writable large leaf covers, a guest page table that KVM shadows "
        "(audit_write_protection, I4).",
    ),
    "spte-without-memslot": Code(
        "gfn, level",
        "A present leaf maps a gfn that no memslot holds.",
        "A present leaf maps a gfn that no memslot holds (I7).",
    ),
    "write-count": Code(
        "slot, 2 MiB region",
        "A region's shadowed-page count disagrees with the live shadow pages in it.",
        "A region's shadowed-page count disagrees with the live shadow pages in it (I8).",
    ),
    "spte-permission": Code(
        "address, level",
        "A leaf grants more than the guest translation allows.",
        "A leaf grants more than the guest translation allows, judged with the CR0.WP of its shadow page's role (I11).",
    ),
    "mmu-page-accounting": Code(
        "(once)",
        "Shadow-page budget counters disagree with the live pages.",
        "Shadow-page budget counters disagree with the live pages (I13).",
    ),
    "dirty-lost": Code(
        "frame",
        "A frame written through a writable spte was not marked dirty.",
        "A leaf that had W when it was removed (rmap_remove, or replaced in mmu_set_spte branch C) had its "
        "reference released clean; or rmap_write_protect cleared W without kvm_set_pfn_dirty; or, in a "
        "logging slot, a writable leaf's gfn is missing from the bitmap (I14).",
    ),
    "fault-loop": Code(
        "address, vcpu",
        "The same address faults again and again with no change in between.",
        "Replay: an access exits to KVM, the fault is fixed, and each retry of the access exits again. "
        "Recorded traces: at least 8 consecutive faults on one vcpu at one address with no spte set, changed "
        "or zapped for it in between (kvmpfn/audit/recorded.py).",
    ),
    "notifier-stale-spte": Code(
        "gfn, level",
        "After kvm_unmap_hva a present leaf still maps the gfn behind the hva.",
        "After kvm_unmap_hva(hva) (all of invalidate_page, one page of invalidate_range_start) a present leaf, "
        "4K or large, still maps the gfn behind hva, whose frame the host is about to free (I10).",
    ),
    "recorded-spte-mismatch": Code(
        "gfn",
        "A recorded kvm_mmu_set_spte installed another frame than the one requested.",
        "A recorded kvm_mmu_set_spte whose frame differs from the pfn that the preceding "
        "kvm_mmu_spte_requested for the same gfn asked for (allowing the 2 MiB rounding of large pages).",
    ),
    "recorded-spte-pfn-change": Code(
        "gfn",
        "A recorded leaf spte changed frame without going non-present.",
        "A kvm_tdp_mmu_spte_changed old/new pair where a present leaf spte changes frame without passing "
        "through a non-present value: the stale-spte pattern.",
    ),
    "kernel-bug": Code(
        "function",
        "The simulated kernel hit a BUG(): the host would have crashed.",
        "A BUG()/BUG_ON() in the modelled kernel code (rmap_remove on an spte it does not hold, __direct_map "
        "walking into a large spte as a table, ...), reachable only under a --bug mutant. The replay stops at "
        "that event; the finding names the kernel function and the spte it choked on.",
    ),
}
