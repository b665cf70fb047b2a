"""The incremental audit reports exactly what a full audit at every point reports.

Differential property: random guest-action traces (the generator of test_audit_property: 64-bit, PAE and
32-bit guests rewriting their page tables, accesses, CR3 switches, dirty logging, injected failures, host
remaps and memslot changes under ``notifier``) replayed under both MMUs, every kernel variant, with up to two
``--bug`` mutants, auditing after every event and at the kernel's own points, once incrementally and once
with ``full_audit``: the findings, as (code, seq, subject), are the same, and so is the error that stopped
the replay, if any. The default profile is small; ``make fuzz`` runs the ``fuzz``-marked variant.
"""

from __future__ import annotations

import json
from collections import Counter

import msgspec
import pytest
from fuzz_count import generated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_audit_property import as_jsonl, guest_trace

from kvmpfn.audit.checks import GuestView, mapping_roots
from kvmpfn.audit.incremental import TrackedSpt, _mapping_state, walk_key
from kvmpfn.errors import InternalError, KvmpfnError
from kvmpfn.kvm.bugs import BUGS
from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev

SUBJECT = ("pfn", "gfn", "addr", "level", "slot", "region", "vcpu", "point")


def run(header: dict, events: list[dict], mmu: str, bugs: frozenset[str], full: bool, kernel_audit: bool):
    """Replay with an audit after every event; returns the findings as sorted (code, seq, subject) and the
    error that stopped the replay (None if it reached teardown)."""
    hdr = msgspec.convert({**header, "mmu": mmu}, ev.Header)
    options = ReplayOptions(audit_every=1, kernel_audit=kernel_audit, bugs=bugs, full_audit=full)
    rp = Replayer(hdr, options)
    error = None
    seq = -1
    try:
        for seq, e in enumerate(events):
            fields = {k: v for k, v in e.items() if k != "op"}
            rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))
        rp.findings.seq, rp.findings.point = len(events), "teardown"
        rp.do_teardown()
    except KvmpfnError as err:
        error = (seq, type(err).__name__, str(err))
    found = sorted(Counter((f["code"], f["seq"], *(f.get(k) for k in SUBJECT)) for f in rp.findings.items).items())
    return rp, found, error


def check(header: dict, events: list[dict], bugs: frozenset[str], kernel_audit: bool = True) -> None:
    for mmu in ("shadow", "tdp"):
        rp, incremental, err_incremental = run(header, events, mmu, bugs, False, kernel_audit)
        assert (rp.auditor.incremental is None) == ("audit-no-release" in bugs)
        _, full, err_full = run(header, events, mmu, bugs, True, kernel_audit)
        where = f"mmu {mmu}, bugs {sorted(bugs)}; the trace:\n{as_jsonl(header, events)}"
        assert err_incremental == err_full, where
        missing = [x for x in full if x not in incremental]
        extra = [x for x in incremental if x not in full]
        assert not missing and not extra, f"missing {json.dumps(missing)}\nextra {json.dumps(extra)}\n{where}"
    generated("incremental-audit")


bug_sets = st.lists(st.sampled_from(sorted(BUGS)), max_size=2).map(frozenset)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=guest_trace(max_events=40), bugs=bug_sets, kernel_audit=st.booleans())
def test_incremental_audit_finds_what_the_full_audit_finds(trace, bugs, kernel_audit):
    check(*trace, bugs, kernel_audit)


@pytest.mark.fuzz
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=guest_trace(max_events=150), bugs=bug_sets, kernel_audit=st.booleans())
def test_incremental_audit_finds_what_the_full_audit_finds_fuzz(trace, bugs, kernel_audit):
    check(*trace, bugs, kernel_audit)


def test_mutant_findings_come_out_of_the_incremental_audit():
    """The comparison is not vacuous: a mutant's findings come out of the incremental audit, at the event
    the full audit reports them."""
    header, events = (
        {
            "kvmpfn": 1,
            "mmu": "shadow",
            "kernel": "pfn",
            "guest": {"paging": "64", "cr3": 0x1000},
            "memslots": [{"slot": 0, "gfn": 0, "npages": 0x200, "backing": "ram"}],
        },
        [
            {"op": "write", "gpa": 0x1000, "val": 0x2007, "len": 8},
            {"op": "write", "gpa": 0x2000, "val": 0x3007, "len": 8},
            {"op": "write", "gpa": 0x3000, "val": 0x4007, "len": 8},
            {"op": "write", "gpa": 0x4000, "val": 0x10007, "len": 8},
            {"op": "access", "addr": 0, "write": 1, "user": 1, "fetch": 0},
            {"op": "write", "gpa": 0x4000, "val": 0x11007, "len": 8},
            {"op": "access", "addr": 0, "write": 1, "user": 1, "fetch": 0},
            {"op": "access", "addr": 0x4000, "write": 1, "user": 0, "fetch": 0},
        ],
    )
    bugs = frozenset({"same-pfn-no-release", "release-clean-writable"})
    for mmu in ("shadow", "tdp"):
        rp, incremental, _ = run(header, events, mmu, bugs, False, True)
        _, full, _ = run(header, events, mmu, bugs, True, True)
        assert incremental == full
    check(header, events, frozenset({"double-release"}))
    rp, found, _ = run(header, events, "tdp", frozenset({"pfn-shift-32"}), False, False)
    assert {"spte-pfn-truncated", "refcount-leak"} <= {code for (code, *_), _n in found}


def mapped_guest(options: ReplayOptions, write: bool) -> tuple[Replayer, list]:
    """A 64-bit guest whose tables map va 0 to gfn 0x10, accessed once (``write``), replayed under ``options``."""
    header = msgspec.convert(
        {
            "kvmpfn": 1,
            "guest": {"paging": "64", "cr3": 0x1000},
            "memslots": [{"slot": 0, "gfn": 0, "npages": 0x200, "backing": "ram"}],
        },
        ev.Header,
    )
    rp = Replayer(header, options)
    events = [
        ev.Write(gpa=0x1000, val=0x2007, len=8),
        ev.Write(gpa=0x2000, val=0x3007, len=8),
        ev.Write(gpa=0x3000, val=0x4007, len=8),
        ev.Write(gpa=0x4000, val=0x10007, len=8),
        ev.Access(addr=0, write=write, user=True, fetch=False),
    ]
    for seq, e in enumerate(events):
        rp.apply(seq, seq + 2, e)
    return rp, events


def test_paranoid_checks_the_structures_of_changed_pages():
    """--paranoid's structure check looks at the pages that changed since the previous event: a parent listed
    twice is an internal error at the next event."""
    rp, events = mapped_guest(ReplayOptions(paranoid=True), write=True)
    assert rp.auditor.incremental is not None and rp.kvm.active_mmu_pages
    assert all(isinstance(sp.spt, TrackedSpt) for sp in rp.kvm.active_mmu_pages.values())
    child = next(sp for sp in rp.kvm.active_mmu_pages.values() if sp.parent_ptes)
    child.parent_ptes.append(child.parent_ptes[0])
    with pytest.raises(InternalError, match="lists a parent twice"):
        rp.apply(len(events), len(events) + 2, ev.Invlpg(addr=0))


def _walk_answer(hit):
    ok, w = hit
    return ok, None if w is None else (w.gfn, w.level, w.pte_access, w.error_code, list(w.pte_gpa))


def check_kept_state(rp: Replayer) -> None:
    """What the incremental audit keeps across points equals what it would compute afresh now: each kept guest
    walk of a vcpu's current paging state, the roots it would audit, and each kept position of a shadow page."""
    inc = rp.auditor.incremental
    assert inc is not None
    kvm = rp.kvm
    for vcpu in kvm.vcpus.values():
        fresh = GuestView(kvm, vcpu)
        for page, hit in inc.walks.walks.get(walk_key(vcpu.cpu), {}).items():
            assert _walk_answer(hit) == _walk_answer(fresh.walk_page(page << 12)), f"stale walk of page {page:#x}"
    if inc.idents is not None:  # every event ends with an audit point that checks mappings
        assert inc.idents == {inc._ident(key, v) for key, v, _sp, _va, _level in mapping_roots(kvm)}
    if inc.kept_state is not None and inc.kept_state == _mapping_state(kvm):  # _mappings takes kept_roots as is
        roots = [(v.vcpu_id, sp.id, va, level) for _key, v, sp, va, level in mapping_roots(kvm)]
        assert [(v.vcpu_id, sp.id, va, level) for v, sp, va, level in inc.kept_roots] == roots
    order = lambda p: (p[0].vcpu_id, p[1], p[2])  # noqa: E731
    for sp, kept in inc.positions.items():
        now = inc._positions(sp, inc.kept_roots, {})
        assert sorted(kept, key=order) == sorted(now, key=order), f"stale positions of page {sp.id}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=guest_trace(max_events=40), kernel_audit=st.booleans())
def test_kept_walks_and_positions_are_never_stale(trace, kernel_audit):
    """The walk memo (dropped per guest pte stored) and the positions cache (dropped when an entry naming a
    shadow page changes or a page comes or goes) hold only what a fresh computation gives, after every event."""
    header, events = trace
    hdr = msgspec.convert({**header, "mmu": "shadow"}, ev.Header)
    rp = Replayer(hdr, ReplayOptions(audit_every=1, kernel_audit=kernel_audit))
    try:
        for seq, e in enumerate(events):
            fields = {k: v for k, v in e.items() if k != "op"}
            rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))
            check_kept_state(rp)
    except KvmpfnError:
        pass
    generated("incremental-audit-kept")


def test_a_stored_guest_pte_drops_the_walks_that_read_it():
    """A guest rewrites a leaf pte the audit walked: the next point walks again (the kept walk is dropped), and
    the emulated pte write's new spte is judged against the new translation: no finding."""
    rp, events = mapped_guest(ReplayOptions(audit_every=1), write=False)
    inc = rp.auditor.incremental
    walks = inc.walks.walks[walk_key(rp.kvm.vcpus[0].cpu)]
    assert walks[0][1].gfn == 0x10
    rp.apply(5, 7, ev.Write(gpa=0x4000, val=0x11007, len=8))
    assert 0 not in walks
    rp.apply(6, 8, ev.Access(addr=0, write=False, user=True, fetch=False))
    assert walks[0][1].gfn == 0x11
    check_kept_state(rp)
    assert not rp.findings.items
