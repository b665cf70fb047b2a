"""Scenario traces (traces/tdp/, traces/variants/): one behaviour each, replayed through ``replay_file`` with
their outcome records asserted field by field, KVM's reference counts checked before and after teardown, and
the ``--emit`` output of the real CLI checked to be byte-identical across runs.

Findings are not asserted here: the v2.6.26 traces that leave sptes behind (memslot deletion, host remap) are
meant to produce ``spte-without-memslot`` / ``spte-hpa-mismatch`` findings, which the auditor tests own.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import log_hook

from kvmpfn.host import BAD_PFN, MMIO_PFN_BASE
from kvmpfn.replay import Replayer, ReplayOptions, replay_file
from kvmpfn.trace.reader import open_trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"


def rec(seq, line, op, result, gpa=None, pfn=None, spte=None, **extra) -> dict:
    """An outcome record as docs/trace-format.md defines it (integers other than seq/line in hex)."""
    out = {"seq": seq, "line": line, "op": op, "result": result}
    if gpa is not None:
        out["gpa"] = hex(gpa)
    if pfn is not None:
        out["pfn"] = hex(pfn)
        out["spte"] = hex(spte)
    if op in ("access", "pf"):
        out["set_accessed"] = []
    out.update(extra)
    return out


def access(seq, line, result, gpa, pfn=None, spte=None) -> dict:
    return rec(seq, line, "access", result, gpa, pfn, spte)


RW = 0x67  # P | W | U | A | D: a direct-map leaf the CPU has used
RO = 0x65  # the same without W
LARGE = 0x80

EXPECTED: dict[str, list[dict]] = {
    "tdp/touch-4k-2m.jsonl": [
        access(0, 5, "mapped", 0x1000, 0x100000, 0x100000 << 12 | RW),
        access(1, 6, "hit", 0x1008, 0x100000, 0x100000 << 12 | RW),
        access(2, 7, "mapped", 0x2000, 0x100001, 0x100001 << 12 | RW),
        access(3, 9, "mapped", 0x800000, 0x100200, 0x100200 << 12 | RW | LARGE),
        access(4, 10, "hit", 0x9FF000, 0x1003FF, 0x100200 << 12 | RW | LARGE),
        access(5, 11, "mapped", 0xA00000, 0x100400, 0x100400 << 12 | RW | LARGE),
        rec(6, 12, "audit", "ok", findings=0),
    ],
    "variants/mmio-pfn.jsonl": [
        access(0, 8, "mmio", 0xFE000000),
        access(1, 9, "mmio", 0xFE000010),
        access(2, 10, "mmio", 0xFE000000),
        access(3, 11, "mmio", 0xFE00F008),
        rec(4, 13, "pf", "mmio", 0xFE001000),
        access(5, 15, "mapped", 0x3000, 0x100000, 0x100000 << 12 | RW),
        access(6, 16, "hit", 0x3008, 0x100000, 0x100000 << 12 | RW),
        rec(7, 17, "audit", "ok", findings=0),
    ],
    "variants/mmio-pfn-io.jsonl": [
        access(0, 7, "mapped", 0xFE000000, MMIO_PFN_BASE, MMIO_PFN_BASE << 12 | RW),
        access(1, 8, "hit", 0xFE000010, MMIO_PFN_BASE, MMIO_PFN_BASE << 12 | RW),
        access(2, 9, "hit", 0xFE000000, MMIO_PFN_BASE, MMIO_PFN_BASE << 12 | RW),
        access(3, 10, "mapped", 0xFE00F008, MMIO_PFN_BASE + 15, (MMIO_PFN_BASE + 15) << 12 | RW),
        # a recorded fault: no CPU walk after it, so A is still clear
        rec(4, 11, "pf", "mapped", 0xFE001000, MMIO_PFN_BASE + 1, (MMIO_PFN_BASE + 1) << 12 | 0x47),
        access(5, 13, "mapped", 0x3000, 0x100000, 0x100000 << 12 | RW),
        access(6, 14, "hit", 0x3008, 0x100000, 0x100000 << 12 | RW),
        rec(7, 15, "audit", "ok", findings=0),
    ],
    "variants/host-remap-pfn.jsonl": [
        access(0, 6, "mapped", 0x5000, 0x100000, 0x100000 << 12 | RW),
        access(1, 7, "mapped", 0x6000, 0x100001, 0x100001 << 12 | RW),
        rec(2, 9, "host_remap", "ok"),
        access(3, 11, "hit", 0x5000, 0x100000, 0x100000 << 12 | RW),  # the old frame
        access(4, 12, "hit", 0x5FF8, 0x100000, 0x100000 << 12 | RW),
        rec(5, 14, "write", "ok"),
        rec(6, 16, "host_remap", "ok"),
        access(7, 17, "mapped", 0x7000, 0x100003, 0x100003 << 12 | RW),
        rec(8, 18, "audit", "ok", findings=1),
    ],
    "variants/host-remap-notifier.jsonl": [
        access(0, 6, "mapped", 0x5000, 0x100000, 0x100000 << 12 | RW),
        access(1, 7, "mapped", 0x6000, 0x100001, 0x100001 << 12 | RW),
        rec(2, 9, "host_remap", "ok"),
        access(3, 11, "mapped", 0x5000, 0x100002, 0x100002 << 12 | RW),  # the new frame
        access(4, 12, "hit", 0x5FF8, 0x100002, 0x100002 << 12 | RW),
        rec(5, 13, "write", "ok"),
        access(6, 15, "hit", 0x6000, 0x100001, 0x100001 << 12 | RW),
        rec(7, 16, "audit", "ok", findings=0),
    ],
    "variants/memslot-delete-pfn-io.jsonl": [
        access(0, 7, "mapped", 0x1005000, 0x100000, 0x100000 << 12 | RW),
        access(1, 8, "mapped", 0x1006000, 0x100001, 0x100001 << 12 | RW),
        access(2, 9, "mapped", 0x3000, 0x100002, 0x100002 << 12 | RW),
        rec(3, 11, "memslot", "ok"),
        access(4, 13, "hit", 0x1005000, 0x100000, 0x100000 << 12 | RO),  # stale, write-protected
        access(5, 14, "hit", 0x1006000, 0x100001, 0x100001 << 12 | RO),
        access(6, 16, "mmio", 0x1005000),
        access(7, 18, "mmio", 0x1007000),
        access(8, 20, "hit", 0x3000, 0x100002, 0x100002 << 12 | RW),
        rec(9, 21, "audit", "ok", findings=2),
    ],
    "variants/memslot-delete-notifier.jsonl": [
        access(0, 6, "mapped", 0x1005000, 0x100000, 0x100000 << 12 | RW),
        access(1, 7, "mapped", 0x1006000, 0x100001, 0x100001 << 12 | RW),
        access(2, 8, "mapped", 0x3000, 0x100002, 0x100002 << 12 | RW),
        rec(3, 10, "memslot", "ok"),
        access(4, 11, "mmio", 0x1005000),
        access(5, 12, "mmio", 0x1006000),
        access(6, 13, "mmio", 0x1005000),
        access(7, 14, "mmio", 0x1007000),
        access(8, 16, "mapped", 0x3000, 0x100002, 0x100002 << 12 | RW),  # zapped, faulted back in
        rec(9, 17, "audit", "ok", findings=0),
    ],
}

#: KVM's references after the last event, before teardown: {pfn: count} of every frame with a non-zero count.
HELD_BEFORE_TEARDOWN: dict[str, dict[int, int]] = {
    "tdp/touch-4k-2m.jsonl": {0x100000: 1, 0x100001: 1, 0x100200: 1, 0x100400: 1},
    "variants/mmio-pfn.jsonl": {0x100000: 1},
    "variants/mmio-pfn-io.jsonl": {0x100000: 1},
    "variants/host-remap-pfn.jsonl": {0x100000: 1, 0x100001: 1, 0x100003: 1},
    "variants/host-remap-notifier.jsonl": {0x100001: 1, 0x100002: 1},
    "variants/memslot-delete-pfn-io.jsonl": {0x100000: 1, 0x100001: 1, 0x100002: 1},
    "variants/memslot-delete-notifier.jsonl": {0x100002: 1},
}

#: Frames the host no longer maps that KVM alone keeps alive before teardown.
KVM_ONLY: dict[str, set[int]] = {
    "variants/host-remap-pfn.jsonl": {0x100000},
    "variants/memslot-delete-pfn-io.jsonl": {0x100000, 0x100001},
}

NAMES = sorted(EXPECTED)


def run_records(name: str) -> tuple[list[dict], str]:
    buf = io.StringIO()
    result = replay_file(str(TRACES / name), emit=buf)
    assert result.error is None, result.error
    text = buf.getvalue()
    return [json.loads(line) for line in text.splitlines()], text


def replay_keeping_the_vm(name: str) -> tuple[Replayer, list[dict], list[tuple]]:
    """Apply every event with the replay engine, stopping before the header's teardown."""
    log: list[tuple] = []
    with open_trace(str(TRACES / name)) as reader:
        rp = Replayer(reader.header, ReplayOptions())
        log_hook(rp.api, log)
        records = [rp.apply(seq, line, e) for seq, (line, e) in enumerate(reader)]
    return rp, records, log


def test_every_scenario_trace_is_covered():
    found = {str(p.relative_to(TRACES)) for d in ("tdp", "variants") for p in (TRACES / d).glob("*.jsonl")}
    assert found == set(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_header_comments_say_what_the_trace_shows(name):
    lines = (TRACES / name).read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20


@pytest.mark.parametrize("name", NAMES)
def test_outcome_records(name):
    records, _ = run_records(name)
    expected = EXPECTED[name]
    assert len(records) == len(expected)
    for got, want in zip(records, expected, strict=True):
        assert got == want, f"seq {want['seq']}"
        assert list(got) == list(want)  # field order as the format lists them


@pytest.mark.parametrize("name", NAMES)
def test_reference_counts_before_and_after_teardown(name):
    rp, records, log = replay_keeping_the_vm(name)
    assert records == EXPECTED[name]
    host = rp.host
    held = {pfn: f.count for pfn, f in host.frames.items() if f.count}
    assert held == HELD_BEFORE_TEARDOWN[name]
    for pfn in KVM_ONLY.get(name, ()):
        assert not host.frames[pfn].host_mapped
    assert all(host.frames[pfn].host_mapped for pfn in set(held) - KVM_ONLY.get(name, set()))
    assert host.frames[BAD_PFN].count == 0
    assert not [c for c in log if c[1] >= MMIO_PFN_BASE]  # a device frame is never refcounted or flagged
    rp.do_teardown()
    assert {pfn: f.count for pfn, f in host.frames.items() if f.count} == {}
    gets = Counter(c[1] for c in log if c[0] == "get")
    puts = Counter(c[1] for c in log if c[0] == "put")
    assert gets == puts


def test_mmio_pfn_takes_and_releases_bad_pfn_per_exit():
    _, _, log = replay_keeping_the_vm("variants/mmio-pfn.jsonl")
    bad = [(c[0], c[2], c[3]) for c in log if c[1] == BAD_PFN]
    exit_pair = [("get", "gfn_to_pfn", "tdp_page_fault"), ("put", "kvm_release_pfn_clean", "tdp_page_fault")]
    assert bad == exit_pair * 5


def test_host_remap_notifier_releases_the_old_frame_dirty_at_the_remap():
    rp, records, log = replay_keeping_the_vm("variants/host-remap-notifier.jsonl")
    old = [c for c in log if c[1] == 0x100000]
    assert [(c[0], c[3]) for c in old] == [
        ("get", "tdp_page_fault"),
        ("accessed", "rmap_remove"),
        ("dirty", "rmap_remove"),
        ("put", "rmap_remove"),
    ]
    assert 0x100000 not in rp.host.frames and rp.kvm.mmu_notifier_seq == 1


def kvmpfn_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("kvmpfn")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kvmpfn"]


@pytest.mark.parametrize("name", NAMES)
def test_cli_emit_is_byte_identical_across_runs(name, tmp_path):
    _, text = run_records(name)
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.jsonl"
        cmd = [*kvmpfn_cmd(), "replay", str(TRACES / name), "--emit", str(out)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
        assert proc.returncode in (0, 1), proc.stderr  # 1: findings (the auditor's business), never 2
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] == text.encode()
