"""Property: random valid guest-action traces replayed through a correct MMU (no ``--bug``) produce no finding at
any audit point (after every event, and at the kernel's own four points), and once the VM is torn down KVM
holds no reference on any frame.

The guests are 64-bit, PAE and 32-bit guests that build and rewrite their page tables with ``write`` (aligned
ptes, and now and then a partial or misaligned store), access a small set of addresses with random W/U/fetch
and EFLAGS.AC, switch CR3 between two tables, store to data pages, and, where the kernel variant makes them
safe (``notifier``: MMU notifiers and zap-all on deletion), move host pages (``host_remap``) and add and
delete a memslot. Dirty logging goes on and off; enomem/gup_fail/pte_race failures are injected. Every trace
also replays under TDP (one guest-action trace means the same under both MMUs).

A failing example prints the trace as JSON Lines, ready to save as a file and replay with
``kvmpfn replay FILE --audit-every 1 --kernel-audit``. The default profile is small; ``make fuzz`` runs the
``fuzz``-marked variant with many more examples.
"""

from __future__ import annotations

import json

import msgspec
import pytest
from fuzz_count import generated
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev

P, W, U, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63

DATA = list(range(0x10, 0x18))  # plain data pages
HUGE_BASES = (0x400, 0x600)  # 2 MiB regions of the hugetlbfs slot (0x400 is also 4 MiB aligned)
EXTRA_GFN = 0x800  # slot 2, added and deleted under the notifier kernel
MMIO_GFN = 0xFE000  # device memory
NOWHERE = 0x3FFFF  # no memslot
SLOTS = [
    {"slot": 0, "gfn": 0, "npages": 0x200, "backing": "ram"},
    {"slot": 1, "gfn": 0x400, "npages": 0x400, "backing": "hugetlb"},
    {"slot": 3, "gfn": MMIO_GFN, "npages": 4, "backing": "mmio"},
]
PTE_SIZE = {"64": 8, "pae": 8, "32": 4}
LEVELS = {"64": 4, "pae": 3, "32": 2}
#: Page-table gfns by the level they serve at (top first). The top level is the CR3 target: two tables
#: (CR3 A and B); in PAE the top "tables" are the two PDPTs at 0x1000 and 0x1020 of gfn 1.
TABLES = {
    "64": {4: [1, 8], 3: [2, 9], 2: [3, 10], 1: [4, 5, 11]},
    "pae": {3: [1], 2: [3, 10], 1: [4, 5, 11]},
    "32": {2: [1, 8], 1: [4, 5, 11]},
}
CR3 = {"64": (0x1000, 0x8000), "pae": (0x1000, 0x1020), "32": (0x1000, 0x8000)}
ALL_TABLES = sorted({g for t in TABLES.values() for gs in t.values() for g in gs})


def gva(paging: str, idx: tuple[int, ...]) -> int:
    """The address whose table index at each level (top first) is ``idx``."""
    if paging == "32":
        return idx[0] << 22 | idx[1] << 12
    shifts = (39, 30, 21, 12)[-LEVELS[paging] :]
    return sum(i << s for i, s in zip(idx, shifts, strict=True))


def write(paging: str, gfn: int, index: int, val: int) -> dict:
    size = PTE_SIZE[paging]
    return {"op": "write", "gpa": (gfn << 12) + index * size, "val": val, "len": size}


def skeleton(paging: str) -> list[dict]:
    """A working start: CR3 A maps gva 0 to data gfn 0x10 and gva 0x1000 to device memory; CR3 B shares the
    lower levels."""
    if paging == "64":
        return [
            write(paging, 1, 0, 0x2007),
            write(paging, 8, 0, 0x2007),
            write(paging, 2, 0, 0x3007),
            write(paging, 3, 0, 0x4007),
            write(paging, 4, 0, 0x10007),
            write(paging, 4, 1, MMIO_GFN << 12 | 7),
        ]
    if paging == "pae":  # PDPTEs take P and the address only
        return [
            {"op": "write", "gpa": 0x1000, "val": 0x3001, "len": 8},
            {"op": "write", "gpa": 0x1020, "val": 0xA001, "len": 8},
            write(paging, 3, 0, 0x4007),
            write(paging, 10, 0, 0x4007),
            write(paging, 4, 0, 0x10007),
            write(paging, 4, 1, MMIO_GFN << 12 | 7),
            {"op": "cr3", "val": 0x1000},  # the vcpu loaded its PDPTEs before they were written: reload
        ]
    return [
        write(paging, 1, 0, 0x4007),
        write(paging, 8, 0, 0x5007),
        write(paging, 4, 0, 0x10007),
        write(paging, 4, 1, MMIO_GFN << 12 | 7),
    ]


@st.composite
def entry_value(draw, paging: str, level: int, aliasing: bool) -> int:
    """A guest entry for a table serving at ``level``: mostly present, pointing at a table of the level below
    (or, at level 1, at a data page, a large region's page, a page table read as data, the extra slot,
    device memory or nowhere); random W/U/A/D, and NX, G and bit 7 now and then. Bit 7 is PS above level 1
    (at level 2 it then mostly points at a 2 or 4 MiB region, aligned or not) and PAT at level 1. With
    ``aliasing`` any entry may point at any table, so one table can serve at several levels.
    """
    others = [EXTRA_GFN, MMIO_GFN, NOWHERE]
    if aliasing:
        pool = ALL_TABLES + DATA + list(HUGE_BASES) + others
    elif level == 1:
        pool = DATA + list(HUGE_BASES) + [0x405] + ALL_TABLES + others * 2
    else:
        pool = TABLES[paging][level - 1] + others
    target = draw(st.sampled_from(pool))
    flags = draw(st.integers(0, 0x7F)) & (W | U | A | D)
    if draw(st.integers(0, 9)):
        flags |= P
    if draw(st.integers(0, 3)) == 0:
        flags |= G
    if draw(st.integers(0, 4)) == 0:
        flags |= PS
        if level == 2 and not aliasing and draw(st.integers(0, 3)):
            target = draw(st.sampled_from([*HUGE_BASES, 0x405, DATA[0]]))
    val = target << 12 | flags
    if paging != "32" and draw(st.integers(0, 3)) == 0:
        val |= NX
    return val


@st.composite
def guest_trace(draw, paging: str | None = None, max_events: int = 60) -> tuple[dict, list[dict]]:
    paging = paging or draw(st.sampled_from(["64", "pae", "32"]))
    kernel = draw(st.sampled_from(["page", "pfn", "pfn-io", "notifier"]))
    aliasing = draw(st.integers(0, 3)) == 0
    header = {
        "kvmpfn": 1,
        "mmu": "shadow",
        "kernel": kernel,
        "guest": {
            "paging": paging,
            "cr3": CR3[paging][0],
            "cr0_wp": draw(st.booleans()),
            "efer_nx": draw(st.booleans()),
            "cr4_pse": draw(st.booleans()),
            "cr4_smep": draw(st.booleans()),
            "cr4_smap": draw(st.booleans()),
        },
        "memslots": SLOTS,
    }
    size = PTE_SIZE[paging]
    levels = LEVELS[paging]
    tables = TABLES[paging]
    extra = False
    events = skeleton(paging)
    n = draw(st.integers(5, max_events))
    kinds = ["pte"] * 6 + ["access"] * 8 + ["cr3", "data", "partial", "dirty_log", "inject", "invlpg"]
    if kernel == "notifier":
        kinds += ["host_remap", "memslot"]
    for _ in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "pte":
            level = draw(st.sampled_from(sorted(tables)))
            table = draw(st.sampled_from(tables[level]))
            index = draw(st.integers(0, 1))
            val = draw(entry_value(paging, level, aliasing))
            if paging == "pae" and level == 3:  # a PDPTE: P and the address (else CR3 loads #GP)
                val &= ~(W | U | A | D | G | NX) if draw(st.integers(0, 7)) else ~0
                index += draw(st.sampled_from([0, 4]))  # PDPT A (0x1000) or B (0x1020)
            events.append(write(paging, table, index, val))
        elif kind == "partial":  # a store of less than a pte: the page is zapped as misaligned
            level = draw(st.sampled_from(sorted(tables)))
            table = draw(st.sampled_from(tables[level]))
            index = draw(st.integers(0, 1))
            if size == 8 and draw(st.booleans()):  # the high half: NX or not
                val = draw(st.sampled_from([0, 0x80000000]))
                events.append({"op": "write", "gpa": (table << 12) + index * 8 + 4, "val": val, "len": 4})
            else:  # the flags byte
                val = draw(st.integers(0, 0xFF))
                events.append({"op": "write", "gpa": (table << 12) + index * size, "val": val, "len": 1})
        elif kind == "access":
            idx = tuple(draw(st.integers(0, 1)) for _ in range(levels))
            offset = draw(st.sampled_from([0, 8, 0xFF8]))
            events.append(
                {
                    "op": "access",
                    "addr": gva(paging, idx) + offset,
                    "write": draw(st.booleans()),
                    "user": draw(st.booleans()),
                    "fetch": draw(st.booleans()),
                    "ac": draw(st.booleans()),
                }
            )
        elif kind == "cr3":
            events.append({"op": "cr3", "val": draw(st.sampled_from(CR3[paging]))})
        elif kind == "data":
            gfn = draw(st.sampled_from(DATA + list(HUGE_BASES)))
            events.append({"op": "write", "gpa": gfn << 12 | 0x10, "val": draw(st.integers(0, 255)), "len": 1})
        elif kind == "dirty_log":
            slot = draw(st.sampled_from([0, 1]))
            events.append({"op": "dirty_log", "slot": slot, "stop": draw(st.booleans())})
        elif kind == "inject":
            events.append({"op": "inject", "fault": draw(st.sampled_from(["enomem", "gup_fail", "pte_race"]))})
        elif kind == "invlpg":
            events.append({"op": "invlpg", "addr": gva(paging, (0,) * levels)})
        elif kind == "host_remap":
            gfn = draw(st.sampled_from(ALL_TABLES + DATA + [HUGE_BASES[0] + 5]))
            events.append({"op": "host_remap", "gfn": gfn})
        elif kind == "memslot":
            npages = 0 if extra else 16
            events.append({"op": "memslot", "slot": 2, "gfn": EXTRA_GFN, "npages": npages, "backing": "ram"})
            extra = not extra
    return header, events


def as_jsonl(header: dict, events: list[dict]) -> str:
    return "\n".join(json.dumps(x) for x in [header, *events]) + "\n"


def replay(
    header: dict, events: list[dict], mmu: str, audit_every: int = 1, kernel_audit: bool = True
) -> tuple[Replayer, list[dict]]:
    """Replay through the engine with the full audit every ``audit_every`` events (and at the kernel's points),
    then tear down. Returns the replayer and the findings."""
    hdr = msgspec.convert({**header, "mmu": mmu}, ev.Header)
    rp = Replayer(hdr, ReplayOptions(audit_every=audit_every, kernel_audit=kernel_audit))
    for seq, e in enumerate(events):
        fields = {k: v for k, v in e.items() if k != "op"}
        rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))
    rp.findings.seq, rp.findings.point = len(events), "teardown"
    rp.do_teardown()
    return rp, rp.findings.items


def check(trace: tuple[dict, list[dict]], audit_every: int = 1, kernel_audit: bool = True) -> None:
    """Under both MMUs: no finding at any audit point, no reference left after teardown."""
    header, events = trace
    for mmu in ("shadow", "tdp"):
        rp, findings = replay(header, events, mmu, audit_every, kernel_audit)
        where = f"mmu {mmu}; the trace:\n{as_jsonl(header, events)}"
        assert findings == [], f"{json.dumps(findings, indent=1)}\n{where}"
        held = {hex(pfn): f.count for pfn, f in rp.host.frames.items() if f.count}
        assert held == {}, f"KVM references left after teardown: {held}\n{where}"
        assert rp.auditor.ledger.refs == {}, where
    generated("mmu-property" if audit_every == 1 else f"mmu-property (audit every {audit_every})")


@pytest.mark.parametrize("paging", ["64", "pae", "32"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_correct_mmu_audits_clean(paging, data):
    check(data.draw(guest_trace(paging)))


@pytest.mark.fuzz
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=guest_trace(max_events=150))
def test_correct_mmu_audits_clean_fuzz(trace):
    check(trace)


def test_generator_reaches_every_event_and_result():
    """The strategy is not degenerate: over a fixed-seed sample it emits every kind of event it promises in
    every paging mode, and its guests reach mapped, hit, emulated, guest_fault, mmio and error (an injected
    failure) results."""
    ops: set[str] = set()
    outcomes: set[str] = set()
    modes: set[str] = set()

    @seed(2008)
    @settings(max_examples=150, deadline=None, database=None, phases=[Phase.generate])
    @given(trace=guest_trace())
    def collect(trace):
        modes.add(trace[0]["guest"]["paging"])
        ops.update(e["op"] for e in trace[1])
        outcomes.update(results(*trace))

    collect()
    assert modes == {"64", "pae", "32"}
    assert {"write", "access", "cr3", "dirty_log", "inject", "invlpg", "host_remap", "memslot"} <= ops
    assert {"mapped", "hit", "emulated", "guest_fault", "mmio", "error"} <= outcomes


def results(header: dict, events: list[dict]) -> set[str]:
    """The outcome classes of a plain shadow replay (no audits)."""
    rp = Replayer(msgspec.convert(header, ev.Header), ReplayOptions())
    out = set()
    for seq, e in enumerate(events):
        fields = {k: v for k, v in e.items() if k != "op"}
        out.add(rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))["result"])
    return out


# --- defects the property found (deterministic regressions) ---------------------------------------------------

PAT_TRACE = [
    {"op": "write", "gpa": 0x1000, "val": 0x2007, "len": 8},
    {"op": "write", "gpa": 0x2000, "val": 0x3007, "len": 8},
    {"op": "write", "gpa": 0x3000, "val": 0x4007, "len": 8},
    # gva 0x1000 -> gpa 0x400000 (hugetlbfs, 2 MiB aligned), P|W|U|A and bit 7, which in a pte is PAT
    {"op": "write", "gpa": 0x4008, "val": 0x4000A7, "len": 8},
    {"op": "access", "addr": 0x1000, "write": False, "user": False, "fetch": False},
    # the write fault sets D in the pte; kvm_mmu_pte_write's guess reads bit 7 as PS
    {"op": "access", "addr": 0x1000, "write": True, "user": False, "fetch": False},
]


def pat_header(mmu: str = "shadow") -> dict:
    slots = [
        {"slot": 0, "gfn": 0, "npages": 512, "backing": "ram"},
        {"slot": 1, "gfn": 0x400, "npages": 512, "backing": "hugetlb"},
    ]
    return {"kvmpfn": 1, "mmu": mmu, "kernel": "pfn", "guest": {"paging": "64", "cr3": 0x1000}, "memslots": slots}


def test_pat_bit_in_a_level_1_pte_write_is_not_a_large_page():
    """Found by test_correct_mmu_audits_clean (a 32-bit guest; here the 64-bit form): a valid guest, no switch,
    yet the simulated kernel reaches BUG()."""
    check((pat_header(), PAT_TRACE))


def divergence(header: dict, events: list[dict]) -> tuple[list, list]:
    """The result of the last event under shadow paging and under TDP, plus the shadow replay's findings."""
    outs = []
    for mmu in ("shadow", "tdp"):
        rp = Replayer(msgspec.convert({**header, "mmu": mmu}, ev.Header), ReplayOptions(audit_every=1))
        for seq, e in enumerate(events):
            fields = {k: v for k, v in e.items() if k != "op"}
            rec = rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))
        outs.append((rec["result"], rec.get("err")))
        if mmu == "shadow":
            findings = rp.findings.items
    return outs, findings


def test_efer_nx_change_is_seen_by_the_shadow_mmu():
    header = {"kvmpfn": 1, "kernel": "pfn", "guest": {"paging": "64", "cr3": 0x1000}, "memslots": SLOTS}
    events = [
        write("64", 1, 0, 0x2007),
        write("64", 2, 0, 0x3007),
        write("64", 3, 0, 0x4007),
        write("64", 4, 0x10, 0x10067 | NX),
        {"op": "access", "addr": 0x10000, "write": False, "user": False, "fetch": False},
        {"op": "paging", "efer_nx": False},
        {"op": "access", "addr": 0x10000, "write": False, "user": False, "fetch": False},
    ]
    (shadow, tdp), findings = divergence(header, events)
    assert tdp == ("guest_fault", "0x9")
    assert shadow == tdp
    assert findings == []


def test_cr4_pse_change_is_seen_by_the_shadow_mmu():
    header = {"kvmpfn": 1, "kernel": "pfn", "guest": {"paging": "32", "cr3": 0x1000}, "memslots": SLOTS}
    events = [
        {"op": "write", "gpa": 0x1004, "val": 0x4000E7, "len": 4},  # gva 0x400000: 4 MiB at gpa 0x400000
        {"op": "access", "addr": 0x400000, "write": False, "user": False, "fetch": False},
        {"op": "paging", "cr4_pse": False},
        {"op": "access", "addr": 0x400000, "write": False, "user": False, "fetch": False},
    ]
    (shadow, tdp), findings = divergence(header, events)
    assert tdp == ("guest_fault", "0x0")
    assert shadow == tdp
    assert findings == []


def test_kernel_bug_at_the_implicit_teardown_is_reported_not_raised(tmp_path, monkeypatch):
    import kvmpfn.replay
    from kvmpfn.errors import KernelBug
    from kvmpfn.replay import replay_file

    def destroy(kvm):
        raise KernelBug("rmap_remove: 0->BUG")

    monkeypatch.setattr(kvmpfn.replay, "kvm_arch_destroy_vm", destroy)
    path = tmp_path / "t.jsonl"
    path.write_text(
        as_jsonl(
            {"kvmpfn": 1, "mmu": "tdp", "guest": {"paging": "none"}},
            [{"op": "access", "addr": 0x5000, "write": True, "user": False, "fetch": False}],
        )
    )
    result = replay_file(str(path))
    assert result.error is None
    (bug,) = [f for f in result.findings if f["code"] == "kernel-bug"]
    assert bug["function"] == "rmap_remove" and bug["point"] == "teardown" and "0->BUG" in bug["message"]
