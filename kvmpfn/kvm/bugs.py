"""Historical MMU bugs that ``--bug NAME`` re-creates (reference §5). Each is a switch tested at the exact place
in the MMU code where the kernel had it; this table names them and cites where they come from."""

BUGS: dict[str, str] = {
    "pfn-shift-32": "§5.2 pfn << PAGE_SHIFT in 32 bits (the seed's '[avi: fix overflow ... adding casts]')",
    "rmap-wp-hugepage-iter": "§5.3 'KVM: MMU: Fix rmap_write_protect() hugepage iteration bug' (6597ca09)",
    "pse32-double-update": "§5.4 both shadow pdes of a 4 MiB guest pde updated from one guess (fixed by v2.6.26)",
    "user-fault-unshadow": "§5.5 the seed's user-fault mmu_unshadow in mmu_set_spte (gone in v2.6.26)",
    "memslot-delete-no-flush": "§5.6 slot deletion leaves sptes (v2.6.26; kvm_arch_flush_shadow in v2.6.27)",
    "unaccount-invalid-root": "§5.7 write_count of invalidated roots unaccounted twice",
    "fetch-bailout-parent": "§5.9 FNAME(fetch) bail-out leaves a dangling parent link (fixed v2.6.28)",
    "large-spte-remove-order": "§5.11 trap stored before rmap_remove of a large spte (v2.6.28-29)",
    "direct-map-into-large": "§5.12 __direct_map walks into a large spte as a table",
    "handle-hva-unaligned": "§5.14 kvm_handle_hva's 2 MiB rmap index ignores slot alignment",
    "double-release": "§5.16 reference released at map time and again in rmap_remove (acb66dd0 model mix)",
    "cr0wp-user-write": "§5.17 CR0.WP=0 supervisor write keeps U on a writable spte",
    "tdp-gpa-32bit": "§5.18 tdp_page_fault's gva_t gpa truncated to 32 bits (fixed 2019, 736c291c)",
    "pageless-as-normal": "§5.19 frames without struct page refcounted (CVE-2021-22543 class)",
    "error-pfn-no-release": "§5.21 an error pfn's bad_page reference not released",
    "same-pfn-no-release": "mmu_set_spte keeps the duplicate reference when the pfn did not change",
    "prefetch-no-release": "kvm_mmu_pte_write never releases the parked update_pte reference",
    "release-clean-writable": "rmap_remove releases a writable spte's frame clean",
    "no-write-protect": "mmu_set_spte ignores shadowed gfns",
    "audit-no-release": "§5.1 the audit's own gfn_to_pfn reference is never released",
    "cr0wp-shared-sp": "shadow pages shared across CR0.WP (fixed in v2.6.35)",
    "sp-access-inherit": "role.access taken from the whole walk (fixed in 2021)",
    "no-rsvd-check": "the era's walker without reserved-bit checks",
    "role-ignores-pse-nx": "v2.6.26 kvm_mmu_page_role without EFER.NX, CR4.PSE, SMEP/SMAP bits: pages shared "
    "across a CR4.PSE or EFER.NX change",
    "fetch-large-rmap-remove": "v2.6.26 FNAME(fetch) rmap_removes a large spte in the way without storing trap "
    "(implies role-ignores-pse-nx, which makes it reachable)",
    "walk-read-unchecked": "v2.6.26 FNAME(walk_addr) ignores kvm_read_guest's return: a table outside every "
    "memslot leaves the entry above in pte (a read reaches MMIO, a write's D-bit cmpxchg_gpte livelocks; "
    "fixed by d6d161b4, v2.6.33)",
    "dirty-log-pointer-wp": "§2.15 kvm_mmu_slot_remove_write_access clears W in table pointers too (a livelock)",
}
