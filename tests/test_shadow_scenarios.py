"""Shadow-paging scenarios (traces/shadow/): what each trace shows, checked on its outcome records and on the
MMU state between events.

Every trace in traces/shadow/ is replayed

- through ``replay_file`` with ``--emit`` to a StringIO: the records must be what the trace's comments say
  (result, gpa, pfn, spte, err, set_accessed, set_dirty);
- with an audit after every event, and with the kernel's own ``kvm_mmu_audit`` points, under the seed's
  ``pfn`` and the ``notifier`` variant: no finding (test_differential.py audits every guest-action trace here
  the same way, under both MMUs);
- through the Python API (``Replayer``), event by event, in every kernel variant: after teardown no frame
  holds a KVM reference, although frames were referenced while the guest ran.

The per-scenario tests then step through the trace with the Python API and look at the MMU between events:
speculative sptes after a pte rewrite, notrap entries, the zap of a flooded page table, roots kept across
CR3 switches, PDPTE registers.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest

from kvmpfn.kvm.context import shadow_walk
from kvmpfn.kvm.mmu import kvm_mmu_lookup_page
from kvmpfn.kvm.spte import NOTRAP, TRAP, is_shadow_present_pte, spte_to_pfn
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import open_trace
from kvmpfn.x86 import PAGE_SHIFT, PT_PAGE_SIZE_MASK, PT_WRITABLE_MASK

TRACES = Path(__file__).resolve().parent.parent / "traces" / "shadow"
ALL_TRACES = sorted(p.name for p in TRACES.glob("*.jsonl"))
SCENARIOS = (
    "64bit-build-and-touch.jsonl",
    "32bit-pse.jsonl",
    "pae-pdpte.jsonl",
    "pte-rewrite.jsonl",
    "free-page-table.jsonl",
    "cr3-switch.jsonl",
)
KERNELS = ("page", "pfn", "pfn-io", "notifier")


def emit(name: str, **options) -> tuple[object, list[dict]]:
    """Replay a trace with ``replay_file``; the result and the parsed outcome records."""
    buf = StringIO()
    result = replay_file(str(TRACES / name), ReplayOptions(**options), emit=buf)
    assert result.error is None, result.error
    return result, [json.loads(line) for line in buf.getvalue().splitlines()]


def accesses(records: list[dict]) -> dict[int, dict]:
    """The ``access`` records by seq, without seq/line/op/x."""
    return {
        r["seq"]: {k: v for k, v in r.items() if k not in ("seq", "line", "op", "x")}
        for r in records
        if r["op"] == "access"
    }


def results(records: list[dict], op: str) -> dict[int, str]:
    return {r["seq"]: r["result"] for r in records if r["op"] == op}


class Stepper:
    """A trace applied event by event through the Python API, for looking at the MMU in between."""

    def __init__(self, name: str, **options) -> None:
        with open_trace(str(TRACES / name)) as reader:
            self.header = reader.header
            self.events = [(line, e) for line, e in reader]
        self.rp = Replayer(self.header, ReplayOptions(**options))
        self.seq = 0
        self.records: list[dict] = []

    def run_to(self, seq: int) -> None:
        """Apply every event before ``seq``."""
        while self.seq < seq:
            line, e = self.events[self.seq]
            self.records.append(self.rp.apply(self.seq, line, e))
            self.seq += 1

    def finish(self) -> None:
        self.run_to(len(self.events))
        self.rp.do_teardown()

    @property
    def kvm(self):
        return self.rp.kvm

    @property
    def vcpu(self):
        return self.rp.vcpu(0)

    def walk(self, gva: int) -> tuple[list, int]:
        return shadow_walk(self.vcpu, self.kvm, gva)

    def refs(self, gfn: int) -> int:
        """KVM's references on the frame behind ``gfn``."""
        pfn = self.rp.host.peek_pfn(gfn)
        frame = self.rp.host.frames.get(pfn) if pfn is not None else None
        return 0 if frame is None else frame.count

    def pfn(self, gfn: int) -> int:
        pfn = self.rp.host.peek_pfn(gfn)
        assert pfn is not None
        return pfn


# --- every trace: clean, and every reference returned ----------------------------------------------------


def test_the_scenarios_exist() -> None:
    assert set(SCENARIOS) <= set(ALL_TRACES)


@pytest.mark.parametrize("kernel", ("pfn", "notifier"))
@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("audit", [{"audit_every": 1}, {"kernel_audit": True}], ids=["audit-every-1", "kernel-audit"])
def test_trace_is_clean(name: str, kernel: str, audit: dict) -> None:
    result, records = emit(name, kernel=kernel, **audit)
    assert result.findings == [], [(f["code"], f["seq"], f["message"]) for f in result.findings]
    assert "error" not in results(records, "access").values()
    assert result.events == len(records) > 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ALL_TRACES)
def test_teardown_returns_every_reference(name: str, kernel: str) -> None:
    s = Stepper(name, kernel=kernel)
    peak = 0
    for seq in range(1, len(s.events) + 1):
        s.run_to(seq)
        peak = max(peak, sum(1 for f in s.rp.host.frames.values() if f.count))
    assert peak > 0, "the guest never made KVM take a reference"
    s.rp.do_teardown()
    assert {hex(pfn): f.count for pfn, f in s.rp.host.frames.items() if f.count} == {}
    assert s.kvm.active_mmu_pages == {}
    assert s.rp.findings.items == []


# --- 64-bit: building the tables and touching memory ----------------------------------------------------------

BUILD_64 = {
    8: {
        "result": "mapped",
        "gpa": "0x10000",
        "pfn": "0x100004",
        "spte": "0x100004065",  # P|U|A|D, read-only: the guest pte is not dirty yet
        "set_accessed": ["0x1000", "0x2000", "0x3000", "0x4000"],
    },
    9: {"result": "hit", "gpa": "0x10008", "pfn": "0x100004", "spte": "0x100004065", "set_accessed": []},
    10: {
        "result": "mapped",
        "gpa": "0x10010",
        "pfn": "0x100004",
        "spte": "0x100004067",
        "set_accessed": [],
        "set_dirty": "0x4000",
    },
    11: {"result": "hit", "gpa": "0x10018", "pfn": "0x100004", "spte": "0x100004067", "set_accessed": []},
    12: {"result": "mapped", "gpa": "0x11000", "pfn": "0x100005", "spte": "0x100005061", "set_accessed": ["0x4008"]},
    13: {"result": "guest_fault", "err": "0x5", "set_accessed": []},
    14: {"result": "guest_fault", "err": "0x3", "set_accessed": []},
    15: {"result": "guest_fault", "err": "0x15", "set_accessed": []},
    16: {
        "result": "mapped",
        "gpa": "0x12000",
        "pfn": "0x100006",
        "spte": "0x8000000100006065",  # NX
        "set_accessed": ["0x4010"],
    },
    17: {"result": "mapped", "gpa": "0x13000", "pfn": "0x100007", "spte": "0x100007067", "set_accessed": []},
    18: {"result": "guest_fault", "err": "0x4", "set_accessed": []},
    19: {"result": "guest_fault", "err": "0x2", "set_accessed": []},
}


def test_64bit_build_and_touch_records() -> None:
    _, records = emit("64bit-build-and-touch.jsonl")
    assert set(results(records, "write").values()) == {"ok"}  # nothing is shadowed while the tables are built
    assert accesses(records) == BUILD_64


def test_64bit_build_and_touch_shadows_and_protects_the_tables() -> None:
    s = Stepper("64bit-build-and-touch.jsonl")
    s.run_to(8)
    assert s.kvm.active_mmu_pages == {}
    s.run_to(9)
    shadowed = sorted((sp.gfn, sp.level) for sp in s.kvm.active_mmu_pages.values())
    assert shadowed == [(0x1, 4), (0x2, 3), (0x3, 2), (0x4, 1)]
    for gfn in (1, 2, 3, 4):
        assert kvm_mmu_lookup_page(s.kvm, gfn) is not None
    assert s.refs(0x10) == 1
    # PD[1] and PML4[255] were not present when their tables were shadowed: notrap, the #PF needs no exit
    assert s.walk(0x200000)[1] == NOTRAP
    assert s.walk(0x7FFFFFFFE000)[1] == NOTRAP
    # PT[1] is present: trap until KVM maps it
    assert s.walk(0x1000)[1] == TRAP
    s.finish()
    assert s.rp.findings.items == []


# --- 32-bit paging with PSE ----------------------------------------------------------------------------------

PSE_32 = {
    6: {
        "result": "mapped",
        "gpa": "0x10000",
        "pfn": "0x100002",
        "spte": "0x100002065",
        "set_accessed": ["0x1000", "0x2000"],
    },
    7: {
        "result": "mapped",
        "gpa": "0x10004",
        "pfn": "0x100002",
        "spte": "0x100002067",
        "set_accessed": [],
        "set_dirty": "0x2000",
    },
    8: {"result": "mapped", "gpa": "0x11000", "pfn": "0x100003", "spte": "0x100003065", "set_accessed": ["0x2004"]},
    9: {"result": "guest_fault", "err": "0x7", "set_accessed": []},
    10: {"result": "guest_fault", "err": "0x3", "set_accessed": []},
    11: {"result": "mapped", "gpa": "0x401000", "pfn": "0x100004", "spte": "0x100004065", "set_accessed": ["0x1004"]},
    # the D write resyncs PD[1] (kvm_mmu_pte_write), whose guess parks gfn 0x400 first: pfn 0x100005
    12: {
        "result": "mapped",
        "gpa": "0x5ff000",
        "pfn": "0x100006",
        "spte": "0x100006067",
        "set_accessed": [],
        "set_dirty": "0x1004",
    },
    13: {"result": "mapped", "gpa": "0x600010", "pfn": "0x100007", "spte": "0x100007067", "set_accessed": []},
    # hugetlbfs: 2 MiB sptes (PS), 512-aligned host blocks; read-only (PD[2] not dirty)
    14: {"result": "mapped", "gpa": "0x800000", "pfn": "0x100200", "spte": "0x1002000e5", "set_accessed": ["0x1008"]},
    15: {"result": "hit", "gpa": "0x9ff008", "pfn": "0x1003ff", "spte": "0x1002000e5", "set_accessed": []},
    16: {"result": "mapped", "gpa": "0xa00000", "pfn": "0x100400", "spte": "0x1004000e5", "set_accessed": []},
    17: {"result": "guest_fault", "err": "0x4", "set_accessed": []},  # no FETCH bit without NX/SMEP
}


def test_32bit_pse_records() -> None:
    _, records = emit("32bit-pse.jsonl")
    assert accesses(records) == PSE_32


def test_32bit_pse_shadow_pages() -> None:
    """The 1024-entry guest tables take 512-entry shadow pages by quadrant; a 4 MiB page is two 2 MiB halves:
    metaphysical level-1 pages over RAM, large sptes over hugetlbfs."""
    s = Stepper("32bit-pse.jsonl")
    s.run_to(len(s.events))
    pages = s.kvm.active_mmu_pages.values()
    roots = sorted((sp.gfn, sp.level, sp.quadrant) for sp in pages if sp.root_count)
    assert roots == [(0x1, 2, q) for q in range(4)]
    pt = [(sp.level, sp.quadrant) for sp in pages if sp.gfn == 0x2 and not sp.metaphysical]
    assert pt == [(1, 0)]  # gvas 0x0 and 0x1000 are both in the first 2 MiB of the PT
    # the RAM 4 MiB page: one metaphysical page per 2 MiB half, keyed by the page's gfn and the quadrant;
    # the read-only one made before PD[1] was dirty is unlinked when the D write resyncs PD[1]
    halves = sorted(
        (sp.gfn, sp.quadrant, bool(sp.access & PT_WRITABLE_MASK), len(sp.parent_ptes))
        for sp in pages
        if sp.metaphysical
    )
    assert halves == [(0x400, 0, False, 0), (0x400, 0, True, 1), (0x400, 1, True, 1)]
    for gva, gfn in ((0x800000, 0x800), (0xA00000, 0xA00)):
        path, end = s.walk(gva)
        assert end & PT_PAGE_SIZE_MASK and path[-1][0].level == 2
        assert spte_to_pfn(end) == s.pfn(gfn)
    s.rp.do_teardown()
    assert s.rp.findings.items == []


# --- PAE: PDPTEs loaded at CR3 ------------------------------------------------------------------------------

PAE = {
    7: {
        "result": "mapped",
        "gpa": "0x10000",
        "pfn": "0x100004",
        "spte": "0x100004067",
        "set_accessed": ["0x2000", "0x4000"],  # no A in the PDPTE
        "set_dirty": "0x4000",
    },
    8: {"result": "guest_fault", "err": "0x15", "set_accessed": []},
    9: {
        "result": "mapped",
        "gpa": "0x11000",
        "pfn": "0x100005",
        "spte": "0x8000000100005065",
        "set_accessed": ["0x4008"],
    },
    10: {"result": "guest_fault", "err": "0x4", "set_accessed": []},
    11: {"result": "mapped", "gpa": "0x200000", "pfn": "0x100006", "spte": "0x100006065", "set_accessed": ["0x3000"]},
    12: {
        "result": "mapped",
        "gpa": "0x3ff000",
        "pfn": "0x100007",
        "spte": "0x100007067",
        "set_accessed": [],
        "set_dirty": "0x3000",
    },
    14: {"result": "guest_fault", "err": "0x4", "set_accessed": []},
    16: {"result": "hit", "gpa": "0x10000", "pfn": "0x100004", "spte": "0x100004067", "set_accessed": []},
    19: {"result": "guest_fault", "err": "0x0", "set_accessed": []},
    20: {"result": "hit", "gpa": "0x10008", "pfn": "0x100004", "spte": "0x100004067", "set_accessed": []},
}


def test_pae_records() -> None:
    _, records = emit("pae-pdpte.jsonl")
    assert accesses(records) == PAE
    assert results(records, "write")[13] == "ok"  # the PDPT page is not shadowed in PAE paging
    cr3 = {r["seq"]: r for r in records if r["op"] == "cr3"}
    assert cr3[6]["result"] == cr3[15]["result"] == "ok"
    assert cr3[18]["result"] == "guest_fault" and cr3[18]["vector"] == "gp"


def test_pae_pdptes_are_registers() -> None:
    s = Stepper("pae-pdpte.jsonl")
    s.run_to(8)
    vcpu = s.vcpu
    assert vcpu.cpu.cr3 == 0x1020
    assert vcpu.cpu.pdptrs == [0x2001, 0, 0x3001, 0]
    assert vcpu.pae_root[1] == 0 and vcpu.pae_root[3] == 0  # absent PDPTE: absent root entry
    s.run_to(15)  # PDPTE[1] stored in memory, not loaded
    assert s.rp.host.read_guest(0x1028, 8) == 0x2001
    assert vcpu.cpu.pdptrs[1] == 0
    s.run_to(17)  # CR3 reloaded, gva 0x40000000 accessed
    assert vcpu.cpu.pdptrs == [0x2001, 0x2001, 0x3001, 0]
    assert vcpu.pae_root[0] == vcpu.pae_root[1]  # one shadow page of PD 0x2, root of both slots
    assert s.kvm.page_header[vcpu.pae_root[0] >> PAGE_SHIFT].root_count == 2
    s.run_to(19)  # the failed load leaves everything as it was
    assert vcpu.cpu.cr3 == 0x1020
    assert vcpu.cpu.pdptrs == [0x2001, 0x2001, 0x3001, 0]
    s.finish()
    assert s.rp.findings.items == []


# --- a pte rewrite of a shadowed table ---------------------------------------------------------------------

REWRITE = {
    5: {
        "result": "mapped",
        "gpa": "0x10000",
        "pfn": "0x100004",
        "spte": "0x100004065",
        "set_accessed": ["0x1000", "0x2000", "0x3000", "0x4000"],
    },
    8: {"result": "hit", "gpa": "0x11008", "pfn": "0x100005", "spte": "0x100005065", "set_accessed": []},
    9: {
        "result": "mapped",
        "gpa": "0x11008",
        "pfn": "0x100005",
        "spte": "0x100005067",
        "set_accessed": [],
        "set_dirty": "0x4000",
    },
    11: {"result": "mapped", "gpa": "0x12010", "pfn": "0x100006", "spte": "0x100006065", "set_accessed": ["0x4000"]},
    13: {"result": "hit", "gpa": "0x13018", "pfn": "0x100007", "spte": "0x100007067", "set_accessed": []},
    15: {"result": "guest_fault", "err": "0x4", "set_accessed": []},
}


def test_pte_rewrite_records() -> None:
    _, records = emit("pte-rewrite.jsonl")
    assert accesses(records) == REWRITE
    writes = results(records, "write")
    assert writes[6] == "ok"  # the data page is not a page table
    assert [writes[i] for i in (7, 10, 12, 14)] == ["emulated"] * 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_pte_rewrite_updates_the_spte(kernel: str) -> None:
    s = Stepper("pte-rewrite.jsonl", kernel=kernel)
    api = s.rp.api
    s.run_to(7)
    assert s.refs(0x10) == 1
    # present + accessed: update_pte installs the new translation before the guest touches it
    s.run_to(8)
    path, end = s.walk(0x0)
    assert is_shadow_present_pte(end) and spte_to_pfn(end) == s.pfn(0x11)
    assert not end & PT_WRITABLE_MASK  # the new gpte is not dirty
    assert s.refs(0x10) == 0 and s.refs(0x11) == 1
    assert s.vcpu.update_pte_pfn == api.bad_pfn  # the parked reference was given back
    assert s.kvm.stat["mmu_pte_updated"] >= 1
    # present, not accessed: zapped to trap, the next access exits
    s.run_to(11)
    assert s.walk(0x0)[1] == TRAP
    assert s.refs(0x11) == 0 and s.refs(0x12) == 0
    s.run_to(12)
    assert s.refs(0x12) == 1
    # a 4-byte store of the low half: the whole gpte is read back, and it is dirty: a writable spte
    s.run_to(13)
    end = s.walk(0x0)[1]
    assert spte_to_pfn(end) == s.pfn(0x13) and end & PT_WRITABLE_MASK
    # not present: notrap, and the reference is gone
    s.run_to(15)
    assert s.walk(0x0)[1] == NOTRAP
    assert s.refs(0x13) == 0
    s.finish()
    assert s.rp.findings.items == []


# --- a freed page table: flood detection -------------------------------------------------------------------


def test_free_page_table_records() -> None:
    _, records = emit("free-page-table.jsonl")
    writes = results(records, "write")
    assert [writes[i] for i in (8, 10, 11, 12, 13)] == ["emulated", "emulated", "emulated", "emulated", "ok"]
    acc = accesses(records)
    assert acc[6]["set_dirty"] == "0x4000" and acc[7]["set_dirty"] == "0x4008"
    assert acc[9] == {"result": "guest_fault", "err": "0x4", "set_accessed": []}


@pytest.mark.parametrize("kernel", KERNELS)
def test_free_page_table_is_zapped_at_the_third_store(kernel: str) -> None:
    s = Stepper("free-page-table.jsonl", kernel=kernel)
    s.run_to(9)  # PD[0] cleared: the PT's shadow page is unlinked, not zapped
    pt = kvm_mmu_lookup_page(s.kvm, 0x4)
    assert pt is not None and pt.parent_ptes == []
    assert s.refs(0x10) == s.refs(0x11) == 1
    s.run_to(12)  # two stores into gfn 0x4
    assert kvm_mmu_lookup_page(s.kvm, 0x4) is pt
    assert s.vcpu.last_pt_write_gfn == 0x4 and s.vcpu.last_pt_write_count == 2
    assert s.kvm.stat["mmu_flooded"] == 0
    s.run_to(13)  # the third: flooded
    assert kvm_mmu_lookup_page(s.kvm, 0x4) is None
    assert pt.id not in s.kvm.active_mmu_pages
    assert s.kvm.stat["mmu_flooded"] == 1
    assert s.refs(0x10) == s.refs(0x11) == 0
    s.run_to(14)
    assert s.records[13]["result"] == "ok"
    assert s.rp.host.read_guest(0x4018, 8) == 0xA
    s.finish()
    assert s.rp.findings.items == []


# --- CR3 switches ----------------------------------------------------------------------------------------------

CR3 = {
    14: {
        "result": "mapped",
        "gpa": "0x10000",
        "pfn": "0x10000b",
        "spte": "0x10000b067",
        "set_accessed": ["0x1000", "0x2000", "0x3000", "0x4000"],
        "set_dirty": "0x4000",
    },
    15: {
        "result": "mapped",
        "gpa": "0x30000",
        "pfn": "0x10000c",
        "spte": "0x10000c063",
        "set_accessed": ["0x1ff8", "0x9000", "0xa000", "0xb000"],
        "set_dirty": "0xb000",
    },
    17: {
        "result": "mapped",
        "gpa": "0x20000",
        "pfn": "0x10000d",
        "spte": "0x10000d067",
        "set_accessed": ["0x5000", "0x6000", "0x7000", "0x8000"],
        "set_dirty": "0x8000",
    },
    18: {"result": "mapped", "gpa": "0x30000", "pfn": "0x10000c", "spte": "0x10000c063", "set_accessed": ["0x5ff8"]},
    20: {"result": "hit", "gpa": "0x10000", "pfn": "0x10000b", "spte": "0x10000b067", "set_accessed": []},
    23: {"result": "hit", "gpa": "0x21000", "pfn": "0x10000e", "spte": "0x10000e067", "set_accessed": []},
    24: {"result": "guest_fault", "err": "0x5", "set_accessed": []},
}


def test_cr3_switch_records() -> None:
    _, records = emit("cr3-switch.jsonl")
    assert accesses(records) == CR3
    assert results(records, "write")[21] == "emulated"  # B's PT, shadowed, while A runs


def test_cr3_switch_keeps_shadow_pages() -> None:
    s = Stepper("cr3-switch.jsonl")
    s.run_to(16)  # A ran
    root_a = s.vcpu.root_hpa
    pages_a = set(s.kvm.active_mmu_pages)
    assert len(pages_a) == 7  # A's PML4, PDPT, PD, PT and the kernel's PDPT, PD, PT
    s.run_to(17)  # CR3 = B: the root is dropped, nothing is zapped
    assert set(s.kvm.active_mmu_pages) == pages_a
    assert s.kvm.page_header[root_a >> PAGE_SHIFT].root_count == 0
    s.run_to(19)  # B ran: its own user tables, the kernel's shared
    root_b = s.vcpu.root_hpa
    assert root_b != root_a
    assert len(s.kvm.active_mmu_pages) == 7 + 4
    kernel_pdpt = [sp for sp in s.kvm.active_mmu_pages.values() if sp.gfn == 0x9]
    assert len(kernel_pdpt) == 1 and len(kernel_pdpt[0].parent_ptes) == 2
    misses = s.kvm.stat["mmu_cache_miss"]
    s.run_to(21)  # back to A: the same root page, found in the hash
    assert s.vcpu.root_hpa == root_a
    assert s.kvm.stat["mmu_cache_miss"] == misses
    assert s.kvm.page_header[root_b >> PAGE_SHIFT].root_count == 0
    s.finish()
    assert s.rp.findings.items == []


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("use_them", [True, False], ids=["used", "unused"])
def test_flood_detection_spares_a_table_in_use(kernel: str, use_them: bool) -> None:
    """Four stores in a row into the PT, each a present and accessed pte (a speculative spte). If the guest
    touches each new mapping before the next store, the spte's A bit tells kvm_mmu_pte_write the table is in
    use and the count starts again; if not, the third store zaps the PT's shadow page."""
    s = Stepper("free-page-table.jsonl", kernel=kernel)
    s.run_to(8)  # tables built, gva 0x0 and 0x1000 mapped
    pt = kvm_mmu_lookup_page(s.kvm, 0x4)
    seq = 8
    for i in range(2, 6):
        s.rp.apply(seq, 0, ev.Write(gpa=0x4000 + 8 * i, val=(0x10 + i) << PAGE_SHIFT | 0x27, len=8))
        seq += 1
        end = s.walk(i << PAGE_SHIFT)[1]
        if kvm_mmu_lookup_page(s.kvm, 0x4) is pt:
            assert is_shadow_present_pte(end) and spte_to_pfn(end) == s.pfn(0x10 + i)  # speculative
        if use_them:
            rec = s.rp.apply(seq, 0, ev.Access(addr=i << PAGE_SHIFT, write=False, user=True, fetch=False))
            seq += 1
            assert rec["result"] == "hit"
    if use_them:
        assert kvm_mmu_lookup_page(s.kvm, 0x4) is pt
        assert s.kvm.stat["mmu_flooded"] == 0
        assert all(s.refs(0x10 + i) == 1 for i in range(6))
    else:
        assert kvm_mmu_lookup_page(s.kvm, 0x4) is None
        assert s.kvm.stat["mmu_flooded"] == 1
        assert all(s.refs(0x10 + i) == 0 for i in range(6))
    s.rp.do_teardown()
    assert s.rp.findings.items == []
    assert not any(f.count for f in s.rp.host.frames.values())
