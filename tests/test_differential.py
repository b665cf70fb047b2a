"""Differential test: one guest-action trace, replayed with ``mmu: shadow`` and with ``mmu: tdp``, must give the
guest the same view (docs/trace-format.md, The simulated CPU).

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

Inputs:

- every guest-action trace in traces/shadow/: the ``diff-*.jsonl`` traces written for this test (all three
  paging modes, CR0.WP=0/1, EFER.NX on and off, SMEP/SMAP with EFLAGS.AC, 4K/2M/4M/1G pages, large pages over
  RAM and hugetlbfs, pte rewrites of every size, feature changes, cr3 switches) and the shadow scenarios, in
  every kernel variant;
- a hypothesis-generated family: random page-table shapes (shared and looping tables, random flags, reserved
  bits, large pages) in 32-bit, PAE and 64-bit paging, random accesses, pte rewrites through ``write`` (whole,
  half, misaligned), cr3 switches between two address spaces, feature changes, invlpg, one or two vcpus;
- a guest with more page tables than the shadow-page budget (recycling).

Bugs found this way are pinned as minimal traces at the end of this file: ``xfail(strict=True)`` while open,
plain regression tests once fixed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from fuzz_count import generated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpfn.kvm.context import leaf_allows, shadow_walk
from kvmpfn.kvm.spte import NOTRAP, TRAP
from kvmpfn.kvm.walker import walk_addr
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace import events as ev
from kvmpfn.trace.reader import open_trace
from kvmpfn.x86 import PAGE_SHIFT

TRACES = Path(__file__).resolve().parent.parent / "traces" / "shadow"
DIFF_TRACES = sorted(TRACES.glob("diff-*.jsonl"))
REGRESSIONS = TRACES.parent / "regressions"
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


def replay(
    header: ev.Header,
    events: Sequence,
    mmu: str,
    *,
    kernel: str | None = None,
    kernel_audit: bool = False,
    audit_every: int = 1,
    bugs: Iterable[str] = (),
) -> Run:
    """Replay ``events`` under ``mmu`` through the Python API (``Replayer``), auditing every ``audit_every``
    events, and look at the guest's memory around every access."""
    options = ReplayOptions(
        mmu=mmu, kernel=kernel, audit_every=audit_every, kernel_audit=kernel_audit, bugs=frozenset(bugs)
    )
    rp = Replayer(header, options)
    run = Run(mmu)
    gfns = tracked_gfns(events)
    mem: dict[int, bytes] | None = None  # the tracked frames, when no event changed them since
    for seq, e in enumerate(events):
        assert isinstance(e, GUEST_OPS), f"not a guest action: {e!r}"
        if isinstance(e, ev.Access) and mem is None:
            mem = snapshot(rp, gfns)
        rec = rp.apply(seq, seq + 1, e)
        if not isinstance(e, ev.Access):
            mem = None
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
    run.memory = snapshot(rp, gfns)
    rp.do_teardown()
    run.findings = list(rp.findings.items)
    run.leaked = {pfn: f.count for pfn, f in rp.host.frames.items() if f.count}
    return run


def ev_json(e) -> str:
    return msgspec.json.encode(e).decode()


def check_differential(
    header: ev.Header, events: Sequence, *, check_findings: bool = True, **options
) -> tuple[Run, Run]:
    """Replay under both MMUs and assert that the guest saw the same thing and that each replay was clean;
    returns the two runs. ``options`` go to :func:`replay`."""
    runs = [replay(header, events, mmu, **options) for mmu in ("shadow", "tdp")]
    shadow, tdp = runs
    for run in runs:
        assert not run.problems, "\n".join(run.problems)
        if check_findings:
            assert not run.findings, [(run.mmu, f["code"], f["seq"], f["message"]) for f in run.findings]
        assert not run.leaked, {hex(k): v for k, v in run.leaked.items()}
    assert len(shadow.views) == len(tdp.views)
    for s, t in zip(shadow.views, tdp.views, strict=True):
        what = f"seq {s.seq} {ev_json(events[s.seq])}"
        assert s.outcome == t.outcome, f"{what}: shadow {s.record} vs tdp {t.record}"
        assert s.ad_changes == t.ad_changes, (
            f"{what}: A/D set by shadow {sorted(s.ad_changes)} vs tdp {sorted(t.ad_changes)}"
        )
    assert shadow.memory == tdp.memory
    return shadow, tdp


def load(path: Path) -> tuple[ev.Header, list]:
    with open_trace(str(path)) as reader:
        return reader.header, [e for _, e in reader]


def parse(text: str, tmp_path: Path) -> tuple[ev.Header, list]:
    """A trace given as text, read through the trace reader."""
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    return load(path)


# --- the hypothesis family -----------------------------------------------------------------------------------

#: The features a ``paging`` event of the family may flip, per mode.
FEATURES = {
    "32": ("cr0_wp", "cr4_pse", "cr4_smep", "cr4_smap", "maxphyaddr"),
    "pae": ("cr0_wp", "efer_nx", "cr4_smep", "cr4_smap", "maxphyaddr"),
    "64": ("cr0_wp", "efer_nx", "cr4_smep", "cr4_smap", "gbpages", "maxphyaddr"),
}
#: The features that are CPUID bits rather than control registers: a change on one vcpu reaches every vcpu.
CPUID = ("gbpages", "maxphyaddr")

KERNELS = ("page", "pfn", "pfn-io", "notifier")
#: 8 MiB of RAM (the page tables live at gfns 0x20..0x2b), 4 MiB of hugetlbfs (two 2 MiB regions, so guest
#: large pages can get large sptes), 16 device frames (no struct page), and RAM at 2^39, which an 8-byte pte
#: reaches only while MAXPHYADDR is above 39.
MEMSLOTS = (
    ev.Memslot(slot=0, gfn=0, npages=0x800, backing="ram"),
    ev.Memslot(slot=1, gfn=0x800, npages=0x400, backing="hugetlb"),
    ev.Memslot(slot=2, gfn=0xFE000, npages=0x10, backing="mmio"),
    ev.Memslot(slot=3, gfn=0x8000000, npages=0x10, backing="ram"),
)
TABLE_GFNS = tuple(range(0x20, 0x2C)) + (0x905,)  # one in a hugetlbfs region: no large spte over it
#: leaf targets: RAM, the page tables themselves, hugetlbfs frames, device frames, a frame in no slot, and
#: (8-byte ptes only) RAM at 2^39
DATA_GFNS = (0x40, 0x41, 0x42, 0x7FF, 0x20, 0x21, 0x22, 0x23, 0x800, 0x801, 0xA05, 0xFE000, 0xF0000, 0x8000001)


@dataclass(frozen=True)
class Mode:
    name: str
    levels: int
    size: int  # bytes per entry
    bits: int  # index bits per level
    idx: tuple[int, ...]  # entry indices the family uses
    large: dict  # level -> candidate large-page base gpas


MODES = {
    "32": Mode("32", 2, 4, 10, (0, 1, 2, 3, 1023), {2: (0x0, 0x400000, 0x800000)}),
    "pae": Mode("pae", 3, 8, 9, (0, 1, 2, 3, 511), {2: (0x0, 0x200000, 0x800000, 0xA00000)}),
    "64": Mode("64", 4, 8, 9, (0, 1, 2, 3, 511), {2: (0x0, 0x200000, 0x800000, 0xA00000), 3: (0x0, 0x40000000)}),
}


def gva_of(mode: Mode, indices: Sequence[int], offset: int) -> int:
    """The gva whose walk uses ``indices`` (top level first) and the byte ``offset`` in the page."""
    gva = offset
    for level, idx in zip(range(mode.levels, 0, -1), indices, strict=True):
        gva |= idx << (PAGE_SHIFT + mode.bits * (level - 1))
    if mode.name == "64" and gva >> 47:
        gva |= ((1 << 64) - 1) & ~((1 << 48) - 1)  # canonical
    return gva


def chance(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


@st.composite
def flags(draw, mode: Mode, leaf: bool, nx_ok: bool = True) -> int:
    """P plus W/U/A/D (and NX with 8-byte entries), mostly permissive above the leaf; now and then an odd
    bit: PWT/PCD/G/available bits, or a reserved one (bit 51, above MAXPHYADDR 40; bit 52 in PAE). NX is rare
    when ``nx_ok`` is false (EFER.NX off: bit 63 is reserved)."""
    value = P
    for bit in (W, U, A_BIT):
        if chance(draw, 60 if leaf else 85):
            value |= bit
    if leaf and chance(draw, 50):
        value |= D_BIT
    if mode.size == 8 and chance(draw, (25 if leaf else 10) if nx_ok else 2):
        value |= NX
    if chance(draw, 8):
        odd = [1 << 3, 1 << 4, 1 << 8, 1 << 9, 1 << 11]
        if mode.size == 8:
            odd += [1 << 51, 1 << 52]
        value |= draw(st.sampled_from(odd))
    return value


@st.composite
def entry(draw, mode: Mode, level: int, paging: dict, fresh: list | None = None) -> tuple[int, str, int | None]:
    """A guest entry for ``level``: (value, kind, next table gfn). kind: table | large | leaf | absent. A table
    entry mostly points to a table from ``fresh`` (not used yet), else to any table (shared, or a loop)."""
    if chance(draw, 6):
        return draw(st.sampled_from((0, 0x1000 | W | U, 0x21000 | A_BIT))), "absent", None
    if mode.name == "pae" and level == 3:  # a PDPTE: P and the address (anything else is reserved)
        table = fresh.pop() if fresh and chance(draw, 75) else draw(st.sampled_from(TABLE_GFNS))
        junk = draw(st.sampled_from((0, 0, 0, 0, 0, 0, 0, W, 1 << 8, 1 << 9)))
        return table << PAGE_SHIFT | P | junk, "table", table
    large_ok = level in mode.large and (level == 2 or paging["gbpages"])
    if level == 1:
        gfn = draw(st.sampled_from([g for g in DATA_GFNS if mode.size == 8 or g < 1 << 20]))
        return gfn << PAGE_SHIFT | draw(flags(mode, True, paging["efer_nx"])), "leaf", None
    if large_ok and draw(st.integers(0, 3)) == 0:
        base = draw(st.sampled_from(mode.large[level]))
        if draw(st.integers(0, 7)) == 0:
            base |= 1 << 12  # PAT bit of a large entry
        return base | draw(flags(mode, True, paging["efer_nx"])) | PS, "large", None
    table = fresh.pop() if fresh and chance(draw, 75) else draw(st.sampled_from(TABLE_GFNS))
    return table << PAGE_SHIFT | draw(flags(mode, False, paging["efer_nx"])), "table", table


@dataclass
class Program:
    header: ev.Header
    events: list = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: a trace to paste
        lines = [ev_json(self.header)] + [ev_json(e) for e in self.events]
        return "\n" + "\n".join(lines)


@st.composite
def guest_programs(draw, modes: Sequence[str] = ("32", "pae", "64"), max_ops: int = 40) -> Program:
    """Random guest page tables (written with ``write`` events), then random accesses, pte rewrites (full,
    half and misaligned stores), cr3 switches between two address spaces, feature changes and invlpg."""
    mode = MODES[draw(st.sampled_from(modes))]
    paging = {
        "cr0_wp": draw(st.booleans()),
        "efer_nx": draw(st.booleans()),
        "cr4_pse": draw(st.booleans()),
        "cr4_smep": draw(st.booleans()),
        "cr4_smap": draw(st.booleans()),
        "gbpages": mode.name == "64" and draw(st.booleans()),
        "maxphyaddr": draw(st.sampled_from((40, 36))),
    }
    guest = ev.Guest(paging=mode.name, cr3=0, **paging)
    header = ev.Header(kvmpfn=1, kernel=draw(st.sampled_from(KERNELS)), guest=guest, memslots=list(MEMSLOTS))
    events: list = []
    slots: list[tuple[int, int]] = []  # (entry gpa, level) of every entry written

    def store(gpa: int, value: int, level: int, vcpu: int = 0) -> None:
        events.append(ev.Write(gpa=gpa, val=value, len=mode.size, vcpu=vcpu))
        if (gpa, level) not in slots:
            slots.append((gpa, level))

    roots = draw(st.lists(st.sampled_from(TABLE_GFNS), min_size=1, max_size=2, unique=True))
    cr3s = [r << PAGE_SHIFT | (draw(st.sampled_from((0, 0x20))) if mode.name == "pae" else 0) for r in roots]
    gvas: list[int] = []
    fresh = [t for t in draw(st.permutations(TABLE_GFNS)) if t not in roots]
    tree: dict[int, tuple[str, int | None]] = {}  # entry gpa -> (kind, next table) of the paths built
    for _ in range(draw(st.integers(1, 5))):
        cr3 = draw(st.sampled_from(cr3s))
        indices = [draw(st.sampled_from(mode.idx[:4] if mode.name == "pae" else mode.idx))]
        indices += [draw(st.sampled_from(mode.idx)) for _ in range(mode.levels - 1)]
        table = cr3 >> PAGE_SHIFT
        for depth, level in enumerate(range(mode.levels, 0, -1)):
            if mode.name == "pae" and level == 3:
                gpa = (cr3 & ~0x1F) + 8 * indices[depth]
            else:
                gpa = (table << PAGE_SHIFT) + indices[depth] * mode.size
            if gpa in tree and chance(draw, 85):  # mostly share the prefix another path built
                kind, nxt = tree[gpa]
            else:
                value, kind, nxt = draw(entry(mode, level, paging, fresh))
                store(gpa, value, level)
                tree[gpa] = kind, nxt
            if kind != "table":
                break
            table = nxt
        offset = draw(st.sampled_from((0, 8, 0xFF8)))
        gvas.append(gva_of(mode, indices, offset))
    nvcpus = draw(st.integers(1, 2))
    pagings = [dict(paging) for _ in range(nvcpus)]  # each vcpu's features (a vcpu starts from the header)
    for vcpu in range(nvcpus):
        events.append(ev.Cr3(val=draw(st.sampled_from(cr3s)) if vcpu else cr3s[0], vcpu=vcpu))

    for _ in range(draw(st.integers(1, max_ops))):
        vcpu = 1 if nvcpus == 2 and chance(draw, 30) else 0
        op = draw(st.integers(0, 19))
        if op < 11:  # access
            if chance(draw, 20):
                indices = [draw(st.sampled_from(mode.idx)) for _ in range(mode.levels)]
                if mode.name == "pae":
                    indices[0] &= 3
                addr = gva_of(mode, indices, 0)
            else:
                addr = draw(st.sampled_from(gvas))
            fetch = chance(draw, 20)
            write = not fetch and chance(draw, 45)
            user, ac = chance(draw, 35), chance(draw, 30)
            events.append(ev.Access(addr=addr, write=write, user=user, fetch=fetch, ac=ac, vcpu=vcpu))
        elif op < 15:  # rewrite a pte that is there: a flag flipped, or a whole new entry
            gpa, level = draw(st.sampled_from(slots))
            if draw(st.booleans()):
                value = draw(entry(mode, level, pagings[vcpu]))[0]
            else:
                old = next(
                    e.val for e in reversed(events) if isinstance(e, ev.Write) and e.gpa == gpa and e.len == mode.size
                )
                value = old ^ draw(st.sampled_from((P, W, U, A_BIT, D_BIT, PS) + ((NX,) if mode.size == 8 else ())))
            store(gpa, value, level, vcpu)
        elif op == 15:  # a store that is not one whole pte: half of an 8-byte pte, 1-2 bytes, or (32-bit
            # paging) 8 bytes over two ptes; kvm_mmu_pte_write zaps the shadow page for all but the half
            gpa, level = draw(st.sampled_from(slots))
            size = draw(st.sampled_from((4, 2, 1) if mode.size == 8 else (8, 2, 1)))
            if size > mode.size:
                gpa &= ~(size - 1)
            part = draw(st.integers(0, max(mode.size // size - 1, 0))) * size
            val = draw(st.integers(0, (1 << (8 * size)) - 1))
            events.append(ev.Write(gpa=gpa + part, val=val, len=size, vcpu=vcpu))
        elif op == 16:
            events.append(ev.Cr3(val=draw(st.sampled_from(cr3s)), vcpu=vcpu))
        elif op == 17:
            name = draw(st.sampled_from(FEATURES[mode.name]))
            value = not pagings[vcpu][name] if name != "maxphyaddr" else 76 - pagings[vcpu][name]  # 40 <-> 36
            for v in range(nvcpus) if name in CPUID else (vcpu,):
                pagings[v] = {**pagings[v], name: value}
            events.append(ev.Paging(**{name: value}, vcpu=vcpu))
        elif op == 18:
            events.append(ev.Invlpg(addr=draw(st.sampled_from(gvas)), vcpu=vcpu))
        else:  # store to a table at an entry nobody wrote yet
            table = draw(st.sampled_from(TABLE_GFNS))
            idx = draw(st.sampled_from(mode.idx))
            level = draw(st.integers(1, mode.levels))
            store((table << PAGE_SHIFT) + idx * mode.size, draw(entry(mode, level, pagings[vcpu]))[0], level, vcpu)
    return Program(header, events)


#: The family's settings: no deadline (a replay audits after every event), a modest default count.
COMMON = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_program(program: Program, **options) -> None:
    check_differential(program.header, program.events, **options)
    generated("shadow-vs-tdp")


@settings(COMMON, max_examples=40)
@given(guest_programs())
def test_random_guest_programs_agree(program: Program) -> None:
    check_program(program)


@pytest.mark.fuzz
@settings(COMMON, max_examples=5000)
@given(guest_programs(max_ops=80))
def test_random_guest_programs_agree_fuzz(program: Program) -> None:
    check_program(program)


@pytest.mark.fuzz
@settings(COMMON, max_examples=1000)
@given(guest_programs(max_ops=60))
def test_random_guest_programs_agree_with_kernel_audit_fuzz(program: Program) -> None:
    check_program(program, kernel_audit=True)


# --- hand-written traces -----------------------------------------------------------------------------------


def guest_action_traces() -> list[str]:
    """Every trace of traces/shadow/ made only of guest actions: the diff-*.jsonl traces written for this test,
    and the shadow scenarios (test_shadow_scenarios.py), which must mean the same under TDP."""
    names = []
    for path in sorted(TRACES.glob("*.jsonl")):
        _, events = load(path)
        if all(isinstance(e, GUEST_OPS) for e in events):
            names.append(path.name)
    return names


def test_hand_written_traces_are_there() -> None:
    names = guest_action_traces()
    assert len(DIFF_TRACES) >= 6
    assert {p.name for p in DIFF_TRACES} <= set(names)
    modes = {load(TRACES / n)[0].guest.paging for n in names}
    assert modes == {"32", "pae", "64"}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", guest_action_traces())
def test_hand_written_trace_agrees(name: str, kernel: str) -> None:
    """Under the trace's own kernel (``pfn``) with an audit after every event and at the kernel's audit points;
    under the other variants with the teardown audit only (the auditor's walks dominate the run time)."""
    header, events = load(TRACES / name)
    audits = {"kernel_audit": True, "audit_every": 1} if kernel == header.kernel else {"audit_every": 0}
    shadow, tdp = check_differential(header, events, kernel=kernel, **audits)
    assert shadow.views, "the trace makes no access"
    # the trace is about something: both faults and completed accesses
    kinds = {v.outcome[0] for v in shadow.views}
    assert "fault" in kinds and "done" in kinds


def test_hand_written_traces_cover_the_features() -> None:
    """What the hand-written traces exercise, read off the shadow replay's records and the traces."""
    seen: set[str] = set()
    for name in guest_action_traces():
        header, events = load(TRACES / name)
        shadow, _ = check_differential(header, events, audit_every=0)
        guest = header.guest
        for v in shadow.views:
            kind, value = v.outcome
            if kind == "fault":
                seen |= {bit for mask, bit in ((8, "rsvd"), (16, "fetch-fault"), (1, "protection")) if value & mask}
            if kind == "done":
                seen.add(f"done-{guest.paging}")
                seen |= {"user"} if events[v.seq].user else set()
                seen |= {"ac"} if events[v.seq].ac and guest.cr4_smap else set()
            if kind == "mmio":
                seen.add("mmio")
            if v.record["result"] == "emulated":
                seen.add("emulated")
            if "spte" in v.record and int(v.record["spte"], 16) & PS:
                seen.add("large-spte")
            if "D" in {bit for _, bit in v.ad_changes}:
                seen.add("dirty")
        seen |= {f for f in ("cr4_smep", "cr4_smap", "gbpages") if getattr(guest, f)}
        cr3_loads = 0
        for e in events:
            if isinstance(e, ev.Write) and e.len < (4 if guest.paging == "32" else 8):
                seen.add("partial-pte-write")
            if isinstance(e, ev.Write) and e.len == 8 and guest.paging == "32":
                seen.add("wide-pte-write")
            cr3_loads += isinstance(e, ev.Cr3)
            if isinstance(e, ev.Paging):
                seen |= {f"flip-{f}" for f in ev.Paging.__struct_fields__ if getattr(e, f) is not None}
        if cr3_loads > 1:
            seen.add("cr3-switch")
        if not guest.cr0_wp:
            seen.add("flip-cr0_wp")
    expected = {"rsvd", "fetch-fault", "protection", "done-32", "done-pae", "done-64", "user", "ac", "mmio"}
    expected |= {"emulated", "large-spte", "dirty", "cr4_smep", "cr4_smap", "gbpages", "partial-pte-write"}
    expected |= {"cr3-switch", "flip-cr0_wp", "flip-efer_nx", "flip-cr4_pse", "flip-gbpages", "flip-maxphyaddr"}
    expected |= {"flip-cr4_smep", "flip-cr4_smap", "wide-pte-write"}
    assert expected <= seen, expected - seen


def test_smap_with_ac_agrees() -> None:
    header, events = load(TRACES / "diff-64-smap.jsonl")
    shadow, tdp = check_differential(header, events)
    assert [v.outcome[1] if v.outcome[0] == "fault" else v.outcome[0] for v in shadow.views] == [
        0x1,  # SMAP, AC=0
        "done",  # AC=1
        0x1,
        0x3,
        "done",
        0x11,  # SMEP
        "done",
        "done",
        "done",
        "done",
        "done",  # SMAP off
        0x1,  # and on again
    ]


# --- the harness can fail ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bug, name",
    [
        ("cr0wp-user-write", "diff-64-perms.jsonl"),  # a user write to a read-only page hits after CR0.WP=0
        ("cr0wp-shared-sp", "diff-64-perms.jsonl"),  # CR0.WP=1 again: the CR0.WP=0 sptes still let writes in
        ("no-rsvd-check", "diff-pae-nonx.jsonl"),  # reserved bits walked as address bits
    ],
)
def test_a_guest_visible_mutant_is_caught(bug: str, name: str) -> None:
    """The differential sees a historical bug that changes what the guest sees under shadow paging only."""
    header, events = load(TRACES / name)
    runs = [replay(header, events, mmu, bugs=(bug,), audit_every=0) for mmu in ("shadow", "tdp")]
    assert any(s.outcome != t.outcome for s, t in zip(runs[0].views, runs[1].views, strict=True))
    with pytest.raises(AssertionError):
        check_differential(header, events, bugs=(bug,), audit_every=0, check_findings=False)


# --- recycling -------------------------------------------------------------------------------------------------


def many_page_tables(paging: str, n: int, seed: int) -> tuple[ev.Header, list]:
    """A guest with more page tables than the shadow-page budget (64 pages for 8 MiB of memory): ``n`` page
    tables, each mapping one page, touched three times in random orders, with pte rewrites and CR3 switches, so
    that KVM keeps recycling shadow pages (roots included) from the tail of the active list."""
    rnd = random.Random(seed)
    size = 4 if paging == "32" else 8
    events: list = []

    def store(gpa: int, val: int) -> None:
        events.append(ev.Write(gpa=gpa, val=val, len=size))

    gvas = []
    if paging == "64":
        store(0x1000, 0x2007)  # PML4 -> PDPT gfn 0x2 -> PD gfn 0x3
        store(0x2000, 0x3007)
        store(0x5000, 0x6007)  # a second address space sharing the PD
        store(0x6000, 0x3007)
        cr3s = [0x1000, 0x5000]
        for i in range(n):
            store(0x3000 + 8 * i, (0x100 + i) << PAGE_SHIFT | 7)
            gvas.append(i << 21)
    else:  # 32-bit: the PD at gfn 0x1 spans all four PAE-style roots
        cr3s = [0x1000]
        for i in range(n):
            pdi = i * 5 % 1024
            store(0x1000 + 4 * pdi, (0x100 + i) << PAGE_SHIFT | 7)
            gvas.append(pdi << 22)
    for i in range(n):
        store((0x100 + i) << PAGE_SHIFT, (0x400 + i) << PAGE_SHIFT | 7)
    events.append(ev.Cr3(val=cr3s[0]))
    for _ in range(3):
        for i in rnd.sample(range(n), n):
            events.append(ev.Access(addr=gvas[i], write=rnd.random() < 0.5, user=True, fetch=False))
            if rnd.random() < 0.08:
                events.append(ev.Cr3(val=rnd.choice(cr3s)))
            if rnd.random() < 0.08:
                pte = rnd.choice((7, 0x27, 0x67, 5, 0))
                store((0x100 + rnd.randrange(n)) << PAGE_SHIFT, (0x400 + rnd.randrange(n)) << PAGE_SHIFT | pte)
    guest = ev.Guest(paging=paging, cr3=cr3s[0])
    return ev.Header(kvmpfn=1, guest=guest, memslots=[ev.Memslot(slot=0, gfn=0, npages=0x800, backing="ram")]), events


@pytest.mark.parametrize("paging, n", [("64", 90), ("32", 120)])
def test_recycling_shadow_pages_agrees(paging: str, n: int) -> None:
    header, events = many_page_tables(paging, n, seed=1)
    shadow, tdp = check_differential(header, events, audit_every=50)
    rp = Replayer(header, ReplayOptions())
    for seq, e in enumerate(events):
        rp.apply(seq, seq + 1, e)
    assert rp.kvm.stat["mmu_recycled"] > n  # the budget really ran out, again and again


# --- bugs found by this test: fixed ones as regressions, open ones as xfail ---------------------------------------

TABLES_64 = """
{"op": "write", "gpa": "0x20000", "val": "0x21007", "len": 8}
{"op": "write", "gpa": "0x21000", "val": "0x22007", "len": 8}
{"op": "write", "gpa": "0x22000", "val": "0x23007", "len": 8}
{"op": "cr3", "val": "0x20000"}
"""

BUG_1G_ROLE_ACCESS = """
# 64-bit with 1 GiB pages: PDPT[0] maps gpa 0 as a supervisor-only 1 GiB page (gva 0), PDPT[1] maps the same
# gpa 0 as a user page (gva 0x40000000). Both are shadowed as metaphysical 2 MiB and 4 KiB pieces. The level-1
# pieces got role.access 0 for both (walker.access_at[0] is never set by a walk that ends at level 3), so
# they were one shared shadow page: the user access through PDPT[1] rewrote the shared spte with U, and a user
# read through the supervisor-only PDPT[0] then hit. TDP gives #PF P|U. (Fixed in 79289c6.)
{"kvmpfn": 1, "guest": {"paging": "64", "cr3": "0x20000", "gbpages": true}}
{"op": "write", "gpa": "0x20000", "val": "0x21007", "len": 8}
{"op": "write", "gpa": "0x21000", "val": "0xe3", "len": 8}
{"op": "write", "gpa": "0x21008", "val": "0xe7", "len": 8}
{"op": "cr3", "val": "0x20000"}
{"op": "access", "addr": "0x1000", "write": 0, "user": 0, "fetch": 0}
{"op": "access", "addr": "0x40001000", "write": 0, "user": 1, "fetch": 0}
{"op": "access", "addr": "0x1000", "write": 0, "user": 1, "fetch": 0}
"""


def test_bug_1g_split_role_access(tmp_path: Path) -> None:
    header, events = parse(BUG_1G_ROLE_ACCESS, tmp_path)
    shadow, _ = check_differential(header, events)
    assert shadow.views[-1].outcome == ("fault", 0x5)


#: A feature that changes how the guest tables are read, flipped after the tables were shadowed. The shadow
#: page role did not record it, so kvm_mmu_reset_context found the old shadow pages again and their sptes kept
#: the old translation. (Fixed in 062a4ec and 79289c6: EFER.NX and CR4.PSE in the role, a CPUID change zaps.)
FEATURE_FLIPS = {
    # a 4 MiB page (PSE) becomes a pointer to a page table at gpa 0x400000, which is empty: #PF P=0
    "cr4_pse": (
        {"paging": "32", "cr3": "0x20000", "cr4_pse": True},
        '{"op": "write", "gpa": "0x20000", "val": "0x400087", "len": 4}\n{"op": "cr3", "val": "0x20000"}',
        "0x8",
    ),
    # bit 63 of the leaf pte is NX with EFER.NX=1, reserved with EFER.NX=0: #PF P|U|RSVD
    "efer_nx": (
        {"paging": "64", "cr3": "0x20000", "efer_nx": True},
        TABLES_64 + '{"op": "write", "gpa": "0x23000", "val": "0x8000000000040027", "len": 8}',
        "0x0",
    ),
    # PS in a PDPTE is a 1 GiB page with gbpages, a reserved bit without: #PF P|U|RSVD
    "gbpages": (
        {"paging": "64", "cr3": "0x20000", "gbpages": True},
        '{"op": "write", "gpa": "0x20000", "val": "0x21007", "len": 8}\n'
        '{"op": "write", "gpa": "0x21000", "val": "0xa7", "len": 8}\n{"op": "cr3", "val": "0x20000"}',
        "0x40000",
    ),
    # bit 39 of the leaf pte is an address bit with MAXPHYADDR 40, reserved with 36: #PF P|U|RSVD
    "maxphyaddr": (
        {"paging": "64", "cr3": "0x20000", "maxphyaddr": 40},
        TABLES_64 + '{"op": "write", "gpa": "0x23000", "val": "0x8000000027", "len": 8}',
        "0x0",
    ),
}
FLIPPED = {"cr4_pse": False, "efer_nx": False, "gbpages": False, "maxphyaddr": 36}
FAULT_AFTER_FLIP = {"cr4_pse": 0x4, "efer_nx": 0xD, "gbpages": 0xD, "maxphyaddr": 0xD}


def feature_flip_trace(feature: str, before: Sequence[int], flip: int, after: Sequence[int]) -> str:
    """The tables of FEATURE_FLIPS[feature], a user read on each vcpu of ``before``, the feature flipped on vcpu
    ``flip``, then a user read on each vcpu of ``after``."""
    guest, tables, addr = FEATURE_FLIPS[feature]
    memslots = [{"slot": 0, "gfn": 0, "npages": 2048, "backing": "ram"}]
    if feature == "maxphyaddr":  # memory at 2^39 for the leaf to map
        memslots.append({"slot": 1, "gfn": "0x8000000", "npages": 16, "backing": "ram"})

    def read(vcpu: int) -> str:
        return json.dumps({"op": "access", "addr": addr, "write": 0, "user": 1, "fetch": 0, "vcpu": vcpu})

    lines = [json.dumps({"kvmpfn": 1, "guest": guest, "memslots": memslots}), tables]
    lines += [read(v) for v in before]
    lines.append(json.dumps({"op": "paging", feature: FLIPPED[feature], "vcpu": flip}))
    lines += [read(v) for v in after]
    return "\n".join(lines)


@pytest.mark.parametrize("feature", sorted(FEATURE_FLIPS))
def test_bug_feature_change_keeps_stale_sptes(feature: str, tmp_path: Path) -> None:
    header, events = parse(feature_flip_trace(feature, [0], 0, [0]), tmp_path)
    shadow, _ = check_differential(header, events)
    assert shadow.views[0].outcome[0] == "done"
    assert shadow.views[1].outcome == ("fault", FAULT_AFTER_FLIP[feature])


@pytest.mark.parametrize("feature", ["gbpages", "maxphyaddr"])
def test_bug_cpuid_differs_between_vcpus(feature: str, tmp_path: Path) -> None:
    """vcpu 0 drops the feature (the MMU is zapped), then vcpu 1, which still has it, maps the page; vcpu 0's
    access must fault with RSVD, as under TDP."""
    header, events = parse(feature_flip_trace(feature, [], 0, [1, 0]), tmp_path)
    check_differential(header, events, check_findings=False)


BUG_CR0WP0 = """
# CR0.WP=0 and CR4.{feature}: a supervisor write (EFLAGS.AC=1) to a read-only user page is allowed, and KVM
# maps it with a writable spte without U (v2.6.35). The host CPU then saw a supervisor page: a supervisor
# {what} of that user page, which SMEP/SMAP forbid, hit under shadow paging; TDP gives #PF. (Fixed in
# 79289c6: NX under SMEP, the write emulated under SMAP.)
{{"kvmpfn": 1, "guest": {{"paging": "64", "cr3": "0x20000", "cr0_wp": false, "cr4_{feature}": true}}}}
{tables}
{{"op": "write", "gpa": "0x23000", "val": "0x40065", "len": 8}}
{{"op": "access", "addr": "0x0", "write": 1, "user": 0, "fetch": 0, "ac": 1}}
{{"op": "access", "addr": "0x0", "write": 0, "user": 0, "fetch": {fetch}, "ac": 0}}
"""
WHAT = {"smep": ("fetch", 1, 0x11), "smap": ("read", 0, 0x1)}


@pytest.mark.parametrize("feature", ["smep", "smap"])
def test_bug_cr0wp0_smep_smap(feature: str, tmp_path: Path) -> None:
    what, fetch, err = WHAT[feature]
    text = BUG_CR0WP0.format(feature=feature, what=what, fetch=fetch, tables=TABLES_64.strip())
    header, events = parse(text, tmp_path)
    shadow, _ = check_differential(header, events)
    assert shadow.views[-1].outcome == ("fault", err)


BUG_CR0WP0_THEN = """
# CR0.WP=0 with CR4.{feature} off: a supervisor write to a read-only user page gets a writable spte without U.
# Then CR4.{feature} is switched on ({how}). The shadow page's role does not record SMEP/SMAP (later kernels'
# role.smep_andnot_wp / smap_andnot_wp), so the U-less spte stays in use: a supervisor {what} of the user page
# hits under shadow paging instead of faulting.
{{"kvmpfn": 1, "guest": {{"paging": "64", "cr3": "0x20000", "cr0_wp": false, "cr4_{feature}": {start}}}}}
{tables}
{{"op": "write", "gpa": "0x23000", "val": "0x40065", "len": 8}}
{setup}
{{"op": "access", "addr": "0x0", "write": 1, "user": 0, "fetch": 0, "ac": 1}}
{switch}
{{"op": "access", "addr": "0x0", "write": 0, "user": 0, "fetch": {fetch}, "ac": 0, "vcpu": {vcpu}}}
"""


@pytest.mark.parametrize("how", ["switched-on", "other-vcpu"])
@pytest.mark.parametrize("feature", ["smep", "smap"])
def test_bug_cr0wp0_sptes_outlive_smep_smap(feature: str, how: str, tmp_path: Path) -> None:
    what, fetch, _ = WHAT[feature]
    if how == "switched-on":  # one vcpu: write, then CR4.X on
        setup, switch, vcpu, start = "", json.dumps({"op": "paging", f"cr4_{feature}": True}), 0, "false"
    else:  # the header has CR4.X on; vcpu 0 switches it off and writes, vcpu 1 (CR4.X on) reads/fetches
        setup, switch, vcpu, start = json.dumps({"op": "paging", f"cr4_{feature}": False}), "", 1, "true"
    text = BUG_CR0WP0_THEN.format(
        feature=feature,
        what=what,
        fetch=fetch,
        how=how,
        tables=TABLES_64.strip(),
        setup=setup,
        switch=switch,
        vcpu=vcpu,
        start=start,
    )
    header, events = parse(text, tmp_path)
    check_differential(header, events, check_findings=False)


BUG_SMAP_NX = """
# CR0.WP=0 and CR4.SMAP: a supervisor write (AC=1) to a read-only, NX user page. mmu_set_spte keeps the page
# read-only with U and emulates the write (the SMAP fix), but builds that spte with NX cleared: the auditor
# reports spte-permission (X beyond the guest translation) and a user fetch of the NX page then hits under
# shadow paging; TDP gives #PF P|U|FETCH.
{"kvmpfn": 1, "guest": {"paging": "64", "cr3": "0x20000", "cr0_wp": false, "cr4_smap": true}}
{"op": "write", "gpa": "0x20000", "val": "0x21007", "len": 8}
{"op": "write", "gpa": "0x21000", "val": "0x22007", "len": 8}
{"op": "write", "gpa": "0x22000", "val": "0x23007", "len": 8}
{"op": "write", "gpa": "0x23000", "val": "0x8000000000040065", "len": 8}
{"op": "access", "addr": "0x0", "write": 1, "user": 0, "fetch": 0, "ac": 1}
{"op": "access", "addr": "0x0", "write": 0, "user": 1, "fetch": 1}
"""


def test_bug_cr0wp0_smap_makes_nx_page_executable(tmp_path: Path) -> None:
    header, events = parse(BUG_SMAP_NX, tmp_path)
    check_differential(header, events, check_findings=False)


def test_bug_cr0wp0_smap_nx_audit(tmp_path: Path) -> None:
    header, events = parse(BUG_SMAP_NX, tmp_path)
    run = replay(header, events[:-1], "shadow")
    assert run.findings == []


BUG_AUDIT_SMAP = """
# CR4.SMAP on, one user page mapped by a user read: nothing is wrong, but the auditor's guest translation was a
# supervisor read with EFLAGS.AC=0, which SMAP forbids, so it reported spte-hpa-mismatch ("the address is not
# mapped by the guest") for every user page. (Fixed in 062a4ec.)
{"kvmpfn": 1, "guest": {"paging": "64", "cr3": "0x20000", "cr4_smap": true}}
{"op": "write", "gpa": "0x20000", "val": "0x21007", "len": 8}
{"op": "write", "gpa": "0x21000", "val": "0x22007", "len": 8}
{"op": "write", "gpa": "0x22000", "val": "0x23007", "len": 8}
{"op": "write", "gpa": "0x23000", "val": "0x40067", "len": 8}
{"op": "cr3", "val": "0x20000"}
{"op": "access", "addr": "0x0", "write": 0, "user": 1, "fetch": 0}
{"op": "audit"}
"""


def test_bug_audit_smap_false_positive(tmp_path: Path) -> None:
    path = tmp_path / "smap.jsonl"
    path.write_text(BUG_AUDIT_SMAP)
    result = replay_file(str(path), ReplayOptions())
    assert result.error is None
    assert result.results["mapped"] == 1
    assert result.findings == []


def test_bug_pte_write_into_another_nx_context() -> None:
    """traces/regressions/smep-wp0-pte-write-nx-role.jsonl: vcpu 1 (EFER.NX=1) writes a pte with XD set into a
    table vcpu 0 (EFER.NX=0) has shadowed. kvm_mmu_pte_write must only zap vcpu 0's spte (the pte has a
    reserved bit for vcpu 0), so vcpu 0's next access faults with P|U|RSVD as under TDP."""
    header, events = load(REGRESSIONS / "smep-wp0-pte-write-nx-role.jsonl")
    actions = [e for e in events if not isinstance(e, ev.Audit)]
    shadow, _ = check_differential(header, actions)
    assert [v.outcome for v in shadow.views] == [("done", 0x40000), ("fault", 0xD)]
    rp = Replayer(header, ReplayOptions())
    write = next(seq for seq, e in enumerate(actions) if isinstance(e, ev.Write) and e.vcpu == 1)
    for seq, e in enumerate(actions[: write + 1]):
        rp.apply(seq, seq + 1, e)
    path, end = shadow_walk(rp.vcpu(0), rp.kvm, 0)
    assert len(path) == 3 and end == TRAP  # zapped, not refilled from the other context's view
    assert rp.kvm.stat["mmu_pte_updated"] == 0


def test_pte_write_in_the_same_context_still_prefetches() -> None:
    """The role test leaves the ordinary case alone: vcpu 0 rewrites its own shadowed pte (another frame) and
    ``update_pte`` installs the new spte at once."""
    header, events = load(REGRESSIONS / "smep-wp0-pte-write-nx-role.jsonl")
    rp = Replayer(header, ReplayOptions())
    for seq, e in enumerate(events[:5]):  # the tables and vcpu 0's first access
        rp.apply(seq, seq + 1, e)
    rec = rp.apply(5, 6, ev.Write(gpa=0x23000, val=0x41067, len=8))
    assert rec["result"] == "emulated"
    assert rp.kvm.stat["mmu_pte_updated"] == 1
    path, end = shadow_walk(rp.vcpu(0), rp.kvm, 0)
    sp, index = path[-1]
    assert len(path) == 4 and end not in (TRAP, NOTRAP) and sp.gfns[index] == 0x41
