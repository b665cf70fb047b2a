"""Shadow-page lifetime and VM-wide events (docs/kernel.md, Fault paths: Zapping and recycling to Teardown): zapping,
recycling under a budget, roots, teardown, memslot deletion, dirty logging and host remapping, in each kernel variant.
"""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import (
    DEFAULT_SLOTS,
    KERNELS,
    MMUS,
    V2626,
    P,
    W,
    make_paged_vm,
    make_vm,
)

from kvmpfn.host import BAD_PFN, MMIO_PFN_BASE
from kvmpfn.kvm.mmu import (
    kvm_mmu_change_mmu_pages,
    kvm_mmu_free_some_pages,
    kvm_mmu_get_page,
    kvm_mmu_lookup_page,
    kvm_mmu_unload,
    kvm_mmu_zap_page,
    page_header,
)
from kvmpfn.kvm.spte import TRAP, is_large_pte, spte_to_pfn
from kvmpfn.trace import events as ev
from kvmpfn.x86 import ACC_ALL, INVALID_PAGE, KVM_MIN_FREE_MMU_PAGES, KVM_REFILL_PAGES

GFN = 0x5
LARGE_GFN = 0x800
SLOT4 = (4, 0x2000, 0x200, "ram")


def wc(vm, slot: int = 0, idx: int = 0) -> int:
    return vm.kvm.slots[slot].write_count.get(idx, 0)


# --- zapping ----------------------------------------------------------------------------------------------


def test_zap_page_unlinks_parents_releases_large_leaves_and_orphans_children(vm):
    kvm = vm.kvm
    for addr in (0x5000, 0x6000, 0x205000, 0x800000):
        vm.access(addr, write=True)
    path, _ = vm.walk(0x5000)
    (l3, l3i), (l2, _), (a, ai) = path[1], path[2], path[3]
    b = vm.leaf(0x205000)[0]
    base = vm.pfn(LARGE_GFN)
    small = [vm.pfn(g) for g in (0x5, 0x6, 0x205)]
    assert l2.level == 2 and vm.leaf(0x800000) == (l2, 4) and vm.count(base) == 1
    free, zapped, pages = kvm.n_free_mmu_pages, kvm.stat["mmu_shadow_zapped"], len(kvm.active_mmu_pages)
    vm.log.clear()

    kvm_mmu_zap_page(kvm, l2)

    assert l3.spt[l3i] == TRAP  # the parent entry: a pointer owns no reference
    assert l2.id not in kvm.active_mmu_pages and kvm.n_free_mmu_pages == free + 1
    assert kvm.stat["mmu_shadow_zapped"] == zapped + 1 and len(kvm.active_mmu_pages) == pages - 1
    assert vm.count(base) == 0 and kvm.stat["lpages"] == 0 and not kvm.rmap_pde
    assert vm.log == [
        ("accessed", base, "kvm_set_pfn_accessed", "rmap_remove"),
        ("dirty", base, "kvm_release_pfn_dirty", "rmap_remove"),
        ("put", base, "kvm_release_pfn_dirty", "rmap_remove"),
    ]
    # the level-1 children are orphaned, not zapped: they keep their leaves and references
    for child in (a, b):
        assert child.id in kvm.active_mmu_pages and child.parent_ptes == []
    assert spte_to_pfn(a.spt[ai]) == small[0]
    assert [vm.count(p) for p in small] == [1, 1, 1]
    assert vm.referenced() == vm.leaf_pfns() and vm.accounting_ok()

    # the next fault finds the orphan again by its hash key and relinks it (branch D: no new reference)
    assert vm.access(0x5000, write=True)["result"] == "mapped"
    assert vm.leaf(0x5000) == (a, ai) and len(a.parent_ptes) == 1
    assert [vm.count(p) for p in small] == [1, 1, 1]


def test_zap_root_marks_it_invalid_and_the_next_entry_frees_it(vm):
    kvm, vcpu = vm.kvm, vm.vcpu
    vm.access(0x5000, write=True)
    root = page_header(kvm, vcpu.root_hpa)
    l3 = vm.walk(0x5000)[0][1][0]
    assert root.root_count == 1 and next(iter(kvm.active_mmu_pages)) == root.id  # the tail: oldest
    free = kvm.n_free_mmu_pages
    kvm_mmu_zap_page(kvm, root)
    assert root.invalid and root.role & 1 << 20 and root.id in kvm.active_mmu_pages
    assert list(kvm.active_mmu_pages)[-1] == root.id  # moved to the head
    assert kvm.n_free_mmu_pages == free and vcpu.mmu_reload_requested
    assert l3.parent_ptes == [] and all(e == TRAP for e in root.spt)
    assert vm.count(vm.pfn(GFN)) == 1  # the leaf, two levels down, is untouched

    rec = vm.access(0x5000)
    assert rec["result"] == "mapped"  # a new root; the orphaned level-3 page is found again
    assert root.id not in kvm.active_mmu_pages and kvm.n_free_mmu_pages <= free + 1
    new_root = page_header(kvm, vcpu.root_hpa)
    assert new_root is not root and new_root.root_count == 1 and not new_root.invalid
    assert vm.walk(0x5000)[0][1][0] is l3
    assert vm.count(vm.pfn(GFN)) == 1 and vm.accounting_ok()


@pytest.mark.parametrize("kernel", KERNELS)
def test_unaccount_shadowed_of_a_zapped_root(kernel):
    """v2.6.26 unaccounts when the page is freed; v2.6.27 (``notifier``) when it is zapped, once."""
    vm = make_vm(kernel)
    kvm = vm.kvm
    sp = kvm_mmu_get_page(vm.vcpu, kvm, GFN, 0, 1, 0, ACC_ALL, None)
    sp.root_count = 1  # in use as a root by some vcpu
    assert wc(vm) == 1
    kvm_mmu_zap_page(kvm, sp)
    assert sp.invalid and sp.id in kvm.active_mmu_pages
    assert kvm_mmu_lookup_page(kvm, GFN) is None  # invalid pages do not write-protect
    assert wc(vm) == (0 if kernel == "notifier" else 1)
    sp.root_count = 0
    kvm_mmu_zap_page(kvm, sp)
    assert sp.id not in kvm.active_mmu_pages and wc(vm) == 0


def test_unaccount_invalid_root_bug_unaccounts_twice():
    vm = make_vm("pfn", bugs={"unaccount-invalid-root"})
    sp = kvm_mmu_get_page(vm.vcpu, vm.kvm, GFN, 0, 1, 0, ACC_ALL, None)
    sp.root_count = 1
    kvm_mmu_zap_page(vm.kvm, sp)
    assert wc(vm) == 0
    sp.root_count = 0
    kvm_mmu_zap_page(vm.kvm, sp)
    assert wc(vm) == -1


def test_zap_of_a_non_root_shadow_page_unaccounts_and_unprotects(vm):
    kvm = vm.kvm
    sp = kvm_mmu_get_page(vm.vcpu, kvm, GFN, 0, 1, 0, ACC_ALL, None)
    assert wc(vm) == 1 and kvm_mmu_lookup_page(kvm, GFN) is sp
    kvm_mmu_zap_page(kvm, sp)
    assert wc(vm) == 0 and kvm_mmu_lookup_page(kvm, GFN) is None and GFN not in kvm.mmu_page_hash


# --- recycling and budgets --------------------------------------------------------------------------------


def budget_vm(n: int, npages: int = 0x8000, mmu: str = "tdp"):
    vm = make_vm(mmu=mmu, memslots=[(0, 0, npages, "ram")])
    kvm = vm.kvm
    kvm.n_requested_mmu_pages = n  # KVM_SET_NR_MMU_PAGES: no recomputation on memslot changes
    kvm_mmu_change_mmu_pages(kvm, n)
    assert kvm.n_alloc_mmu_pages == n and kvm.n_free_mmu_pages == n and vm.accounting_ok()
    return vm


def test_recycle_under_a_tiny_budget_zaps_from_the_tail():
    vm = budget_vm(30)
    kvm = vm.kvm
    recycles = orphans_seen = 0
    for k in range(60):  # one new level-1 page per 2 MiB region
        order = list(kvm.active_mmu_pages)  # tail (oldest) first
        invalid = {i for i, sp in kvm.active_mmu_pages.items() if sp.invalid}
        free_before = kvm.n_free_mmu_pages
        recycled = kvm.stat["mmu_recycled"]
        rec = vm.access(k << 21, write=True)
        assert rec["result"] == "mapped" and rec["pfn"] == hex(vm.pfn(k << 9))
        assert vm.accounting_ok()
        assert vm.referenced() == vm.leaf_pfns()  # every reference is owned by exactly one live leaf
        n = kvm.stat["mmu_recycled"] - recycled
        new = [i for i in kvm.active_mmu_pages if i not in order]
        if not n:
            assert free_before >= KVM_MIN_FREE_MMU_PAGES
            continue
        recycles += 1
        assert free_before < KVM_MIN_FREE_MMU_PAGES
        for i in order[:n]:  # exactly the n oldest pages were zapped: freed, or (a root) invalid at the head
            assert i not in kvm.active_mmu_pages or kvm.active_mmu_pages[i].invalid
        for i in order[n:]:  # younger pages survive (an invalid root is freed by the vcpu's reload)
            assert i in kvm.active_mmu_pages or i in invalid
        assert kvm.n_free_mmu_pages + len(new) >= KVM_REFILL_PAGES
        orphans_seen += sum(
            1 for sp in kvm.active_mmu_pages.values() if sp.level < 4 and not sp.parent_ptes and not sp.root_count
        )
    assert recycles >= 2 and orphans_seen > 0
    assert kvm.stat["mmu_recycled"] > 0 and len(kvm.active_mmu_pages) <= 30
    vm.teardown()
    assert vm.referenced() == {}


def test_free_some_pages_zaps_exactly_the_oldest_until_25_are_free():
    vm = budget_vm(40)
    kvm = vm.kvm
    k = 0
    while kvm.n_free_mmu_pages >= KVM_MIN_FREE_MMU_PAGES:
        vm.access(k << 21, write=True)
        k += 1
    assert kvm.stat["mmu_recycled"] == 0 and k == 33
    kvm_mmu_unload(vm.vcpu, kvm)  # no roots: every page can be freed
    free = kvm.n_free_mmu_pages
    order = list(kvm.active_mmu_pages)
    kvm_mmu_free_some_pages(vm.vcpu, kvm)
    assert kvm.n_free_mmu_pages == KVM_REFILL_PAGES
    assert list(kvm.active_mmu_pages) == order[KVM_REFILL_PAGES - free :]
    assert kvm.stat["mmu_recycled"] == KVM_REFILL_PAGES - free
    assert vm.referenced() == vm.leaf_pfns() and vm.accounting_ok()
    # orphaned level-1 pages survived with their leaves
    assert all(not sp.parent_ptes for sp in kvm.active_mmu_pages.values())
    assert len(vm.leaves()) == len(kvm.active_mmu_pages)
    # enough free pages: nothing happens
    kvm_mmu_free_some_pages(vm.vcpu, kvm)
    assert kvm.stat["mmu_recycled"] == KVM_REFILL_PAGES - free


def test_free_some_pages_zaps_past_the_four_pae_roots_at_the_tail():
    """Paging off under shadow: four level-2 roots (docs/kernel.md, nonpaging_map and tdp_page_fault), allocated first,
    sit at the tail. The kernel's loop zaps them (each turns invalid and moves to the head, freeing nothing) and goes on
    with the next oldest pages until 25 are free (docs/kernel.md, Zapping and recycling)."""
    vm = budget_vm(40, mmu="shadow")
    kvm = vm.kvm
    k = 0
    while kvm.n_free_mmu_pages >= KVM_MIN_FREE_MMU_PAGES:
        vm.access(k << 21, write=True)
        k += 1
    assert kvm.stat["mmu_recycled"] == 0
    free = kvm.n_free_mmu_pages
    order = list(kvm.active_mmu_pages)
    roots = order[:4]
    assert all(kvm.active_mmu_pages[i].root_count == 1 for i in roots)
    assert not any(kvm.active_mmu_pages[i].root_count for i in order[4:])
    kvm_mmu_free_some_pages(vm.vcpu, kvm)
    assert kvm.n_free_mmu_pages == KVM_REFILL_PAGES
    assert list(kvm.active_mmu_pages) == order[4 + KVM_REFILL_PAGES - free :] + roots
    assert all(kvm.active_mmu_pages[i].invalid for i in roots)
    assert vm.accounting_ok() and vm.referenced() == vm.leaf_pfns()


def test_change_mmu_pages_shrinks_from_the_tail_then_grows():
    vm = make_vm(memslots=[(0, 0, 0x8000, "ram")])
    kvm = vm.kvm
    for k in range(6):
        vm.access(k << 21, write=True)
    kvm_mmu_unload(vm.vcpu, kvm)
    order = list(kvm.active_mmu_pages)
    assert len(order) == 9  # root, level 3, level 2, six level-1 pages
    kvm_mmu_change_mmu_pages(kvm, 5)
    assert list(kvm.active_mmu_pages) == order[4:]
    assert kvm.n_alloc_mmu_pages == 5 and kvm.n_free_mmu_pages == 0 and vm.accounting_ok()
    assert len(vm.referenced()) == 5 and vm.referenced() == vm.leaf_pfns()
    kvm_mmu_change_mmu_pages(kvm, 64)
    assert kvm.n_alloc_mmu_pages == 64 and kvm.n_free_mmu_pages == 59 and vm.accounting_ok()


def test_change_mmu_pages_counts_a_zapped_root_as_freed():
    """docs/kernel.md, Zapping and recycling: the shrink loop counts each zap as one freed page; a root is not freed (it
    turns invalid and moves to the head), so one page more than the budget stays live and ``n_free`` is reset to 0."""
    vm = make_vm(memslots=[(0, 0, 0x8000, "ram")])
    kvm = vm.kvm
    for k in range(6):
        vm.access(k << 21, write=True)
    root = page_header(kvm, vm.vcpu.root_hpa)
    kvm_mmu_change_mmu_pages(kvm, 5)
    assert root.invalid and root.id in kvm.active_mmu_pages
    assert len(kvm.active_mmu_pages) == 6 and kvm.n_alloc_mmu_pages - kvm.n_free_mmu_pages == 5


def test_default_budget_follows_memslots():
    vm = make_vm(memslots=[(0, 0, 0x10000, "ram")])  # 65536 pages: 2% = 1310
    assert vm.kvm.n_alloc_mmu_pages == 1310 and vm.kvm.n_free_mmu_pages == 1310
    vm.memslot(1, 0x10000, 0x10000)
    assert vm.kvm.n_alloc_mmu_pages == 2621 and vm.accounting_ok()
    vm = make_vm(memslots=[(0, 0, 0x100, "ram")])
    assert vm.kvm.n_alloc_mmu_pages == 64  # KVM_MIN_ALLOC_MMU_PAGES


# --- roots --------------------------------------------------------------------------------------------------


def test_tdp_root_is_one_metaphysical_level4_page_kept_across_unload(vm):
    kvm, vcpu = vm.kvm, vm.vcpu
    assert vcpu.root_hpa == INVALID_PAGE and not kvm.active_mmu_pages
    vm.access(0x5000)
    root = page_header(kvm, vcpu.root_hpa)
    assert (root.level, root.metaphysical, root.gfn, root.root_count) == (4, 1, 0, 1)
    misses = kvm.stat["mmu_cache_miss"]
    kvm_mmu_unload(vcpu, kvm)
    assert vcpu.root_hpa == INVALID_PAGE and root.root_count == 0 and not root.invalid
    assert root.id in kvm.active_mmu_pages
    assert vm.access(0x5000)["result"] == "hit"  # the same root found again: the tree is intact
    assert page_header(kvm, vcpu.root_hpa) is root and root.root_count == 1
    assert kvm.stat["mmu_cache_miss"] == misses


def test_nonpaging_roots_are_four_pae_shaped_level2_pages():
    vm = make_vm(mmu="shadow")
    kvm, vcpu = vm.kvm, vm.vcpu
    vm.access(0x5000)
    assert vcpu.shadow_root_level == 3 and vcpu.root_level == 0
    roots = [page_header(kvm, vcpu.pae_root[i]) for i in range(4)]
    assert [r.quadrant for r in roots] == [0, 1, 2, 3]
    assert all((r.gfn, r.level, r.metaphysical, r.root_count) == (0, 2, 1, 1) for r in roots)
    assert vcpu.pae_root == [r.hpa << 12 | P for r in roots]
    assert vm.walk(0x5000)[0][0] == (roots[0], 0)
    kvm_mmu_unload(vcpu, kvm)
    assert vcpu.pae_root == [INVALID_PAGE] * 4 and all(r.root_count == 0 for r in roots)
    assert vm.access(0x5000)["result"] == "hit"  # the same four roots found again
    assert all(r.root_count == 1 for r in roots) and vm.vcpu.pae_root == [r.hpa << 12 | P for r in roots]


def test_shadow_cr3_reload_of_the_same_cr3_is_a_tlb_flush_only():
    """kvm_set_cr3 (v2.6.26): the same CR3 with unchanged PDPTEs keeps the roots."""
    vm = make_paged_vm(maps=[(0, 512)])
    kvm, vcpu = vm.kvm, vm.vcpu
    assert vm.access(0x5000, write=True)["result"] == "mapped"
    root_hpa = vcpu.root_hpa
    assert vm.apply(ev.Cr3(val=vm.tables.cr3)) == {"result": "ok"}
    assert vcpu.root_hpa == root_hpa and page_header(kvm, root_hpa).root_count == 1


def test_shadow_cr3_load_frees_roots_but_keeps_pages():
    vm = make_paged_vm(maps=[(0, 512)])
    kvm, vcpu = vm.kvm, vm.vcpu
    assert vm.access(0x5000, write=True)["result"] == "mapped"
    root = page_header(kvm, vcpu.root_hpa)
    assert (root.level, root.metaphysical, root.gfn) == (4, 0, vm.tables.cr3 >> 12)
    pages, misses = dict(kvm.active_mmu_pages), kvm.stat["mmu_cache_miss"]
    assert vm.apply(ev.Cr3(val=vm.tables.cr3 | 0x8)) == {"result": "ok"}  # PWT: another CR3, the same table
    assert vcpu.root_hpa == INVALID_PAGE and root.root_count == 0
    assert kvm.active_mmu_pages == pages
    assert vm.access(0x5000, write=True)["result"] == "hit"
    assert kvm.stat["mmu_cache_miss"] == misses and root.root_count == 1


# --- teardown -------------------------------------------------------------------------------------------


def mixed_workload(vm) -> None:
    """4K reads/writes/fetches, large pages, reserved and mmio frames, a guest pte rewrite, host remap, dirty
    logging, injected failures, a memslot deletion and a cr3 reload."""
    results = []
    for i in range(8):
        results.append(vm.access(0x10000 + (i << 12), write=bool(i & 1), user=bool(i & 2), fetch=i == 4))
    results.append(vm.access(0x805000, write=True))
    results.append(vm.access(0xA00000))
    results.append(vm.access(0x1000000, write=True))
    results.append(vm.access(0x1001000))
    results.append(vm.access(0xFE000000))
    results.append(vm.access(0xFE001000, write=True))
    results.append(vm.access(0x2000000, write=True))
    pte = vm.tables.map(0x10000, 0x30000)  # the guest rewrites a pte in place ...
    vm.apply(ev.Write(gpa=pte, val=0x30000 | 0x7, len=8))  # ... and the store is seen by KVM
    results.append(vm.access(0x10000, write=True))
    vm.host_remap(0x11)
    results.append(vm.access(0x11000, write=True))
    vm.dirty_log(0)
    results.append(vm.access(0x12000, write=True))
    vm.dirty_log(0, stop=True)
    vm.inject("gup_fail")
    results.append(vm.access(0x18000))
    vm.inject("enomem")
    results.append(vm.access(0x19000))
    vm.memslot(4, 0x2000, 0)
    results.append(vm.access(vm.tables.tables[-1] << 12, write=True))  # a guest page table
    vm.apply(ev.Cr3(val=vm.tables.cr3))
    results.append(vm.access(0x15000, write=True))
    kinds = Counter(r["result"] for r in results)
    assert kinds["mapped"] >= 10 and kinds["error"] == 2


MAPS = [(0, 512), (0x800000, None), (0xA00000, None), (0x1000000, 16), (0xFE000000, 16), (0x2000000, 16)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mmu", MMUS)
def test_teardown_returns_every_frame_to_zero_references(kernel, mmu):
    vm = make_paged_vm(kernel, mmu, memslots=DEFAULT_SLOTS + (SLOT4,), maps=MAPS)
    mixed_workload(vm)
    held = vm.referenced()
    assert len(held) >= 2 and held == {p: n for p, n in vm.leaf_pfns().items() if p < MMIO_PFN_BASE}
    assert all(count == 1 for count in held.values())
    vm.teardown()
    assert vm.referenced() == {}
    assert all(f.count == 0 for f in vm.host.frames.values())
    touched = {c[1] for c in vm.log}
    assert all(vm.count(pfn) == 0 for pfn in touched)
    gets = Counter(c[1] for c in vm.log if c[0] == "get")
    puts = Counter(c[1] for c in vm.log if c[0] == "put")
    assert gets == puts and len(gets) >= 10
    kvm = vm.kvm
    assert not kvm.active_mmu_pages and not kvm.rmap and not kvm.rmap_pde and not kvm.mmu_page_hash
    assert kvm.n_free_mmu_pages == kvm.n_alloc_mmu_pages
    with pytest.raises(Exception, match="after teardown"):
        vm.access(0x10000)


@pytest.mark.parametrize("kernel", KERNELS)
def test_reserved_frames_are_refcounted_but_never_dirtied(kernel):
    vm = make_vm(kernel)
    gfn = 0x1003
    rec = vm.access(gfn << 12, write=True)
    pfn = vm.pfn(gfn)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(pfn)
    frame = vm.host.frames[pfn]
    assert frame.reserved and frame.count == 1
    vm.teardown()
    assert frame.count == 0 and not frame.dirty
    assert [c[0] for c in vm.ops(pfn=pfn)] == ["get", "accessed", "put"]  # release_dirty: no "dirty"


# --- memslot deletion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", V2626)
@pytest.mark.parametrize("mmu", MMUS)
def test_memslot_delete_before_notifiers_leaves_sptes_and_references(kernel, mmu):
    vm = make_vm(kernel, mmu, memslots=DEFAULT_SLOTS + (SLOT4,))
    kvm = vm.kvm
    gpa = 0x2005000
    vm.access(gpa, write=True)
    vm.access(0x5000, write=True)
    pfn, other = vm.pfn(0x2005), vm.pfn(GFN)
    frame = vm.host.frames[pfn]
    sptep = vm.leaf(gpa)
    vm.log.clear()
    assert vm.memslot(4, 0x2000, 0) == {"result": "ok"}
    assert vm.log == [] and 4 not in kvm.slots
    assert frame.count == 1 and not frame.host_mapped and vm.host.frames[pfn] is frame
    assert vm.leaf(gpa) == sptep and spte_to_pfn(sptep[0].spt[sptep[1]]) == pfn
    assert not sptep[0].spt[sptep[1]] & W  # slot_remove_write_access ran for the slot id
    assert kvm.rmap[0x2005] == sptep
    assert vm.count(other) == 1
    rec = vm.access(gpa)  # the stale spte still translates
    assert rec["result"] == "hit" and rec["pfn"] == hex(pfn)
    rec = vm.access(gpa, write=True)  # a write faults: no slot now, so mmio
    assert rec == {"result": "mmio", "gpa": hex(gpa), "set_accessed": []}
    assert frame.count == 1 and vm.count(BAD_PFN) == 0
    vm.teardown()
    assert frame.count == 0 and pfn not in vm.host.frames and vm.referenced() == {}


@pytest.mark.parametrize("mmu", MMUS)
def test_memslot_delete_with_notifier_zaps_all(mmu):
    vm = make_vm("notifier", mmu, memslots=DEFAULT_SLOTS + (SLOT4,))
    kvm = vm.kvm
    vm.access(0x2005000, write=True)
    vm.access(0x5000, write=True)
    pfn, other = vm.pfn(0x2005), vm.pfn(GFN)
    frame = vm.host.frames[pfn]
    vm.log.clear()
    vm.memslot(4, 0x2000, 0)
    assert frame.count == 0 and pfn not in vm.host.frames  # released, then freed by the unmap
    assert vm.count(other) == 0 and vm.host.frames[other].host_mapped  # every leaf of the VM went
    assert sorted(c[1] for c in vm.ops("put")) == sorted([pfn, other])
    assert vm.leaves() == [] and not kvm.rmap and not kvm.rmap_pde
    assert all(sp.invalid and sp.root_count for sp in kvm.active_mmu_pages.values())  # only the roots stay
    assert vm.access(0x2005000)["result"] == "mmio"
    rec = vm.access(0x5000)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(other) and vm.count(other) == 1
    assert vm.accounting_ok()


# --- dirty logging --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmu", MMUS)
def test_dirty_log_removes_write_access_and_fills_the_bitmap(mmu):
    vm = make_vm(mmu=mmu)
    kvm = vm.kvm
    vm.access(0x5000, write=True)
    vm.access(0x6000)  # a read fault: the direct map still makes the spte writable
    pfn = vm.pfn(GFN)
    a, b = vm.leaf(0x5000), vm.leaf(0x6000)
    assert a[0].spt[a[1]] & W and b[0].spt[b[1]] & W and kvm.slots[0].dirty_bitmap is None
    vm.log.clear()
    assert vm.dirty_log(0) == {"result": "ok"}
    assert kvm.slots[0].dirty_bitmap == set()
    assert not a[0].spt[a[1]] & W and not b[0].spt[b[1]] & W
    assert vm.log == [] and vm.count(pfn) == 1 and kvm.rmap[GFN] == a  # no release, no rmap change
    assert vm.access(0x6000)["result"] == "hit"  # reads still hit
    rec = vm.access(0x5000, write=True)  # the write faults (branch D) and sets the bit
    assert rec["result"] == "mapped" and int(rec["spte"], 16) & W
    assert kvm.slots[0].dirty_bitmap == {GFN} and vm.count(pfn) == 1
    assert vm.log[-1] == ("put", pfn, "kvm_release_pfn_clean", "mmu_set_spte")  # old spte was read-only
    assert vm.apply(ev.Write(gpa=0x7008, val=1, len=8)) == {"result": "ok"}  # a plain store
    assert vm.apply(ev.Write(gpa=0x900000, val=1, len=8)) == {"result": "ok"}  # another slot: not logged
    assert kvm.slots[0].dirty_bitmap == {GFN, 0x7}
    vm.dirty_log(0)
    assert kvm.slots[0].dirty_bitmap == set() and not a[0].spt[a[1]] & W
    vm.dirty_log(0, stop=True)
    assert kvm.slots[0].dirty_bitmap is None
    vm.access(0x5000, write=True)
    assert kvm.slots[0].dirty_bitmap is None and a[0].spt[a[1]] & W


@pytest.mark.parametrize("bugs", [(), ("dirty-log-pointer-wp",)])
def test_dirty_log_clears_w_in_the_leaves_of_a_page_with_the_slot_bit(bugs):
    """docs/kernel.md, Dirty logging: the leaves of a page holding a large leaf of the logged slot lose W; its pointer
    entries keep it (later kernels), or lose it too under the era's ``dirty-log-pointer-wp``."""
    vm = make_vm(bugs=bugs)
    vm.access(0x5000, write=True)
    vm.access(LARGE_GFN << 12, write=True)
    l2, li = vm.leaf(LARGE_GFN << 12)
    path, _ = vm.walk(0x5000)
    assert path[2] == (l2, 0) and not is_large_pte(l2.spt[0]) and l2.spt[0] & W
    assert l2.slot_bitmap == {1}
    leaf = path[3]
    vm.dirty_log(1)
    assert not l2.spt[li] & W
    assert bool(l2.spt[0] & W) == (not bugs)
    assert leaf[0].spt[leaf[1]] & W  # a page without the slot bit keeps its W
    assert vm.kvm.slots[1].dirty_bitmap == set() and vm.kvm.slots[0].dirty_bitmap is None


# --- host remap -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", V2626)
@pytest.mark.parametrize("mmu", MMUS)
def test_host_remap_without_notifier_keeps_the_old_frame(kernel, mmu):
    vm = make_vm(kernel, mmu)
    vm.access(0x5000, write=True)
    old = vm.pfn(GFN)
    frame = vm.host.frames[old]
    vm.log.clear()
    assert vm.host_remap(GFN) == {"result": "ok"}
    new = vm.pfn(GFN)
    assert new != old and vm.count(new) == 0 and vm.log == []
    assert frame.count == 1 and not frame.host_mapped and vm.host.frames[old] is frame  # alive for KVM only
    rec = vm.access(0x5000, write=True)
    assert rec["result"] == "hit" and rec["pfn"] == hex(old)
    vm.teardown()
    assert frame.count == 0 and old not in vm.host.frames and vm.count(new) == 0


@pytest.mark.parametrize("mmu", MMUS)
def test_host_remap_with_notifier_zaps_and_refaults_onto_the_new_frame(mmu):
    vm = make_vm("notifier", mmu)
    kvm = vm.kvm
    vm.access(0x5000, write=True)
    old = vm.pfn(GFN)
    frame = vm.host.frames[old]
    sp, idx = vm.leaf(0x5000)
    seq = kvm.mmu_notifier_seq
    vm.log.clear()
    vm.host_remap(GFN)
    new = vm.pfn(GFN)
    assert sp.spt[idx] == TRAP and GFN not in kvm.rmap
    assert frame.count == 0 and old not in vm.host.frames
    assert vm.log == [
        ("accessed", old, "kvm_set_pfn_accessed", "rmap_remove"),
        ("dirty", old, "kvm_release_pfn_dirty", "rmap_remove"),
        ("put", old, "kvm_release_pfn_dirty", "rmap_remove"),
    ]
    assert kvm.mmu_notifier_seq == seq + 1 and kvm.mmu_notifier_count == 0
    rec = vm.access(0x5000)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(new) and vm.count(new) == 1
    assert vm.leaf(0x5000) == (sp, idx)


@pytest.mark.parametrize("kernel", KERNELS)
def test_host_remap_of_a_large_page(kernel):
    vm = make_vm(kernel)
    vm.access(0x805000, write=True)
    base = vm.pfn(LARGE_GFN)
    frame = vm.host.frames[base]
    vm.host_remap(LARGE_GFN + 5)
    new_base = vm.pfn(LARGE_GFN)
    assert new_base != base and new_base % 512 == 0 and vm.pfn(LARGE_GFN + 5) == new_base + 5
    rec = vm.access(0x805000)
    if kernel == "notifier":
        assert rec["result"] == "mapped" and rec["pfn"] == hex(new_base + 5)
        assert vm.count(new_base) == 1 and frame.count == 0
    else:
        assert rec["result"] == "hit" and rec["pfn"] == hex(base + 5)
        assert frame.count == 1 and vm.count(new_base) == 0
    vm.teardown()
    assert vm.referenced() == {} and frame.count == 0
