"""Historical MMU bugs that ``--bug NAME`` re-creates (docs/kernel.md, Historical bugs). Each is a switch tested
at the exact place in the MMU code where the kernel had it; this table says where it comes from and where it
applies: the MMUs (``mmu``) and kernel variants (``kernels``) whose code path contains the switch."""

from __future__ import annotations

from typing import NamedTuple

from kvmpfn.vocab import KERNELS, MMUS


class Bug(NamedTuple):
    """``text``: the kernel function and commit or release behind it; ``mmu``, ``kernels``: where it applies."""

    text: str
    mmu: tuple[str, ...] = MMUS
    kernels: tuple[str, ...] = KERNELS

    def __str__(self) -> str:
        return self.text


SHADOW = ("shadow",)
V2626 = ("page", "pfn", "pfn-io")  # the kernels without MMU notifiers
PFNMAP = ("pfn-io", "notifier")  # the kernels that map memory without struct page

BUGS: dict[str, Bug] = {
    "pfn-shift-32": Bug("mmu_set_spte: pfn << PAGE_SHIFT in 32 bits (the seed's '[avi: fix overflow ... casts]')"),
    "rmap-wp-hugepage-iter": Bug(
        "rmap_write_protect: 'KVM: MMU: Fix rmap_write_protect() hugepage iteration bug' (6597ca09)", SHADOW
    ),
    "pse32-double-update": Bug(
        "mmu_pte_write_new_pte: both shadow pdes of a 4 MiB guest pde updated from one guess (fixed by v2.6.26)",
        SHADOW,
    ),
    "user-fault-unshadow": Bug("mmu_set_spte: the seed's user-fault mmu_unshadow (gone in v2.6.26)", SHADOW),
    "memslot-delete-no-flush": Bug(
        "kvm_arch_flush_shadow missing on slot deletion: v2.6.26 behaviour under the v2.6.27 kernel",
        MMUS,
        ("notifier",),
    ),
    "unaccount-invalid-root": Bug(
        "kvm_mmu_zap_page: write_count of an invalidated root unaccounted at zap and again at free", SHADOW, V2626
    ),
    "fetch-bailout-parent": Bug(
        "FNAME(fetch): the bail-out leaves a dangling parent link (fixed in v2.6.28 by kvm_mmu_put_page)", SHADOW
    ),
    "large-spte-remove-order": Bug(
        "FNAME(shadow_walk_entry): trap stored before rmap_remove of a large spte (v2.6.28-v2.6.29)", SHADOW
    ),
    "direct-map-into-large": Bug("__direct_map walks into a large spte as a table (fixed in v2.6.32)"),
    "handle-hva-unaligned": Bug(
        "kvm_handle_hva: the 2 MiB rmap index ignores the slot's alignment (v2.6.27 on)", MMUS, ("notifier",)
    ),
    "double-release": Bug(
        "mmu_set_spte and rmap_remove both release: the two refcount models mixed (acb66dd0, v2.6.32)"
    ),
    "cr0wp-user-write": Bug("mmu_set_spte: a CR0.WP=0 supervisor write keeps U on a writable spte", SHADOW),
    "tdp-gpa-32bit": Bug("tdp_page_fault: the gva_t gpa truncated to 32 bits (fixed in 2019, 736c291c)", ("tdp",)),
    "pageless-as-normal": Bug(
        "frames without struct page refcounted like RAM (the CVE-2021-22543 class, f8be156b)", MMUS, PFNMAP
    ),
    "error-pfn-no-release": Bug("fault paths: an error pfn's reference on bad_page never released"),
    "same-pfn-no-release": Bug("mmu_set_spte keeps the duplicate reference when the pfn did not change"),
    "prefetch-no-release": Bug("kvm_mmu_pte_write never releases the update_pte reference it parked", SHADOW),
    "release-clean-writable": Bug("rmap_remove releases a writable spte's frame clean"),
    "no-write-protect": Bug("mmu_set_spte ignores shadowed gfns (no kvm_mmu_lookup_page test)", SHADOW),
    "audit-no-release": Bug("audit_mappings_page: the audit's own gfn_to_pfn reference never released (the seed)"),
    "cr0wp-shared-sp": Bug("kvm_mmu_get_page: shadow pages shared across CR0.WP (fixed in v2.6.35)", SHADOW),
    "sp-access-inherit": Bug("FNAME(fetch): role.access taken from the whole walk (fixed in 2021)", SHADOW),
    "no-rsvd-check": Bug("FNAME(walk_addr) without reserved-bit checks, as in the era", SHADOW),
    "role-ignores-pse-nx": Bug(
        "kvm_mmu_get_page: v2.6.26's kvm_mmu_page_role has no EFER.NX, CR4.PSE, SMEP/SMAP bits, so shadow pages are "
        "shared across a CR4.PSE or EFER.NX change",
        SHADOW,
    ),
    "fetch-large-rmap-remove": Bug(
        "FNAME(fetch): v2.6.26 rmap_removes a large spte in the way without storing trap (turns on "
        "role-ignores-pse-nx, which makes it reachable)",
        SHADOW,
    ),
    "walk-read-unchecked": Bug(
        "FNAME(walk_addr): v2.6.26 ignores kvm_read_guest's return, so a table outside every memslot leaves the "
        "entry above in pte (a read reaches MMIO, a write's D-bit cmpxchg_gpte livelocks; fixed by d6d161b4, "
        "v2.6.33)",
        SHADOW,
    ),
    "dirty-log-pointer-wp": Bug(
        "kvm_mmu_slot_remove_write_access clears W in table pointers too, a livelock (v2.6.26)"
    ),
}
