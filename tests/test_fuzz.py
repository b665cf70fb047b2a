"""Fuzzing (issue 9), with hypothesis: the reader and the replay on mutated traces, and the MMU on random
valid guest-action traces at a volume that cheap per-trace work allows.

- **Mutated traces.** A trace of the bundled corpus (traces/) is mutated: bytes flipped, set, deleted or
  inserted (JSON tokens, NUL, invalid UTF-8, huge numbers), the file truncated, lines swapped, dropped or
  doubled, and fields swapped, set to odd values, dropped, renamed or moved between lines; then it may be
  compressed (gzip, zstd) and the compressed stream damaged too. It is replayed (``replay_file``, what the CLI
  runs) with random options. Properties: no exception escapes and no internal error or internal inconsistency
  (``--paranoid`` now and then) is reported; an input error is one line that starts with the path and, when it
  names a line, every outcome record comes from an earlier line (nothing after the error was applied, nothing
  before it lost); replaying again gives byte-identical outcome records, findings and error.
- **Valid guest traces**, from the generators of test_audit_property.py (page-table writes, accesses, cr3
  switches, dirty logging, injected failures, host remaps and memslot changes, in 64-bit, PAE and 32-bit
  paging, every kernel variant) and test_differential.py (random page-table shapes, pte rewrites, feature
  changes, two vcpus): no finding, every reference returned at teardown, shadow and tdp agree on what the
  guest sees. Here the full audit runs every few events instead of after each one (the ``*_fuzz`` tests of
  those modules do that, on fewer traces).

``make fuzz`` runs the ``fuzz``-marked tests of every module: 100,000 generated traces in all, split into
parametrised shards so that pytest-xdist spreads them over the CPUs; the count actually run is printed at the
end ("generated traces run: N"). ``make test`` runs the short, unmarked variants.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zstandard
from fuzz_count import generated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_audit_property import check as check_guest_trace
from test_audit_property import guest_trace
from test_differential import check_program, guest_programs

from kvmpfn.kvm.bugs import BUGS
from kvmpfn.replay import ReplayOptions, replay_file

REPO = Path(__file__).resolve().parents[1]
SEEDS = sorted((p.relative_to(REPO / "traces").as_posix(), p.read_bytes()) for p in (REPO / "traces").rglob("*.jsonl"))

#: The fuzz profile: 100,000 generated traces with the *_fuzz tests of test_audit_property.py (1,500) and
#: test_differential.py (6,000). Shards are separate tests (pytest-xdist hands each to a free worker).
READER_SHARDS, READER_EXAMPLES = 14, 5_000
GUEST_SHARDS, GUEST_EXAMPLES = 6, 2_500
DIFF_SHARDS, DIFF_EXAMPLES = 5, 1_500
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz_shards(shards: int, examples: int):
    """The ``fuzz``-marked variant of a hypothesis test: ``shards`` tests (parameter ``shard``) of ``examples``
    examples each."""

    def mark(test):
        test = settings(FUZZ, max_examples=examples)(test)
        return pytest.mark.fuzz(pytest.mark.parametrize("shard", range(shards))(test))

    return mark


# --- mutations ---------------------------------------------------------------------------------------------

TOKENS = (
    b"\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b",",
    b":",
    b"\\",
    b"#",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    b"0x",
    b"-1",
    b"1e400",
    b"18446744073709551616",
    b"\\ud800",
    b'"x": ',
    b'"op": "teardown"',
    b'{"op": "audit"}\n',
    b"[" * 40,
)
FIELDS = (
    "op", "vcpu", "t", "x", "addr", "write", "user", "fetch", "ac", "err", "gpa", "val", "len", "slot", "gfn",
    "npages", "backing", "stop", "fault", "count", "label", "paging", "cr3", "cr0_wp", "efer_nx", "cr4_pse",
    "cr4_smep", "cr4_smap", "maxphyaddr", "gbpages", "mmu", "guest", "memslots", "kernel", "teardown", "host",
    "first_pfn", "kvmpfn", "recorded", "event", "pid", "address", "error_code", "spte", "level",
)  # fmt: skip
VALUES = (
    0, 1, -1, 2, 3, 7, 8, 15, 16, 31, 32, 36, 52, 4095, 4096, 0x1FFE, 1 << 20, 1 << 32, 1 << 40, 1 << 47,
    1 << 52, 1 << 63, (1 << 64) - 1, 1 << 64, 1.5, True, False, None, "", "0x", "0x1000", "0X1F", "-0x1", "4096",
    "zz", [], {}, [1], {"recorded": []}, "teardown", "audit", "access", "pf", "memslot", "none", "32", "pae",
    "64", "tdp", "shadow", "ram", "hugetlb", "mmio", "reserved", "notifier", "page", "pfn-io", "enomem",
    "gup_fail", "pte_race", "x" * 200,
)  # fmt: skip


def _objects(data: bytes) -> tuple[list[bytes], list[int]]:
    """The lines of ``data`` and the indices of those that are JSON objects."""
    lines = data.split(b"\n")
    objects = []
    for i, line in enumerate(lines):
        if line.lstrip()[:1] == b"{":
            try:
                if isinstance(json.loads(line), dict):
                    objects.append(i)
            except ValueError:
                pass
    return lines, objects


@st.composite
def field_mutation(draw, data: bytes) -> bytes:
    """Swap, set, drop, rename or move a field of a JSON line (nested objects included)."""
    lines, objects = _objects(data)
    if not objects:
        return data
    index = draw(st.sampled_from(objects))
    obj = json.loads(lines[index])
    target = obj
    if draw(st.booleans()):  # maybe one level down: guest, host, x, a memslot, a recorded record
        nested = [v for v in obj.values() if isinstance(v, dict)]
        nested += [i for v in obj.values() if isinstance(v, list) for i in v if isinstance(i, dict)]
        if nested:
            target = draw(st.sampled_from(nested))
    keys = list(target)
    how = draw(st.sampled_from(["swap", "set", "drop", "rename", "move"]))
    if how == "swap" and len(keys) >= 2:
        a, b = draw(st.lists(st.sampled_from(keys), min_size=2, max_size=2, unique=True))
        target[a], target[b] = target[b], target[a]
    elif how == "set" or not keys:
        target[draw(st.sampled_from(keys + list(FIELDS)))] = draw(st.sampled_from(VALUES))
    elif how == "drop":
        del target[draw(st.sampled_from(keys))]
    elif how == "rename":
        key = draw(st.sampled_from(keys))
        target[draw(st.sampled_from(FIELDS))] = target.pop(key)
    else:  # move a field to another line
        key = draw(st.sampled_from(keys))
        other = json.loads(lines[draw(st.sampled_from(objects))])
        other[key] = target.pop(key)
        lines[draw(st.sampled_from(objects))] = json.dumps(other).encode()
    lines[index] = json.dumps(obj).encode()
    return b"\n".join(lines)


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """Flip a bit, set or delete bytes, insert a token, or truncate."""
    if not data:
        return draw(st.sampled_from(TOKENS))
    pos = draw(st.integers(0, len(data) - 1))
    how = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
    if how == "flip":
        return data[:pos] + bytes([data[pos] ^ (1 << draw(st.integers(0, 7)))]) + data[pos + 1 :]
    if how == "set":
        return data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
    if how == "delete":
        return data[:pos] + data[pos + draw(st.integers(1, 64)) :]
    if how == "insert":
        return data[:pos] + draw(st.sampled_from(TOKENS)) + data[pos:]
    return data[:pos]


@st.composite
def line_mutation(draw, data: bytes) -> bytes:
    """Swap, drop or double a line."""
    lines = data.split(b"\n")
    i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["swap", "drop", "double"]))
    if how == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "drop":
        del lines[i]
    else:
        lines.insert(j, lines[i])
    return b"\n".join(lines)


@dataclass
class Mutated:
    seed: str
    suffix: str
    data: bytes
    options: ReplayOptions
    twice: bool  # replay again and compare the bytes (one trace in four: it doubles the cost)

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: enough to write the file again
        return f"Mutated({self.seed!r}, {self.suffix!r}, options={self.options!r}, data={self.data!r})"


@st.composite
def mutated_traces(draw) -> Mutated:
    seed, data = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        mutate = draw(st.sampled_from([field_mutation, field_mutation, byte_mutation, line_mutation]))
        data = draw(mutate(data))
    suffix = draw(st.sampled_from([".jsonl"] * 4 + [".jsonl.gz", ".jsonl.zst"]))
    if suffix == ".jsonl.gz":
        data = gzip.compress(data, mtime=0)
    elif suffix == ".jsonl.zst":
        data = zstandard.ZstdCompressor().compress(data)
    if suffix != ".jsonl" and draw(st.booleans()):
        data = draw(byte_mutation(data))  # damage the compressed stream
    bugs = draw(st.lists(st.sampled_from(sorted(BUGS)), max_size=1)) if draw(st.integers(0, 9)) == 0 else []
    options = ReplayOptions(
        mmu=draw(st.sampled_from([None, "shadow", "tdp"])),
        kernel=draw(st.sampled_from([None, "page", "pfn", "pfn-io", "notifier"])),
        audit_every=draw(st.sampled_from([0] * 8 + [1, 5])),
        kernel_audit=draw(st.integers(0, 9)) == 0,
        paranoid=draw(st.integers(0, 19)) == 0,
        bugs=frozenset(bugs),
    )
    return Mutated(seed, suffix, data, options, twice=draw(st.integers(0, 3)) == 0)


# --- the property ------------------------------------------------------------------------------------------

LINE_RE = re.compile(r":(\d+): ")


def replay_bytes(path: str, options: ReplayOptions) -> tuple[str, str, str | None, int]:
    """One replay: (outcome records, findings and summary as JSON, error, events)."""
    emit = io.StringIO()
    result = replay_file(path, options, emit)
    report = msgspec.json.encode([result.findings, result.summary()]).decode()
    return emit.getvalue(), report, result.error, result.events


def check_mutated(case: Mutated, directory: Path) -> None:
    path = str(directory / f"t{case.suffix}")
    Path(path).unlink(missing_ok=True)  # rewriting a file in place can wait for the disk (ext4 auto_da_alloc)
    Path(path).write_bytes(case.data)
    first = replay_bytes(path, case.options)
    if case.twice:
        assert replay_bytes(path, case.options) == first, "replaying again gave different output"
    records, _report, error, events = first
    lines = [json.loads(r)["line"] for r in records.splitlines()]
    assert len(lines) == events
    if error is not None:
        assert "\n" not in error and error.startswith(path), error
        for bad in ("internal error", "internal consistency", "Traceback"):
            assert bad not in error, error
        if not case.options.bugs:  # the simulated kernel may BUG() only under a re-created bug
            assert "simulated kernel BUG" not in error, error
        where = LINE_RE.match(error, len(path))
        if where is not None:
            assert all(line < int(where.group(1)) for line in lines), error
    generated("reader-mutation")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=300)
@given(case=mutated_traces())
def test_mutated_traces_fail_cleanly(case: Mutated, workdir: Path) -> None:
    check_mutated(case, workdir)


@fuzz_shards(READER_SHARDS, READER_EXAMPLES)
@given(case=mutated_traces())
def test_mutated_traces_fail_cleanly_fuzz(shard: int, case: Mutated, workdir: Path) -> None:
    check_mutated(case, workdir)


# --- valid guest traces, cheaply -----------------------------------------------------------------------------


@settings(FUZZ, max_examples=20)
@given(trace=guest_trace(max_events=40))
def test_valid_guest_traces_audit_clean(trace) -> None:
    check_guest_trace(trace, audit_every=4, kernel_audit=False)


@fuzz_shards(GUEST_SHARDS, GUEST_EXAMPLES)
@given(trace=guest_trace(max_events=40))
def test_valid_guest_traces_audit_clean_fuzz(shard: int, trace) -> None:
    check_guest_trace(trace, audit_every=4, kernel_audit=False)


@fuzz_shards(DIFF_SHARDS, DIFF_EXAMPLES)
@given(program=guest_programs(max_ops=40))
def test_shadow_and_tdp_agree_fuzz(shard: int, program) -> None:
    check_program(program, audit_every=4)
