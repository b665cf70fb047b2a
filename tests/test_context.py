"""kvmpfn/kvm/context.py through the Python API: the MMU context of each guest mode (``init_kvm_mmu``),
``kvm_mmu_reset_context``, ``kvm_set_cr3`` (x86.c: the TLB-flush shortcut, the PDPTE load, the memslot #GP),
``guest_access``'s retry rule (an exit is retried up to three times, then reported as a loop) and
``recorded_fault`` (a ``pf`` event straight into ``kvm_mmu_page_fault``).

End-to-end shadow scenarios (contexts and CR3 switches inside whole traces) stay in test_shadow_scenarios.py.
"""

from __future__ import annotations

import pytest
from conftest import RAM_SLOT, make_paged_vm, make_vm

from kvmpfn.kvm.context import (
    guest_access,
    init_kvm_mmu,
    kvm_mmu_reload,
    kvm_mmu_reset_context,
    kvm_set_cr3,
    recorded_fault,
)
from kvmpfn.kvm.mmu import (
    TDP_ROOT_LEVEL,
    mmu_free_roots,
    nonpaging_page_fault,
    nonpaging_prefetch_page,
    tdp_page_fault,
)
from kvmpfn.kvm.paging import paging_page_fault, prefetch_page
from kvmpfn.x86 import INVALID_PAGE, PAGE_SHIFT, PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK

# (mmu, paging) -> page_fault, prefetch_page, root_level, shadow_root_level, new_cr3
CONTEXTS = {
    ("tdp", "none"): (tdp_page_fault, nonpaging_prefetch_page, 0, TDP_ROOT_LEVEL, None),
    ("tdp", "64"): (tdp_page_fault, nonpaging_prefetch_page, 4, TDP_ROOT_LEVEL, None),
    ("shadow", "none"): (nonpaging_page_fault, nonpaging_prefetch_page, 0, 3, None),
    ("shadow", "32"): (paging_page_fault, prefetch_page, 2, 3, mmu_free_roots),
    ("shadow", "pae"): (paging_page_fault, prefetch_page, 3, 3, mmu_free_roots),
    ("shadow", "64"): (paging_page_fault, prefetch_page, 4, 4, mmu_free_roots),
}


@pytest.mark.parametrize(("mmu", "paging"), sorted(CONTEXTS))
def test_init_kvm_mmu_picks_the_context_of_the_mode(mmu: str, paging: str) -> None:
    vm = make_vm(mmu=mmu, paging=paging)
    vcpu = vm.vcpu
    want = CONTEXTS[mmu, paging]
    got = (vcpu.page_fault, vcpu.prefetch_page, vcpu.root_level, vcpu.shadow_root_level, vcpu.new_cr3)
    assert got == want
    assert vcpu.root_hpa == INVALID_PAGE
    assert vcpu.update_pte_pfn == vm.api.bad_pfn  # the seed's init


def test_init_kvm_mmu_follows_a_mode_change() -> None:
    vm = make_vm(mmu="shadow", paging="none")
    vcpu = vm.vcpu
    vcpu.cpu.paging = "64"
    init_kvm_mmu(vcpu, vm.kvm)
    assert (vcpu.page_fault, vcpu.root_level, vcpu.shadow_root_level) == (paging_page_fault, 4, 4)


def test_kvm_mmu_reset_context_frees_the_roots_and_keeps_the_pages() -> None:
    vm = make_paged_vm(maps=[(0, 16)])
    kvm, vcpu = vm.kvm, vm.vcpu
    assert guest_access(vcpu, kvm, 0x3000, False, False, False, False).result == "mapped"
    root = kvm.page_header[vcpu.root_hpa >> PAGE_SHIFT]
    pages = dict(kvm.active_mmu_pages)
    assert root.root_count == 1
    kvm_mmu_reset_context(vcpu, kvm)
    assert vcpu.root_hpa == INVALID_PAGE
    assert root.root_count == 0
    assert kvm.active_mmu_pages == pages  # cached: a reset frees no shadow page
    assert vm.referenced() == {vm.pfn(3): 1}  # the leaf keeps its reference
    assert kvm_mmu_reload(vcpu, kvm) == 0
    assert kvm.page_header[vcpu.root_hpa >> PAGE_SHIFT] is root and root.root_count == 1


def test_kvm_set_cr3_same_value_only_flushes_the_tlb() -> None:
    vm = make_paged_vm(maps=[(0, 16)])
    kvm, vcpu = vm.kvm, vm.vcpu
    assert kvm_mmu_reload(vcpu, kvm) == 0
    root_hpa = vcpu.root_hpa
    assert kvm_set_cr3(vcpu, kvm, vcpu.cpu.cr3) is True
    assert vcpu.root_hpa == root_hpa


def test_kvm_set_cr3_outside_every_memslot_is_a_gp() -> None:
    vm = make_paged_vm(maps=[(0, 16)])
    kvm, vcpu = vm.kvm, vm.vcpu
    assert kvm_mmu_reload(vcpu, kvm) == 0
    cr3, root_hpa = vcpu.cpu.cr3, vcpu.root_hpa
    assert kvm_set_cr3(vcpu, kvm, 0x4000_0000) is False  # gfn 0x40000: no memslot
    assert (vcpu.cpu.cr3, vcpu.root_hpa) == (cr3, root_hpa)


def test_kvm_set_cr3_to_a_new_table_frees_the_roots() -> None:
    vm = make_paged_vm(maps=[(0, 16)])
    kvm, vcpu = vm.kvm, vm.vcpu
    assert kvm_mmu_reload(vcpu, kvm) == 0
    old_root = kvm.page_header[vcpu.root_hpa >> PAGE_SHIFT]
    assert kvm_set_cr3(vcpu, kvm, 0x200000) is True
    assert vcpu.cpu.cr3 == 0x200000
    assert vcpu.root_hpa == INVALID_PAGE  # paging_new_cr3
    assert old_root.root_count == 0 and old_root.id in kvm.active_mmu_pages


def test_kvm_set_cr3_under_npt_is_not_intercepted() -> None:
    vm = make_vm(mmu="tdp", paging="64", cr3=0x10000)
    assert kvm_set_cr3(vm.vcpu, vm.kvm, 0x4000_0000) is True  # no memslot test: the load never exits
    assert vm.vcpu.cpu.cr3 == 0x4000_0000


def test_kvm_set_cr3_loads_the_pdptes_and_refuses_reserved_ones() -> None:
    vm = make_vm(mmu="shadow", paging="pae", cr3=0x10000)
    kvm, vcpu, host = vm.kvm, vm.vcpu, vm.host
    assert vcpu.cpu.pdptrs == [0, 0, 0, 0]
    host.write_guest(0x20000, 0x30001, 8)
    assert kvm_set_cr3(vcpu, kvm, 0x20000) is True
    assert vcpu.cpu.pdptrs == [0x30001, 0, 0, 0]
    host.write_guest(0x21000, 0x30001 | 1 << 1, 8)  # bit 1 of a present PDPTE is reserved
    assert kvm_set_cr3(vcpu, kvm, 0x21000) is False
    assert (vcpu.cpu.cr3, vcpu.cpu.pdptrs) == (0x20000, [0x30001, 0, 0, 0])
    # the same CR3 is reloaded when the PDPTEs in memory changed (pdptrs_changed)
    host.write_guest(0x20008, 0x31001, 8)
    assert kvm_set_cr3(vcpu, kvm, 0x20000) is True
    assert vcpu.cpu.pdptrs == [0x30001, 0x31001, 0, 0]


def test_guest_access_retries_an_exit_and_maps() -> None:
    vm = make_vm(mmu="tdp", paging="none", memslots=(RAM_SLOT, (1, 0x100000, 0x10, "ram")))
    out = guest_access(vm.vcpu, vm.kvm, 0x100001000, True, False, False, False)
    pfn = vm.pfn(0x100001)
    assert (out.result, out.gpa, out.pfn, out.looped) == ("mapped", 0x100001000, pfn, False)
    assert [op[:2] for op in vm.ops("get")] == [("get", pfn)]  # one exit, then the retry hit
    assert vm.referenced() == {pfn: 1}
    again = guest_access(vm.vcpu, vm.kvm, 0x100001000, True, False, False, False)
    assert (again.result, again.pfn, again.spte) == ("hit", pfn, out.spte)


def test_guest_access_reports_a_loop_after_three_fixed_exits() -> None:
    """``--bug tdp-gpa-32bit`` maps the truncated gpa, so every retry exits again: three faults, then the
    access is reported as looped (the kernel would re-enter the guest forever)."""
    vm = make_vm(mmu="tdp", paging="none", memslots=(RAM_SLOT, (1, 0x100000, 0x10, "ram")), bugs=("tdp-gpa-32bit",))
    out = guest_access(vm.vcpu, vm.kvm, 0x100001000, True, False, False, False)
    assert (out.result, out.gpa, out.pfn, out.spte, out.looped) == ("mapped", 0x100001000, None, None, True)
    gets = vm.ops("get")
    assert len(gets) == 3 and {op[3] for op in gets} == {"tdp_page_fault"}
    assert sum(vm.referenced().values()) == 1  # mmu_set_spte released the two duplicates
    path, _end = vm.walk(0x1000)
    assert len(path) == 4  # the truncated gpa got the leaf


def test_recorded_fault_maps_without_a_cpu_walk_of_the_shadow() -> None:
    vm = make_paged_vm(maps=[(0, 16)])
    out = recorded_fault(vm.vcpu, vm.kvm, 0x5000, PFERR_USER_MASK)
    sp, index = vm.leaf(0x5000)
    assert (out.result, out.gpa, out.pfn, out.spte) == ("mapped", 0x5000, vm.pfn(5), sp.spt[index])
    assert vm.referenced() == {vm.pfn(5): 1}


def test_recorded_fault_on_an_unmapped_gva_injects_the_guest_fault() -> None:
    vm = make_paged_vm(maps=[(0, 16)])
    err = PFERR_WRITE_MASK | PFERR_USER_MASK
    out = recorded_fault(vm.vcpu, vm.kvm, 0x50000, err)
    assert (out.result, out.err, out.pfn) == ("guest_fault", err & ~PFERR_PRESENT_MASK, None)
    assert vm.referenced() == {}
