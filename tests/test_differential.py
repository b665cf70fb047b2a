"""Differential test: one guest-action trace, replayed with ``mmu: shadow`` and with ``mmu: tdp``, must give the
guest the same view (TRACE_FORMAT "The simulated CPU": "both must agree on what the guest sees").

Guest-action traces hold only ``write``, ``access``, ``cr3``, ``paging`` and ``invlpg`` events (no ``pf``: a
recorded fault means different things under the two MMUs). For every ``access`` the two replays must agree on

- the outcome class: a guest fault and its error code; else the gpa reached (``mapped``, ``hit`` and
  ``emulated`` are all "the access completed"; ``mmio`` is its own class, also with its gpa);
- the guest A/D bits the access newly set. Under shadow paging KVM's walk sets them only on an exit; under
  TDP the hardware walk sets them on every access, so the per-event ``set_accessed``/``set_dirty`` lists could
  in principle be built differently. What the guest can observe is its page-table memory, so that is what is
  compared: the bytes of every guest frame the trace wrote (all guest page tables live there), after every
  access. Each replay's own records are then checked against its memory: the access changed nothing but A/D
  bits from 0 to 1, ``set_accessed`` is exactly the set of ptes whose A bit it set and ``set_dirty`` the pte
  whose D bit it set.

Each replay must also be clean: no finding with an audit after every event, every KVM frame reference
returned at teardown, and no livelock (an access reported ``mapped`` must now be a hit: the CPU's walk of the
shadow/TDP tables allows it).

Inputs: the hand-written traces ``traces/shadow/diff-*.jsonl`` (all three paging modes, CR0.WP=0/1, EFER.NX,
SMEP/SMAP with EFLAGS.AC, 4K/2M/4M/1G pages, pte rewrites, cr3 switches) and a hypothesis-generated family of
random guest page tables, accesses, pte rewrites, cr3 switches and feature changes. Bugs found this way are
pinned as minimal traces in ``xfail(strict=True)`` tests at the end of this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpfn.kvm.context import leaf_allows, shadow_walk
from kvmpfn.kvm.defs import PAGE_SHIFT
from kvmpfn.kvm.spte import NOTRAP, TRAP
from kvmpfn.kvm.walker import walk_addr
from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import open_trace

TRACES = Path(__file__).resolve().parent.parent / "traces" / "shadow"
DIFF_TRACES = sorted(TRACES.glob("diff-*.jsonl"))
GUEST_OPS = (ev.Write, ev.Access, ev.Cr3, ev.Paging, ev.Invlpg)

A_BIT, D_BIT = 1 << 5, 1 << 6
P, W, U, PS = 1, 2, 4, 1 << 7
NX = 1 << 63


# --- one replay ---------------------------------------------------------------------------------------------


@dataclass
class AccessView:
    """What the guest saw of one ``access``."""

    seq: int
    outcome: tuple  # ("fault", err) | ("done", gpa) | ("mmio", gpa)
    ad_changes: frozenset  # (pte gpa, "A"|"D") newly set in guest memory
    record: dict


@dataclass
class Run:
    mmu: str
    views: list[AccessView] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # self-consistency failures of this replay
    findings: list[dict] = field(default_factory=list)
    leaked: dict[int, int] = field(default_factory=dict)  # pfn -> KVM references left after teardown
    memory: dict[int, bytes] = field(default_factory=dict)  # final bytes of the tracked frames


def normalise(rec: dict) -> tuple:
    result = rec["result"]
    if result == "guest_fault":
        return ("fault", int(rec["err"], 16)) if "err" in rec else ("fault", rec.get("vector"))
    if result in ("mapped", "hit", "emulated"):
        return ("done", int(rec["gpa"], 16))
    if result == "mmio":
        return ("mmio", int(rec["gpa"], 16))
    return (result,)


def tracked_gfns(events: Iterable) -> list[int]:
    """Every guest frame the trace stores to: the guest page tables (and whatever else it wrote)."""
    return sorted({e.gpa >> PAGE_SHIFT for e in events if isinstance(e, ev.Write)})


def snapshot(rp: Replayer, gfns: Sequence[int]) -> dict[int, bytes]:
    return {gfn: rp.host.read_bytes(gfn << PAGE_SHIFT, 1 << PAGE_SHIFT) for gfn in gfns}


def ad_diff(before: dict[int, bytes], after: dict[int, bytes], pte_size: int) -> tuple[set, list[str]]:
    """The (pte gpa, bit) pairs an access set, and anything else it changed (which it must not)."""
    changes: set = set()
    other: list[str] = []
    for gfn, old in before.items():
        new = after[gfn]
        if old == new:
            continue
        for off in range(0, len(old), pte_size):
            o = int.from_bytes(old[off : off + pte_size], "little")
            n = int.from_bytes(new[off : off + pte_size], "little")
            if o == n:
                continue
            gpa = (gfn << PAGE_SHIFT) + off
            if o & ~n or (o ^ n) & ~(A_BIT | D_BIT):
                other.append(f"pte {gpa:#x} changed {o:#x} -> {n:#x}")
            if (o ^ n) & A_BIT:
                changes.add((gpa, "A"))
            if (o ^ n) & D_BIT:
                changes.add((gpa, "D"))
    return changes, other


def would_hit(rp: Replayer, e: ev.Access) -> bool:
    """Whether the CPU would now complete ``e`` without an exit (the access made progress)."""
    vcpu = rp.vcpu(e.vcpu)
    cpu = vcpu.cpu
    kvm = rp.kvm
    if kvm.tdp_enabled:
        addr = e.addr
        if cpu.paging != "none":
            ok, w = walk_addr(cpu, rp.host, e.addr, e.write, e.user, e.fetch, ac=e.ac, set_ad=False)
            if not ok:
                return False
            addr = w.gfn << PAGE_SHIFT | (e.addr & 0xFFF)
        path, end = shadow_walk(vcpu, kvm, addr)
        if end in (TRAP, NOTRAP) or not path:
            return False
        return not e.write or all(sp.spt[i] & W for sp, i in path)
    path, end = shadow_walk(vcpu, kvm, e.addr)
    if end in (TRAP, NOTRAP) or not path:
        return False
    return leaf_allows(cpu, path, e.write, e.user, e.fetch, e.ac)


def replay(header: ev.Header, events: Sequence, mmu: str, *, kernel_audit: bool = False) -> Run:
    """Replay ``events`` under ``mmu`` through the Python API, auditing after every event."""
    header = dataclasses.replace(header) if dataclasses.is_dataclass(header) else header
    rp = Replayer(header, ReplayOptions(mmu=mmu, audit_every=1, kernel_audit=kernel_audit))
    run = Run(mmu)
    gfns = tracked_gfns(events)
    mem = snapshot(rp, gfns)
    for seq, e in enumerate(events):
        assert isinstance(e, GUEST_OPS), f"not a guest action: {e!r}"
        rec = rp.apply(seq, seq + 1, e)
        if not isinstance(e, ev.Access):
            continue
        after = snapshot(rp, gfns)
        pte_size = 4 if rp.vcpu(e.vcpu).cpu.paging == "32" else 8
        changes, other = ad_diff(mem, after, pte_size)
        mem = after
        where = f"{mmu} seq {seq} ({rec['result']})"
        run.problems += [f"{where}: {o}" for o in other]
        recorded = {(int(g, 16), "A") for g in rec.get("set_accessed", [])}
        if "set_dirty" in rec:
            recorded.add((int(rec["set_dirty"], 16), "D"))
        if recorded != changes:
            run.problems.append(
                f"{where}: records say A/D set on {sorted(recorded)}, guest memory shows {sorted(changes)}"
            )
        if rec["result"] in ("mapped", "hit") and not would_hit(rp, e):
            run.problems.append(f"{where}: reported {rec['result']} but the access would exit again")
        if rec["result"] == "error":
            run.problems.append(f"{where}: result error")
        run.views.append(AccessView(seq, normalise(rec), frozenset(changes), rec))
    run.memory = mem
    rp.do_teardown()
    run.findings = list(rp.findings.items)
    run.leaked = {pfn: f.count for pfn, f in rp.host.frames.items() if f.count}
    return run


def describe(events: Sequence, seq: int) -> str:
    return ev_json(events[seq])


def ev_json(e) -> str:
    import msgspec

    return msgspec.json.encode(e).decode()


def differential(header: ev.Header, events: Sequence, *, kernel_audit: bool = False) -> tuple[Run, Run]:
    """Replay under both MMUs and assert the guest saw the same thing; returns the two runs."""
    runs = [replay(header, events, mmu, kernel_audit=kernel_audit) for mmu in ("shadow", "tdp")]
    shadow, tdp = runs
    for run in runs:
        assert not run.problems, "\n".join(run.problems)
        assert not run.findings, [(f["code"], f["seq"], f["message"]) for f in run.findings]
        assert not run.leaked, {hex(k): v for k, v in run.leaked.items()}
    assert len(shadow.views) == len(tdp.views)
    for s, t in zip(shadow.views, tdp.views, strict=True):
        assert s.outcome == t.outcome, (
            f"seq {s.seq} {describe(events, s.seq)}: shadow {s.record} vs tdp {t.record}"
        )
        assert s.ad_changes == t.ad_changes, (
            f"seq {s.seq} {describe(events, s.seq)}: A/D set by shadow {sorted(s.ad_changes)} "
            f"vs tdp {sorted(t.ad_changes)}"
        )
    assert shadow.memory == tdp.memory
    return shadow, tdp
