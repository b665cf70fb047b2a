"""Issue #18: what v2.6.26/27 do at the edges (docs/fidelity.md), each through the Python API."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import Vm, log_hook, make_paged_vm, make_vm

import kvmpfn.replay as replay_module
from kvmpfn.kvm.mmu import kvm_mmu_get_page, slot_edge_write_counts
from kvmpfn.kvm.spte import is_shadow_present_pte
from kvmpfn.kvm.vm import EPT_FAKE_ACCESSED_MASK, EPT_FAKE_DIRTY_MASK
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import open_trace
from kvmpfn.x86 import INVALID_PAGE, PT_ACCESSED_MASK

TRACES = Path(__file__).resolve().parents[1] / "traces"


# -- kvm_set_cr3 -----------------------------------------------------------------------------------------------


def test_cr3_outside_every_memslot_is_a_gp_and_keeps_cr3():
    vm = make_paged_vm(maps=[(0, 16)])
    cr3 = vm.vcpu.cpu.cr3
    assert vm.access(0x5000)["result"] == "mapped"
    root = vm.vcpu.root_hpa
    assert vm.apply(ev.Cr3(val=0x40000000)) == {"result": "guest_fault", "vector": "gp"}
    assert vm.vcpu.cpu.cr3 == cr3 and vm.vcpu.root_hpa == root


@pytest.mark.parametrize(("tdp", "paging", "gp"), [("npt", "64", False), ("ept", "64", False), ("ept", "none", True)])
def test_tdp_intercepts_cr3_loads_only_for_ept_with_paging_off(tdp, paging, gp):
    vm = make_vm(paging=paging)
    vm.kvm.tdp_flavour = tdp
    out = vm.apply(ev.Cr3(val=0x40000000))
    assert out == ({"result": "guest_fault", "vector": "gp"} if gp else {"result": "ok"})


def test_pae_reload_of_the_same_cr3_reloads_when_the_pdptes_changed():
    vm = make_vm(mmu="shadow", paging="pae", cr3=0x1000)
    vm.host.write_guest(0x1000, 0x2001, 8)
    assert vm.apply(ev.Cr3(val=0x1000)) == {"result": "ok"}
    assert vm.vcpu.cpu.pdptrs[0] == 0x2001  # pdptrs_changed: loaded again
    assert vm.access(0x0)["result"] in ("guest_fault", "mapped")
    assert vm.vcpu.root_hpa != INVALID_PAGE
    assert vm.apply(ev.Cr3(val=0x1000)) == {"result": "ok"}
    assert vm.vcpu.root_hpa != INVALID_PAGE  # unchanged PDPTEs: a TLB flush, the roots stay
    vm.host.write_guest(0x1008, 0x3001, 8)
    assert vm.apply(ev.Cr3(val=0x1000)) == {"result": "ok"}
    assert vm.vcpu.root_hpa == INVALID_PAGE and vm.vcpu.cpu.pdptrs[1] == 0x3001


# -- memslots --------------------------------------------------------------------------------------------------


def test_a_memslot_size_change_is_refused_and_changes_nothing():
    vm = make_vm()
    before = vm.host.memslot(1)
    slots_before = dict(vm.kvm.slots)
    assert vm.memslot(1, 0x800, 0x200, "hugetlb") == {"result": "error"}
    assert vm.host.memslot(1) is before and vm.kvm.slots == slots_before
    assert vm.memslot(1, 0x2000, 0x400, "hugetlb") == {"result": "ok"}  # a move keeps npages
    assert vm.memslot(1, 0x2000, 0, "hugetlb") == {"result": "ok"}  # a deletion
    assert vm.memslot(1, 0x2000, 0x10, "ram") == {"result": "ok"}  # a new slot in the freed id


def test_a_slot_inside_one_2mib_region_presets_its_write_count_once():
    assert slot_edge_write_counts(0x10, 0x10) == {0: 1}
    assert slot_edge_write_counts(0x10, 0x400) == {0: 1, 2: 1}
    assert slot_edge_write_counts(0x200, 0x400) == {}
    vm = make_vm(memslots=((0, 0x10, 0x10, "ram"),))
    assert vm.kvm.slots[0].write_count == {0: 1}
    vm.rp.auditor.full_audit("test")
    assert [f for f in vm.rp.findings.items if f["code"] == "write-count"] == []


# -- KVM_GET_DIRTY_LOG -----------------------------------------------------------------------------------------


def test_get_dirty_log_write_protects_only_when_something_was_dirty(monkeypatch):
    vm = make_vm()
    calls = []
    real = replay_module.kvm_mmu_slot_remove_write_access
    monkeypatch.setattr(
        replay_module, "kvm_mmu_slot_remove_write_access", lambda kvm, s: calls.append(s) or real(kvm, s)
    )
    assert vm.dirty_log(0) == {"result": "ok"} and calls == [0]  # logging switched on: a memslot update
    assert vm.dirty_log(0) == {"result": "ok"} and calls == [0]  # nothing dirty
    assert vm.access(0x3000, write=True)["result"] == "mapped"
    assert vm.kvm.slots[0].dirty_bitmap == {3}
    assert vm.dirty_log(0) == {"result": "ok"} and calls == [0, 0]
    assert vm.kvm.slots[0].dirty_bitmap == set()
    assert vm.dirty_log(0, stop=True) == {"result": "ok"} and calls == [0, 0, 0]  # switched off: an update


# -- inject enomem, emulator_write_phys -----------------------------------------------------------------------


def test_enomem_is_consumed_by_the_emulated_pte_write():
    vm = make_paged_vm(maps=[(0, 16)])
    pte = vm.tables.map(0x5000, 0x5000)
    assert vm.access(0x5000, write=True)["result"] == "mapped"
    old = vm.host.read_guest(pte, 8)
    vm.inject("enomem")
    assert vm.apply(ev.PteWrite(gpa=pte, val=0x6007, len=8))["result"] == "error"
    assert vm.host.read_guest(pte, 8) == old and vm.kvm.inject["enomem"] == 0
    assert vm.access(0x5000)["result"] == "hit"


def test_enomem_at_the_top_up_before_emulation():
    """kvm_mmu_page_fault tops up again before emulate_instruction: the second injected failure hits there."""
    vm = make_vm()
    vm.inject("enomem", 2)
    assert vm.access(0xFE000000)["result"] == "error"  # the fault's own top-up
    assert vm.access(0xFE000000)["result"] == "error"  # MMIO: the top-up before emulating
    assert vm.access(0xFE000000)["result"] == "mmio"


def test_a_pte_write_outside_every_memslot_skips_kvm_mmu_pte_write():
    vm = make_paged_vm(maps=[(0, 16)])
    writes = vm.kvm.stat["mmu_pte_write"]
    assert vm.apply(ev.PteWrite(gpa=0x40000000, val=0x6007, len=8)) == {"result": "mmio"}
    assert vm.kvm.stat["mmu_pte_write"] == writes


def test_cmpxchg_gpte_releases_bad_page_dirty():
    vm = make_paged_vm(maps=[(0, 16)])
    vm.inject("gup_fail")  # the A-bit cmpxchg_gpte's gfn_to_page
    vm.access(0x5000)
    bad = vm.api.bad_pfn
    names = [fn for op, pfn, fn, caller in vm.log if pfn == bad and caller == "cmpxchg_gpte"]
    assert names == ["gfn_to_page", "kvm_release_pfn_dirty", "kvm_release_pfn_dirty"]  # get, dirty, put


# -- the era's role, FNAME(fetch), walk_addr -------------------------------------------------------------------


def test_the_era_role_shares_pages_across_cr4_pse_and_efer_nx():
    for bugs, shared in (((), False), (("role-ignores-pse-nx",), True)):
        vm = make_paged_vm(maps=[(0, 16)], bugs=bugs)
        kvm, vcpu = vm.kvm, vm.vcpu
        a = kvm_mmu_get_page(vcpu, kvm, 0x123, 0, 1, 0, 7, None)
        vcpu.cpu.efer_nx = not vcpu.cpu.efer_nx
        vcpu.cpu.cr4_pse = not vcpu.cpu.cr4_pse
        b = kvm_mmu_get_page(vcpu, kvm, 0x123, 0, 1, 0, 7, None)
        assert (a is b) == shared


def test_fetch_large_rmap_remove_implies_the_era_role():
    vm = make_vm(mmu="shadow", paging="32", bugs=("fetch-large-rmap-remove",))
    assert "role-ignores-pse-nx" in vm.kvm.bugs


def test_walk_read_unchecked_reads_through_to_the_table_frame():
    path = str(TRACES / "mutants" / "walk-table-outside-slots.jsonl")
    out = io.StringIO()
    result = replay_file(path, ReplayOptions(bugs=frozenset({"walk-read-unchecked"})), out)
    results = [line for line in out.getvalue().splitlines() if '"access"' in line]
    assert all('"mmio"' in line and '"gpa": "0x20000000"' in line for line in results)
    assert [f["code"] for f in result.findings] == ["fault-loop"]
    assert "restarts forever" in result.findings[0]["message"]


# -- EPT ---------------------------------------------------------------------------------------------------------


def ept_vm(kernel: str) -> Vm:
    """``make_vm``'s VM with ``"tdp": "ept"`` in its header."""
    vm = make_vm(kernel=kernel)
    header = vm.rp.header
    header.tdp = "ept"
    ept = Vm(Replayer(header, ReplayOptions()))
    log_hook(ept.api, ept.log)
    ept.rp.vcpu(0)
    return ept


@pytest.mark.parametrize(
    ("kernel", "fake_d", "a_mask"), [("pfn", EPT_FAKE_DIRTY_MASK, EPT_FAKE_ACCESSED_MASK), ("pfn-io", 0, 0)]
)
def test_ept_sptes_use_the_ept_format_and_are_never_accessed(kernel, fake_d, a_mask):
    vm = ept_vm(kernel)
    assert vm.kvm.tdp_flavour == "ept" and vm.kvm.shadow_accessed_mask == a_mask
    rec = vm.access(0x3000, write=True)
    pfn = int(rec["pfn"], 16)
    assert int(rec["spte"], 16) == fake_d | pfn << 12 | 0x37  # R|W|X, memory type 6
    assert vm.access(0x3000)["result"] == "hit"
    for sp in vm.kvm.active_mmu_pages.values():  # the CPU sets no A bit in EPT tables
        assert not any(is_shadow_present_pte(e) and e & PT_ACCESSED_MASK and not e & 0x30 for e in sp.spt)
    vm.teardown()
    assert not [op for op in vm.log if op[0] == "accessed"]


def test_npt_sptes_keep_the_x86_format_and_report_accessed():
    vm = make_vm()
    assert vm.kvm.tdp_flavour == "npt"
    rec = vm.access(0x3000, write=True)
    assert int(rec["spte"], 16) & 0xFFF == 0x067
    vm.access(0x3000)
    vm.teardown()
    assert [op[3] for op in vm.log if op[0] == "accessed"] == ["rmap_remove"]


def test_the_tdp_header_field_and_its_override(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"kvmpfn": 1, "mmu": "tdp", "tdp": "ept", "guest": {"paging": "none"}}\n'
        '{"op": "access", "addr": "0x1000", "write": 1, "user": 0, "fetch": 0}\n'
    )
    with open_trace(str(path)) as reader:
        assert reader.header.tdp == "ept"
    for opts, ept in ((ReplayOptions(), True), (ReplayOptions(tdp="npt"), False)):
        out = io.StringIO()
        replay_file(str(path), opts, out)
        spte = int(out.getvalue().split('"spte": "')[1].split('"')[0], 16)
        assert bool(spte & 0x30 == 0x30) == ept
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kvmpfn": 1, "mmu": "tdp", "tdp": "vmx"}\n')
    result = replay_file(str(bad))
    assert result.error is not None and "tdp" in result.error


def test_the_tdp_corpus_audits_clean_under_ept():
    """The auditor's checks hold for the EPT spte format too: every TDP trace of the corpus finds under EPT
    exactly what it finds under NPT."""
    paths = []
    for p in sorted(TRACES.rglob("*.jsonl")):
        with open_trace(str(p)) as reader:
            if reader.header.mmu == "tdp" and not p.parent.name == "recorded":
                paths.append(p)
    assert len(paths) > 10
    for p in paths:
        npt = replay_file(str(p), ReplayOptions(tdp="npt"))
        ept = replay_file(str(p), ReplayOptions(tdp="ept"))
        assert sorted(f["code"] for f in ept.findings) == sorted(f["code"] for f in npt.findings), p
        assert (ept.error is None) == (npt.error is None), p
