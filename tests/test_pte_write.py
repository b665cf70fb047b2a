"""kvmpfn/kvm/pte_write.py (mmu.c, v2.6.26) through the Python API: ``kvm_mmu_pte_write`` and its helpers.
``mmu_guess_page_from_pte_write`` (the parked reference and its release), the fork/flood detector
(``last_pt_write_count``, spared by ``kvm_mmu_access_page``), misaligned writes, a 32-bit guest's tables in
quadrants and its 4 MiB pde shadowed by a pair of 2 MiB shadow pdes (``mmu_pte_write_new_pte``, ``--bug
pse32-double-update``), and the role test (``role_matches_context``) that keeps a page of another context
from being updated.

Every store here is made the way the emulator makes it: guest memory first, then ``kvm_mmu_pte_write``.
End-to-end pte-write scenarios stay in test_shadow_scenarios.py.
"""

from __future__ import annotations

from conftest import A_BIT, D_BIT, PS, P, U, Vm, W, make_paged_vm, make_vm

from kvmpfn.kvm.context import kvm_mmu_reload
from kvmpfn.kvm.mmu import kvm_mmu_lookup_page
from kvmpfn.kvm.pte_write import kvm_mmu_pte_write, mmu_guess_page_from_pte_write
from kvmpfn.kvm.spte import NOTRAP, TRAP, spte_to_pfn
from kvmpfn.x86 import PT_WRITABLE_MASK

PT = 0x103000  # make_paged_vm's level-1 guest table for gva 0..2 MiB


def paged(bugs=(), kernel: str = "pfn") -> Vm:
    """A 64-bit guest with gva 0..64K mapped and the leaf of gva 0x3000 faulted in."""
    vm = make_paged_vm(kernel=kernel, maps=[(0, 16)], bugs=bugs)
    assert kvm_mmu_reload(vm.vcpu, vm.kvm) == 0
    assert vm.vcpu.page_fault(vm.vcpu, vm.kvm, 0x3000, 0) == 0
    return vm


def store(vm: Vm, gpa: int, val: int, nbytes: int = 8) -> None:
    vm.host.write_guest(gpa, val, nbytes)
    kvm_mmu_pte_write(vm.vcpu, vm.kvm, gpa, val, nbytes)


# -- the guess ----------------------------------------------------------------------------------------------


def test_the_guess_parks_a_reference_on_the_new_frame() -> None:
    vm = paged()
    vcpu = vm.vcpu
    mmu_guess_page_from_pte_write(vcpu, vm.kvm, PT + 8 * 5, 0x9000 | P | W, 8)
    assert (vcpu.update_pte_gfn, vcpu.update_pte_pfn, vcpu.update_pte_largepage) == (9, vm.pfn(9), 0)
    assert vm.count(vm.pfn(9)) == 1


def test_the_guess_reads_the_other_half_of_a_4_byte_store() -> None:
    vm = paged()
    vm.host.write_guest(PT + 8 * 5, 0, 8)
    # the high half (bit 32 up) of a 64-bit pte alone: present comes from the low half in memory (0)
    mmu_guess_page_from_pte_write(vm.vcpu, vm.kvm, PT + 8 * 5 + 4, 0x1, 4)
    assert vm.vcpu.update_pte_pfn == vm.api.bad_pfn
    # the low half: gfn 0xA, present
    mmu_guess_page_from_pte_write(vm.vcpu, vm.kvm, PT + 8 * 5, 0xA000 | P, 4)
    assert (vm.vcpu.update_pte_gfn, vm.vcpu.update_pte_pfn) == (0xA, vm.pfn(0xA))


def test_the_guess_ignores_absent_misaligned_and_odd_sized_stores() -> None:
    vm = paged()
    for gpa, val, nbytes in ((PT + 40, 0x9000, 8), (PT + 42, 0x9000 | P, 8), (PT + 40, 0x9001, 2)):
        mmu_guess_page_from_pte_write(vm.vcpu, vm.kvm, gpa, val, nbytes)
        assert vm.vcpu.update_pte_pfn == vm.api.bad_pfn
    assert vm.ops("get", None)[-1][3] != "mmu_guess_page_from_pte_write"


def test_the_guess_releases_an_error_pfn_at_once() -> None:
    vm = paged()
    mmu_guess_page_from_pte_write(vm.vcpu, vm.kvm, PT + 40, 0xFE000000 | P, 8)  # the mmio slot
    assert vm.vcpu.update_pte_pfn == vm.api.bad_pfn
    got = [op for op in vm.ops() if op[3] == "mmu_guess_page_from_pte_write"]
    assert [op[0] for op in got] == ["get", "put"] and got[0][1] == got[1][1] == vm.api.bad_pfn


def test_the_parked_reference_is_released_at_the_end_of_the_write() -> None:
    vm = paged()
    store(vm, PT + 8 * 5, 0x9000 | P | W | U | A_BIT)
    pt = kvm_mmu_lookup_page(vm.kvm, 0x103)
    assert pt is not None and spte_to_pfn(pt.spt[5]) == vm.pfn(9)  # update_pte's spte
    assert vm.vcpu.update_pte_pfn == vm.api.bad_pfn
    assert vm.count(vm.pfn(9)) == 1  # the spte's reference only
    assert vm.ops("put", vm.pfn(9))[-1][2:] == ("kvm_release_pfn_clean", "kvm_mmu_pte_write")


def test_prefetch_no_release_keeps_the_parked_reference() -> None:
    vm = paged(bugs=("prefetch-no-release",))
    store(vm, PT + 8 * 5, 0x9000 | P | W | U | A_BIT)
    assert vm.count(vm.pfn(9)) == 2  # the spte's and the leaked one
    assert vm.vcpu.update_pte_pfn == vm.api.bad_pfn


# -- zap and update -----------------------------------------------------------------------------------------


def test_a_rewritten_pte_drops_the_old_reference_and_maps_the_new_frame() -> None:
    vm = paged()
    old = vm.pfn(3)
    store(vm, PT + 8 * 3, 0x9000 | P | W | U | A_BIT | D_BIT)
    sp, index = vm.leaf(0x3000)
    assert spte_to_pfn(sp.spt[index]) == vm.pfn(9) and sp.spt[index] & PT_WRITABLE_MASK  # dirty: W
    assert vm.count(old) == 0 and vm.count(vm.pfn(9)) == 1
    assert vm.kvm.stat["mmu_pte_updated"] == 1
    store(vm, PT + 8 * 3, 0)
    assert sp.spt[index] == NOTRAP and vm.referenced() == {}


def test_a_misaligned_store_zaps_the_whole_page() -> None:
    vm = paged()
    pt = kvm_mmu_lookup_page(vm.kvm, 0x103)
    assert pt is not None
    store(vm, PT + 8 * 3 + 4, 0x12345678_00000000, 8)  # straddles ptes 3 and 4
    assert kvm_mmu_lookup_page(vm.kvm, 0x103) is None and pt.id not in vm.kvm.active_mmu_pages
    assert vm.kvm.stat["mmu_flooded"] == 1
    assert vm.referenced() == {}


def test_a_store_shorter_than_4_bytes_zaps_the_page() -> None:
    vm = paged()
    store(vm, PT + 8 * 7, 0x1, 2)
    assert kvm_mmu_lookup_page(vm.kvm, 0x103) is None
    assert vm.kvm.stat["mmu_flooded"] == 1


def test_the_third_store_in_a_row_to_an_unused_table_floods_it() -> None:
    vm = paged()
    for i, pte in enumerate((0x9000, 0xA000)):
        store(vm, PT + 8 * (8 + i), pte | P | W | U)  # not accessed: update_pte leaves them
        assert kvm_mmu_lookup_page(vm.kvm, 0x103) is not None
    assert (vm.vcpu.last_pt_write_gfn, vm.vcpu.last_pt_write_count) == (0x103, 2)
    store(vm, PT + 8 * 10, 0xB000 | P | W | U)
    assert kvm_mmu_lookup_page(vm.kvm, 0x103) is None
    assert vm.kvm.stat["mmu_flooded"] == 1
    assert vm.referenced() == {}  # the zap took the leaf of gva 0x3000 with it


def test_a_store_to_another_table_restarts_the_count() -> None:
    vm = paged()
    store(vm, PT + 8 * 8, 0x9000 | P | W | U)
    store(vm, PT + 8 * 9, 0xA000 | P | W | U)
    store(vm, 0x102000 + 8 * 300, 0)  # the guest PD
    assert (vm.vcpu.last_pt_write_gfn, vm.vcpu.last_pt_write_count) == (0x102, 1)
    store(vm, PT + 8 * 10, 0xB000 | P | W | U)
    assert kvm_mmu_lookup_page(vm.kvm, 0x103) is not None and vm.kvm.stat["mmu_flooded"] == 0


def test_an_accessed_speculative_spte_spares_the_table() -> None:
    """``last_updated_pte_accessed``: the guest used the spte the previous store instantiated, so the table is
    in use, not being freed."""
    vm = paged()
    for i in range(4):
        store(vm, PT + 8 * (8 + i), ((0x9 + i) << 12) | P | W | U | A_BIT)
        sp, index = vm.leaf((8 + i) << 12)
        sp.spt[index] |= A_BIT  # the guest's access through it
    assert kvm_mmu_lookup_page(vm.kvm, 0x103) is not None and vm.kvm.stat["mmu_flooded"] == 0
    assert vm.vcpu.last_pt_write_count == 1  # each store found the previous spte used: the count restarted


# -- a 32-bit guest: quadrants and the 4 MiB pde pair ------------------------------------------------------


def vm32(bugs=()) -> Vm:
    """A 32-bit guest: PD at 0x10000; PD[0] -> PT at 0x11000 mapping gva 4K page i to gfn 0x20 + i; PD[2] a
    4 MiB page at gpa 0x800000 (the hugetlb slot, backed by two 2 MiB regions)."""
    vm = make_vm(mmu="shadow", paging="32", cr3=0x10000, bugs=bugs)
    host = vm.host
    host.write_guest(0x10000, 0x11000 | P | W | U | A_BIT, 4)
    for i in range(1024):
        host.write_guest(0x11000 + 4 * i, ((0x20 + i) << 12) | P | W | U | A_BIT, 4)
    host.write_guest(0x10008, 0x800000 | P | W | U | A_BIT | D_BIT | PS, 4)
    assert kvm_mmu_reload(vm.vcpu, vm.kvm) == 0
    for gva in (0x3000, 0x203000, 0x801000, 0xA01000):
        assert vm.vcpu.page_fault(vm.vcpu, vm.kvm, gva, 0) == 0
    return vm


def test_a_32bit_pte_write_reaches_only_the_quadrant_that_shadows_it() -> None:
    vm = vm32()
    pts = {sp.quadrant: sp for sp in vm.kvm.mmu_page_hash[0x11]}
    assert sorted(pts) == [0, 1] and all(sp.level == 1 for sp in pts.values())
    low = pts[0].spt[3]
    old = vm.pfn(0x20 + 515)
    store(vm, 0x11000 + 4 * 515, (0x99 << 12) | P | W | U | A_BIT, 4)  # pte 515: quadrant 1, entry 3
    assert pts[0].spt[3] == low
    assert spte_to_pfn(pts[1].spt[3]) == vm.pfn(0x99)
    assert vm.count(old) == 0 and vm.count(vm.pfn(0x99)) == 1


def test_a_32bit_4mib_pde_write_zaps_both_shadow_pdes_and_updates_neither() -> None:
    vm = vm32()
    pd = next(sp for sp in vm.kvm.mmu_page_hash[0x10] if sp.quadrant == 0)
    assert spte_to_pfn(pd.spt[4]) == vm.pfn(0x800) and spte_to_pfn(pd.spt[5]) == vm.pfn(0xA00)
    pde = 0x800000 | P | W | U | A_BIT | D_BIT | PS
    store(vm, 0x10008, pde, 4)
    assert pd.spt[4] == pd.spt[5] == TRAP
    assert vm.kvm.stat["mmu_pde_zapped"] == 2 and vm.kvm.stat["mmu_pte_updated"] == 0
    assert vm.count(vm.pfn(0x800)) == vm.count(vm.pfn(0xA00)) == 0


def test_pse32_double_update_maps_both_halves_to_the_first_2mib() -> None:
    vm = vm32(bugs=("pse32-double-update",))
    pd = next(sp for sp in vm.kvm.mmu_page_hash[0x10] if sp.quadrant == 0)
    store(vm, 0x10008, 0x800000 | P | W | U | A_BIT | D_BIT | PS, 4)
    assert vm.kvm.stat["mmu_pte_updated"] == 2
    assert spte_to_pfn(pd.spt[4]) == spte_to_pfn(pd.spt[5]) == vm.pfn(0x800)  # gva 0xA00000 now reaches 0x800000
    assert vm.count(vm.pfn(0x800)) == 2 and vm.count(vm.pfn(0xA00)) == 0


# -- role mismatch -----------------------------------------------------------------------------------------


def test_a_page_of_another_context_is_zapped_not_updated() -> None:
    vm = paged()
    vm.vcpu.cpu.efer_nx = not vm.vcpu.cpu.efer_nx  # the faulting context's role no longer matches
    pt = kvm_mmu_lookup_page(vm.kvm, 0x103)
    assert pt is not None
    store(vm, PT + 8 * 3, 0x9000 | P | W | U | A_BIT)
    assert pt.spt[3] == TRAP
    assert vm.kvm.stat["mmu_pte_updated"] == 0
    assert vm.referenced() == {}  # the old reference dropped, the parked one released
