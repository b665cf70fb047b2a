"""Checks on recorded traces (kvmpfn/audit/recorded.py): fault-loop, recorded-spte-mismatch,
recorded-spte-pfn-change — each with cases that must and must not report — and ``kvmpfn check``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmpfn.audit.findings import Findings
from kvmpfn.audit.recorded import CODES, FAULT_LOOP_MIN, SPURIOUS_LOOP_MIN, RecordedChecks
from kvmpfn.cli import main
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace.reader import open_trace

RECORDED = Path(__file__).resolve().parent.parent / "traces" / "recorded"

#: The findings each example of traces/recorded/ gives under ``kvmpfn replay`` once the recorded checks are
#: wired into the replay (the simulator itself finds nothing in them); the baseline entries.
EXPECTED = {
    "tdp-fault-loop.jsonl": {"fault-loop": 1},
    "tdp-spurious-loop.jsonl": {"fault-loop": 1},
    "spte-mismatch.trace-cmd.jsonl": {"recorded-spte-mismatch": 1},
    "tdp-pfn-change.jsonl": {"recorded-spte-pfn-change": 1},
    "shadow-2.6.32.jsonl": {},
}


# -- record builders (the x form kvmpfn convert writes) ---------------------------------------------------------
_line = 0


def _rec(event: str, pid: int, **fields) -> dict:
    global _line
    _line += 1
    out = {"event": event, "line": _line, "t": f"100.{_line:06d}", "cpu": 0, "pid": pid, "comm": f"CPU/KVM-{pid}"}
    for name, value in fields.items():
        hexed = (
            isinstance(value, int) and not isinstance(value, bool) and name not in ("vcpu", "level", "as_id", "fixed")
        )
        out[name] = f"{value:#x}" if hexed else value
    return out


def fault(addr: int, vcpu: int = 0, err: int = 0x182, pid: int | None = None) -> dict:
    return _rec("kvm_page_fault", 1000 + vcpu if pid is None else pid, address=addr, error_code=err, vcpu=vcpu)


def requested(gfn: int, pfn: int, level: int = 1, pid: int = 1000) -> dict:
    return _rec("kvm_mmu_spte_requested", pid, gfn=gfn, pfn=pfn, level=level)


def set_spte(gfn: int, spte: int, level: int = 1, pid: int = 1000) -> dict:
    return _rec("kvm_mmu_set_spte", pid, gfn=gfn, spte=spte, level=level, access="rwxu", at=0x11C6F1908)


def changed(gfn: int, old: int, new: int, level: int = 1, pid: int = 1000) -> dict:
    return _rec("kvm_tdp_mmu_spte_changed", pid, as_id=0, gfn=gfn, level=level, old_spte=old, new_spte=new)


def zap(gfn: int | None, level: int | None, direct: bool, pid: int = 2000) -> dict:
    fields: dict = {"role": "r", "direct": direct}
    if gfn is not None:
        fields["gfn"] = gfn
    if level is not None:
        fields["level"] = level
    return _rec("kvm_mmu_prepare_zap_page", pid, **fields)


def fast(vcpu: int, gva: int, fixed: int) -> dict:
    return _rec("fast_page_fault", 1000 + vcpu, vcpu=vcpu, gva=gva, fixed=fixed, spurious=0)


def run(records: list[dict], mmu: str = "tdp", **kw) -> list[dict]:
    findings = Findings()
    checks = RecordedChecks(findings, mmu=mmu, **kw)
    for seq, rec in enumerate(records):
        checks.feed(rec, seq, rec["line"])
    checks.finish()
    return findings.items


def codes(items: list[dict]) -> dict[str, int]:
    return dict(Counter(f["code"] for f in items))


GPA = 0x1A3B7000
LEAF = 0x600000000000EF7  # EPT R|W|X leaf bits with the frame left empty


# -- fault-loop ----------------------------------------------------------------------------------------------


def test_fault_loop_reports_eight_identical_faults():
    items = run([fault(GPA, vcpu=1, err=0x182 if i % 2 else 0x181) for i in range(FAULT_LOOP_MIN)])
    assert codes(items) == {"fault-loop": 1}
    f = items[0]
    assert f["addr"] == hex(GPA) and f["vcpu"] == 1 and f["count"] == FAULT_LOOP_MIN
    assert f["errs"] == ["0x181", "0x182"]
    assert f["t_first"] < f["t_last"]
    assert f["point"] == "recorded" and f["seq"] == FAULT_LOOP_MIN - 1
    assert [p["function"] for p in f["provenance"]] == ["kvm_page_fault", "kvm_page_fault"]
    assert f["provenance"][0]["text_line"] < f["provenance"][1]["text_line"]


def test_fault_loop_needs_the_threshold():
    assert run([fault(GPA) for _ in range(FAULT_LOOP_MIN - 1)]) == []
    assert codes(run([fault(GPA) for _ in range(3)], fault_loop_min=3)) == {"fault-loop": 1}


def test_other_vcpus_do_not_break_a_loop_and_loops_are_per_vcpu():
    records = []
    for i in range(FAULT_LOOP_MIN):
        records += [fault(GPA, vcpu=1), fault(0x5000 + i * 0x1000, vcpu=0)]
    items = run(records)
    assert codes(items) == {"fault-loop": 1} and items[0]["vcpu"] == 1


@pytest.mark.parametrize(
    ("change", "breaks"),
    [
        (lambda: set_spte(GPA >> 12, LEAF | (0x1A7F21 << 12), pid=1005), True),  # any thread, same gfn
        (lambda: set_spte((GPA >> 12) + 1, LEAF | (0x1A7F21 << 12), pid=1001), False),  # a neighbour
        (lambda: set_spte(0x1A200, LEAF | (0x200000 << 12) | 0x80, level=2), True),  # a 2 MiB leaf covering it
        (lambda: changed(GPA >> 12, LEAF | (0x1234 << 12), 0), True),
        (lambda: changed(0x1A3B6, 0, LEAF | (0x1234 << 12)), False),
        (lambda: requested(GPA >> 12, 0x1A7F21, pid=1001), False),  # a request is not a change
        (lambda: zap(0x1A200, 1, True), True),  # a direct level-1 page covers 512 frames from 0x1a200
        (lambda: zap(0x1A000, 1, True), False),
        (lambda: zap(0x3C7A3, 1, False), True),  # an indirect page: any address may be behind it
        (lambda: zap(None, 1, True), True),  # the trace-cmd plugin's zap: no gfn
        (lambda: fast(1, GPA, 1), True),
        (lambda: fast(1, GPA, 0), False),
        (lambda: fault(GPA + 0x1000, vcpu=1), True),  # the vcpu moved on
    ],
)
def test_what_breaks_a_fault_loop(change, breaks):
    half = FAULT_LOOP_MIN // 2 + 1
    records = [fault(GPA, vcpu=1) for _ in range(half)] + [change()] + [fault(GPA, vcpu=1) for _ in range(half)]
    found = [f for f in run(records) if f["code"] == "fault-loop"]
    if breaks:
        assert found == []
    else:
        assert len(found) == 1 and found[0]["count"] == 2 * half


def spurious(vcpu: int, gpa: int, old: int = LEAF, new: int = LEAF) -> dict:
    return _rec("fast_page_fault", 1000 + vcpu, vcpu=vcpu, gva=gpa, old=old, new=new, spurious=1, fixed=0)


def test_tdp_faults_at_one_gpa_count_across_vcpus():
    half = FAULT_LOOP_MIN // 2
    alternating = [fault(GPA, vcpu=i % 2) for i in range(2 * half)]
    items = run(alternating)
    assert codes(items) == {"fault-loop": 1}
    assert items[0]["count"] == 2 * half and items[0]["vcpus"] == [0, 1] and items[0]["spurious"] == 0
    assert run(alternating, mmu="shadow") == []  # gvas: each vcpu's own address space, counted apart


def test_repeated_spurious_fast_page_faults_are_a_loop_at_a_lower_threshold():
    """The nested-guest freeze: a handful of faults on two vcpus, each fast_page_fault spurious, old == new."""
    records = []
    for i in range(SPURIOUS_LOOP_MIN):
        records += [fault(GPA, vcpu=i % 2), spurious(i % 2, GPA)]
    items = run(records)
    assert SPURIOUS_LOOP_MIN == 3 < FAULT_LOOP_MIN
    assert codes(items) == {"fault-loop": 1}
    assert items[0]["spurious"] == SPURIOUS_LOOP_MIN and items[0]["count"] == SPURIOUS_LOOP_MIN
    assert run(records[:-2]) == []  # one spurious record short
    changed_spte = [
        r if r["event"] != "fast_page_fault" else spurious(r["vcpu"], GPA, LEAF, LEAF | 1 << 62) for r in records
    ]
    assert run(changed_spte) == []  # old != new: not the loop's signature
    assert run(records, spurious_loop_min=4) == []
    fixed = records[:4] + [fast(1, GPA, 1)] + records[4:]
    assert run(fixed) == []  # a fixed fast_page_fault in between is progress


def test_a_vcpu_of_the_run_faulting_elsewhere_ends_it():
    records = [fault(GPA, vcpu=i % 2) for i in range(FAULT_LOOP_MIN - 2)]
    records += [fault(GPA + 0x1000, vcpu=0)] + [fault(GPA, vcpu=1), fault(GPA, vcpu=1)]
    assert run(records) == []


def test_shadow_faults_are_gvas_broken_only_by_changes_on_the_vcpu_thread():
    gva = 0x7FFF5A2B3C48
    other = [fault(gva, vcpu=2) for _ in range(5)] + [set_spte(0x12345, LEAF, pid=9)] + [fault(gva, vcpu=2)] * 5
    assert codes(run(other, mmu="shadow")) == {"fault-loop": 1}
    own = [fault(gva, vcpu=2) for _ in range(5)] + [set_spte(0x12345, LEAF, pid=1002)] + [fault(gva, vcpu=2)] * 5
    assert run(own, mmu="shadow") == []


def test_mmio_faults_are_progress_but_ept_qualifications_are_not():
    # PFERR.RSVD: an MMIO spte hit, emulated each time (a guest polling a device register)
    assert run([fault(0xFEBD0000, err=0x100000009 if i % 2 else 0xD) for i in range(12)]) == []
    broken = [fault(GPA)] * 5 + [fault(GPA, err=0xD)] + [fault(GPA)] * 5
    assert run(broken) == []
    # bit 3 of an EPT exit qualification means "readable", not RSVD: a write to a read-only gpa looping
    loop = [fault(GPA, err=0x18A) | {"ept_qualification": True} for _ in range(FAULT_LOOP_MIN)]
    assert codes(run(loop)) == {"fault-loop": 1}


def test_one_fault_loop_per_vcpu_and_address():
    loop = [fault(GPA, vcpu=1) for _ in range(FAULT_LOOP_MIN)]
    items = run(loop + [fault(0x9000, vcpu=1)] + loop)
    assert codes(items) == {"fault-loop": 1}


# -- recorded-spte-mismatch ----------------------------------------------------------------------------------


def test_spte_mismatch_reports_a_different_frame():
    items = run([requested(0x1234, 0x8BE3456), set_spte(0x1234, 0x8BE7456EF7)])
    assert codes(items) == {"recorded-spte-mismatch": 1}
    f = items[0]
    assert (f["gfn"], f["level"], f["pfn"], f["spte_pfn"]) == ("0x1234", 1, "0x8be3456", "0x8be7456")
    assert [p["function"] for p in f["provenance"]] == ["kvm_mmu_spte_requested", "kvm_mmu_set_spte"]


@pytest.mark.parametrize(
    "records",
    [
        [requested(0xFFFFF, 0x8BE2171), set_spte(0xFFFFF, 0x8BE2171025)],
        # 2 MiB: the requested pfn carries the gfn's offset in the large page, the spte the aligned frame
        [requested(0x84D, 0x100B4A4D, 2), set_spte(0x800, 0x100B4A00EA7, 2)],
        # ... or the request is already aligned
        [requested(0x84D, 0x100B4A00, 2), set_spte(0x800, 0x100B4A00EA7, 2)],
        # a prefetched neighbour is not what was requested
        [requested(0x1234, 0x8BE3456), set_spte(0x1235, 0x8BE9999EF7), set_spte(0x1234, 0x8BE3456EF7)],
        # another thread's set_spte does not answer this thread's request
        [requested(0x1234, 0x8BE3456, pid=1), set_spte(0x1234, 0x8BE7456EF7, pid=2)],
        # a request without set_spte (mmio, retry), then a new request
        [requested(0xFEE00, 0x7FF0000000000000), requested(0x3, 0x8BE1003), set_spte(0x3, 0x8BE1003EF7)],
    ],
)
def test_spte_mismatch_negative(records):
    assert run(records) == []


def test_spte_mismatch_large_page_in_the_wrong_frame():
    items = run([requested(0x84D, 0x100B4A4D, 2), set_spte(0x800, 0x100C4A00EA7, 2)])
    assert codes(items) == {"recorded-spte-mismatch": 1} and items[0]["spte_pfn"] == "0x100c4a00"


def test_a_request_is_matched_once():
    items = run([requested(0x1234, 0x8BE3456), set_spte(0x1234, 0x8BE3456EF7), set_spte(0x1234, 0x8BE7456EF7)])
    assert items == []


# -- recorded-spte-pfn-change --------------------------------------------------------------------------------


def test_pfn_change_reports_leaf_to_leaf_with_another_frame():
    items = run([changed(0x7F2B3, 0x6000002C9A11F77, 0x6000002D0C4E075)])
    assert codes(items) == {"recorded-spte-pfn-change": 1}
    f = items[0]
    assert (f["gfn"], f["level"], f["old_pfn"], f["new_pfn"]) == ("0x7f2b3", 1, "0x2c9a11", "0x2d0c4e")
    assert f["spte"] == "0x6000002d0c4e075" and f["old_spte"] == "0x6000002c9a11f77"


@pytest.mark.parametrize(
    "records",
    [
        [changed(0x7F2B3, 0x6000002C9A11F77, 0), changed(0x7F2B3, 0, 0x6000002D0C4E075)],  # zapped first
        [changed(0x7F2B4, 0x6000002C583F977, 0x5A0), changed(0x7F2B4, 0x5A0, 0x6000002D0C4E075)],  # frozen
        [changed(0x7F2B4, 0x6000002C583F977, 0x80000000000005A0)],  # suppress-#VE non-present
        [changed(0x7F2B3, 0x6000002C9A11F77, 0x6000002C9A11F75)],  # W removed: same frame
        [changed(0x7F2B3, 0x6000002C9A11E77, 0x6000002C9A11F77)],  # A/D-style bits: same frame
        [changed(0x7F200, 0x2C1D4E907, 0x2C1D4F907, level=2)],  # non-leaf: a table pointer, not a frame
        # a 2 MiB non-EPT leaf whose bit 12 (PAT) differs: the same 2 MiB frame
        [changed(0x800, 0x100B4A000E7, 0x100B4A010E7, level=2)],
        [changed(0x1000, 0x6000002C9A11F77, 0x6000002D0C4E006)],  # new is an EPT misconfig (MMIO) spte
    ],
)
def test_pfn_change_negative(records):
    assert run(records) == []


def test_pfn_change_of_a_large_leaf():
    items = run([changed(0x800, 0x100B4A000E7, 0x100C4A000E7, level=2)])
    assert codes(items) == {"recorded-spte-pfn-change": 1}


def test_garbage_records_are_ignored():
    findings = Findings()
    checks = RecordedChecks(findings)
    for x in (None, 7, {"recorded": "no"}, {"recorded": [1, "a", {"event": "kvm_page_fault"}]}):
        checks.observe(x)
    checks.feed({"event": "kvm_mmu_set_spte", "gfn": "zz", "spte": []}, 0, 1)
    checks.feed({"event": "kvm_tdp_mmu_spte_changed", "gfn": True}, 0, 1)
    checks.finish()
    assert findings.items == []


def test_codes_are_the_documented_ones():
    assert set(CODES) == {"fault-loop", "recorded-spte-mismatch", "recorded-spte-pfn-change"}
    import kvmpfn.audit.recorded as mod

    for code in CODES:
        assert f"``{code}``" in mod.__doc__


# -- kvmpfn check --------------------------------------------------------------------------------------------


def test_check_exit_codes_and_json(tmp_path):
    runner = CliRunner()
    clean = runner.invoke(main, ["check", str(RECORDED / "shadow-2.6.32.txt")])
    assert clean.exit_code == 0, clean.output
    assert "20 records checked, 0 findings" in clean.output
    dirty = runner.invoke(main, ["check", str(RECORDED / "tdp-fault-loop.txt"), "--format", "json"])
    assert dirty.exit_code == 1
    doc = json.loads(dirty.output)
    assert doc["summary"]["by_code"] == {"fault-loop": 1}
    assert doc["findings"][0]["line"] == 62  # the last looping fault's line in the text
    missing = runner.invoke(main, ["check", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"kvmpfn: error: {tmp_path / 'nope.txt'}: no such file or directory"
    prose = tmp_path / "mail.txt"
    prose.write_text("Hi,\nthe guest hangs.\n")
    nothing = runner.invoke(main, ["check", str(prose)])
    assert nothing.exit_code == 2 and "no record of an event kvmpfn reads" in nothing.stderr
    assert "Traceback" not in nothing.output + nothing.stderr


def test_check_quiet_names_the_file_of_each_finding_when_there_are_several():
    loop, clean = str(RECORDED / "tdp-fault-loop.txt"), str(RECORDED / "shadow-2.6.32.txt")
    one = CliRunner().invoke(main, ["check", loop, "-q"])
    assert one.exit_code == 1 and one.stdout.startswith("  [1] fault-loop")
    several = CliRunner().invoke(main, ["check", clean, loop, "-q"])
    assert several.exit_code == 1
    lines = several.stdout.splitlines()
    assert lines[0] == f"{loop}: 17 records checked, 1 finding" and lines[1].startswith("  [1] fault-loop")
    assert clean not in several.stdout


def test_check_of_a_converted_trace_and_its_input_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(RECORDED / "tdp-pfn-change.jsonl")])
    assert result.exit_code == 1 and "recorded-spte-pfn-change at line 4" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kvmpfn": 1}\n{"op": "pf", "addr": 1}\n')
    result = runner.invoke(main, ["check", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"kvmpfn: error: {bad}:2: ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_text_and_converted_trace_agree(name):
    runner = CliRunner()
    text = RECORDED / name.replace(".jsonl", ".txt")
    from_text = json.loads(runner.invoke(main, ["check", str(text), "--format", "json"]).output)
    from_trace = json.loads(runner.invoke(main, ["check", str(RECORDED / name), "--format", "json"]).output)
    assert from_text["summary"]["by_code"] == from_trace["summary"]["by_code"] == EXPECTED[name]
    assert from_text["records"] == from_trace["records"]


# -- the replay hook -----------------------------------------------------------------------------------------


def replay_with_recorded_checks(path: str) -> list[dict]:
    """What ``kvmpfn replay`` finds once the recorded checks are wired into the replay (the lines in the
    report): RecordedChecks.for_header in Replayer, observe(e.x) after each event, finish() after the loop."""
    with open_trace(path) as reader:
        rp = Replayer(reader.header, ReplayOptions())
        checks = RecordedChecks.for_header(rp.findings, reader.header)
        seq = -1
        for seq, (line, e) in enumerate(reader):
            rp.apply(seq, line, e)
            if e.x is not None:
                checks.observe(e.x)
        checks.finish()
        rp.findings.seq, rp.findings.point = seq + 1, "teardown"
        rp.do_teardown()
    return rp.findings.items


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_examples_give_the_expected_findings(name):
    path = str(RECORDED / name)
    assert codes(replay_with_recorded_checks(path)) == EXPECTED[name]
    plain = replay_file(path)
    assert plain.error is None
    simulator = [f for f in plain.findings if f["code"] not in CODES]
    assert simulator == []  # the simulator finds nothing of its own in them


def test_every_recorded_example_is_listed():
    assert sorted(p.name for p in RECORDED.glob("*.jsonl")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_replay_file_runs_the_recorded_checks(name):
    """A replay of a converted trace runs the recorded checks over its x.recorded annotations."""
    assert codes(replay_file(str(RECORDED / name)).findings) == EXPECTED[name]
