"""Hostile input (issue 9) through the real command line, each run bounded in time and memory (cli_helper).

``HOSTILE``: traces from other tools, truncated CI artifacts and hand-edited files that break
docs/trace-format.md. Each gives exit status 2 and one line on stderr naming PATH:LINE (where a line applies), the
field (where one applies) and the problem; never a traceback, a hang or unbounded memory.

``LEGAL``: what docs/trace-format.md makes legal but odd behaves as documented: exit 0 and the outcome records it
describes.

Then ``kvmpfn audit`` over a corpus with broken traces among good ones, and "nothing is lost": a replay that
stops on bad input still reports what it found before.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from cli_helper import check_input_error, run_kvmpfn
from growth_helper import hugetlb_regions, leak_then_growth

REPO = Path(__file__).resolve().parents[1]
HEADER = b'{"kvmpfn": 1}\n'
TDP_HEADER = b'{"kvmpfn": 1, "mmu": "tdp", "guest": {"paging": "none"}}\n'
MB50 = 50 << 20
#: 100,000 valid events: a stream cut in the middle breaks far beyond line 1000
BODY = HEADER + b"".join(b'{"op": "invlpg", "addr": %d, "x": "%d"}\n' % (i * 4096, i) for i in range(100_000))
BIG_INT = b"1" + b"0" * 5000  # beyond what any JSON decoder here reads as a number


def event(line: bytes, header: bytes = HEADER) -> bytes:
    return header + line + b"\n"


def access(addr: str, **extra) -> bytes:
    fields = {"op": "access", "addr": addr, "write": 0, "user": 0, "fetch": 0, **extra}
    return json.dumps(fields).encode()


def slots(n: int, first: int = 0) -> list[dict]:
    return [{"slot": first + i, "gfn": i, "npages": 1, "backing": "ram"} for i in range(n)]


def header(**fields) -> bytes:
    return json.dumps({"kvmpfn": 1, **fields}).encode() + b"\n"


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bomb(compress: Callable[[bytes], bytes]) -> bytes:
    """A header, then 1 GiB without a newline: 1024 members (gzip) or frames (zstd) of 1 MiB each."""
    return compress(HEADER) + compress(b"a" * (1 << 20)) * 1024


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


ANY_LINE = -1


@dataclass
class Hostile:
    name: str
    data: bytes | Callable[[], bytes] | None  # None: the path does not exist; a callable makes big data late
    line: int | None  # None: a file-level error; ANY_LINE: wherever the stream broke (after line 1000)
    field: str | None = None
    words: str = ""
    filename: str = "t.jsonl"
    setup: Callable[[Path], None] | None = None  # makes the path (or what the header names) itself


def make_dir(path: Path) -> None:
    path.mkdir()


def make_fifo(path: Path) -> None:
    os.mkfifo(path.parent / "guest.core")  # nobody ever writes to it: opening it for reading blocks


HOSTILE = [
    # sizes and shapes
    Hostile("50 MB single line", lambda: event(b'{"op": "audit", "x": "' + b"a" * MB50 + b'"}'), 2, words="too long"),
    Hostile("50 MB line without a newline", lambda: HEADER + b"a" * MB50, 2, words="line too long"),
    Hostile("50 MB comment line", lambda: HEADER + b"#" + b"a" * MB50 + b"\n", 2, words="line too long"),
    Hostile("1 GiB line in a gzip stream", bomb(gzip.compress), 2, filename="t.jsonl.gz", words="line too long"),
    Hostile("1 GiB line in a zstd stream", bomb(zstd), 2, filename="t.jsonl.zst", words="line too long"),
    Hostile(
        "deep nesting: 100k [",
        event(b'{"op": "audit", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        2,
        words="nested too deeply",
    ),
    Hostile("deep nesting: 100k [ unclosed", HEADER + b"[" * 100_000 + b"\n", 2, words="nested too deeply"),
    Hostile(
        "deep nesting in the header",
        b'{"kvmpfn": 1, "x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}\n",
        1,
        words="nested too deeply",
    ),
    # numbers
    Hostile("integer 2**64", event(b'{"op": "pf", "addr": 18446744073709551616, "err": 0}'), 2, "addr"),
    Hostile("hex string over 64 bits", event(b'{"op": "invlpg", "addr": "0x10000000000000000"}'), 2, "addr"),
    Hostile(
        "integer of 5001 digits",
        event(b'{"op": "pf", "addr": ' + BIG_INT + b', "err": 0}'),
        2,
        "addr",
        'event "pf": field "addr": number out of range',
    ),
    Hostile(
        "integer of 5001 digits in the header", b'{"kvmpfn": 1, "guest": {"cr3": ' + BIG_INT + b"}}\n", 1, "guest.cr3"
    ),
    Hostile("integer of 5001 digits in x", event(b'{"op": "audit", "x": [' + BIG_INT + b"]}"), 2, "x[0]"),
    Hostile("float beyond 1e308", event(b'{"op": "cr3", "val": 1e400}'), 2, "val", "number out of range"),
    Hostile("hex string of 5000 digits", event(b'{"op": "cr3", "val": "0x' + b"f" * 5000 + b'"}'), 2, "val"),
    # addresses
    Hostile("gpa 2**52", event(b'{"op": "write", "gpa": "0x10000000000000", "val": 0, "len": 1}'), 2, "gpa"),
    Hostile(
        "pte_write gpa 2**60", event(b'{"op": "pte_write", "gpa": "0x1000000000000000", "val": 0, "len": 8}'), 2, "gpa"
    ),
    Hostile(
        "tdp pf gpa beyond MAXPHYADDR",
        event(b'{"op": "pf", "addr": "0x20000000000000", "err": 0}', header(mmu="tdp")),
        2,
        "addr",
        "40-bit physical address space",
    ),
    Hostile("gfn 2**40", event(b'{"op": "host_remap", "gfn": "0x10000000000"}'), 2, "gfn"),
    Hostile("non-canonical gva", event(access("0x0000800000000000")), 2, "addr", "not canonical"),
    Hostile("non-canonical gva in a pf", event(b'{"op": "pf", "addr": "0xffff000000001000", "err": 0}'), 2, "addr"),
    Hostile("non-canonical gva in an invlpg", event(b'{"op": "invlpg", "addr": "0x00f0000000000000"}'), 2, "addr"),
    Hostile(
        "gva beyond 4 GiB in 32-bit paging", event(access("0x100000000"), header(guest={"paging": "32"})), 2, "addr"
    ),
    Hostile("addr beyond 4 GiB with paging off", event(access("0x100000000"), TDP_HEADER), 2, "addr"),
    # memslots
    Hostile(
        "overlapping memslots in the header",
        header(memslots=[*slots(1), {"slot": 1, "gfn": 0, "npages": 2, "backing": "mmio"}]),
        1,
        "memslots[1]",
        "overlaps slot 0",
    ),
    Hostile(
        "memslot event overlapping a slot",
        event(b'{"op": "memslot", "slot": 1, "gfn": "0xffff", "npages": 2}'),
        2,
        "gfn",
        "overlaps slot 0",
    ),
    Hostile(
        "zero-sized memslot in the header",
        header(memslots=[{"slot": 0, "gfn": 0, "npages": 0, "backing": "ram"}]),
        1,
        "memslots[0].npages",
    ),
    Hostile(
        "zero-sized memslot event for a slot that does not exist",
        event(b'{"op": "memslot", "slot": 5, "gfn": 0, "npages": 0}'),
        2,
        "slot",
        "does not exist",
    ),
    Hostile(
        "10,000 memslots in the header", header(memslots=slots(10_000)), 1, "memslots[32].slot", "KVM_MEMORY_SLOTS"
    ),
    Hostile(
        "10,000 memslots in the header, ids from 1000",
        header(memslots=slots(10_000, first=1000)),
        1,
        "memslots[0].slot",
        "slot 1000 is not below KVM_MEMORY_SLOTS",
    ),
    Hostile(
        "10,000 memslot events",
        HEADER
        + b"".join(
            b'{"op": "memslot", "slot": %d, "gfn": %d, "npages": 1}\n' % (i, 0x10000 + i) for i in range(10_000)
        ),
        34,  # slot 32 is the 33rd event: line 34
        "slot",
        "KVM_MEMORY_SLOTS",
    ),
    # events
    Hostile("event after teardown", HEADER + b'{"op": "teardown"}\n{"op": "audit"}\n', 3, words="event after teardown"),
    Hostile(
        "write crossing a page", event(b'{"op": "write", "gpa": "0x1ffe", "val": 0, "len": 4}'), 2, "gpa", "crosses"
    ),
    Hostile("pte_write crossing a page", event(b'{"op": "pte_write", "gpa": "0xffc", "val": 0, "len": 8}'), 2, "gpa"),
    Hostile("vcpu 16", event(b'{"op": "audit", "vcpu": 16}'), 2, "vcpu", "0 <= vcpu <= 15"),
    Hostile('vcpu "0x10"', event(access("0x1000", vcpu="0x10")), 2, "vcpu"),
    Hostile("vcpu -1", event(b'{"op": "audit", "vcpu": -1}'), 2, "vcpu"),
    # bytes
    Hostile("NUL bytes", HEADER + b'{"op": "audit"}\n{"op": "audit"\x00}\n', 3, words="NUL byte"),
    Hostile("only NUL bytes", HEADER + b"\x00" * 100 + b"\n", 2, words="NUL byte at byte 0"),
    Hostile("invalid UTF-8", HEADER + b'{"op": "audit", "label": "caf\xe9"}\n', 2, words="invalid UTF-8"),
    Hostile("invalid UTF-8 in the header", b'{"kvmpfn": 1, "x": "\xff\xfe"}\n', 1, words="invalid UTF-8"),
    Hostile("unpaired UTF-16 surrogate", event(b'{"op": "audit", "label": "\\ud800"}'), 2, words="surrogate"),
    # compression and files
    Hostile(
        "gzip stream cut in the middle", cut(gzip.compress(BODY)), ANY_LINE, filename="t.jsonl.gz", words="truncated"
    ),
    Hostile("zstd stream cut in the middle", cut(zstd(BODY)), ANY_LINE, filename="t.jsonl.zst", words="truncated"),
    Hostile("gzip stream cut in its header", gzip.compress(BODY)[:5], 1, filename="t.jsonl.gz", words="truncated"),
    Hostile("zstd stream cut in its header", zstd(BODY)[:5], 1, filename="t.jsonl.zst", words="truncated"),
    Hostile(".gz that is not gzip", BODY[:1000], 1, filename="t.jsonl.gz", words="not a gzip file"),
    Hostile(".zst that is not zstd", BODY[:1000], 1, filename="t.jsonl.zst", words="not a zstd file"),
    Hostile("directory as the trace", None, None, words="is a directory", setup=make_dir),
    Hostile("missing file", None, None, words="no such file"),
    Hostile(
        "memory image that is a FIFO",
        header(memory="guest.core"),
        1,
        "memory",
        "not a regular file",
        setup=make_fifo,
    ),
    Hostile("memory image that is a device", header(memory="/dev/zero"), 1, "memory", "not a regular file"),
    Hostile("memory image path with a NUL", header(memory="a\0b"), 1, "memory", "null byte"),
    # memory (issue 21): the default max_memory is half of the 1 GiB address space cli_helper allows
    Hostile(
        "a VM that outgrows max_memory: 140,000 stores to fresh pages",
        lambda: leak_then_growth(140_000),
        ANY_LINE,
        words="(max_memory 512 MiB), most of it guest pages with contents",
    ),
]


def test_the_table_covers_issue_9():
    names = {case.name for case in HOSTILE}
    assert len(names) == len(HOSTILE)
    for must in (
        "50 MB single line",
        "deep nesting: 100k [",
        "integer 2**64",
        "gpa 2**52",
        "non-canonical gva",
        "overlapping memslots in the header",
        "memslot event overlapping a slot",
        "zero-sized memslot in the header",
        "10,000 memslots in the header",
        "event after teardown",
        "write crossing a page",
        "vcpu 16",
        "NUL bytes",
        "invalid UTF-8",
        "gzip stream cut in the middle",
        "zstd stream cut in the middle",
        ".gz that is not gzip",
        ".zst that is not zstd",
        "directory as the trace",
        "missing file",
    ):
        assert must in names


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_input_exits_2_with_one_line(tmp_path: Path, case: Hostile):
    target = tmp_path / case.filename
    if case.setup is not None:
        case.setup(target)
    if case.data is not None:
        target.write_bytes(case.data() if callable(case.data) else case.data)
    proc = run_kvmpfn(tmp_path, "replay", case.filename)
    if case.line == ANY_LINE:
        message = check_input_error(proc, rf"^{case.filename}:\d+: ", case.field, case.words)
        assert int(message.split(":")[3]) > 1000, message  # the lines before the break were read
    else:
        where = f"{case.filename}:{case.line}: " if case.line is not None else f"{case.filename}: "
        check_input_error(proc, where, case.field, case.words)


# --- legal but odd ------------------------------------------------------------------------------------------


@dataclass
class Legal:
    name: str
    data: bytes
    expect: dict[int, dict]  # seq -> fields its outcome record must have
    filename: str = "t.jsonl"
    args: tuple[str, ...] = ()
    events: int | None = None  # how many records, when not just the expected ones
    extra: dict = field(default_factory=dict)


WRITE = b'{"op": "write", "gpa": "0x%x", "val": "0x%x", "len": 8}\n'
#: 64-bit guest tables at gfns 1..4: gva 0 and gva 0xffff800000000000 both map gpa 0x5000
TABLES = (
    header(guest={"paging": "64", "cr3": "0x1000"})
    + WRITE % (0x1000, 0x2007)
    + WRITE % (0x1000 + 256 * 8, 0x2007)
    + WRITE % (0x2000, 0x3007)
    + WRITE % (0x3000, 0x4007)
    + WRITE % (0x4000, 0x5007)
)

LEGAL = [
    Legal(
        "an access outside every memslot is MMIO",
        event(access("0x40000000", write=1), TDP_HEADER),
        {0: {"result": "mmio", "gpa": "0x40000000"}},
    ),
    Legal(
        "an access outside every memslot is MMIO under shadow paging",
        event(access("0x40000000", write=1), header(guest={"paging": "none"})),
        {0: {"result": "mmio", "gpa": "0x40000000"}},
    ),
    Legal(
        "a vcpu is created on first use",
        TDP_HEADER + access("0x1000", vcpu=15) + b"\n" + access("0x1000", vcpu=3) + b"\n",
        {0: {"result": "mapped", "gpa": "0x1000"}, 1: {"result": "hit", "gpa": "0x1000"}},
    ),
    Legal(
        "a vcpu created later starts from the header's guest state",
        TABLES + access("0xffff800000000000", vcpu=7) + b"\n",
        {5: {"result": "mapped", "gpa": "0x5000"}},
    ),
    Legal(
        "a canonical gva in the upper half",
        TABLES + access("0xffff800000000008", write=1) + b"\n",
        {5: {"result": "mapped", "gpa": "0x5008"}},
    ),
    Legal(
        "npages 0 deletes a slot; its gfns are then MMIO",
        TDP_HEADER + b'{"op": "memslot", "slot": 0, "gfn": 0, "npages": 0}\n' + access("0x1000") + b"\n",
        {0: {"result": "ok"}, 1: {"result": "mmio", "gpa": "0x1000"}},
    ),
    Legal(
        "10,000 memslot events moving one slot",
        TDP_HEADER
        + b"".join(b'{"op": "memslot", "slot": 1, "gfn": %d, "npages": 1}\n' % (0x10000 + i) for i in range(10_000))
        + access("0x1270f000")
        + b"\n",
        {9_999: {"result": "ok"}, 10_000: {"result": "mapped", "gpa": "0x1270f000"}},
        events=10_001,
    ),
    Legal(
        "a store outside every memslot is dropped",
        event(b'{"op": "write", "gpa": "0xffffffffffff8", "val": 1, "len": 8}'),
        {0: {"result": "ok"}},
    ),
    Legal(
        "integers as decimal and hex strings, any case",
        event(b'{"op": "pf", "addr": "4096", "err": "0X2"}', TDP_HEADER),
        {0: {"result": "mapped", "gpa": "0x1000"}},
    ),
    Legal(
        "t and x are carried untouched",
        event(b'{"op": "audit", "t": [1.5, {"a": null}], "x": {"why": "\\u00e9\\ud83d\\ude00", "n": [true, 1e300]}}'),
        {0: {"result": "ok", "t": [1.5, {"a": None}], "x": {"why": "\u00e9\U0001f600", "n": [True, 1e300]}}},
    ),
    Legal(
        "x.recorded records of the wrong shape are ignored",
        event(
            b'{"op": "audit", "x": {"recorded": [5, {"event": [1]}, {"event": "kvm_page_fault", "vcpu": [], '
            b'"pid": {}, "address": 4096}, {"event": "kvm_mmu_spte_requested", "pid": [], "gfn": 1, "pfn": 1}]}}'
        ),
        {0: {"result": "ok"}},
    ),
    Legal(
        "CRLF line ends, blank lines and comments between events",
        b'# a comment\r\n\r\n{"kvmpfn": 1}\r\n   \r\n# another\r\n{"op": "audit"}\r\n',
        {0: {"result": "ok", "line": 6}},
    ),
    Legal(
        "gzip of several members",
        gzip.compress(HEADER) + gzip.compress(b'{"op": "audit"}\n'),
        {0: {"result": "ok", "line": 2}},
        filename="t.jsonl.gz",
    ),
    Legal(
        "zstd of several frames",
        zstd(HEADER) + zstd(b'{"op": "audit"}\n'),
        {0: {"result": "ok", "line": 2}},
        filename="t.jsonl.zst",
    ),
    Legal(
        "stores to 17,000 fresh 2 MiB regions of a hugetlb slot (1 MB; issue 21: it took 2 GiB)",
        hugetlb_regions(17_000),
        {0: {"result": "ok"}, 16_999: {"result": "ok", "line": 17_001}},
        events=17_000,
    ),
    Legal(
        "a line of exactly 1 MiB",
        event(b'{"op": "audit", "label": "' + b"a" * ((1 << 20) - 28) + b'"}'),
        {0: {"result": "ok"}},
    ),
]


@pytest.mark.parametrize("case", LEGAL, ids=[case.name for case in LEGAL])
def test_legal_but_odd_input_behaves_as_documented(tmp_path: Path, case: Legal):
    (tmp_path / case.filename).write_bytes(case.data)
    proc = run_kvmpfn(tmp_path, "replay", case.filename, "--emit", "out.jsonl", *case.args)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    if case.events is not None:
        assert len(records) == case.events
    for seq, want in case.expect.items():
        assert records[seq]["seq"] == seq
        assert {key: records[seq].get(key) for key in want} == want, records[seq]


def test_a_vcpu_id_from_a_string_is_the_same_vcpu(tmp_path: Path):
    """``"vcpu": "0xf"`` and ``"vcpu": 15`` are one vcpu (created once): the second access is a hit."""
    data = TDP_HEADER + access("0x1000", vcpu="0xf") + b"\n" + access("0x1000", vcpu=15) + b"\n"
    (tmp_path / "t.jsonl").write_bytes(data)
    proc = run_kvmpfn(tmp_path, "replay", "t.jsonl", "--emit", "-")
    assert proc.returncode == 0, proc.stderr.decode()
    results = [json.loads(line)["result"] for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    assert results == ["mapped", "hit"]


def test_standard_input(tmp_path: Path):
    proc = run_kvmpfn(tmp_path, "replay", "-", "--emit", "-", "-q", stdin=HEADER + b'{"op": "audit"}\n{"op": "pf"}\n')
    check_input_error(proc, "<stdin>:3: ", "addr", "missing required field")
    assert b'{"seq": 0, "line": 2, "op": "audit", "result": "ok", "findings": 0}' in proc.stdout


# --- the gate ------------------------------------------------------------------------------------------------


def test_audit_reports_every_trace_when_some_are_hostile(tmp_path: Path):
    """One broken trace fails that trace and the gate (exit 1, docs/ci.md), with its one-line error; the good
    traces, and one with an expected finding, are still replayed and reported."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a-clean.jsonl").write_bytes(event(access("0x1000"), TDP_HEADER))
    (corpus / "b-cut.jsonl.zst").write_bytes(cut(zstd(BODY)))
    (corpus / "c-long.jsonl").write_bytes(HEADER + b"a" * MB50)
    (corpus / "sub" / "d-notgz.jsonl.gz").write_bytes(BODY[:100])
    (corpus / "sub" / "e-after-teardown.jsonl").write_bytes(HEADER + b'{"op": "teardown"}\n{"op": "audit"}\n')
    leak = (REPO / "traces" / "findings" / "refcount-leak.jsonl").read_bytes()
    (corpus / "f-leak.jsonl").write_bytes(leak)
    (corpus / "kvmpfn-baseline.json").write_text('{"version": 1, "traces": {"f-leak.jsonl": {"refcount-leak": 1}}}')
    proc = run_kvmpfn(tmp_path, "audit", "corpus", "--jobs", "2", "--bug", "same-pfn-no-release", "--format", "json")
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"Traceback" not in proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    status = {t["trace"]: t["status"] for t in doc["traces"]}
    assert status == {
        "corpus/a-clean.jsonl": "pass",
        "corpus/b-cut.jsonl.zst": "error",
        "corpus/c-long.jsonl": "error",
        "corpus/f-leak.jsonl": "pass",
        "corpus/sub/d-notgz.jsonl.gz": "error",
        "corpus/sub/e-after-teardown.jsonl": "error",
    }
    errors = {t["trace"]: t["error"] for t in doc["traces"] if t["status"] == "error"}
    assert "zstd stream truncated" in errors["corpus/b-cut.jsonl.zst"]
    assert errors["corpus/c-long.jsonl"] == "corpus/c-long.jsonl:2: line too long (over 1048576 bytes)"
    assert errors["corpus/sub/d-notgz.jsonl.gz"] == "corpus/sub/d-notgz.jsonl.gz:1: not a gzip file"
    assert errors["corpus/sub/e-after-teardown.jsonl"].startswith("corpus/sub/e-after-teardown.jsonl:3: ")
    assert all("\n" not in e for e in errors.values())
    leak_trace = next(t for t in doc["traces"] if t["trace"] == "corpus/f-leak.jsonl")
    assert [f["code"] for f in leak_trace["findings"]] == ["refcount-leak"]


# --- nothing is lost --------------------------------------------------------------------------------------


def test_a_replay_stopped_by_bad_input_reports_what_it_found(tmp_path: Path):
    """The refcount-leak trace under its bug finds the leak at its ``audit`` event; a bad line after it stops
    the replay (exit 2, one line), and the report still has that finding and the records of every line
    before the bad one. No teardown ran, so nothing more is reported."""
    leak = (REPO / "traces" / "findings" / "refcount-leak.jsonl").read_bytes()
    lines = leak.count(b"\n")
    (tmp_path / "t.jsonl").write_bytes(
        leak + b'{"op": "access", "addr": "0x6000", "write": 2, "user": 0, "fetch": 0}\n'
    )
    args = ("replay", "t.jsonl", "--bug", "same-pfn-no-release", "--format", "json", "--emit", "out.jsonl")
    proc = run_kvmpfn(tmp_path, *args)
    check_input_error(proc, f"t.jsonl:{lines + 1}: ", "write")
    report = json.loads(proc.stdout)
    assert report["events"] == 4
    assert [(f["code"], f["point"], f["line"]) for f in report["findings"]] == [
        ("refcount-leak", "audit after re-fault", lines)
    ]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["op"] for r in records] == ["access", "dirty_log", "access", "audit"]
