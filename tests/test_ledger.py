"""The reference ledger (kvmpfn/audit/ledger.py): every reference KVM holds on a host frame, where it was
taken (event seq/line, pfn API function, MMU caller) and which spte owns it.

Covered: provenance; ownership bound by ``rmap_add`` (the newest reference in flight); ``rmap_remove``
releasing the owner's own reference (not merely the newest); an underflow reported at the operation; a
reference operation on a frame without struct page reported at the operation; the teardown leak listing
each leaked reference; and the ``update_pte`` reference parked by ``mmu_guess_page_from_pte_write``, which
is in flight, so allowed, at the kernel's ``pre/post pte write`` audit points (``kernel_audit=True``).
"""

from __future__ import annotations

from collections import Counter

import pytest

from kvmpfn.audit.checks import check_refcounts
from kvmpfn.audit.findings import Findings
from kvmpfn.audit.ledger import RefLedger
from kvmpfn.host import Host
from kvmpfn.kvm.context import shadow_walk
from kvmpfn.kvm.pfn import API_NAMES
from kvmpfn.kvm.spte import NOTRAP, TRAP
from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev

LINE0 = 100  # events are given line numbers LINE0 + seq, so that seq and line are told apart
MMIO_GFN = 0xFE000
MMIO_PFN = 0xF000000  # the first device frame (kvmpfn/host/frames.py)


class Guest:
    """A VM driven through the replay engine: ``do(op, **fields)`` applies one event (seq counts from 0,
    line = LINE0 + seq) and returns its outcome record."""

    def __init__(
        self,
        *,
        mmu: str = "shadow",
        kernel: str = "pfn",
        paging: str = "64",
        cr3: int = 0x1000,
        slots=((0, 0, 1024, "ram"),),
        bugs=(),
        kernel_audit: bool = False,
        audit_every: int = 0,
    ) -> None:
        header = ev.Header(
            kvmpfn=1,
            mmu=mmu,
            kernel=kernel,
            guest=ev.Guest(paging=paging, cr3=cr3 if paging != "none" else 0),
            memslots=[ev.Memslot(slot=s, gfn=g, npages=n, backing=b) for s, g, n, b in slots],
        )
        options = ReplayOptions(bugs=frozenset(bugs), kernel_audit=kernel_audit, audit_every=audit_every)
        self.rp = Replayer(header, options)
        self.seq = 0

    @property
    def kvm(self):
        return self.rp.kvm

    @property
    def ledger(self) -> RefLedger:
        return self.rp.auditor.ledger

    @property
    def findings(self) -> list[dict]:
        return self.rp.findings.items

    def do(self, op: str, **fields) -> dict:
        rec = self.rp.apply(self.seq, LINE0 + self.seq, ev.EVENT_TYPES[op](**fields))
        self.seq += 1
        return rec

    def access(self, addr: int, write: bool = False, user: bool = False) -> dict:
        return self.do("access", addr=addr, write=write, user=user, fetch=False)

    def write(self, gpa: int, val: int, nbytes: int = 8) -> dict:
        return self.do("write", gpa=gpa, val=val, len=nbytes)

    def tables64(self) -> None:
        """PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000 -> PT at 0x4000: gvas below 2 MiB."""
        for gpa, val in ((0x1000, 0x2007), (0x2000, 0x3007), (0x3000, 0x4007)):
            self.write(gpa, val)

    def pte(self, gva: int, val: int) -> dict:
        """Store the guest pte of ``gva`` (below 2 MiB) in the PT at 0x4000."""
        return self.write(0x4000 + 8 * ((gva >> 12) & 511), val)

    def teardown(self) -> dict:
        return self.do("teardown")

    def frame(self, gfn: int) -> int:
        pfn = self.rp.host.peek_pfn(gfn)
        assert pfn is not None
        return pfn

    def leaf(self, addr: int) -> tuple:
        path, end = shadow_walk(self.kvm.vcpus[0], self.kvm, addr)
        assert path and end not in (TRAP, NOTRAP), f"no leaf for {addr:#x}"
        return path[-1]


def names(kernel: str) -> dict[str, str]:
    return API_NAMES[kernel]


# --- provenance -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mmu", "paging", "caller"),
    [("tdp", "none", "tdp_page_fault"), ("shadow", "none", "nonpaging_map"), ("shadow", "64", "page_fault")],
)
@pytest.mark.parametrize("kernel", ["page", "pfn", "pfn-io", "notifier"])
def test_provenance_of_a_fault_reference(kernel, mmu, paging, caller):
    g = Guest(mmu=mmu, kernel=kernel, paging=paging)
    if paging == "64":
        g.tables64()
        g.pte(0x5000, 0x5007)
    seq = g.seq
    assert g.access(0x5000, write=True)["result"] == "mapped"
    pfn = g.frame(5)
    refs = g.ledger.refs[pfn]
    assert len(refs) == 1
    ref = refs[0]
    sp, index = g.leaf(0x5000)
    assert (ref.seq, ref.line) == (seq, LINE0 + seq)
    assert ref.function == names(kernel)["gfn_to_pfn"]
    assert ref.caller == caller
    assert ref.owner == (sp, index)
    assert ref.provenance() == {
        "seq": seq,
        "line": LINE0 + seq,
        "function": names(kernel)["gfn_to_pfn"],
        "caller": caller,
        "owner": f"spte {index} of shadow page gfn {sp.gfn:#x} level 1",
    }
    assert g.ledger.total(pfn) == g.rp.host.frames[pfn].count == 1


def test_a_reference_in_flight_has_no_owner():
    g = Guest(mmu="tdp", paging="none")
    g.access(0x6000)  # a vcpu and roots
    g.rp.findings.seq, g.rp.findings.line = 7, 8
    pfn = g.kvm.api.gfn_to_pfn(5, "someone")
    (ref,) = g.ledger.refs[pfn]
    assert ref.owner is None
    assert ref.provenance() == {"seq": 7, "line": 8, "function": "gfn_to_pfn", "caller": "someone"}


# --- ownership ---------------------------------------------------------------------------------------------


def test_rmap_add_binds_the_newest_reference_in_flight():
    """RefLedger alone: two references in flight, rmap_add binds the newer; a put then takes the one still in
    flight (the parked update_pte reference), never the owned one."""
    host = Host()
    f = Findings()
    ledger = RefLedger(host, f)
    pfn = 0x100000
    host.frame(pfn)
    f.seq, f.line = 1, 11
    ledger.hook("get", pfn, "gfn_to_pfn", "mmu_guess_page_from_pte_write")
    f.seq, f.line = 2, 12
    ledger.hook("get", pfn, "kvm_get_pfn", "update_pte")
    sptep = ("sp", 3)
    ledger.rmap_add(sptep, pfn)
    first, second = ledger.refs[pfn]
    assert first.owner is None and second.owner == sptep
    ledger.hook("put", pfn, "kvm_release_pfn_clean", "kvm_mmu_pte_write")
    assert ledger.refs[pfn] == [second]
    assert f.items == []


def test_update_pte_reference_is_owned_by_the_new_spte():
    """Through the MMU: an emulated write of a present, accessed gpte instantiates the spte (update_pte's
    kvm_get_pfn reference, bound by rmap_add) and releases the guess's reference at the end."""
    g = Guest()
    g.tables64()
    g.pte(0x10000, 0x10007)
    g.access(0x10000)  # the PT at 0x4000 is shadowed from here on
    seq = g.seq
    assert g.pte(0x11000, 0x11027)["result"] == "emulated"  # P|W|U|A
    pfn = g.frame(0x11)
    (ref,) = g.ledger.refs[pfn]
    assert (ref.function, ref.caller, ref.seq) == ("kvm_get_pfn", "update_pte", seq)
    assert ref.owner == g.leaf(0x11000)
    assert g.rp.host.frames[pfn].count == 1
    g.teardown()
    assert g.findings == []


@pytest.mark.parametrize("remove", ["first", "second"])
def test_rmap_remove_releases_the_owners_reference(remove):
    """Two sptes (gva 0x10000 and 0x11000) map one frame (gpa 0x20000), each owning one reference. Removing
    either spte releases that spte's reference, whichever is newer."""
    g = Guest()
    g.tables64()
    g.pte(0x10000, 0x20007)
    g.pte(0x11000, 0x20007)
    s1 = g.seq
    g.access(0x10000)
    s2 = g.seq
    g.access(0x11000)
    pfn = g.frame(0x20)
    a, b = g.leaf(0x10000), g.leaf(0x11000)
    assert {(r.seq, r.owner) for r in g.ledger.refs[pfn]} == {(s1, a), (s2, b)}
    gone, kept, kept_seq = (0x10000, b, s2) if remove == "first" else (0x11000, a, s1)
    assert g.pte(gone, 0)["result"] == "emulated"  # the guest unmaps one of them: rmap_remove
    (ref,) = g.ledger.refs[pfn]
    assert (ref.seq, ref.owner) == (kept_seq, kept)
    g.do("audit")
    g.teardown()
    assert g.findings == []
    assert pfn not in g.ledger.refs


# --- underflow and pageless, reported at the operation ------------------------------------------------------


def test_underflow_is_reported_at_the_operation():
    """--bug double-release: the spte's reference went at map time; the notifier's rmap_remove at the host
    remap releases it again."""
    g = Guest(mmu="tdp", paging="none", kernel="notifier", bugs=("double-release",))
    g.access(0x5000, write=True)
    pfn = g.frame(5)
    assert pfn not in g.ledger.refs  # already released by the mutant
    seq = g.seq
    g.do("host_remap", gfn=5)
    (f,) = g.findings
    assert f["code"] == "refcount-underflow"
    assert (f["seq"], f["line"], f["point"]) == (seq, LINE0 + seq, "host_remap")
    assert f["pfn"] == hex(pfn)
    assert f["provenance"] == [
        {"seq": seq, "line": LINE0 + seq, "function": "kvm_release_pfn_dirty", "caller": "rmap_remove"}
    ]
    assert g.rp.host.frames[pfn].count == -1


def test_underflow_unit():
    host = Host()
    f = Findings()
    ledger = RefLedger(host, f)
    host.frame(0x100000)
    f.seq, f.line, f.point = 4, 5, "write"
    ledger.hook("put", 0x100000, "kvm_release_pfn_clean", "somebody")
    (item,) = f.items
    assert item["code"] == "refcount-underflow" and (item["seq"], item["point"]) == (4, "write")
    assert ledger.refs == {}


def test_pageless_refcount_is_reported_at_the_operation():
    """--bug pageless-as-normal under pfn-io: gfn_to_pfn takes a reference on a device frame."""
    g = Guest(
        mmu="tdp",
        paging="none",
        kernel="pfn-io",
        slots=((0, 0, 1024, "ram"), (1, MMIO_GFN, 16, "mmio")),
        bugs=("pageless-as-normal",),
    )
    g.access(0x5000)
    seq = g.seq
    assert g.access(MMIO_GFN << 12, write=True)["result"] == "mapped"
    (f,) = g.findings
    assert f["code"] == "pageless-refcount"
    assert (f["seq"], f["line"], f["point"], f["pfn"]) == (seq, LINE0 + seq, "access", hex(MMIO_PFN))
    assert f["provenance"] == [{"seq": seq, "line": LINE0 + seq, "function": "gfn_to_pfn", "caller": "tdp_page_fault"}]
    g.teardown()  # the put on the same frame is the same defect: still one finding
    assert [x["code"] for x in g.findings] == ["pageless-refcount"]


@pytest.mark.parametrize("op", ["get", "put", "dirty", "accessed"])
def test_pageless_unit_every_operation(op):
    host = Host()
    f = Findings()
    ledger = RefLedger(host, f)
    host.frame(MMIO_PFN)
    assert not host.frames[MMIO_PFN].struct_page
    ledger.hook(op, MMIO_PFN, "fn", "caller")
    assert "pageless-refcount" in [x["code"] for x in f.items]


def test_device_frames_see_no_reference_operation_under_pfn_io():
    g = Guest(mmu="tdp", paging="none", kernel="pfn-io", slots=((0, 0, 1024, "ram"), (1, MMIO_GFN, 16, "mmio")))
    assert g.access(MMIO_GFN << 12, write=True)["result"] == "mapped"
    g.teardown()
    assert g.findings == []
    assert MMIO_PFN not in g.ledger.refs


# --- leaks at teardown ------------------------------------------------------------------------------------------


def test_teardown_leak_lists_each_leaked_reference():
    """--bug same-pfn-no-release: each re-fault on the same frame keeps a duplicate reference. The teardown
    finding lists the two duplicates, with where they were taken, and not the spte's own reference."""
    g = Guest(mmu="tdp", paging="none", bugs=("same-pfn-no-release",))
    g.access(0x5000)
    leaked = []
    for _ in range(2):
        g.do("dirty_log", slot=0)
        leaked.append(g.seq)
        g.access(0x5000, write=True)
    pfn = g.frame(5)
    seq = g.seq
    g.teardown()
    (f,) = g.findings
    assert f["code"] == "refcount-leak" and f["pfn"] == hex(pfn)
    assert (f["seq"], f["point"]) == (seq, "teardown")
    assert "2 KVM reference(s)" in f["message"]
    assert f["provenance"] == [
        {"seq": s, "line": LINE0 + s, "function": "gfn_to_pfn", "caller": "tdp_page_fault"} for s in leaked
    ]
    assert g.rp.host.frames[pfn].count == 2  # still held after the VM is gone
    assert [r.seq for r in g.ledger.refs[pfn]] == leaked


def test_after_teardown_reports_references_left_once_the_vm_is_gone():
    """--bug audit-no-release: the teardown audit's own gfn_to_pfn references are taken after its
    refcount check, so only the check after kvm_arch_destroy_vm sees them: one finding per frame, listing
    each reference (two sptes map gpa 0x20000, so the audit took two on that frame)."""
    g = Guest(bugs=("audit-no-release",))
    g.tables64()
    g.pte(0x10000, 0x20007)
    g.pte(0x11000, 0x20007)
    g.access(0x10000)
    g.access(0x11000)
    pfn = g.frame(0x20)
    g.teardown()
    (f,) = g.findings
    assert (f["code"], f["pfn"], f["point"]) == ("refcount-leak", hex(pfn), "teardown")
    assert "after teardown" in f["message"]
    assert len(f["provenance"]) == 2
    assert all(p["caller"] == "audit_mappings_page" and "owner" not in p for p in f["provenance"])
    assert g.rp.host.frames[pfn].count == 2


# --- in flight at the kernel's audit points ---------------------------------------------------------------------


def record_audits(g: Guest) -> list[tuple]:
    """Wrap the auditor's audit_point: at each call (point, in_flight, the unowned references, mappings, and the
    codes the refcount check would report there without the in-flight allowance)."""
    calls: list[tuple] = []
    auditor = g.rp.auditor
    inner = auditor.audit_point

    def audit_point(point, in_flight=None, mappings=True):
        unowned = {
            pfn: [(r.function, r.caller) for r in refs if r.owner is None] for pfn, refs in g.ledger.refs.items()
        }
        scratch = Findings()
        check_refcounts(g.kvm, g.ledger, scratch, Counter())
        without = [x["code"] for x in scratch.items]
        calls.append((point, Counter(in_flight or {}), {k: v for k, v in unowned.items() if v}, mappings, without))
        inner(point, in_flight, mappings)

    auditor.audit_point = audit_point
    return calls


@pytest.mark.parametrize("kernel", ["pfn", "notifier"])
def test_parked_update_pte_reference_is_in_flight_at_pte_write_points(kernel):
    g = Guest(kernel=kernel, kernel_audit=True)
    g.tables64()
    g.pte(0x10000, 0x10007)
    g.access(0x10000)
    g.write(0x30000, 1)  # fault gpa 0x30000 in, so that the guess finds a frame
    pfn = g.frame(0x30)
    calls = record_audits(g)
    assert g.pte(0x11000, 0x30027)["result"] == "emulated"
    points = {c[0]: c for c in calls}
    assert set(points) == {"pre pte write", "post pte write"}
    for point in ("pre pte write", "post pte write"):
        _, in_flight, unowned, _, without = points[point]
        assert in_flight == Counter({pfn: 1})
        assert unowned == {pfn: [("gfn_to_pfn", "mmu_guess_page_from_pte_write")]}
        assert without == ["refcount-leak"]  # without the allowance the parked reference would be a leak
    g.access(0x11000)
    g.teardown()
    assert g.findings == []
    assert g.ledger.refs == {}


def test_no_allowance_when_the_guess_is_an_error_pfn():
    """A written pte that points outside every slot: the guess releases bad_page at once; nothing in flight."""
    g = Guest(kernel_audit=True)
    g.tables64()
    g.pte(0x10000, 0x10007)
    g.access(0x10000)
    calls = record_audits(g)
    g.pte(0x11000, (0x80000 << 12) | 0x27)  # gfn 0x80000: no memslot
    assert [c[1] for c in calls] == [Counter(), Counter()]
    assert g.findings == []


def test_parked_reference_never_released_is_a_leak_at_the_next_point():
    """--bug prefetch-no-release: the reference parked by the guess outlives the pte write; the next audit
    point reports it, with where it was taken."""
    g = Guest(kernel_audit=True, bugs=("prefetch-no-release",))
    g.tables64()
    g.pte(0x10000, 0x10007)
    g.access(0x10000)
    g.write(0x30000, 1)
    pfn = g.frame(0x30)
    seq = g.seq
    g.pte(0x11000, 0x30027)
    assert g.findings == []  # in flight at pre/post pte write
    g.do("audit")
    (f,) = g.findings
    assert (f["code"], f["pfn"], f["point"]) == ("refcount-leak", hex(pfn), "audit")
    assert f["provenance"] == [
        {"seq": seq, "line": LINE0 + seq, "function": "gfn_to_pfn", "caller": "mmu_guess_page_from_pte_write"}
    ]
