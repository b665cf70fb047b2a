"""The auditor (kvmpfn/audit): each check on hand-built states, dedupe, what an audit must not touch, TDP and
large sptes, the kernel's own audit points, and a long ``--audit-every 1`` replay.

Hand-built states: a VM is driven through the replay engine (``Guest``), then its MMU state is corrupted
directly (the test names the corruption), then ``auditor.full_audit`` runs. Each test first checks that the
uncorrupted state audits clean, so the finding comes from the corruption.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from kvmpfn.audit.checks import audit_mappings
from kvmpfn.audit.findings import Findings
from kvmpfn.kvm.context import shadow_walk
from kvmpfn.kvm.mmu import gfn_to_kvm_slot, mmu_page_remove_parent_pte, page_header, pt64_index, root_table
from kvmpfn.kvm.rmap import rmap_remove
from kvmpfn.kvm.spte import NOTRAP, TRAP, is_last_spte, is_shadow_present_pte, spte_to_pfn
from kvmpfn.kvm.vm import KvmMmuPage
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace import events as ev
from kvmpfn.x86 import PT64_NX_MASK, PT_USER_MASK, PT_WRITABLE_MASK

P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
HUGE = (1, 0x200, 512, "hugetlb")  # one 2 MiB region at gpa 0x200000


class Guest:
    """A VM driven through the replay engine: ``do(op, **fields)`` applies one event; ``audit()`` runs the full
    audit now. 64-bit guests get tables PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000."""

    def __init__(
        self,
        *,
        mmu: str = "shadow",
        kernel: str = "pfn",
        paging: str = "64",
        slots=((0, 0, 512, "ram"),),
        bugs=(),
        kernel_audit: bool = False,
        audit_every: int = 0,
        cr0_wp: bool = True,
        cr4_smap: bool = False,
    ) -> None:
        cr3 = 0x1000 if paging != "none" else 0
        header = ev.Header(
            kvmpfn=1,
            mmu=mmu,
            kernel=kernel,
            guest=ev.Guest(paging=paging, cr3=cr3, cr0_wp=cr0_wp, cr4_smap=cr4_smap),
            memslots=[ev.Memslot(slot=s, gfn=g, npages=n, backing=b) for s, g, n, b in slots],
        )
        options = ReplayOptions(bugs=frozenset(bugs), kernel_audit=kernel_audit, audit_every=audit_every)
        self.rp = Replayer(header, options)
        self.seq = 0
        if paging == "64":
            for gpa, val in ((0x1000, 0x2007), (0x2000, 0x3007), (0x3000, 0x4007)):
                self.write(gpa, val)

    @property
    def kvm(self):
        return self.rp.kvm

    @property
    def host(self):
        return self.rp.host

    @property
    def findings(self) -> list[dict]:
        return self.rp.findings.items

    def codes(self) -> dict[str, int]:
        return dict(Counter(f["code"] for f in self.findings))

    def do(self, op: str, **fields) -> dict:
        rec = self.rp.apply(self.seq, self.seq + 1, ev.EVENT_TYPES[op](**fields))
        self.seq += 1
        return rec

    def access(self, addr: int, write: bool = False, user: bool = False, fetch: bool = False) -> dict:
        return self.do("access", addr=addr, write=write, user=user, fetch=fetch)

    def write(self, gpa: int, val: int, nbytes: int = 8) -> dict:
        return self.do("write", gpa=gpa, val=val, len=nbytes)

    def pte(self, gva: int, val: int) -> dict:
        return self.write(0x4000 + 8 * ((gva >> 12) & 511), val)

    def audit(self, point: str = "audit") -> list[dict]:
        self.rp.findings.seq = self.seq
        self.rp.auditor.full_audit(point)
        return self.findings

    def entry(self, addr: int, level: int = 1) -> tuple:
        """``(sp, index)`` of the shadow (or TDP) entry for ``addr`` at ``level``."""
        vcpu = self.kvm.vcpus[0]
        sp, lvl = root_table(vcpu, self.kvm, addr)
        while lvl != level:
            ent = sp.spt[pt64_index(addr, lvl)]
            assert is_shadow_present_pte(ent) and not is_last_spte(ent, lvl)
            sp = page_header(self.kvm, ent)
            lvl -= 1
        return sp, pt64_index(addr, lvl)

    def leaf(self, addr: int) -> tuple:
        path, end = shadow_walk(self.kvm.vcpus[0], self.kvm, addr)
        assert path and end not in (TRAP, NOTRAP)
        return path[-1]

    def frame(self, gfn: int) -> int:
        pfn = self.host.peek_pfn(gfn)
        assert pfn is not None
        return pfn


def mapped(**kw) -> Guest:
    """A 64-bit guest with gva 0x10000 (P|W|U, written) and 0x11000 (P|U, read) mapped one to one (A and D
    preset, so that no walk writes back into the page table)."""
    g = Guest(**kw)
    g.pte(0x10000, 0x10007 | A | D)
    g.pte(0x11000, 0x11005 | A)
    g.access(0x10000, write=True, user=True)
    g.access(0x11000, user=True)
    assert g.audit() == []
    return g


def assert_only(findings: list[dict], code: str) -> dict:
    assert [f["code"] for f in findings] == [code], findings
    return findings[0]


# --- each check on a hand-built state -----------------------------------------------------------------------


def test_refcount_leak_for_a_reference_no_spte_owns():
    g = mapped()
    pfn = g.frame(0x10)
    g.rp.findings.seq, g.rp.findings.line = 41, 42
    g.kvm.api.kvm_get_pfn(pfn, "corruption")  # CORRUPT: a reference nobody will release
    f = assert_only(g.audit(), "refcount-leak")
    assert f["pfn"] == hex(pfn)
    assert f["provenance"] == [{"seq": 41, "line": 42, "function": "kvm_get_pfn", "caller": "corruption"}]


def test_refcount_allowance_for_references_in_flight():
    g = mapped()
    pfn = g.frame(0x10)
    g.kvm.api.kvm_get_pfn(pfn, "in flight")
    g.rp.auditor.full_audit("point", Counter({pfn: 1}))
    assert g.findings == []
    g.rp.auditor.full_audit("point", Counter({pfn: 0}))
    assert assert_only(g.findings, "refcount-leak")["pfn"] == hex(pfn)


def test_rmap_leaf_missing_from_its_rmap():
    g = mapped()
    sp, index = g.leaf(0x10000)
    del g.kvm.rmap[0x10]  # CORRUPT: the leaf is in no rmap
    f = assert_only(g.audit(), "rmap-mismatch")
    assert (f["gfn"], f["level"]) == ("0x10", 1)
    assert "in 0 rmaps" in f["message"]


def test_rmap_leaf_in_the_wrong_rmap():
    g = mapped()
    sptep = g.leaf(0x10000)
    g.kvm.rmap[0x11] = [[g.kvm.rmap[0x11], sptep]]  # CORRUPT: also listed under gfn 0x11
    f = assert_only(g.audit(), "rmap-mismatch")  # "maps gfn 0x10" and "in 2 rmaps": one spte, one finding
    assert f["gfn"] == "0x10"


def test_rmap_entry_pointing_at_a_non_present_spte():
    g = mapped()
    sp, index = g.leaf(0x10000)
    g.kvm.rmap[0x30] = (sp, 0x30)  # CORRUPT: entry 0x30 of the page is notrap (the guest maps nothing there)
    assert sp.spt[0x30] == NOTRAP
    f = assert_only(g.audit(), "rmap-mismatch")
    assert "non-present" in f["message"]


def test_rmap_entry_of_a_freed_shadow_page():
    g = mapped()
    ghost = KvmMmuPage(999, 0x7FFFFFFF)
    ghost.spt[0] = g.leaf(0x10000)[0].spt[0x10]
    g.kvm.rmap[0x40] = (ghost, 0)  # CORRUPT: a page that is not live
    f = assert_only(g.audit(), "rmap-mismatch")
    assert "freed shadow page" in f["message"]


def test_writable_spte_over_a_shadowed_table():
    g = mapped()
    g.pte(0x4000, 0x4007)  # a self-map of the PT at gpa 0x4000
    g.access(0x4000)  # a read: the spte is read-only
    assert g.audit() == []  # a read-only mapping of a shadowed table is fine (the 2008 check said otherwise)
    sp, index = g.leaf(0x4000)
    sp.spt[index] |= PT_WRITABLE_MASK  # CORRUPT
    f = assert_only(g.audit(), "writable-shadowed-gfn")
    assert (f["gfn"], f["level"]) == ("0x4", 1)


def test_stale_spte_after_a_missed_pte_write():
    g = mapped()
    g.host.write_guest(0x4080, 0x12007, 8)  # CORRUPT: the guest pte changed without kvm_mmu_pte_write
    g.write(0x12000, 1)  # fault the new frame in
    f = assert_only(g.audit(), "spte-hpa-mismatch")
    assert (f["addr"], f["level"], f["pfn"]) == ("0x10000", 1, hex(g.frame(0x10)))
    assert f["provenance"][0]["caller"] == "page_fault"  # where the spte's reference was taken


def test_spte_mapping_an_unmapped_gva():
    g = mapped()
    g.host.write_guest(0x4080, 0, 8)  # CORRUPT: unmapped behind KVM's back
    f = assert_only(g.audit(), "spte-hpa-mismatch")
    assert "not mapped by the guest" in f["message"]


def test_truncated_pfn_in_an_spte():
    """The spte names frame pfn & 0xfffff while its reference is on the real frame: the mapping check says
    truncated, and the reference no present spte owns is a leak (one defect, two views)."""
    g = mapped()
    sp, index = g.leaf(0x10000)
    pfn = spte_to_pfn(sp.spt[index])
    assert pfn >> 20
    sp.spt[index] = sp.spt[index] & ~(((1 << 40) - 1) << 12) | (pfn & 0xFFFFF) << 12  # CORRUPT
    findings = g.audit()
    assert Counter(f["code"] for f in findings) == {"spte-pfn-truncated": 1, "refcount-leak": 1}
    f = next(f for f in findings if f["code"] == "spte-pfn-truncated")
    assert (f["addr"], f["pfn"]) == ("0x10000", hex(pfn & 0xFFFFF))


def test_notrap_leaf_over_a_mapped_gva():
    g = mapped()
    sptep = g.leaf(0x10000)
    rmap_remove(g.kvm, sptep)
    sptep[0].spt[sptep[1]] = NOTRAP  # CORRUPT
    f = assert_only(g.audit(), "notrap-valid-gva")
    assert (f["addr"], f["level"]) == ("0x10000", 1)


def test_notrap_leaf_over_an_unmapped_gva_is_fine():
    g = mapped()
    sp, index = g.entry(0x30000)
    assert sp.spt[index] == NOTRAP  # prefetch_page: the guest pte is not present
    assert g.audit() == []


@pytest.mark.parametrize("kernel", ["pfn", "notifier"])
def test_notrap_valid_gva_after_a_memslot_move(kernel):
    """Kernel behaviour, no corruption: moving memslots flushes nothing (only deletion does, from v2.6.27), so
    a shadowed page table whose gfn now reads from another slot's memory is stale. Here the moved-in table
    maps gva 0x10000, which the shadow still holds as notrap (prefetched from the old table)."""
    slots = ((0, 0, 512, "ram"), (1, 0x400, 1, "ram"), (2, 0x600, 1, "ram"))
    g = Guest(kernel=kernel, slots=slots)
    g.write(0x3000, 0x400007)  # PD entry 0 -> a page table at gpa 0x400000 (slot 1)
    g.write(0x400088, 0x11007)  # gva 0x11000 -> 0x11000; gva 0x10000 not mapped
    g.access(0x11000)  # the table is shadowed; entry 0x10 is prefetched notrap
    assert g.access(0x10000)["result"] == "guest_fault"
    g.write(0x600080, 0x10007)  # slot 2's page: the same table, with gva 0x10000 mapped
    g.write(0x600088, 0x11007)
    assert g.audit() == []
    g.do("memslot", slot=1, gfn=0x800, npages=1, backing="ram")  # slot 1 moves away
    g.do("memslot", slot=2, gfn=0x400, npages=1, backing="ram")  # slot 2 moves in under the shadowed gfn
    f = assert_only(g.audit(), "notrap-valid-gva")
    assert (f["addr"], f["level"]) == ("0x10000", 1)


def test_notrap_pointer_over_a_present_guest_entry():
    g = mapped()
    sp, index = g.entry(0x10000, level=2)
    mmu_page_remove_parent_pte(page_header(g.kvm, sp.spt[index]), (sp, index))
    sp.spt[index] = NOTRAP  # CORRUPT
    f = assert_only(g.audit(), "notrap-nonleaf")
    assert (f["addr"], f["level"]) == ("0x0", 2)


def test_notrap_pointers_over_absent_guest_entries_are_fine():
    g = mapped()
    root = g.entry(0x10000, level=4)[0]
    assert sum(1 for ent in root.spt if ent == NOTRAP) == 511  # prefetch_page of a 64-bit guest
    assert g.audit() == []


@pytest.mark.parametrize(
    ("gva", "flip", "granted"),
    [
        (0x11000, PT_WRITABLE_MASK, "W"),  # W over a read-only pte (role cr0_wp=1)
        (0x12000, PT_USER_MASK, "U"),  # U over a supervisor page
        (0x13000, PT64_NX_MASK, "X"),  # execute over an NX page (clearing the spte's NX)
    ],
)
def test_spte_granting_more_than_the_guest(gva, flip, granted):
    g = mapped()
    g.pte(0x12000, 0x12003 | A | D)  # P|W, supervisor
    g.pte(0x13000, 0x13007 | A | NX)
    for addr, write, user in ((0x10000, 1, 1), (0x11000, 0, 1), (0x12000, 1, 0), (0x13000, 0, 0)):
        g.access(addr, write=bool(write), user=bool(user))
    assert g.audit() == []
    sp, index = g.leaf(gva)
    sp.spt[index] ^= flip  # CORRUPT
    f = assert_only(g.audit(), "spte-permission")
    assert f["addr"] == hex(gva) and f"grants {granted} " in f["message"]


def test_cr0wp0_supervisor_write_without_u_is_allowed():
    g = Guest(cr0_wp=False)
    g.pte(0x10000, 0x10005)  # read-only user page
    g.access(0x10000, write=True)  # CR0.WP=0 supervisor write: W, no U
    sp, index = g.leaf(0x10000)
    assert sp.spt[index] & PT_WRITABLE_MASK and not sp.spt[index] & PT_USER_MASK
    assert g.audit() == []
    sp.spt[index] |= PT_USER_MASK  # CORRUPT: the era's docs/kernel.md, Historical bugs: cr0wp-user-write
    assert_only(g.audit(), "spte-permission")


def test_parent_link_missing_from_the_child():
    g = mapped()
    sp, index = g.entry(0x10000, level=2)
    child = page_header(g.kvm, sp.spt[index])
    child.parent_ptes.remove((sp, index))  # CORRUPT
    f = assert_only(g.audit(), "parent-link")
    assert (f["gfn"], f["level"]) == ("0x3", 2)


def test_parent_link_that_does_not_point_back():
    g = mapped()
    sp, index = g.entry(0x10000, level=2)
    child = page_header(g.kvm, sp.spt[index])
    child.parent_ptes.append((sp, index + 1))  # CORRUPT: entry 1 of the PD page is notrap
    f = assert_only(g.audit(), "parent-link")
    assert (f["gfn"], f["level"]) == ("0x4", 1)


def test_spte_without_memslot_after_a_v2626_deletion():
    g = Guest(mmu="tdp", paging="none", slots=((0, 0, 512, "ram"), (1, 0x400, 16, "ram")))
    g.access(0x400000, write=True)
    g.do("memslot", slot=1, gfn=0x400, npages=0, backing="ram")
    f = assert_only(g.audit(), "spte-without-memslot")
    assert (f["gfn"], f["level"]) == ("0x400", 1)
    assert f["provenance"][0]["caller"] == "tdp_page_fault"


def test_write_count_disagreeing_with_the_shadow_pages():
    g = mapped()
    slot = gfn_to_kvm_slot(g.kvm, 0)
    slot.write_count[0] += 1  # CORRUPT
    f = assert_only(g.audit(), "write-count")
    assert (f["slot"], f["region"]) == (0, "0x0")


@pytest.mark.parametrize("corruption", ["n_free", "hash"])
def test_mmu_page_accounting(corruption):
    g = mapped()
    if corruption == "n_free":
        g.kvm.n_free_mmu_pages -= 1  # CORRUPT: a page allocated and never counted
    else:
        g.kvm.mmu_page_hash.setdefault(0x99, []).append(KvmMmuPage(999, 0x7FFFFFFF))  # CORRUPT: a dead page
    assert_only(g.audit(), "mmu-page-accounting")


def test_dirty_lost_writable_leaf_missing_from_the_bitmap():
    g = Guest(mmu="tdp", paging="none")
    g.do("dirty_log", slot=0)
    g.access(0x5000, write=True)
    slot = gfn_to_kvm_slot(g.kvm, 5)
    assert 5 in slot.dirty_bitmap
    assert g.audit() == []
    slot.dirty_bitmap.discard(5)  # CORRUPT
    f = assert_only(g.audit(), "dirty-lost")
    assert (f["gfn"], f["slot"]) == ("0x5", 0)


def test_dirty_lost_when_rmap_write_protect_does_not_dirty():
    """The guest writes gpa 0x20000 through a writable spte, then uses that page as a page table: KVM shadows
    it and rmap_write_protect takes W away, which must mark the frame dirty. Here kvm_set_pfn_dirty is made
    a no-op (the defect), so nothing records the guest's write."""
    g = mapped()
    g.pte(0x20000, 0x20007)
    g.access(0x20000, write=True)
    assert g.leaf(0x20000)[0].spt[g.leaf(0x20000)[1]] & PT_WRITABLE_MASK
    g.write(0x20000, 0x10025)  # the new table's entry 0: gva 0x200000 -> gpa 0x10000
    g.kvm.api.kvm_set_pfn_dirty = lambda pfn, caller: None  # CORRUPT: rmap_write_protect's dirtying lost
    g.write(0x3008, 0x20007)  # PD entry 1 -> a page table at gpa 0x20000
    g.access(0x200000)  # KVM shadows gfn 0x20: rmap_write_protect
    assert not g.leaf(0x20000)[0].spt[g.leaf(0x20000)[1]] & PT_WRITABLE_MASK
    g.audit()
    g.do("teardown")
    assert "dirty-lost" in g.codes()


def test_smap_guest_user_pages_audit_clean():
    """CR4.SMAP governs the guest's supervisor data accesses, not what a gva translates to. A kernel access
    with EFLAGS.AC=1 to a user page is legal and mapped; the audit must agree."""
    g = Guest(cr4_smap=True)
    g.pte(0x10000, 0x10007 | A | D)  # a user page
    assert g.do("access", addr=0x10000, write=False, user=False, fetch=False, ac=True)["result"] == "mapped"
    assert g.audit() == []


def test_smap_guest_permission_is_still_checked():
    g = Guest(cr4_smap=True)
    g.pte(0x10000, 0x10005 | A)  # a read-only user page
    g.access(0x10000, user=True)
    sp, index = g.leaf(0x10000)
    sp.spt[index] |= PT_WRITABLE_MASK  # CORRUPT
    assert_only(g.audit(), "spte-permission")


# --- dedupe -----------------------------------------------------------------------------------------------


def test_same_code_and_subject_is_reported_once_across_points():
    g = Guest(mmu="tdp", paging="none", kernel="pfn", audit_every=1)
    g.access(0x5000, write=True)
    g.do("host_remap", gfn=5)  # the spte keeps the old frame (no notifiers): first seen at seq 1
    for _ in range(3):
        g.do("audit", label="again")
    g.access(0x6000)
    g.do("teardown")
    f = assert_only(g.findings, "spte-hpa-mismatch")
    assert (f["seq"], f["point"]) == (1, "audit-every 1")


def test_distinct_subjects_are_distinct_findings():
    g = Guest(mmu="tdp", paging="none", kernel="pfn")
    for gfn in (5, 6):
        g.access(gfn << 12, write=True)
        g.do("host_remap", gfn=gfn)
        g.do("audit")
    g.do("audit")
    assert [f["addr"] for f in g.findings] == ["0x5000", "0x6000"]
    assert g.codes() == {"spte-hpa-mismatch": 2}


def test_dedupe_is_per_code():
    """One spte, two defects: a stale frame and a permission the guest does not give are both reported."""
    g = mapped()
    sp, index = g.leaf(0x11000)
    sp.spt[index] |= PT_WRITABLE_MASK  # CORRUPT 1: W
    g.audit()
    g.host.write_guest(0x4088, 0, 8)  # CORRUPT 2: unmapped behind KVM's back
    g.audit()
    g.audit()
    assert g.codes() == {"spte-permission": 1, "spte-hpa-mismatch": 1}


# --- the audit has no side effects ------------------------------------------------------------------------


def snapshot(g: Guest) -> dict:
    host = g.host
    frames = {
        pfn: (f.count, f.dirty, f.accessed, f.reserved, f.host_mapped, None if f.data is None else bytes(f.data))
        for pfn, f in host.frames.items()
    }
    refs = {
        pfn: [(r.seq, r.function, r.caller, r.owner) for r in refs] for pfn, refs in g.rp.auditor.ledger.refs.items()
    }
    sptes = {sp.id: (list(sp.spt), list(sp.parent_ptes), sp.root_count) for sp in g.kvm.active_mmu_pages.values()}
    return {
        "frames": frames,
        "next_pfn": host.allocator.next_pfn,
        "refs": refs,
        "sptes": sptes,
        "memory": host.read_bytes(0, 0x40000),
        "dirty": {s: None if k.dirty_bitmap is None else set(k.dirty_bitmap) for s, k in g.kvm.slots.items()},
    }


def side_effect_state(bugs=()) -> Guest:
    """A guest whose audit must walk a guest pte without A: gva 0x12000 is mapped P|U without A, so KVM never
    instantiated it (update_pte skips non-accessed gptes); a notrap leaf is forced there, which the audit
    judges by walking the guest tables."""
    g = mapped(bugs=bugs)
    g.pte(0x12000, 0x12005)  # P|U, A clear
    g.do("dirty_log", slot=0)
    sp, index = g.entry(0x12000)
    assert sp.spt[index] == TRAP
    sp.spt[index] = NOTRAP  # CORRUPT: so that the audit walks gva 0x12000
    return g


def test_audit_takes_no_reference_writes_no_memory_sets_no_a_bit():
    g = side_effect_state()
    ops = []
    inner = g.kvm.api.hook
    g.kvm.api.hook = lambda *a: (ops.append(a), inner(*a))
    before = snapshot(g)
    findings = g.audit()
    assert [f["code"] for f in findings] == ["notrap-valid-gva"]  # the walk of gva 0x12000 happened
    assert ops == []  # no get/put/dirty/accessed reached the pfn API
    assert snapshot(g) == before
    assert g.host.read_guest(0x4090, 8) == 0x12005  # still no A bit
    g.audit()
    assert snapshot(g) == before


def test_side_effect_check_catches_an_audit_that_takes_references():
    """Control: with --bug audit-no-release the audit's own gfn_to_pfn reference stays, and the same
    comparison sees it."""
    g = side_effect_state(bugs=("audit-no-release",))
    before = snapshot(g)
    g.audit()
    after = snapshot(g)
    assert after["frames"] != before["frames"] and after["refs"] != before["refs"]


# --- TDP and large sptes ----------------------------------------------------------------------------------


def test_tdp_is_audited_by_gpa():
    """A 64-bit guest under TDP maps gva 0x10000 to gpa 0x20000: the TDP leaf sits at gpa 0x20000 and is judged
    there, whatever the guest's own tables say."""
    g = Guest(mmu="tdp")
    g.pte(0x10000, 0x20007)
    g.access(0x10000, write=True)
    assert g.leaf(0x20000)  # the TDP tables are indexed by gpa
    assert g.audit() == []
    g.pte(0x10000, 0)  # the guest unmaps the gva: TDP does not care
    assert g.audit() == []
    g.do("host_remap", gfn=0x20)  # kernel pfn: no notifier, the TDP leaf keeps the old frame
    f = assert_only(g.audit(), "spte-hpa-mismatch")
    assert (f["addr"], f["level"]) == ("0x20000", 1)


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_large_sptes_are_checked_as_leaves(mmu):
    """A 2 MiB spte (hugetlbfs slot) is a leaf at its 2 MiB-aligned address, compared with the frame of the
    region's first page, never walked as a table."""
    g = Guest(mmu=mmu, paging="none", slots=((0, 0, 512, "ram"), HUGE))
    g.access(0x200000 + 0x5000, write=True)
    sp, index = g.leaf(0x200000)
    assert sp.level == 2 and sp.spt[index] & PS
    assert g.audit() == []
    g.do("host_remap", gfn=0x205)  # the whole 2 MiB block moves
    f = assert_only(g.audit(), "spte-hpa-mismatch")
    assert (f["addr"], f["level"]) == ("0x200000", 2)


def test_large_shadow_spte_permissions_are_checked():
    g = Guest(slots=((0, 0, 512, "ram"), HUGE))
    g.write(0x3008, 0x200000 | P | U | A | D | PS)  # gva 0x200000: a read-only 2 MiB user page
    g.access(0x200000, user=True)
    sp, index = g.leaf(0x200000)
    assert sp.level == 2 and sp.spt[index] & PS and not sp.spt[index] & PT_WRITABLE_MASK
    assert g.audit() == []
    sp.spt[index] |= PT_WRITABLE_MASK  # CORRUPT
    f = assert_only(g.audit(), "spte-permission")
    assert (f["addr"], f["level"]) == ("0x200000", 2)


@pytest.mark.parametrize(("addr", "level"), [(0x205000, 2), (0x5000, 1)])
def test_notifier_stale_spte_found_without_the_rmaps(addr, level):
    """I10 after each kvm_unmap_hva: the leaves of the gfn are found through the ledger, not through the rmaps
    the MMU used. A remap with intact rmaps is clean; one whose leaf was taken out of its rmap (so that
    kvm_unmap_hva cannot find it) is reported once, as the leaf's gfn and level, with its reference."""
    g = Guest(mmu="tdp", paging="none", kernel="notifier", slots=((0, 0, 512, "ram"), HUGE))
    gfn = addr >> 12
    g.access(addr, write=True)
    g.do("host_remap", gfn=gfn)
    assert g.findings == []
    g.access(addr, write=True)
    sp, index = g.leaf(addr)
    assert sp.level == level
    table, key = (g.kvm.rmap_pde, gfn >> 9) if level == 2 else (g.kvm.rmap, gfn)
    del table[key]  # CORRUPT: the leaf is in no rmap
    g.do("host_remap", gfn=gfn)
    f = assert_only(g.findings, "notifier-stale-spte")
    leaf_gfn = gfn & ~511 if level == 2 else gfn
    assert (f["gfn"], f["level"], f["point"]) == (hex(leaf_gfn), level, "host_remap")
    assert f["provenance"][0]["caller"] == "tdp_page_fault" and "owner" in f["provenance"][0]


# --- the kernel's audit points ------------------------------------------------------------------------------


def record_points(g: Guest) -> list[tuple]:
    calls: list[tuple] = []
    auditor = g.rp.auditor
    inner = auditor.audit_point

    def audit_point(point, in_flight=None, mappings=True):
        scratch = Findings()
        audit_mappings(g.kvm, scratch)
        calls.append((point, mappings, [f["code"] for f in scratch.items]))
        inner(point, in_flight, mappings)

    auditor.audit_point = audit_point
    return calls


def test_kernel_audit_points_run_where_the_kernel_has_them():
    g = Guest(kernel_audit=True)
    g.pte(0x10000, 0x10007)
    calls = record_points(g)
    g.access(0x10000)  # a fault fixed by FNAME(page_fault)
    assert [c[0] for c in calls] == ["pre page fault", "post page fault (fixed)"]
    del calls[:]
    g.pte(0x12000, 0x12003)  # a supervisor page (the pte write: its own two points)
    del calls[:]
    g.access(0x12000, user=True)  # a user access exits (trap), the walk fails: only the pre point
    assert [c[0] for c in calls] == ["pre page fault"]
    del calls[:]
    g.pte(0x11000, 0x11027)  # an emulated pte write
    assert [(c[0], c[1]) for c in calls] == [("pre pte write", False), ("post pte write", True)]
    del calls[:]
    g.access(0x10000)  # a hit: no exit
    assert calls == []
    assert g.findings == []


def test_no_kernel_points_without_the_option_or_under_tdp():
    g = Guest()
    g.pte(0x10000, 0x10007)
    calls = record_points(g)
    g.access(0x10000)
    g.pte(0x11000, 0x11027)
    assert calls == []
    t = Guest(mmu="tdp", paging="none", kernel_audit=True)
    calls = record_points(t)
    t.access(0x5000)
    assert calls == []


def test_pre_pte_write_skips_the_mapping_check():
    """At "pre pte write" guest memory already holds the new pte while the shadow still has the old one: the
    mapping check would call that a mismatch (v2.6.32 skips it there, and so does kvmpfn)."""
    g = Guest(kernel_audit=True)
    g.pte(0x10000, 0x10007)
    g.access(0x10000)
    g.write(0x20000, 1)
    calls = record_points(g)
    assert g.pte(0x10000, 0x20007)["result"] == "emulated"  # remap gva 0x10000 to gpa 0x20000
    assert calls[0] == ("pre pte write", False, ["spte-hpa-mismatch"])
    assert calls[1] == ("post pte write", True, [])
    assert g.findings == []


# --- a long replay audited after every event ---------------------------------------------------------------


def test_audit_every_1_on_10000_events(tmp_path):
    """A 32-bit guest with one page table of 512 ptes over 64 frames: 10,000 events of reads, writes and pte
    rewrites, the full audit after each. No timing assertion: it must finish, clean."""
    rnd = random.Random(2008)
    header = {
        "kvmpfn": 1,
        "mmu": "shadow",
        "guest": {"paging": "32", "cr3": "0x1000"},
        "memslots": [{"slot": 0, "gfn": 0, "npages": 1024, "backing": "ram"}],
    }
    events = [{"op": "write", "gpa": "0x1000", "val": "0x2007", "len": 4}]
    events += [
        {"op": "write", "gpa": hex(0x2000 + 4 * i), "val": hex(0x100000 + (i % 64 << 12) | 7), "len": 4}
        for i in range(512)
    ]
    while len(events) < 10_000:
        i = rnd.randrange(64)
        if rnd.random() < 0.9:
            events.append(
                {"op": "access", "addr": hex(i << 12), "write": rnd.randrange(2), "user": rnd.randrange(2), "fetch": 0}
            )
        else:
            val = 0x100000 + (rnd.randrange(64) << 12) | rnd.choice([5, 7, 0x27, 0x67])
            events.append({"op": "write", "gpa": hex(0x2000 + 4 * i), "val": hex(val), "len": 4})
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n")
    result = replay_file(str(path), ReplayOptions(audit_every=1))
    assert result.error is None
    assert result.events == 10_000
    assert result.findings == []
    assert result.results["hit"] and result.results["mapped"] and result.results["emulated"]
