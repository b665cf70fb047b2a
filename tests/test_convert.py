"""``kvmpfn convert`` (kvmpfn/trace/ftrace.py): tracepoint text in every documented layout and era, the quirks
of posted traces, the header guesses, and the exact events written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from elfcore_helper import CR0_PG_WP, CR4_PAE, CpuState, Load, build_core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpfn.cli import main
from kvmpfn.replay import replay_file
from kvmpfn.trace.ftrace import (
    BATCH_MAX,
    NO_RECORDS,
    TextTraceError,
    convert_text,
    iter_items,
    parse_record,
    scan_text,
)
from kvmpfn.trace.reader import open_trace

RECORDED = Path(__file__).resolve().parent.parent / "traces" / "recorded"
#: Record keys that depend on the layout (who/where/when), not on the event.
CONTEXT = ("comm", "pid", "cpu", "t", "line")


#: Fields convert writes as hex strings (addresses, frame numbers, values).
HEX_KEYS = ("addr", "gpa", "val", "err", "gfn", "cr3", "first_pfn")


def as_ints(obj: dict) -> dict:
    """A written header or event with its hex-string fields as ints, which the tests below compare."""
    out = {k: int(v, 16) if k in HEX_KEYS and isinstance(v, str) else v for k, v in obj.items()}
    for key in ("guest", "host"):
        if isinstance(out.get(key), dict):
            out[key] = as_ints(out[key])
    if "memslots" in out:
        out["memslots"] = [as_ints(m) for m in out["memslots"]]
    return out


def run_convert(tmp_path: Path, text: str, name: str = "in.txt", **kw) -> tuple[dict, list[dict], object]:
    """Convert ``text``; the header and events as JSON objects, and the summary."""
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / (name + ".jsonl")
    summary = convert_text(str(src), str(out), **kw)
    lines = [as_ints(json.loads(line)) for line in out.read_text().splitlines() if not line.startswith("#")]
    with open_trace(str(out)) as reader:  # and the reader takes it
        assert len(list(reader)) == len(lines) - 1
    return lines[0], lines[1:], summary


def records(events: list[dict]) -> list[dict]:
    """Every kept record in order, without the layout-dependent keys."""
    return [{k: v for k, v in r.items() if k not in CONTEXT} for e in events for r in e["x"]["recorded"]]


def pfs(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "x"} for e in events if e["op"] == "pf"]


# -- one fault in every layout ---------------------------------------------------------------------------------

FAULT = "kvm_page_fault: address 7f2b3000 error_code 6"
SPTE = "kvm_mmu_set_spte: gfn 7f2b3 spte 6000002c583ef77 (rwxu) level 1 at 2c1d4e598"
TRACEFS_HEADER = """# tracer: nop
#
# entries-in-buffer/entries-written: 2/2   #P:8
#
#                                _-----=> irqs-off
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
"""

LAYOUTS = {
    # v2.6.3x: no flags column
    "tracefs-2.6": (
        "# tracer: nop\n#\n#           TASK-PID    CPU#    TIMESTAMP  FUNCTION\n#              | |       |          |\n"
        f"        qemu-kvm-3174  [001]  2403.118201: {FAULT}\n"
        f"        qemu-kvm-3174  [001]  2403.118203: {SPTE}\n"
    ),
    "tracefs-4-flags": (
        f"  qemu-system-x86-8397  [002] d...  1404.389101: {FAULT}\n"
        f"  qemu-system-x86-8397  [002] ....  1404.389104: {SPTE}\n"
    ),
    "tracefs-5-flags": (
        TRACEFS_HEADER + f" qemu-system-x86-8397    [002] d..1.  1404.389384: {FAULT}\n"
        f" qemu-system-x86-8397    [002] .....  1404.389386: {SPTE}\n"
    ),
    "trace_pipe": (
        f"       CPU 0/KVM-995362  [016] ..... 55709.716251: {FAULT}\n"
        f"       CPU 0/KVM-995362  [016] ..... 55709.716256: {SPTE}\n"
    ),
    "trace-cmd-report": (
        "version = 6\ncpus=4\nCPU 1 is empty\n"
        "          CPU 0/KVM-995362 [016] 55709.716251: kvm_page_fault:       address 7f2b3000 error_code 6\n"
        "          CPU 0/KVM-995362 [016] 55709.716256: kvm_mmu_set_spte:     gfn 7f2b3 spte 6000002c583ef77 (rwxu) "
        "level 1 at 2c1d4e598\n"
    ),
    "trace-cmd-report-l": (
        "cpus=4\n"
        "          CPU 0/KVM-995362 [016] d..1 55709.716251: kvm_page_fault:       address 7f2b3000 error_code 6\n"
        "          CPU 0/KVM-995362 [016] .... 55709.716256: kvm_mmu_set_spte:     gfn 7f2b3 spte 6000002c583ef77 "
        "(rwxu) level 1 at 2c1d4e598\n"
    ),
    "record-tgid": (
        f"       CPU 0/KVM-8397    (   8390) [002] .....  1404.389101: {FAULT}\n"
        f"       CPU 0/KVM-8397    (-------) [002] .....  1404.389104: {SPTE}\n"
    ),
    "perf-script": (
        f"qemu-system-x86  8397 [002]  1404.389101: kvm:{FAULT}\n"
        f"qemu-system-x86  8397 [002]  1404.389104: kvmmmu:{SPTE}\n"
    ),
    "counter-clock": (f"<...>-35787 [001] .... 123456789: {FAULT}\n<...>-35787 [001] .... 123456790: {SPTE}\n"),
    "mail-quoted-wrapped": (
        "Hi,\n\n> the trace:\n"
        "> qemu-system-x86-8397  [002] ....  1404.389101: kvm_page_fault: address 7f2b3000\n"
        "> error_code 6\n"
        ">> qemu-system-x86-8397  [002] ....  1404.389104: kvm_mmu_set_spte: gfn 7f2b3 spte 6000002c583ef77\n"
        ">> (rwxu) level 1 at 2c1d4e598\n"
        "\nThanks\n"
    ),
    "stack-traces": (
        f"  qemu-system-x86-8397  [002] ....  1404.389101: {FAULT}\n"
        "  qemu-system-x86-8397  [002] ....  1404.389102: <stack trace>\n"
        " => kvm_mmu_page_fault\n => vmx_handle_exit\n"
        "CPU:2 [LOST 44 EVENTS]\n"
        f"  qemu-system-x86-8397  [002] ....  1404.389104: {SPTE}\n"
        "  qemu-system-x86-8397  [002] ....  1404.389105: <user stack trace>\n =>  <00007f6a1a2b3c48>\n"
    ),
}

EXPECTED_RECORDS = [
    {"event": "kvm_page_fault", "address": "0x7f2b3000", "error_code": "0x6", "format": "pre-6.1", "vcpu": 0},
    {
        "event": "kvm_mmu_set_spte",
        "gfn": "0x7f2b3",
        "spte": "0x6000002c583ef77",
        "access": "rwxu",
        "level": 1,
        "at": "0x2c1d4e598",
        "vcpu": 0,
    },
]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_one_fault_in_every_layout(tmp_path, layout):
    header, events, summary = run_convert(tmp_path, LAYOUTS[layout])
    assert len(events) == 1
    pf = pfs(events)[0]
    assert {k: v for k, v in pf.items() if k != "t"} == {"op": "pf", "addr": 0x7F2B3000, "err": 6}
    assert records(events) == EXPECTED_RECORDS
    assert summary.scan.used == {"kvm_page_fault": 1, "kvm_mmu_set_spte": 1}
    assert not any(k.startswith("unparsed") for k in summary.scan.skipped)
    assert header["mmu"] == "tdp"
    assert header["memslots"] == [{"slot": 0, "gfn": 0, "npages": 0x7F400, "backing": "ram"}]


def test_layout_details_are_kept(tmp_path):
    _, events, summary = run_convert(tmp_path, LAYOUTS["tracefs-5-flags"])
    rec = events[0]["x"]["recorded"][0]
    assert (rec["comm"], rec["pid"], rec["cpu"], rec["t"], rec["line"]) == (
        "qemu-system-x86",
        8397,
        2,
        "1404.389384",
        13,
    )
    assert events[0]["t"] == "1404.389384"
    assert summary.scan.layout_text() == "flags column 5 wide (2)"
    assert summary.scan.skipped == {"header": 12}
    _, events, summary = run_convert(tmp_path, LAYOUTS["trace-cmd-report"], name="tc.txt")
    assert summary.scan.layout_text() == "trace-cmd report, no flags column (2)"
    assert events[0]["x"]["recorded"][0]["comm"] == "CPU 0/KVM"
    _, events, summary = run_convert(tmp_path, LAYOUTS["stack-traces"], name="st.txt")
    assert summary.scan.skipped == {"stack": 5, "lost events": 44}
    _, events, summary = run_convert(tmp_path, LAYOUTS["mail-quoted-wrapped"], name="mail.txt")
    assert summary.scan.skipped == {"blank": 2, "not understood": 3}
    assert [r["line"] for r in events[0]["x"]["recorded"]] == [4, 6]  # where each record starts


# -- kvm_page_fault across eras --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "vcpu", "addr", "err", "fmt"),
    [
        ("address 1000 error_code 14", None, 0x1000, 0x14, "pre-6.1"),  # hex, though it looks decimal
        ("address fd000 error_code 4", None, 0xFD000, 0x4, "pre-6.1"),
        ("vcpu 3 rip 0xffffffff8105f2a0 address 0x0000000000001000 error_code 0x14", 3, 0x1000, 0x14, "6.1"),
        ("vcpu 1 rip 0xfd11d address 0x00000000000fd000 error_code 0x100000014", 1, 0xFD000, 0x100000014, "6.1"),
        (
            "vcpu 0 rip 0x7c00 address 0x0000000000007000 error_code 0x6, seq = 0x2a, in_prog = 0x1, "
            "start = 0x7f0000000000, end = 0x7f0000200000, root = valid",
            0,
            0x7000,
            0x6,
            "6.1",
        ),
    ],
)
def test_page_fault_formats(body, vcpu, addr, err, fmt):
    parsed = parse_record(f"qemu-8397 [002] .... 10.000001: kvm_page_fault: {body}")
    assert parsed.kind == "record"
    fields = parsed.record.fields
    assert (fields.get("vcpu"), fields["address"], fields["error_code"], fields["format"]) == (vcpu, addr, err, fmt)


# -- every event's text ---------------------------------------------------------------------------------------

EVENT_CASES = [
    ("kvm_mmu_pagetable_walk", "addr 133025 pferr 10 F", {"addr": 0x133025, "pferr": 0x10, "flags": "F"}),
    ("kvm_mmu_pagetable_walk", "addr 7fff5a2b3c48 pferr 6 W|U", {"addr": 0x7FFF5A2B3C48, "pferr": 6, "flags": "W|U"}),
    ("kvm_mmu_pagetable_walk", "addr 1000 pferr 0 ", {"addr": 0x1000, "pferr": 0}),  # no flag: a blank
    ("kvm_mmu_pagetable_walk", "addr 1000 pferr 0", {"addr": 0x1000, "pferr": 0}),  # trailing blank lost
    ("kvm_mmu_paging_element", "pte 8000000012345067 level 1", {"pte": 0x8000000012345067, "level": 1}),
    ("kvm_mmu_walker_error", "pferr 9 P|RSVD", {"pferr": 9, "flags": "P|RSVD"}),
    ("kvm_mmu_walker_error", "pferr 4", {"pferr": 4}),
    (
        "kvm_mmu_set_spte",
        "gfn fffff spte 8be2171025 (r-xu) level 1 at 8a53b01ff8",
        {"gfn": 0xFFFFF, "spte": 0x8BE2171025, "access": "r-xu", "level": 1, "at": 0x8A53B01FF8},
    ),
    (
        "kvm_mmu_set_spte",
        "gfn 800 spte 100b4a00ea7 (rwx) level 2 at 8a53a05020",  # no u: the MMU has no user bit
        {"gfn": 0x800, "spte": 0x100B4A00EA7, "access": "rwx", "level": 2, "at": 0x8A53A05020},
    ),
    ("kvm_mmu_spte_requested", "gfn 84d pfn 100b4a4d level 2", {"gfn": 0x84D, "pfn": 0x100B4A4D, "level": 2}),
    (
        "kvm_tdp_mmu_spte_changed",
        "as id 0 gfn 0 level 4 old_spte 2c583e907 new_spte 0",
        {"as_id": 0, "gfn": 0, "level": 4, "old_spte": 0x2C583E907, "new_spte": 0},
    ),
    (
        "fast_page_fault",
        "vcpu 1 gva 3fef42812000 error_code U sptep 00000000ce97aa9a old 0x0 new 0 spurious 0 fixed 0",
        {
            "vcpu": 1,
            "gva": 0x3FEF42812000,
            "error_code": "U",
            "sptep": "00000000ce97aa9a",
            "old": 0,
            "new": 0,
            "spurious": 0,
            "fixed": 0,
        },
    ),
    (
        "fast_page_fault",
        "vcpu 0 gva 7000 error_code  sptep 00000000fd98c937 old 0x600000001234f75 new 600000001234f77 "
        "spurious 0 fixed 1",
        {
            "vcpu": 0,
            "gva": 0x7000,
            "error_code": "",
            "sptep": "00000000fd98c937",
            "old": 0x600000001234F75,
            "new": 0x600000001234F77,
            "spurious": 0,
            "fixed": 1,
        },
    ),
    # shadow pages: every era's kernel text, and the trace-cmd plugin's
    (
        "kvm_mmu_get_page",
        "sp gfn 3c7a3 1/4 q0 wux !pge nxe root 0 sync new",  # v2.6.32
        {"gfn": 0x3C7A3, "role": "1/4 q0 wux !pge nxe", "level": 1, "direct": False, "root_count": 0, "unsync": False}
        | {"created": True},
    ),
    (
        "kvm_mmu_get_page",
        "sp gfn 1a0c 4 pae q0 wux nxe root 1 sync existing",  # ~2.6.36
        {"gfn": 0x1A0C, "role": "4 pae q0 wux nxe", "level": 4, "direct": False, "root_count": 1, "unsync": False}
        | {"created": False},
    ),
    (
        "kvm_mmu_get_page",
        "sp gen 0 gfn 7f200 1 q0 direct wux nxe root 0 sync new",  # v3.11+
        {"gfn": 0x7F200, "role": "1 q0 direct wux nxe", "level": 1, "direct": True, "root_count": 0, "unsync": False}
        | {"created": True},
    ),
    (
        "kvm_mmu_get_page",
        "sp gen 0 gfn 800 l1 8-byte q0 direct wux nxe ad root 0 sync new",  # v5.19+
        {"gfn": 0x800, "role": "l1 8-byte q0 direct wux nxe ad", "level": 1, "direct": True, "root_count": 0}
        | {"unsync": False, "created": True},
    ),
    (
        "kvm_mmu_get_page",
        "existing sp gfn 3a22e 1/4 q3 direct --x !pge !nxe root 6 sync",  # trace-cmd plugin, old
        {"gfn": 0x3A22E, "role": "1/4 q3 direct --x !pge !nxe", "level": 1, "direct": True, "root_count": 6}
        | {"unsync": False, "created": False},
    ),
    (
        "kvm_mmu_prepare_zap_page",
        "sp gen 0 gfn 800 l1 8-byte q0 direct wux nxe ad root 0 unsync",
        {"gfn": 0x800, "role": "l1 8-byte q0 direct wux nxe ad", "level": 1, "direct": True, "root_count": 0}
        | {"unsync": True},
    ),
    (
        "kvm_mmu_prepare_zap_page",
        "1 q0 direct wux pae !nxe !wp",  # trace-cmd plugin: the role only
        {"role": "1 q0 direct wux pae !nxe !wp", "level": 1, "direct": True},
    ),
    (
        "kvm_mmu_zap_page",
        "sp gfn 3c7b4 1/4 q0 wux !pge nxe root 0 sync",  # v2.6.32's name
        {"gfn": 0x3C7B4, "role": "1/4 q0 wux !pge nxe", "level": 1, "direct": False, "root_count": 0}
        | {"unsync": False},
    ),
    # exits and entries: kernel text of each era and the plugin's
    ("kvm_exit", "reason exception rip 0x400a3c", {"reason": "exception", "rip": 0x400A3C}),
    ("kvm_exit", "reason EPT_VIOLATION rip 0xfff0 info 184 0", {"reason": "EPT_VIOLATION", "rip": 0xFFF0}),
    ("kvm_exit", "vcpu 1 reason npf rip 0xfd11d info 100000014 fd000", {"vcpu": 1, "reason": "npf", "rip": 0xFD11D}),
    (
        "kvm_exit",
        "vcpu 0 reason EPT_VIOLATION rip 0xffffffff81a0c4d2 info1 0x0000000000000182 info2 0x0000000000000000 "
        "intr_info 0x00000000 error_code 0x00000000",
        {"vcpu": 0, "reason": "EPT_VIOLATION", "rip": 0xFFFFFFFF81A0C4D2},
    ),
    (
        "kvm_exit",
        "reason EPT_VIOLATION rip 0xffffffff81a0c4d2 native_safe_halt info 181 0",  # plugin with [func]
        {"reason": "EPT_VIOLATION", "rip": 0xFFFFFFFF81A0C4D2},
    ),
    ("kvm_entry", "vcpu 0", {"vcpu": 0}),
    ("kvm_entry", "vcpu 1, rip 0xffffffff81e0a8f6", {"vcpu": 1, "rip": 0xFFFFFFFF81E0A8F6}),
    ("kvm_entry", "vcpu 2 rip 0xfff0", {"vcpu": 2, "rip": 0xFFF0}),  # plugin
]


@pytest.mark.parametrize(
    ("event", "body", "fields"), EVENT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(EVENT_CASES)]
)
def test_event_formats(event, body, fields):
    parsed = parse_record(f"  CPU 1/KVM-4242    [003] .....   612.300122: {event}: {body}", 7)
    assert parsed.kind == "record", parsed
    r = parsed.record
    assert (r.event, r.comm, r.pid, r.cpu, r.ts, r.flags, r.line) == (
        event,
        "CPU 1/KVM",
        4242,
        3,
        "612.300122",
        ".....",
        7,
    )
    assert r.fields == fields


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("  qemu-8397 [002] .... 10.000001: kvm_msr: msr_write 6e0 = 0x1a2b3c4d5e", "unknown"),
        ("  qemu-8397 [002] .... 10.000001: <stack trace>", "stack"),
        ("  qemu-8397 [002] .... 10.000001: do_sys_open <-__x64_sys_openat", "other"),  # function tracer
        ("  qemu-8397 [002] .... 10.000001: kvm_mmu_set_spte: gfn 1 spte", "incomplete"),
        ("  qemu-8397 [002] ....", "incomplete"),
        ("  qemu-8397 [002] .... 10.000001: kvm_mmu_get_page: sp gfn 1 1/4 q0 wux !pge nxe root 0 sync", "incomplete"),
    ],
)
def test_what_is_not_a_record(text, kind):
    assert parse_record(text).kind == kind


# -- wrapped lines ------------------------------------------------------------------------------------------------


def test_wrapped_lines_are_joined(tmp_path):
    text = (
        "qemu-system-x86-8397  [002] ....  1404.389101: kvm_tdp_mmu_spte_changed: as id 0 gfn 7f2b3 level 1\n"
        "old_spte 6000002c9a11f77\n"
        "new_spte 0\n"
        "qemu-system-x86-8397  [002] d...  1404.389400: kvm_exit: vcpu 0 reason =\n"
        "EPT_VIOLATION rip 0xffffffff8105f2a8 info 182 0\n"
        "qemu-system-x86-8397  [002] d...\n"
        "1404.389401: kvm_page_fault: address 7f2b3000 error_code 182\n"
        "qemu-system-x86-8397  [002] ....  1404.389402: kvm_mmu_walker_error: pferr 4 U\n"
        "the guest hangs here\n"
    )
    _, events, summary = run_convert(tmp_path, text)
    used = {"kvm_tdp_mmu_spte_changed": 1, "kvm_exit": 1, "kvm_page_fault": 1, "kvm_mmu_walker_error": 1}
    assert summary.scan.used == used
    assert summary.scan.skipped == {"not understood": 1}  # the prose after a complete record
    assert records(events) == [
        {"event": "kvm_tdp_mmu_spte_changed", "as_id": 0, "gfn": "0x7f2b3", "level": 1}
        | {"old_spte": "0x6000002c9a11f77", "new_spte": "0x0", "vcpu": 0},
        {"event": "kvm_page_fault", "address": "0x7f2b3000", "error_code": "0x182", "format": "pre-6.1", "vcpu": 0}
        | {"ept_qualification": True},
        {"event": "kvm_mmu_walker_error", "pferr": "0x4", "flags": "U", "vcpu": 0},
    ]
    # the exit joined across the quoted-printable soft break, so the fault is known to be an EPT violation
    assert pfs(events) == [{"op": "pf", "addr": 0x7F2B3000, "err": 2, "t": "1404.389401"}]


def test_a_complete_record_takes_no_continuation(tmp_path):
    text = "q-1 [000] .... 1.000001: kvm_page_fault: address 1000 error_code 6\nerror_code 2\n"
    _, events, summary = run_convert(tmp_path, text)
    assert pfs(events)[0]["err"] == 6 and summary.scan.skipped == {"not understood": 1}


def test_continuations_are_limited(tmp_path):
    text = "q-1 [000] .... 1.000001: kvm_mmu_set_spte: gfn 1\n" + "x\n" * 6 + "q-1 [000] .... 1.000002: " + FAULT + "\n"
    _, events, summary = run_convert(tmp_path, text)
    assert summary.scan.skipped == {"unparsed:kvm_mmu_set_spte": 1, "not understood": 2}
    assert len(pfs(events)) == 1


# -- header guesses and fault fields --------------------------------------------------------------------------


def _lines(*bodies: str, comm: str = "CPU 0/KVM-100", cpu: int = 0) -> str:
    return "".join(f"{comm} [{cpu:03d}] .... 10.{i:06d}: {b}\n" for i, b in enumerate(bodies))


def test_tdp_from_spte_changed_and_exits(tmp_path):
    header, _, s = run_convert(
        tmp_path, _lines(FAULT, "kvm_tdp_mmu_spte_changed: as id 0 gfn 1 level 1 old_spte 0 new_spte 0")
    )
    assert header["mmu"] == "tdp" and s.scan.mmu_reason == "kvm_tdp_mmu_spte_changed (1)"
    header, _, s = run_convert(
        tmp_path, _lines("kvm_exit: vcpu 0 reason npf rip 0xfd11d info 100000014 fd000", FAULT), "b"
    )
    assert header["mmu"] == "tdp" and s.scan.mmu_reason == "kvm_exit npf (1)"


def test_shadow_from_walks_of_the_faulting_address_and_indirect_pages(tmp_path):
    text = _lines(
        "kvm_page_fault: address 7fff5a2b3c48 error_code 6",
        "kvm_mmu_pagetable_walk: addr 7fff5a2b3c48 pferr 6 W|U",
        "kvm_mmu_paging_element: pte 3c7a1067 level 4",
        "kvm_mmu_paging_element: pte 3c7a2067 level 3",
        "kvm_mmu_get_page: sp gfn 3c7a3 1/4 q0 wux !pge nxe root 0 sync new",
    )
    header, events, s = run_convert(tmp_path, text)
    assert header.get("mmu", "shadow") == "shadow" and "guest" not in header  # paging 64: the default
    assert s.scan.mmu_reason == "guest walk of the faulting address (1), indirect shadow page (1)"
    assert s.paging == "64" and s.scan.paging_reason == "guest walks start at level 4"
    assert pfs(events) == [{"op": "pf", "addr": 0x7FFF5A2B3C48, "err": 6, "t": "10.000000"}]


@pytest.mark.parametrize(("top", "paging"), [(2, "32"), (3, "pae"), (4, "64"), (5, "64")])
def test_paging_from_the_top_level_of_the_walks(tmp_path, top, paging):
    text = _lines(
        "kvm_page_fault: address 1000 error_code 4",
        "kvm_mmu_pagetable_walk: addr 1000 pferr 4 U",
        f"kvm_mmu_paging_element: pte 3c7a1067 level {top}",
        f"kvm_mmu_paging_element: pte 3c7a1067 level {top - 1}",
    )
    header, _, s = run_convert(tmp_path, text)
    assert s.paging == paging and header.get("guest", {}).get("paging", "64") == paging


def test_no_evidence_means_tdp_and_overrides_win(tmp_path):
    header, _, s = run_convert(tmp_path, _lines(FAULT))
    assert header["mmu"] == "tdp" and s.scan.mmu_reason == "no evidence: default"
    header, _, s = run_convert(tmp_path, _lines(FAULT), "b", mmu="shadow", paging="pae")
    assert header.get("mmu", "shadow") == "shadow" and header["guest"]["paging"] == "pae"


def test_memslots_and_maxphyaddr_from_what_was_mapped(tmp_path):
    text = _lines(
        "kvm_page_fault: address 84d000 error_code 181",
        "kvm_mmu_spte_requested: gfn 84d pfn 100b4a4d level 2",
        "kvm_mmu_set_spte: gfn 800 spte 100b4a00ea7 (rwxu) level 2 at 8a53a05020",
        "kvm_page_fault: address 30000000000 error_code 181",  # a 42-bit gpa
    )
    header, events, _ = run_convert(tmp_path, text)
    assert header["memslots"] == [{"slot": 0, "gfn": 0, "npages": 0xA00, "backing": "hugetlb"}]
    assert header["guest"] == {"maxphyaddr": 42}
    assert [e["addr"] for e in pfs(events)] == [0x84D000, 0x30000000000]


def test_ept_qualifications_become_pferr(tmp_path):
    text = _lines(
        "kvm_exit: reason EPT_VIOLATION rip 0xfff0 info 184 0",
        "kvm_page_fault: address fffff000 error_code 184",  # fetch, not mapped
        "kvm_exit: reason EPT_VIOLATION rip 0xfff0 info 1aa 0",
        "kvm_page_fault: address 2000 error_code 1aa",  # write to a readable+executable gpa
        "kvm_exit: reason EXTERNAL_INTERRUPT rip 0xfff0 info 0 0",
        "kvm_page_fault: address 3000 error_code 6",  # not after an EPT violation: as recorded
    )
    _, events, _ = run_convert(tmp_path, text)
    assert [e["err"] for e in pfs(events)] == [0x10, 0x3, 0x6]
    assert [r.get("ept_qualification") for r in records(events)] == [True, True, None]
    # no exits at all: bits 7/8 (never PFERR bits) mark a qualification
    _, events, _ = run_convert(tmp_path, _lines("kvm_page_fault: address 1000 error_code 182", FAULT), "b")
    assert [e["err"] for e in pfs(events)] == [0x2, 0x6]


def test_shadow_error_codes_are_kept(tmp_path):
    text = _lines("kvm_page_fault: address 601040 error_code 184", "kvm_mmu_pagetable_walk: addr 601040 pferr 4 U")
    _, events, _ = run_convert(tmp_path, text)
    assert pfs(events)[0]["err"] == 0x184


def test_vcpus_from_entries_comms_and_order(tmp_path):
    text = (
        "qemu-kvm-300 [000] .... 1.000001: kvm_entry: vcpu 5\n"
        "qemu-kvm-300 [000] .... 1.000002: kvm_page_fault: address 1000 error_code 6\n"
        "CPU 2/KVM-301 [001] .... 1.000003: kvm_page_fault: address 2000 error_code 6\n"
        "<...>-302 [002] .... 1.000004: kvm_page_fault: address 3000 error_code 6\n"
        "<...>-303 [003] .... 1.000005: kvm_page_fault: address 4000 error_code 6\n"
        "CPU 17/KVM-304 [004] .... 1.000006: kvm_page_fault: address 5000 error_code 6\n"
        "q-305 [005] .... 1.000007: kvm_page_fault: vcpu 7 rip 0x1 address 0x6000 error_code 0x6\n"
    )
    _, events, s = run_convert(tmp_path, text)
    assert [e.get("vcpu", 0) for e in pfs(events)] == [5, 2, 0, 1, 1, 7]
    assert [r["vcpu"] for r in records(events)] == [5, 2, 0, 1, 17, 7]
    assert s.folded_vcpus == {17}


def test_addresses_the_simulator_cannot_take_stay_records(tmp_path):
    text = _lines(
        "kvm_page_fault: address 1000000000000 error_code 6",  # a 49-bit gpa under tdp
        "kvm_page_fault: address 2000 error_code 6",
    )
    _, events, s = run_convert(tmp_path, text)
    assert [e["addr"] for e in pfs(events)] == [0x2000]
    assert events[0] == {
        "op": "invlpg",
        "addr": 0,
        "x": {"carrier": True, "recorded": events[0]["x"]["recorded"]},
    }
    assert events[0]["x"]["recorded"][0]["skipped"] == "gpa beyond the guest's physical address space"
    assert dict(s.skipped_faults) == {"gpa beyond the guest's physical address space": 1}
    shadow = _lines(
        "kvm_page_fault: address 800000000000 error_code 6",  # non-canonical
        "kvm_mmu_pagetable_walk: addr 800000000000 pferr 6 W|U",
    )
    _, events, s = run_convert(tmp_path, shadow, "b")
    assert pfs(events) == [] and dict(s.skipped_faults) == {"gva not canonical": 1}


def test_carriers_hold_records_before_the_first_fault_and_past_the_batch(tmp_path):
    spte = "kvm_tdp_mmu_spte_changed: as id 0 gfn {:x} level 1 old_spte 0 new_spte 0"
    bodies = [spte.format(1)] + [FAULT] + [spte.format(i) for i in range(BATCH_MAX + 5)] + [FAULT]
    _, events, s = run_convert(tmp_path, _lines(*bodies))
    assert [e["op"] for e in events] == ["invlpg", "pf", "invlpg", "pf"]
    assert [len(e["x"]["recorded"]) for e in events] == [1, BATCH_MAX, 6, 1]
    assert [e["x"].get("carrier") for e in events] == [True, None, True, None]
    assert s.carriers == 2 and s.faults == 2
    # the lists, concatenated, are the records in text order
    assert [r["line"] for e in events for r in e["x"]["recorded"]] == list(range(1, len(bodies) + 1))


def test_exits_and_entries_are_used_but_not_kept(tmp_path):
    text = _lines("kvm_exit: reason EPT_VIOLATION rip 0xfff0 info 184 0", FAULT, "kvm_entry: vcpu 0")
    _, events, s = run_convert(tmp_path, text)
    assert [r["event"] for r in records(events)] == ["kvm_page_fault"]
    assert s.scan.used == {"kvm_exit": 1, "kvm_page_fault": 1, "kvm_entry": 1}


def test_summary_text(tmp_path):
    text = TRACEFS_HEADER + _lines(FAULT, "kvm_msr: msr_write 6e0 = 0x1", "kvm_msr: msr_read 10 = 0x2", SPTE)
    _, _, s = run_convert(tmp_path, text)
    out = s.text("out.jsonl")
    assert out.splitlines() == [
        f"{tmp_path / 'in.txt'} -> out.jsonl: 16 lines, 2 records; layout: flags column 4 wide (2)",
        "  mmu tdp (no evidence: default); guest paging 64 (no guest walks: default)",
        "  used: kvm_mmu_set_spte 1, kvm_page_fault 1",
        "  skipped: header 12, kvm_msr 2",
        "  wrote 1 pf events, 0 carrier events",
    ]


# -- the command ---------------------------------------------------------------------------------------------


def test_convert_command_and_input_errors(tmp_path):
    runner = CliRunner()
    src = tmp_path / "t.txt"
    src.write_text(LAYOUTS["tracefs-4-flags"])
    ok = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "t.jsonl")])
    assert ok.exit_code == 0 and "wrote 1 pf events" in ok.stderr and ok.stdout == ""
    quiet = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "q.jsonl"), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    dat = tmp_path / "trace.dat"
    dat.write_bytes(b"\x17\x08\x44tracing6\0\0\0")
    perf = tmp_path / "perf.data"
    perf.write_bytes(b"PERFILE2" + bytes(100))
    empty = tmp_path / "empty.txt"
    empty.write_text("# tracer: nop\n\nnothing here\n")
    cases = [
        (tmp_path / "missing.txt", f"{tmp_path / 'missing.txt'}: no such file or directory"),
        (dat, f"{dat}:1: a binary trace-cmd trace.dat: convert its `trace-cmd report` text"),
        (perf, f"{perf}:1: a binary perf.data: convert its `perf script` text"),
        (empty, f"{empty}: {NO_RECORDS}"),
    ]
    for path, message in cases:
        result = runner.invoke(main, ["convert", str(path), "-o", str(tmp_path / "x.jsonl")])
        assert result.exit_code == 2
        assert result.stderr == f"kvmpfn: error: {message}\n"
    unwritable = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "no" / "dir" / "x.jsonl")])
    assert unwritable.exit_code == 2 and "no such file or directory" in unwritable.stderr


def test_convert_from_stdin(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "-", "-o", str(tmp_path / "s.jsonl")], input=LAYOUTS["trace_pipe"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("<stdin> -> ")
    header = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[1])
    assert header["x"]["recorded"]["source"] == "<stdin>"


def test_convert_with_a_memory_core(tmp_path):
    (tmp_path / "cores").mkdir()
    core = build_core(
        tmp_path / "cores" / "g.core", [Load(0, bytes(4096))], [CpuState(cr0=CR0_PG_WP, cr3=0x9000, cr4=CR4_PAE)]
    )
    src = tmp_path / "t.txt"
    src.write_text(_lines("kvm_page_fault: address 7f001000 error_code 6"))
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(
        main, ["convert", str(src), "-o", str(tmp_path / "out" / "t.jsonl"), "--memory", str(core)]
    )
    assert result.exit_code == 0, result.stderr
    header = json.loads((tmp_path / "out" / "t.jsonl").read_text().splitlines()[1])
    assert header["guest"]["cr3"] == "0x9000"  # written in hex
    header = as_ints(header)
    assert header["memory"] == os.path.join("..", "cores", "g.core")
    assert header["guest"] == {"cr3": 0x9000, "cr4_pse": False}  # paging 64 from the core: the default
    bad = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "b.jsonl"), "--memory", str(src)])
    assert bad.exit_code == 2 and bad.stderr == f"kvmpfn: error: {src}: not an ELF file\n"


def test_iter_items_and_scan_agree(tmp_path):
    path = RECORDED / "tdp-fault-loop.txt"
    scan = scan_text(str(path))
    items = list(iter_items(str(path)))
    assert len(items) == scan.records - scan.used["kvm_exit"] - scan.used["kvm_entry"]
    assert sum(1 for i in items if i.pf is not None) == scan.faults == 13


@pytest.mark.parametrize("name", sorted(p.name for p in RECORDED.glob("*.txt")))
def test_the_recorded_examples_are_their_conversions(tmp_path, name):
    """traces/recorded/*.jsonl are exactly what convert makes of the .txt next to them."""
    out = tmp_path / name.replace(".txt", ".jsonl")
    convert_text(str(RECORDED / name), str(out))
    assert out.read_bytes() == (RECORDED / out.name).read_bytes()
    assert out.read_text().splitlines()[0] == f"# converted by kvmpfn convert from {name}"


# -- arbitrary text never crashes ------------------------------------------------------------------------------

_FRAGMENTS = [
    FAULT,
    FAULT.replace("7f2b3000", "1000"),
    "kvm_page_fault: vcpu 1 rip 0xfff0 address 0x0000000000002000 error_code 0x182",
    SPTE,
    "kvm_page_fault: vcpu 99 rip 0x1 address 0xffffffffffffffff error_code 0xffffffffffffffff",
    "kvm_mmu_spte_requested: gfn fffffffffffff pfn 7ff0000000000000 level 9",
    "kvm_tdp_mmu_spte_changed: as id 0 gfn 7f2b3 level 0 old_spte ffffffffffffffff new_spte 5a0",
    "kvm_mmu_get_page: sp gen 0 gfn 800 l1 8-byte q0 direct wux nxe ad root 0 sync new",
    "kvm_mmu_prepare_zap_page: 7 q0",
    "kvm_exit: vcpu 0 reason =",
    "kvm_mmu_pagetable_walk: addr 0 pferr 0",
    "kvm_mmu_paging_element: pte 0 level 0",
    "<stack trace>",
    "kvm_msr: msr_write 6e0 = 0x1",
]


@st.composite
def text_lines(draw) -> str:
    prefix = draw(
        st.sampled_from(
            ["", " ", "> ", "qemu-1 [000] .... 1.000001: ", "CPU 0/KVM-2 [001] 2.5: ", "<...>-3 [002] d..1. 3: "]
        )
    )
    body = draw(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=60)))
    if draw(st.booleans()) and " " in body:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + "\n" + body[cut:]
    return prefix + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(text_lines(), max_size=25))
def test_arbitrary_text_never_crashes(tmp_path, lines):
    src = tmp_path / "fuzz.txt"
    src.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    out = tmp_path / "fuzz.jsonl"
    try:
        convert_text(str(src), str(out))
    except TextTraceError as err:
        assert "\n" not in str(err) and str(err).startswith(str(src))
        return
    result = replay_file(str(out))  # what convert writes, the simulator takes
    assert result.error is None, result.error
