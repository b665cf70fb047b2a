"""Bounded memory (issue 21): ``max_memory`` and its estimate (kvmpfn.limits), sizes, and a replay that runs
out of memory still reporting what it found. The command-line cases run in subprocesses bounded in time and
address space (the pattern of cli_helper)."""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from growth_helper import LEAK_BUG, LEAK_LINE, hugetlb_regions, leak_then_growth, tdp_faults

from kvmpfn import limits
from kvmpfn.audit import Auditor
from kvmpfn.errors import InputError
from kvmpfn.limits import CHECK_EVERY, format_size, memory_use, parse_size, resolve_max_memory
from kvmpfn.replay import REPLAY_GC_THRESHOLD, Replayer, ReplayOptions, replay_file
from kvmpfn.synth import SynthSpec, write_synth

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# -- sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * MiB),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("1.5G", 3 << 29),
        ("64k", 64 << 10),
        ("4096", 4096),
        ("2GiB", 2 << 30),
        ("512MB", 512 * MiB),
        ("1T", 1 << 40),
        (" 8 M ", 8 * MiB),
        ("0", 0),
        ("0.5K", 512),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1X", "1.5.5G", "1e9", "nan", "2 G B", "1" * 40, "99999999999T"])
def test_parse_size_refuses(text):
    with pytest.raises(InputError) as err:
        parse_size(text)
    assert repr(text) in str(err.value) and "\n" not in str(err.value)


def test_format_size():
    assert [format_size(n) for n in (512 * MiB, 3 << 29, 1000, 1536, 1 << 40)] == [
        "512 MiB",
        "1.5 GiB",
        "1000 B",
        "1.5 KiB",
        "1 TiB",
    ]


def test_default_is_half_of_the_smallest_of_ram_cgroup_and_rlimit(monkeypatch):
    monkeypatch.setattr(limits.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1 << 22}[name])
    monkeypatch.setattr(limits, "_CGROUP_LIMITS", ())
    monkeypatch.setattr(limits.resource, "getrlimit", lambda what: (limits.resource.RLIM_INFINITY,) * 2)
    assert limits.machine_memory() == 16 << 30
    assert resolve_max_memory(None) == 8 << 30
    monkeypatch.setattr(limits.resource, "getrlimit", lambda what: (3 << 30, limits.resource.RLIM_INFINITY))
    assert resolve_max_memory(None) == 3 << 29
    assert resolve_max_memory(0) == 0 and resolve_max_memory(12345) == 12345
    with pytest.raises(InputError):
        resolve_max_memory(-1)


def test_default_reads_a_cgroup_limit(monkeypatch, tmp_path: Path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "other.max").write_text("max\n")  # cgroup v2 for "no limit"
    monkeypatch.setattr(limits, "_CGROUP_LIMITS", (str(tmp_path / "other.max"), str(tmp_path / "memory.max")))
    monkeypatch.setattr(limits.resource, "getrlimit", lambda what: (limits.resource.RLIM_INFINITY,) * 2)
    assert limits.machine_memory() == min(1 << 30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# -- the estimate ----------------------------------------------------------------------------------------


class _Last(Replayer):
    last: Replayer | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Last.last = self


def _estimate_and_traced(monkeypatch, path: Path) -> tuple[int, int]:
    """The estimate of the VM ``path`` leaves (before teardown) and the bytes tracemalloc sees it hold."""
    monkeypatch.setattr("kvmpfn.replay.Replayer", _Last)
    lines = path.read_bytes().split(b"\n")
    i = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith(b"#"))
    lines[i] = json.dumps({**json.loads(lines[i]), "teardown": False}).encode()  # measure the VM itself
    path.write_bytes(b"\n".join(lines))
    del lines
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = replay_file(str(path), ReplayOptions(max_memory=0))
        assert result.error is None
        rp = _Last.last
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return sum(count * cost for count, cost, _ in memory_use(rp.host, rp.kvm, rp.findings)), traced


@pytest.mark.parametrize(
    "make",
    [
        lambda: hugetlb_regions(3000),
        lambda: tdp_faults(3000),
        lambda: leak_then_growth(3000),
        lambda: tdp_faults(6000, shift=12),
    ],
    ids=["hugetlb stores", "tdp faults on fresh 2 MiB regions", "stores to fresh pages", "tdp faults on 4 KiB pages"],
)
def test_the_estimate_is_within_a_fifth_of_what_the_vm_holds(monkeypatch, tmp_path: Path, make):
    path = tmp_path / "t.jsonl"
    path.write_bytes(make())
    estimate, traced = _estimate_and_traced(monkeypatch, path)
    assert traced > 4 * MiB  # the VM grew: the case measures something
    assert 0.8 < estimate / traced < 1.25, (format_size(estimate), format_size(traced), estimate / traced)


@pytest.mark.parametrize(
    ("workload", "mmu"),
    [("steady", "tdp"), ("boot", "shadow"), ("fork-storm", "tdp"), ("remap-churn", "shadow"), ("hugepages", "tdp")],
)
def test_the_estimate_of_the_synth_workloads(monkeypatch, tmp_path: Path, workload, mmu):
    path = tmp_path / "t.jsonl"
    write_synth(str(path), SynthSpec(workload, 3_000, seed=1, mmu=mmu))
    estimate, traced = _estimate_and_traced(monkeypatch, path)
    assert traced > 256 << 10  # the VM grew: the case measures something
    assert 0.8 < estimate / traced < 1.25, (format_size(estimate), format_size(traced), estimate / traced)


def test_hugetlb_stores_cost_about_a_page_each(monkeypatch, tmp_path: Path):
    """Issue 21's trace: 1,000 stores to fresh 2 MiB regions of a hugetlb slot hold about 4.4 KiB each (they
    held 512 frames each: ~125 KiB)."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(hugetlb_regions(1000))
    _estimate, traced = _estimate_and_traced(monkeypatch, path)
    assert traced < 1000 * 6 * 1024


# -- the limit in a replay --------------------------------------------------------------------------------


def _leak_trace(tmp_path: Path, n: int) -> str:
    path = tmp_path / "t.jsonl"
    path.write_bytes(leak_then_growth(n))
    return str(path)


def test_the_limit_stops_the_replay_with_the_findings_so_far(tmp_path: Path):
    path = _leak_trace(tmp_path, 20_000)
    options = ReplayOptions(bugs=frozenset({LEAK_BUG}), max_memory=20 * MiB)
    result = replay_file(path, options)
    match = re.fullmatch(
        rf"{re.escape(path)}:(\d+): over the memory limit: the simulated VM holds about [\d.]+ MiB "
        r"\(max_memory 20 MiB\), most of it guest pages with contents: ([\d,]+) \([\d.]+ MiB\)",
        result.error or "",
    )
    assert match, result.error
    line, pages = int(match.group(1)), int(match.group(2).replace(",", ""))
    assert result.events % CHECK_EVERY == 1  # checked after the event of seq 0, CHECK_EVERY, 2 * CHECK_EVERY ...
    assert line == result.events + 12  # the header is line 11, comments before the leak trace's audit
    assert 20 * MiB / limits.PAGE_DATA < pages < 20 * MiB / limits.PAGE_DATA + CHECK_EVERY
    assert [(f["code"], f["line"]) for f in result.findings] == [("refcount-leak", LEAK_LINE)]
    again = replay_file(path, options)
    assert (again.error, again.events, again.findings) == (result.error, result.events, result.findings)


def test_no_limit_and_a_large_limit_replay_to_the_end(tmp_path: Path):
    path = _leak_trace(tmp_path, 3000)
    for max_memory in (0, 1 << 40):
        result = replay_file(path, ReplayOptions(bugs=frozenset({LEAK_BUG}), max_memory=max_memory))
        assert result.error is None and result.events == 3005


def test_the_limit_is_checked_before_the_teardown(tmp_path: Path):
    """A trace shorter than CHECK_EVERY events is checked once more before its teardown audit."""
    path = _leak_trace(tmp_path, 500)
    result = replay_file(path, ReplayOptions(bugs=frozenset({LEAK_BUG}), max_memory=1 * MiB))
    assert result.error.startswith(f"{path}:{17 + 500}: over the memory limit"), result.error
    assert result.events == 505 and "teardown" not in {f["point"] for f in result.findings}


# -- out of memory --------------------------------------------------------------------------------------


def test_out_of_memory_in_the_teardown_audit_keeps_the_findings(tmp_path: Path, monkeypatch):
    full_audit = Auditor.full_audit

    def failing(self, label):
        if label == "teardown":
            raise MemoryError
        return full_audit(self, label)

    monkeypatch.setattr(Auditor, "full_audit", failing)
    path = _leak_trace(tmp_path, 10)
    result = replay_file(path, ReplayOptions(bugs=frozenset({LEAK_BUG})))
    assert result.error == (
        f"{path}:{17 + 10}: out of memory in the teardown audit after this line; the findings up to here are reported"
    )
    assert result.events == 15
    assert [(f["code"], f["line"]) for f in result.findings] == [("refcount-leak", LEAK_LINE)]


def test_out_of_memory_in_an_event_keeps_the_findings(tmp_path: Path, monkeypatch):
    from kvmpfn.host import Host

    write_guest = Host.write_guest
    calls = []

    def failing(self, gpa, val, size):
        calls.append(gpa)
        if len(calls) == 7:
            raise MemoryError
        return write_guest(self, gpa, val, size)

    monkeypatch.setattr(Host, "write_guest", failing)
    path = _leak_trace(tmp_path, 10)
    result = replay_file(path, ReplayOptions(bugs=frozenset({LEAK_BUG})))
    assert result.error == f"{path}:{17 + 7}: out of memory here; the findings up to here are reported"
    assert result.events == 5 + 6
    assert [(f["code"], f["line"]) for f in result.findings] == [("refcount-leak", LEAK_LINE)]


def _run(cwd: Path, memory: int, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` with this checkout first on the path, at most ``memory`` bytes of address space."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    env.pop("KVMPFN_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, timeout=120, preexec_fn=limit)


def test_cli_default_limit_stops_a_growing_trace_with_its_findings(tmp_path: Path):
    """Under ``ulimit -v 512M`` the default max_memory is 256 MiB: a trace that needs more stops with exit 2, one
    line naming the line and what grew, and the report on stdout with the finding made before."""
    (tmp_path / "t.jsonl").write_bytes(leak_then_growth(80_000))
    proc = _run(tmp_path, 512 * MiB, "-m", "kvmpfn", "replay", "t.jsonl", "--bug", LEAK_BUG, "--format", "json")
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert re.fullmatch(
        r"kvmpfn: error: t\.jsonl:\d+: over the memory limit: the simulated VM holds about [\d.]+ MiB "
        r"\(max_memory 256 MiB\), most of it guest pages with contents: [\d,]+ \([\d.]+ MiB\)\n",
        stderr,
    ), stderr
    report = json.loads(proc.stdout)
    assert 50_000 < report["events"] < 80_000
    assert [f["code"] for f in report["findings"]] == ["refcount-leak"]


def test_a_real_memory_error_keeps_the_findings(tmp_path: Path):
    """With no limit (max_memory 0) and 384 MiB of address space the replay runs out of memory for real: it
    still returns the finding made before, and a one-line error."""
    (tmp_path / "t.jsonl").write_bytes(leak_then_growth(200_000))
    script = (
        "import json, sys\n"
        "from kvmpfn.replay import ReplayOptions, replay_file\n"
        f"r = replay_file('t.jsonl', ReplayOptions(bugs=frozenset({{'{LEAK_BUG}'}}), max_memory=0))\n"
        "print(json.dumps({'error': r.error, 'events': r.events, 'codes': [f['code'] for f in r.findings]}))\n"
    )
    proc = _run(tmp_path, 384 * MiB, "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert re.fullmatch(r"t\.jsonl:\d+: out of memory here; the findings up to here are reported", out["error"])
    assert 1000 < out["events"] < 200_000 and out["codes"] == ["refcount-leak"]


def test_cli_out_of_memory_at_the_teardown_is_one_line_with_the_report(tmp_path: Path):
    """Issue 21: a MemoryError in the implicit teardown audit gave a traceback, exit 1 and nothing on stdout."""
    (tmp_path / "t.jsonl").write_bytes(leak_then_growth(10))
    script = (
        "import runpy, sys\n"
        "from kvmpfn.audit import Auditor\n"
        "full_audit = Auditor.full_audit\n"
        "def failing(self, label):\n"
        "    if label == 'teardown':\n"
        "        raise MemoryError\n"
        "    return full_audit(self, label)\n"
        "Auditor.full_audit = failing\n"
        "sys.argv[0] = 'kvmpfn'\n"
        "runpy.run_module('kvmpfn', run_name='__main__')\n"
    )
    proc = _run(tmp_path, 1 << 30, "-c", script, "replay", "t.jsonl", "--bug", LEAK_BUG, "--format", "json")
    assert proc.returncode == 2
    assert proc.stderr.decode() == (
        "kvmpfn: error: t.jsonl:27: out of memory in the teardown audit after this line; the findings up to here "
        "are reported\n"
    )
    assert [f["code"] for f in json.loads(proc.stdout)["findings"]] == ["refcount-leak"]


def test_shadow_pages_are_named_with_the_kernels_budget(tmp_path: Path):
    """Faults on fresh 2 MiB regions of a 1 TiB TDP guest: a shadow page each, under a budget of 2% of the
    guest's pages (5,368,709) that bounds nothing here; max_memory does."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(tdp_faults(3000))
    result = replay_file(str(path), ReplayOptions(max_memory=8 * MiB))
    assert re.fullmatch(
        rf"{re.escape(str(path))}:{CHECK_EVERY + 2}: over the memory limit: the simulated VM holds about [\d.]+ MiB "
        r"\(max_memory 8 MiB\), most of it shadow pages \(the kernel's budget: 5,368,709\): 1,03\d \([\d.]+ MiB\)",
        result.error,
    ), result.error


def test_a_header_alone_over_the_limit_names_the_header_line(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'# a comment\n{"kvmpfn": 1}\n')
    result = replay_file(str(path), ReplayOptions(max_memory=1))
    assert result.error.startswith(f"{path}:2: over the memory limit: the simulated VM holds about "), result.error
    assert result.events == 0


class _Thresholds:
    """An observer that notes the garbage collector's thresholds while the replay runs."""

    records = False

    def __init__(self) -> None:
        self.seen: set[tuple[int, ...]] = set()

    def attach(self, rp) -> None:
        self.seen.add(gc.get_threshold())

    def event(self, seq, line, e, rec) -> bool:
        self.seen.add(gc.get_threshold())
        return False

    def finish(self, rp) -> None:
        pass


@pytest.mark.parametrize("bad", [False, True])
def test_a_replay_collects_cycles_less_often_and_restores_the_thresholds(tmp_path: Path, bad):
    path = tmp_path / "t.jsonl"
    write_synth(str(path), SynthSpec("steady", 300, seed=1, mmu="tdp"))
    if bad:
        with path.open("a") as f:
            f.write('{"op": "access", "addr": "0x1000", "write": 2}\n')
    before = gc.get_threshold()
    assert before != REPLAY_GC_THRESHOLD
    observer = _Thresholds()
    result = replay_file(str(path), ReplayOptions(), observer=observer)
    assert (result.error is not None) == bad
    assert observer.seen == {REPLAY_GC_THRESHOLD}
    assert gc.get_threshold() == before
