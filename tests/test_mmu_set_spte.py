"""``mmu_set_spte`` branch by branch (docs/kernel.md, mmu_set_spte), write protection of shadowed gfns, large pages
(docs/kernel.md, nonpaging_map and tdp_page_fault; and __direct_map) and the MMIO / error paths of ``nonpaging_map`` and
``tdp_page_fault``.

Every test builds the VM through the Python API (tests/conftest.py) and asserts KVM's exact reference count
on the frames involved (``host.frames[pfn].count``) and, where it tells the branch apart, the pfn-API hook
sequence.
"""

from __future__ import annotations

import pytest
from conftest import (
    A_BIT,
    D_BIT,
    KERNELS,
    MMIO_SLOT,
    MMUS,
    PS,
    V2626,
    P,
    U,
    W,
    make_paged_vm,
    make_vm,
    names,
)

from kvmpfn.errors import KernelBug
from kvmpfn.host import BAD_PFN, MMIO_PFN_BASE
from kvmpfn.kvm.mmu import (
    account_shadowed,
    has_wrprotected_page,
    kvm_mmu_get_page,
    kvm_mmu_lookup_page,
    mmu_set_spte,
    unaccount_shadowed,
)
from kvmpfn.kvm.spte import TRAP, is_large_pte, spte_to_pfn
from kvmpfn.x86 import ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, PT64_NX_MASK

GFN = 0x5  # a 4 KiB RAM page in slot 0
LARGE_GFN = 0x800  # the first 2 MiB region of the hugetlb slot (slot 1)


def set_spte(vm, sptep, gfn, pfn, *, write_fault=0, dirty=1, largepage=0, pte_access=ACC_ALL, user_fault=0):
    """``mmu_set_spte`` as ``__direct_map`` calls it (the caller already holds R(pfn))."""
    vcpu, kvm = vm.vcpu, vm.kvm
    return mmu_set_spte(
        vcpu, kvm, sptep, ACC_ALL, pte_access, user_fault, write_fault, dirty, largepage, gfn, pfn, False
    )


def leaf_spte(pfn: int, extra: int = 0) -> int:
    """The spte ``mmu_set_spte`` builds for a direct-map leaf with ACC_ALL: P|W|U|D, no A, no NX
    (docs/kernel.md, mmu_set_spte)."""
    return pfn << 12 | P | W | U | D_BIT | extra


# --- branch: old spte not present ------------------------------------------------------------------------


def test_old_not_present_the_new_spte_owns_the_callers_reference(vm):
    vm.fault(0x6000)  # builds the level-1 page of the region; entry GFN is still trap
    sp, _ = vm.leaf(0x6000)
    sptep = (sp, GFN)
    assert sp.spt[GFN] == TRAP
    pfn = vm.api.gfn_to_pfn(GFN, "test")
    assert vm.count(pfn) == 1
    vm.log.clear()
    assert set_spte(vm, sptep, GFN, pfn, write_fault=1) == 0
    assert sp.spt[GFN] == leaf_spte(pfn)
    assert vm.count(pfn) == 1  # consumed: no get, no put
    assert vm.log == []
    assert vm.kvm.rmap[GFN] == sptep and sp.gfns[GFN] == GFN
    assert vm.kvm.stat["lpages"] == 0


def test_old_not_present_via_the_fault_path(vm):
    assert vm.fault(GFN << 12, write=True) == 0
    pfn = vm.pfn(GFN)
    sptep = vm.leaf(GFN << 12)
    assert sptep[0].spt[sptep[1]] == leaf_spte(pfn)
    assert vm.count(pfn) == 1
    assert vm.log == [("get", pfn, "gfn_to_pfn", "tdp_page_fault")]
    assert vm.kvm.rmap[GFN] == sptep


@pytest.mark.parametrize("acc,expect", [(ACC_ALL, U), (ACC_ALL & ~ACC_USER_MASK, 0), (ACC_USER_MASK, U)])
def test_spte_bits_follow_pte_access(vm, acc, expect):
    vm.fault(0x6000)
    sp, _ = vm.leaf(0x6000)
    pfn = vm.api.gfn_to_pfn(GFN, "test")
    set_spte(vm, (sp, GFN), GFN, pfn, pte_access=acc)
    spte = sp.spt[GFN]
    assert spte & U == expect
    assert bool(spte & W) == bool(acc & W)
    assert bool(spte & PT64_NX_MASK) == (not acc & ACC_EXEC_MASK)
    assert spte & D_BIT and not spte & A_BIT and spte_to_pfn(spte) == pfn


def test_guest_pte_not_dirty_gives_a_read_only_spte(vm):
    vm.fault(0x6000)
    sp, _ = vm.leaf(0x6000)
    pfn = vm.api.gfn_to_pfn(GFN, "test")
    assert set_spte(vm, (sp, GFN), GFN, pfn, dirty=0) == 0
    assert sp.spt[GFN] == leaf_spte(pfn) & ~W


# --- branch (B): a table pointer replaced by a large leaf ---------------------------------------------------


def test_b_pointer_replaced_by_large_leaf_child_keeps_its_leaves(vm):
    kvm = vm.kvm
    account_shadowed(kvm, LARGE_GFN)  # refuse large pages in the region for the first fault
    vm.fault((LARGE_GFN + 5) << 12, write=True)
    unaccount_shadowed(kvm, LARGE_GFN)
    small = vm.pfn(LARGE_GFN + 5)
    child, cidx = vm.leaf((LARGE_GFN + 5) << 12)
    assert child.level == 1 and vm.count(small) == 1
    path, _ = vm.walk(LARGE_GFN << 12)
    l2sptep = path[2]
    l2, l2idx = l2sptep
    assert l2.level == 2 and not is_large_pte(l2.spt[l2idx])
    assert child.parent_ptes == [l2sptep]

    base = vm.api.gfn_to_pfn(LARGE_GFN, "test")
    assert base == small - 5 and vm.count(base) == 1
    vm.log.clear()
    assert set_spte(vm, l2sptep, LARGE_GFN, base, write_fault=1, largepage=1) == 0

    assert l2.spt[l2idx] == leaf_spte(base, PS)
    assert vm.count(base) == 1 and vm.count(small) == 1
    assert vm.log == []  # a pointer owns no reference: nothing released
    # the child is orphaned, not zapped: still live, with its leaf and that leaf's reference and rmap entry
    assert child.id in kvm.active_mmu_pages and child.parent_ptes == []
    assert spte_to_pfn(child.spt[cidx]) == small and kvm.rmap[LARGE_GFN + 5] == (child, cidx)
    assert kvm.rmap_pde[LARGE_GFN >> 9] == l2sptep
    assert kvm.stat["lpages"] == 1
    vm.teardown()
    assert vm.count(base) == 0 and vm.count(small) == 0


def test_b_via_the_fault_path_after_dirty_logging_stops(vm):
    kvm = vm.kvm
    vm.dirty_log(1)  # logging on: no large sptes in slot 1
    rec = vm.access((LARGE_GFN + 5) << 12, write=True)
    small = vm.pfn(LARGE_GFN + 5)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(small)
    child, cidx = vm.leaf((LARGE_GFN + 5) << 12)
    vm.dirty_log(1, stop=True)  # logging off; the leaf lost W
    assert not child.spt[cidx] & W
    vm.log.clear()
    rec = vm.access((LARGE_GFN + 5) << 12, write=True)  # write fault: now largepage -> branch (B)
    base = small - 5
    assert rec["result"] == "mapped" and rec["pfn"] == hex(small)
    assert int(rec["spte"], 16) & ~A_BIT == leaf_spte(base, PS)
    assert vm.log == [("get", base, "gfn_to_pfn", "tdp_page_fault")]
    assert vm.count(base) == 1 and vm.count(small) == 1
    assert child.id in kvm.active_mmu_pages and child.parent_ptes == []


# --- branch (C): a leaf of a different pfn ----------------------------------------------------------------


@pytest.mark.parametrize("kernel", V2626)
@pytest.mark.parametrize("writable", [True, False])
@pytest.mark.parametrize("accessed", [True, False])
def test_c_leaf_of_another_pfn_releases_the_old_frame(kernel, writable, accessed):
    vm = make_vm(kernel)
    n = names(kernel)
    vm.fault(GFN << 12, write=True)
    sp, idx = vm.leaf(GFN << 12)
    if not writable:
        sp.spt[idx] &= ~W
    if accessed:
        sp.spt[idx] |= A_BIT
    old_pfn, new_pfn = vm.host.host_remap(GFN)  # no notifier: the spte keeps the old frame
    old = vm.host.frames[old_pfn]
    assert old.count == 1 and not old.host_mapped and not old.dirty and not old.accessed
    assert vm.api.gfn_to_pfn(GFN, "test") == new_pfn and vm.count(new_pfn) == 1
    vm.log.clear()

    assert set_spte(vm, (sp, idx), GFN, new_pfn) == 0

    assert old.count == 0
    assert old.dirty is writable and old.accessed is accessed
    expect = [("accessed", old_pfn, n["kvm_set_pfn_accessed"], "rmap_remove")] if accessed else []
    if writable:
        rel = n["kvm_release_pfn_dirty"]
        expect += [("dirty", old_pfn, rel, "rmap_remove"), ("put", old_pfn, rel, "rmap_remove")]
    else:
        expect += [("put", old_pfn, n["kvm_release_pfn_clean"], "rmap_remove")]
    assert vm.log == expect
    assert old_pfn not in vm.host.frames  # the last reference went: freed
    assert vm.count(new_pfn) == 1
    assert sp.spt[idx] == leaf_spte(new_pfn)
    assert vm.kvm.rmap[GFN] == (sp, idx)  # unlinked, then linked again: one entry


# --- branch (D): the same pfn -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("writable", [True, False])
def test_d_same_pfn_releases_the_duplicate_reference(kernel, writable):
    vm = make_vm(kernel)
    n = names(kernel)
    vm.fault(GFN << 12, write=True)
    pfn = vm.pfn(GFN)
    sp, idx = vm.leaf(GFN << 12)
    if not writable:
        sp.spt[idx] &= ~W
    assert vm.api.gfn_to_pfn(GFN, "test") == pfn and vm.count(pfn) == 2
    vm.log.clear()

    assert set_spte(vm, (sp, idx), GFN, pfn) == 0

    assert vm.count(pfn) == 1
    if writable:
        rel = n["kvm_release_pfn_dirty"]
        assert vm.log == [("dirty", pfn, rel, "mmu_set_spte"), ("put", pfn, rel, "mmu_set_spte")]
    else:
        assert vm.log == [("put", pfn, n["kvm_release_pfn_clean"], "mmu_set_spte")]
    assert vm.host.frames[pfn].dirty is writable
    assert vm.kvm.rmap[GFN] == (sp, idx)  # not added twice
    assert sp.spt[idx] == leaf_spte(pfn)


def test_d_same_pfn_large(vm):
    vm.fault(LARGE_GFN << 12, write=True)
    base = vm.pfn(LARGE_GFN)
    sptep = vm.leaf(LARGE_GFN << 12)
    assert sptep[0].level == 2 and vm.kvm.stat["lpages"] == 1
    assert vm.api.gfn_to_pfn(LARGE_GFN, "test") == base and vm.count(base) == 2
    vm.log.clear()
    set_spte(vm, sptep, LARGE_GFN, base, largepage=1)
    assert vm.count(base) == 1
    assert [c[0] for c in vm.log] == ["dirty", "put"]
    assert vm.kvm.stat["lpages"] == 1  # was_rmapped: not counted again
    assert vm.kvm.rmap_pde[LARGE_GFN >> 9] == sptep


def test_d_same_pfn_via_a_repeated_fault(vm):
    """A write fault on a read-only leaf of the same frame: the fault's reference is the duplicate."""
    vm.fault(GFN << 12, write=True)
    pfn = vm.pfn(GFN)
    sp, idx = vm.leaf(GFN << 12)
    sp.spt[idx] &= ~W
    vm.log.clear()
    rec = vm.access(GFN << 12, write=True)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(pfn)
    assert vm.log == [
        ("get", pfn, "gfn_to_pfn", "tdp_page_fault"),
        ("put", pfn, "kvm_release_pfn_clean", "mmu_set_spte"),
    ]
    assert vm.count(pfn) == 1 and sp.spt[idx] & W


# --- write protection of shadowed gfns -------------------------------------------------------------------


@pytest.mark.parametrize("write_fault,ptwrite", [(1, 1), (0, 0)])
def test_no_write_access_to_a_gfn_that_has_a_shadow_page(vm, write_fault, ptwrite):
    kvm = vm.kvm
    vm.dirty_log(0)  # the slot logs: a refused W must not mark the gfn dirty
    shadow = kvm_mmu_get_page(vm.vcpu, kvm, GFN, 0, 1, 0, ACC_ALL, None)  # shadows a guest table at GFN
    assert kvm_mmu_lookup_page(kvm, GFN) is shadow
    vm.fault(0x6000)
    sp, _ = vm.leaf(0x6000)
    pfn = vm.api.gfn_to_pfn(GFN, "test")
    assert set_spte(vm, (sp, GFN), GFN, pfn, write_fault=write_fault) == ptwrite
    assert sp.spt[GFN] == leaf_spte(pfn) & ~W
    assert vm.count(pfn) == 1 and kvm.rmap[GFN] == (sp, GFN)
    assert GFN not in kvm.slots[0].dirty_bitmap
    # contrast: the read fault on 0x6000 made a writable spte, and a writable spte marks its gfn dirty
    assert 0x6 in kvm.slots[0].dirty_bitmap


def test_large_spte_refused_write_over_a_shadowed_region(vm):
    kvm = vm.kvm
    vm.fault(LARGE_GFN << 12)  # large leaf
    sptep = vm.leaf(LARGE_GFN << 12)
    base = vm.pfn(LARGE_GFN)
    account_shadowed(kvm, LARGE_GFN + 7)  # a shadowed table somewhere in the region (write_count)
    assert has_wrprotected_page(kvm, LARGE_GFN)
    assert vm.api.gfn_to_pfn(LARGE_GFN, "test") == base
    assert set_spte(vm, sptep, LARGE_GFN, base, write_fault=1, largepage=1) == 1
    assert sptep[0].spt[sptep[1]] == leaf_spte(base, PS) & ~W
    assert vm.count(base) == 1


def test_kvm_mmu_get_page_write_protects_existing_mappings(vm):
    kvm = vm.kvm
    vm.fault(GFN << 12, write=True)
    pfn = vm.pfn(GFN)
    sp, idx = vm.leaf(GFN << 12)
    assert sp.spt[idx] & W
    vm.log.clear()
    kvm_mmu_get_page(vm.vcpu, kvm, GFN, 0, 1, 0, ACC_ALL, None)
    assert not sp.spt[idx] & W
    assert vm.log == [("dirty", pfn, "kvm_set_pfn_dirty", "rmap_write_protect")]
    assert vm.count(pfn) == 1
    assert kvm.slots[0].write_count[0] == 1
    # a metaphysical page is not a guest table: nothing protected, nothing accounted
    kvm_mmu_get_page(vm.vcpu, kvm, 0x9, 0, 1, 1, ACC_ALL, None)
    assert kvm.slots[0].write_count[0] == 1


def test_shadow_guest_write_to_its_own_page_table_is_emulated():
    vm = make_paged_vm(maps=[(0, 512)])
    pt_gfn = vm.tables.tables[-1]  # the level-1 table mapping gva 0..2 MiB
    assert vm.access(0x3000)["result"] == "mapped"  # shadows the guest tables
    assert kvm_mmu_lookup_page(vm.kvm, pt_gfn) is not None
    rec = vm.access(pt_gfn << 12, write=True)  # identity mapped: the guest writes its own page table
    assert rec["result"] == "emulated" and rec["gpa"] == hex(pt_gfn << 12)
    sp, idx = vm.leaf(pt_gfn << 12)  # installed read-only (*ptwrite), the store emulated
    assert not sp.spt[idx] & W and spte_to_pfn(sp.spt[idx]) == vm.pfn(pt_gfn)
    assert vm.count(vm.pfn(pt_gfn)) == 1


# --- large pages -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmu", MMUS)
def test_large_page_created_when_hugetlb_and_aligned(mmu):
    vm = make_vm(mmu=mmu)  # tdp_page_fault, or nonpaging_map under shadow
    caller = "tdp_page_fault" if mmu == "tdp" else "nonpaging_map"
    rec = vm.access(((LARGE_GFN + 5) << 12) | 0x123, write=True)
    base = vm.pfn(LARGE_GFN)
    assert base % 512 == 0
    assert rec["result"] == "mapped" and rec["gpa"] == hex(((LARGE_GFN + 5) << 12) | 0x123)
    assert rec["pfn"] == hex(base + 5)
    assert int(rec["spte"], 16) == leaf_spte(base, PS | A_BIT)
    sp, idx = vm.leaf(LARGE_GFN << 12)
    assert sp.level == 2 and vm.leaf((LARGE_GFN + 0x1FF) << 12) == (sp, idx)
    assert vm.log == [("get", base, "gfn_to_pfn", caller)]
    assert vm.count(base) == 1 and all(vm.count(base + i) == 0 for i in range(1, 512))
    assert vm.kvm.rmap_pde[LARGE_GFN >> 9] == (sp, idx) and LARGE_GFN + 5 not in vm.kvm.rmap
    assert vm.kvm.stat["lpages"] == 1
    assert vm.access((LARGE_GFN + 0x100) << 12)["result"] == "hit"


def assert_4k(vm, gfn: int, mmu_caller: str = "tdp_page_fault"):
    rec = vm.access(gfn << 12, write=True)
    pfn = vm.pfn(gfn)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(pfn)
    sp, idx = vm.leaf(gfn << 12)
    assert sp.level == 1 and not sp.spt[idx] & PS
    assert vm.count(pfn) == 1 and vm.kvm.rmap[gfn] == (sp, idx)
    assert not vm.kvm.rmap_pde.get(gfn >> 9)
    assert vm.kvm.stat["lpages"] == 0


@pytest.mark.parametrize("mmu", MMUS)
def test_large_page_refused_without_hugetlb(mmu):
    vm = make_vm(mmu=mmu, memslots=[(0, 0, 0x1000, "ram")])
    assert_4k(vm, 0x805)
    assert vm.count(vm.pfn(0x805) - 5) == 0


@pytest.mark.parametrize("mmu", MMUS)
def test_large_page_refused_while_dirty_logging(mmu):
    vm = make_vm(mmu=mmu)
    vm.dirty_log(1)
    assert_4k(vm, LARGE_GFN + 5)
    assert vm.kvm.slots[1].dirty_bitmap == {LARGE_GFN + 5}


@pytest.mark.parametrize("mmu", MMUS)
def test_large_page_refused_over_a_shadowed_page_table(mmu):
    vm = make_vm(mmu=mmu)
    kvm_mmu_get_page(vm.vcpu, vm.kvm, LARGE_GFN + 0x1FF, 0, 1, 0, ACC_ALL, None)
    assert vm.kvm.slots[1].write_count[0] == 1
    assert_4k(vm, LARGE_GFN + 5)
    # the other region of the slot is not affected
    rec = vm.access((LARGE_GFN + 0x200) << 12)
    assert int(rec["spte"], 16) & PS


@pytest.mark.parametrize("mmu", MMUS)
def test_large_page_refused_where_the_slot_covers_the_region_partly(mmu):
    # slot 1 starts in the middle of region 0x800 and ends in the middle of region 0xc00
    vm = make_vm(mmu=mmu, memslots=[(0, 0, 0x800, "ram"), (1, 0x900, 0x400, "hugetlb")])
    assert vm.kvm.slots[1].write_count == {0: 1, 2: 1}
    assert_4k(vm, 0x905)
    rec = vm.access(0xA05000)  # region 0xa00 is fully inside the slot
    assert int(rec["spte"], 16) & PS and rec["pfn"] == hex(vm.pfn(0xA05))
    assert vm.leaf(0xA05000)[0].level == 2
    vm.log.clear()
    rec = vm.access(0xC01000, write=True)
    assert rec["result"] == "mapped" and not int(rec["spte"], 16) & PS


def test_a_large_spte_in_the_way_of_a_4k_fault_is_dropped(vm):
    """Dirty logging starts after a large spte exists: it loses W, a write then faults with large pages
    refused, and ``__direct_map`` drops the large spte before it builds the level-1 page (v2.6.32's order;
    the era walked into it: ``--bug direct-map-into-large``)."""
    kvm = vm.kvm
    vm.access((LARGE_GFN + 5) << 12, write=True)
    base = vm.pfn(LARGE_GFN)
    l2, idx = vm.leaf(LARGE_GFN << 12)
    vm.dirty_log(1)
    assert not l2.spt[idx] & W
    vm.log.clear()
    rec = vm.access((LARGE_GFN + 5) << 12, write=True)
    assert rec["result"] == "mapped" and rec["pfn"] == hex(base + 5)
    assert not int(rec["spte"], 16) & PS and vm.leaf((LARGE_GFN + 5) << 12)[0].level == 1
    assert vm.log == [
        ("get", base + 5, "gfn_to_pfn", "tdp_page_fault"),
        ("accessed", base, "kvm_set_pfn_accessed", "rmap_remove"),
        ("put", base, "kvm_release_pfn_clean", "rmap_remove"),  # W was removed by the dirty log: clean
    ]
    assert vm.count(base) == 0 and vm.count(base + 5) == 1
    assert kvm.stat["lpages"] == 0 and not kvm.rmap_pde.get(LARGE_GFN >> 9)
    assert kvm.slots[1].dirty_bitmap == {LARGE_GFN + 5}


def test_direct_map_into_large_bug_walks_into_the_large_spte():
    vm = make_vm(bugs={"direct-map-into-large"})
    vm.access(LARGE_GFN << 12, write=True)
    vm.dirty_log(1)
    with pytest.raises(KernelBug, match="not a table"):
        vm.access((LARGE_GFN + 5) << 12, write=True)


# --- MMIO and error paths --------------------------------------------------------------------------------


def fault_caller(mmu: str) -> str:
    return "tdp_page_fault" if mmu == "tdp" else "nonpaging_map"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mmu", MMUS)
def test_outside_every_slot_is_mmio_and_keeps_no_reference(kernel, mmu):
    vm = make_vm(kernel, mmu)
    n = names(kernel)
    rec = vm.access(0x40000000, write=True)
    assert rec == {"result": "mmio", "gpa": "0x40000000", "set_accessed": []}
    c = fault_caller(mmu)
    assert vm.log == [("get", BAD_PFN, n["gfn_to_pfn"], c), ("put", BAD_PFN, n["kvm_release_pfn_clean"], c)]
    assert vm.count(BAD_PFN) == 0 and vm.referenced() == {}
    assert vm.leaves() == []
    assert vm.access(0x40000000)["result"] == "mmio"  # no spte was made: it exits again


@pytest.mark.parametrize("kernel", ["page", "pfn"])
@pytest.mark.parametrize("mmu", MMUS)
def test_mmio_slot_without_pfnmap_is_mmio_bad_pfn_taken_and_released(kernel, mmu):
    vm = make_vm(kernel, mmu)
    n = names(kernel)
    gpa = MMIO_SLOT[1] << 12 | 0x10
    rec = vm.access(gpa)
    assert rec == {"result": "mmio", "gpa": hex(gpa), "set_accessed": []}
    c = fault_caller(mmu)
    assert vm.log == [("get", BAD_PFN, n["gfn_to_pfn"], c), ("put", BAD_PFN, n["kvm_release_pfn_clean"], c)]
    assert vm.count(BAD_PFN) == 0 and vm.referenced() == {}
    assert vm.leaves() == []
    dev = vm.host.peek_pfn(MMIO_SLOT[1])
    assert dev >= MMIO_PFN_BASE and vm.count(dev) == 0


@pytest.mark.parametrize("kernel", ["pfn-io", "notifier"])
@pytest.mark.parametrize("mmu", MMUS)
def test_mmio_slot_with_pfnmap_is_mapped_by_device_pfn_never_refcounted(kernel, mmu):
    vm = make_vm(kernel, mmu)
    gfn = MMIO_SLOT[1] + 3
    dev = vm.host.peek_pfn(gfn)
    assert dev == MMIO_PFN_BASE + 3
    rec = vm.access(gfn << 12, write=True)
    assert rec["result"] == "mapped" and rec["gpa"] == hex(gfn << 12) and rec["pfn"] == hex(dev)
    assert int(rec["spte"], 16) == leaf_spte(dev, A_BIT)
    sptep = vm.leaf(gfn << 12)
    assert vm.kvm.rmap[gfn] == sptep  # rmapped like any present spte
    assert vm.log == [] and vm.count(dev) == 0 and vm.referenced() == {}
    assert vm.access(gfn << 12)["result"] == "hit"
    vm.teardown()
    assert vm.log == [] and vm.count(dev) == 0 and vm.leaves() == []


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mmu", MMUS)
def test_injected_gup_fail_is_an_error_with_no_reference_left(kernel, mmu):
    vm = make_vm(kernel, mmu)
    vm.access(0x6000)  # roots loaded, a first mapping
    before = vm.referenced()
    vm.log.clear()
    vm.inject("gup_fail")
    rec = vm.access(GFN << 12, write=True)
    assert rec == {"result": "error", "set_accessed": []}
    assert vm.count(BAD_PFN) == 0 and vm.referenced() == before
    assert [c[0] for c in vm.log] == ["get", "put"] and {c[1] for c in vm.log} == {BAD_PFN}
    assert vm.host.peek_pfn(GFN) is None  # get_user_pages never ran
    rec = vm.access(GFN << 12, write=True)  # one failure only
    assert rec["result"] == "mapped" and vm.count(vm.pfn(GFN)) == 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mmu", MMUS)
def test_injected_enomem_is_an_error_with_no_reference_taken(kernel, mmu):
    vm = make_vm(kernel, mmu)
    vm.access(0x6000)
    before = vm.referenced()
    vm.log.clear()
    vm.inject("enomem")
    assert vm.access(GFN << 12, write=True) == {"result": "error", "set_accessed": []}
    assert vm.log == [] and vm.referenced() == before
    assert vm.access(GFN << 12, write=True)["result"] == "mapped"


@pytest.mark.parametrize("mmu", MMUS)
def test_injected_enomem_at_root_load(mmu):
    vm = make_vm(mmu=mmu)
    vm.inject("enomem")
    assert vm.access(GFN << 12) == {"result": "error", "set_accessed": []}
    assert vm.log == [] and vm.kvm.active_mmu_pages == {}
    assert vm.access(GFN << 12)["result"] == "mapped"
