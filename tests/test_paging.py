"""kvmpfn/kvm/paging.py (paging_tmpl.h, v2.6.26) through the Python API on a 64-bit shadow-paged guest:
``FNAME(page_fault)`` (a failed walk injects the guest's #PF; a large guest page backed large or split),
``FNAME(fetch)`` (one shadow page per guest table, write-protected; the bail-out when a guest entry changed
under it, with and without the v2.6.28 parent unlink), ``FNAME(prefetch_page)`` (trap where the guest pte is
present, notrap where it is not) and ``FNAME(update_pte)`` (the speculative spte of a guest pte write).

End-to-end shadow scenarios stay in test_shadow_scenarios.py.
"""

from __future__ import annotations

from conftest import A_BIT, D_BIT, PS, P, U, Vm, W, make_paged_vm

from kvmpfn.kvm.context import kvm_mmu_reload
from kvmpfn.kvm.mmu import kvm_mmu_lookup_page
from kvmpfn.kvm.paging import prefetch_page, update_pte
from kvmpfn.kvm.pte_write import mmu_guess_page_from_pte_write
from kvmpfn.kvm.spte import NOTRAP, TRAP, spte_to_pfn
from kvmpfn.x86 import ACC_EXEC_MASK, ACC_USER_MASK, PFERR_WRITE_MASK, PT_WRITABLE_MASK


def paged(maps=((0, 16),), bugs=()) -> Vm:
    vm = make_paged_vm(maps=list(maps), bugs=bugs)
    assert kvm_mmu_reload(vm.vcpu, vm.kvm) == 0
    return vm


def fault(vm: Vm, addr: int, error_code: int = 0) -> int:
    return vm.vcpu.page_fault(vm.vcpu, vm.kvm, addr, error_code)


def test_page_fault_shadows_each_guest_table_and_maps_the_leaf() -> None:
    vm = paged()
    assert fault(vm, 0x3000) == 0
    pages = [(sp.gfn, sp.level, sp.metaphysical) for sp in vm.kvm.active_mmu_pages.values()]
    assert pages == [(0x100, 4, 0), (0x101, 3, 0), (0x102, 2, 0), (0x103, 1, 0)]  # the guest's PML4..PT
    # account_shadowed: the four guest tables count against large pages in their 2 MiB region
    assert vm.kvm.slots[0].write_count == {0: 4}
    sp, index = vm.leaf(0x3000)
    assert (sp.gfn, index, sp.gfns[index]) == (0x103, 3, 0x3)
    spte = sp.spt[index]
    assert spte_to_pfn(spte) == vm.pfn(3)
    assert not spte & PT_WRITABLE_MASK  # a read fault on a clean gpte: W deferred to the write
    assert vm.referenced() == {vm.pfn(3): 1}
    assert vm.host.read_guest(0x103018, 8) & A_BIT  # the walk set A in the guest pte


def test_a_write_fault_makes_the_spte_writable_and_the_gpte_dirty() -> None:
    vm = paged()
    fault(vm, 0x3000)
    assert fault(vm, 0x3000, PFERR_WRITE_MASK) == 0
    sp, index = vm.leaf(0x3000)
    assert sp.spt[index] & PT_WRITABLE_MASK
    assert vm.host.read_guest(0x103018, 8) & D_BIT
    assert vm.referenced() == {vm.pfn(3): 1}  # mmu_set_spte released the duplicate reference


def test_a_failed_walk_injects_the_guest_fault_and_maps_nothing() -> None:
    vm = paged()
    assert fault(vm, 0x50000, PFERR_WRITE_MASK) == 0
    assert vm.vcpu.fault_err == PFERR_WRITE_MASK  # not present, write, supervisor
    assert vm.referenced() == {}
    assert vm.leaves() == []


def test_a_large_guest_page_backed_by_hugetlb_gets_a_large_spte() -> None:
    vm = paged(maps=[(0x800000, None)])  # gfn 0x800: the hugetlb slot
    assert fault(vm, 0x801000) == 0
    sp, index = vm.leaf(0x801000)
    assert sp.level == 2 and sp.spt[index] & PS
    assert spte_to_pfn(sp.spt[index]) == vm.pfn(0x800)
    assert vm.kvm.stat["lpages"] == 1
    assert vm.referenced() == {vm.pfn(0x800): 1}


def test_a_large_guest_page_on_small_pages_is_split_into_a_metaphysical_page() -> None:
    vm = paged(maps=[(0, None)])  # gfn 0: anonymous RAM, not backed large
    assert fault(vm, 0x3000) == 0
    sp, index = vm.leaf(0x3000)
    assert (sp.level, sp.metaphysical, sp.gfn, index) == (1, 1, 0x0, 3)
    assert sp.access == ACC_EXEC_MASK | ACC_USER_MASK  # W dropped from the role: the guest pde is clean
    assert vm.kvm.stat["lpages"] == 0
    assert vm.referenced() == {vm.pfn(3): 1}


def test_fetch_bails_out_when_a_guest_entry_changed_and_unlinks_the_new_page() -> None:
    vm = paged()
    vm.inject("pte_race")  # the guest pml4e read back after protecting its table differs
    assert fault(vm, 0x3000) == 0
    pdpt = kvm_mmu_lookup_page(vm.kvm, 0x101)
    assert pdpt is not None and pdpt.parent_ptes == []  # kvm_mmu_put_page (v2.6.28)
    root = vm.kvm.page_header[vm.vcpu.root_hpa >> 12]
    assert root.spt[0] == TRAP
    assert vm.referenced() == {}  # R(pfn) released
    assert vm.ops("put")[-1][2:] == ("kvm_release_pfn_clean", "fetch")


def test_fetch_bailout_parent_bug_leaves_the_parent_link() -> None:
    vm = paged(bugs=("fetch-bailout-parent",))
    vm.inject("pte_race")
    assert fault(vm, 0x3000) == 0
    pdpt = kvm_mmu_lookup_page(vm.kvm, 0x101)
    root = vm.kvm.page_header[vm.vcpu.root_hpa >> 12]
    assert pdpt is not None and pdpt.parent_ptes == [(root, 0)] and root.spt[0] == TRAP


def test_prefetch_page_marks_absent_guest_ptes_notrap() -> None:
    vm = paged()
    fault(vm, 0x3000)
    pt = kvm_mmu_lookup_page(vm.kvm, 0x103)
    assert pt is not None
    want = [TRAP] * 16 + [NOTRAP] * (512 - 16)
    want[3] = pt.spt[3]  # the leaf just mapped
    assert pt.spt == want
    # a prefetch again reads the guest table as it is now
    vm.host.write_guest(0x103000 + 8 * 20, 0x14000 | P | W | U, 8)
    prefetch_page(vm.vcpu, vm.kvm, pt)
    assert pt.spt[20] == TRAP and pt.spt[3] == TRAP and pt.spt[21] == NOTRAP


def test_prefetch_page_leaves_a_metaphysical_page_all_trap() -> None:
    vm = paged(maps=[(0, None)])
    fault(vm, 0x3000)
    sp, index = vm.leaf(0x3000)
    before = list(sp.spt)
    assert before.count(TRAP) == 511  # made all trap: only the leaf faulted in is set
    prefetch_page(vm.vcpu, vm.kvm, sp)
    assert sp.spt == before  # nothing read from the guest


def park(vm: Vm, gpa: int, gpte: int) -> int:
    """``mmu_guess_page_from_pte_write`` for a store of ``gpte`` at ``gpa``: the parked pfn."""
    mmu_guess_page_from_pte_write(vm.vcpu, vm.kvm, gpa, gpte, 8)
    return vm.vcpu.update_pte_pfn


def test_update_pte_installs_a_present_accessed_gpte_with_its_own_reference() -> None:
    vm = paged()
    fault(vm, 0x3000)
    pt = kvm_mmu_lookup_page(vm.kvm, 0x103)
    gpte = 0x7000 | P | W | U | A_BIT
    pfn = park(vm, 0x103000 + 8 * 5, gpte)
    assert pfn == vm.pfn(7) and vm.count(pfn) == 1
    update_pte(vm.vcpu, vm.kvm, pt, (pt, 5), gpte)
    assert spte_to_pfn(pt.spt[5]) == pfn and pt.gfns[5] == 7
    assert not pt.spt[5] & PT_WRITABLE_MASK  # clean gpte
    assert vm.count(pfn) == 2  # the parked reference plus the spte's (kvm_get_pfn)


def test_update_pte_skips_an_unaccessed_or_other_gfn_and_notraps_an_absent_one() -> None:
    vm = paged()
    fault(vm, 0x3000)
    pt = kvm_mmu_lookup_page(vm.kvm, 0x103)
    pfn = park(vm, 0x103000 + 8 * 5, 0x7000 | P | W | U | A_BIT)
    update_pte(vm.vcpu, vm.kvm, pt, (pt, 5), 0x7000 | P | W | U)  # not accessed
    assert pt.spt[5] == TRAP
    update_pte(vm.vcpu, vm.kvm, pt, (pt, 5), 0x8000 | P | W | U | A_BIT)  # not the guessed gfn
    assert pt.spt[5] == TRAP
    update_pte(vm.vcpu, vm.kvm, pt, (pt, 5), 0x7000 | P | W | U | A_BIT | 1 << 51)  # reserved bit 51
    assert pt.spt[5] == TRAP
    update_pte(vm.vcpu, vm.kvm, pt, (pt, 5), 0)
    assert pt.spt[5] == NOTRAP
    assert vm.count(pfn) == 1  # only the parked reference
