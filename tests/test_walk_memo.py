"""The TDP CPU's walk memo (``hardware_walk``) must be an exact stand-in for walking: a random guest program
replayed under TDP gives byte-identical outcome records, guest memory and findings with the memo, with a memo
of two entries (forgetting all the time), and with no memo at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from test_differential import COMMON, Program, guest_programs

import kvmpfn.kvm.context as context
from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev


def replay_tdp(program: Program) -> tuple[list[dict], dict[int, bytes], list[dict]]:
    rp = Replayer(program.header, ReplayOptions(mmu="tdp", audit_every=1))
    records = [rp.apply(seq, seq + 1, e) for seq, e in enumerate(program.events)]
    memory = {pfn: bytes(f.data) for pfn, f in sorted(rp.host.frames.items()) if f.data is not None}
    rp.do_teardown()
    return records, memory, list(rp.findings.items)


def check_memo_exact(program: Program) -> None:
    memoised = replay_tdp(program)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context, "WALK_MEMO_LIMIT", 2)
        small = replay_tdp(program)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context, "remember_walk", lambda *args: None)
        unmemoised = replay_tdp(program)
    assert memoised == unmemoised
    assert small == unmemoised


@settings(COMMON, max_examples=60)
@given(guest_programs())
def test_walk_memo_is_exact(program: Program) -> None:
    check_memo_exact(program)


@pytest.mark.fuzz
@settings(COMMON, max_examples=2000)
@given(guest_programs(max_ops=80))
def test_walk_memo_is_exact_fuzz(program: Program) -> None:
    check_memo_exact(program)


def test_walk_memo_hits_and_is_dropped_by_a_pte_store() -> None:
    """The memo is used (a second access does not walk) and a store to a pte the walk read drops it."""
    header = ev.Header(kvmpfn=1, mmu="tdp", guest=ev.Guest(paging="64", cr3=0x1000))
    rp = Replayer(header, ReplayOptions())
    events = [
        ev.Write(gpa=0x1000, val=0x2000 | 0x67, len=8),  # PML4[0] -> PDPT
        ev.Write(gpa=0x2000, val=0x3000 | 0x67, len=8),  # PDPT[0] -> PD
        ev.Write(gpa=0x3000, val=0x4000 | 0x67, len=8),  # PD[0] -> PT
        ev.Write(gpa=0x4008, val=0x9000 | 0x67, len=8),  # PT[1]: gva 0x1000 -> gfn 9, A and D set
        ev.Access(addr=0x1010, write=True, user=True, fetch=False),
    ]
    for seq, e in enumerate(events):
        rp.apply(seq, seq + 1, e)
    vcpu = rp.kvm.vcpus[0]
    assert vcpu.walk_cache[1][0] == 9
    assert rp.host.watched[0x4008] == {(0, 1)}
    assert rp.host.watched_upper == {0x1000, 0x2000, 0x3000}
    rec = rp.apply(5, 6, ev.Write(gpa=0x4008, val=0xA000 | 0x67, len=8))
    assert rec["result"] == "ok"
    assert 1 not in vcpu.walk_cache
    assert 0x4008 not in rp.host.watched
    rec = rp.apply(6, 7, ev.Access(addr=0x1010, write=False, user=True, fetch=False))
    assert rec["gpa"] == "0xa010"
