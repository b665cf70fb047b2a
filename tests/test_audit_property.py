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
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from kvmpfn.replay import Replayer, ReplayOptions
from kvmpfn.trace import events as ev

P, W, U, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63

TABLES = list(range(1, 13))  # gfns the guest uses as page tables (any of them may point to any other)
DATA = list(range(0x10, 0x18))  # plain data pages
HUGE_BASES = (0x400, 0x600)  # 2 MiB regions of the hugetlbfs slot (0x400 is also 4 MiB aligned)
EXTRA_GFN = 0x800  # slot 2, added and deleted under the notifier kernel
MMIO_GFN = 0xFE000  # device memory
SLOTS = [
    {"slot": 0, "gfn": 0, "npages": 0x200, "backing": "ram"},
    {"slot": 1, "gfn": 0x400, "npages": 0x400, "backing": "hugetlb"},
    {"slot": 3, "gfn": MMIO_GFN, "npages": 4, "backing": "mmio"},
]
SMAP = False
CR3 = {"64": (0x1000, 0x8000), "pae": (0x1000, 0x1020), "32": (0x1000, 0x8000)}
PTE_SIZE = {"64": 8, "pae": 8, "32": 4}
LEVELS = {"64": 4, "pae": 3, "32": 2}


def gva(paging: str, idx: tuple[int, ...]) -> int:
    """The address whose table index at each level (top first) is ``idx``."""
    if paging == "32":
        return idx[0] << 22 | idx[1] << 12
    shifts = (39, 30, 21, 12)[-LEVELS[paging] :]
    return sum(i << s for i, s in zip(idx, shifts, strict=True))


def skeleton(paging: str) -> list[dict]:
    """A working start: cr3 A maps gva 0 and 0x1000 to data gfns 0x10 and 0x11."""

    def w(gfn, index, val):
        size = PTE_SIZE[paging]
        return {"op": "write", "gpa": (gfn << 12) + index * size, "val": val, "len": size}

    if paging == "64":
        return [w(1, 0, 0x2007), w(2, 0, 0x3007), w(3, 0, 0x4007), w(4, 0, 0x10007), w(4, 1, 0x11007)]
    if paging == "pae":  # PDPT at 0x1000 (cr3 A) and 0x1020 (cr3 B), PDPTEs take P and the address only
        return [
            {"op": "write", "gpa": 0x1000, "val": 0x3001, "len": 8},
            {"op": "write", "gpa": 0x1020, "val": 0x5001, "len": 8},
            w(3, 0, 0x4007),
            w(4, 0, 0x10007),
            w(4, 1, 0x11007),
        ]
    return [w(1, 0, 0x4007), w(4, 0, 0x10007), w(4, 1, 0x11007)]


@st.composite
def pte_value(draw, paging: str) -> int:
    """A guest entry: mostly present, pointing at a table, a data page, a large region, the extra slot, device
    memory or nowhere, with random permission and A/D bits (and PS, NX, G now and then)."""
    target = draw(
        st.one_of(
            st.sampled_from(TABLES),
            st.sampled_from(DATA),
            st.sampled_from(HUGE_BASES),
            st.just(EXTRA_GFN),
            st.just(MMIO_GFN),
            st.just(0x3FFFF),  # no memslot
        )
    )
    flags = draw(st.integers(0, 0xFF)) & (W | U | A | D | PS)
    if draw(st.integers(0, 9)):
        flags |= P
    if draw(st.booleans()) and draw(st.booleans()):
        flags |= G
    val = target << 12 | flags
    if paging != "32" and draw(st.integers(0, 3)) == 0:
        val |= NX
    return val & 0xFFFFFFFF if paging == "32" else val


@st.composite
def guest_trace(draw, paging: str | None = None, max_events: int = 60) -> tuple[dict, list[dict]]:
    paging = paging or draw(st.sampled_from(["64", "pae", "32"]))
    kernel = draw(st.sampled_from(["page", "pfn", "pfn-io", "notifier"]))
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
            # CR4.SMAP is left off while the audit's guest walk judges a supervisor read with EFLAGS.AC=0
            # (false spte-hpa-mismatch on user pages: test_audit.py::test_smap_guest_user_pages_audit_clean,
            # xfail). Once that is fixed, draw it: "cr4_smap": draw(st.booleans()).
            "cr4_smap": SMAP,
        },
        "memslots": SLOTS,
    }
    size = PTE_SIZE[paging]
    levels = LEVELS[paging]
    extra = False
    events = skeleton(paging)
    n = draw(st.integers(5, max_events))
    kinds = ["pte"] * 6 + ["access"] * 8 + ["cr3", "data", "partial", "dirty_log", "inject", "invlpg"]
    if kernel == "notifier":
        kinds += ["host_remap", "memslot"]
    for _ in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "pte":
            table = draw(st.sampled_from(TABLES))
            index = draw(st.integers(0, 1))
            val = draw(pte_value(paging))
            if paging == "pae" and table == 1:  # a PDPTE: P and the address (else CR3 loads #GP)
                val &= ~(W | U | A | D | PS | G | NX) if draw(st.integers(0, 7)) else ~0
                index += draw(st.sampled_from([0, 4]))  # PDPT A (0x1000) or B (0x1020)
            events.append({"op": "write", "gpa": (table << 12) + index * size, "val": val, "len": size})
        elif kind == "partial":  # a 1, 2 or 4-byte store into a table (flood / misaligned paths)
            nbytes = draw(st.sampled_from([1, 2, 4] if size == 8 else [1, 2]))
            table = draw(st.sampled_from(TABLES))
            offset = draw(st.integers(0, 2 * size - nbytes))
            val = draw(st.integers(0, (1 << (8 * nbytes)) - 1))
            events.append({"op": "write", "gpa": (table << 12) + offset, "val": val, "len": nbytes})
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
            # slot 0 only: on the hugetlbfs slot, kvm_mmu_slot_remove_write_access clears W in every entry of a
            # page holding a large spte, table pointers included (reference §2.15, the era's behaviour), and
            # writes through such a pointer fault forever (fault-loop)
            events.append({"op": "dirty_log", "slot": 0, "stop": draw(st.booleans())})
        elif kind == "inject":
            events.append({"op": "inject", "fault": draw(st.sampled_from(["enomem", "gup_fail", "pte_race"]))})
        elif kind == "invlpg":
            events.append({"op": "invlpg", "addr": gva(paging, (0,) * levels)})
        elif kind == "host_remap":
            gfn = draw(st.sampled_from(TABLES + DATA + [HUGE_BASES[0] + 5]))
            events.append({"op": "host_remap", "gfn": gfn})
        elif kind == "memslot":
            npages = 0 if extra else 16
            events.append({"op": "memslot", "slot": 2, "gfn": EXTRA_GFN, "npages": npages, "backing": "ram"})
            extra = not extra
    return header, events


def as_jsonl(header: dict, events: list[dict]) -> str:
    return "\n".join(json.dumps(x) for x in [header, *events]) + "\n"


def replay(header: dict, events: list[dict], mmu: str) -> tuple[Replayer, list[dict]]:
    """Replay through the engine with the full audit after every event and at the kernel's points, then tear
    down. Returns the replayer and the findings."""
    hdr = msgspec.convert({**header, "mmu": mmu}, ev.Header)
    rp = Replayer(hdr, ReplayOptions(audit_every=1, kernel_audit=True))
    for seq, e in enumerate(events):
        fields = {k: v for k, v in e.items() if k != "op"}
        rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))
    rp.findings.seq, rp.findings.point = len(events), "teardown"
    rp.do_teardown()
    return rp, rp.findings.items


def check(trace: tuple[dict, list[dict]]) -> None:
    header, events = trace
    for mmu in ("shadow", "tdp"):
        rp, findings = replay(header, events, mmu)
        where = f"mmu {mmu}; the trace:\n{as_jsonl(header, events)}"
        assert findings == [], f"{json.dumps(findings, indent=1)}\n{where}"
        held = {hex(pfn): f.count for pfn, f in rp.host.frames.items() if f.count}
        assert held == {}, f"KVM references left after teardown: {held}\n{where}"
        assert rp.auditor.ledger.refs == {}, where


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


@pytest.mark.parametrize("paging", ["64", "pae", "32"])
def test_generator_reaches_every_event_and_result(paging):
    """The strategy is not degenerate: it can emit every kind of event it promises, and its guests reach
    mapped, hit, emulated, guest_fault and error (an injected failure) results."""
    kinds = {"write", "access", "cr3", "dirty_log", "inject", "invlpg", "host_remap", "memslot"}
    settings_ = settings(max_examples=2000, deadline=None, database=None)
    trace = find(guest_trace(paging), lambda t: kinds <= {e["op"] for e in t[1]}, settings=settings_)
    assert kinds <= {e["op"] for e in trace[1]}
    want = {"mapped", "hit", "emulated", "guest_fault", "error"}
    trace = find(guest_trace(paging), lambda t: want <= results(*t), settings=settings_)
    assert want <= results(*trace)


def results(header: dict, events: list[dict]) -> set[str]:
    """The outcome classes of a plain shadow replay (no audits)."""
    rp = Replayer(msgspec.convert(header, ev.Header), ReplayOptions())
    out = set()
    for seq, e in enumerate(events):
        fields = {k: v for k, v in e.items() if k != "op"}
        out.add(rp.apply(seq, seq + 2, ev.EVENT_TYPES[e["op"]](**fields))["result"])
    return out
